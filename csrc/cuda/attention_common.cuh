// Device-side pieces shared by the attention kernels (attention_simt.cuh, attention_tc.cuh): the
// parameter block, masking, and float/double math that keeps two passes over the same scores bitwise
// identical. Notation: B batch, S query positions, K key positions, H query heads, Hkv KV heads, Dh.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "../attention.h"

namespace pyqkv {
namespace attn {

// Everything a kernel reads or writes; strides are in elements, any value (views into the fused
// projection, expanded masks with stride 0).
struct Params {
  const void* q;  // [B, S, H, Dh]
  const void* k;  // [B, K, Hkv, Dh]
  const void* v;  // [B, K, Hkv, Dh]
  int64_t q_sb, q_ss, q_sh, q_sd;
  int64_t k_sb, k_ss, k_sh, k_sd;
  int64_t v_sb, v_ss, v_sh, v_sd;
  const bool* pad;                 // [B, K] contiguous, true = attend; nullptr without a padding mask
  const void* bias;                // additive [B|1, 1|H, S, K] in the accumulation dtype; nullptr without one
  const bool* vis4;                // bool [B|1, 1|H, S, K], true = attend; nullptr without one
  int64_t m_sb, m_sh, m_ss, m_sk;  // the strides of the 4-D mask (bias or vis4), 0 on broadcast dims
  const void* alibi;               // per-key bias [B|1, H|1, K] in the accumulation dtype; nullptr without one
  int64_t a_sb, a_sh, a_sk;        // its strides, 0 on broadcast dims
  double hidden;                   // the additive rule's threshold (attention.h, additive_visible)
  double scale;
  double softcap;  // 0: off; else s = softcap * tanh(s / softcap) before the biases (attention.h)
  int64_t window;  // 0: none; else W keys up to each query's own position (attention.h)
  int64_t B, S, H, Hkv, Dh, K;
  bool causal;
  void* z;        // [B, S, H, Dh] contiguous, q's dtype
  void* lse;      // [B, H, S] contiguous, accumulation dtype
  void* pattern;  // [B, H, S, K] contiguous, q's dtype; nullptr unless requested
};

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Explicitly rounded multiply/add: the compiler may not contract them into an FMA, so the score that
// the softmax pass and the pattern pass compute from the same dot product is the same number.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// The score of query i (0-based in this call) and key j given the scaled dot product, with every rule
// of attention.h applied as the CPU kernel does: causal and the sliding window (position_visible:
// bottom-right aligned), padding, a bool 4-D mask, softcapping, the ALiBi per-key bias (added, never
// hiding), the additive mask (hidden unless additive_visible), in the CPU's order:
// softcapped(scale * q.k) + alibi + mask. Hidden entries are -inf. Needs i < S, j < K. Every kernel and
// the pattern pass score through here, so they all see the same numbers.
template <typename acc_t>
__device__ __forceinline__ acc_t masked_score(const Params& p, acc_t s, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (!position_visible(i, j, p.S, p.K, p.causal, p.window)) return neg_inf<acc_t>();
  if (p.pad != nullptr && !p.pad[b * p.K + j]) return neg_inf<acc_t>();
  if (p.vis4 != nullptr && !p.vis4[b * p.m_sb + h * p.m_sh + i * p.m_ss + j * p.m_sk]) return neg_inf<acc_t>();
  s = softcapped(s, static_cast<acc_t>(p.softcap));
  if (p.alibi != nullptr) s = add_rn(s, static_cast<const acc_t*>(p.alibi)[b * p.a_sb + h * p.a_sh + j * p.a_sk]);
  if (p.bias != nullptr) {
    const acc_t add = static_cast<const acc_t*>(p.bias)[b * p.m_sb + h * p.m_sh + i * p.m_ss + j * p.m_sk];
    if (!additive_visible(add, static_cast<acc_t>(p.hidden))) return neg_inf<acc_t>();  // NaN hides
    s = add_rn(s, add);
  }
  return s;
}

// The first key that any of the query rows q0, q0 + 1, ... may see: keys before it (outside every
// row's sliding window) are skipped.
__device__ __forceinline__ int64_t key_begin_for(const Params& p, int64_t q0) {
  return first_visible_key(q0, p.S, p.K, p.window);
}

// The last key (exclusive) that any of the query rows [q0, q0 + nq) may see: keys past it are skipped
// tile by tile. Negative causal bounds (K < S) clamp to 0: those rows see nothing.
__device__ __forceinline__ int64_t key_end_for(const Params& p, int64_t q0, int64_t nq) {
  if (!p.causal) return p.K;
  const int64_t e = p.K - p.S + q0 + nq;
  return e < 0 ? 0 : (e > p.K ? p.K : e);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t x) {
  for (int o = 16; o > 0; o >>= 1)
    x = fmax(x, __shfl_xor_sync(0xffffffffu, x, o));  // fmax drops NaN, like std::max on CPU
  return x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace attn
}  // namespace pyqkv
