// Tiling of pyqkv's own CUDA attention kernels, and why each refuses a shape, as plain host C++ (no CUDA
// headers): the backend table (csrc/attention_plan.h, compiled in the CPU build too) asks it which own
// kernel takes an input, attention.cu launches the tiling, and tools/cuda_emulate runs the same kernels
// from it on a machine without a GPU. (.cuh like the other kernel headers, so that the Makefile rebuilds
// on a change.)
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../host_device.h"

namespace pyqkv {
namespace attn {

// --- tensor-core kernel (attention_tc.cuh) ---
constexpr int kTcRows = 64;  // query rows per CTA: 4 warps x one 16-row WMMA block
constexpr int kTcThreads = 128;
constexpr int64_t kTcMaxHeadDim = 256;  // O [64][Dh] float32 plus Q/K/V tiles must fit shared memory

struct TcTiling {
  int bk;                    // keys per tile, a multiple of 16
  int dhp;                   // Dh rounded up to 16
  int n_qt;                  // ceil(S / 64)
  bool q_vec, k_vec, v_vec;  // rows are 16-byte aligned with unit stride: load 8 elements at a time
};

struct TcLayout {
  size_t q, k, v, s, pm, o, stats, total;  // byte offsets into dynamic shared memory
};

PYQKV_HOST_DEVICE inline size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// Row pitches are padded by 16 bytes (8 half / 4 float elements) so that WMMA row loads do not hit the
// same banks; buffers start at 128-byte boundaries so every WMMA pointer is 32-byte aligned.
PYQKV_HOST_DEVICE inline TcLayout tc_layout(int bk, int dhp) {
  const size_t ldh = dhp + 8, lds = bk + 4, ldp = bk + 8, ldo = dhp + 4;
  TcLayout l;
  l.q = 0;
  l.k = l.q + align128(kTcRows * ldh * 2);
  l.v = l.k + align128(bk * ldh * 2);
  l.s = l.v + align128(bk * ldh * 2);
  l.pm = l.s + align128(kTcRows * lds * 4);
  l.o = l.pm + align128(kTcRows * ldp * 2);
  l.stats = l.o + align128(kTcRows * ldo * 4);
  l.total = l.stats + align128(4 * kTcRows * 4);
  return l;
}

// --- CUDA-core kernel (attention_simt.cuh) ---
constexpr int kSimtThreads = 128;
// Query rows (heads x positions) of one KV group processed together in the decode layout: up to this
// many, all query heads of a KV head share one CTA and every K/V tile is read once for all of them.
constexpr int64_t kMaxGroupRows = 64;
// The tensor-core kernel takes prefill shapes; below this many query positions the decode layout wins
// (a 64-row tile would be mostly padding, and K/V would be read once per query head).
constexpr int64_t kTcMinQueries = 9;
// Flash-Decoding: split the keys until about two CTAs per SM run, each slice keeping at least this
// many keys so that the combine step stays cheap next to the slice's work.
constexpr int64_t kMinKeysPerSplit = 256;
constexpr int64_t kMaxSplits = 128;
// Shared-memory entries of the combine step's per-slice weights: every slice, plus room for reads past
// the last slice by the compiled unrolled loop (see combine_splits_kernel).
constexpr int64_t kCombineSmemEntries = kMaxSplits + 4;

// --- decode kernel (attention_decode.cuh): half types and float32, few query rows per KV head ---
constexpr int kDecodeThreads = 128;
constexpr int kDecodeUnroll = 4;       // keys per lane group in flight at once
constexpr int64_t kDecodeMaxRows = 8;  // query rows of one KV head (H / Hkv * S) held in registers
// Memory-bound: enough CTAs to keep every SM's loads in flight.
constexpr int64_t kDecodeCtasPerSm = 4;

struct DecodeTiling {
  int rows;      // R = H / Hkv * S
  int rmax;      // R rounded up to 1, 2, 4 or 8 (the kernel's register arrays)
  int lanes;     // lanes per key: Dh / (16 bytes of elements), rounded up to a power of two
  int n_splits;  // key slices (Flash-Decoding); 1 = the kernel writes z and lse itself
  int64_t keys_per_split;
};

// Shared memory of the decode kernel's final merge, in floats: per (lane group, row) the max, sum and
// merge weight, per row the merged max and sum, and per (lane group, row) the output vector [Dh].
inline size_t decode_smem_bytes(int64_t n_groups, int64_t rmax, int64_t Dh) {
  return static_cast<size_t>(n_groups * rmax * (3 + Dh) + 2 * rmax) * sizeof(float);
}

struct SimtTiling {
  int nh;                  // query heads per CTA: 1 or H / Hkv
  int nq;                  // query positions per CTA
  int bk;                  // keys per shared-memory tile
  int n_qt;                // ceil(S / nq)
  int n_splits;            // key slices; 1 = the kernel writes z, lse and the pattern itself
  int64_t keys_per_split;  // a multiple of bk
};

// Q [R][Dh], K [bk][Dh+1], V [bk][Dh], scores [R][bk], O [R][Dh], 3 row statistics [R].
inline size_t simt_smem_bytes(int64_t R, int64_t bk, int64_t Dh, size_t acc_bytes) {
  const int64_t elems = R * Dh * 2 + bk * (Dh + 1) + bk * Dh + R * bk + 3 * R;
  return static_cast<size_t>(elems) * acc_bytes;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Why a kernel refuses an input. The texts are built only when asked for (pyqkv.ops.attention_plan and
// the error when no backend fits), so the choice made on every call builds no strings.
struct Refusals {
  std::vector<std::string>* out = nullptr;
  bool any = false;
  template <typename Text>  // a callable returning std::string
  void add(Text&& text) {
    any = true;
    if (out != nullptr) out->push_back(std::forward<Text>(text)());
  }
};

struct Plan {
  bool tensor_cores = false;
  bool decode = false;
  TcTiling tc{};
  DecodeTiling dec{};
  SimtTiling simt{};
  size_t smem = 0;    // dynamic shared memory of the main kernel
  std::string error;  // non-empty: no kernel fits (Dh too large for shared memory)
};

struct PlanInputs {
  int64_t B, S, H, Hkv, Dh, K;
  bool half_type;    // float16 / bfloat16
  size_t acc_bytes;  // 4 (float32 accumulation) or 8 (float64)
  bool return_pattern;
  int sm_major;     // compute capability of the device
  size_t max_smem;  // opt-in shared memory per block
  int n_sms;
  bool q_vec, k_vec, v_vec;
  int elem_bytes;  // of q, k, v
  bool kv_rows16;  // k and v rows can be read 16 bytes at a time (any 2- or 4-byte dtype)
};

// The decode kernel's tiling, or rows = 0 when it does not apply: no pattern (its second pass lives in
// the CUDA-core kernel), float32 accumulation, rows of 16-byte loads, a decode shape with at most
// kDecodeMaxRows rows per KV head, Dh at most 32 loads wide.
inline DecodeTiling plan_decode(const PlanInputs& in, Refusals& why) {
  DecodeTiling t{};
  const int64_t G = in.H / in.Hkv, R = G * in.S;
  if (in.return_pattern) why.add([] { return std::string("the pattern is written by the CUDA-core kernel"); });
  if (in.acc_bytes != 4) why.add([] { return std::string("float64 (accumulates in float32 only)"); });
  if (!in.kv_rows16)
    why.add([] { return std::string("k/v rows are not 16-byte loadable (unit feature stride, aligned rows)"); });
  if (in.S >= kTcMinQueries || R > kDecodeMaxRows)
    why.add([&] {
      return "not a decode shape: S=" + std::to_string(in.S) + ", H/Hkv*S=" + std::to_string(R) + " rows (needs S < " +
             std::to_string(kTcMinQueries) + " and at most " + std::to_string(kDecodeMaxRows) + " rows per KV head)";
    });
  const int64_t chunks = in.Dh / (16 / std::max(1, in.elem_bytes));
  if (chunks < 1 || chunks > 32)
    why.add([&] { return "Dh=" + std::to_string(in.Dh) + " is not 1..32 loads of 16 bytes"; });
  if (why.any) return t;
  int lanes = 1;
  while (lanes < chunks) lanes *= 2;
  int rmax = 1;
  while (rmax < R) rmax *= 2;
  const int64_t n_groups = (kDecodeThreads / 32) * (32 / lanes);
  if (decode_smem_bytes(n_groups, rmax, in.Dh) > in.max_smem) {
    why.add([&] {
      return "needs " + std::to_string(decode_smem_bytes(n_groups, rmax, in.Dh)) + " bytes of shared memory";
    });
    return t;
  }
  t.rows = static_cast<int>(R);
  t.rmax = rmax;
  t.lanes = lanes;
  t.n_splits = 1;
  t.keys_per_split = in.K;
  const int64_t base_blocks = in.B * in.Hkv;
  const int64_t want =
      std::min({ceil_div(kDecodeCtasPerSm * in.n_sms, base_blocks), ceil_div(in.K, kMinKeysPerSplit), kMaxSplits});
  if (want > 1) {
    t.keys_per_split = ceil_div(ceil_div(in.K, want), 64) * 64;
    t.n_splits = static_cast<int>(ceil_div(in.K, t.keys_per_split));
  }
  return t;
}

// The tensor-core kernel's tiling, or bk = 0 when it does not apply.
inline TcTiling plan_tc(const PlanInputs& in, Refusals& why) {
  TcTiling t{};
  const int64_t G = in.H / in.Hkv;
  if (!in.half_type) why.add([] { return std::string("takes float16 / bfloat16 only"); });
  if (in.sm_major < 8) why.add([&] { return "needs sm_80+, the device is sm_" + std::to_string(in.sm_major) + "x"; });
  if (in.Dh > kTcMaxHeadDim)
    why.add([&] { return "Dh=" + std::to_string(in.Dh) + " > " + std::to_string(kTcMaxHeadDim); });
  if (in.S < kTcMinQueries && G * in.S <= kMaxGroupRows)
    why.add([&] { return "a decode shape (S=" + std::to_string(in.S) + " < " + std::to_string(kTcMinQueries) + ")"; });
  if (why.any) return t;
  t.dhp = static_cast<int>(ceil_div(in.Dh, 16) * 16);
  t.n_qt = static_cast<int>(ceil_div(in.S, kTcRows));
  t.q_vec = in.q_vec;
  t.k_vec = in.k_vec;
  t.v_vec = in.v_vec;
  for (int bk : {64, 32, 16}) {
    if (tc_layout(bk, t.dhp).total <= in.max_smem) {
      t.bk = bk;
      break;
    }
  }
  if (t.bk == 0)
    why.add([&] { return "needs " + std::to_string(tc_layout(16, t.dhp).total) + " bytes of shared memory"; });
  return t;
}

// The CUDA-core kernel's tiling (and its bytes of shared memory), or bk = 0 when even its smallest tile
// does not fit the device's shared memory.
inline SimtTiling plan_simt(const PlanInputs& in, Refusals& why, size_t* smem) {
  const int64_t G = in.H / in.Hkv;
  // Candidate (heads per CTA, positions per CTA), best first: the decode layout (all heads of a KV
  // group), then prefill tiles of shrinking height (large Dh in float64 needs small tiles).
  SimtTiling t{};
  const int64_t shapes[][2] = {{G, in.S}, {1, 32}, {1, 16}, {1, 8}, {1, 4}, {1, 2}, {1, 1}};
  for (const auto& shape : shapes) {
    const int64_t nh = shape[0], nq = std::min(shape[1], in.S);
    if (nh * nq > kMaxGroupRows) continue;
    for (int bk : {32, 16, 8}) {
      const size_t bytes = simt_smem_bytes(nh * nq, bk, in.Dh, in.acc_bytes);
      if (bytes <= in.max_smem) {
        t.nh = static_cast<int>(nh);
        t.nq = static_cast<int>(nq);
        t.bk = bk;
        *smem = bytes;
        break;
      }
    }
    if (t.bk > 0) break;
  }
  if (t.bk == 0) {
    why.add([&] {
      return "head dim Dh=" + std::to_string(in.Dh) + " is too large (" +
             std::to_string(simt_smem_bytes(1, 8, in.Dh, in.acc_bytes)) + " bytes of shared memory needed, " +
             std::to_string(in.max_smem) + " available)";
    });
    return t;
  }
  t.n_qt = static_cast<int>(ceil_div(in.S, t.nq));
  t.n_splits = 1;
  t.keys_per_split = ceil_div(in.K, t.bk) * t.bk;
  const int64_t base_blocks = in.B * (in.H / t.nh) * t.n_qt;
  // Flash-Decoding: too few CTAs for the GPU and many keys -> split the keys. Not with a pattern
  // request: the pattern pass needs the row's final lse inside the CTA.
  if (!in.return_pattern && base_blocks < 2 * static_cast<int64_t>(in.n_sms)) {
    const int64_t want = std::min(
        {ceil_div(2 * static_cast<int64_t>(in.n_sms), base_blocks), ceil_div(in.K, kMinKeysPerSplit), kMaxSplits});
    if (want > 1) {
      t.keys_per_split = ceil_div(ceil_div(in.K, want), t.bk) * t.bk;
      t.n_splits = static_cast<int>(ceil_div(in.K, t.keys_per_split));
    }
  }
  return t;
}

enum class OwnKernel { kDecode, kTensorCores, kCudaCores };

// The launch plan of one own kernel (the backend table chose it, so it accepts the input), or the first
// own kernel that accepts when none is given (the CPU emulator's choice, the same order as the table).
inline Plan plan_own(const PlanInputs& in, OwnKernel kind) {
  Plan plan;
  Refusals why;
  if (kind == OwnKernel::kDecode) {
    plan.dec = plan_decode(in, why);
    plan.decode = plan.dec.rows > 0;
    if (plan.decode) plan.smem = decode_smem_bytes((kDecodeThreads / 32) * (32 / plan.dec.lanes), plan.dec.rmax, in.Dh);
  } else if (kind == OwnKernel::kTensorCores) {
    plan.tc = plan_tc(in, why);
    plan.tensor_cores = plan.tc.bk > 0;
    if (plan.tensor_cores) plan.smem = tc_layout(plan.tc.bk, plan.tc.dhp).total;
  } else {
    plan.simt = plan_simt(in, why, &plan.smem);
  }
  if (why.any) plan.error = "pyqkv: internal: the chosen own kernel refuses the input";
  return plan;
}

inline Plan plan_attention(const PlanInputs& in) {
  Refusals why;
  if (plan_decode(in, why).rows > 0) return plan_own(in, OwnKernel::kDecode);
  Refusals why_tc;
  if (plan_tc(in, why_tc).bk > 0) return plan_own(in, OwnKernel::kTensorCores);
  std::vector<std::string> reasons;
  Refusals why_simt{&reasons};
  size_t smem = 0;
  plan_simt(in, why_simt, &smem);
  if (!why_simt.any) return plan_own(in, OwnKernel::kCudaCores);
  Plan plan;
  plan.error = reasons.front();
  return plan;
}

}  // namespace attn
}  // namespace pyqkv
