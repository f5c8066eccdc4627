// attention on CPU: blocked over keys with an online softmax (one pass over K and V), scale, mask and
// bottom-right causal fused, parallel over batch x KV heads x query blocks. No [B,H,S,K] buffer exists
// unless the pattern is asked for.
//
// Per task, the query rows of all H/Hkv query heads that share one KV head are stacked into one block,
// so each K/V block is read once for the whole group (GQA/MQA without repeating K/V). The two block
// products (Q·Kᵀ and P·V) are GEMMs through ATen (at::mm_out on views of the task's buffers: MKL or
// whatever BLAS torch was built with); float32/float64 K and V with unit inner stride are read in place,
// other layouts and half types are converted block by block into float32. The softmax loops are
// compiled twice (AVX2+FMA and baseline) and picked at load time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../attention.h"

namespace pyqkv {
namespace {

// Query rows per task (all heads of a KV group together) and keys per block. A task's buffers (Q block,
// scores, accumulator, a converted K/V block) stay within a few hundred KB: L2-resident on current CPUs.
constexpr int64_t kRowsPerTask = 128;
constexpr int64_t kKeyBlock = 256;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PYQKV_SIMD_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define PYQKV_SIMD_CLONES
#endif

// exp for float32 in straight-line arithmetic that the compiler vectorizes (Cephes' expf polynomial,
// about 1 ulp). x below -87.3 (where expf is denormal or 0), including -inf for hidden keys, gives 0.
inline float exp_approx(float x) {
  const float hidden = x < -87.3f ? 0.f : 1.f;
  x = std::min(std::max(x, -87.3f), 88.37f);
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.f;
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  return y * pow2 * hidden;
}

// The softmax inner loops. The float versions are the hot ones: compiled for AVX2+FMA and for the
// baseline ISA, chosen at load time (GCC function multiversioning). float64 only serves gradcheck.
PYQKV_SIMD_CLONES float row_max(const float* s, int64_t n, float init) {
  float m = init;
  for (int64_t c = 0; c < n; ++c) m = std::max(m, s[c]);
  return m;
}

// s[c] = exp(s[c] - m) in place; returns the sum.
PYQKV_SIMD_CLONES float exp_shift_sum(float* s, int64_t n, float m) {
  float sum = 0;
  for (int64_t c = 0; c < n; ++c) {
    const float e = exp_approx(s[c] - m);
    s[c] = e;
    sum += e;
  }
  return sum;
}

PYQKV_SIMD_CLONES void scale_row(float* a, int64_t n, float f) {
  for (int64_t d = 0; d < n; ++d) a[d] *= f;
}

double row_max(const double* s, int64_t n, double init) {
  for (int64_t c = 0; c < n; ++c) init = std::max(init, s[c]);
  return init;
}

double exp_shift_sum(double* s, int64_t n, double m) {
  double sum = 0;
  for (int64_t c = 0; c < n; ++c) sum += (s[c] = std::exp(s[c] - m));
  return sum;
}

void scale_row(double* a, int64_t n, double f) {
  for (int64_t d = 0; d < n; ++d) a[d] *= f;
}

// Strides of a [B, seq, heads, Dh] tensor, in elements.
struct Strides4 {
  int64_t b, s, h, d;
  explicit Strides4(const at::Tensor& t) : b(t.stride(0)), s(t.stride(1)), h(t.stride(2)), d(t.stride(3)) {}
};

// A [rows, cols] matrix over `data` with row stride `ld`, as a tensor view for at::mm_out.
template <typename T>
at::Tensor matrix(T* data, int64_t rows, int64_t cols, int64_t ld, at::ScalarType dtype) {
  return at::from_blob(const_cast<std::remove_const_t<T>*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(dtype));
}

template <typename scalar_t>
void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& pad,   // [B, K] bool, or undefined
                      const at::Tensor& bias,  // [B|1, 1|H, S, K] in acc_t, or undefined
                      double hidden_below, double scale_d, bool causal, const AttnDims& dims,
                      at::Tensor& z, at::Tensor& lse, at::Tensor& pattern) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // K/V readable in place by the GEMMs
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = dims.B, S = dims.S, H = dims.H, Dh = dims.Dh, K = dims.K, Hkv = dims.Hkv;
  const int64_t G = H / Hkv;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t hidden = static_cast<acc_t>(hidden_below);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const Strides4 qs(q), ks(k), vs(v);
  const bool k_direct = kDirect && ks.d == 1, v_direct = kDirect && vs.d == 1;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const bool* padp = pad.defined() ? pad.data_ptr<bool>() : nullptr;
  const acc_t* biasp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
  const int64_t mb_s = bias.defined() ? (bias.size(0) == 1 ? 0 : bias.stride(0)) : 0;
  const int64_t mh_s = bias.defined() ? (bias.size(1) == 1 ? 0 : bias.stride(1)) : 0;
  const int64_t ms_s = bias.defined() ? bias.stride(2) : 0, mk_s = bias.defined() ? bias.stride(3) : 0;
  scalar_t* zp = z.data_ptr<scalar_t>();                                         // [B, S, H, Dh]
  acc_t* lsep = lse.data_ptr<acc_t>();                                            // [B, H, S]
  scalar_t* patp = pattern.defined() ? pattern.data_ptr<scalar_t>() : nullptr;  // [B, H, S, K]

  // Query positions per task: the block holds G heads x nq positions = at most kRowsPerTask rows.
  const int64_t q_block = std::max<int64_t>(1, std::min(S, kRowsPerTask / G));
  const int64_t n_qblocks = (S + q_block - 1) / q_block;
  const int64_t causal_offset = K - S;  // query i sees keys 0 .. K - S + i when causal

  at::parallel_for(0, B * Hkv * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t max_rows = G * q_block;
    std::vector<acc_t> qf(max_rows * Dh), acc(max_rows * Dh), sc(max_rows * kKeyBlock);
    std::vector<acc_t> kbuf(k_direct ? 0 : kKeyBlock * Dh), vbuf(v_direct ? 0 : kKeyBlock * Dh);
    std::vector<acc_t> mx(max_rows), sum(max_rows);
    // With a pattern request the raw scores of the block's rows over all K keys are kept and
    // normalized once each row's log-sum-exp is known: one pass over keys, exact in every dtype.
    std::vector<acc_t> raw(patp ? max_rows * K : 0);
    at::Tensor Qt = matrix(qf.data(), max_rows, Dh, Dh, acc_dtype);
    at::Tensor At = matrix(acc.data(), max_rows, Dh, Dh, acc_dtype);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % n_qblocks, hk = (task / n_qblocks) % Hkv, b = task / (n_qblocks * Hkv);
      const int64_t i0 = qb * q_block, nq = std::min(q_block, S - i0), rows = G * nq;
      // Row r = g * nq + t is query position i0 + t of query head hk * G + g.
      const int64_t key_end = causal ? std::max<int64_t>(0, std::min(K, causal_offset + i0 + nq)) : K;
      // Keys below this are visible to every row of the block: no causal test needed there.
      const int64_t key_all = causal ? std::max<int64_t>(0, std::min(K, causal_offset + i0 + 1)) : K;

      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < nq; ++t) {
          const scalar_t* src = qp + b * qs.b + (i0 + t) * qs.s + (hk * G + g) * qs.h;
          acc_t* dst = qf.data() + (g * nq + t) * Dh;
          for (int64_t d = 0; d < Dh; ++d) dst[d] = static_cast<acc_t>(src[d * qs.d]) * scale;
        }
      std::fill(acc.begin(), acc.begin() + rows * Dh, acc_t(0));
      std::fill(mx.begin(), mx.begin() + rows, neg_inf);
      std::fill(sum.begin(), sum.begin() + rows, acc_t(0));
      at::Tensor Q = Qt.narrow(0, 0, rows), A = At.narrow(0, 0, rows);

      for (int64_t j0 = 0; j0 < key_end; j0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, key_end - j0);
        const scalar_t* kblk = kp + b * ks.b + j0 * ks.s + hk * ks.h;
        const scalar_t* vblk = vp + b * vs.b + j0 * vs.s + hk * vs.h;
        at::Tensor Kb, Vb;
        if (k_direct) {
          Kb = matrix(reinterpret_cast<const acc_t*>(kblk), nk, Dh, ks.s, acc_dtype);
        } else {
          for (int64_t c = 0; c < nk; ++c)
            for (int64_t d = 0; d < Dh; ++d) kbuf[c * Dh + d] = static_cast<acc_t>(kblk[c * ks.s + d * ks.d]);
          Kb = matrix(kbuf.data(), nk, Dh, Dh, acc_dtype);
        }
        if (v_direct) {
          Vb = matrix(reinterpret_cast<const acc_t*>(vblk), nk, Dh, vs.s, acc_dtype);
        } else {
          for (int64_t c = 0; c < nk; ++c)
            for (int64_t d = 0; d < Dh; ++d) vbuf[c * Dh + d] = static_cast<acc_t>(vblk[c * vs.s + d * vs.d]);
          Vb = matrix(vbuf.data(), nk, Dh, Dh, acc_dtype);
        }
        at::Tensor Sb = matrix(sc.data(), rows, nk, kKeyBlock, acc_dtype);
        at::mm_out(Sb, Q, Kb.t());  // scores [rows, nk], scale already in Q

        const bool needs_causal = causal && j0 + nk > key_all;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t g = r / nq, i = i0 + r % nq, h = hk * G + g;
          acc_t* srow = sc.data() + r * kKeyBlock;
          if (needs_causal) {  // keys after K - S + i are hidden for this row
            const int64_t first_hidden = std::max<int64_t>(0, causal_offset + i + 1 - j0);
            for (int64_t c = first_hidden; c < nk; ++c) srow[c] = neg_inf;
          }
          if (padp) {
            const bool* prow = padp + b * K + j0;
            for (int64_t c = 0; c < nk; ++c)
              if (!prow[c]) srow[c] = neg_inf;
          }
          if (biasp) {
            const acc_t* brow = biasp + b * mb_s + h * mh_s + i * ms_s + j0 * mk_s;
            for (int64_t c = 0; c < nk; ++c) {
              const acc_t add = brow[c * mk_s];
              srow[c] = add > hidden ? srow[c] + add : neg_inf;
            }
          }
          if (patp) std::copy(srow, srow + nk, raw.data() + r * K + j0);
          // Online softmax: rescale the running sum and accumulator to the new row maximum.
          const acc_t m_new = row_max(srow, nk, mx[r]);
          if (m_new == neg_inf) {  // nothing visible in this row yet: its weights are all 0
            std::fill(srow, srow + nk, acc_t(0));
            continue;
          }
          const acc_t alpha = mx[r] == neg_inf ? acc_t(0) : static_cast<acc_t>(std::exp(mx[r] - m_new));
          sum[r] = sum[r] * alpha + exp_shift_sum(srow, nk, m_new);
          mx[r] = m_new;
          if (alpha != acc_t(1)) scale_row(acc.data() + r * Dh, Dh, alpha);
        }
        A.addmm_(Sb, Vb);  // acc += P · V
      }

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = r / nq, i = i0 + r % nq, h = hk * G + g;
        const bool empty = sum[r] == acc_t(0);  // no visible key: zeros, never NaN
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / sum[r];
        const acc_t row_lse = empty ? neg_inf : mx[r] + static_cast<acc_t>(std::log(sum[r]));
        scalar_t* zrow = zp + ((b * S + i) * H + h) * Dh;
        const acc_t* arow = acc.data() + r * Dh;
        for (int64_t d = 0; d < Dh; ++d) zrow[d] = static_cast<scalar_t>(arow[d] * inv);
        lsep[(b * H + h) * S + i] = row_lse;
        if (patp) {
          scalar_t* prow = patp + ((b * H + h) * S + i) * K;
          acc_t* rrow = raw.data() + r * K;
          if (empty) {
            std::fill(prow, prow + K, scalar_t(0));
            continue;
          }
          exp_shift_sum(rrow, key_end, row_lse);  // exp(s - lse): the normalized pattern
          for (int64_t j = 0; j < key_end; ++j) prow[j] = static_cast<scalar_t>(rrow[j]);
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
