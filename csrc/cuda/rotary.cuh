// The rotary (RoPE) kernel: one thread per output element, grid-stride, on any strides of x. rotary.cu
// launches it; tools/cuda_emulate runs the same kernel on CPU threads where no GPU exists.
//
// Each output feature d < R reads x[d] and its rotation partner (d ^ 1 for rotate-every-two, d +- R/2 for
// rotate-half) and the tables at d: out[d] = x[d] * cos[d] -+ x[partner] * sin[d], in the accumulation
// dtype with explicitly rounded products (no FMA contraction), so the result is the CPU op's bit for bit.
// Features d >= R are copied. The op is memory-bound: one read of x per element (the partner read hits
// the same cache lines), the small tables stay in L2.
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../rotary.h"

namespace pyqkv {
namespace rope {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 18;  // beyond this the grid-stride loop takes over

// Strides in elements, any value (x is usually a view into the fused projection; a table broadcast
// over the batch has stride 0 there).
struct Params {
  const void* x;  // [B, S, n, Dh], x's dtype
  int64_t x_sb, x_ss, x_sn, x_sd;
  const void* cos;  // [B|1, S, R], accumulation dtype
  int64_t c_sb, c_ss, c_sr;
  const void* sin;
  int64_t s_sb, s_ss, s_sr;
  void* out;  // [B, S, n, Dh] contiguous, x's dtype
  int64_t S, n, Dh, R, total;
  bool interleaved;
};

// cos_acc / sin_acc: the tables in the accumulation dtype (rotary_table in rotary.h).
inline Params make_params(const at::Tensor& x, const at::Tensor& cos_acc, const at::Tensor& sin_acc,
                          const at::Tensor& out, const RotaryDims& d, bool interleaved) {
  Params p{};
  p.x = x.data_ptr();
  p.x_sb = x.stride(0), p.x_ss = x.stride(1), p.x_sn = x.stride(2), p.x_sd = x.stride(3);
  p.cos = cos_acc.data_ptr();
  p.c_sb = cos_acc.size(0) == 1 ? 0 : cos_acc.stride(0), p.c_ss = cos_acc.stride(1), p.c_sr = cos_acc.stride(2);
  p.sin = sin_acc.data_ptr();
  p.s_sb = sin_acc.size(0) == 1 ? 0 : sin_acc.stride(0), p.s_ss = sin_acc.stride(1), p.s_sr = sin_acc.stride(2);
  p.out = out.data_ptr();
  p.S = d.S, p.n = d.n, p.Dh = d.Dh, p.R = d.R;
  p.total = d.B * d.S * d.n * d.Dh;
  p.interleaved = interleaved;
  return p;
}

inline int64_t grid_blocks(int64_t total, int64_t max_blocks) {
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
}

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const __grid_constant__ Params p) {
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const acc_t* cos_t = static_cast<const acc_t*>(p.cos);
  const acc_t* sin_t = static_cast<const acc_t*>(p.sin);
  scalar_t* out = static_cast<scalar_t*>(p.out);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < p.total; e += step) {
    const int64_t d = e % p.Dh;
    int64_t row = e / p.Dh;  // (b * S + t) * n + h
    const int64_t h = row % p.n;
    row /= p.n;
    const int64_t t = row % p.S, b = row / p.S;
    const scalar_t* xr = x + b * p.x_sb + t * p.x_ss + h * p.x_sn;
    if (d >= p.R) {  // past the rotated features: a copy
      out[e] = xr[d * p.x_sd];
      continue;
    }
    // rotate(x)[d] = -x[partner] on the first of each pair (even d, or the first half), +x[partner] else.
    bool minus;
    int64_t partner;
    if (p.interleaved) {
      minus = (d & 1) == 0;
      partner = d ^ 1;
    } else {
      const int64_t half = p.R / 2;
      minus = d < half;
      partner = minus ? d + half : d - half;
    }
    const acc_t xd = static_cast<acc_t>(xr[d * p.x_sd]), xp = static_cast<acc_t>(xr[partner * p.x_sd]);
    const acc_t c = cos_t[b * p.c_sb + t * p.c_ss + d * p.c_sr];
    const acc_t s = sin_t[b * p.s_sb + t * p.s_ss + d * p.s_sr];
    const acc_t rot = mul_rn(xp, s);
    out[e] = static_cast<scalar_t>(add_rn(mul_rn(xd, c), minus ? -rot : rot));
  }
}

}  // namespace rope
}  // namespace pyqkv
