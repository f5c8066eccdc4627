// Decode attention (a few query positions against a long cache), the memory-bound case: the kernel's
// time is the time to read K and V once, so it is built around wide loads in flight rather than
// around tiles in shared memory.
//
// One CTA covers one KV head of one batch row and one slice of the keys (Flash-Decoding: the host
// splits the keys until the GPU is full; combine_splits_kernel in attention_simt.cuh merges the
// slices). All R = (H / Hkv) * S query rows of that KV head are processed together, so each K/V byte
// is read once for the whole group. Inside the CTA a key's Dh features are read by a group of
// `lanes` lanes, 16 bytes per lane (unit feature stride and 16-byte aligned rows are required; the host
// checks), and every lane group walks its own keys, kDecodeUnroll at a time with all their K and V loads
// issued before the first use. The group's dot products are reduced with shuffles, each group keeps
// its own online-softmax state (max, sum, output) for every row in registers, and the groups are merged
// through shared memory at the end. No shared memory is touched in the key loop and there is no barrier
// in it.
//
// Semantics are the CPU op's: masked_score (causal, padding, ALiBi, additive mask) for every score, a
// zero weight skips its V row (a NaN in an unused cache slot never reaches z), a row with no visible key
// gives zeros and lse = -inf. Float32 accumulation; float16, bfloat16 and float32 inputs.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "attention_common.cuh"
#include "attention_plan.cuh"

namespace pyqkv {
namespace attn {

// The elements of one 32-bit word, as float. Bits are moved by value (no pointer cast of a register
// array: that is type punning, which a host compiler may miscompile in tools/cuda_emulate).
__device__ __forceinline__ void unpack_word(uint32_t w, float* out, float) { out[0] = __uint_as_float(w); }
__device__ __forceinline__ void unpack_word(uint32_t w, float* out, c10::Half) {
  out[0] = static_cast<float>(c10::Half(static_cast<uint16_t>(w & 0xffffu), c10::Half::from_bits()));
  out[1] = static_cast<float>(c10::Half(static_cast<uint16_t>(w >> 16), c10::Half::from_bits()));
}
__device__ __forceinline__ void unpack_word(uint32_t w, float* out, c10::BFloat16) {
  out[0] = static_cast<float>(c10::BFloat16(static_cast<uint16_t>(w & 0xffffu), c10::BFloat16::from_bits()));
  out[1] = static_cast<float>(c10::BFloat16(static_cast<uint16_t>(w >> 16), c10::BFloat16::from_bits()));
}

// 16 bytes at ptr (16-byte aligned) as 16 / sizeof(scalar_t) floats, in one load.
template <typename scalar_t>
__device__ __forceinline__ void load16(const scalar_t* ptr, float* out) {
  constexpr int kPerWord = 4 / sizeof(scalar_t);
  const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
  unpack_word(raw.x, out, scalar_t());
  unpack_word(raw.y, out + kPerWord, scalar_t());
  unpack_word(raw.z, out + 2 * kPerWord, scalar_t());
  unpack_word(raw.w, out + 3 * kPerWord, scalar_t());
}

template <typename scalar_t, int kRows>
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_kernel(const __grid_constant__ Params p, const DecodeTiling t, float* __restrict__ ws_o,
                            float* __restrict__ ws_ml) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  // Keys in flight per lane group: kDecodeUnroll, halved when the rows' registers (q and o, 2 * kRows *
  // kVec) would otherwise spill (8 rows of a half type: 255 registers and spills at 4, ptxas -v).
  constexpr int kUnroll = kRows * kVec >= 64 ? kDecodeUnroll / 2 : kDecodeUnroll;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int Dh = static_cast<int>(p.Dh), R = t.rows, L = t.lanes;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int groups_per_warp = 32 / L;
  const int n_groups = (static_cast<int>(blockDim.x) >> 5) * groups_per_warp;
  const int grp = warp * groups_per_warp + lane / L;
  const int d0 = (lane % L) * kVec;   // this lane's features [d0, d0 + kVec)
  const bool has_features = d0 < Dh;  // lanes past Dh / kVec (L is a power of two) hold zeros

  int64_t x = blockIdx.x;
  const int split = static_cast<int>(x % t.n_splits);
  x /= t.n_splits;
  const int64_t g = x % p.Hkv, b = x / p.Hkv;
  const int64_t G = p.H / p.Hkv;
  const float ninf = neg_inf<float>();

  // Row r is query head g * G + r / S at position r % S; its query pre-scaled, as on CPU.
  float q[kRows][kVec];
  {
    const scalar_t* qp = static_cast<const scalar_t*>(p.q) + b * p.q_sb;
    const float scale = static_cast<float>(p.scale);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t h = g * G + r / p.S, i = r % p.S;
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        q[r][e] = (r < R && has_features) ? static_cast<float>(qp[i * p.q_ss + h * p.q_sh + (d0 + e) * p.q_sd]) * scale
                                          : 0.0f;
    }
  }

  float m[kRows], l[kRows], o[kRows][kVec];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = ninf;
    l[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) o[r][e] = 0.0f;
  }

  const int64_t split_begin = static_cast<int64_t>(split) * t.keys_per_split;
  const int64_t kb = max(split_begin, key_begin_for(p, 0));  // keys before every row's window: skipped
  const int64_t ke = min(key_end_for(p, 0, p.S), split_begin + t.keys_per_split);
  const scalar_t* kp = static_cast<const scalar_t*>(p.k) + b * p.k_sb + g * p.k_sh + d0;
  const scalar_t* vp = static_cast<const scalar_t*>(p.v) + b * p.v_sb + g * p.v_sh + d0;
  const int64_t step = static_cast<int64_t>(n_groups) * kUnroll;

  for (int64_t j0 = kb; j0 < ke; j0 += step) {
    float kv[kUnroll][kVec], vv[kUnroll][kVec];
    bool valid[kUnroll];
    // Every load of this step first, then the arithmetic: kUnroll * 32 bytes in flight per lane.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * n_groups + grp;
      valid[u] = j < ke;
      if (valid[u] && has_features) {
        load16(kp + j * p.k_ss, kv[u]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) kv[u][e] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * n_groups + grp;
      if (valid[u] && has_features) {
        load16(vp + j * p.v_ss, vv[u]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) vv[u][e] = 0.0f;
      }
    }
    float s[kUnroll][kRows];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot = fma(q[r][e], kv[u][e], dot);
        for (int off = L >> 1; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const int64_t j = j0 + u * n_groups + grp;
        s[u][r] = (valid[u] && r < R) ? masked_score<float>(p, dot, b, g * G + r / p.S, r % p.S, j) : ninf;
      }
    }
    // Online softmax per row, once per step: rescale by the new maximum, then add this step's keys.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float mx = s[0][r];
#pragma unroll
      for (int u = 1; u < kUnroll; ++u) mx = fmax(mx, s[u][r]);
      const float m_new = fmax(m[r], mx);
      if (m_new == ninf) continue;                // nothing visible yet in this row
      const float alpha = exp_acc(m[r] - m_new);  // 0 while m[r] = -inf (o and l are 0 then)
      l[r] *= alpha;
#pragma unroll
      for (int e = 0; e < kVec; ++e) o[r][e] *= alpha;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float w = s[u][r] == ninf ? 0.0f : exp_acc(s[u][r] - m_new);
        l[r] += w;
        if (w != 0.0f) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) o[r][e] = fma(w, vv[u][e], o[r][e]);
        }
      }
      m[r] = m_new;
    }
  }

  // Merge the groups: M = max m_g, weight_g = e^(m_g - M), sum = sum l_g weight_g, out = sum o_g weight_g
  // (layout: decode_smem_bytes).
  float* sm_m = reinterpret_cast<float*>(smem_raw);  // [n_groups][kRows]
  float* sm_l = sm_m + n_groups * kRows;             // [n_groups][kRows]
  float* sm_w = sm_l + n_groups * kRows;             // [n_groups][kRows]
  float* sm_row = sm_w + n_groups * kRows;           // [kRows][2]: merged max, merged sum
  float* sm_o = sm_row + 2 * kRows;                  // [n_groups][kRows][Dh]
  if (lane % L == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      sm_m[grp * kRows + r] = m[r];
      sm_l[grp * kRows + r] = l[r];
    }
  }
  if (has_features) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < R) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) sm_o[(grp * kRows + r) * Dh + d0 + e] = o[r][e];
      }
    }
  }
  __syncthreads();
  for (int r = tid; r < R; r += blockDim.x) {
    float M = ninf;
    for (int gi = 0; gi < n_groups; ++gi) M = fmax(M, sm_m[gi * kRows + r]);
    float sum = 0.0f;
    for (int gi = 0; gi < n_groups; ++gi) {
      const float mg = sm_m[gi * kRows + r];
      const float w = (M == ninf || mg == ninf) ? 0.0f : exp_acc(mg - M);
      sm_w[gi * kRows + r] = w;
      sum += sm_l[gi * kRows + r] * w;
    }
    sm_row[2 * r] = M;
    sm_row[2 * r + 1] = sum;
  }
  __syncthreads();

  for (int e = tid; e < R * Dh; e += blockDim.x) {
    const int r = e / Dh, d = e - r * Dh;
    float out = 0.0f;
    for (int gi = 0; gi < n_groups; ++gi) {
      const float w = sm_w[gi * kRows + r];
      if (w != 0.0f) out = fma(w, sm_o[(gi * kRows + r) * Dh + d], out);
    }
    const int64_t h = g * G + r / p.S, i = r % p.S;
    const int64_t row = (b * p.H + h) * p.S + i;
    if (t.n_splits > 1) {
      ws_o[(row * t.n_splits + split) * Dh + d] = out;  // unnormalized, relative to this slice's max
    } else {
      const float sum = sm_row[2 * r + 1];
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // no visible key: zeros, never NaN
      static_cast<scalar_t*>(p.z)[((b * p.S + i) * p.H + h) * Dh + d] = static_cast<scalar_t>(out * inv);
    }
  }
  for (int r = tid; r < R; r += blockDim.x) {
    const int64_t h = g * G + r / p.S, i = r % p.S;
    const int64_t row = (b * p.H + h) * p.S + i;
    const float M = sm_row[2 * r], sum = sm_row[2 * r + 1];
    if (t.n_splits > 1) {
      ws_ml[(row * t.n_splits + split) * 2] = sum > 0.0f ? M : ninf;
      ws_ml[(row * t.n_splits + split) * 2 + 1] = sum;
    } else {
      static_cast<float*>(p.lse)[row] = sum > 0.0f ? M + log_acc(sum) : ninf;
    }
  }
}

}  // namespace attn
}  // namespace pyqkv
