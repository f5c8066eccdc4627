// pyqkv::check_padding_mask: the 2-D padding mask rule of attention (check_padding_mask in attention.h,
// which check_attention_args applies) exposed as an op, so that a caller checking before it runs anything
// (the Bridge's Python pre-check, pyqkv/checks.py) reaches the attention op's verdict without a second
// copy of the rule. CompositeImplicitAutograd: every device; nothing is computed or returned.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "attention.h"

namespace pyqkv {
namespace {

void check_padding_mask_op(const at::Tensor& mask, const std::string& name) {
  PYQKV_CHECK_RANK(mask, name, 2, "[B, K] (a padding mask)");
  check_padding_mask(mask, name);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyqkv, CompositeImplicitAutograd, m) { m.impl("check_padding_mask", &check_padding_mask_op); }

}  // namespace pyqkv
