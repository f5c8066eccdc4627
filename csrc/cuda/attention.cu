// attention on CUDA: the host function (argument checks, mask preparation, and the backend the plan of
// csrc/attention_plan.h chooses) over PyTorch's FlashAttention-2 (half types, no mask or a sliding
// window, no pattern) and pyqkv's own kernels: attention_tc.cuh (tensor cores, half-type prefill),
// attention_decode.cuh (decode shapes: few query rows per KV head, wide loads, Flash-Decoding splits)
// and attention_simt.cuh (CUDA cores: float64, the pattern, and every case the other two decline).
// Semantics are those of the CPU op (csrc/cpu/attention.cpp), output for output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/native/transformers/cuda/sdp_utils.h>
#include <ATen/ops/_flash_attention_forward_cuda_dispatch.h>
#include <ATen/record_function.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#define PYQKV_TORCH_GE(maj, min) \
  (TORCH_VERSION_MAJOR > (maj) || (TORCH_VERSION_MAJOR == (maj) && TORCH_VERSION_MINOR >= (min)))
#if PYQKV_TORCH_GE(2, 12)
#include <ATen/ops/_flash_attention_forward_no_dropout_inplace_cuda_dispatch.h>
#endif

#include <algorithm>
#include <limits>

#include "../attention_plan.h"
#include "attention_decode.cuh"
#include "attention_host.cuh"
#include "attention_simt.cuh"
#include "attention_tc.cuh"

namespace pyqkv {
namespace {

using attn::Params;
using attn::Plan;

// The plan's view of a CUDA device (csrc/attention_plan.h), from its properties.
plan::DeviceInfo cuda_device_info(int device_index) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device_index);
  plan::DeviceInfo d;
  d.cuda = true;
  d.major = prop->major;
  d.minor = prop->minor;
  d.max_smem = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  d.n_sms = prop->multiProcessorCount;
  d.flash_in_build = sdp::is_flash_attention_available();
  return d;
}

// pyqkv.ops.attention_plan on CUDA tensors asks for the same information.
[[maybe_unused]] const bool kDeviceInfoRegistered = (plan::set_cuda_device_info(&cuda_device_info), true);

template <typename kernel_t>
void allow_dynamic_smem(kernel_t kernel, size_t bytes) {
  // Above 48 KiB a kernel must opt in to dynamic shared memory; cheap enough to do per launch.
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

void check_grid(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "attention: too many ", what, " for one launch (", blocks,
              ")");
}

// cuda_t: __half or __nv_bfloat16, the same bits as c10::Half / c10::BFloat16.
template <typename cuda_t>
void launch_tc(const Params& p, const Plan& plan, cudaStream_t stream) {
  static_assert(sizeof(cuda_t) == 2, "the tensor-core kernel takes 16-bit types");
  const int64_t blocks = static_cast<int64_t>(plan.tc.n_qt) * p.H * p.B;
  check_grid(blocks, "query tiles");
  auto kernel = attn::attention_tc_kernel<cuda_t>;
  allow_dynamic_smem(kernel, plan.smem);
  kernel<<<static_cast<unsigned>(blocks), attn::kTcThreads, plan.smem, stream>>>(p, plan.tc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Merges the key slices' partials (attention_simt.cuh's combine_splits_kernel) into z and lse.
template <typename scalar_t, typename acc_t>
void launch_combine(const Params& p, int n_splits, const acc_t* ws_o, const acc_t* ws_ml, cudaStream_t stream) {
  const int64_t rows = p.B * p.H * p.S;
  check_grid(rows, "query rows");
  TORCH_CHECK(n_splits <= attn::kMaxSplits, "pyqkv: internal: ", n_splits, " key slices, at most ", attn::kMaxSplits,
              " supported");
  const size_t combine_smem = attn::kCombineSmemEntries * sizeof(acc_t);  // see combine_splits_kernel
  attn::combine_splits_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(rows), attn::kSimtThreads, combine_smem, stream>>>(p, n_splits, ws_o, ws_ml);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_decode(const Params& p, const Plan& plan, const at::Tensor& q, cudaStream_t stream) {
  const attn::DecodeTiling& t = plan.dec;
  const int64_t blocks = p.B * p.Hkv * t.n_splits;
  check_grid(blocks, "CTAs");
  at::Tensor ws_o, ws_ml;  // Flash-Decoding partials, float32, as launch_simt's
  if (t.n_splits > 1) {
    const auto opts = q.options().dtype(at::kFloat);
    ws_o = at::empty({p.B * p.H * p.S * t.n_splits * p.Dh}, opts);
    ws_ml = at::empty({p.B * p.H * p.S * t.n_splits * 2}, opts);
  }
  float* ws_o_ptr = ws_o.defined() ? ws_o.data_ptr<float>() : nullptr;
  float* ws_ml_ptr = ws_ml.defined() ? ws_ml.data_ptr<float>() : nullptr;
  auto launch = [&](auto kernel) {
    allow_dynamic_smem(kernel, plan.smem);
    kernel<<<static_cast<unsigned>(blocks), attn::kDecodeThreads, plan.smem, stream>>>(p, t, ws_o_ptr, ws_ml_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (t.rmax) {
    case 1:
      launch(attn::attention_decode_kernel<scalar_t, 1>);
      break;
    case 2:
      launch(attn::attention_decode_kernel<scalar_t, 2>);
      break;
    case 4:
      launch(attn::attention_decode_kernel<scalar_t, 4>);
      break;
    case 8:
      launch(attn::attention_decode_kernel<scalar_t, 8>);
      break;
    default:
      TORCH_CHECK(false, "pyqkv: internal: decode plan with ", t.rmax, " register rows");
  }
  if (t.n_splits > 1) launch_combine<scalar_t, float>(p, t.n_splits, ws_o_ptr, ws_ml_ptr, stream);
}

template <typename scalar_t>
void launch_simt(const Params& p, const Plan& plan, const at::Tensor& q, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const attn::SimtTiling& t = plan.simt;
  const int64_t blocks = p.B * (p.H / t.nh) * t.n_qt * t.n_splits;
  check_grid(blocks, "CTAs");
  at::Tensor ws_o, ws_ml;  // Flash-Decoding partials: [B, H, S, n_splits, Dh] and [B, H, S, n_splits, 2]
  if (t.n_splits > 1) {
    const auto opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    ws_o = at::empty({p.B * p.H * p.S * t.n_splits * p.Dh}, opts);
    ws_ml = at::empty({p.B * p.H * p.S * t.n_splits * 2}, opts);
  }
  acc_t* ws_o_ptr = ws_o.defined() ? ws_o.data_ptr<acc_t>() : nullptr;
  acc_t* ws_ml_ptr = ws_ml.defined() ? ws_ml.data_ptr<acc_t>() : nullptr;

  auto kernel = attn::attention_simt_kernel<scalar_t, acc_t>;
  allow_dynamic_smem(kernel, plan.smem);
  kernel<<<static_cast<unsigned>(blocks), attn::kSimtThreads, plan.smem, stream>>>(p, t, ws_o_ptr, ws_ml_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (t.n_splits > 1) launch_combine<scalar_t, acc_t>(p, t.n_splits, ws_o_ptr, ws_ml_ptr, stream);
  // ws_o / ws_ml go back to the caching allocator here; it hands them out again only to work queued
  // after these kernels on this stream.
}

// PyTorch's FlashAttention-2, called below the dispatcher (at::cuda::, so that a process-wide FA3/FA4
// registration cannot swap the kernel: shared/research/gpu-dispatch.md §7). The plan admitted the input:
// float16 / bfloat16, Dh % 8 == 0 and <= 256, unit stride over Dh with 16-byte aligned data and strides
// (FA2 loads 16 bytes at a time and checks neither), no mask, no ALiBi, no softcap, no pattern. FA2's
// dense path has exactly pyqkv's semantics: bottom-right causal, GQA by index with no K/V copy, any
// batch/row/head strides (the fused-QKV views and the head-major cache are read in place), split-KV
// for decode. Only arguments that every torch 2.11 - 2.15 has are passed; scale and the windows as
// typed optionals (a bare nullopt in the 11th slot is ambiguous with the .quantized overload).
void run_flash(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttnDims& d, double scale,
               bool causal, at::Tensor z, at::Tensor& lse) {
  RECORD_FUNCTION("pyqkv::attention.flash", std::vector<c10::IValue>());
  // Hugging Face's sliding_window W counts the query's own key; FA2's window is an inclusive band:
  // W - 1 keys to the left, 0 to the right (causal).
  const std::optional<int64_t> left = d.window > 0 ? std::optional<int64_t>(d.window - 1) : std::nullopt;
  const std::optional<int64_t> right = d.window > 0 ? std::optional<int64_t>(0) : std::nullopt;
  const std::optional<double> sc(scale);
  const std::optional<at::Tensor> none;
#if PYQKV_TORCH_GE(2, 12)
  // The out= form writes straight into z [B, S, H, Dh]; it returns the lse.
  lse = at::cuda::_flash_attention_forward_no_dropout_inplace(z, q, k, v, none, none, d.S, d.K, 0.0, causal,
                                                              /*return_debug_mask=*/false, sc, left, right);
#else
  auto out = at::cuda::_flash_attention_forward(q, k, v, none, none, d.S, d.K, 0.0, causal,
                                                /*return_debug_mask=*/false, sc, left, right);
  z.copy_(std::get<0>(out));
  lse = std::get<1>(out);
#endif
  // FA2 gives a row with no visible key (causal with K < S) out = 0 and lse = +inf; pyqkv's lse is -inf.
  lse.masked_fill_(lse == std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask, double scale,
    bool causal, bool return_pattern, const c10::optional<at::Tensor>& alibi, c10::optional<double> softcap,
    c10::optional<int64_t> window) {
  // first, as on CPU: a device mismatch is reported by name
  check_attention(q, k, v, mask, alibi, causal, softcap, window);
  TORCH_CHECK_VALUE(q.is_cuda(), "q: expected a CUDA tensor, got device ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());  // outputs, mask copies and kernels on q's device
  const attn::Prepared r =
      attn::prepare_attention(q, k, v, mask, scale, causal, return_pattern, alibi, softcap, window);
  if (r.done) return {r.z, r.lse, r.pattern};
  const Params& p = r.p;
  const plan::Query query = plan::make_query(q, k, v, mask, r.d, causal, return_pattern, alibi.has_value(),
                                             cuda_device_info(q.device().index()), plan::this_torch_build());
  const plan::Backend backend = plan::choose_or_throw(query);  // raises with every backend's reasons
  if (backend == plan::Backend::kFlash) {
    at::Tensor lse;
    run_flash(q, k, v, r.d, scale, causal, r.z, lse);
    return {r.z, lse, r.pattern};
  }
  attn::OwnKernel kind = attn::OwnKernel::kCudaCores;
  switch (backend) {
    case plan::Backend::kOwnDecode:
      kind = attn::OwnKernel::kDecode;
      break;
    case plan::Backend::kOwnTc:
      kind = attn::OwnKernel::kTensorCores;
      break;
    case plan::Backend::kOwnSimt:
      kind = attn::OwnKernel::kCudaCores;
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "pyqkv: internal: the plan chose ", plan::backend_name(backend),
                            ", which pyqkv::attention does not call yet");
  }
  const Plan plan = attn::plan_own(query.own, kind);
  TORCH_INTERNAL_ASSERT(plan.error.empty(), plan.error);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (plan.tensor_cores) {  // planned for float16 / bfloat16 only
    TORCH_INTERNAL_ASSERT(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16);
    if (q.scalar_type() == at::kHalf) {
      launch_tc<__half>(p, plan, stream);
    } else {
      launch_tc<__nv_bfloat16>(p, plan, stream);
    }
  } else if (plan.decode) {  // planned for float32, float16 and bfloat16 only
    switch (q.scalar_type()) {
      case at::kFloat:
        launch_decode<float>(p, plan, q, stream);
        break;
      case at::kHalf:
        launch_decode<at::Half>(p, plan, q, stream);
        break;
      case at::kBFloat16:
        launch_decode<at::BFloat16>(p, plan, q, stream);
        break;
      default:
        TORCH_INTERNAL_ASSERT(false, "decode plan for ", q.scalar_type());
    }
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_cuda",
                                    [&] { launch_simt<scalar_t>(p, plan, q, stream); });
  }
  return {r.z, r.lse, r.pattern};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CUDA, m) { m.impl("attention", &attention_cuda); }

}  // namespace pyqkv
