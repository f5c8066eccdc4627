// Fused QKV layouts as data (SPEC §5): where each head's Dh features start in the fused output.
// The same table drives split_qkv and pack_qkv on every backend; pyqkv/reference.py::fused_columns
// is the readable twin that the tests compare against.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"

namespace pyqkv {

// One head's run of Dh consecutive fused features. which: 0 = Q, 1 = K, 2 = V.
struct HeadSegment {
  int which;
  int64_t head;
  int64_t fused_start;
};

constexpr int64_t kCodegenMpNum = 4;  // CodeGen's model-parallel blocks (HF `mp_num`)

inline void check_head_counts(int64_t H, int64_t Hkv, int64_t Dh) {
  TORCH_CHECK_VALUE(H > 0, "n_heads: expected a positive head count, got ", H);
  TORCH_CHECK_VALUE(Hkv > 0, "n_kv_heads: expected a positive head count, got ", Hkv);
  TORCH_CHECK_VALUE(Dh > 0, "d_head: expected a positive head dim, got ", Dh);
  TORCH_CHECK_VALUE(H % Hkv == 0, "n_kv_heads: expected a divisor of n_heads=", H, ", got ", Hkv);
}

// n_out = (H + 2 Hkv) Dh, the fused output width; counts too large for int64 are refused here, before
// anything is sized from them (a wrapped product could match a real weight, or reach a huge reserve()).
inline int64_t fused_width(int64_t H, int64_t Hkv, int64_t Dh) {
  int64_t two_hkv = 0, heads = 0, n_out = 0;
  const bool overflow = c10::mul_overflows(Hkv, int64_t{2}, &two_hkv) || c10::add_overflows(H, two_hkv, &heads) ||
                        c10::mul_overflows(heads, Dh, &n_out);
  TORCH_CHECK_VALUE(!overflow, "n_heads, n_kv_heads, d_head: expected (n_heads + 2 * n_kv_heads) * d_head to fit in ",
                    "int64, got n_heads=", H, ", n_kv_heads=", Hkv, ", d_head=", Dh);
  return n_out;
}

// Real dtypes only: split and pack move elements, so any real dtype (integers and bool included) is moved
// exactly; complex has no kernel.
inline void check_real(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(!at::isComplexType(t.scalar_type()), name,
                   ": expected a real tensor (floating point, integer or bool), got ", t.scalar_type());
}

inline std::vector<HeadSegment> head_segments(const std::string& layout, int64_t H, int64_t Hkv, int64_t Dh) {
  check_head_counts(H, Hkv, Dh);
  std::vector<HeadSegment> segs;
  segs.reserve(H + 2 * Hkv);
  if (layout == "blocked") {  // [all Q heads | all K heads | all V heads]
    for (int64_t h = 0; h < H; ++h) segs.push_back({0, h, h * Dh});
    for (int64_t g = 0; g < Hkv; ++g) segs.push_back({1, g, (H + g) * Dh});
    for (int64_t g = 0; g < Hkv; ++g) segs.push_back({2, g, (H + Hkv + g) * Dh});
  } else if (layout == "interleaved") {  // per head h: [Q_h, K_h, V_h]
    TORCH_CHECK_VALUE(H == Hkv, "layout: 'interleaved' needs n_kv_heads == n_heads (", H, "), got n_kv_heads=", Hkv,
                      "; use 'grouped' for GQA");
    for (int64_t h = 0; h < H; ++h)
      for (int w = 0; w < 3; ++w) segs.push_back({w, h, (3 * h + w) * Dh});
  } else if (layout == "grouped") {  // per KV group g: [Q of its G heads, K_g, V_g]
    const int64_t G = H / Hkv;
    for (int64_t g = 0; g < Hkv; ++g) {
      for (int64_t j = 0; j < G; ++j) segs.push_back({0, g * G + j, (g * (G + 2) + j) * Dh});
      segs.push_back({1, g, (g * (G + 2) + G) * Dh});
      segs.push_back({2, g, (g * (G + 2) + G + 1) * Dh});
    }
  } else if (layout == "codegen") {  // mp_num blocks, each [Q part | V part | K part]
    TORCH_CHECK_VALUE(H == Hkv && H % kCodegenMpNum == 0,
                      "layout: 'codegen' needs n_kv_heads == n_heads and n_heads divisible by ", kCodegenMpNum,
                      ", got n_heads=", H, ", n_kv_heads=", Hkv);
    const int64_t per = H / kCodegenMpNum;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t base = (h / per) * 3 * per, j = h % per;
      segs.push_back({0, h, (base + j) * Dh});
      segs.push_back({2, h, (base + per + j) * Dh});
      segs.push_back({1, h, (base + 2 * per + j) * Dh});
    }
  } else {
    TORCH_CHECK_VALUE(false, "layout: expected one of 'blocked', 'interleaved', 'grouped', 'codegen', got '", layout,
                      "'");
  }
  return segs;
}

// Validates a fused weight against the head counts; returns D (the model dim).
inline int64_t check_fused_weight(const at::Tensor& weight, int64_t H, int64_t Hkv, int64_t Dh, bool conv1d) {
  PYQKV_CHECK_RANK(weight, "weight", 2, conv1d ? "[D, (H + 2 Hkv) Dh] (conv1d)" : "[(H + 2 Hkv) Dh, D] (Linear)");
  check_real(weight, "weight");
  const int64_t n_out = fused_width(H, Hkv, Dh);
  const int out_dim = conv1d ? 1 : 0;
  TORCH_CHECK_VALUE(weight.size(out_dim) == n_out, "weight: expected size ", n_out, " = (n_heads ", H,
                    " + 2 * n_kv_heads ", Hkv, ") * d_head ", Dh, " at dim ", out_dim,
                    conv1d ? " (conv1d stores [in, out])" : " (Linear stores [out, in])", ", got shape ",
                    shape_str(weight));
  return weight.size(1 - out_dim);
}

// Validates split weights W_Q [H,D,Dh], W_K/W_V [Hkv,D,Dh]; returns {H, Hkv, D, Dh}.
inline std::array<int64_t, 4> check_split_weights(const at::Tensor& W_Q, const at::Tensor& W_K, const at::Tensor& W_V) {
  PYQKV_CHECK_RANK(W_Q, "W_Q", 3, "[H, D, Dh]");
  PYQKV_CHECK_RANK(W_K, "W_K", 3, "[Hkv, D, Dh]");
  PYQKV_CHECK_RANK(W_V, "W_V", 3, "[Hkv, D, Dh]");
  check_real(W_Q, "W_Q");
  const int64_t H = W_Q.size(0), D = W_Q.size(1), Dh = W_Q.size(2), Hkv = W_K.size(0);
  for (auto* p : {&W_K, &W_V}) {
    const char* name = p == &W_K ? "W_K" : "W_V";
    TORCH_CHECK_VALUE(p->size(0) == Hkv && p->size(1) == D && p->size(2) == Dh, name, ": expected shape [", Hkv, ", ",
                      D, ", ", Dh, "] (Hkv of W_K; D, Dh of W_Q), got ", shape_str(*p));
    PYQKV_CHECK_SAME_DTYPE(*p, name, W_Q, "W_Q");
    PYQKV_CHECK_SAME_DEVICE(*p, name, W_Q, "W_Q");
  }
  return {H, Hkv, D, Dh};
}

// The host side of split_qkv / pack_qkv, shared by the backends: checks, the segment table and the
// outputs; `move(fused_io, per_head, segments, D, Dh, to_fused)` is the backend's data movement, with
// the fused weight seen as [D, n_out] through its strides whatever its orientation.
template <typename Mover>
std::tuple<at::Tensor, at::Tensor, at::Tensor> split_qkv_host(Mover move, const at::Tensor& weight, int64_t n_heads,
                                                              int64_t n_kv_heads, int64_t d_head,
                                                              c10::string_view layout, bool conv1d) {
  // The counts and the weight are checked before the segment table is sized from the counts.
  check_head_counts(n_heads, n_kv_heads, d_head);
  const int64_t D = check_fused_weight(weight, n_heads, n_kv_heads, d_head, conv1d);
  const auto segs = head_segments(std::string(layout), n_heads, n_kv_heads, d_head);
  std::array<at::Tensor, 3> out = {weight.new_empty({n_heads, D, d_head}), weight.new_empty({n_kv_heads, D, d_head}),
                                   weight.new_empty({n_kv_heads, D, d_head})};
  move(conv1d ? weight : weight.t(), out, segs, D, d_head, /*to_fused=*/false);
  return {out[0], out[1], out[2]};
}

template <typename Mover>
at::Tensor pack_qkv_host(Mover move, const at::Tensor& W_Q, const at::Tensor& W_K, const at::Tensor& W_V,
                         c10::string_view layout, bool conv1d) {
  const auto [H, Hkv, D, Dh] = check_split_weights(W_Q, W_K, W_V);
  const auto segs = head_segments(std::string(layout), H, Hkv, Dh);
  const int64_t n_out = (H + 2 * Hkv) * Dh;
  at::Tensor fused = conv1d ? W_Q.new_empty({D, n_out}) : W_Q.new_empty({n_out, D});
  std::array<at::Tensor, 3> heads = {W_Q, W_K, W_V};
  move(conv1d ? fused : fused.t(), heads, segs, D, Dh, /*to_fused=*/true);
  return fused;
}

}  // namespace pyqkv
