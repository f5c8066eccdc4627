"""From attention inputs to z, building the pattern only when someone asks for it: the one dispatch rule of
the Bridge and of the attention-interface tier (pyqkv.hf.interface).

    hook_attn_scores active             attn_scores, its hooks, attn_softmax, dropout, hook_pattern, attn_apply
    hook_pattern active, dropout,       the fused op also writes the pattern; z is recomputed from the pattern
    or the caller wants the pattern     when a hook there may have changed it (HookPoint.may_edit: any hook
                                        but run_with_cache's read-only savers, or a backward hook, whose
                                        gradient must reach the pattern) or dropout changed it
    nothing of that                     the fused op alone: no [B, H, S, K] tensor exists

Which path runs is decided from Python state alone (which hooks are registered), never from data (a
version counter, a pointer): an in-place edit by index assignment, `.data` or numpy is honoured alike, and
torch.compile traces the decision without a guard on tensor contents.

Shapes: q [B, S, H, Dh], k [B, K, Hkv, Dh], v [B, K, Hkv, Dv]; z [B, S, H, Dv]; pattern [B, H, S, K].
"""

from __future__ import annotations

from typing import Callable, Optional

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
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    dropout_p: float = 0.0,
    want_pattern: bool = False,
    scores_point: Optional[HookPoint] = None,
    pattern_point: Optional[HookPoint] = None,
    score_dtype: Optional[torch.dtype] = None,
    fused: Optional[Callable] = None,
):
    """(z, pattern or None). scores_point / pattern_point: the layer's hook_attn_scores / hook_pattern (None:
    the caller has none). softcap / window: as ops.attention (already checked by the caller). fused: a
    wrapper with ops.attention's signature (None: ops.attention, looked up per call). The pattern is
    returned whenever one was made (after dropout and after the hook_pattern hooks)."""
    fused = fused or ops.attention
    pattern_hooked = pattern_point is not None and pattern_point.active
    if scores_point is not None and scores_point.active:
        scores = ops.attn_scores(
            q, k, scale=scale, causal=causal, mask=mask, dtype=score_dtype, alibi=alibi, softcap=softcap, window=window
        )
        scores = scores_point.fire(scores)
        pattern = ops.attn_softmax(scores, dtype=v.dtype)
        if dropout_p:
            pattern = F.dropout(pattern, dropout_p, training=True)
        if pattern_hooked:
            pattern = pattern_point.fire(pattern)
        return ops.attn_apply(pattern, v), pattern
    if not (pattern_hooked or dropout_p or want_pattern):
        z, _, _ = fused(q, k, v, scale=scale, causal=causal, mask=mask, alibi=alibi, softcap=softcap, window=window)
        return z, None
    z, _, pattern = fused(
        q, k, v, scale=scale, causal=causal, mask=mask, return_pattern=True, alibi=alibi, softcap=softcap, window=window
    )
    if dropout_p:
        # eager's order: softmax, dropout, pattern · V (one seed draws the same dropout mask as HF eager)
        pattern = F.dropout(pattern, dropout_p, training=True)
    if pattern_hooked:
        pattern = pattern_point.fire(pattern)
    if dropout_p or (pattern_hooked and pattern_point.may_edit):
        z = ops.attn_apply(pattern, v)
    return z, pattern
