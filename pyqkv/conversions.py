"""Conversion rules between the layout the kernels use and the hook format (SPEC §3b).

`convert` takes a tensor from the kernel layout to the hook format; `revert` takes a hook's tensor back.
The defaults are zero-copy views written as einops patterns, so a reader sees each layout in one line.
A user may pass their own rule for any hook point: an einops pattern string whose left side is the
kernel layout below, or any object with `convert(tensor)` and `revert(tensor)`. Rules hold no per-call
state; they only ever run when a hook (or the cache) asks for the point.

Kernel layouts (B batch, S positions, K key positions, H heads, Hkv KV heads, Dh head dim, D model dim):

    hook_in, hook_out                       [B, S, D]
    hook_attn_in, hook_q_input              [B, S, H, D]
    hook_k_input, hook_v_input              [B, S, Hkv, D]
    hook_q, hook_rot_q                      [B, S, H*Dh]    (a view into the fused QKV projection)
    hook_k, hook_v, hook_rot_k              [B, S, Hkv*Dh]  (likewise)
    hook_attn_scores, hook_pattern          [B, H, S, K]
    hook_z                                  [B, S, H*Dh]    (the output projection's input)
    hook_result                             [B, S, H, D]
"""

from __future__ import annotations

import re

import einops

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Rearrange:
    """An einops rearrange and its inverse. `axes` fixes axis sizes the pattern cannot infer
    (e.g. d=Dh to split (h d)); only the axes that the pattern names are passed to einops."""

    def __init__(self, pattern: str, **axes: int):
        if "->" not in pattern:
            raise ValueError(f"conversion pattern: expected 'kernel layout -> hook format', got {pattern!r}")
        left, right = (side.strip() for side in pattern.split("->"))
        self.pattern = f"{left} -> {right}"
        self.inverse = f"{right} -> {left}"
        used = set(_IDENT.findall(pattern))
        self.axes = {k: v for k, v in axes.items() if k in used}

    def convert(self, tensor):
        return einops.rearrange(tensor, self.pattern, **self.axes)

    def revert(self, tensor):
        return einops.rearrange(tensor, self.inverse, **self.axes)

    def __repr__(self) -> str:
        return f"Rearrange({self.pattern!r})"


class Identity:
    """The kernel layout is already the hook format."""

    def convert(self, tensor):
        return tensor

    def revert(self, tensor):
        return tensor

    def __repr__(self) -> str:
        return "Identity()"


# The default hook-format rule of each point, as a pattern (None: the kernel layout is the hook format).
DEFAULT_PATTERNS = {
    "hook_q": "b s (h d) -> b s h d",
    "hook_k": "b s (h d) -> b s h d",
    "hook_v": "b s (h d) -> b s h d",
    "hook_rot_q": "b s (h d) -> b s h d",
    "hook_rot_k": "b s (h d) -> b s h d",
    "hook_z": "b s (h d) -> b s h d",
}


def make_rule(name: str, spec, *, d_head: int):
    """A rule object for hook point `name` from None (the default), a pattern string or a rule object."""
    if spec is None:
        pattern = DEFAULT_PATTERNS.get(name)
        return Identity() if pattern is None else Rearrange(pattern, d=d_head)
    if isinstance(spec, str):
        return Rearrange(spec, d=d_head)
    if not (callable(getattr(spec, "convert", None)) and callable(getattr(spec, "revert", None))):
        raise TypeError(
            f"hook_conversions[{name!r}]: expected an einops pattern string or an object with convert() and "
            f"revert(), got {type(spec).__name__}"
        )
    return spec
