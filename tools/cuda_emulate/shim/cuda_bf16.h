// Stand-in for <cuda_bf16.h> (tools/cuda_emulate): c10::BFloat16 has the same bits and rounding.
#pragma once
#include <c10/util/BFloat16.h>
using __nv_bfloat16 = c10::BFloat16;
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return c10::BFloat16(x); }
