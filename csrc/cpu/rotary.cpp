// rotary (RoPE) on CPU: Hugging Face's formula on the first R features of every head,
//   out = x * cos + rotate(x) * sin,  rotate = rotate_half (GPT-NeoX, Llama) or rotate_every_two (GPT-J),
// in float32 (float64 for float64 x) with one rounding to x's dtype at the end; features R .. Dh-1 are
// copied. Parallel over the B*S positions: each task loads a position's cos/sin row once and applies it
// to all n heads. x is read through its strides (usually a view into the fused QKV projection).
#include "../rotary.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace pyqkv {
namespace {

// One head's row: x at x[d * xd], out contiguous. kUnit: xd == 1, known at compile time so that the
// loops vectorize (the common case: a head is a contiguous slice of the fused projection).
template <bool kUnit, typename scalar_t, typename acc_t>
void rotate_row(const scalar_t* x, int64_t xd, scalar_t* out, const acc_t* c, const acc_t* s, int64_t R, int64_t Dh,
                bool interleaved) {
  const int64_t step = kUnit ? 1 : xd;
  if (interleaved) {  // pairs (2i, 2i+1) -> (-x[2i+1], x[2i])
    for (int64_t i = 0; i < R; i += 2) {
      const acc_t x0 = static_cast<acc_t>(x[i * step]), x1 = static_cast<acc_t>(x[(i + 1) * step]);
      out[i] = static_cast<scalar_t>(x0 * c[i] - x1 * s[i]);
      out[i + 1] = static_cast<scalar_t>(x1 * c[i + 1] + x0 * s[i + 1]);
    }
  } else {  // halves [x1, x2] -> [-x2, x1]
    const int64_t h = R / 2;
    for (int64_t i = 0; i < h; ++i) {
      const acc_t x0 = static_cast<acc_t>(x[i * step]), x1 = static_cast<acc_t>(x[(i + h) * step]);
      out[i] = static_cast<scalar_t>(x0 * c[i] - x1 * s[i]);
      out[i + h] = static_cast<scalar_t>(x1 * c[i + h] + x0 * s[i + h]);
    }
  }
  for (int64_t i = R; i < Dh; ++i) out[i] = x[i * step];
}

template <typename scalar_t>
void rotary_kernel(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                   const RotaryDims& d, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t S = d.S, n = d.n, Dh = d.Dh, R = d.R;
  const int64_t xb = x.stride(0), xs = x.stride(1), xn = x.stride(2), xd = x.stride(3);
  // cos/sin [B|1, S, R]: stride 0 over a broadcast batch.
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), cs = cos.stride(1), cr = cos.stride(2);
  const int64_t sb = sin.size(0) == 1 ? 0 : sin.stride(0), ss = sin.stride(1), sr = sin.stride(2);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* cp = cos.data_ptr<acc_t>();
  const acc_t* sp = sin.data_ptr<acc_t>();
  scalar_t* op = out.data_ptr<scalar_t>();  // [B, S, n, Dh] contiguous
  // About 32K elements per task: enough work to pay for a task, and many tasks for long sequences.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n * Dh));

  at::parallel_for(0, d.B * S, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> c(R), s(R);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / S, t = row % S;
      for (int64_t r = 0; r < R; ++r) {
        c[r] = cp[b * cb + t * cs + r * cr];
        s[r] = sp[b * sb + t * ss + r * sr];
      }
      for (int64_t h = 0; h < n; ++h) {
        const scalar_t* xr = xp + b * xb + t * xs + h * xn;
        scalar_t* orow = op + (row * n + h) * Dh;
        if (xd == 1) {
          rotate_row<true>(xr, 1, orow, c.data(), s.data(), R, Dh, interleaved);
        } else {
          rotate_row<false>(xr, xd, orow, c.data(), s.data(), R, Dh, interleaved);
        }
      }
    }
  });
}

at::Tensor rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  const RotaryDims d = check_rotary(x, cos, sin);
  at::Tensor out = at::empty({d.B, d.S, d.n, d.Dh}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor c = rotary_table(cos, x), s = rotary_table(sin, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotary_cpu",
                                  [&] { rotary_kernel<scalar_t>(x, c, s, interleaved, d, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CPU, m) { m.impl("rotary", &rotary_cpu); }

}  // namespace pyqkv
