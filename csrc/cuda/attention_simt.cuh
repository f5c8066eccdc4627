// Attention on CUDA cores: every dtype (float32, float64, and the half types where tensor cores do not
// apply: decode-sized S, Dh > 256, GPUs before sm_80), any Dh, any strides.
//
// One CTA owns R = nh * nq query rows: nh query heads of ONE KV head times nq query positions. Prefill
// uses nh = 1 and a tile of nq positions; decode (small S) uses nh = H / Hkv, so all the query heads of a
// KV group share each K/V tile and every K/V byte is read once. Keys stream through shared memory in
// tiles of bk with an online softmax. With n_splits > 1 (Flash-Decoding: few CTAs, many keys) each CTA
// covers one slice of the keys and writes a partial (max, sum, unnormalized output) that
// combine_splits_kernel merges.
//
// Shared memory per CTA, in the accumulation dtype: Q [R][Dh] (pre-scaled, as on CPU), K [bk][Dh+1]
// (the +1 makes the column reads of the score loop conflict-free), V [bk][Dh], scores [R][bk],
// output accumulator [R][Dh], three row statistics [R]. The host picks R and bk to fit the device.
#pragma once
#include "attention_common.cuh"
#include "attention_plan.cuh"

namespace pyqkv {
namespace attn {

// Loads keys [k0, k0 + nk) of KV head g into Ks (and Vs when Vs != nullptr), as acc_t.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void simt_load_kv(const Params& p, acc_t* Ks, acc_t* Vs, int64_t b, int64_t g, int64_t k0,
                                             int nk, int Dh) {
  const scalar_t* kp = static_cast<const scalar_t*>(p.k) + b * p.k_sb + g * p.k_sh;
  const scalar_t* vp = static_cast<const scalar_t*>(p.v) + b * p.v_sb + g * p.v_sh;
  for (int e = threadIdx.x; e < nk * Dh; e += blockDim.x) {
    const int c = e / Dh, d = e - c * Dh;
    const int64_t j = k0 + c;
    Ks[c * (Dh + 1) + d] = static_cast<acc_t>(kp[j * p.k_ss + d * p.k_sd]);
    if (Vs != nullptr) Vs[c * Dh + d] = static_cast<acc_t>(vp[j * p.v_ss + d * p.v_sd]);
  }
}

// Masked scores of the CTA's rows against keys [k0, k0 + nk) into Ss [R][bk]; -inf where hidden or
// out of range. Consecutive threads take consecutive keys of one row: Q reads are broadcasts.
template <typename acc_t>
__device__ __forceinline__ void simt_scores(const Params& p, const SimtTiling& t, const acc_t* Qs, const acc_t* Ks,
                                            acc_t* Ss, int64_t b, int64_t h0, int64_t q0, int64_t k0, int nk, int Dh) {
  const int R = t.nh * t.nq;
  for (int e = threadIdx.x; e < R * t.bk; e += blockDim.x) {
    const int r = e / t.bk, c = e - r * t.bk;
    const int64_t hh = h0 + r / t.nq, i = q0 + r % t.nq;
    acc_t s = neg_inf<acc_t>();
    if (c < nk && i < p.S) {
      const acc_t* qr = Qs + r * Dh;
      const acc_t* kr = Ks + c * (Dh + 1);
      acc_t dot = 0;
      for (int d = 0; d < Dh; ++d) dot = fma(qr[d], kr[d], dot);
      s = masked_score<acc_t>(p, dot, b, hh, i, k0 + c);
    }
    Ss[e] = s;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSimtThreads)
    attention_simt_kernel(const __grid_constant__ Params p, const SimtTiling t, acc_t* __restrict__ ws_o,
                          acc_t* __restrict__ ws_ml) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int R = t.nh * t.nq, BK = t.bk, Dh = static_cast<int>(p.Dh);
  acc_t* Qs = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* Ks = Qs + R * Dh;
  acc_t* Vs = Ks + BK * (Dh + 1);
  acc_t* Ss = Vs + BK * Dh;
  acc_t* Os = Ss + R * BK;
  acc_t* row_m = Os + R * Dh;
  acc_t* row_l = row_m + R;
  acc_t* row_a = row_l + R;  // the rescale factor of the current tile; later the row's lse

  // Block index -> (split, query tile, head group, batch); splits of one row group are neighbours.
  int64_t x = blockIdx.x;
  const int split = static_cast<int>(x % t.n_splits);
  x /= t.n_splits;
  const int qt = static_cast<int>(x % t.n_qt);
  x /= t.n_qt;
  const int64_t n_hg = p.H / t.nh;
  const int64_t h0 = (x % n_hg) * t.nh, b = x / n_hg;
  const int64_t g = h0 / (p.H / p.Hkv);  // GQA: the KV head of all nh query heads
  const int64_t q0 = static_cast<int64_t>(qt) * t.nq;
  const int64_t nq_valid = min(static_cast<int64_t>(t.nq), p.S - q0);
  const int64_t key_end = key_end_for(p, q0, nq_valid);
  const int64_t kb = max(static_cast<int64_t>(split) * t.keys_per_split, key_begin_for(p, q0));
  const int64_t ke = min(key_end, static_cast<int64_t>(split) * t.keys_per_split + t.keys_per_split);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = blockDim.x >> 5;
  const acc_t ninf = neg_inf<acc_t>();

  {
    const acc_t scale = static_cast<acc_t>(p.scale);
    const scalar_t* qp = static_cast<const scalar_t*>(p.q) + b * p.q_sb;
    for (int e = tid; e < R * Dh; e += blockDim.x) {
      const int r = e / Dh, d = e - r * Dh;
      const int64_t hh = h0 + r / t.nq, i = q0 + r % t.nq;
      Qs[e] = i < p.S ? static_cast<acc_t>(qp[i * p.q_ss + hh * p.q_sh + d * p.q_sd]) * scale : acc_t(0);
      Os[e] = 0;
    }
    for (int r = tid; r < R; r += blockDim.x) {
      row_m[r] = ninf;
      row_l[r] = 0;
    }
  }
  __syncthreads();

  for (int64_t k0 = kb; k0 < ke; k0 += BK) {
    const int nk = static_cast<int>(min(static_cast<int64_t>(BK), ke - k0));
    simt_load_kv<scalar_t, acc_t>(p, Ks, Vs, b, g, k0, nk, Dh);
    __syncthreads();
    simt_scores<acc_t>(p, t, Qs, Ks, Ss, b, h0, q0, k0, nk, Dh);
    __syncthreads();
    // Online softmax, one warp per row: scores become weights relative to the new row maximum.
    for (int r = warp; r < R; r += n_warps) {
      acc_t* srow = Ss + r * BK;
      acc_t mx = ninf;
      for (int c = lane; c < nk; c += 32) mx = fmax(mx, srow[c]);
      mx = warp_max(mx);
      const acc_t m_old = row_m[r];
      const acc_t m_new = fmax(m_old, mx);
      acc_t sum = 0, alpha = 1;
      if (m_new != ninf) {               // else nothing visible yet: weights 0, accumulator untouched
        alpha = exp_acc(m_old - m_new);  // 0 on the first visible tile (m_old = -inf)
        for (int c = lane; c < nk; c += 32) {
          const acc_t w = srow[c] == ninf ? acc_t(0) : exp_acc(srow[c] - m_new);
          srow[c] = w;
          sum += w;
        }
      } else {
        for (int c = lane; c < nk; c += 32) srow[c] = 0;
      }
      sum = warp_sum(sum);
      __syncwarp();
      if (lane == 0) {
        row_l[r] = row_l[r] * alpha + sum;
        row_m[r] = m_new;
        row_a[r] = alpha;
      }
    }
    __syncthreads();
    // O = alpha * O + P V. A zero weight skips its V row, as on CPU: a NaN in a hidden key's V (an
    // unused cache slot) never reaches the output.
    for (int e = tid; e < R * Dh; e += blockDim.x) {
      const int r = e / Dh, d = e - r * Dh;
      const acc_t* prow = Ss + r * BK;
      acc_t o = Os[e] * row_a[r];
      for (int c = 0; c < nk; ++c) {
        const acc_t w = prow[c];
        if (w != acc_t(0)) o = fma(w, Vs[c * Dh + d], o);
      }
      Os[e] = o;
    }
    __syncthreads();
  }

  if (t.n_splits > 1) {
    // Partial results of this key slice, [B, H, S, n_splits, Dh] and [B, H, S, n_splits, 2]; an empty
    // slice writes (max -inf, sum 0, zeros), which the combine step weighs with 0.
    for (int e = tid; e < R * Dh; e += blockDim.x) {
      const int r = e / Dh, d = e - r * Dh;
      const int64_t hh = h0 + r / t.nq, i = q0 + r % t.nq;
      if (i < p.S) ws_o[(((b * p.H + hh) * p.S + i) * t.n_splits + split) * Dh + d] = Os[e];
    }
    for (int r = tid; r < R; r += blockDim.x) {
      const int64_t hh = h0 + r / t.nq, i = q0 + r % t.nq;
      if (i < p.S) {
        acc_t* ml = ws_ml + (((b * p.H + hh) * p.S + i) * t.n_splits + split) * 2;
        ml[0] = row_m[r];
        ml[1] = row_l[r];
      }
    }
    return;
  }

  scalar_t* zp = static_cast<scalar_t*>(p.z);
  acc_t* lsep = static_cast<acc_t*>(p.lse);
  for (int e = tid; e < R * Dh; e += blockDim.x) {
    const int r = e / Dh, d = e - r * Dh;
    const int64_t hh = h0 + r / t.nq, i = q0 + r % t.nq;
    if (i < p.S) {
      const acc_t l = row_l[r];
      const acc_t inv = l == acc_t(0) ? acc_t(0) : acc_t(1) / l;  // no visible key: zeros, never NaN
      zp[((b * p.S + i) * p.H + hh) * Dh + d] = static_cast<scalar_t>(Os[e] * inv);
    }
  }
  for (int r = tid; r < R; r += blockDim.x) {
    const int64_t hh = h0 + r / t.nq, i = q0 + r % t.nq;
    const acc_t l = row_l[r];
    const acc_t lse = l == acc_t(0) ? ninf : row_m[r] + log_acc(l);
    row_a[r] = lse;
    if (i < p.S) lsep[(b * p.H + hh) * p.S + i] = lse;
  }
  if (p.pattern == nullptr) return;

  // Pattern: a second pass over the keys now that each row's lse is known; the scores are recomputed
  // by the same code, so pattern = exp(s - lse) matches the weights behind z.
  scalar_t* pat = static_cast<scalar_t*>(p.pattern);
  __syncthreads();
  for (int64_t k0 = 0; k0 < key_end; k0 += BK) {
    const int nk = static_cast<int>(min(static_cast<int64_t>(BK), key_end - k0));
    simt_load_kv<scalar_t, acc_t>(p, Ks, nullptr, b, g, k0, nk, Dh);
    __syncthreads();
    simt_scores<acc_t>(p, t, Qs, Ks, Ss, b, h0, q0, k0, nk, Dh);
    __syncthreads();
    for (int e = tid; e < R * BK; e += blockDim.x) {
      const int r = e / BK, c = e - r * BK;
      const int64_t hh = h0 + r / t.nq, i = q0 + r % t.nq;
      if (c < nk && i < p.S) {
        const acc_t s = Ss[e], lse = row_a[r];
        const acc_t w = (s == ninf || lse == ninf) ? acc_t(0) : exp_acc(s - lse);
        pat[((b * p.H + hh) * p.S + i) * p.K + k0 + c] = static_cast<scalar_t>(w);
      }
    }
    __syncthreads();
  }
  // Keys after key_end were skipped (causal): their weights are exactly 0.
  const int64_t tail = p.K - key_end;
  if (tail > 0) {
    for (int64_t e = tid; e < static_cast<int64_t>(R) * tail; e += blockDim.x) {
      const int r = static_cast<int>(e / tail);
      const int64_t j = key_end + e % tail;
      const int64_t hh = h0 + r / t.nq, i = q0 + r % t.nq;
      if (i < p.S) pat[((b * p.H + hh) * p.S + i) * p.K + j] = static_cast<scalar_t>(0.0f);
    }
  }
}

// Merges the key slices of one query row: M = max m_s, L = sum l_s e^(m_s - M),
// z = sum o_s e^(m_s - M) / L, lse = M + log L. One CTA per row of [B, H, S].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSimtThreads)
    combine_splits_kernel(const __grid_constant__ Params p, int n_splits, const acc_t* __restrict__ ws_o,
                          const acc_t* __restrict__ ws_ml) {
  // [kCombineSmemEntries], whatever n_splits is. With an allocation of exactly n_splits entries,
  // compute-sanitizer memcheck on an H200 reported a 12-byte read at the end of an 8-byte allocation
  // (n_splits = 2) in the loop over slices below, which the compiler unrolls by 4 (seen in the PTX, where
  // every load is still behind its check): the remainder's loads appear to be issued together ahead of
  // their checks in the machine code. The padding keeps such reads inside the allocation; memcheck is
  // clean with it.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* weight = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t row = blockIdx.x;  // (b * H + h) * S + i
  const int64_t i = row % p.S, h = (row / p.S) % p.H, b = row / (p.S * p.H);
  const int Dh = static_cast<int>(p.Dh);
  const acc_t* ml = ws_ml + row * n_splits * 2;
  const acc_t ninf = neg_inf<acc_t>();
  acc_t M = ninf;
  for (int s = 0; s < n_splits; ++s) M = fmax(M, ml[2 * s]);
  for (int s = threadIdx.x; s < n_splits; s += blockDim.x)
    weight[s] = (M == ninf || ml[2 * s] == ninf) ? acc_t(0) : exp_acc(ml[2 * s] - M);
  __syncthreads();
  acc_t L = 0;
  for (int s = 0; s < n_splits; ++s) L += ml[2 * s + 1] * weight[s];
  const acc_t inv = L > acc_t(0) ? acc_t(1) / L : acc_t(0);  // no visible key in any slice: zeros
  scalar_t* zp = static_cast<scalar_t*>(p.z);
  for (int d = threadIdx.x; d < Dh; d += blockDim.x) {
    acc_t o = 0;
    for (int s = 0; s < n_splits; ++s)
      if (weight[s] != acc_t(0)) o = fma(weight[s], ws_o[(row * n_splits + s) * Dh + d], o);
    zp[((b * p.S + i) * p.H + h) * Dh + d] = static_cast<scalar_t>(o * inv);
  }
  if (threadIdx.x == 0) static_cast<acc_t*>(p.lse)[row] = L > acc_t(0) ? M + log_acc(L) : ninf;
}

}  // namespace attn
}  // namespace pyqkv
