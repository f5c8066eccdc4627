"""The Python-side pre-checks of a Bridge call: what Python must say before any hook runs or any state
(a KV cache) changes. Every rule the native ops enforce is checked in C++ (csrc/checks.h,
csrc/attention.h); only what the Bridge knows before the op runs (the input against its weights, the
user's mask against B, S and K = cached + new positions) is checked here, under the Bridge's argument
names. Each message names the argument, what was expected and what was received.
"""

from __future__ import annotations

import numbers
import operator
from typing import Optional

import torch

from pyqkv import _C  # noqa: F401  (registers torch.ops.pyqkv.check_padding_mask, used below)


def describe(obj) -> str:
    """A short description of a received value for error messages."""
    if isinstance(obj, torch.Tensor):
        return f"Tensor {tuple(obj.shape)} {obj.dtype}"
    return type(obj).__name__


def integer(value) -> Optional[int]:
    """The one rule for an integer argument, everywhere (the Bridge's sizes, KVCache's capacity, the ops'
    start and window): any integer type, i.e. one with __index__ (int, numpy's integers, a one-element
    integer tensor), as a plain int; None for anything else: a bool (a flag, not a size: True would read
    as 1), a float (1.5 would truncate) or a str. Each caller raises its own message on None."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    if not hasattr(type(value), "__index__"):
        return None
    try:
        return operator.index(value)
    except TypeError:  # a type with __index__ that refuses this value (a float tensor)
        return None


def positive_int(name: str, value) -> int:
    n = integer(value)
    if n is None or n < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return n


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(p).__name__} {p!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {p}")
    return float(p)


def input_like_weights(x, d_model: int, weight) -> None:
    """x must be [B, S, D] in the dtype and on the device of the Bridge's weights (weight None: a Bridge
    that calls its projection modules, which place and cast inputs as they need)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a Tensor [B, S, D={d_model}], got {describe(x)}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x: expected shape [B, S, D={d_model}], got {tuple(x.shape)}")
    if weight is not None and (x.dtype != weight.dtype or x.device != weight.device):
        raise TypeError(
            f"x: expected {weight.dtype} on {weight.device} (the Bridge's weights), got {x.dtype} on {x.device}"
        )


def attention_mask(mask, B: int, S: int, K: int, H: int, device):
    """(mask for the attention op, causal) from a Bridge's attention_mask: None (causal), a padding mask
    [B, K] (causal as well) or a 4-D mask [B or 1, 1 or H, S, K] (authoritative: no causal mask on top),
    additive float or bool (True = attend, Hugging Face's sdpa masks)."""
    if mask is None:
        return None, True
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a Tensor or None, got {describe(mask)}")
    if mask.device != device:
        raise ValueError(f"attention_mask: expected device {device}, got {mask.device}")
    if mask.dim() == 2:
        if tuple(mask.shape) != (B, K):
            raise ValueError(
                f"attention_mask: expected a padding mask [B, K] = [{B}, {K}] (K = cached + new positions), "
                f"got {tuple(mask.shape)}"
            )
        if mask.is_complex():
            raise TypeError(f"attention_mask: expected bool, integer or float, got {mask.dtype}")
        # The values (a float mask must hold only 0 and 1) are checked by the attention op's own rule in
        # C++ (check_padding_mask in csrc/attention.h), exposed as an op so that this pre-check reaches the
        # op's verdict before any hook fires without a second copy of the rule. It reads the values (a
        # device sync on CUDA) only for a float mask; bool and integer masks are not read.
        torch.ops.pyqkv.check_padding_mask(mask, "attention_mask")
        return mask, True
    if mask.dim() == 4:
        if mask.shape[0] not in (1, B) or mask.shape[1] not in (1, H) or tuple(mask.shape[2:]) != (S, K):
            raise ValueError(
                f"attention_mask: expected a 4-D mask [B or 1, 1 or H, S, K] = [{B}, 1 or {H}, {S}, {K}], "
                f"got {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool and not mask.is_floating_point():  # the op reads bool masks natively
            raise TypeError(f"attention_mask: expected a float additive or bool 4-D mask, got {mask.dtype}")
        return mask, False
    raise ValueError(
        f"attention_mask: expected None, a padding mask [B, K] or a 4-D mask [B, 1 or H, S, K], got "
        f"{mask.dim()}-D {tuple(mask.shape)}"
    )
