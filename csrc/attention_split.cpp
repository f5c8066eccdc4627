// The split form of attention, for hooks on the scores and the pattern: attn_scores -> attn_softmax ->
// attn_apply. The [B, H, S, K] scores must exist for a hook to see them, so these are composed of ATen
// ops, registered as CompositeImplicitAutograd: autograd, torch.compile and every device come from the
// ATen ops they are made of. Their argument checks and mask rules are the fused op's (attention.h), so
// the split form and pyqkv::attention cannot drift apart.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention.h"

namespace pyqkv {
namespace {

// Scaled, softcapped, biased and masked scores [B, H, S, K] in `dtype` (default q's): what
// hook_attn_scores sees. Hidden entries hold finfo_min(dtype), which attn_softmax reads as hidden.
at::Tensor attn_scores(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& mask, double scale,
                       bool causal, const c10::optional<at::Tensor>& alibi, c10::optional<double> softcap,
                       c10::optional<int64_t> window, c10::optional<at::ScalarType> dtype) {
  const AttnDims d = check_attention_args(q, k, nullptr, mask, alibi, causal, softcap, window);
  const at::ScalarType dt = dtype.value_or(q.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(dt), "dtype: expected a floating-point dtype or None, got ", dt);
  const int64_t B = d.B, S = d.S, H = d.H, Dh = d.Dh, K = d.K, Hkv = d.Hkv, G = H / Hkv;
  // The G query heads of each KV head stacked along S: one batched GEMM per KV head, K never repeated.
  const at::Tensor qg = q.to(dt).reshape({B, S, Hkv, G, Dh}).permute({0, 2, 3, 1, 4}).reshape({B, Hkv, G * S, Dh});
  at::Tensor scores = at::matmul(qg, k.to(dt).permute({0, 2, 3, 1})).reshape({B, H, S, K}) * scale;
  scores = softcapped(scores, d.softcap);
  if (alibi.has_value()) scores = scores + alibi->to(dt).unsqueeze(2);     // the same bias at every query
  at::Tensor vis = position_visible(S, K, causal, d.window, q.options());  // [S, K] or undefined
  auto hide_unless = [&vis](const at::Tensor& visible) { vis = vis.defined() ? vis & visible : visible; };
  switch (d.mask) {
    case MaskKind::kPadding:
      hide_unless((*mask != 0).view({B, 1, 1, K}));
      break;
    case MaskKind::kBool4d:
      hide_unless(*mask);
      break;
    case MaskKind::kAdditive4d:
      scores = scores + mask->to(dt);
      hide_unless(additive_visible(*mask));  // NaN, -inf and finfo.min entries hide
      break;
    case MaskKind::kNone:
      break;
  }
  return vis.defined() ? scores.masked_fill(vis.logical_not(), finfo_min(dt)) : scores;
}

// The pattern [B, H, S, K] from scores: softmax over keys in the accumulation dtype, where an entry is
// visible iff additive_visible(scores) (the mask rule: finfo.min, -inf and NaN get weight 0) and a row
// with nothing visible is all zeros (never NaN). Returned in `dtype` (default the scores').
at::Tensor attn_softmax(const at::Tensor& scores, c10::optional<at::ScalarType> dtype) {
  PYQKV_CHECK_RANK(scores, "scores", 4, "[B, H, S, K]");
  PYQKV_CHECK_FLOATING(scores, "scores");
  if (dtype.has_value())
    TORCH_CHECK_TYPE(at::isFloatingType(*dtype), "dtype: expected a floating-point dtype or None, got ", *dtype);
  const at::ScalarType acc = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor visible = additive_visible(scores);
  const at::Tensor any_visible = visible.any(-1, /*keepdim=*/true);
  const at::Tensor s = scores.to(acc).masked_fill(visible.logical_not(), -std::numeric_limits<double>::infinity());
  const at::Tensor empty = any_visible.logical_not();
  at::Tensor pattern = at::softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0);
  return pattern.to(dtype.value_or(scores.scalar_type()));
}

// z [B, S, H, Dh] = pattern [B, H, S, K] · v [B, K, Hkv, Dh], query head h reading KV head h / (H / Hkv).
at::Tensor attn_apply(const at::Tensor& pattern, const at::Tensor& v) {
  PYQKV_CHECK_RANK(pattern, "pattern", 4, "[B, H, S, K]");
  PYQKV_CHECK_FLOATING(pattern, "pattern");
  PYQKV_CHECK_RANK(v, "v", 4, "[B, K, Hkv, Dh]");
  PYQKV_CHECK_SAME_DTYPE(v, "v", pattern, "pattern");
  PYQKV_CHECK_SAME_DEVICE(v, "v", pattern, "pattern");
  const int64_t B = pattern.size(0), H = pattern.size(1), S = pattern.size(2), K = pattern.size(3);
  const int64_t Hkv = v.size(2), Dh = v.size(3);
  TORCH_CHECK_VALUE(v.size(0) == B && v.size(1) == K && Hkv >= 1 && H % Hkv == 0, "v: expected shape [", B, ", ", K,
                    ", Hkv, Dh] with Hkv dividing H=", H, " (pattern ", shape_str(pattern), "), got ", shape_str(v));
  const int64_t G = H / Hkv;
  const at::Tensor z = at::matmul(pattern.reshape({B, Hkv, G * S, K}), v.permute({0, 2, 1, 3}));  // [B, Hkv, G*S, Dh]
  return z.reshape({B, Hkv, G, S, Dh}).permute({0, 3, 1, 2, 4}).reshape({B, S, H, Dh});
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CompositeImplicitAutograd, m) {
  m.impl("attn_scores", &attn_scores);
  m.impl("attn_softmax", &attn_softmax);
  m.impl("attn_apply", &attn_apply);
}

}  // namespace pyqkv
