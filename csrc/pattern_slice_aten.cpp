// pattern_slice composed of ATen ops: what CUDA runs (a batched GEMM of the chosen rows and columns, then an
// elementwise epilogue from the lse), and, as pyqkv::_pattern_slice_aten (CompositeExplicitAutograd), the
// same function on any device, so the CPU tests check it against the CPU kernel. Compiled in every build:
// a .cpp of ATen calls needs no nvcc, and registering it for the CUDA key is inert without CUDA tensors.
// Memory: O(B x H' x (S' + K') x Dh + B x H' x S' x K'); the chosen keys are gathered per chosen head (a GQA
// model's K/V head is read once per query head that chose it), never the [B, H, S, K] tensor.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "pattern_slice.h"

namespace pyqkv {
namespace {

// Index `t` along `dim` with `axis` (all of it when the axis has no index).
at::Tensor take(const at::Tensor& t, int64_t dim, const SliceAxis& axis) {
  return axis.index.defined() ? t.index_select(dim, axis.index) : t;
}

// A broadcast dim (size 1) stays as it is; a full one is indexed.
at::Tensor take_unless_broadcast(const at::Tensor& t, int64_t dim, const SliceAxis& axis) {
  return t.size(dim) == 1 ? t : take(t, dim, axis);
}

std::tuple<at::Tensor, at::Tensor> pattern_slice_aten(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const c10::optional<at::Tensor>& mask,
    double scale, bool causal, const c10::optional<at::Tensor>& alibi, c10::optional<double> softcap,
    c10::optional<int64_t> window, const c10::optional<at::Tensor>& heads, const c10::optional<at::Tensor>& queries,
    const c10::optional<at::Tensor>& keys, bool return_scores, c10::optional<at::ScalarType> score_dtype) {
  const SliceDims sd = check_pattern_slice(q, k, lse, mask, alibi, causal, softcap, window, heads, queries, keys,
                                           score_dtype);
  const AttnDims& d = sd.d;
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto idx = q.options().dtype(at::kLong);
  const at::Tensor rows = sd.queries.index.defined() ? sd.queries.index : at::arange(d.S, idx);
  const at::Tensor cols = sd.keys.index.defined() ? sd.keys.index : at::arange(d.K, idx);
  const at::Tensor head_ids = sd.heads.index.defined() ? sd.heads.index : at::arange(d.H, idx);
  const int64_t G = d.H / d.Hkv;

  // [B, H', S', Dh] and [B, H', Dh, K']: the chosen query rows of the chosen heads, and the chosen keys of
  // each chosen head's KV head (h / G).
  const at::Tensor qs = take(take(q, 2, sd.heads), 1, sd.queries).to(acc).permute({0, 2, 1, 3});
  const at::Tensor ks = take(k, 1, sd.keys).index_select(2, head_ids.div(G, "floor")).to(acc).permute({0, 2, 3, 1});
  // The score's terms in attention's order (csrc/attention.h): softcap(scale * q.k) + alibi + additive mask.
  at::Tensor s = softcapped(at::matmul(qs * scale, ks), d.softcap);  // [B, H', S', K']
  if (alibi.has_value())
    s = s + take(take_unless_broadcast(*alibi, 1, sd.heads), 2, sd.keys).to(acc).unsqueeze(2);
  at::Tensor vis = position_visible(rows, cols, d.S, d.K, causal, d.window);  // [S', K'] or undefined
  auto hide_unless = [&vis](const at::Tensor& visible) { vis = vis.defined() ? vis & visible : visible; };
  if (d.mask == MaskKind::kPadding) {
    hide_unless(take(*mask != 0, 1, sd.keys).view({d.B, 1, 1, sd.keys.count}));
  } else if (d.mask != MaskKind::kNone) {  // a 4-D mask [B|1, 1|H, S, K]
    const at::Tensor m4 = take(take(take_unless_broadcast(*mask, 1, sd.heads), 2, sd.queries), 3, sd.keys);
    if (d.mask == MaskKind::kBool4d) {
      hide_unless(m4);
    } else {
      s = s + m4.to(acc);
      hide_unless(additive_visible(m4));  // NaN, -inf and finfo.min entries hide
    }
  }
  const at::Tensor row_lse = take(take(lse, 1, sd.heads), 2, sd.queries).unsqueeze(-1);  // [B, H', S', 1]
  // A row with lse = -inf sees nothing (attention's rule): its entries are 0, never NaN.
  at::Tensor weighted = row_lse != -std::numeric_limits<double>::infinity();
  if (vis.defined()) weighted = weighted & vis;
  const std::vector<int64_t> shape{d.B, sd.heads.count, sd.queries.count, sd.keys.count};
  at::Tensor pattern = at::where(weighted, at::exp(s - row_lse), at::zeros({}, s.options())).expand(shape);
  pattern = pattern.to(q.scalar_type()).contiguous();
  if (!return_scores) return {pattern, at::empty({0}, q.options().dtype(sd.score_dtype))};
  at::Tensor scores = vis.defined() ? s.masked_fill(vis.logical_not(), finfo_min(sd.score_dtype)) : s;
  return {pattern, scores.expand(shape).to(sd.score_dtype).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CUDA, m) { m.impl("pattern_slice", &pattern_slice_aten); }
TORCH_LIBRARY_IMPL(pyqkv, CompositeExplicitAutograd, m) { m.impl("_pattern_slice_aten", &pattern_slice_aten); }

}  // namespace pyqkv
