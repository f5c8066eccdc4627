// PYQKV_HOST_DEVICE marks the small inline functions that both the host code (CPU kernels, plans) and
// the CUDA kernels call, so that each rule is written once.
#pragma once

#ifdef __CUDACC__
#define PYQKV_HOST_DEVICE __host__ __device__
#else
#define PYQKV_HOST_DEVICE
#endif
