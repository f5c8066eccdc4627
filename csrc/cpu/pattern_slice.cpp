// pattern_slice on CPU: entries of attention's pattern (and scores) at chosen heads, query rows and key
// columns, exp(score - lse), from q, k and the lse attention returned; no [B, H, S, K] buffer. Parallel
// over batch x chosen heads x blocks of chosen rows; per block of chosen keys the scores are one small
// product (plain loops when tiny, at::mm_out otherwise), then one pass applies softcap, ALiBi and the
// masks by attention.h's rules (position_visible, additive_visible), as attention's CPU kernel does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "mask_view.h"
#include "../pattern_slice.h"

namespace pyqkv {
namespace {

// Chosen rows per task and chosen keys per block: the task's buffers (a Q block, a K block, their
// scores) stay within a few hundred KB. Below kLoopWork multiply-adds a block product is a plain loop
// (an at::mm call costs microseconds of set-up, as much as a 1 x 256 x 64 product).
constexpr int64_t kRowBlock = 64;
constexpr int64_t kKeyBlock = 256;
constexpr int64_t kLoopWork = 16384;

// A [rows, cols] matrix over `data` with row stride `ld`, as a tensor view for at::mm_out.
template <typename T>
at::Tensor matrix(T* data, int64_t rows, int64_t cols, int64_t ld, at::ScalarType dtype) {
  return at::from_blob(data, {rows, cols}, {ld, 1}, at::TensorOptions().dtype(dtype));
}

template <typename scalar_t>
void pattern_slice_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                          const at::Tensor& pad,    // [B, K] bool, or undefined
                          const at::Tensor& bias,   // [B|1, 1|H, S, K] in acc_t, or undefined
                          const at::Tensor& vis4,   // [B|1, 1|H, S, K] bool (true = attend), or undefined
                          const at::Tensor& alibi,  // [B|1, H|1, K] in acc_t, or undefined
                          double hidden_below, double scale_d, bool causal, const SliceDims& sd,
                          at::Tensor& pattern,  // [B, H', S', K'] in scalar_t
                          at::Tensor& scores,   // [B, H', S', K'] in acc_t, or undefined
                          double score_hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const AttnDims& d = sd.d;
  const int64_t B = d.B, S = d.S, Dh = d.Dh, K = d.K, G = d.H / d.Hkv;
  const int64_t Hs = sd.heads.count, Ss = sd.queries.count, Ks = sd.keys.count;
  const int64_t* heads = sd.heads.index.defined() ? sd.heads.index.data_ptr<int64_t>() : nullptr;
  const int64_t* rows = sd.queries.index.defined() ? sd.queries.index.data_ptr<int64_t>() : nullptr;
  const int64_t* cols = sd.keys.index.defined() ? sd.keys.index.data_ptr<int64_t>() : nullptr;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t cap = static_cast<acc_t>(d.softcap);  // 0: off
  const acc_t hidden = static_cast<acc_t>(hidden_below);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t s_hidden = static_cast<acc_t>(score_hidden);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const acc_t* lsep = lse.data_ptr<acc_t>();
  const int64_t qsb = q.stride(0), qss = q.stride(1), qsh = q.stride(2), qsd = q.stride(3);
  const int64_t ksb = k.stride(0), kss = k.stride(1), ksh = k.stride(2), ksd = k.stride(3);
  const int64_t lb = lse.stride(0), lh = lse.stride(1), ls = lse.stride(2);
  const cpu::MaskView<acc_t> mv(pad, bias, vis4, alibi);  // pointers and strides of the masks and ALiBi
  scalar_t* patp = pattern.data_ptr<scalar_t>();
  acc_t* scp = scores.defined() ? scores.data_ptr<acc_t>() : nullptr;

  const int64_t n_rblocks = (Ss + kRowBlock - 1) / kRowBlock;
  const int64_t n_tasks = B * Hs * n_rblocks;
  const int64_t work = Ss * Ks * Dh;  // per (b, head)
  at::parallel_for(0, n_tasks, work * Hs * B < 65536 ? n_tasks : 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(kRowBlock * Dh), kf(kKeyBlock * Dh), sc(kRowBlock * kKeyBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task % n_rblocks, hh = (task / n_rblocks) % Hs, b = task / (n_rblocks * Hs);
      const int64_t h = heads ? heads[hh] : hh, hk = h / G;  // GQA: query head h reads KV head h / G
      const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, Ss - r0);
      for (int64_t r = 0; r < nr; ++r) {  // the scale goes into Q, as attention's kernel does
        const int64_t i = rows ? rows[r0 + r] : r0 + r;
        const scalar_t* src = qp + b * qsb + i * qss + h * qsh;
        for (int64_t e = 0; e < Dh; ++e) qf[r * Dh + e] = static_cast<acc_t>(src[e * qsd]) * scale;
      }
      for (int64_t c0 = 0; c0 < Ks; c0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, Ks - c0);
        for (int64_t c = 0; c < nk; ++c) {
          const int64_t j = cols ? cols[c0 + c] : c0 + c;
          const scalar_t* src = kp + b * ksb + j * kss + hk * ksh;
          for (int64_t e = 0; e < Dh; ++e) kf[c * Dh + e] = static_cast<acc_t>(src[e * ksd]);
        }
        if (nr * nk * Dh <= kLoopWork) {
          for (int64_t r = 0; r < nr; ++r)
            for (int64_t c = 0; c < nk; ++c) {
              acc_t dot = 0;
              for (int64_t e = 0; e < Dh; ++e) dot += qf[r * Dh + e] * kf[c * Dh + e];
              sc[r * kKeyBlock + c] = dot;
            }
        } else {
          at::Tensor out = matrix(sc.data(), nr, nk, kKeyBlock, acc_dtype);
          at::mm_out(out, matrix(qf.data(), nr, Dh, Dh, acc_dtype), matrix(kf.data(), nk, Dh, Dh, acc_dtype).t());
        }
        // The epilogue: the score's terms in attention's order, then visibility, then exp(s - lse).
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t rr = r0 + r, i = rows ? rows[rr] : rr;
          const acc_t row_lse = lsep[b * lb + h * lh + i * ls];
          const int64_t out_row = ((b * Hs + hh) * Ss + rr) * Ks;
          for (int64_t c = 0; c < nk; ++c) {
            const int64_t j = cols ? cols[c0 + c] : c0 + c;
            acc_t s = softcapped(sc[r * kKeyBlock + c], cap);
            if (mv.alibi) s += mv.alibi[b * mv.ab + h * mv.ah + j * mv.ak];
            bool visible = position_visible(i, j, S, K, causal, d.window);
            if (mv.pad) visible = visible && mv.pad[b * K + j];
            if (mv.vis4) visible = visible && mv.vis4[b * mv.mb + h * mv.mh + i * mv.ms + j * mv.mk];
            if (mv.bias) {
              const acc_t add = mv.bias[b * mv.mb + h * mv.mh + i * mv.ms + j * mv.mk];
              visible = visible && additive_visible(add, hidden);
              s += add;
            }
            // A row with lse = -inf sees nothing (attention's rule), whatever an inconsistent lse claims.
            const bool weighted = visible && row_lse != neg_inf;
            patp[out_row + c0 + c] = static_cast<scalar_t>(weighted ? std::exp(s - row_lse) : acc_t(0));
            if (scp) scp[out_row + c0 + c] = visible ? s : s_hidden;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pattern_slice_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const c10::optional<at::Tensor>& mask,
    double scale, bool causal, const c10::optional<at::Tensor>& alibi, c10::optional<double> softcap,
    c10::optional<int64_t> window, const c10::optional<at::Tensor>& heads, const c10::optional<at::Tensor>& queries,
    const c10::optional<at::Tensor>& keys, bool return_scores, c10::optional<at::ScalarType> score_dtype) {
  const SliceDims sd = check_pattern_slice(q, k, lse, mask, alibi, causal, softcap, window, heads, queries, keys,
                                           score_dtype);
  const AttnDims& d = sd.d;
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> shape{d.B, sd.heads.count, sd.queries.count, sd.keys.count};
  at::Tensor pattern = at::empty(shape, q.options());
  // Scores are made in the accumulation dtype and converted once (no copy when score_dtype is it); the
  // hidden value finfo_min(score_dtype) is exact in float32 / float64, so it survives the conversion.
  at::Tensor scores = return_scores ? at::empty(shape, q.options().dtype(acc_dtype)) : at::Tensor();
  if (pattern.numel() > 0) {
    at::Tensor pad, bias, vis4;
    double hidden = -std::numeric_limits<double>::infinity();
    if (d.mask == MaskKind::kPadding) {
      pad = (*mask != 0).contiguous();  // O(B*K): a bool per key
    } else if (d.mask == MaskKind::kBool4d) {
      vis4 = *mask;  // read in place through its strides
    } else if (d.mask == MaskKind::kAdditive4d) {
      hidden = hidden_threshold(mask->scalar_type());
      bias = mask->scalar_type() == acc_dtype ? *mask : mask->to(acc_dtype);
    }
    const at::Tensor alibi_acc = alibi_in(alibi, acc_dtype);
    const at::Tensor lse_acc = lse;  // checked: already the accumulation dtype
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "pattern_slice_cpu", [&] {
      pattern_slice_kernel<scalar_t>(q, k, lse_acc, pad, bias, vis4, alibi_acc, hidden, scale, causal, sd, pattern,
                                     scores, finfo_min(sd.score_dtype));
    });
  }
  if (!return_scores) return {pattern, at::empty({0}, q.options().dtype(sd.score_dtype))};
  return {pattern, scores.to(sd.score_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CPU, m) { m.impl("pattern_slice", &pattern_slice_cpu); }

}  // namespace pyqkv
