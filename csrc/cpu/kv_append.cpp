// kv_append on CPU: in-place row writes into a preallocated cache; no reallocation, no torch.cat.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../kv_append.h"

namespace pyqkv {
namespace {

void kv_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                   const at::Tensor& v_new, int64_t start) {
  check_kv_append(k_cache, v_cache, k_new, v_new, start);
  // The cache is [B, Hkv, capacity, Dh]: the new rows are a strided window of it. copy_ is one pass of
  // element moves, vectorized and parallel in ATen, whatever the strides of k_new (often a view into
  // the fused QKV projection).
  const int64_t S = k_new.size(1);
  k_cache.narrow(2, start, S).copy_(k_new.transpose(1, 2));
  v_cache.narrow(2, start, S).copy_(v_new.transpose(1, 2));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CPU, m) { m.impl("kv_append", &kv_append_cpu); }

}  // namespace pyqkv
