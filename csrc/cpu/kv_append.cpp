// kv_append on CPU: in-place row writes into a preallocated cache (kv_append_aten in kv_append.h);
// no reallocation, no torch.cat.
#include "../kv_append.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(pyqkv, CPU, m) { m.impl("kv_append", &pyqkv::kv_append_aten); }
