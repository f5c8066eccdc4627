// Host-side preparation of the CUDA attention op, in plain ATen (no CUDA API): argument checks, outputs,
// the early exits, mask preparation and the kernel parameter block, exactly as the CPU op does them.
// attention.cu launches the kernels on it; scripts/cuda_emulate runs the same kernels from it on CPU
// threads to check their logic where no GPU exists.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

#include "../attention.h"
#include "attention_common.cuh"
#include "attention_plan.cuh"

namespace pyqkv {
namespace attn {

struct Prepared {
  AttnDims d;
  at::Tensor z, lse, pattern;  // the op's outputs
  at::Tensor pad, bias, vis4, alibi; // prepared masks and bias (kept alive while the kernels run)
  Params p;
  bool done = false;           // the outputs are final already (empty problem or no keys)
};

inline Prepared prepare_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const c10::optional<at::Tensor>& mask, double scale, bool causal,
                                  bool return_pattern, const c10::optional<at::Tensor>& alibi) {
  Prepared r;
  r.d = check_attention(q, k, v, mask, alibi);
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
  p.B = d.B, p.S = d.S, p.H = d.H, p.Hkv = d.Hkv, p.Dh = d.Dh, p.K = d.K;
  p.causal = causal;
  p.z = r.z.data_ptr();
  p.lse = r.lse.data_ptr();
  p.pattern = return_pattern ? r.pattern.data_ptr() : nullptr;
  return r;
}

// Rows of a [.., rows, .., Dh] tensor of a 2- or 4-byte dtype can be read 16 bytes at a time: unit
// feature stride, Dh a multiple of 16 bytes, and every row start 16-byte aligned.
inline bool rows_16b_loadable(const at::Tensor& t) {
  const int64_t es = t.element_size();
  if (es != 2 && es != 4) return false;
  const int64_t vec = 16 / es;
  return t.stride(3) == 1 && t.size(3) % vec == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
         t.stride(0) % vec == 0 && t.stride(1) % vec == 0 && t.stride(2) % vec == 0;
}

// The same for the tensor-core kernel, which reads half types only (8 elements per load).
inline bool rows_16b_aligned(const at::Tensor& t) { return t.element_size() == 2 && rows_16b_loadable(t); }

// The plan's inputs from the tensors and the device's properties.
inline PlanInputs plan_inputs(const Prepared& r, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              bool return_pattern, int sm_major, size_t max_smem, int n_sms) {
  PlanInputs in{};
  in.B = r.d.B, in.S = r.d.S, in.H = r.d.H, in.Hkv = r.d.Hkv, in.Dh = r.d.Dh, in.K = r.d.K;
  in.half_type = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
  in.acc_bytes = q.scalar_type() == at::kDouble ? 8 : 4;
  in.return_pattern = return_pattern;
  in.sm_major = sm_major;
  in.max_smem = max_smem;
  in.n_sms = n_sms;
  in.q_vec = rows_16b_aligned(q);
  in.k_vec = rows_16b_aligned(k);
  in.v_vec = rows_16b_aligned(v);
  in.elem_bytes = static_cast<int>(q.element_size());
  in.kv_rows16 = rows_16b_loadable(k) && rows_16b_loadable(v);
  return in;
}

}  // namespace attn
}  // namespace pyqkv
