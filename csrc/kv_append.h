// Argument checks for kv_append, shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstring>

#include "checks.h"

namespace pyqkv {

// Whether two tensors of one dtype share at least one element of memory. ATen's get_overlap_status
// answers TooHard for any non-dense view (a window of a larger buffer, an interleaved half of one), so
// those are decided here, exactly: from the element offsets that sizes, strides and storage offsets give.
// Only metadata is read (on the CPU, whatever the device), and the exact pass runs only for two views of
// one storage whose address ranges intersect, which separate caches never are.
inline bool share_an_element(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto status = at::get_overlap_status(a, b);
  if (status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial) return true;
  if (status == at::MemOverlapStatus::No || !a.storage().is_alias_of(b.storage())) return false;
  auto extent = [](const at::Tensor& t) {  // [first, last] element offset in the storage
    int64_t lo = t.storage_offset(), hi = lo;
    for (int64_t d = 0; d < t.dim(); ++d) (t.stride(d) < 0 ? lo : hi) += (t.size(d) - 1) * t.stride(d);
    return std::make_pair(lo, hi);
  };
  const auto [a_lo, a_hi] = extent(a);
  const auto [b_lo, b_hi] = extent(b);
  if (a_hi < b_lo || b_hi < a_lo) return false;
  auto offsets = [](const at::Tensor& t) {
    const auto opts = at::TensorOptions().dtype(at::kLong);
    at::Tensor off = at::full({1}, t.storage_offset(), opts);
    for (int64_t d = 0; d < t.dim(); ++d)
      off = (off.unsqueeze(-1) + at::arange(t.size(d), opts) * t.stride(d)).flatten();
    return off;
  };
  return at::isin(offsets(a), offsets(b)).any().item<bool>();
}

// The same elements in the same order: writing one into the other is a no-op, not a corruption.
inline bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.storage().is_alias_of(b.storage()) && a.storage_offset() == b.storage_offset() && a.sizes() == b.sizes() &&
         a.strides() == b.strides();
}

inline void check_kv_append(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                            const at::Tensor& v_new, int64_t start) {
  PYQKV_CHECK_RANK(k_cache, "k_cache", 4, "[B, Hkv, capacity, Dh]");
  PYQKV_CHECK_DEFINED(v_cache, "v_cache", "[B, Hkv, capacity, Dh]");
  PYQKV_CHECK_RANK(k_new, "k_new", 4, "[B, S, Hkv, Dh]");
  PYQKV_CHECK_DEFINED(v_new, "v_new", "[B, S, Hkv, Dh]");
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "v_cache: expected the shape of k_cache ", shape_str(k_cache),
                    ", got ", shape_str(v_cache));
  TORCH_CHECK_VALUE(v_new.sizes() == k_new.sizes(), "v_new: expected the shape of k_new ", shape_str(k_new), ", got ",
                    shape_str(v_new));
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), cap = k_cache.size(2), Dh = k_cache.size(3);
  TORCH_CHECK_VALUE(k_new.size(0) == B && k_new.size(2) == Hkv && k_new.size(3) == Dh, "k_new: expected shape [", B,
                    ", S, ", Hkv, ", ", Dh, "] (B, Hkv, Dh of the cache [B, Hkv, capacity, Dh]), got ",
                    shape_str(k_new));
  const int64_t S = k_new.size(1);
  // Written as start <= cap - S: start + S could wrap around for a start near INT64_MAX.
  TORCH_CHECK_VALUE(start >= 0 && S <= cap && start <= cap - S, "start: expected 0 <= start and start + S <= capacity ",
                    cap, " (S = ", S, "), got start=", start);
  for (auto* p : {&k_cache, &v_cache, &k_new, &v_new}) {
    const char* name = p == &k_cache ? "k_cache" : p == &v_cache ? "v_cache" : p == &k_new ? "k_new" : "v_new";
    PYQKV_CHECK_SAME_DTYPE(*p, name, k_cache, "k_cache");
    PYQKV_CHECK_SAME_DEVICE(*p, name, k_cache, "k_cache");
  }
  // A cache position that aliases another (an expand()ed view) would hold the last row written to it.
  for (auto* p : {&k_cache, &v_cache}) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(*p) != at::MemOverlap::Yes, p == &k_cache ? "k_cache" : "v_cache",
                      ": expected a tensor whose elements do not share memory, got one with a zero stride (strides ",
                      p->strides(), "); clone() it");
  }
  // Keys and values written into the same memory would silently overwrite each other.
  TORCH_CHECK_VALUE(!share_an_element(k_cache, v_cache),
                    "v_cache: expected a tensor that does not overlap k_cache, got one that shares its memory");
  // A source that overlaps a row being written would be read after it is overwritten (all but the
  // no-op of writing a view onto itself). Only a source in a cache's own storage can (the usual source is
  // a view of the QKV projection): the views below are made only then.
  const bool k_aliases =
      k_new.storage().is_alias_of(k_cache.storage()) || k_new.storage().is_alias_of(v_cache.storage());
  const bool v_aliases =
      v_new.storage().is_alias_of(k_cache.storage()) || v_new.storage().is_alias_of(v_cache.storage());
  if (!k_aliases && !v_aliases) return;
  const at::Tensor k_rows = k_cache.narrow(2, start, S).transpose(1, 2),
                   v_rows = v_cache.narrow(2, start, S).transpose(1, 2);
  TORCH_CHECK_VALUE(same_view(k_rows, k_new) || !share_an_element(k_rows, k_new),
                    "k_new: expected a tensor that does not overlap the k_cache rows it is written to, got one that "
                    "shares their memory");
  TORCH_CHECK_VALUE(same_view(v_rows, v_new) || !share_an_element(v_rows, v_new),
                    "v_new: expected a tensor that does not overlap the v_cache rows it is written to, got one that "
                    "shares their memory");
  TORCH_CHECK_VALUE(!share_an_element(k_rows, v_new),
                    "v_new: expected a tensor that does not overlap the k_cache rows written before it is read, got "
                    "one that shares their memory");
}

// kv_append for every backend: the cache is [B, Hkv, capacity, Dh], so the new rows are a strided window
// of it, and ATen's copy_ writes them in one pass whatever the strides of k_new (often a view into the
// fused QKV projection): vectorized, parallel on CPU, on the current stream on CUDA. There is no
// arithmetic for a kernel of ours to fuse; one would only save copy_'s set-up (microseconds).
inline void copy_new_rows(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                          const at::Tensor& v_new, int64_t start) {
  const int64_t S = k_new.size(1);
  k_cache.narrow(2, start, S).copy_(k_new.transpose(1, 2));
  v_cache.narrow(2, start, S).copy_(v_new.transpose(1, 2));
}

inline void kv_append_aten(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                           const at::Tensor& v_new, int64_t start) {
  check_kv_append(k_cache, v_cache, k_new, v_new, start);
  copy_new_rows(k_cache, v_cache, k_new, v_new, start);
}

// kv_append on the CPU for a few rows (a decode step): when every tensor has unit stride over Dh, each of
// the B x S x Hkv rows is one memcpy, without copy_'s set-up, which costs more than the copy itself at
// that size. Larger appends (a prefill) take copy_, vectorized and parallel.
inline void kv_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                          const at::Tensor& v_new, int64_t start) {
  constexpr int64_t kRowCopyElements = 1 << 15;
  check_kv_append(k_cache, v_cache, k_new, v_new, start);
  const bool unit = k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && k_new.stride(3) == 1 && v_new.stride(3) == 1;
  if (!unit || k_new.numel() > kRowCopyElements) return copy_new_rows(k_cache, v_cache, k_new, v_new, start);
  const int64_t B = k_new.size(0), S = k_new.size(1), Hkv = k_new.size(2);
  const int64_t e = k_new.element_size();
  const size_t row_bytes = static_cast<size_t>(k_new.size(3) * e);
  auto write_rows = [&](const at::Tensor& cache, const at::Tensor& fresh) {
    char* dst = static_cast<char*>(cache.data_ptr());
    const char* src = static_cast<const char*>(fresh.data_ptr());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t h = 0; h < Hkv; ++h)
          std::memcpy(dst + (b * cache.stride(0) + h * cache.stride(1) + (start + s) * cache.stride(2)) * e,
                      src + (b * fresh.stride(0) + s * fresh.stride(1) + h * fresh.stride(2)) * e, row_bytes);
  };
  if (k_new.numel() == 0) return;
  write_rows(k_cache, k_new);
  write_rows(v_cache, v_new);
}

}  // namespace pyqkv
