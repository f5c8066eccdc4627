// The masks and the ALiBi bias of one CPU attention call as raw pointers and element strides: the one place
// that reads their layouts, for the attention kernel (attention.cpp) and pattern_slice (pattern_slice.cpp).
// At most one 4-D mask is given (additive `bias` or bool `vis4`); its broadcast dims have stride 0, as do
// ALiBi's [1, .., ..] and [.., 1, ..] dims.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace pyqkv {
namespace cpu {

template <typename acc_t>
struct MaskView {
  const bool* pad = nullptr;    // [B, K] padding flags (true = attend)
  const acc_t* bias = nullptr;  // [B|1, H|1, S, K] additive mask
  const bool* vis4 = nullptr;   // [B|1, H|1, S, K] bool mask (true = attend)
  int64_t mb = 0, mh = 0, ms = 0, mk = 0;  // the 4-D mask's strides
  const acc_t* alibi = nullptr;  // [B|1, H|1, K] per-key bias
  int64_t ab = 0, ah = 0, ak = 0;

  MaskView(const at::Tensor& pad_t, const at::Tensor& bias_t, const at::Tensor& vis4_t, const at::Tensor& alibi_t) {
    if (pad_t.defined()) pad = pad_t.data_ptr<bool>();
    if (bias_t.defined()) bias = bias_t.data_ptr<acc_t>();
    if (vis4_t.defined()) vis4 = vis4_t.data_ptr<bool>();
    const at::Tensor& m4 = bias_t.defined() ? bias_t : vis4_t;
    if (m4.defined()) {
      mb = m4.size(0) == 1 ? 0 : m4.stride(0);
      mh = m4.size(1) == 1 ? 0 : m4.stride(1);
      ms = m4.stride(2);
      mk = m4.stride(3);
    }
    if (alibi_t.defined()) {
      alibi = alibi_t.data_ptr<acc_t>();
      ab = alibi_t.size(0) == 1 ? 0 : alibi_t.stride(0);
      ah = alibi_t.size(1) == 1 ? 0 : alibi_t.stride(1);
      ak = alibi_t.stride(2);
    }
  }
};

}  // namespace cpu
}  // namespace pyqkv
