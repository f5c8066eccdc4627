// Stand-in for <mma.h> (tools/cuda_emulate): WMMA 16x16x16 fragments as whole matrices held by every
// lane; products are exact, sums in float32 in k order (the hardware's order inside an MMA differs, so
// results agree to float32 rounding, not bitwise). Collective stores are done by lane 0 only, so a read
// by another lane without __syncwarp() in between sees stale data. Pointers must be 32-byte aligned and
// leading dimensions multiples of 16 bytes, as on the GPU.
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[16][16];
};

inline void check_ptr(const void* p, unsigned ld, size_t elem) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("wmma: pointer not 32-byte aligned");
  if ((ld * elem) % 16 != 0) emu::fail("wmma: leading dimension not a multiple of 16 bytes");
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  check_ptr(p, ld, sizeof(T));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = static_cast<float>(std::is_same_v<Layout, row_major> ? p[r * ld + c] : p[c * ld + r]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ld, layout_t l) {
  check_ptr(p, ld, sizeof(float));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = l == mem_row_major ? p[r * ld + c] : p[c * ld + r];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t l) {
  check_ptr(p, ld, sizeof(float));
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ld + c] : p[c * ld + r]) = f.v[r][c];
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float x) {
  for (auto& row : f.v)
    for (float& e : row) e = x;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float s = c.v[r][n];
      for (int k = 0; k < 16; ++k) s += a.v[r][k] * b.v[k][n];
      out[r][n] = s;
    }
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) d.v[r][n] = out[r][n];
}

}  // namespace wmma
}  // namespace nvcuda
