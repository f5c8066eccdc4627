"""Conversion rules between the layout the kernels use and the hook format (SPEC §3b).

`convert` takes a tensor from the kernel layout to the hook format; `revert` takes a hook's tensor back.
The defaults are zero-copy views written as einops patterns, so a reader sees each layout in one line.
A user may pass their own rule for any hook point: an einops pattern string whose left side is the
kernel layout below, or any object with `convert(tensor)` and `revert(tensor)`. Rules hold no per-call
state; they only ever run when a hook (or the cache) asks for the point.

Kernel layouts: each point's `kernel_layout` in pyqkv.points.POINTS (e.g. hook_q [B, S, H*Dh], a view into
the fused QKV projection; hook_pattern [B, H, S, K]).
"""

from __future__ import annotations

import re

import einops
import torch
from einops.parsing import ParsedExpression

from pyqkv.points import POINTS

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


class Copy:
    """The hook gets its own copy, and what it returns continues: for a tensor the caller must not let a
    hook edit in place (the interface tier's K and V are Hugging Face's cache storage)."""

    def convert(self, tensor):
        return tensor.clone()

    def revert(self, tensor):
        return tensor

    def __repr__(self) -> str:
        return "Copy()"


# The rank of each point's kernel layout (the left side of a user's pattern must have it) and the default
# hook-format rule of each point: both from the hook-point table.
KERNEL_RANKS = {p.name: p.kernel_rank for p in POINTS}
DEFAULT_PATTERNS = {p.name: p.default_rule for p in POINTS if p.default_rule is not None}


def make_rule(name: str, spec, *, d_head: int):
    """A rule object for hook point `name` from None (the default), a pattern string or a rule object.

    A user's rule is checked here as far as it can be without a tensor (a pattern's syntax, its axes, the
    rank of its kernel side), and wrapped so that a failure or a misfit when it runs names the hook."""
    if spec is None:
        pattern = DEFAULT_PATTERNS.get(name)
        return Identity() if pattern is None else Rearrange(pattern, d=d_head)
    if isinstance(spec, str):
        _check_pattern(name, spec, known={"d"})
        return CheckedRule(name, Rearrange(spec, d=d_head))
    if isinstance(spec, type) or not (
        callable(getattr(spec, "convert", None)) and callable(getattr(spec, "revert", None))
    ):
        what = f"the class {spec.__name__} (pass an instance)" if isinstance(spec, type) else type(spec).__name__
        raise TypeError(
            f"hook_conversions[{name!r}]: expected an einops pattern string or an object with convert() and "
            f"revert(), got {what}"
        )
    return CheckedRule(name, spec)


def _check_pattern(name: str, pattern: str, *, known: set) -> None:
    """Raise ValueError naming the hook unless `pattern` is 'kernel layout -> hook format' with the same
    axes on both sides, the kernel layout's rank on the left, and every axis inferable in both directions
    (a parenthesized group may hold at most one axis whose size is neither given nor seen alone)."""
    where = f"hook_conversions[{name!r}]"
    sides = pattern.split("->")
    if len(sides) != 2:
        raise ValueError(f"{where}: expected one 'kernel layout -> hook format' pattern, got {pattern!r}")
    try:
        left, right = (ParsedExpression(side.strip()) for side in sides)
    except einops.EinopsError as e:
        raise ValueError(f"{where}: cannot parse the pattern {pattern!r}: {e}") from None
    if left.identifiers != right.identifiers:
        raise ValueError(
            f"{where}: expected the same axes on both sides of {pattern!r}, got {sorted(left.identifiers)} -> "
            f"{sorted(right.identifiers)}"
        )
    rank = KERNEL_RANKS.get(name)
    if rank is not None and not left.has_ellipsis and len(left.composition) != rank:
        raise ValueError(
            f"{where}: expected {rank} axes on the left of {pattern!r} (the kernel layout of {name} is "
            f"{rank}-D, see pyqkv.conversions), got {len(left.composition)}"
        )
    for side, direction in ((left, "convert"), (right, "revert")):
        seen = known | {group[0] for group in side.composition if isinstance(group, list) and len(group) == 1}
        for group in side.composition:
            unknown = [axis for axis in group if axis not in seen] if isinstance(group, list) else []
            if len(unknown) > 1:
                raise ValueError(
                    f"{where}: {direction} cannot infer the sizes of {unknown} in ({' '.join(group)}) of {pattern!r}; "
                    f"only d (= d_head) is given"
                )


class CheckedRule:
    """A user's rule, run so that any failure or misfit names the hook point. A rule changes layout only:
    each direction must return a tensor with the elements, dtype and device it was given."""

    def __init__(self, name: str, rule):
        self.name = name
        self.rule = rule

    def _run(self, direction: str, tensor):
        try:
            out = getattr(self.rule, direction)(tensor)
        except Exception as e:
            raise ValueError(
                f"{self.name}: conversion rule {self.rule!r} failed to {direction} a tensor of shape "
                f"{tuple(tensor.shape)}: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"{self.name}: conversion rule {self.rule!r}.{direction} returned {type(out).__name__}; expected a "
                f"Tensor"
            )
        if out.numel() != tensor.numel() or out.dtype != tensor.dtype or out.device != tensor.device:
            raise ValueError(
                f"{self.name}: conversion rule {self.rule!r}.{direction} turned shape {tuple(tensor.shape)} "
                f"{tensor.dtype} on {tensor.device} into {tuple(out.shape)} {out.dtype} on {out.device}; expected "
                f"the same elements, dtype and device in another layout"
            )
        return out

    def convert(self, tensor):
        return self._run("convert", tensor)

    def revert(self, tensor):
        return self._run("revert", tensor)

    def __repr__(self) -> str:
        return repr(self.rule)
