"""From attention inputs to z, building the pattern only when someone asks for it: the one dispatch rule of
the Bridge and of the attention-interface tier (pyqkv.hf.interface).

    hook_attn_scores active             attn_scores, its hooks, attn_softmax, dropout, hook_pattern, attn_apply
    hook_pattern active, dropout,       the fused op also writes the pattern; z is recomputed from the pattern
    or the caller wants the pattern     when a hook there may have changed it (HookPoint.may_edit: any hook
                                        but run_with_cache's read-only savers, or a backward hook, whose
                                        gradient must reach the pattern) or dropout changed it
    nothing of that                     the fused op alone: no [B, H, S, K] tensor exists

"Active" above leaves out a point whose hooks all want the same slice of it (HookPoint.slice_only:
run_with_cache with pattern_heads / _queries / _keys and no other hook there): such a point is fired with
just those entries, computed by ops.pattern_slice from the lse of the fused op, whichever path runs for
the rest; with the fused path alone, no [B, H, S, K] tensor exists at all.

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
    scores_slice = scores_point.slice_only if scores_point is not None and scores_point.active else None
    pattern_slice = pattern_point.slice_only if pattern_point is not None and pattern_point.active else None
    pattern_hooked = pattern_point is not None and pattern_point.active and pattern_slice is None
    if scores_point is not None and scores_point.active and scores_slice is None:
        scores = ops.attn_scores(
            q, k, scale=scale, causal=causal, mask=mask, dtype=score_dtype, alibi=alibi, softcap=softcap, window=window
        )
        scores = scores_point.fire(scores)
        pattern = ops.attn_softmax(scores, dtype=v.dtype)
        if dropout_p:
            pattern = F.dropout(pattern, dropout_p, training=True)
        if pattern_point is not None and pattern_point.active:  # a slice saver takes its entries from it
            pattern = pattern_point.fire(pattern)
        return ops.attn_apply(pattern, v), pattern
    whole = bool(pattern_hooked or dropout_p or want_pattern)  # someone needs the [B, H, S, K] pattern
    z, lse, pattern = fused(
        q,
        k,
        v,
        scale=scale,
        causal=causal,
        mask=mask,
        return_pattern=whole,
        alibi=alibi,
        softcap=softcap,
        window=window,
    )
    # Slices from the lse: of the scores always (they exist nowhere here), of the pattern only when it was not
    # made whole (then the savers take their entries from it). A decode step's common case: neither.
    pattern_from_lse = None if whole else pattern_slice
    if scores_slice is not None or pattern_from_lse is not None:
        _fire_slices(
            lse, q, k, scale, causal, mask, alibi, softcap, window, score_dtype, scores_point, pattern_point,
            scores_slice, pattern_from_lse,
        )  # fmt: skip
    if not whole:
        return z, None
    if pattern_slice is not None:
        pattern_hooked = True  # the savers take their entries from the pattern (after dropout, as cached)
    if dropout_p:
        # eager's order: softmax, dropout, pattern · V (one seed draws the same dropout mask as HF eager)
        pattern = F.dropout(pattern, dropout_p, training=True)
    if pattern_hooked:
        pattern = pattern_point.fire(pattern)
    if dropout_p or (pattern_hooked and pattern_point.may_edit):
        z = ops.attn_apply(pattern, v)
    return z, pattern


def _fire_slices(
    lse,
    q,
    k,
    scale,
    causal,
    mask,
    alibi,
    softcap,
    window,
    score_dtype,
    scores_point,
    pattern_point,
    scores_slice,
    pattern_slice,
) -> None:
    """Fire hook_attn_scores and hook_pattern (in that order) where all their hooks want one slice
    (HookPoint.slice_only), with just those entries, from the fused op's lse: ops.pattern_slice, once per
    distinct slice. Shapes: [B, H', S', K']."""
    if scores_slice is None and pattern_slice is None:
        return
    B, S, H, _ = q.shape
    K = k.shape[1]

    def entries(select, want_scores):
        heads, queries, keys = select.resolve(H, S, K, q.device)
        return ops.pattern_slice_resolved(
            q,
            k,
            lse,
            scale=scale,
            causal=causal,
            mask=mask,
            alibi=alibi,
            softcap=softcap,
            window=window,
            heads=heads,
            queries=queries,
            keys=keys,
            return_scores=want_scores,
            score_dtype=score_dtype,
        )

    pattern = None
    if scores_slice is not None:
        shared = scores_slice is pattern_slice  # one call gives both (run_with_cache's single slice)
        pattern, scores = entries(scores_slice, True)
        scores_point.fire_slice(scores)
        if not shared:
            pattern = None
    if pattern_slice is not None:
        if pattern is None:
            pattern, _ = entries(pattern_slice, False)
        pattern_point.fire_slice(pattern)
