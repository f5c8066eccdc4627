// Host-side argument checks and mask preparation for the attention op, shared by CPU and CUDA.
#pragma once
#include <ATen/ATen.h>

#include <limits>

#include "checks.h"
#include "host_device.h"

namespace pyqkv {

// What a `mask` argument is. Every path (the CPU kernel, the CUDA kernels, the split form) reads a mask
// through these kinds and the visibility rules below.
enum class MaskKind {
  kNone,
  kPadding,     // [B, K], bool / integer / float: nonzero = attend (keys only)
  kBool4d,      // [B|1, 1|H, S, K] bool: true = attend (Hugging Face's sdpa masks)
  kAdditive4d,  // [B|1, 1|H, S, K] float: added to the scores; visible iff > hidden_threshold (below)
};

struct AttnDims {
  int64_t B, S, H, Dh, K, Hkv;
  MaskKind mask = MaskKind::kNone;
};

inline AttnDims check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& alibi) {
  PYQKV_CHECK_RANK(q, "q", 4, "[B, S, H, Dh]");
  PYQKV_CHECK_RANK(k, "k", 4, "[B, K, Hkv, Dh]");
  PYQKV_CHECK_RANK(v, "v", 4, "[B, K, Hkv, Dh]");
  PYQKV_CHECK_FLOATING(q, "q");
  PYQKV_CHECK_SAME_DTYPE(k, "k", q, "q");
  PYQKV_CHECK_SAME_DTYPE(v, "v", q, "q");
  PYQKV_CHECK_SAME_DEVICE(k, "k", q, "q");
  PYQKV_CHECK_SAME_DEVICE(v, "v", q, "q");
  AttnDims d{q.size(0), q.size(1), q.size(2), q.size(3), k.size(1), k.size(2)};
  TORCH_CHECK_VALUE(d.Dh > 0 && d.H > 0, "q: expected H > 0 heads of Dh > 0 features, got shape ", shape_str(q));
  TORCH_CHECK_VALUE(k.size(0) == d.B && k.size(3) == d.Dh, "k: expected shape [", d.B, ", K, Hkv, ", d.Dh,
                    "] (B and Dh of q ", shape_str(q), "), got ", shape_str(k));
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v: expected the shape of k ", shape_str(k), ", got ",
                    shape_str(v));
  TORCH_CHECK_VALUE(d.Hkv > 0 && d.H % d.Hkv == 0, "k: expected a KV head count that divides H=", d.H,
                    " (q ", shape_str(q), "), got Hkv=", d.Hkv, " (k ", shape_str(k), ")");
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    PYQKV_CHECK_SAME_DEVICE(m, "mask", q, "q");
    if (m.dim() == 2) {
      TORCH_CHECK_VALUE(m.size(0) == d.B && m.size(1) == d.K, "mask: expected a 2-D padding mask [B, K] = [",
                        d.B, ", ", d.K, "], got ", shape_str(m));
      TORCH_CHECK_TYPE(!at::isComplexType(m.scalar_type()), "mask: expected a bool, integer or float padding mask, got ",
                       m.scalar_type());
      d.mask = MaskKind::kPadding;
    } else if (m.dim() == 4) {
      TORCH_CHECK_TYPE(at::isFloatingType(m.scalar_type()) || m.scalar_type() == at::kBool,
                       "mask: expected a floating-point additive 4-D mask (0 = visible, very negative = hidden) or a "
                       "bool one (True = attend), got ",
                       m.scalar_type());
      TORCH_CHECK_VALUE((m.size(0) == d.B || m.size(0) == 1) && (m.size(1) == 1 || m.size(1) == d.H) &&
                            m.size(2) == d.S && m.size(3) == d.K,
                        "mask: expected a 4-D additive mask [B or 1, 1 or H, S, K] = [", d.B, ", 1 or ", d.H, ", ",
                        d.S, ", ", d.K, "] (or a bool one of that shape), got ", shape_str(m));
      d.mask = m.scalar_type() == at::kBool ? MaskKind::kBool4d : MaskKind::kAdditive4d;
    } else {
      TORCH_CHECK_VALUE(false, "mask: expected a 2-D padding mask [B, K] or a 4-D additive mask [B, 1 or H, S, K] (or a bool "
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
  return d;
}

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
inline double hidden_threshold(at::ScalarType mask_dtype) {
  switch (mask_dtype) {
    case at::kHalf: return -0.5 * 65504.0;
    case at::kBFloat16: return -0.5 * 3.3895313892515355e38;
    case at::kFloat: return -0.5 * std::numeric_limits<float>::max();
    default: return -0.5 * std::numeric_limits<double>::max();
  }
}

// The rule for one entry, in the dtype the kernels accumulate in (the threshold converted to it).
template <typename T>
PYQKV_HOST_DEVICE inline bool additive_visible(T entry, T threshold) {
  return entry > threshold;  // false for NaN: a NaN entry hides
}

// The rule for a whole additive mask: a bool tensor of its shape, true where visible.
inline at::Tensor additive_visible(const at::Tensor& mask) { return mask > hidden_threshold(mask.scalar_type()); }

}  // namespace pyqkv
