// kv_append on CPU: in-place row writes into a preallocated cache (kv_append_cpu in kv_append.h: one
// memcpy per row for a decode step, ATen's copy_ for larger appends); no reallocation, no torch.cat.
#include "../kv_append.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(pyqkv, CPU, m) { m.impl("kv_append", &pyqkv::kv_append_cpu); }
