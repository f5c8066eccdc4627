"""From attention inputs to z, building the pattern only when someone asks for it: the one dispatch rule of
the Bridge and of the attention-interface tier (pyqkv.hf.interface).

    a hook on hook_attn_scores          attn_scores, the hook, attn_softmax, dropout, hook_pattern, attn_apply
    a hook on hook_pattern, dropout,    the fused op also writes the pattern; z is recomputed from the pattern
    or the caller wants the pattern     only when a hook edited it, dropout changed it or a backward hook
                                        watches it (its gradient must reach the pattern)
    nothing of that                     the fused op alone: no [B, H, S, K] tensor exists

Shapes: q [B, S, H, Dh], k [B, K, Hkv, Dh], v [B, K, Hkv, Dv]; z [B, S, H, Dv]; pattern [B, H, S, K].
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from pyqkv import ops
from pyqkv.hooks import HookPoint


def attend(
    q,
    k,
    v,
    *,
    scale: float,
    causal: bool,
    mask=None,
    alibi=None,
    extra: Optional[dict] = None,
    dropout_p: float = 0.0,
    want_pattern: bool = False,
    points: Optional[Mapping[str, HookPoint]] = None,
    fire: Optional[Callable] = None,
    score_dtype: Optional[torch.dtype] = None,
    fused: Optional[Callable] = None,
):
    """(z, pattern or None). points: the layer's hook points by name (None: nothing hooked); fire(name,
    tensor) runs a point's hooks and returns the tensor to continue with. extra: softcap / window for the
    ops. fused: a wrapper with ops.attention's signature (None: ops.attention, looked up per call). The pattern is returned whenever one was
    made (after dropout and after the hook_pattern hooks)."""
    extra = extra or {}
    fused = fused or ops.attention

    def hooked(name):
        point = points.get(name) if points is not None else None
        return point is not None and bool(point.fwd or point.bwd)

    if hooked("hook_attn_scores"):
        scores = ops.attn_scores(q, k, scale=scale, causal=causal, mask=mask, dtype=score_dtype, alibi=alibi, **extra)
        scores = fire("hook_attn_scores", scores)
        pattern = ops.attn_softmax(scores, dtype=v.dtype)
        if dropout_p:
            pattern = F.dropout(pattern, dropout_p, training=True)
        if hooked("hook_pattern"):
            pattern = fire("hook_pattern", pattern)
        return ops.attn_apply(pattern, v), pattern
    pattern_hooked = hooked("hook_pattern")
    if not (pattern_hooked or dropout_p or want_pattern):
        z, _, _ = fused(q, k, v, scale=scale, causal=causal, mask=mask, alibi=alibi, **extra)
        return z, None
    # Under inference_mode the pattern is made as a normal tensor: inference tensors have no version
    # counter, and the counter is how an in-place edit by a hook is noticed.
    with torch.inference_mode(False):
        z, _, pattern = fused(q, k, v, scale=scale, causal=causal, mask=mask, return_pattern=True, alibi=alibi, **extra)
    if dropout_p:
        # eager's order: softmax, dropout, pattern · V (one seed draws the same dropout mask as HF eager)
        pattern = F.dropout(pattern, dropout_p, training=True)
    if not pattern_hooked:
        return (ops.attn_apply(pattern, v) if dropout_p else z), pattern
    version = pattern._version
    seen = fire("hook_pattern", pattern)
    edited = not same_view(seen, pattern) or pattern._version != version
    if edited or dropout_p or points["hook_pattern"].bwd:
        z = ops.attn_apply(seen, v)
    return z, seen


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the same view of the same memory (a hook returned its input, possibly edited)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
