// The CUDA attention and rotary ops on CPU threads (emu_runtime.h): the same host preparation and plan
// (csrc/cuda/attention_host.cuh, attention_plan.cuh; rotary.cuh's make_params) and the same kernels
// (csrc/cuda/attention_*.cuh, rotary.cuh), compiled by g++ against stand-in CUDA headers (shim/). Only
// the launches differ: CTAs run one after another, each with its threads as coroutines. Built and
// driven by tools/cuda_emulate/run.py.
#include <ATen/OpMathType.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <tuple>

#include "attention_decode.cuh"
#include "attention_host.cuh"
#include "attention_simt.cuh"
#include "attention_tc.cuh"
#include "rotary.cuh"

namespace pyqkv {
namespace attn {
// The kernels' `extern __shared__` arrays: one CTA runs at a time, so one buffer each is enough.
constexpr size_t kSmemBytes = 256 * 1024;
alignas(128) unsigned char smem_raw[kSmemBytes];
alignas(128) unsigned char smem[kSmemBytes];
}  // namespace attn
}  // namespace pyqkv

namespace {

using namespace pyqkv::attn;

// An output buffer with NaN guard zones on both sides: an entry the kernels never write stays NaN
// (the comparison with the reference catches it), a write out of bounds changes a guard.
struct Guarded {
  static constexpr int64_t kGuard = 4096;
  at::Tensor buf, out;
  explicit Guarded(const at::Tensor& out_) : out(out_) {
    buf = at::full({out.numel() + 2 * kGuard}, std::numeric_limits<double>::quiet_NaN(), out.options());
  }
  void* ptr() { return static_cast<char*>(buf.data_ptr()) + kGuard * buf.element_size(); }
  void finish(const char* name) {
    const int64_t n = out.numel();
    TORCH_CHECK(buf.narrow(0, 0, kGuard).isnan().all().item<bool>() &&
                    buf.narrow(0, kGuard + n, kGuard).isnan().all().item<bool>(),
                "emulate: write out of bounds of ", name);
    if (n > 0) out.view({-1}).copy_(buf.narrow(0, kGuard, n));
  }
};

void run_grid(int64_t blocks, int threads, unsigned char* smem_buf, size_t smem_bytes,
              const std::function<void()>& body, emu::Order order, uint64_t seed, const char* kernel) {
  TORCH_CHECK(smem_bytes <= kSmemBytes, "emulate: ", kernel, " wants ", smem_bytes, " bytes of shared memory");
  gridDim.x = static_cast<unsigned>(blocks);
  gridDim.y = gridDim.z = 1;
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    std::memset(smem_buf, 0xFF, kSmemBytes);  // NaN in every float type: reads of unwritten data show
    emu::run_cta(body, threads, order, seed + static_cast<uint64_t>(b));
    for (size_t i = smem_bytes; i < kSmemBytes; ++i)
      TORCH_CHECK(smem_buf[i] == 0xFF, "emulate: ", kernel, " wrote shared memory byte ", i, " past its ", smem_bytes,
                  " bytes (block ", b, ")");
  }
}

// Flash-Decoding partials (guarded, as every output) and the combine step that merges them, for the
// CUDA-core and decode kernels alike; nothing when the plan has one key slice.
template <typename acc_t>
struct SplitWorkspace {
  int n_splits;
  Guarded go, gml;
  acc_t* o = nullptr;
  acc_t* ml = nullptr;
  SplitWorkspace(const Params& p, int n_splits_, const at::TensorOptions& opts)
      : n_splits(n_splits_),
        go(at::empty({n_splits_ > 1 ? p.B * p.H * p.S * n_splits_ * p.Dh : 0},
                     opts.dtype(c10::CppTypeToScalarType<acc_t>::value))),
        gml(at::empty({n_splits_ > 1 ? p.B * p.H * p.S * n_splits_ * 2 : 0},
                      opts.dtype(c10::CppTypeToScalarType<acc_t>::value))) {
    if (n_splits > 1) {
      o = static_cast<acc_t*>(go.ptr());
      ml = static_cast<acc_t*>(gml.ptr());
    }
  }
  template <typename scalar_t>
  void combine(const Params& p, emu::Order ord, uint64_t sd) {
    if (n_splits <= 1) return;
    run_grid(p.B * p.H * p.S, kSimtThreads, smem_raw, kCombineSmemEntries * sizeof(acc_t),
             [&] { combine_splits_kernel<scalar_t, acc_t>(p, n_splits, o, ml); }, ord, sd, "combine_splits_kernel");
    go.finish("the split workspace");
    gml.finish("the split statistics");
  }
};

std::string describe(const Plan& plan) {
  if (plan.tensor_cores)
    return "tensor-core bk=" + std::to_string(plan.tc.bk) + " dhp=" + std::to_string(plan.tc.dhp) +
           " vec(q,k,v)=" + std::to_string(plan.tc.q_vec) + std::to_string(plan.tc.k_vec) +
           std::to_string(plan.tc.v_vec) + " smem=" + std::to_string(plan.smem);
  if (plan.decode)
    return "decode rows=" + std::to_string(plan.dec.rows) + " rmax=" + std::to_string(plan.dec.rmax) +
           " lanes=" + std::to_string(plan.dec.lanes) + " splits=" + std::to_string(plan.dec.n_splits) +
           " keys/split=" + std::to_string(plan.dec.keys_per_split) + " smem=" + std::to_string(plan.smem);
  const SimtTiling& t = plan.simt;
  return "cuda-core nh=" + std::to_string(t.nh) + " nq=" + std::to_string(t.nq) + " bk=" + std::to_string(t.bk) +
         " splits=" + std::to_string(t.n_splits) + " keys/split=" + std::to_string(t.keys_per_split) +
         " smem=" + std::to_string(plan.smem);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::string> emulate_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
    double scale, bool causal, bool return_pattern, const c10::optional<at::Tensor>& alibi,
    c10::optional<double> softcap, c10::optional<int64_t> window, int64_t sm_major, int64_t max_smem,
    int64_t n_sms, int64_t order, int64_t seed) {
  Prepared r = prepare_attention(q, k, v, mask, scale, causal, return_pattern, alibi, softcap, window);
  if (r.done) return {r.z, r.lse, r.pattern, "early exit"};
  pyqkv::plan::DeviceInfo device;
  device.cuda = true;
  device.major = static_cast<int>(sm_major);
  device.max_smem = max_smem;
  device.n_sms = static_cast<int>(n_sms);
  const pyqkv::plan::Query query = pyqkv::plan::make_query(q, k, v, mask, r.d, causal, return_pattern,
                                                           alibi.has_value(), device, pyqkv::plan::TorchBuild{});
  const Plan plan = plan_attention(query.own);  // the own kernels only: these are what is emulated
  TORCH_CHECK_VALUE(plan.error.empty(), "q: ", plan.error, " in ", q.scalar_type());
  Params p = r.p;
  Guarded gz(r.z), glse(r.lse), gpat(r.pattern);
  p.z = gz.ptr();
  p.lse = glse.ptr();
  p.pattern = return_pattern ? gpat.ptr() : nullptr;
  const auto ord = static_cast<emu::Order>(order);
  const uint64_t sd = static_cast<uint64_t>(seed);

  if (plan.tensor_cores) {
    TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "emulate: tensor-core plan for ",
                q.scalar_type());
    const int64_t blocks = static_cast<int64_t>(plan.tc.n_qt) * p.H * p.B;
    if (q.scalar_type() == at::kHalf) {
      run_grid(blocks, kTcThreads, smem, plan.smem, [&] { attention_tc_kernel<__half>(p, plan.tc); }, ord, sd,
               "attention_tc_kernel");
    } else {
      run_grid(blocks, kTcThreads, smem, plan.smem, [&] { attention_tc_kernel<__nv_bfloat16>(p, plan.tc); }, ord, sd,
               "attention_tc_kernel");
    }
  } else if (plan.decode) {
    TORCH_CHECK(q.scalar_type() != at::kDouble, "emulate: decode plan for float64");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "emulate_decode", [&] {
      if constexpr (sizeof(scalar_t) <= 4) {
        const DecodeTiling& t = plan.dec;
        const int64_t blocks = p.B * p.Hkv * t.n_splits;
        SplitWorkspace<float> ws(p, t.n_splits, q.options());
        auto run = [&](auto kernel) {
          run_grid(blocks, kDecodeThreads, smem_raw, plan.smem, [&] { kernel(p, t, ws.o, ws.ml); }, ord, sd,
                   "attention_decode_kernel");
        };
        switch (t.rmax) {
          case 1: run(attention_decode_kernel<scalar_t, 1>); break;
          case 2: run(attention_decode_kernel<scalar_t, 2>); break;
          case 4: run(attention_decode_kernel<scalar_t, 4>); break;
          default: run(attention_decode_kernel<scalar_t, 8>); break;
        }
        ws.template combine<scalar_t>(p, ord, sd);
      }
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "emulate_attention", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const SimtTiling& t = plan.simt;
      const int64_t blocks = p.B * (p.H / t.nh) * t.n_qt * t.n_splits;
      SplitWorkspace<acc_t> ws(p, t.n_splits, q.options());
      run_grid(blocks, kSimtThreads, smem_raw, plan.smem,
               [&] { attention_simt_kernel<scalar_t, acc_t>(p, t, ws.o, ws.ml); }, ord, sd, "attention_simt_kernel");
      ws.template combine<scalar_t>(p, ord, sd);
    });
  }
  gz.finish("z");
  glse.finish("lse");
  if (return_pattern) gpat.finish("pattern");
  return {r.z, r.lse, r.pattern, describe(plan)};
}

// rotary as rotary.cu runs it, with the grid capped at max_blocks CTAs (fewer than the elements need
// exercises the kernel's grid-stride loop, and keeps the emulation fast).
std::tuple<at::Tensor, std::string> emulate_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                                   bool interleaved, int64_t max_blocks, int64_t order, int64_t seed) {
  const pyqkv::RotaryDims d = pyqkv::check_rotary(x, cos, sin);
  at::Tensor out = at::empty({d.B, d.S, d.n, d.Dh}, x.options());
  if (out.numel() == 0) return {out, "early exit"};
  const at::Tensor c = pyqkv::rotary_table(cos, x), s = pyqkv::rotary_table(sin, x);
  pyqkv::rope::Params p = pyqkv::rope::make_params(x, c, s, out, d, interleaved);
  Guarded gout(out);
  p.out = gout.ptr();
  const int64_t blocks = pyqkv::rope::grid_blocks(p.total, max_blocks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "emulate_rotary", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    run_grid(blocks, pyqkv::rope::kThreads, smem_raw, 0, [&] { pyqkv::rope::rotary_kernel<scalar_t, acc_t>(p); },
             static_cast<emu::Order>(order), static_cast<uint64_t>(seed), "rotary_kernel");
  });
  gout.finish("out");
  return {out, std::to_string(blocks) + " CTAs x " + std::to_string(pyqkv::rope::kThreads) + " threads for " +
                   std::to_string(p.total) + " elements"};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention", &emulate_attention,
        "pyqkv's CUDA attention kernels run on CPU threads: (q, k, v, mask, scale, causal, return_pattern, "
        "alibi, softcap, window, sm_major, max_smem, n_sms, order 0/1/2 = forward/reverse/shuffled, seed) "
        "-> (z, lse, pattern, plan)");
  m.def("rotary", &emulate_rotary,
        "pyqkv's CUDA rotary kernel run on CPU threads: (x, cos, sin, interleaved, max_blocks, order, seed) "
        "-> (out, launch)");
}
