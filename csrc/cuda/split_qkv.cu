// split_qkv / pack_qkv on CUDA: pure data movement in one pass, driven by the same layout table as the
// CPU kernels (layouts.h::head_segments), inverted on the host and copied to the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "../layouts.h"

namespace pyqkv {
namespace {

// Elements are moved as raw words of their size: one kernel per element size serves every dtype the
// CPU op dispatches (bool, integers, half types, float, double).
template <int kBytes>
struct Word;
template <>
struct Word<1> {
  using type = uint8_t;
};
template <>
struct Word<2> {
  using type = uint16_t;
};
template <>
struct Word<4> {
  using type = uint32_t;
};
template <>
struct Word<8> {
  using type = uint64_t;
};

struct MoveArgs {
  int64_t D, Dh, n_out;
  int64_t fs0, fs1;  // strides of the fused weight seen as [D, n_out]
  int64_t hs[3][3];  // strides of W_Q, W_K, W_V [heads, D, Dh]
  bool i_fastest;    // linear index runs over D first (when that is the fused weight's unit stride)
  bool to_fused;     // pack (per-head -> fused) or split (fused -> per-head)
};

// One thread per fused element. owner[c / Dh] = head * 3 + which tells where fused column c belongs:
// every head segment starts at a multiple of Dh and the segments tile the fused dim exactly.
template <typename word_t>
__global__ void move_segments_kernel(word_t* fused, word_t* wq, word_t* wk, word_t* wv,
                                     const int32_t* __restrict__ owner, const MoveArgs a) {
  const int64_t total = a.D * a.n_out;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += step) {
    int64_t i, c;
    if (a.i_fastest) {
      i = t % a.D;
      c = t / a.D;
    } else {
      c = t % a.n_out;
      i = t / a.n_out;
    }
    const int64_t blk = c / a.Dh, d = c - blk * a.Dh;
    const int32_t code = owner[blk];
    const int which = code % 3;
    const int64_t head = code / 3;
    word_t* base = which == 0 ? wq : (which == 1 ? wk : wv);
    word_t* p = base + head * a.hs[which][0] + i * a.hs[which][1] + d * a.hs[which][2];
    word_t* f = fused + i * a.fs0 + c * a.fs1;
    if (a.to_fused) {
      *f = *p;
    } else {
      *p = *f;
    }
  }
}

void move_segments(const at::Tensor& fused_io, std::array<at::Tensor, 3>& per_head,
                   const std::vector<HeadSegment>& segs, int64_t D, int64_t Dh, bool to_fused) {
  const int64_t n_out = static_cast<int64_t>(segs.size()) * Dh;
  if (D == 0 || n_out == 0) return;
  const c10::cuda::CUDAGuard guard(fused_io.device());

  at::Tensor owner_cpu = at::empty({static_cast<int64_t>(segs.size())}, at::TensorOptions().dtype(at::kInt));
  int32_t* o = owner_cpu.data_ptr<int32_t>();
  for (const HeadSegment& s : segs) {
    TORCH_INTERNAL_ASSERT(s.fused_start % Dh == 0 && s.fused_start / Dh < static_cast<int64_t>(segs.size()));
    o[s.fused_start / Dh] = static_cast<int32_t>(s.head * 3 + s.which);
  }
  // A blocking copy: owner_cpu is pageable and dies at the end of this call.
  const at::Tensor owner = owner_cpu.to(fused_io.device(), /*non_blocking=*/false);

  MoveArgs a{};
  a.D = D;
  a.Dh = Dh;
  a.n_out = n_out;
  a.fs0 = fused_io.stride(0);
  a.fs1 = fused_io.stride(1);
  for (int w = 0; w < 3; ++w)
    for (int j = 0; j < 3; ++j) a.hs[w][j] = per_head[w].stride(j);
  // Walk the fused weight along its unit-stride dim, so one side of the copy is coalesced: conv1d
  // [D, n_out] along n_out, a Linear weight [n_out, D] (seen transposed) along D.
  a.i_fastest = std::abs(a.fs0) < std::abs(a.fs1);
  a.to_fused = to_fused;

  const int64_t total = D * n_out;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 20);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, fused_io.scalar_type(), "split_qkv", [&] {
    using word_t = typename Word<sizeof(scalar_t)>::type;
    move_segments_kernel<word_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<word_t*>(fused_io.data_ptr()), static_cast<word_t*>(per_head[0].data_ptr()),
        static_cast<word_t*>(per_head[1].data_ptr()), static_cast<word_t*>(per_head[2].data_ptr()),
        owner.data_ptr<int32_t>(), a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> split_qkv_cuda(const at::Tensor& weight, int64_t n_heads,
                                                              int64_t n_kv_heads, int64_t d_head,
                                                              c10::string_view layout, bool conv1d) {
  return split_qkv_host(move_segments, weight, n_heads, n_kv_heads, d_head, layout, conv1d);
}

at::Tensor pack_qkv_cuda(const at::Tensor& W_Q, const at::Tensor& W_K, const at::Tensor& W_V, c10::string_view layout,
                         bool conv1d) {
  return pack_qkv_host(move_segments, W_Q, W_K, W_V, layout, conv1d);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CUDA, m) {
  m.impl("split_qkv", &split_qkv_cuda);
  m.impl("pack_qkv", &pack_qkv_cuda);
}

}  // namespace pyqkv
