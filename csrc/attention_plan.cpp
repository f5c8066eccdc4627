// The backend table of csrc/attention_plan.h: each backend's refusals, the choice, the forced backend,
// and the op pyqkv::attention_plan (what pyqkv.ops.attention_plan returns).
#include "attention_plan.h"

#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <sstream>

namespace pyqkv {
namespace plan {
namespace {

using attn::Refusals;

std::string str(const std::string& s) { return s; }
std::string dtype_name(at::ScalarType t) { return c10::toString(t); }
bool half_type(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }
int sm(const DeviceInfo& d) { return 10 * d.major + d.minor; }
std::string sm_str(const DeviceInfo& d) { return "sm_" + std::to_string(sm(d)); }

// Shared by every CUDA backend: the device.
bool on_cuda(const Query& q, Refusals& why) {
  if (!q.device.cuda) why.add([] { return str("runs on CUDA tensors, q is on the CPU"); });
  return q.device.cuda;
}

void refuse_flash(const Query& q, Refusals& why) {
  if (!on_cuda(q, why)) return;
  const AttnDims& d = q.d;
  if (!kFlashWired) why.add([] { return str("not wired into pyqkv::attention yet (issue 12)"); });
  if (!q.torch.flash || !q.device.flash_in_build)
    why.add([] { return str("not in this torch build, or switched off (torch.backends.cuda.enable_flash_sdp)"); });
  if (sm(q.device) < 80 || sm(q.device) > 121)
    why.add([&] { return "needs sm_80 .. sm_121, the device is " + sm_str(q.device); });
  if (!half_type(q.dtype)) why.add([&] { return "takes float16 / bfloat16, got " + dtype_name(q.dtype); });
  if (d.Dh % 8 != 0 || d.Dh > 256)
    why.add([&] { return "needs Dh a multiple of 8 and at most 256, got " + std::to_string(d.Dh); });
  if (!q.qkv_unit_last)
    why.add([] { return str("needs q, k, v with unit stride over Dh"); });
  else if (!q.qkv_16b)
    why.add([] { return str("needs 16-byte aligned q, k, v data and strides (its 16-byte loads are not checked)"); });
  if (q.alibi) why.add([] { return str("ALiBi is compiled out of PyTorch's FlashAttention-2"); });
  if (d.softcap > 0) why.add([] { return str("softcap is compiled out of PyTorch's FlashAttention-2"); });
  if (d.mask == MaskKind::kPadding)
    why.add([] { return str("a 2-D padding mask needs the varlen path, not wired into pyqkv yet"); });
  if (d.mask == MaskKind::kBool4d || d.mask == MaskKind::kAdditive4d)
    why.add([] { return str("takes no 4-D mask (pass causal / window and a 2-D padding mask instead)"); });
  if (q.return_pattern)
    why.add([] { return str("the pattern from its lse is not wired into pyqkv yet (the own kernels write it)"); });
}

void refuse_mem_efficient(const Query& q, Refusals& why) {
  if (!on_cuda(q, why)) return;
  const AttnDims& d = q.d;
  why.add([] { return str("not wired into pyqkv::attention yet (issue 12)"); });
  if (!q.torch.mem_efficient)
    why.add(
        [] { return str("not in this torch build, or switched off (torch.backends.cuda.enable_mem_efficient_sdp)"); });
  if (!(half_type(q.dtype) || (q.dtype == at::kFloat && sm(q.device) >= 80)))
    why.add([&] {
      return "takes float16 / bfloat16, or float32 on sm_80+, got " + dtype_name(q.dtype) + " on " + sm_str(q.device);
    });
  const int64_t align = q.dtype == at::kFloat ? 4 : 8;
  if (d.Dh % align != 0)
    why.add([&] { return "needs Dh a multiple of " + std::to_string(align) + ", got " + std::to_string(d.Dh); });
  if (!q.qkv_16b) why.add([] { return str("needs 16-byte aligned q, k, v data and strides"); });
  if (d.H != d.Hkv && !q.torch.at_least(2, 14))
    why.add([&] {
      return "GQA (H=" + std::to_string(d.H) + ", Hkv=" + std::to_string(d.Hkv) + ") needs torch 2.14+, this is " +
             std::to_string(q.torch.major) + "." + std::to_string(q.torch.minor) + " (K/V would be repeated)";
    });
  if (d.softcap > 0) why.add([] { return str("has no softcap"); });
  if (q.return_pattern) why.add([] { return str("does not return the pattern"); });
}

void refuse_cudnn(const Query& q, Refusals& why) {
  if (!on_cuda(q, why)) return;
  const AttnDims& d = q.d;
  why.add([] { return str("not wired into pyqkv::attention yet (issue 12)"); });
  if (!q.torch.cudnn_opt_in)
    why.add([] { return str("opt-in only (PYQKV_CUDNN=1): top-left causal, a graph build per new shape"); });
  if (!q.torch.cudnn)
    why.add([] { return str("not in this torch build, or switched off (torch.backends.cuda.enable_cudnn_sdp)"); });
  if (sm(q.device) < 80) why.add([&] { return "needs sm_80+, the device is " + sm_str(q.device); });
  if (!half_type(q.dtype)) why.add([&] { return "takes float16 / bfloat16, got " + dtype_name(q.dtype); });
  const int64_t max_dh = sm(q.device) == 90 ? 256 : 128;
  if (d.Dh % 8 != 0 || d.Dh > max_dh)
    why.add([&] {
      return "needs Dh a multiple of 8 and at most " + std::to_string(max_dh) + ", got " + std::to_string(d.Dh);
    });
  if (q.causal && d.S != d.K)
    why.add([&] {
      return "its causal mask is top-left aligned: S == K only, got S=" + std::to_string(d.S) +
             ", K=" + std::to_string(d.K);
    });
  if (d.K == 1) why.add([] { return str("cuDNN does not support K = 1"); });
  if (d.mask == MaskKind::kAdditive4d && !q.mask_in_q_dtype && !q.torch.at_least(2, 14))
    why.add([] { return str("an additive mask must have q's dtype on torch <= 2.13 (another is misread)"); });
  if (q.alibi) why.add([] { return str("ALiBi is not exposed by PyTorch's cuDNN op"); });
  if (d.window > 0) why.add([] { return str("a sliding window is not exposed by PyTorch's cuDNN op"); });
  if (d.softcap > 0) why.add([] { return str("has no softcap"); });
  if (q.return_pattern) why.add([] { return str("does not return the pattern"); });
}

}  // namespace

void refusals(Backend b, const Query& q, Refusals& why) {
  switch (b) {
    case Backend::kFlash:
      refuse_flash(q, why);
      return;
    case Backend::kMemEfficient:
      refuse_mem_efficient(q, why);
      return;
    case Backend::kCudnn:
      refuse_cudnn(q, why);
      return;
    case Backend::kOwnDecode:
      if (on_cuda(q, why)) attn::plan_decode(q.own, why);
      return;
    case Backend::kOwnTc:
      if (on_cuda(q, why)) attn::plan_tc(q.own, why);
      return;
    case Backend::kOwnSimt:
      if (on_cuda(q, why)) {
        size_t smem = 0;
        attn::plan_simt(q.own, why, &smem);
      }
      return;
    case Backend::kCpu:
      if (q.device.cuda) why.add([] { return str("runs on CPU tensors, q is on a CUDA device"); });
      return;
  }
}

Choice choose(const Query& q, const std::string& forced, bool collect) {
  Choice c;
  c.forced = !forced.empty();
  for (Backend b : kPriority) {
    if (c.forced && forced != backend_name(b)) continue;
    std::vector<std::string> reasons;
    Refusals why{collect ? &reasons : nullptr};
    refusals(b, q, why);
    if (!why.any && !c.found) {
      c.found = true;
      c.backend = b;
      if (!collect) return c;
    }
    if (why.any && collect) c.refused.emplace_back(backend_name(b), std::move(reasons));
  }
  return c;
}

namespace {
// The forced backend: set by pyqkv.ops.attention_backend(...) (wins), else PYQKV_ATTENTION_BACKEND, read
// once per process (the first attention call). Every op call asks, so the common case (nothing forced)
// is one relaxed atomic load: no lock, no environment look-up.
std::mutex g_forced_mutex;
std::string g_forced;
std::atomic<bool> g_override_set{false};

const std::string& environment_backend() {
  static const std::string name = [] {
    const char* env = std::getenv("PYQKV_ATTENTION_BACKEND");
    return std::string(env == nullptr ? "" : env);
  }();
  return name;
}

void check_backend_name(const std::string& name, const char* what) {
  if (name.empty()) return;
  std::string names;
  for (Backend b : kPriority) {
    if (name == backend_name(b)) return;
    names += std::string(names.empty() ? "" : ", ") + backend_name(b);
  }
  TORCH_CHECK_VALUE(false, what, ": expected one of ", names, ", got '", name, "'");
}
}  // namespace

std::string forced_backend() {
  if (g_override_set.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(g_forced_mutex);
    if (!g_forced.empty()) return g_forced;
  }
  const std::string& name = environment_backend();
  if (name.empty()) return name;
  check_backend_name(name, "PYQKV_ATTENTION_BACKEND");
  return name;
}

Backend choose_or_throw(const Query& q) {
  const std::string forced = forced_backend();
  Choice c = choose(q, forced, /*collect=*/false);
  if (c.found) return c.backend;
  c = choose(q, forced, /*collect=*/true);
  std::ostringstream msg;
  const AttnDims& d = q.d;
  msg << "attention: ";
  if (c.forced) {
    msg << "the forced backend '" << forced << "' (pyqkv.ops.attention_backend / PYQKV_ATTENTION_BACKEND) refuses";
  } else {
    msg << "no backend accepts";
  }
  msg << " q [B, S, H, Dh] = [" << d.B << ", " << d.S << ", " << d.H << ", " << d.Dh << "] " << q.dtype
      << " with K=" << d.K << ", Hkv=" << d.Hkv << ":";
  for (const auto& [name, reasons] : c.refused) {
    msg << "\n  " << name << ": ";
    for (size_t i = 0; i < reasons.size(); ++i) msg << (i ? "; " : "") << reasons[i];
  }
  TORCH_CHECK_VALUE(false, msg.str());
  return Backend::kCpu;  // not reached
}

TorchBuild this_torch_build() {
  TorchBuild t;
  t.major = TORCH_VERSION_MAJOR;
  t.minor = TORCH_VERSION_MINOR;
  const auto& ctx = at::globalContext();
  t.flash = ctx.userEnabledFlashSDP();
  t.mem_efficient = ctx.userEnabledMemEfficientSDP();
  t.cudnn = ctx.userEnabledCuDNNSDP();
  static const bool cudnn_opt_in = [] {  // read once per process, like PYQKV_ATTENTION_BACKEND
    const char* env = std::getenv("PYQKV_CUDNN");
    return env != nullptr && std::string(env) == "1";
  }();
  t.cudnn_opt_in = cudnn_opt_in;
  return t;
}

namespace {
CudaDeviceInfoFn g_cuda_device_info = nullptr;
}

void set_cuda_device_info(CudaDeviceInfoFn fn) { g_cuda_device_info = fn; }

DeviceInfo cuda_device_info(int device_index) {
  TORCH_CHECK(g_cuda_device_info != nullptr, "pyqkv: internal: a CUDA tensor, but no CUDA device information");
  return g_cuda_device_info(device_index);
}

namespace {

// pyqkv.ops.attention_plan: the backend pyqkv::attention would run ("" when none accepts) and every
// refusing backend's reasons, as "name\treason" lines.
std::tuple<std::string, std::vector<std::string>> attention_plan_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask, double scale,
    bool causal, bool return_pattern, const c10::optional<at::Tensor>& alibi, c10::optional<double> softcap,
    c10::optional<int64_t> window, at::OptionalIntArrayRef device_capability, at::OptionalIntArrayRef torch_version,
    c10::optional<bool> flash_available) {
  (void)scale;
  const AttnDims d = check_attention(q, k, v, mask, alibi, causal, softcap, window);
  DeviceInfo device;
  if (device_capability.has_value()) {
    TORCH_CHECK_VALUE(device_capability->size() == 2, "device_capability: expected (major, minor), got ",
                      device_capability->size(), " numbers");
    device =
        device_for_capability(static_cast<int>((*device_capability)[0]), static_cast<int>((*device_capability)[1]));
  } else if (q.is_cuda()) {
    device = cuda_device_info(q.device().index());
  } else {
    TORCH_CHECK_VALUE(!q.is_meta(), "device_capability: expected (major, minor) to plan for meta tensors, got None");
  }
  TorchBuild torch = this_torch_build();
  if (torch_version.has_value()) {
    TORCH_CHECK_VALUE(torch_version->size() == 2, "torch_version: expected (major, minor), got ", torch_version->size(),
                      " numbers");
    torch.major = static_cast<int>((*torch_version)[0]);
    torch.minor = static_cast<int>((*torch_version)[1]);
  }
  if (flash_available.has_value()) torch.flash = *flash_available;
  const std::string forced = forced_backend();
  if (forced == "cudnn") torch.cudnn_opt_in = true;
  const Query query = make_query(q, k, v, mask, d, causal, return_pattern, alibi.has_value(), device, torch);
  const Choice c = choose(query, forced, /*collect=*/true);
  std::vector<std::string> lines;
  for (const auto& [name, reasons] : c.refused)
    for (const auto& r : reasons) lines.push_back(name + "\t" + r);
  return {c.found ? backend_name(c.backend) : "", lines};
}

// pyqkv.ops.attention_backend: sets (or, with "", clears) the forced backend; returns the previous one.
std::string set_attention_backend_op(const std::string& name) {
  check_backend_name(name, "backend");
  std::lock_guard<std::mutex> lock(g_forced_mutex);
  std::string previous = g_forced;
  g_forced = name;
  g_override_set.store(!name.empty(), std::memory_order_release);
  return previous;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CompositeImplicitAutograd, m) {
  m.impl("attention_plan", &attention_plan_op);
  m.impl("_set_attention_backend", &set_attention_backend_op);
}

}  // namespace plan
}  // namespace pyqkv
