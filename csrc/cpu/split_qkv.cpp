// split_qkv / pack_qkv on CPU: pure data movement, one pass, driven by the layout table in layouts.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../layouts.h"

namespace pyqkv {
namespace {

// Copies every head segment between the fused weight, seen as [D, n_out] through its strides, and the
// per-head weights [heads, D, Dh]. to_fused selects the direction (pack) or its inverse (split).
void move_segments(const at::Tensor& fused_io, std::array<at::Tensor, 3>& per_head,
                   const std::vector<HeadSegment>& segs, int64_t D, int64_t Dh, bool to_fused) {
  const int64_t fs0 = fused_io.stride(0), fs1 = fused_io.stride(1);
  const int64_t n = static_cast<int64_t>(segs.size());
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, fused_io.scalar_type(), "split_qkv", [&] {
    scalar_t* fused = fused_io.data_ptr<scalar_t>();
    std::array<scalar_t*, 3> heads;
    std::array<std::array<int64_t, 3>, 3> hs;
    for (int w = 0; w < 3; ++w) {
      heads[w] = per_head[w].data_ptr<scalar_t>();
      hs[w] = {per_head[w].stride(0), per_head[w].stride(1), per_head[w].stride(2)};
    }
    at::parallel_for(0, n * D, 256, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const HeadSegment& s = segs[t / D];
        const int64_t i = t % D;
        scalar_t* f = fused + i * fs0 + s.fused_start * fs1;
        scalar_t* p = heads[s.which] + s.head * hs[s.which][0] + i * hs[s.which][1];
        const int64_t ps = hs[s.which][2];
        if (to_fused) {
          for (int64_t d = 0; d < Dh; ++d) f[d * fs1] = p[d * ps];
        } else {
          for (int64_t d = 0; d < Dh; ++d) p[d * ps] = f[d * fs1];
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> split_qkv_cpu(const at::Tensor& weight, int64_t n_heads,
                                                             int64_t n_kv_heads, int64_t d_head,
                                                             c10::string_view layout, bool conv1d) {
  return split_qkv_host(move_segments, weight, n_heads, n_kv_heads, d_head, layout, conv1d);
}

at::Tensor pack_qkv_cpu(const at::Tensor& W_Q, const at::Tensor& W_K, const at::Tensor& W_V, c10::string_view layout,
                        bool conv1d) {
  return pack_qkv_host(move_segments, W_Q, W_K, W_V, layout, conv1d);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CPU, m) {
  m.impl("split_qkv", &split_qkv_cpu);
  m.impl("pack_qkv", &pack_qkv_cpu);
}

}  // namespace pyqkv
