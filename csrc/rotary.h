// Host-side argument checks and table preparation for the rotary op, shared by CPU and CUDA.
// x [B, S, n, Dh]; cos, sin [B or 1, S, R] with R even and 0 < R <= Dh (the rotated features).
#pragma once
#include <ATen/ATen.h>

#include "checks.h"

namespace pyqkv {

struct RotaryDims {
  int64_t B, S, n, Dh, R;
};

inline RotaryDims check_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  PYQKV_CHECK_RANK(x, "x", 4, "[B, S, n, Dh]");
  PYQKV_CHECK_RANK(cos, "cos", 3, "[B or 1, S, R]");
  PYQKV_CHECK_RANK(sin, "sin", 3, "[B or 1, S, R]");
  PYQKV_CHECK_FLOATING(x, "x");
  PYQKV_CHECK_FLOATING(cos, "cos");
  PYQKV_CHECK_FLOATING(sin, "sin");
  PYQKV_CHECK_SAME_DEVICE(cos, "cos", x, "x");
  PYQKV_CHECK_SAME_DEVICE(sin, "sin", x, "x");
  RotaryDims d{x.size(0), x.size(1), x.size(2), x.size(3), cos.size(2)};
  TORCH_CHECK_VALUE((cos.size(0) == d.B || cos.size(0) == 1) && cos.size(1) == d.S,
                    "cos: expected shape [B or 1, S, R] = [", d.B, " or 1, ", d.S, ", R] (B and S of x ", shape_str(x),
                    "), got ", shape_str(cos));
  TORCH_CHECK_VALUE(d.R > 0 && d.R % 2 == 0 && d.R <= d.Dh,
                    "cos: expected an even rotary width R with 0 < R <= Dh=", d.Dh, " (the head dim of x ",
                    shape_str(x), "), got R=", d.R, " (cos ", shape_str(cos), ")");
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), "sin: expected the shape of cos ", shape_str(cos), ", got ",
                    shape_str(sin));
  return d;
}

// The tables in the accumulation dtype (float64 for float64 x, else float32): a no-op view when they
// already are (the usual float32 tables), otherwise one conversion of [B|1, S, R] values, which is
// small next to x. Kernels read them through their strides.
inline at::Tensor rotary_table(const at::Tensor& t, const at::Tensor& x) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return t.scalar_type() == acc ? t : t.to(acc);
}

}  // namespace pyqkv
