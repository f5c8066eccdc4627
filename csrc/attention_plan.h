// The attention backends as data (issue 12): each backend declares what it supports and says why it
// refuses an input; the plan takes the first backend, in priority order, that accepts. Plain host C++,
// compiled in the CPU build too, and a pure function of shapes, strides, dtypes, flags, the device's
// capability and what the torch build offers: pyqkv.ops.attention_plan runs it on meta tensors, so the
// whole selection table is tested without a GPU.
//
// Priority: flash (PyTorch's FlashAttention-2), mem_efficient, cudnn (opt-in), own_decode, own_tc,
// own_simt (pyqkv's CUDA kernels: csrc/cuda/attention_*.cuh), cpu (csrc/cpu/attention.cpp).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "attention.h"
#include "cuda/attention_plan.cuh"

namespace pyqkv {
namespace plan {

// Whether pyqkv::attention's CUDA kernel can call the backend (the plan never chooses one it cannot).
constexpr bool kFlashWired = true;  // dense FA2 (csrc/cuda/attention.cu)

enum class Backend { kFlash, kMemEfficient, kCudnn, kOwnDecode, kOwnTc, kOwnSimt, kCpu };
constexpr std::array<Backend, 7> kPriority = {Backend::kFlash,     Backend::kMemEfficient, Backend::kCudnn,
                                              Backend::kOwnDecode, Backend::kOwnTc,        Backend::kOwnSimt,
                                              Backend::kCpu};

inline const char* backend_name(Backend b) {
  switch (b) {
    case Backend::kFlash:
      return "flash";
    case Backend::kMemEfficient:
      return "mem_efficient";
    case Backend::kCudnn:
      return "cudnn";
    case Backend::kOwnDecode:
      return "own_decode";
    case Backend::kOwnTc:
      return "own_tc";
    case Backend::kOwnSimt:
      return "own_simt";
    case Backend::kCpu:
      return "cpu";
  }
  return "?";
}

// What the torch build offers (and the user's switches), an input of the plan like the shapes.
struct TorchBuild {
  int major = 2, minor = 0;   // the torch the extension runs with (or plans for)
  bool flash = true;          // FA2 compiled in and not switched off (torch.backends.cuda.enable_flash_sdp)
  bool mem_efficient = true;  // likewise (enable_mem_efficient_sdp)
  bool cudnn = true;          // likewise (enable_cudnn_sdp)
  bool cudnn_opt_in = false;  // PYQKV_CUDNN=1, or cudnn forced: never chosen otherwise
  bool at_least(int ma, int mi) const { return major > ma || (major == ma && minor >= mi); }
};

// The device: CPU, or a CUDA device's capability, opt-in shared memory per block and SM count.
struct DeviceInfo {
  bool cuda = false;
  int major = 0, minor = 0;
  int64_t max_smem = 0;
  int n_sms = 0;
  bool flash_in_build = true;  // torch's CUDA build has FlashAttention-2 (sdp::is_flash_attention_available)
};

// A representative GPU of a compute capability, for plans on meta tensors (device_capability=(9, 0)
// plans for an H100/H200: 227 KiB of shared memory per block, 132 SMs).
inline DeviceInfo device_for_capability(int major, int minor) {
  DeviceInfo d;
  d.cuda = true;
  d.major = major;
  d.minor = minor;
  const int sm = 10 * major + minor;
  if (sm == 80) {
    d.max_smem = 166912, d.n_sms = 108;  // A100
  } else if (sm == 90 || sm == 100 || sm == 103) {
    d.max_smem = 232448, d.n_sms = sm == 90 ? 132 : 148;  // H100/H200, B200
  } else if (sm >= 86) {
    d.max_smem = 101376, d.n_sms = 84;  // A40, L40, RTX 30xx/40xx/50xx
  } else if (sm >= 75) {
    d.max_smem = 65536, d.n_sms = 40;  // T4
  } else {
    d.max_smem = 49152, d.n_sms = 40;
  }
  return d;
}

// Everything the choice depends on.
struct Query {
  DeviceInfo device;
  TorchBuild torch;
  at::ScalarType dtype = at::kFloat;
  AttnDims d{};
  bool causal = false, alibi = false, return_pattern = false;
  bool qkv_unit_last = false;  // q, k, v all have stride 1 over Dh
  bool qkv_16b = false;        // ... and 16-byte aligned data pointers and non-last strides
  bool mask_in_q_dtype = false;
  attn::PlanInputs own{};  // the own kernels' view of the same input
};

// 16-byte aligned data (a meta tensor: its storage offset, as every allocator aligns a base pointer to
// at least 16 bytes) and every non-last stride a multiple of 16 bytes.
inline bool data_16b_aligned(const at::Tensor& t) {
  const int64_t es = t.element_size();
  const uintptr_t addr =
      t.is_meta() ? static_cast<uintptr_t>(t.storage_offset() * es) : reinterpret_cast<uintptr_t>(t.data_ptr());
  if (addr % 16 != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if (t.size(i) > 1 && (t.stride(i) * es) % 16 != 0) return false;
  return true;
}

// Rows of a [.., rows, .., Dh] tensor of a 2- or 4-byte dtype can be read 16 bytes at a time: unit
// feature stride, Dh a multiple of 16 bytes, and every row start 16-byte aligned.
inline bool rows_16b_loadable(const at::Tensor& t) {
  const int64_t es = t.element_size();
  if (es != 2 && es != 4) return false;
  return t.stride(3) == 1 && (t.size(3) * es) % 16 == 0 && data_16b_aligned(t);
}

// The same for the tensor-core kernel, which reads half types only (8 elements per load).
inline bool rows_16b_aligned(const at::Tensor& t) { return t.element_size() == 2 && rows_16b_loadable(t); }

inline Query make_query(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const c10::optional<at::Tensor>& mask, const AttnDims& d, bool causal, bool return_pattern,
                        bool alibi, const DeviceInfo& device, const TorchBuild& torch) {
  Query r;
  r.device = device;
  r.torch = torch;
  r.dtype = q.scalar_type();
  r.d = d;
  r.causal = causal;
  r.alibi = alibi;
  r.return_pattern = return_pattern;
  r.qkv_unit_last = q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1;
  r.qkv_16b = r.qkv_unit_last && data_16b_aligned(q) && data_16b_aligned(k) && data_16b_aligned(v);
  r.mask_in_q_dtype = mask.has_value() && mask->scalar_type() == q.scalar_type();
  attn::PlanInputs& in = r.own;
  in.B = d.B, in.S = d.S, in.H = d.H, in.Hkv = d.Hkv, in.Dh = d.Dh, in.K = d.K;
  in.half_type = r.dtype == at::kHalf || r.dtype == at::kBFloat16;
  in.acc_bytes = r.dtype == at::kDouble ? 8 : 4;
  in.return_pattern = return_pattern;
  in.sm_major = device.major;
  in.max_smem = static_cast<size_t>(device.max_smem);
  in.n_sms = device.n_sms;
  in.q_vec = rows_16b_aligned(q);
  in.k_vec = rows_16b_aligned(k);
  in.v_vec = rows_16b_aligned(v);
  in.elem_bytes = static_cast<int>(q.element_size());
  in.kv_rows16 = rows_16b_loadable(k) && rows_16b_loadable(v);
  return r;
}

// Why backend b refuses the input (nothing added: it accepts).
void refusals(Backend b, const Query& q, attn::Refusals& why);

struct Choice {
  bool found = false;
  Backend backend = Backend::kCpu;
  bool forced = false;
  // Per backend, its reasons; filled only when collected (the error message, pyqkv.ops.attention_plan).
  std::vector<std::pair<std::string, std::vector<std::string>>> refused;
};

// The first backend in priority order that accepts; `forced` (a backend name, "" for none) considers
// that one only. collect: gather every backend's reasons (slow; for messages).
Choice choose(const Query& q, const std::string& forced, bool collect);

// The backend forced by pyqkv.ops.attention_backend(...) or PYQKV_ATTENTION_BACKEND ("" for none);
// raises ValueError for an unknown name.
std::string forced_backend();

// choose() for an op call: raises ValueError listing the reasons when nothing (or the forced backend)
// accepts.
Backend choose_or_throw(const Query& q);

// The compile-time torch version with the runtime switches of this process.
TorchBuild this_torch_build();

// Device information of a CUDA device, supplied by the CUDA build (csrc/cuda/attention.cu); a CPU build
// leaves it unset.
using CudaDeviceInfoFn = DeviceInfo (*)(int device_index);
void set_cuda_device_info(CudaDeviceInfoFn fn);
DeviceInfo cuda_device_info(int device_index);

}  // namespace plan
}  // namespace pyqkv
