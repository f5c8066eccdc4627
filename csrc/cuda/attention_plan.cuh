// Kernel choice and tiling for the CUDA attention op, as plain host C++ (no CUDA headers): the host
// function in attention.cu runs it, and so does scripts/cuda_emulate, which checks the kernels' logic on
// a machine without a GPU. (.cuh like the other kernel headers, so that the Makefile rebuilds on a change.)
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#ifdef __CUDACC__
#define PYQKV_HOST_DEVICE __host__ __device__
#else
#define PYQKV_HOST_DEVICE
#endif

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
constexpr int kDecodeUnroll = 4;        // keys per lane group in flight at once
constexpr int64_t kDecodeMaxRows = 8;   // query rows of one KV head (H / Hkv * S) held in registers
// Memory-bound: enough CTAs to keep every SM's loads in flight.
constexpr int64_t kDecodeCtasPerSm = 4;

struct DecodeTiling {
  int rows;                // R = H / Hkv * S
  int rmax;                // R rounded up to 1, 2, 4 or 8 (the kernel's register arrays)
  int lanes;               // lanes per key: Dh / (16 bytes of elements), rounded up to a power of two
  int n_splits;            // key slices (Flash-Decoding); 1 = the kernel writes z and lse itself
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

struct Plan {
  bool tensor_cores = false;
  bool decode = false;
  TcTiling tc{};
  DecodeTiling dec{};
  SimtTiling simt{};
  size_t smem = 0;     // dynamic shared memory of the main kernel
  std::string error;   // non-empty: no kernel fits (Dh too large for shared memory)
};

struct PlanInputs {
  int64_t B, S, H, Hkv, Dh, K;
  bool half_type;          // float16 / bfloat16
  size_t acc_bytes;        // 4 (float32 accumulation) or 8 (float64)
  bool return_pattern;
  int sm_major;            // compute capability of the device
  size_t max_smem;         // opt-in shared memory per block
  int n_sms;
  bool q_vec, k_vec, v_vec;
  int elem_bytes;           // of q, k, v
  bool kv_rows16;           // k and v rows can be read 16 bytes at a time (any 2- or 4-byte dtype)
};

// The decode kernel's tiling, or rows = 0 when it does not apply: no pattern (its second pass lives in
// the CUDA-core kernel), float32 accumulation, rows of 16-byte loads, a decode shape with at most
// kDecodeMaxRows rows per KV head, Dh at most 32 loads wide.
inline DecodeTiling plan_decode(const PlanInputs& in) {
  DecodeTiling t{};
  const int64_t G = in.H / in.Hkv, R = G * in.S;
  if (in.return_pattern || in.acc_bytes != 4 || !in.kv_rows16 || in.S >= kTcMinQueries || R > kDecodeMaxRows)
    return t;
  const int64_t chunks = in.Dh / (16 / in.elem_bytes);
  if (chunks < 1 || chunks > 32) return t;
  int lanes = 1;
  while (lanes < chunks) lanes *= 2;
  int rmax = 1;
  while (rmax < R) rmax *= 2;
  const int64_t n_groups = (kDecodeThreads / 32) * (32 / lanes);
  if (decode_smem_bytes(n_groups, rmax, in.Dh) > in.max_smem) return t;
  t.rows = static_cast<int>(R);
  t.rmax = rmax;
  t.lanes = lanes;
  t.n_splits = 1;
  t.keys_per_split = in.K;
  const int64_t base_blocks = in.B * in.Hkv;
  const int64_t want = std::min({ceil_div(kDecodeCtasPerSm * in.n_sms, base_blocks), ceil_div(in.K, kMinKeysPerSplit),
                                 kMaxSplits});
  if (want > 1) {
    t.keys_per_split = ceil_div(ceil_div(in.K, want), 64) * 64;
    t.n_splits = static_cast<int>(ceil_div(in.K, t.keys_per_split));
  }
  return t;
}

inline Plan plan_attention(const PlanInputs& in) {
  Plan plan;
  const int64_t G = in.H / in.Hkv;
  const DecodeTiling dec = plan_decode(in);
  if (dec.rows > 0) {
    plan.decode = true;
    plan.dec = dec;
    plan.smem = decode_smem_bytes((kDecodeThreads / 32) * (32 / dec.lanes), dec.rmax, in.Dh);
    return plan;
  }
  const bool decode_shape = in.S < kTcMinQueries && G * in.S <= kMaxGroupRows;
  if (in.half_type && in.sm_major >= 8 && in.Dh <= kTcMaxHeadDim && !decode_shape) {
    TcTiling t{};
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
    if (t.bk > 0) {
      plan.tensor_cores = true;
      plan.tc = t;
      plan.smem = tc_layout(t.bk, t.dhp).total;
      return plan;
    }  // else: a GPU with little shared memory; the CUDA-core kernel takes it
  }

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
        plan.smem = bytes;
        break;
      }
    }
    if (t.bk > 0) break;
  }
  if (t.bk == 0) {
    plan.error = "head dim Dh=" + std::to_string(in.Dh) + " is too large for the CUDA attention kernel (" +
                 std::to_string(simt_smem_bytes(1, 8, in.Dh, in.acc_bytes)) + " bytes of shared memory needed, " +
                 std::to_string(in.max_smem) + " available)";
    return plan;
  }
  t.n_qt = static_cast<int>(ceil_div(in.S, t.nq));
  t.n_splits = 1;
  t.keys_per_split = ceil_div(in.K, t.bk) * t.bk;
  const int64_t base_blocks = in.B * (in.H / t.nh) * t.n_qt;
  // Flash-Decoding: too few CTAs for the GPU and many keys -> split the keys. Not with a pattern
  // request: the pattern pass needs the row's final lse inside the CTA.
  if (!in.return_pattern && base_blocks < 2 * static_cast<int64_t>(in.n_sms)) {
    const int64_t want =
        std::min({ceil_div(2 * static_cast<int64_t>(in.n_sms), base_blocks), ceil_div(in.K, kMinKeysPerSplit), kMaxSplits});
    if (want > 1) {
      t.keys_per_split = ceil_div(ceil_div(in.K, want), t.bk) * t.bk;
      t.n_splits = static_cast<int>(ceil_div(in.K, t.keys_per_split));
    }
  }
  plan.simt = t;
  return plan;
}

}  // namespace attn
}  // namespace pyqkv
