// Prefill attention on tensor cores for float16 / bfloat16 (sm_80+), FlashAttention-2 style, with
// WMMA 16x16x16 fragments and float32 accumulation.
//
// One CTA per (batch, head, 64-query tile), 4 warps; warp w owns query rows 16w .. 16w+15 for the whole
// kernel, so the softmax needs no cross-warp reduction. Keys stream through shared memory in tiles of
// BK (64, or 32 when the head dim leaves no room); tiles past the causal bound of the CTA's last query
// are never loaded. Per key tile: S = Q K^T (tensor cores) -> scale, masks, online softmax in float32
// (2 lanes per row) -> P in the input dtype -> O = alpha O + P V (tensor cores).
//
// Dh is padded with zeros to DhP = a multiple of 16 in shared memory (zeros change no dot product), so
// any Dh <= 256 runs here (72, 80, odd). The output accumulator lives in shared memory as float32
// [64][DhP]: WMMA accumulator fragments need a compile-time count, and one kernel for every Dh keeps
// compile time and code size down. Shared memory per CTA (DhP = 128, BK = 64): Q 17 KiB, K 17 KiB,
// V 17 KiB, S 17 KiB (float), P 9 KiB, O 33 KiB, stats 1 KiB: 111 KiB, two CTAs per H100/H200 SM
// (layout and padding in attention_plan.cuh::tc_layout). Every WMMA pointer is 32-byte aligned: buffers
// start at 128-byte boundaries and tiles at multiples of 16 rows and 16 columns.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "attention_common.cuh"
#include "attention_plan.cuh"

namespace pyqkv {
namespace attn {

__device__ __forceinline__ __half tc_from_float(float x, __half) { return __float2half_rn(x); }
__device__ __forceinline__ __nv_bfloat16 tc_from_float(float x, __nv_bfloat16) { return __float2bfloat16_rn(x); }

// Copies rows [row0, row0 + n_valid) of one head (base = its first element; row r at r * row_stride,
// feature d at d * d_stride) into dst [n_tile][ld] as raw 16-bit words, zero-filling rows >= n_valid,
// features >= Dh, and rows whose key is padded out (so that no garbage in an unused cache slot can
// reach P V through 0 * NaN).
__device__ __forceinline__ void tc_load_rows(uint16_t* dst, int ld, const uint16_t* base, int64_t row_stride,
                                             int64_t d_stride, int64_t row0, int n_valid, int n_tile, int Dh, int dhp,
                                             bool vec, const bool* pad_row0) {
  if (vec) {
    const int cpr = dhp / 8;  // 16-byte chunks per row; Dh % 8 == 0, so a chunk is all data or all padding
    for (int e = threadIdx.x; e < n_tile * cpr; e += blockDim.x) {
      const int r = e / cpr, c = (e - r * cpr) * 8;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < n_valid && c < Dh && (pad_row0 == nullptr || pad_row0[r]))
        val = *reinterpret_cast<const uint4*>(base + (row0 + r) * row_stride + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
    }
  } else {
    for (int e = threadIdx.x; e < n_tile * dhp; e += blockDim.x) {
      const int r = e / dhp, d = e - r * dhp;
      uint16_t val = 0;
      if (r < n_valid && d < Dh && (pad_row0 == nullptr || pad_row0[r]))
        val = base[(row0 + r) * row_stride + d * d_stride];
      dst[r * ld + d] = val;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kTcThreads) attention_tc_kernel(const __grid_constant__ Params p, const TcTiling t) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bfloat16 WMMA needs sm_80; the host never launches this kernel on older GPUs
#else
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem[];
  const int BK = t.bk, DhP = t.dhp, Dh = static_cast<int>(p.Dh);
  const int ldh = DhP + 8, lds = BK + 4, ldp = BK + 8, ldo = DhP + 4;
  const TcLayout lay = tc_layout(BK, DhP);
  T* Qs = reinterpret_cast<T*>(smem + lay.q);
  T* Ks = reinterpret_cast<T*>(smem + lay.k);
  T* Vs = reinterpret_cast<T*>(smem + lay.v);
  float* Ss = reinterpret_cast<float*>(smem + lay.s);
  T* Ps = reinterpret_cast<T*>(smem + lay.pm);
  float* Os = reinterpret_cast<float*>(smem + lay.o);
  float* row_m = reinterpret_cast<float*>(smem + lay.stats);
  float* row_l = row_m + kTcRows;
  float* row_a = row_l + kTcRows;
  float* row_lse = row_a + kTcRows;

  // Block index -> (query tile, head, batch). Under causal masking the last tiles see the most keys:
  // they are scheduled first so the short ones fill the tail of the grid.
  int64_t x = blockIdx.x;
  const int qt_raw = static_cast<int>(x % t.n_qt);
  x /= t.n_qt;
  const int qt = p.causal ? t.n_qt - 1 - qt_raw : qt_raw;
  const int64_t h = x % p.H, b = x / p.H;
  const int64_t g = h / (p.H / p.Hkv);  // GQA: the KV head this query head reads
  const int64_t q0 = static_cast<int64_t>(qt) * kTcRows;
  const int nq = static_cast<int>(min(static_cast<int64_t>(kTcRows), p.S - q0));
  const int64_t key_end = key_end_for(p, q0, nq);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int w0 = warp * 16;  // this warp's first row in the tile
  const float scale = static_cast<float>(p.scale);
  const float ninf = neg_inf<float>();

  const uint16_t* qbase = static_cast<const uint16_t*>(p.q) + b * p.q_sb + h * p.q_sh;
  const uint16_t* kbase = static_cast<const uint16_t*>(p.k) + b * p.k_sb + g * p.k_sh;
  const uint16_t* vbase = static_cast<const uint16_t*>(p.v) + b * p.v_sb + g * p.v_sh;
  const bool* pad_b = p.pad != nullptr ? p.pad + b * p.K : nullptr;

  tc_load_rows(reinterpret_cast<uint16_t*>(Qs), ldh, qbase, p.q_ss, p.q_sd, q0, nq, kTcRows, Dh, DhP, t.q_vec, nullptr);
  for (int e = tid; e < kTcRows * ldo; e += blockDim.x) Os[e] = 0.f;
  for (int r = tid; r < kTcRows; r += blockDim.x) {
    row_m[r] = ninf;
    row_l[r] = 0.f;
  }
  __syncthreads();

  // S[w0 .. w0+15][0 .. ncols) = Q K^T for this warp's rows; K is [BK][ldh] row-major = K^T column-major.
  auto warp_scores = [&](int ncols) {
    for (int n0 = 0; n0 < ncols; n0 += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < DhP; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
        wmma::load_matrix_sync(a, Qs + w0 * ldh + kk, ldh);
        wmma::load_matrix_sync(bt, Ks + n0 * ldh + kk, ldh);
        wmma::mma_sync(acc, a, bt, acc);
      }
      wmma::store_matrix_sync(Ss + w0 * lds + n0, acc, lds, wmma::mem_row_major);
    }
  };

  // Lane pair (2r, 2r+1) handles row w0 + r, columns of its parity.
  const int my_r = w0 + (lane >> 1), parity = lane & 1;
  const bool my_row_valid = my_r < nq;
  const int64_t my_i = q0 + my_r;

  // Keys before the first row's sliding window are hidden from every row of the tile: skipped.
  for (int64_t k0 = key_begin_for(p, q0); k0 < key_end; k0 += BK) {
    const int nk = static_cast<int>(min(static_cast<int64_t>(BK), key_end - k0));
    const int nk16 = (nk + 15) / 16 * 16;
    tc_load_rows(reinterpret_cast<uint16_t*>(Ks), ldh, kbase, p.k_ss, p.k_sd, k0, nk, nk16, Dh, DhP, t.k_vec, nullptr);
    tc_load_rows(reinterpret_cast<uint16_t*>(Vs), ldh, vbase, p.v_ss, p.v_sd, k0, nk, nk16, Dh, DhP, t.v_vec,
                 pad_b != nullptr ? pad_b + k0 : nullptr);
    __syncthreads();
    warp_scores(nk16);
    __syncwarp();

    float mx = ninf;
    for (int c = parity; c < nk16; c += 2) {
      float s = ninf;
      if (my_row_valid && c < nk) s = masked_score<float>(p, mul_rn(Ss[my_r * lds + c], scale), b, h, my_i, k0 + c);
      Ss[my_r * lds + c] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_old = row_m[my_r];
    const float m_new = fmaxf(m_old, mx);
    float alpha = 1.f, sum = 0.f;
    if (m_new != ninf) {
      alpha = expf(m_old - m_new);  // 0 on the row's first visible tile
      for (int c = parity; c < nk16; c += 2) {
        const float s = Ss[my_r * lds + c];
        const float w = s == ninf ? 0.f : expf(s - m_new);
        Ps[my_r * ldp + c] = tc_from_float(w, T());
        sum += w;
      }
    } else {  // nothing visible in this row yet: weights 0, accumulator untouched
      for (int c = parity; c < nk16; c += 2) Ps[my_r * ldp + c] = tc_from_float(0.f, T());
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    const bool warp_has_weights = __any_sync(0xffffffffu, m_new != ninf);
    __syncwarp();
    if (parity == 0) {
      row_l[my_r] = row_l[my_r] * alpha + sum;
      row_m[my_r] = m_new;
      row_a[my_r] = alpha;
    }
    __syncwarp();
    if (warp_has_weights) {  // a tile hidden from all 16 rows changes nothing: skip its P V
      for (int e = lane; e < 16 * DhP; e += 32) {
        const int r = w0 + e / DhP, d = e % DhP;
        Os[r * ldo + d] *= row_a[r];
      }
      __syncwarp();
      for (int n0 = 0; n0 < DhP; n0 += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::load_matrix_sync(acc, Os + w0 * ldo + n0, ldo, wmma::mem_row_major);
        for (int kk = 0; kk < nk16; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
          wmma::load_matrix_sync(a, Ps + w0 * ldp + kk, ldp);
          wmma::load_matrix_sync(bv, Vs + kk * ldh + n0, ldh);
          wmma::mma_sync(acc, a, bv, acc);
        }
        wmma::store_matrix_sync(Os + w0 * ldo + n0, acc, ldo, wmma::mem_row_major);
      }
    }
    __syncthreads();  // K, V, S and P are overwritten by the next tile
  }

  // Epilogue, per warp on its own rows: z = O / l, lse = m + log l; rows with no visible key give
  // zeros and -inf (never NaN).
  T* zp = static_cast<T*>(p.z);
  for (int e = lane; e < 16 * Dh; e += 32) {
    const int r = w0 + e / Dh, d = e % Dh;
    if (r < nq) {
      const float l = row_l[r];
      const float inv = l == 0.f ? 0.f : 1.f / l;
      zp[((b * p.S + q0 + r) * p.H + h) * p.Dh + d] = tc_from_float(Os[r * ldo + d] * inv, T());
    }
  }
  if (lane < 16) {
    const int r = w0 + lane;
    const float l = row_l[r];
    const float lse = l == 0.f ? ninf : row_m[r] + logf(l);
    row_lse[r] = lse;
    if (r < nq) static_cast<float*>(p.lse)[(b * p.H + h) * p.S + q0 + r] = lse;
  }
  if (p.pattern == nullptr) return;

  // Pattern: a second pass over the keys now that each row's lse is known. The scores come from the
  // same WMMA sequence and the same masked_score, so pattern = exp(s - lse) matches the weights of z.
  T* pat = static_cast<T*>(p.pattern);
  for (int64_t k0 = 0; k0 < key_end; k0 += BK) {
    const int nk = static_cast<int>(min(static_cast<int64_t>(BK), key_end - k0));
    const int nk16 = (nk + 15) / 16 * 16;
    __syncthreads();  // every warp is done with the previous K tile (and with row_lse's writes)
    tc_load_rows(reinterpret_cast<uint16_t*>(Ks), ldh, kbase, p.k_ss, p.k_sd, k0, nk, nk16, Dh, DhP, t.k_vec, nullptr);
    __syncthreads();
    warp_scores(nk16);
    __syncwarp();
    for (int e = lane; e < 16 * nk; e += 32) {
      const int r = w0 + e / nk, c = e % nk;
      if (r < nq) {
        const int64_t i = q0 + r;
        const float s = masked_score<float>(p, mul_rn(Ss[r * lds + c], scale), b, h, i, k0 + c);
        const float lse = row_lse[r];
        const float w = (s == ninf || lse == ninf) ? 0.f : expf(s - lse);
        pat[((b * p.H + h) * p.S + i) * p.K + k0 + c] = tc_from_float(w, T());
      }
    }
  }
  // Keys after key_end were skipped (causal): their weights are exactly 0.
  const int64_t tail = p.K - key_end;
  if (tail > 0) {
    for (int64_t e = tid; e < static_cast<int64_t>(nq) * tail; e += blockDim.x) {
      const int64_t r = e / tail, j = key_end + e % tail;
      pat[((b * p.H + h) * p.S + q0 + r) * p.K + j] = tc_from_float(0.f, T());
    }
  }
#endif
}

}  // namespace attn
}  // namespace pyqkv
