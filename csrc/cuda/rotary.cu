// rotary on CUDA: the host function (argument checks, tables in the accumulation dtype, launch on the
// current stream) over the elementwise kernel of rotary.cuh. Semantics are the CPU op's
// (csrc/cpu/rotary.cpp), bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "rotary.cuh"

namespace pyqkv {
namespace {

at::Tensor rotary_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  const RotaryDims d = check_rotary(x, cos, sin);  // first, as on CPU: a device mismatch is reported by name
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got device ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());  // output, table copies and kernel on x's device
  at::Tensor out = at::empty({d.B, d.S, d.n, d.Dh}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor c = rotary_table(cos, x), s = rotary_table(sin, x);
  const rope::Params p = rope::make_params(x, c, s, out, d, interleaved);
  const unsigned blocks = static_cast<unsigned>(rope::grid_blocks(p.total, rope::kMaxBlocks));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotary_cuda", [&] {
    rope::rotary_kernel<scalar_t, at::opmath_type<scalar_t>><<<blocks, rope::kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CUDA, m) { m.impl("rotary", &rotary_cuda); }

}  // namespace pyqkv
