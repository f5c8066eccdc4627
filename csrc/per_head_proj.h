// per_head_proj: b s n d, n d e -> b s n e (+ b[n, e]). GEMMs go to ATen (MKL/OpenBLAS on CPU, cuBLAS on
// CUDA), so CPU and CUDA register this same function.
#pragma once
#include <ATen/ATen.h>

#include "checks.h"

namespace pyqkv {

inline at::Tensor per_head_proj_aten(const at::Tensor& x, const at::Tensor& W, const c10::optional<at::Tensor>& b) {
  PYQKV_CHECK_RANK(x, "x", 4, "[B, S, n, D]");
  PYQKV_CHECK_RANK(W, "W", 3, "[n, D, E]");
  PYQKV_CHECK_FLOATING(x, "x");
  PYQKV_CHECK_SAME_DTYPE(W, "W", x, "x");
  PYQKV_CHECK_SAME_DEVICE(W, "W", x, "x");
  const int64_t B = x.size(0), S = x.size(1), n = x.size(2), D = x.size(3), E = W.size(2);
  PYQKV_CHECK_SIZE(W, "W", 0, n, "n, the head count of x");
  PYQKV_CHECK_SIZE(W, "W", 1, D, "D, the last dim of x");
  if (b.has_value()) {
    PYQKV_CHECK_RANK(*b, "b", 2, "[n, E]");
    PYQKV_CHECK_SIZE(*b, "b", 0, n, "n, the head count of x");
    PYQKV_CHECK_SIZE(*b, "b", 1, E, "E, the last dim of W");
    PYQKV_CHECK_SAME_DTYPE(*b, "b", x, "x");
    PYQKV_CHECK_SAME_DEVICE(*b, "b", x, "x");
  }
  if (B * S == 0 || n == 0) return at::zeros({B, S, n, E}, x.options());

  if (x.stride(2) == 0) {
    // Every head reads the same residual (a broadcast view from expand): one GEMM of the residual with
    // the heads' weights side by side, [B*S, D] @ [D, n*E]. This reorders W (n*D*E elements, once per
    // call) instead of materializing the n-fold copy of x (B*S*n*D elements).
    const at::Tensor x2d = x.select(2, 0).reshape({B * S, D});
    const at::Tensor W_cat = W.permute({1, 0, 2}).reshape({D, n * E});
    at::Tensor out = b.has_value() ? at::addmm(b->reshape({1, n * E}), x2d, W_cat) : at::mm(x2d, W_cat);
    return out.view({B, S, n, E});
  }
  // General case: one batched GEMM over heads, [n, B*S, D] @ [n, D, E] -> [n, B*S, E], written
  // straight into the [B, S, n, E] result through a permuted view.
  at::Tensor out = at::empty({B, S, n, E}, x.options());
  at::Tensor out_nbe = out.view({B * S, n, E}).transpose(0, 1);
  const at::Tensor x_nbd = x.reshape({B * S, n, D}).transpose(0, 1);
  if (b.has_value()) {
    out_nbe.copy_(b->unsqueeze(1).expand({n, B * S, E}));
    out_nbe.baddbmm_(x_nbd, W);
  } else {
    at::bmm_out(out_nbe, x_nbd, W);
  }
  return out;
}

}  // namespace pyqkv
