// Argument checks for kv_append, shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "checks.h"

namespace pyqkv {

inline void check_kv_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                            const at::Tensor& v_new, int64_t start) {
  PYQKV_CHECK_RANK(k_cache, "k_cache", 4, "[B, Hkv, capacity, Dh]");
  PYQKV_CHECK_RANK(k_new, "k_new", 4, "[B, S, Hkv, Dh]");
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache: expected the shape of k_cache ",
                    shape_str(k_cache), ", got ", shape_str(v_cache));
  TORCH_CHECK_VALUE(v_new.sizes() == k_new.sizes(), "v_new: expected the shape of k_new ",
                    shape_str(k_new), ", got ", shape_str(v_new));
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), cap = k_cache.size(2), Dh = k_cache.size(3);
  TORCH_CHECK_VALUE(k_new.size(0) == B && k_new.size(2) == Hkv && k_new.size(3) == Dh,
                    "k_new: expected shape [", B, ", S, ", Hkv, ", ", Dh,
                    "] (B, Hkv, Dh of the cache [B, Hkv, capacity, Dh]), got ", shape_str(k_new));
  const int64_t S = k_new.size(1);
  TORCH_CHECK_VALUE(start >= 0 && start + S <= cap, "start: expected 0 <= start and start + S <= capacity ",
                    cap, " (S = ", S, "), got start=", start);
  // Keys and values written into the same memory would silently overwrite each other. (TooHard, the
  // answer for any non-dense view such as a window of a larger buffer, is not an overlap.)
  const auto overlap = at::get_overlap_status(k_cache, v_cache);
  TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial,
                    "v_cache: expected a tensor that does not overlap k_cache, got one that shares its memory");
  for (auto* p : {&k_cache, &v_cache, &k_new, &v_new}) {
    const char* name = p == &k_cache ? "k_cache" : p == &v_cache ? "v_cache" : p == &k_new ? "k_new" : "v_new";
    PYQKV_CHECK_SAME_DTYPE(*p, name, k_cache, "k_cache");
    PYQKV_CHECK_SAME_DEVICE(*p, name, k_cache, "k_cache");
  }
}

// kv_append for every backend: the cache is [B, Hkv, capacity, Dh], so the new rows are a strided window
// of it, and ATen's copy_ writes them in one pass whatever the strides of k_new (often a view into the
// fused QKV projection): vectorized, parallel on CPU, on the current stream on CUDA. There is no
// arithmetic for a kernel of ours to fuse; one would only save copy_'s set-up (microseconds).
inline void kv_append_aten(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                           const at::Tensor& v_new, int64_t start) {
  check_kv_append(k_cache, v_cache, k_new, v_new, start);
  const int64_t S = k_new.size(1);
  k_cache.narrow(2, start, S).copy_(k_new.transpose(1, 2));
  v_cache.narrow(2, start, S).copy_(v_new.transpose(1, 2));
}

}  // namespace pyqkv
