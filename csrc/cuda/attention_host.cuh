// Host-side preparation of the CUDA attention op, in plain ATen (no CUDA API): argument checks, outputs,
// the early exits, mask preparation and the kernel parameter block, exactly as the CPU op does them.
// attention.cu launches the kernels on it; tools/cuda_emulate runs the same kernels from it on CPU
// threads to check their logic where no GPU exists.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

#include "../attention.h"
#include "../attention_plan.h"
#include "attention_common.cuh"

namespace pyqkv {
namespace attn {

struct Prepared {
  AttnDims d;
  at::Tensor z, lse, pattern;         // the op's outputs
  at::Tensor pad, bias, vis4, alibi;  // prepared masks and bias (kept alive while the kernels run)
  Params p;
  bool done = false;  // the outputs are final already (empty problem or no keys)
};

inline Prepared prepare_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const c10::optional<at::Tensor>& mask, double scale, bool causal, bool return_pattern,
                                  const c10::optional<at::Tensor>& alibi, c10::optional<double> softcap,
                                  c10::optional<int64_t> window) {
  Prepared r;
  r.d = check_attention(q, k, v, mask, alibi, causal, softcap, window);
  const AttnDims& d = r.d;
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  r.z = at::empty({d.B, d.S, d.H, d.Dh}, q.options());
  r.lse = at::empty({d.B, d.H, d.S}, q.options().dtype(acc_dtype));
  r.pattern = return_pattern ? at::empty({d.B, d.H, d.S, d.K}, q.options()) : at::empty({0}, q.options());
  if (d.B * d.S * d.H == 0) {
    r.done = true;
    return r;
  }
  if (d.K == 0) {  // no keys at all: every row is empty
    r.z.zero_();
    r.lse.fill_(-std::numeric_limits<double>::infinity());
    if (return_pattern) r.pattern.zero_();
    r.done = true;
    return r;
  }
  double hidden = -std::numeric_limits<double>::infinity();
  if (d.mask == MaskKind::kPadding) {
    r.pad = (*mask != 0).contiguous();  // O(B*K): a bool per key
  } else if (d.mask == MaskKind::kBool4d) {
    r.vis4 = *mask;  // read in place through its strides (HF's expanded views)
  } else if (d.mask == MaskKind::kAdditive4d) {
    hidden = hidden_threshold(mask->scalar_type());
    // Read in place through its strides when already in the accumulation dtype (HF's float32 masks,
    // often expanded views); other dtypes are converted once.
    r.bias = mask->scalar_type() == acc_dtype ? *mask : mask->to(acc_dtype);
  }
  r.alibi = alibi_in(alibi, acc_dtype);

  Params& p = r.p;
  p = Params{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_ss = q.stride(1), p.q_sh = q.stride(2), p.q_sd = q.stride(3);
  p.k_sb = k.stride(0), p.k_ss = k.stride(1), p.k_sh = k.stride(2), p.k_sd = k.stride(3);
  p.v_sb = v.stride(0), p.v_ss = v.stride(1), p.v_sh = v.stride(2), p.v_sd = v.stride(3);
  p.pad = r.pad.defined() ? r.pad.data_ptr<bool>() : nullptr;
  p.bias = r.bias.defined() ? r.bias.data_ptr() : nullptr;
  p.vis4 = r.vis4.defined() ? r.vis4.data_ptr<bool>() : nullptr;
  const at::Tensor& m4 = r.bias.defined() ? r.bias : r.vis4;  // at most one 4-D mask
  if (m4.defined()) {
    p.m_sb = m4.size(0) == 1 ? 0 : m4.stride(0);
    p.m_sh = m4.size(1) == 1 ? 0 : m4.stride(1);
    p.m_ss = m4.stride(2);
    p.m_sk = m4.stride(3);
  }
  p.alibi = r.alibi.defined() ? r.alibi.data_ptr() : nullptr;
  if (r.alibi.defined()) {
    p.a_sb = r.alibi.size(0) == 1 ? 0 : r.alibi.stride(0);
    p.a_sh = r.alibi.size(1) == 1 ? 0 : r.alibi.stride(1);
    p.a_sk = r.alibi.stride(2);
  }
  p.hidden = hidden;
  p.scale = scale;
  p.softcap = d.softcap;
  p.window = d.window;
  p.B = d.B, p.S = d.S, p.H = d.H, p.Hkv = d.Hkv, p.Dh = d.Dh, p.K = d.K;
  p.causal = causal;
  p.z = r.z.data_ptr();
  p.lse = r.lse.data_ptr();
  p.pattern = return_pattern ? r.pattern.data_ptr() : nullptr;
  return r;
}

}  // namespace attn
}  // namespace pyqkv
