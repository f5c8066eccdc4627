// Host-side argument checks and mask preparation for the attention op, shared by CPU and CUDA.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>

#include "checks.h"
#include "host_device.h"

namespace pyqkv {

// What a `mask` argument is. Every path (the CPU kernel, the CUDA kernels, the split form) reads a mask
// through these kinds and the visibility rules below.
enum class MaskKind {
  kNone,
  kPadding,     // [B, K], bool / integer: nonzero = attend; float: 0 / 1 only (check_padding_mask); keys only
  kBool4d,      // [B|1, 1|H, S, K] bool: true = attend (Hugging Face's sdpa masks)
  kAdditive4d,  // [B|1, 1|H, S, K] float: added to the scores; visible iff > hidden_threshold (below)
};

// ---- The 2-D padding mask rule ---------------------------------------------------------------------
// A 2-D mask [B, K] says which keys are attended: bool (true = attend) or integer (nonzero = attend), the
// dtypes of Hugging Face's 2-D masks. A float one is ambiguous: read as 1 = attend / 0 = pad, an additive
// mask (0 = visible, very negative = hidden) would be exactly inverted. So a float 2-D mask may hold only
// 0 and 1, and anything else is refused with both conventions named (an additive mask comes 4-D).
// This is the one copy of the rule: check_attention_args applies it (the fused op on every device, the
// split form's attn_scores, the backend plan), and so does the op pyqkv::check_padding_mask, which the
// Bridge's Python pre-check (pyqkv/checks.py) calls so that it reaches the same verdict before any hook.
//
// The values are read only for a float mask: a pass over its B*K entries and, on CUDA, a device sync
// (.item()); bool and integer masks need no read. Tensors whose values cannot be read here are not
// read: meta tensors (the plan of a meta input), and tensors whose ops go through Python (FakeTensor and
// FunctionalTensor while torch.compile traces); the fused op's real kernel reads them when it runs.
inline bool values_readable(const at::Tensor& t) {
  return !t.is_meta() && !t.unsafeGetTensorImpl()->is_python_dispatch();
}

inline void check_padding_mask(const at::Tensor& m, const std::string& name) {
  TORCH_CHECK_TYPE(!at::isComplexType(m.scalar_type()), name,
                   ": expected a bool, integer or float padding mask, got ", m.scalar_type());
  if (!at::isFloatingType(m.scalar_type()) || m.numel() == 0 || !values_readable(m)) return;
  const at::Tensor bad = m.ne(0).logical_and(m.ne(1));  // NaN differs from both: refused
  if (!bad.any().item<bool>()) return;                 // the one read (a sync on CUDA)
  // The error path only: the first offending entry, for the message.
  const int64_t at_flat = bad.reshape({-1}).nonzero().select(1, 0)[0].item<int64_t>();
  const int64_t K = m.dim() == 2 ? m.size(1) : 1;
  const double value = m.reshape({-1})[at_flat].item<double>();
  TORCH_CHECK_VALUE(false, name, ": expected a 2-D float mask to hold only 0 (pad) and 1 (attend), got ", value,
                    " at [", at_flat / K, ", ", at_flat % K,
                    "]; for an additive mask (0 = visible, very negative = hidden) pass it as 4-D [B, 1, S, K], "
                    "or pass a bool or integer padding mask");
}

struct AttnDims {
  int64_t B, S, H, Dh, K, Hkv;
  MaskKind mask = MaskKind::kNone;
  double softcap = 0;  // 0 = off
  int64_t window = 0;  // 0 = no sliding window
};

// The checks of every attention entry point: the fused op (v given) and the split form's scores (v
// nullptr). Each failure names the argument, what was expected and what was received.
inline AttnDims check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                                     const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& alibi,
                                     bool causal, c10::optional<double> softcap, c10::optional<int64_t> window) {
  PYQKV_CHECK_RANK(q, "q", 4, "[B, S, H, Dh]");
  PYQKV_CHECK_RANK(k, "k", 4, "[B, K, Hkv, Dh]");
  if (v != nullptr) PYQKV_CHECK_RANK(*v, "v", 4, "[B, K, Hkv, Dh]");
  PYQKV_CHECK_FLOATING(q, "q");
  PYQKV_CHECK_SAME_DTYPE(k, "k", q, "q");
  if (v != nullptr) PYQKV_CHECK_SAME_DTYPE(*v, "v", q, "q");
  PYQKV_CHECK_SAME_DEVICE(k, "k", q, "q");
  if (v != nullptr) PYQKV_CHECK_SAME_DEVICE(*v, "v", q, "q");
  AttnDims d{q.size(0), q.size(1), q.size(2), q.size(3), k.size(1), k.size(2)};
  TORCH_CHECK_VALUE(d.Dh > 0 && d.H > 0, "q: expected H > 0 heads of Dh > 0 features, got shape ", shape_str(q));
  TORCH_CHECK_VALUE(k.size(0) == d.B && k.size(3) == d.Dh, "k: expected shape [", d.B, ", K, Hkv, ", d.Dh,
                    "] (B and Dh of q ", shape_str(q), "), got ", shape_str(k));
  if (v != nullptr)
    TORCH_CHECK_VALUE(v->sizes() == k.sizes(), "v: expected the shape of k ", shape_str(k), ", got ", shape_str(*v));
  TORCH_CHECK_VALUE(d.Hkv > 0 && d.H % d.Hkv == 0, "k: expected a KV head count that divides H=", d.H, " (q ",
                    shape_str(q), "), got Hkv=", d.Hkv, " (k ", shape_str(k), ")");
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    PYQKV_CHECK_SAME_DEVICE(m, "mask", q, "q");
    if (m.dim() == 2) {
      TORCH_CHECK_VALUE(m.size(0) == d.B && m.size(1) == d.K, "mask: expected a 2-D padding mask [B, K] = [", d.B, ", ",
                        d.K, "], got ", shape_str(m));
      check_padding_mask(m, "mask");  // the dtype and, for a float mask, the 0 / 1 values
      d.mask = MaskKind::kPadding;
    } else if (m.dim() == 4) {
      TORCH_CHECK_TYPE(at::isFloatingType(m.scalar_type()) || m.scalar_type() == at::kBool,
                       "mask: expected a floating-point additive 4-D mask (0 = visible, very negative = hidden) or a "
                       "bool one (True = attend), got ",
                       m.scalar_type());
      TORCH_CHECK_VALUE((m.size(0) == d.B || m.size(0) == 1) && (m.size(1) == 1 || m.size(1) == d.H) &&
                            m.size(2) == d.S && m.size(3) == d.K,
                        "mask: expected a 4-D additive mask [B or 1, 1 or H, S, K] = [", d.B, ", 1 or ", d.H, ", ", d.S,
                        ", ", d.K, "] (or a bool one of that shape), got ", shape_str(m));
      d.mask = m.scalar_type() == at::kBool ? MaskKind::kBool4d : MaskKind::kAdditive4d;
    } else {
      TORCH_CHECK_VALUE(false,
                        "mask: expected a 2-D padding mask [B, K] or a 4-D additive mask [B, 1 or H, S, K] (or a bool "
                        "one), got ",
                        m.dim(), "-D with shape ", shape_str(m));
    }
  }
  if (alibi.has_value()) {
    const at::Tensor& a = *alibi;
    PYQKV_CHECK_RANK(a, "alibi", 3, "[B or 1, H or 1, K] (a per-key bias)");
    PYQKV_CHECK_FLOATING(a, "alibi");
    PYQKV_CHECK_SAME_DEVICE(a, "alibi", q, "q");
    TORCH_CHECK_VALUE((a.size(0) == d.B || a.size(0) == 1) && (a.size(1) == d.H || a.size(1) == 1) && a.size(2) == d.K,
                      "alibi: expected shape [B or 1, H or 1, K] = [", d.B, " or 1, ", d.H, " or 1, ", d.K,
                      "] (B and H of q ", shape_str(q), ", K of k ", shape_str(k), "), got ", shape_str(a));
  }
  if (softcap.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*softcap) && *softcap >= 0,
                      "softcap: expected None, 0 (off) or a positive finite float (the cap c of c * tanh(s / c)), got ",
                      *softcap);
    d.softcap = *softcap;
  }
  if (window.has_value()) {
    TORCH_CHECK_VALUE(*window >= 1, "window: expected None or W >= 1 (the keys a query sees, its own included), got ",
                      *window);
    TORCH_CHECK_VALUE(causal,
                      "window: expected causal=True with a sliding window (query i sees the W keys up to its "
                      "own position K - S + i), got window=",
                      *window, " with causal=False");
    d.window = *window;
  }
  return d;
}

inline AttnDims check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& alibi,
                                bool causal, c10::optional<double> softcap, c10::optional<int64_t> window) {
  return check_attention_args(q, k, &v, mask, alibi, causal, softcap, window);
}

// ---- Positions: causal and the sliding window ------------------------------------------------------
// Bottom-right alignment: query i (0-based in this call) is at absolute position p = K - S + i, so a
// one-token decode step sees the whole cache. Causal: query i sees keys j <= p. A sliding window of W
// keys (Hugging Face's `sliding_window`, its own position included) also needs j > p - W.
//
//     S=3, K=5, causal, W=2:   keys 0 1 2 3 4
//                    query 0:       . x x . .
//                    query 1:       . . x x .
//                    query 2:       . . . x x
PYQKV_HOST_DEVICE inline bool position_visible(int64_t i, int64_t j, int64_t S, int64_t K, bool causal,
                                               int64_t window) {
  const int64_t p = K - S + i;
  return (!causal || j <= p) && (window <= 0 || j > p - window);
}

// The first key any of the query rows i0, i0 + 1, ... may see (the keys before it are skipped).
PYQKV_HOST_DEVICE inline int64_t first_visible_key(int64_t i0, int64_t S, int64_t K, int64_t window) {
  const int64_t f = K - S + i0 - window + 1;
  return window <= 0 || f < 0 ? 0 : f;
}

// The same rule as a tensor, for chosen query rows `rows` [S'] and key columns `cols` [K'] (int64, 0-based
// in S and K): [S', K'] bool, true where visible; undefined when neither causal nor a window hides anything.
// The ATen form of pattern_slice reads it for its rows and columns only (no [S, K] tensor).
inline at::Tensor position_visible(const at::Tensor& rows, const at::Tensor& cols, int64_t S, int64_t K, bool causal,
                                   int64_t window) {
  if (!causal && window <= 0) return at::Tensor();
  const at::Tensor p = rows.view({-1, 1}) + (K - S);
  const at::Tensor j = cols.view({1, -1});
  at::Tensor vis = causal ? j <= p : at::ones({rows.numel(), cols.numel()}, rows.options().dtype(at::kBool));
  if (window > 0) vis = vis & (j > p - window);
  return vis;
}

// For every query row and key column: [S, K] bool (the split form's scores).
inline at::Tensor position_visible(int64_t S, int64_t K, bool causal, int64_t window, const at::TensorOptions& opts) {
  if (!causal && window <= 0) return at::Tensor();
  return position_visible(at::arange(S, opts.dtype(at::kLong)), at::arange(K, opts.dtype(at::kLong)), S, K, causal,
                          window);
}

// ---- Logit softcapping (Gemma 2) ---------------------------------------------------------------------
// s = scale * q.k, then s = c * tanh(s / c) when c > 0, then + alibi and + the additive mask.
PYQKV_HOST_DEVICE inline float softcapped(float s, float cap) { return cap > 0.f ? cap * tanhf(s / cap) : s; }
PYQKV_HOST_DEVICE inline double softcapped(double s, double cap) { return cap > 0.0 ? cap * tanh(s / cap) : s; }
inline at::Tensor softcapped(const at::Tensor& s, double cap) { return cap > 0 ? at::tanh(s / cap) * cap : s; }

// The alibi bias [B|1, H|1, K] in the accumulation dtype, read in place through its strides when it
// already is (the usual float32 slopes), else converted once (B*H*K values: no [B,H,S,K] buffer).
inline at::Tensor alibi_in(const c10::optional<at::Tensor>& alibi, at::ScalarType acc_dtype) {
  if (!alibi.has_value()) return at::Tensor();
  return alibi->scalar_type() == acc_dtype ? *alibi : alibi->to(acc_dtype);
}

// ---- The mask rule ---------------------------------------------------------------------------------
// An entry of an additive 4-D mask makes its (query, key) pair visible iff it is greater than
// hidden_threshold(the mask's dtype); otherwise the pair is hidden (weight exactly 0; a row with nothing
// visible gives zeros and lse = -inf). So NaN hides, as do -inf and Hugging Face's torch.finfo(dtype).min;
// entries above the threshold, however negative, are ordinary biases added to the scores. The threshold
// is half the most negative finite value of the mask's own dtype (a float16 mask's -65504 hides even
// after conversion to float32). Every path applies the rule through additive_visible: the CPU kernel,
// the CUDA kernels (attention_common.cuh's masked_score), and the split form's scores (tensor version).
// torch.finfo(dtype).min of a floating dtype: what hidden entries of the split form's scores hold.
inline double finfo_min(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return -65504.0;
    case at::kBFloat16:
      return -3.3895313892515355e38;
    case at::kFloat:
      return std::numeric_limits<float>::lowest();
    default:
      return std::numeric_limits<double>::lowest();
  }
}

inline double hidden_threshold(at::ScalarType mask_dtype) { return 0.5 * finfo_min(mask_dtype); }

// The rule for one entry, in the dtype the kernels accumulate in (the threshold converted to it).
template <typename T>
PYQKV_HOST_DEVICE inline bool additive_visible(T entry, T threshold) {
  return entry > threshold;  // false for NaN: a NaN entry hides
}

// The rule for a whole additive mask: a bool tensor of its shape, true where visible. attn_softmax reads
// scores (what hook_attn_scores sees, hidden entries at finfo_min) by the same rule.
inline at::Tensor additive_visible(const at::Tensor& mask) { return mask > hidden_threshold(mask.scalar_type()); }

}  // namespace pyqkv
