// attention on CPU: blocked over keys with an online softmax (one pass over K and V), scale, mask and
// bottom-right causal fused, parallel over batch x heads x query blocks. No [B,H,S,K] buffer exists
// unless the pattern is asked for. Half types are converted to float32 block by block; float64 stays
// float64 so gradcheck sees exact numbers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../attention.h"

namespace pyqkv {
namespace {

// Query rows per task and keys per block. A task's working set (Q block, one K/V block, scores,
// accumulator) stays in L2 at Dh <= 128: 64*128*4 B per buffer.
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 128;

// Strides of a [B, seq, heads, Dh] tensor (or a 4-D mask [B, heads, S, K]), in elements.
struct Strides4 {
  int64_t b, s, h, d;
  explicit Strides4(const at::Tensor& t) : b(t.stride(0)), s(t.stride(1)), h(t.stride(2)), d(t.stride(3)) {}
};

template <typename scalar_t>
void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& pad,   // [B, K] bool, or undefined
                      const at::Tensor& bias,  // [B|1, 1|H, S, K] in acc_t, or undefined
                      double hidden_below, double scale_d, bool causal, const AttnDims& dims,
                      at::Tensor& z, at::Tensor& lse, at::Tensor& pattern) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = dims.B, S = dims.S, H = dims.H, Dh = dims.Dh, K = dims.K, Hkv = dims.Hkv;
  const int64_t group = H / Hkv;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t hidden = static_cast<acc_t>(hidden_below);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const Strides4 qs(q), ks(k), vs(v);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const bool* padp = pad.defined() ? pad.data_ptr<bool>() : nullptr;
  const acc_t* biasp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
  const int64_t mb_s = bias.defined() ? (bias.size(0) == 1 ? 0 : bias.stride(0)) : 0;
  const int64_t mh_s = bias.defined() ? (bias.size(1) == 1 ? 0 : bias.stride(1)) : 0;
  const int64_t ms_s = bias.defined() ? bias.stride(2) : 0, mk_s = bias.defined() ? bias.stride(3) : 0;
  scalar_t* zp = z.data_ptr<scalar_t>();  // [B, S, H, Dh] contiguous
  acc_t* lsep = lse.data_ptr<acc_t>();     // [B, H, S] contiguous
  scalar_t* patp = pattern.defined() ? pattern.data_ptr<scalar_t>() : nullptr;  // [B, H, S, K]

  const int64_t n_qblocks = (S + kQueryBlock - 1) / kQueryBlock;
  // Keys [0, K - S + i] are visible to query i when causal (bottom-right alignment).
  const int64_t causal_offset = K - S;

  at::parallel_for(0, B * H * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(kQueryBlock * Dh), kt(Dh * kKeyBlock), vf(kKeyBlock * Dh);
    std::vector<acc_t> sc(kQueryBlock * kKeyBlock), acc(kQueryBlock * Dh), mx(kQueryBlock), sum(kQueryBlock);
    // With a pattern request, a query block's raw scores for all K keys are kept here and normalized
    // once the row's log-sum-exp is known: one pass over keys, exact in every dtype.
    std::vector<acc_t> raw(patp ? kQueryBlock * K : 0);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % n_qblocks, h = (task / n_qblocks) % H, b = task / (n_qblocks * H);
      const int64_t hk = h / group;  // GQA: the KV head this query head reads
      const int64_t i0 = qb * kQueryBlock, nq = std::min(kQueryBlock, S - i0);
      // The last key any row of this block may see; keys past it are skipped block-wise. With causal
      // and K < S the leading query rows see no key at all: clamp at 0 (a negative end would make the
      // pattern's zero-fill below start before the row).
      const int64_t key_end = causal ? std::max<int64_t>(0, std::min(K, causal_offset + i0 + nq)) : K;

      for (int64_t r = 0; r < nq; ++r) {
        const scalar_t* src = qp + b * qs.b + (i0 + r) * qs.s + h * qs.h;
        for (int64_t d = 0; d < Dh; ++d) qf[r * Dh + d] = static_cast<acc_t>(src[d * qs.d]) * scale;
      }
      std::fill(acc.begin(), acc.begin() + nq * Dh, acc_t(0));
      std::fill(mx.begin(), mx.begin() + nq, neg_inf);
      std::fill(sum.begin(), sum.begin() + nq, acc_t(0));

      for (int64_t j0 = 0; j0 < key_end; j0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, key_end - j0);
        // K block transposed to [Dh, nk] and V block as [nk, Dh], in acc_t: both inner loops below are
        // then unit-stride axpys that the compiler vectorizes without reassociating a reduction.
        for (int64_t c = 0; c < nk; ++c) {
          const scalar_t* ksrc = kp + b * ks.b + (j0 + c) * ks.s + hk * ks.h;
          const scalar_t* vsrc = vp + b * vs.b + (j0 + c) * vs.s + hk * vs.h;
          for (int64_t d = 0; d < Dh; ++d) {
            kt[d * nk + c] = static_cast<acc_t>(ksrc[d * ks.d]);
            vf[c * Dh + d] = static_cast<acc_t>(vsrc[d * vs.d]);
          }
        }
        for (int64_t r = 0; r < nq; ++r) {
          acc_t* srow = sc.data() + r * nk;
          std::fill(srow, srow + nk, acc_t(0));
          const acc_t* qrow = qf.data() + r * Dh;
          for (int64_t d = 0; d < Dh; ++d) {
            const acc_t qd = qrow[d];
            const acc_t* krow = kt.data() + d * nk;
            for (int64_t c = 0; c < nk; ++c) srow[c] += qd * krow[c];
          }
          // Mask: causal, padding, additive; hidden entries become -inf (weight exactly 0).
          const int64_t i = i0 + r;
          const int64_t last_visible = causal ? causal_offset + i : K - 1;
          const acc_t* brow = biasp ? biasp + b * mb_s + h * mh_s + i * ms_s : nullptr;
          for (int64_t c = 0; c < nk; ++c) {
            const int64_t j = j0 + c;
            bool visible = j <= last_visible && (!padp || padp[b * K + j]);
            if (brow) {
              const acc_t add = brow[j * mk_s];
              visible = visible && add > hidden;
              srow[c] += add;
            }
            if (!visible) srow[c] = neg_inf;
          }
          if (patp) std::copy(srow, srow + nk, raw.data() + r * K + j0);
          // Online softmax: rescale the running sum and accumulator to the new row maximum.
          acc_t m_new = mx[r];
          for (int64_t c = 0; c < nk; ++c) m_new = std::max(m_new, srow[c]);
          if (m_new == neg_inf) continue;  // nothing visible in this row yet
          const acc_t alpha = std::exp(mx[r] - m_new);  // exp(-inf) = 0 on the first visible block
          acc_t* arow = acc.data() + r * Dh;
          acc_t block_sum = 0;
          for (int64_t c = 0; c < nk; ++c) {
            srow[c] = std::exp(srow[c] - m_new);
            block_sum += srow[c];
          }
          sum[r] = sum[r] * alpha + block_sum;
          mx[r] = m_new;
          for (int64_t d = 0; d < Dh; ++d) arow[d] *= alpha;
          for (int64_t c = 0; c < nk; ++c) {
            const acc_t p = srow[c];
            if (p == acc_t(0)) continue;
            const acc_t* vrow = vf.data() + c * Dh;
            for (int64_t d = 0; d < Dh; ++d) arow[d] += p * vrow[d];
          }
        }
      }

      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = i0 + r;
        const bool empty = sum[r] == acc_t(0);  // no visible key: zeros, never NaN
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / sum[r];
        const acc_t row_lse = empty ? neg_inf : mx[r] + std::log(sum[r]);
        scalar_t* zrow = zp + ((b * S + i) * H + h) * Dh;
        for (int64_t d = 0; d < Dh; ++d) zrow[d] = static_cast<scalar_t>(acc[r * Dh + d] * inv);
        lsep[(b * H + h) * S + i] = row_lse;
        if (patp) {
          scalar_t* prow = patp + ((b * H + h) * S + i) * K;
          const acc_t* rrow = raw.data() + r * K;
          for (int64_t j = 0; j < key_end; ++j)
            prow[j] = static_cast<scalar_t>(empty ? acc_t(0) : std::exp(rrow[j] - row_lse));
          std::fill(prow + key_end, prow + K, scalar_t(0));  // causally skipped keys
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                                                             double scale, bool causal, bool return_pattern) {
  const AttnDims d = check_attention(q, k, v, mask);
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor z = at::empty({d.B, d.S, d.H, d.Dh}, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.S}, q.options().dtype(acc_dtype));
  at::Tensor pattern = return_pattern ? at::empty({d.B, d.H, d.S, d.K}, q.options()) : at::empty({0}, q.options());
  if (d.B * d.S * d.H == 0) return {z, lse, pattern};
  if (d.K == 0) {  // no keys at all: every row is empty
    z.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    if (return_pattern) pattern.zero_();
    return {z, lse, pattern};
  }
  at::Tensor pad, bias;
  double hidden = -std::numeric_limits<double>::infinity();
  if (mask.has_value() && mask->dim() == 2) {
    pad = (*mask != 0).contiguous();  // O(B*K): a bool per key
  } else if (mask.has_value()) {
    hidden = hidden_threshold(mask->scalar_type());
    // Read in place through its strides when already in the accumulation dtype (HF's float32 masks,
    // often expanded views); other dtypes are converted once.
    bias = mask->scalar_type() == acc_dtype ? *mask : mask->to(acc_dtype);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_cpu", [&] {
    at::Tensor pat = return_pattern ? pattern : at::Tensor();
    attention_kernel<scalar_t>(q, k, v, pad, bias, hidden, scale, causal, d, z, lse, pat);
  });
  return {z, lse, pattern};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CPU, m) { m.impl("attention", &attention_cpu); }

}  // namespace pyqkv
