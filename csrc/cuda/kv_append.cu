// kv_append on CUDA: in-place row writes into a preallocated cache (kv_append_aten in kv_append.h, the
// same code as on CPU), under a guard for the cache's device; no reallocation, no torch.cat.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kv_append.h"

namespace pyqkv {
namespace {

void kv_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                    const at::Tensor& v_new, int64_t start) {
  const c10::cuda::CUDAGuard guard(k_cache.device());
  kv_append_aten(k_cache, v_cache, k_new, v_new, start);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CUDA, m) { m.impl("kv_append", &kv_append_cuda); }

}  // namespace pyqkv
