// Stand-in for <cuda_fp16.h> (tools/cuda_emulate): c10::Half has the same bits and rounding.
#pragma once
#include <c10/util/Half.h>
using __half = c10::Half;
inline __half __float2half_rn(float x) { return c10::Half(x); }
