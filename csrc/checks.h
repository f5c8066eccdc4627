// Argument checks shared by every host function. Each message names the argument, what was expected
// and what was received; TORCH_CHECK_VALUE / _TYPE surface in Python as ValueError / TypeError.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace pyqkv {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// None passed for a Tensor argument arrives as an undefined tensor, whose dim() would claim a 1-D [0].
#define PYQKV_CHECK_DEFINED(t, name, layout) \
  TORCH_CHECK_TYPE((t).defined(), name, ": expected a tensor ", layout, ", got None")

#define PYQKV_CHECK_RANK(t, name, rank, layout)                                                                    \
  do {                                                                                                             \
    PYQKV_CHECK_DEFINED(t, name, layout);                                                                          \
    TORCH_CHECK_VALUE((t).dim() == (rank), name, ": expected a ", rank, "-D tensor ", layout, ", got ", (t).dim(), \
                      "-D with shape ", ::pyqkv::shape_str(t));                                                    \
  } while (0)

#define PYQKV_CHECK_SIZE(t, name, dim, expected, what)                                                              \
  TORCH_CHECK_VALUE((t).size(dim) == (expected), name, ": expected size ", (expected), " at dim ", dim, " (", what, \
                    "), got shape ", ::pyqkv::shape_str(t))

#define PYQKV_CHECK_FLOATING(t, name)                                                                  \
  TORCH_CHECK_TYPE(at::isFloatingType((t).scalar_type()), name,                                        \
                   ": expected a floating-point tensor (float32, float64, bfloat16 or float16), got ", \
                   (t).scalar_type())

#define PYQKV_CHECK_SAME_DTYPE(t, name, ref, ref_name)                                                       \
  TORCH_CHECK_TYPE((t).scalar_type() == (ref).scalar_type(), name, ": expected dtype ", (ref).scalar_type(), \
                   " (the dtype of ", ref_name, "), got ", (t).scalar_type())

#define PYQKV_CHECK_SAME_DEVICE(t, name, ref, ref_name)                                                             \
  TORCH_CHECK_VALUE((t).device() == (ref).device(), name, ": expected device ", (ref).device(), " (the device of ", \
                    ref_name, "), got ", (t).device())

}  // namespace pyqkv
