// attention on CPU: blocked over keys with an online softmax (one pass over K and V), scale, masks, the
// ALiBi per-key bias and bottom-right causal fused, parallel over batch x KV heads x query blocks. No
// [B,H,S,K] buffer exists unless the pattern is asked for.
//
// Per task, the query rows of all H/Hkv query heads that share one KV head are stacked into one block,
// so each K/V block is read once for the whole group (GQA/MQA without repeating K/V). The two block
// products (Q·Kᵀ and P·V) are GEMMs through ATen (at::mm_out on views of the task's buffers: MKL or
// whatever BLAS torch was built with); float32/float64 K and V with unit inner stride are read in place,
// other layouts and half types are converted block by block into float32. The softmax loops use AVX2
// and FMA when the CPU has them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/strides.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "mask_view.h"
#include "../attention.h"
#include "../attention_plan.h"

namespace pyqkv {
namespace {

// Query rows per task (all heads of a KV group together), and the size of a task's score block
// (rows x keys). With many rows a key block is kScoreBlock / rows = 256 keys; with few rows (decode:
// one position, G heads) key blocks grow up to kMaxKeyBlock, so a step makes a few GEMM calls rather
// than many tiny ones (each costs microseconds of dispatch, as much as a 1 x 256 x 64 product).
// Buffers (Q block, scores, accumulator, a converted K/V block) stay within a few hundred KB.
constexpr int64_t kRowsPerTask = 128;
constexpr int64_t kScoreBlock = 128 * 256;
constexpr int64_t kMinKeyBlock = 256;
constexpr int64_t kMaxKeyBlock = 4096;
// Small problems (decode steps of small models, many tiny forwards) are bound by per-call cost, not
// arithmetic: below kLoopWork multiply-adds per task (rows x K x Dh) the two block products are plain
// loops instead of at::mm calls (each costs microseconds of dispatch and tensor set-up), and below
// kSerialWork for the whole call the tasks run on the calling thread (waking the thread pool costs more).
constexpr int64_t kLoopWork = 16384;
constexpr int64_t kSerialWork = 65536;

// ---- The softmax inner loops ---------------------------------------------------------------------
// Per key block each row needs a max, exp(s - max) with its sum, and a rescale of its accumulator.
// Portable scalar versions below; on x86-64 CPUs with AVX2+FMA (checked once at run time) 8-wide
// intrinsic versions run instead. The compiler does not vectorize these loops by itself: the float
// reductions would need -ffast-math, and the exp's bit manipulation defeats it.

// exp for float32 (Cephes' expf polynomial, about 1 ulp). x below -87.3 (where expf is denormal or 0),
// including -inf for hidden keys, gives exactly 0.
inline float exp_scalar(float x) {
  if (x < -87.3f) return 0.f;
  x = std::min(x, 88.37f);
  const float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.f;
  return std::ldexp(y, static_cast<int>(fx));
}

float row_max_scalar(const float* s, int64_t n, float m) {
  for (int64_t c = 0; c < n; ++c) m = std::max(m, s[c]);
  return m;
}

float exp_shift_sum_scalar(float* s, int64_t n, float m) {
  float sum = 0;
  for (int64_t c = 0; c < n; ++c) sum += (s[c] = exp_scalar(s[c] - m));
  return sum;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYQKV_HAVE_AVX2_PATH 1
#define PYQKV_AVX2 __attribute__((target("avx2,fma")))

PYQKV_AVX2 inline __m256 exp_avx2(__m256 x) {
  const __m256 hidden = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);  // also true for -inf
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.37f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fmadd_ps(fx, _mm256_set1_ps(2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(hidden, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

PYQKV_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

PYQKV_AVX2 float row_max_avx2(const float* s, int64_t n, float m) {
  __m256 acc = _mm256_set1_ps(m);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(s + c));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  m = std::max(_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_movehdup_ps(h)));
  return row_max_scalar(s + c, n - c, m);
}

PYQKV_AVX2 float exp_shift_sum_avx2(float* s, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + c), mv));
    _mm256_storeu_ps(s + c, e);
    acc = _mm256_add_ps(acc, e);
  }
  return hsum_avx2(acc) + exp_shift_sum_scalar(s + c, n - c, m);
}
#endif

// Chosen once: the AVX2 versions when this CPU has AVX2 and FMA.
struct SoftmaxLoops {
  float (*row_max)(const float*, int64_t, float) = row_max_scalar;
  float (*exp_shift_sum)(float*, int64_t, float) = exp_shift_sum_scalar;
  SoftmaxLoops() {
#ifdef PYQKV_HAVE_AVX2_PATH
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      row_max = row_max_avx2;
      exp_shift_sum = exp_shift_sum_avx2;
    }
#endif
  }
};
const SoftmaxLoops kLoops;

inline float row_max(const float* s, int64_t n, float init) { return kLoops.row_max(s, n, init); }
inline float exp_shift_sum(float* s, int64_t n, float m) { return kLoops.exp_shift_sum(s, n, m); }

inline void scale_row(float* a, int64_t n, float f) {
  for (int64_t d = 0; d < n; ++d) a[d] *= f;
}

// float64 serves gradcheck and the float64 backward: plain loops.
inline double row_max(const double* s, int64_t n, double init) {
  for (int64_t c = 0; c < n; ++c) init = std::max(init, s[c]);
  return init;
}

inline double exp_shift_sum(double* s, int64_t n, double m) {
  double sum = 0;
  for (int64_t c = 0; c < n; ++c) sum += (s[c] = std::exp(s[c] - m));
  return sum;
}

inline void scale_row(double* a, int64_t n, double f) {
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
                      const at::Tensor& pad,    // [B, K] bool, or undefined
                      const at::Tensor& bias,   // [B|1, 1|H, S, K] in acc_t, or undefined
                      const at::Tensor& vis4,   // [B|1, 1|H, S, K] bool (true = attend), or undefined
                      const at::Tensor& alibi,  // [B|1, H|1, K] in acc_t, or undefined
                      double hidden_below, double scale_d, bool causal, const AttnDims& dims, at::Tensor& z,
                      at::Tensor& lse, at::Tensor& pattern) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;  // K/V readable in place by the GEMMs
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = dims.B, S = dims.S, H = dims.H, Dh = dims.Dh, K = dims.K, Hkv = dims.Hkv;
  const int64_t G = H / Hkv;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t cap = static_cast<acc_t>(dims.softcap);  // 0: off
  const int64_t window = dims.window;                  // 0: none
  const acc_t hidden = static_cast<acc_t>(hidden_below);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const Strides4 qs(q), ks(k), vs(v);
  const bool k_direct = kDirect && ks.d == 1, v_direct = kDirect && vs.d == 1;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const cpu::MaskView<acc_t> mv(pad, bias, vis4, alibi);  // pointers and strides of the masks and ALiBi
  scalar_t* zp = z.data_ptr<scalar_t>();                                        // [B, S, H, Dh]
  acc_t* lsep = lse.data_ptr<acc_t>();                                          // [B, H, S]
  scalar_t* patp = pattern.defined() ? pattern.data_ptr<scalar_t>() : nullptr;  // [B, H, S, K]

  // Query positions per task: the block holds G heads x nq positions = at most kRowsPerTask rows.
  const int64_t q_block = std::max<int64_t>(1, std::min(S, kRowsPerTask / G));
  const int64_t key_block = std::clamp<int64_t>(kScoreBlock / (G * q_block), kMinKeyBlock, kMaxKeyBlock);
  const int64_t n_qblocks = (S + q_block - 1) / q_block;
  const int64_t causal_offset = K - S;  // query i sees keys 0 .. K - S + i when causal
  const int64_t n_tasks = B * Hkv * n_qblocks;
  const bool loops = G * q_block * K * Dh <= kLoopWork;
  const int64_t grain = n_tasks * G * q_block * K * Dh <= kSerialWork ? n_tasks : 1;

  at::parallel_for(0, n_tasks, grain, [&](int64_t begin, int64_t end) {
    const int64_t max_rows = G * q_block;
    std::vector<acc_t> qf(max_rows * Dh), acc(max_rows * Dh), sc(max_rows * key_block);
    // V is copied when it cannot be read in place, and for blocks holding padded keys (2-D mask false):
    // their rows are zeroed there, so whatever a padded slot holds (NaN included) never reaches z through
    // its weight 0 (the CUDA kernels zero padded V rows the same way).
    std::vector<acc_t> kbuf(k_direct ? 0 : key_block * Dh), vbuf(v_direct && !mv.pad ? 0 : key_block * Dh);
    std::vector<acc_t> mx(max_rows), sum(max_rows);
    // With a pattern request the raw scores of the block's rows over all K keys are kept and
    // normalized once each row's log-sum-exp is known: one pass over keys, exact in every dtype. For
    // float32/float64 they are kept in the pattern output itself; half types stage them in float32.
    std::vector<acc_t> raw(patp && !kDirect ? max_rows * K : 0);
    // The GEMM path's views of the task's Q block and accumulator (none on the loop path).
    at::Tensor Qt = loops ? at::Tensor() : matrix(qf.data(), max_rows, Dh, Dh, acc_dtype);
    at::Tensor At = loops ? at::Tensor() : matrix(acc.data(), max_rows, Dh, Dh, acc_dtype);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % n_qblocks, hk = (task / n_qblocks) % Hkv, b = task / (n_qblocks * Hkv);
      const int64_t i0 = qb * q_block, nq = std::min(q_block, S - i0), rows = G * nq;
      // Row r = g * nq + t is query position i0 + t of query head hk * G + g.
      const int64_t key_end = causal ? std::max<int64_t>(0, std::min(K, causal_offset + i0 + nq)) : K;
      // Keys below this are visible to every row of the block: no causal test needed there.
      const int64_t key_all = causal ? std::max<int64_t>(0, std::min(K, causal_offset + i0 + 1)) : K;
      // With a sliding window, keys before the first row's window are hidden from every row: skipped.
      const int64_t key_begin = std::min(key_end, first_visible_key(i0, S, K, window));

      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < nq; ++t) {
          const scalar_t* src = qp + b * qs.b + (i0 + t) * qs.s + (hk * G + g) * qs.h;
          acc_t* dst = qf.data() + (g * nq + t) * Dh;
          for (int64_t d = 0; d < Dh; ++d) dst[d] = static_cast<acc_t>(src[d * qs.d]) * scale;
        }
      std::fill(acc.begin(), acc.begin() + rows * Dh, acc_t(0));
      std::fill(mx.begin(), mx.begin() + rows, neg_inf);
      std::fill(sum.begin(), sum.begin() + rows, acc_t(0));
      at::Tensor Q = loops ? Qt : Qt.narrow(0, 0, rows), A = loops ? At : At.narrow(0, 0, rows);
      // Where row r's raw scores over all K keys are kept (pattern requests only).
      auto raw_row = [&](int64_t r) -> acc_t* {
        if constexpr (kDirect) {
          const int64_t h = hk * G + r / nq, i = i0 + r % nq;
          return reinterpret_cast<acc_t*>(patp + ((b * H + h) * S + i) * K);
        } else {
          return raw.data() + r * K;
        }
      };

      for (int64_t j0 = key_begin; j0 < key_end; j0 += key_block) {
        const int64_t nk = std::min(key_block, key_end - j0);
        const scalar_t* kblk = kp + b * ks.b + j0 * ks.s + hk * ks.h;
        const scalar_t* vblk = vp + b * vs.b + j0 * vs.s + hk * vs.h;
        // A [nk, Dh] block of K or V as a matrix: read in place when the GEMM can, else converted.
        const bool* prow_blk = mv.pad ? mv.pad + b * K + j0 : nullptr;  // this block's padding flags
        const bool has_padded = prow_blk && std::find(prow_blk, prow_blk + nk, false) != prow_blk + nk;
        // Returns the block's first row and its row stride (unit inner stride).
        auto block = [&](const scalar_t* src, const Strides4& st, bool direct, std::vector<acc_t>& buf,
                         bool zero_padded) -> std::pair<const acc_t*, int64_t> {
          if (direct && !zero_padded) return {reinterpret_cast<const acc_t*>(src), st.s};
          for (int64_t c = 0; c < nk; ++c) {
            acc_t* dst = buf.data() + c * Dh;
            if (zero_padded && !prow_blk[c]) {
              std::fill(dst, dst + Dh, acc_t(0));
              continue;
            }
            for (int64_t d = 0; d < Dh; ++d) dst[d] = static_cast<acc_t>(src[c * st.s + d * st.d]);
          }
          return {buf.data(), Dh};
        };
        // K needs no zeroing: a padded key's score is replaced by -inf below, whatever it was.
        const auto [Kp, k_ld] = block(kblk, ks, k_direct, kbuf, false);
        const auto [Vp, v_ld] = block(vblk, vs, v_direct, vbuf, has_padded);
        // scores [rows, nk] = Q · Kᵀ, the scale already in Q
        if (loops) {
          for (int64_t r = 0; r < rows; ++r) {
            const acc_t* qr = qf.data() + r * Dh;
            acc_t* srow = sc.data() + r * key_block;
            for (int64_t c = 0; c < nk; ++c) {
              const acc_t* kr = Kp + c * k_ld;
              acc_t dot = 0;
              for (int64_t d = 0; d < Dh; ++d) dot += qr[d] * kr[d];
              srow[c] = dot;
            }
          }
        } else {
          at::Tensor Sb = matrix(sc.data(), rows, nk, key_block, acc_dtype);
          at::mm_out(Sb, Q, matrix(Kp, nk, Dh, k_ld, acc_dtype).t());
        }

        const bool needs_causal = causal && j0 + nk > key_all;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t g = r / nq, i = i0 + r % nq, h = hk * G + g;
          acc_t* srow = sc.data() + r * key_block;
          if (cap > 0) {  // softcapping comes first: on scale * q.k, before any bias
            for (int64_t c = 0; c < nk; ++c) srow[c] = softcapped(srow[c], cap);
          }
          if (window > 0) {  // keys up to K - S + i - W are outside this row's window
            const int64_t n_out = std::min<int64_t>(nk, first_visible_key(i, S, K, window) - j0);
            for (int64_t c = 0; c < n_out; ++c) srow[c] = neg_inf;
          }
          if (mv.alibi) {  // a per-key bias, the same for every query position; masks below still hide
            const acc_t* arow = mv.alibi + b * mv.ab + h * mv.ah + j0 * mv.ak;
            if (mv.ak == 1) {
              for (int64_t c = 0; c < nk; ++c) srow[c] += arow[c];
            } else {
              for (int64_t c = 0; c < nk; ++c) srow[c] += arow[c * mv.ak];
            }
          }
          if (needs_causal) {  // keys after K - S + i are hidden for this row
            const int64_t first_hidden = std::max<int64_t>(0, causal_offset + i + 1 - j0);
            for (int64_t c = first_hidden; c < nk; ++c) srow[c] = neg_inf;
          }
          if (has_padded) {
            for (int64_t c = 0; c < nk; ++c)
              if (!prow_blk[c]) srow[c] = neg_inf;
          }
          if (mv.vis4) {
            const bool* vrow = mv.vis4 + b * mv.mb + h * mv.mh + i * mv.ms + j0 * mv.mk;
            for (int64_t c = 0; c < nk; ++c)
              if (!vrow[c * mv.mk]) srow[c] = neg_inf;
          }
          if (mv.bias) {
            const acc_t* brow = mv.bias + b * mv.mb + h * mv.mh + i * mv.ms + j0 * mv.mk;
            for (int64_t c = 0; c < nk; ++c) {
              const acc_t add = brow[c * mv.mk];
              srow[c] = additive_visible(add, hidden) ? srow[c] + add : neg_inf;
            }
          }
          if (patp) std::copy(srow, srow + nk, raw_row(r) + j0);
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
        // acc += P · V
        if (loops) {
          for (int64_t r = 0; r < rows; ++r) {
            const acc_t* prow = sc.data() + r * key_block;
            acc_t* ar = acc.data() + r * Dh;
            for (int64_t c = 0; c < nk; ++c) {
              const acc_t p = prow[c];
              const acc_t* vr = Vp + c * v_ld;
              for (int64_t d = 0; d < Dh; ++d) ar[d] += p * vr[d];
            }
          }
        } else {
          A.addmm_(matrix(sc.data(), rows, nk, key_block, acc_dtype), matrix(Vp, nk, Dh, v_ld, acc_dtype));
        }
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
          if (empty) {
            std::fill(prow, prow + K, scalar_t(0));
            continue;
          }
          acc_t* rrow = raw_row(r);
          exp_shift_sum(rrow + key_begin, key_end - key_begin, row_lse);  // exp(s - lse): the normalized pattern
          if constexpr (!kDirect) {
            for (int64_t j = key_begin; j < key_end; ++j) prow[j] = static_cast<scalar_t>(rrow[j]);
          }
          std::fill(prow, prow + key_begin, scalar_t(0));    // keys before the window, skipped
          std::fill(prow + key_end, prow + K, scalar_t(0));  // causally skipped keys
        }
      }
    }
  });
}

// The pattern output [B, H, S, K] is the one large buffer this op makes, and a fresh large allocation
// is mmapped memory that faults in one 4 KiB page at a time on first write: for a 50 MB pattern that
// costs more than computing it. So (1) buffers of 4 MiB and more are taken 2 MiB-aligned and advised
// as transparent huge pages (honoured where THP is in "madvise" or "always" mode), 512x fewer faults;
// and (2) the memory of the last such buffer is kept and handed out again, as a new tensor, by the next
// call that needs as many bytes when nothing else holds it any more (no tensor, view or Python object:
// the storage's use count is the cache's own), so a read-only hook_pattern or run_with_cache that drops
// the pattern after each layer writes into pages that are already mapped. A pattern that is still held
// (kept by the user, saved for a backward) is never reused; the cost is one retained buffer.
struct PatternBuffer {
  std::mutex mutex;
  c10::Storage storage;  // the last large pattern's memory
};
PatternBuffer& pattern_buffer() {
  static PatternBuffer* buffer = new PatternBuffer();  // never destroyed: safe at interpreter exit
  return *buffer;
}

at::Tensor empty_pattern(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHuge = size_t(2) << 20;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (bytes < 2 * kHuge) return at::empty(sizes, options);
  PatternBuffer& cache = pattern_buffer();
  std::lock_guard<std::mutex> lock(cache.mutex);
  if (!cache.storage || cache.storage.nbytes() != bytes || cache.storage.use_count() != 1) {
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHuge, bytes) != 0) return at::empty(sizes, options);
#ifdef MADV_HUGEPAGE
    madvise(ptr, bytes, MADV_HUGEPAGE);  // advice only: on failure the pages are ordinary
#endif
    cache.storage =
        at::from_blob(ptr, {static_cast<int64_t>(bytes)}, [](void* p) { free(p); }, options.dtype(at::kByte)).storage();
  }
  return at::empty({0}, options).set_(cache.storage, 0, sizes, c10::contiguous_strides(sizes));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                                                             double scale, bool causal, bool return_pattern,
                                                             const c10::optional<at::Tensor>& alibi,
                                                             c10::optional<double> softcap,
                                                             c10::optional<int64_t> window) {
  const AttnDims d = check_attention(q, k, v, mask, alibi, causal, softcap, window);
  // The backend table decides even here: a forced CUDA backend refuses CPU tensors with its reasons.
  plan::choose_or_throw(plan::make_query(q, k, v, mask, d, causal, return_pattern, alibi.has_value(),
                                         plan::DeviceInfo{}, plan::this_torch_build()));
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor z = at::empty({d.B, d.S, d.H, d.Dh}, q.options());
  at::Tensor lse = at::empty({d.B, d.H, d.S}, q.options().dtype(acc_dtype));
  at::Tensor pattern = return_pattern ? empty_pattern({d.B, d.H, d.S, d.K}, q.options()) : at::empty({0}, q.options());
  if (d.B * d.S * d.H == 0) return {z, lse, pattern};
  if (d.K == 0) {  // no keys at all: every row is empty
    z.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    if (return_pattern) pattern.zero_();
    return {z, lse, pattern};
  }
  at::Tensor pad, bias, vis4;
  double hidden = -std::numeric_limits<double>::infinity();
  if (d.mask == MaskKind::kPadding) {
    pad = (*mask != 0).contiguous();  // O(B*K): a bool per key
  } else if (d.mask == MaskKind::kBool4d) {
    vis4 = *mask;  // read in place through its strides (HF's expanded views)
  } else if (d.mask == MaskKind::kAdditive4d) {
    hidden = hidden_threshold(mask->scalar_type());
    // Read in place through its strides when already in the accumulation dtype (HF's float32 masks,
    // often expanded views); other dtypes are converted once.
    bias = mask->scalar_type() == acc_dtype ? *mask : mask->to(acc_dtype);
  }
  const at::Tensor alibi_acc = alibi_in(alibi, acc_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_cpu", [&] {
    at::Tensor pat = return_pattern ? pattern : at::Tensor();
    attention_kernel<scalar_t>(q, k, v, pad, bias, vis4, alibi_acc, hidden, scale, causal, d, z, lse, pat);
  });
  return {z, lse, pattern};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CPU, m) { m.impl("attention", &attention_cpu); }

}  // namespace pyqkv
