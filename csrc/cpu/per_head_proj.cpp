// per_head_proj on CPU: the ATen GEMM formulation in per_head_proj.h.
#include "../per_head_proj.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(pyqkv, CPU, m) { m.impl("per_head_proj", &pyqkv::per_head_proj_aten); }
