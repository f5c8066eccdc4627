// Argument checks of pattern_slice, shared by its CPU kernel (csrc/cpu/pattern_slice.cpp) and its ATen
// form (csrc/pattern_slice_aten.cpp, which CUDA runs).
//
// Why the op exists: a pattern entry is exp(score - lse) with the row's log-sum-exp, which the fused
// attention op returns anyway. So any slice of the [B, H, S, K] pattern (the last query's row, the
// columns of a few keys, a few heads) costs O(entries x Dh) from q, k and the lse, and the S x K tensor
// is never made. Visibility and the score's terms come from attention.h (check_attention_args,
// position_visible, softcapped, additive_visible): the same rules as attention's kernels.
#pragma once
#include <ATen/ATen.h>

#include "attention.h"

namespace pyqkv {

// The chosen indices of one axis: int64, contiguous, on q's device; undefined = the whole axis.
struct SliceAxis {
  at::Tensor index;
  int64_t count;  // how many entries the output has along this axis
};

// An index argument: None, or a 1-D integer tensor whose values lie in [0, n) (negative indices are
// resolved by the Python wrapper, pyqkv.ops.pattern_slice). `what` names n in the message ("S, the query
// positions of q"). The values are read only where readable (not under a fake tensor trace); on CUDA that
// read is a device sync.
inline SliceAxis check_slice_axis(const c10::optional<at::Tensor>& t, const char* name, int64_t n, const char* what,
                                  const at::Tensor& q) {
  if (!t.has_value()) return {at::Tensor(), n};
  PYQKV_CHECK_RANK(*t, name, 1, "[n] (indices)");
  TORCH_CHECK_TYPE(at::isIntegralType(t->scalar_type(), /*includeBool=*/false), name,
                   ": expected None or a 1-D integer tensor of indices, got ", t->scalar_type());
  PYQKV_CHECK_SAME_DEVICE(*t, name, q, "q");
  at::Tensor index = t->to(at::kLong).contiguous();
  if (index.numel() > 0 && values_readable(index)) {
    const at::Tensor bad = (index < 0).logical_or(index >= n);
    if (bad.any().item<bool>()) {  // the error path only: the first offending index, for the message
      const int64_t at_pos = bad.nonzero().select(1, 0)[0].item<int64_t>();
      TORCH_CHECK_VALUE(false, name, ": expected indices in [0, ", n, ") (", what, " = ", n, "), got ",
                        index[at_pos].item<int64_t>(), " at position ", at_pos);
    }
  }
  return {index, index.numel()};
}

struct SliceDims {
  AttnDims d;
  SliceAxis heads, queries, keys;
  at::ScalarType score_dtype;
};

// Every check of pattern_slice: attention's own (check_attention_args, v absent), the lse against q, and
// the three index arguments. Each failure names the argument, what was expected and what was received.
inline SliceDims check_pattern_slice(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                                     const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& alibi,
                                     bool causal, c10::optional<double> softcap, c10::optional<int64_t> window,
                                     const c10::optional<at::Tensor>& heads, const c10::optional<at::Tensor>& queries,
                                     const c10::optional<at::Tensor>& keys, c10::optional<at::ScalarType> score_dtype) {
  const AttnDims d = check_attention_args(q, k, nullptr, mask, alibi, causal, softcap, window);
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  PYQKV_CHECK_RANK(lse, "lse", 3, "[B, H, S] (the log-sum-exp attention returned)");
  TORCH_CHECK_VALUE(lse.size(0) == d.B && lse.size(1) == d.H && lse.size(2) == d.S, "lse: expected shape [B, H, S] = [",
                    d.B, ", ", d.H, ", ", d.S, "] (of q ", shape_str(q), "), got ", shape_str(lse));
  TORCH_CHECK_TYPE(lse.scalar_type() == acc, "lse: expected dtype ", acc,
                   " (what attention returns for q of dtype ", q.scalar_type(), "), got ", lse.scalar_type());
  PYQKV_CHECK_SAME_DEVICE(lse, "lse", q, "q");
  const at::ScalarType sd = score_dtype.value_or(q.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(sd), "score_dtype: expected a floating-point dtype or None, got ", sd);
  return {d, check_slice_axis(heads, "heads", d.H, "H, the query heads of q", q),
          check_slice_axis(queries, "queries", d.S, "S, the query positions of q", q),
          check_slice_axis(keys, "keys", d.K, "K, the key positions of k", q), sd};
}

}  // namespace pyqkv
