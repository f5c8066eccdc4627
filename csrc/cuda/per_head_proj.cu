// per_head_proj on CUDA: the ATen GEMM formulation in per_head_proj.h, which runs on cuBLAS through ATen
// (current stream, device guard and all) without any code of ours on the device.
#include <torch/library.h>

#include "../per_head_proj.h"

TORCH_LIBRARY_IMPL(pyqkv, CUDA, m) { m.impl("per_head_proj", &pyqkv::per_head_proj_aten); }
