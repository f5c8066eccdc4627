"""Typed Python wrappers over the native ops (torch.ops.pyqkv.*), with their fake kernels (so
torch.compile can trace them) and autograd formulas.

Notation: B batch, S query positions, K key positions (cache included), H query heads, Hkv key/value
heads, Dh head dim, D model dim. The argument checks live in C++ (csrc/checks.h and each op's header),
so that torch.ops.pyqkv.* called directly is as safe as these wrappers; they surface here as
ValueError / TypeError naming the argument, what was expected and what was received.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import operator
from typing import Optional

import torch

from pyqkv import (
    _C,  # noqa: F401  (loads the shared library: runs its TORCH_LIBRARY registrations)
    checks,
)

LAYOUTS = ("blocked", "interleaved", "grouped", "codegen")

_ops = torch.ops.pyqkv


def _check_tensor(name: str, t, layout: str) -> None:
    """t must be a Tensor: None or a list would otherwise reach the op as an undefined or a wrong argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor {layout}, got {type(t).__name__}")


def _check_like(name: str, t, ref_name: str, ref) -> None:
    """t (a bias) must have the dtype and device of ref (its weight): the op packs them separately."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# split_qkv / pack_qkv


def split_qkv(weight, bias, *, n_heads: int, n_kv_heads: Optional[int] = None, d_head: int, layout: str, conv1d: bool):
    """Split a fused QKV weight (and bias) into per-head weights in HookedTransformer format.

    weight: [D, (H + 2 Hkv) Dh] when conv1d (GPT-2's Conv1D stores [in, out]), else [(H + 2 Hkv) Dh, D]
    (nn.Linear stores [out, in]). bias: [(H + 2 Hkv) Dh] or None. layout: where each head sits in the
    fused output ("blocked", "interleaved", "grouped", "codegen"; SPEC §5).

    Returns W_Q [H, D, Dh], W_K [Hkv, D, Dh], W_V [Hkv, D, Dh], b_Q [H, Dh], b_K [Hkv, Dh], b_V [Hkv, Dh]
    (the biases are None when bias is None). For GPT-2, W_Q[h] = c_attn.weight[:, h*Dh:(h+1)*Dh].
    """
    _check_layout(layout)
    _check_tensor("weight", weight, "[D, (H + 2 Hkv) Dh] (conv1d) or [(H + 2 Hkv) Dh, D]")
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if bias is not None and isinstance(bias, torch.Tensor):
        _check_like("bias", bias, "weight", weight)
    W_Q, W_K, W_V = _ops.split_qkv(weight, n_heads, n_kv_heads, d_head, layout, conv1d)
    if bias is None:
        return W_Q, W_K, W_V, None, None, None
    n_out = (n_heads + 2 * n_kv_heads) * d_head
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != n_out:
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias: expected shape ({n_out},) = (n_heads + 2 * n_kv_heads) * d_head, got {got}")
    # A bias is a fused weight with one input row: the same kernel splits it.
    b_Q, b_K, b_V = _ops.split_qkv(bias.unsqueeze(0), n_heads, n_kv_heads, d_head, layout, True)
    return W_Q, W_K, W_V, b_Q.squeeze(1), b_K.squeeze(1), b_V.squeeze(1)


def pack_qkv(W_Q, W_K, W_V, b_Q=None, b_K=None, b_V=None, *, layout: str = "blocked", conv1d: bool = True):
    """The inverse of split_qkv: per-head weights -> (fused weight, fused bias or None).

    With the defaults the result is the blocked [D, (H + 2 Hkv) Dh] weight that the one-GEMM projection
    uses: x @ weight + bias gives [all Q heads | all K heads | all V heads].
    """
    _check_layout(layout)
    weight = _ops.pack_qkv(W_Q, W_K, W_V, layout, conv1d)
    biases = (b_Q, b_K, b_V)
    if all(b is None for b in biases):
        return weight, None
    for name, b, W in (("b_Q", b_Q, W_Q), ("b_K", b_K, W_K), ("b_V", b_V, W_V)):
        want = (W.shape[0], W.shape[2])
        if not isinstance(b, torch.Tensor) or tuple(b.shape) != want:
            got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"{name}: expected shape {want} (heads, Dh of the weight), got {got}")
        _check_like(name, b, "W_Q", W_Q)
    bias = _ops.pack_qkv(b_Q.unsqueeze(1), b_K.unsqueeze(1), b_V.unsqueeze(1), layout, True)
    return weight, bias.squeeze(0)


@torch.library.register_fake("pyqkv::split_qkv")
def _split_qkv_fake(weight, n_heads, n_kv_heads, d_head, layout, conv1d):
    torch._check(weight.dim() == 2, lambda: f"weight: expected 2-D, got {weight.dim()}-D")
    D = weight.shape[0] if conv1d else weight.shape[1]
    return (
        weight.new_empty(n_heads, D, d_head),
        weight.new_empty(n_kv_heads, D, d_head),
        weight.new_empty(n_kv_heads, D, d_head),
    )


@torch.library.register_fake("pyqkv::pack_qkv")
def _pack_qkv_fake(W_Q, W_K, W_V, layout, conv1d):
    H, D, Dh = W_Q.shape
    n_out = (H + 2 * W_K.shape[0]) * Dh
    return W_Q.new_empty(D, n_out) if conv1d else W_Q.new_empty(n_out, D)


def _split_qkv_setup(ctx, inputs, output):
    weight, n_heads, n_kv_heads, d_head, layout, conv1d = inputs
    ctx.layout, ctx.conv1d = layout, conv1d


def _split_qkv_backward(ctx, gQ, gK, gV):
    # split is a permutation of elements: its gradient is the inverse permutation, pack.
    return _ops.pack_qkv(gQ, gK, gV, ctx.layout, ctx.conv1d), None, None, None, None, None


def _pack_qkv_setup(ctx, inputs, output):
    W_Q, W_K, W_V, layout, conv1d = inputs
    ctx.heads = (W_Q.shape[0], W_K.shape[0], W_Q.shape[2])
    ctx.layout, ctx.conv1d = layout, conv1d


def _pack_qkv_backward(ctx, grad):
    H, Hkv, Dh = ctx.heads
    gQ, gK, gV = _ops.split_qkv(grad, H, Hkv, Dh, ctx.layout, ctx.conv1d)
    return gQ, gK, gV, None, None


torch.library.register_autograd("pyqkv::split_qkv", _split_qkv_backward, setup_context=_split_qkv_setup)
torch.library.register_autograd("pyqkv::pack_qkv", _pack_qkv_backward, setup_context=_pack_qkv_setup)


# --------------------------------------------------------------------------------------------------
# per_head_proj


def per_head_proj(x, W, b=None):
    """b s n d, n d e -> b s n e: head n of x [B, S, n, D] projected with its own W[n] [D, E], plus b[n].

    When x is a broadcast view of one residual (stride 0 over n, e.g. `resid[:, :, None].expand(...)`),
    this is one GEMM over the residual and the n-fold copy is never materialized.
    Returns [B, S, n, E].
    """
    return _ops.per_head_proj(x, W, b)


@torch.library.register_fake("pyqkv::per_head_proj")
def _per_head_proj_fake(x, W, b):
    torch._check(x.dim() == 4 and W.dim() == 3, lambda: "x: expected [B, S, n, D] and W [n, D, E]")
    return x.new_empty(x.shape[0], x.shape[1], x.shape[2], W.shape[2])


def _per_head_proj_setup(ctx, inputs, output):
    x, W, b = inputs
    ctx.save_for_backward(x, W)
    ctx.has_bias = b is not None


def _per_head_proj_backward(ctx, grad):
    x, W = ctx.saved_tensors
    gx = gW = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.einsum("bsne,nde->bsnd", grad, W)
    if ctx.needs_input_grad[1]:
        if x.stride(2) == 0:  # broadcast residual: one GEMM over the residual, no n-fold copy
            gW = torch.einsum("bsd,bsne->nde", x[:, :, 0], grad)
        else:
            gW = torch.einsum("bsnd,bsne->nde", x, grad)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = grad.sum(dim=(0, 1))
    return gx, gW, gb


torch.library.register_autograd("pyqkv::per_head_proj", _per_head_proj_backward, setup_context=_per_head_proj_setup)


# --------------------------------------------------------------------------------------------------
# attention


def attention(
    q,
    k,
    v,
    *,
    scale: float,
    causal: bool,
    mask=None,
    return_pattern: bool = False,
    alibi=None,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
):
    """Scaled, masked attention with GQA by index. Returns (z, lse, pattern).

    q: [B, S, H, Dh]; k, v: [B, K, Hkv, Dh], any strides (views into one fused projection are read in
    place). Query head h reads KV head h // (H / Hkv); K and V are never repeated in memory.
    mask: None; a padding mask [B, K] (bool True or integer nonzero = attend; a float one may hold only 0 =
    pad and 1 = attend, anything else raises ValueError: an additive mask comes 4-D); a bool mask
    [B or 1, 1 or H, S, K] (True = attend, as Hugging Face's sdpa masks); or an additive float mask
    [B or 1, 1 or H, S, K], added to the scores, where an entry is visible iff it is greater than half the
    mask dtype's most negative finite value (so torch.finfo(dtype).min, -inf and NaN hide). A 4-D mask is authoritative.
    causal: bottom-right aligned, so query i sees keys 0 .. K - S + i; a one-token decode step sees the
    whole cache:

        S=2, K=4:   keys 0 1 2 3
            query 0:     x x x .
            query 1:     x x x x

    window: None or W >= 1 (Hugging Face's `sliding_window`: W keys, the query's own included), with
    causal=True only: query i, at position p = K - S + i, sees keys p - W < j <= p.

        S=2, K=4, W=2:  keys 0 1 2 3
            query 0:         . x x .
            query 1:         . . x x

    softcap: None or 0 (off), or c > 0 (Gemma 2's attention-logit softcapping): s = c * tanh(s / c) on
    the scaled scores, before ALiBi and the additive mask.
    alibi: None or a per-key bias [B or 1, H or 1, K] (ALiBi: Bloom's and Falcon's [B*H, 1, K] reshaped
    to [B, H, K]), any float dtype and strides, added to every query position's scores:
    score[b, h, i, j] = softcap(scale * q·k) + alibi[b, h, j] (+ the additive mask). It hides nothing by
    itself (visibility comes from causal, window and mask) and no [B, H, S, K] bias is ever built.

    Returns z [B, S, H, Dh] (q's dtype), lse [B, H, S] (float32; float64 for float64 inputs; -inf on a
    row with no visible key) and pattern [B, H, S, K] (None unless return_pattern). A row with no
    visible key gives zeros in z and pattern, never NaN. Half types accumulate in float32.
    """
    z, lse, pattern = _ops.attention(
        q,
        k,
        v,
        mask,
        _check_scale(scale),
        bool(causal),
        bool(return_pattern),
        alibi,
        _check_softcap(softcap),
        _check_window(window),
    )
    return z, lse, (pattern if return_pattern else None)


@torch.library.register_fake("pyqkv::attention")
def _attention_fake(q, k, v, mask, scale, causal, return_pattern, alibi=None, softcap=None, window=None):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "q, k: expected 4-D [B, S, H, Dh] / [B, K, Hkv, Dh]")
    B, S, H, Dh = q.shape
    K = k.shape[1]
    torch._check(
        k.shape[0] == B and k.shape[3] == Dh, lambda: f"k: expected [B={B}, K, Hkv, Dh={Dh}], got {list(k.shape)}"
    )
    torch._check(v.shape == k.shape, lambda: f"v: expected the shape of k {list(k.shape)}, got {list(v.shape)}")
    torch._check(H % k.shape[2] == 0, lambda: f"k: expected a KV head count that divides H={H}, got {k.shape[2]}")
    torch._check(q.dtype == k.dtype == v.dtype, lambda: f"k, v: expected q's dtype {q.dtype}, got {k.dtype}, {v.dtype}")
    if alibi is not None:
        torch._check(
            alibi.dim() == 3 and alibi.shape[0] in (1, B) and alibi.shape[1] in (1, H) and alibi.shape[2] == K,
            lambda: f"alibi: expected shape [B or 1, H or 1, K] = [{B} or 1, {H} or 1, {K}], got {list(alibi.shape)}",
        )
    z = q.new_empty(B, S, H, Dh)
    lse = q.new_empty(B, H, S, dtype=_acc_dtype(q.dtype))
    pattern = q.new_empty(B, H, S, K) if return_pattern else q.new_empty(0)
    return z, lse, pattern


def _attention_setup(ctx, inputs, output):
    q, k, v, mask, scale, causal, return_pattern, alibi, softcap, window = (tuple(inputs) + (None,) * 3)[:10]
    ctx.scale, ctx.causal, ctx.softcap, ctx.window = scale, causal, softcap, window
    ctx.mask_shape = None if mask is None else mask.shape
    ctx.save_for_backward(q, k, v, mask, alibi)


def _attention_backward(ctx, grad_z, grad_lse, grad_pattern):
    """Exact gradients from the recomputed pattern P (in the accumulation dtype):
    dV = Pᵀ dZ, dP = dZ Vᵀ (+ the pattern's own gradient), dS = P ⊙ (dP − rowsum(dP ⊙ P)) + P ⊙ dlse,
    d(additive mask) = dS, d(alibi) = dS summed over query positions; through the softcap
    s = c·tanh(r / c) of the raw scores r = scale·QKᵀ: dR = dS ⊙ (1 − tanh²(r / c)); dQ = scale · dR K,
    dK = scale · dRᵀ Q. GQA heads sum into their KV head; broadcast dims of mask and alibi are summed
    over."""
    q, k, v, mask, alibi = ctx.saved_tensors
    B, S, H, Dh = q.shape
    K, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    acc = _acc_dtype(q.dtype)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    _, _, P = _ops.attention(qa, ka, va, mask, ctx.scale, ctx.causal, True, alibi, ctx.softcap, ctx.window)
    P5 = P.view(B, Hkv, G, S, K)
    q5 = qa.view(B, S, Hkv, G, Dh).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, S, Dh]
    kt, vt = ka.permute(0, 2, 1, 3), va.permute(0, 2, 1, 3)  # [B, Hkv, K, Dh]
    if grad_z is None:
        grad_z = q.new_zeros(B, S, H, Dh)
    gz5 = grad_z.to(acc).reshape(B, S, Hkv, G, Dh).permute(0, 2, 3, 1, 4)

    dP = torch.einsum("bngsd,bnkd->bngsk", gz5, vt)
    if grad_pattern is not None and grad_pattern.numel() > 0:
        dP = dP + grad_pattern.to(acc).reshape(B, Hkv, G, S, K)
    dS = P5 * (dP - (dP * P5).sum(-1, keepdim=True))
    if grad_lse is not None:
        dS = dS + P5 * grad_lse.to(acc).reshape(B, Hkv, G, S, 1)

    dR = dS
    if ctx.softcap:  # d/dr c·tanh(r / c) = 1 − tanh²(r / c), r = scale·q·k
        t = torch.tanh(torch.einsum("bngsd,bnkd->bngsk", q5, kt) * (ctx.scale / ctx.softcap))
        dR = dS * (1 - t * t)

    gq = gk = gv = gmask = galibi = None
    if ctx.needs_input_grad[0]:
        gq = (torch.einsum("bngsk,bnkd->bsngd", dR, kt) * ctx.scale).reshape(B, S, H, Dh).to(q.dtype)
    if ctx.needs_input_grad[1]:
        gk = (torch.einsum("bngsk,bngsd->bknd", dR, q5) * ctx.scale).to(k.dtype)
    if ctx.needs_input_grad[2]:
        gv = torch.einsum("bngsk,bngsd->bknd", P5, gz5).to(v.dtype)
    if ctx.needs_input_grad[3] and mask is not None and mask.dim() == 4 and mask.is_floating_point():
        dS4 = dS.reshape(B, H, S, K)
        dims = [d for d in range(2) if ctx.mask_shape[d] == 1]
        gmask = (dS4.sum(dim=dims, keepdim=True) if dims else dS4).to(mask.dtype)
    # (a call that leaves alibi at its default passes 7 inputs, so needs_input_grad has 7 entries)
    if alibi is not None and ctx.needs_input_grad[7:8] == (True,):
        dA = dS.sum(dim=3).reshape(B, H, K)  # the same bias at every query position: sum over them
        dims = [d for d in range(2) if alibi.shape[d] == 1]
        galibi = (dA.sum(dim=dims, keepdim=True) if dims else dA).to(alibi.dtype)
    return gq, gk, gv, gmask, None, None, None, galibi, None, None


torch.library.register_autograd("pyqkv::attention", _attention_backward, setup_context=_attention_setup)


# --------------------------------------------------------------------------------------------------
# Argument pre-checks that Python must make itself: the type of a Python value (a str for a float, a
# list for a tensor) is decided before the op's schema sees it. Every rule about values, shapes, dtypes
# and devices lives in C++ (csrc/attention.h), once.


def _check_scale(scale) -> float:
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (numbers.Real, torch.Tensor))
        or (isinstance(scale, torch.Tensor) and scale.numel() != 1)
    ):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale}")
    return scale


def _check_softcap(softcap) -> Optional[float]:
    """None, or a real number (its value is checked by the op: >= 0 and finite)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected None or a float, got {type(softcap).__name__} {softcap!r}")
    return float(softcap)


def _check_window(window) -> Optional[int]:
    """None, or an integer (its value is checked by the op: >= 1, and causal only)."""
    if window is None:
        return None
    n = checks.integer(window)  # the one integer rule (pyqkv/checks.py)
    if n is None:
        raise TypeError(f"window: expected None or an int, got {type(window).__name__} {window!r}")
    return n


def _check_optional_tensor(name: str, t, layout: str) -> None:
    if t is not None and not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor or None ({layout}), got {type(t).__name__}")


def _check_dtype(dtype, name: str = "dtype") -> None:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name}: expected a floating-point dtype or None, got {type(dtype).__name__} {dtype!r}")


# --------------------------------------------------------------------------------------------------
# The split form of attention, for a hook on the scores (csrc/attention_split.cpp): the [B, H, S, K]
# scores must exist for the hook to see them, so these ops are composed of ATen ops in C++ (autograd,
# torch.compile and every device for free), with the fused op's argument checks and mask rules.


def attn_scores(
    q,
    k,
    *,
    scale: float,
    causal: bool,
    mask=None,
    dtype: Optional[torch.dtype] = None,
    alibi=None,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
):
    """Scaled, softcapped, masked scores [B, H, S, K] (what hook_attn_scores sees), in `dtype` (default q's).

    softcap(scale * q·k) + alibi[b, h, j] + the additive mask, with q [B, S, H, Dh], k [B, K, Hkv, Dh] and
    every argument as in attention. Hidden entries (causal, window, padding, a bool mask's False, an
    additive entry not above half the dtype's minimum) hold the dtype's most negative finite value, so
    attn_softmax gives them weight exactly 0.
    """
    _check_tensor("q", q, "[B, S, H, Dh]")
    _check_tensor("k", k, "[B, K, Hkv, Dh]")
    _check_optional_tensor("mask", mask, "[B, K] or [B or 1, 1 or H, S, K]")
    _check_optional_tensor("alibi", alibi, "[B or 1, H or 1, K]")
    _check_dtype(dtype)
    return _ops.attn_scores(
        q, k, mask, _check_scale(scale), bool(causal), alibi, _check_softcap(softcap), _check_window(window), dtype
    )


def attn_softmax(scores, *, dtype: Optional[torch.dtype] = None):
    """Pattern [B, H, S, K] from scores [B, H, S, K]: softmax over keys in the accumulation dtype, where an
    entry is visible iff it is greater than half the dtype's most negative value (the mask rule: hidden
    scores, -inf and NaN get weight 0); a row with nothing visible is all zeros (never NaN). In `dtype`
    (default the scores')."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores: expected a floating-point tensor [B, H, S, K], got {type(scores).__name__}")
    _check_dtype(dtype)
    return _ops.attn_softmax(scores, dtype)


def attn_apply(pattern, v):
    """z [B, S, H, Dh] = pattern [B, H, S, K] · v [B, K, Hkv, Dh], GQA by index."""
    _check_tensor("pattern", pattern, "[B, H, S, K]")
    _check_tensor("v", v, "[B, K, Hkv, Dh]")
    return _ops.attn_apply(pattern, v)


# --------------------------------------------------------------------------------------------------
# pattern_slice: entries of the pattern (and scores) at chosen heads, query rows and key columns, from the
# lse attention returns, without the [B, H, S, K] tensor (csrc/pattern_slice.h)


def slice_indices(name: str, value, n: Optional[int] = None, what: str = "", device=None):
    """The one rule for a chosen set of indices along an axis of length n (pattern_slice's heads / queries /
    keys, run_with_cache's pattern_heads / pattern_queries / pattern_keys): None (the whole axis) -> None;
    an int, a slice, a list or tuple of ints, or a 1-D integer tensor -> a 1-D int64 tensor on `device`.
    Negative indices count from the end (n - 1 is -1), as Python's; an int keeps its axis (length 1).
    With n None only the type is checked (before the axis length is known) and `value` is returned.
    Raises TypeError / ValueError naming `name`, the expected and the received value. Python values are
    checked in Python (torch.compile traces that without a graph break); a tensor's values are read."""
    if value is None:
        return None
    expected = "None, an int, a slice, a list of ints or a 1-D integer tensor"
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name}: expected {expected}, got a {value.dim()}-D {value.dtype} tensor")
        if n is None:
            return value
        items = value.reshape(-1).to(device=device, dtype=torch.long)
        out_of_range = (items < -n) | (items >= n)
        if bool(out_of_range.any()):  # a read of the values (a sync on CUDA)
            raise ValueError(
                f"{name}: expected indices in [-{n}, {n}) ({what} = {n}), got {int(items[out_of_range][0])}"
            )
        return torch.where(items < 0, items + n, items)
    if isinstance(value, slice):
        for part in ("start", "stop", "step"):
            bound = getattr(value, part)
            if bound is not None and checks.integer(bound) is None:
                raise TypeError(f"{name}: expected a slice of ints, got {part}={bound!r}")
        if value.step is not None and checks.integer(value.step) == 0:
            raise ValueError(f"{name}: expected a slice with a nonzero step, got {value!r}")
        if n is None:
            return value
        return torch.tensor(list(range(n))[value], dtype=torch.long, device=device)
    if checks.integer(value) is not None:
        items = [checks.integer(value)]
    elif isinstance(value, (list, tuple)):
        bad = [v for v in value if checks.integer(v) is None]
        if bad:
            raise TypeError(f"{name}: expected a list of ints, got {type(bad[0]).__name__} {bad[0]!r} in it")
        items = [checks.integer(v) for v in value]
    else:
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")
    if n is None:
        return value
    for i in items:
        if not -n <= i < n:
            raise ValueError(f"{name}: expected indices in [-{n}, {n}) ({what} = {n}), got {i}")
    return torch.tensor([i + n if i < 0 else i for i in items], dtype=torch.long, device=device)


def pattern_slice(
    q,
    k,
    lse,
    *,
    scale: float,
    causal: bool,
    mask=None,
    alibi=None,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    heads=None,
    queries=None,
    keys=None,
    return_scores: bool = False,
    score_dtype: Optional[torch.dtype] = None,
):
    """Entries of attention's pattern at chosen heads, query rows and key columns, without the [B, H, S, K]
    tensor. Returns (pattern [B, H', S', K'], scores [B, H', S', K'] or None).

    q [B, S, H, Dh], k [B, K, Hkv, Dh], scale, causal, mask, alibi, softcap, window: exactly as given to
    ops.attention; lse [B, H, S]: the log-sum-exp that call returned. heads, queries, keys: None (the whole
    axis: H' = H, S' = S, K' = K) or the chosen indices of that axis (slice_indices: an int, a slice, a list
    or a 1-D integer tensor; negative ones count from the end of H, S and K; any order, repeats allowed).

        pattern[b, h', i', j'] = exp(score[b, h, i, j] - lse[b, h, i])   where query i sees key j, else 0
        (h = heads[h'], i = queries[i'], j = keys[j'])

    equal (by the tolerance rule) to attention(..., return_pattern=True)'s pattern[b][heads][:, queries][..., keys].
    With return_scores also the scores there, as attn_scores computes them (softcap(scale * q.k) + alibi +
    the additive mask, hidden entries at finfo(score_dtype).min), in score_dtype (default q's). Costs
    O(B * H' * S' * K' * Dh) time and O(B * H' * S' * K') memory: the last query row of every head at
    K = 32k keys is B * H * 32k entries, not B * H * S * 32k.
    """
    _check_tensor("q", q, "[B, S, H, Dh]")
    _check_tensor("k", k, "[B, K, Hkv, Dh]")
    _check_tensor("lse", lse, "[B, H, S]")
    _check_optional_tensor("mask", mask, "[B, K] or [B or 1, 1 or H, S, K]")
    _check_optional_tensor("alibi", alibi, "[B or 1, H or 1, K]")
    _check_dtype(score_dtype, "score_dtype")
    if q.dim() == 4 and k.dim() == 4:  # else the op names the bad rank
        heads = slice_indices("heads", heads, q.shape[2], "H, the query heads of q", q.device)
        queries = slice_indices("queries", queries, q.shape[1], "S, the query positions of q", q.device)
        keys = slice_indices("keys", keys, k.shape[1], "K, the key positions of k", q.device)
    return pattern_slice_resolved(
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
        return_scores=return_scores,
        score_dtype=score_dtype,
    )


def pattern_slice_resolved(
    q, k, lse, *, scale, causal, mask, alibi, softcap, window, heads, queries, keys, return_scores, score_dtype
):
    """pattern_slice with heads / queries / keys already resolved by slice_indices (None or 1-D int64 tensors
    in [0, n), as PatternSlice.resolve gives them): Python reads none of their values, so torch.compile
    traces a call whose indices came from Python ints without a graph break (the op still checks them)."""
    pattern, scores = _ops.pattern_slice(
        q,
        k,
        lse,
        mask,
        _check_scale(scale),
        bool(causal),
        alibi,
        _check_softcap(softcap),
        _check_window(window),
        heads,
        queries,
        keys,
        checks.boolean("return_scores", return_scores),
        score_dtype,
    )
    return pattern, (scores if return_scores else None)


_PATTERN_SLICE_DEFAULTS = (None, None, None, None, None, None, False, None)  # alibi .. score_dtype


@torch.library.register_fake("pyqkv::pattern_slice")
def _pattern_slice_fake(
    q,
    k,
    lse,
    mask,
    scale,
    causal,
    alibi=None,
    softcap=None,
    window=None,
    heads=None,
    queries=None,
    keys=None,
    return_scores=False,
    score_dtype=None,
):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "q, k: expected 4-D [B, S, H, Dh] / [B, K, Hkv, Dh]")
    B, S, H, _ = q.shape
    K = k.shape[1]
    torch._check(
        lse.dim() == 3 and tuple(lse.shape) == (B, H, S),
        lambda: f"lse: expected shape [B, H, S] = [{B}, {H}, {S}], got {list(lse.shape)}",
    )
    shape = (
        B,
        H if heads is None else heads.shape[0],
        S if queries is None else queries.shape[0],
        K if keys is None else keys.shape[0],
    )
    sd = score_dtype or q.dtype
    return q.new_empty(shape), (q.new_empty(shape, dtype=sd) if return_scores else q.new_empty(0, dtype=sd))


def _pattern_slice_setup(ctx, inputs, output):
    q, k, lse, mask, scale, causal, alibi, softcap, window, heads, queries, keys, _, _ = (
        tuple(inputs) + _PATTERN_SLICE_DEFAULTS[len(inputs) - 6 :]
    )
    ctx.scale, ctx.causal, ctx.softcap, ctx.window = scale, causal, softcap, window
    ctx.save_for_backward(q, k, lse, mask, alibi, heads, queries, keys)


def _pattern_slice_backward(ctx, grad_pattern, grad_scores):
    """From P = exp(s - lse) at visible entries: dS = dP ⊙ P + d(scores) at visible entries, dlse = -Σ_j dP ⊙ P;
    through the softcap s = c·tanh(r / c) of r = scale·q·k: dR = dS ⊙ (1 − tanh²(r / c)); dq = scale · dR k,
    dk = scale · dRᵀ q, d(additive mask) = dS, d(alibi) = Σ_i dS, each accumulated at the chosen indices
    (repeats add up; GQA heads into their KV head; broadcast dims of mask and alibi summed)."""
    q, k, lse, mask, alibi, heads, queries, keys = ctx.saved_tensors
    B, S, H, _ = q.shape
    K, Hkv = k.shape[1], k.shape[2]
    acc = _acc_dtype(q.dtype)
    dev = q.device
    hi = heads if heads is not None else torch.arange(H, device=dev)
    qi = queries if queries is not None else torch.arange(S, device=dev)
    kj = keys if keys is not None else torch.arange(K, device=dev)
    kvh = hi.div(H // Hkv, rounding_mode="floor")
    qa, ka = q.to(acc), k.to(acc)
    P, s = _ops.pattern_slice(
        qa, ka, lse, mask, ctx.scale, ctx.causal, alibi, ctx.softcap, ctx.window, hi, qi, kj, True, acc
    )
    visible = s != torch.finfo(acc).min
    dS = torch.zeros_like(P)
    if grad_pattern is not None:
        dS = grad_pattern.to(acc) * P
    grad_lse = -dS.sum(-1)  # [B, H', S']
    if grad_scores is not None and grad_scores.numel() > 0:
        dS = dS + grad_scores.to(acc) * visible
    qs = qa[:, qi][:, :, hi]  # [B, S', H', Dh]
    ks = ka[:, kj][:, :, kvh]  # [B, K', H', Dh]
    dR = dS
    if ctx.softcap:
        t = torch.tanh(torch.einsum("bihd,bjhd->bhij", qs, ks) * (ctx.scale / ctx.softcap))
        dR = dS * (1 - t * t)
    b = torch.arange(B, device=dev)
    gq = gk = glse = gmask = galibi = None
    if ctx.needs_input_grad[0]:
        part = torch.einsum("bhij,bjhd->bihd", dR, ks) * ctx.scale
        gq = qa.new_zeros(q.shape).index_put_((b[:, None, None], qi[None, :, None], hi[None, None, :]), part, True)
        gq = gq.to(q.dtype)
    if ctx.needs_input_grad[1]:
        part = torch.einsum("bhij,bihd->bjhd", dR, qs) * ctx.scale
        gk = ka.new_zeros(k.shape).index_put_((b[:, None, None], kj[None, :, None], kvh[None, None, :]), part, True)
        gk = gk.to(k.dtype)
    if ctx.needs_input_grad[2]:
        glse = lse.new_zeros(lse.shape).index_put_(
            (b[:, None, None], hi[None, :, None], qi[None, None, :]), grad_lse, True
        )
    if ctx.needs_input_grad[3] and mask is not None and mask.dim() == 4 and mask.is_floating_point():
        mb = b if mask.shape[0] == B else torch.zeros_like(b)
        mh = hi if mask.shape[1] == H else torch.zeros_like(hi)
        index = (mb[:, None, None, None], mh[None, :, None, None], qi[None, None, :, None], kj[None, None, None, :])
        gmask = torch.zeros(mask.shape, dtype=acc, device=dev).index_put_(index, dS, True).to(mask.dtype)
    if alibi is not None and ctx.needs_input_grad[6:7] == (True,):
        ab = b if alibi.shape[0] == B else torch.zeros_like(b)
        ah = hi if alibi.shape[1] == H else torch.zeros_like(hi)
        index = (ab[:, None, None], ah[None, :, None], kj[None, None, :])
        galibi = torch.zeros(alibi.shape, dtype=acc, device=dev).index_put_(index, dS.sum(2), True).to(alibi.dtype)
    return gq, gk, glse, gmask, None, None, galibi, None, None, None, None, None, None, None


torch.library.register_autograd("pyqkv::pattern_slice", _pattern_slice_backward, setup_context=_pattern_slice_setup)


# --------------------------------------------------------------------------------------------------
# Which backend runs attention (csrc/attention_plan.h): the backends as data


BACKENDS = ("flash", "mem_efficient", "cudnn", "own_decode", "own_tc", "own_simt", "cpu")


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """What pyqkv::attention would run for an input: `backend` (a name of BACKENDS, or None when no
    backend accepts it, in which case the op raises with every reason) and `refusals` (backend name ->
    the reasons it refuses the input, for every backend that does)."""

    backend: Optional[str]
    refusals: dict

    def __str__(self):
        lines = [f"attention plan: {self.backend or 'no backend accepts the input'}"]
        lines += [f"  {name}: {'; '.join(reasons)}" for name, reasons in self.refusals.items()]
        return "\n".join(lines)


def attention_plan(
    q,
    k,
    v,
    *,
    scale: float,
    causal: bool,
    mask=None,
    return_pattern: bool = False,
    alibi=None,
    softcap: Optional[float] = None,
    window: Optional[int] = None,
    device_capability=None,
    torch_version=None,
    flash_available: Optional[bool] = None,
) -> AttentionPlan:
    """The backend pyqkv.ops.attention would run for these arguments, and why the others would not.

    Takes ops.attention's arguments; the tensors may be meta tensors (nothing is computed, only shapes,
    strides, dtypes and flags are read). device_capability: (major, minor) of the CUDA device to plan for,
    e.g. (9, 0) for an H100/H200 (required for meta tensors; default: q's device). torch_version
    ((major, minor), default the running torch) and flash_available (default: whether this process has
    FlashAttention-2 switched on) describe the torch build, which the plan depends on too. A backend
    forced with attention_backend(...) or PYQKV_ATTENTION_BACKEND is the only one considered.
    """
    for name, t, layout in (("q", q, "[B, S, H, Dh]"), ("k", k, "[B, K, Hkv, Dh]"), ("v", v, "[B, K, Hkv, Dh]")):
        _check_tensor(name, t, layout)
    caps = None if device_capability is None else [operator.index(c) for c in device_capability]
    version = None if torch_version is None else [operator.index(c) for c in torch_version]
    backend, lines = _ops.attention_plan(
        q,
        k,
        v,
        mask,
        _check_scale(scale),
        bool(causal),
        bool(return_pattern),
        alibi,
        _check_softcap(softcap),
        _check_window(window),
        caps,
        version,
        flash_available,
    )
    refusals: dict = {}
    for line in lines:
        name, reason = line.split("\t", 1)
        refusals.setdefault(name, []).append(reason)
    return AttentionPlan(backend or None, refusals)


@contextlib.contextmanager
def attention_backend(name: Optional[str]):
    """Force one attention backend (a name of BACKENDS; None: the plan chooses) inside the block, for
    tests and benchmarks: a call the backend refuses raises with its reasons. Process-wide (the op may
    run on autograd's threads), and it wins over the environment variable PYQKV_ATTENTION_BACKEND, which
    forces a backend the same way for a whole process (read once, at the first attention call: set it
    before the process starts)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"name: expected one of {BACKENDS} or None, got {name!r}")
    previous = _ops._set_attention_backend(name or "")
    try:
        yield
    finally:
        _ops._set_attention_backend(previous)


# --------------------------------------------------------------------------------------------------
# rotary


def rotary(x, cos, sin, *, interleaved: bool = False):
    """RoPE on the first R features of every head, with Hugging Face's formula. Returns a new [B, S, n, Dh].

    x: [B, S, n, Dh], any strides (usually a view of the fused QKV projection), any float dtype.
    cos, sin: [B or 1, S, R] or [S, R], any float dtype (float32 tables with bfloat16 x are fine) and
    strides; R even, R <= Dh (R < Dh: partial rotary, features R .. Dh-1 pass through unchanged). The
    same table serves all n heads, and all B batch rows when its dim 0 is 1.

        out[..., :R] = x[..., :R] * cos + rotate(x[..., :R]) * sin

    interleaved=False, rotate_half (GPT-NeoX, Llama, Phi-3, Falcon): [x1, x2] -> [-x2, x1], halves of R/2.
    interleaved=True, rotate_every_two (GPT-J, CodeGen): (x[2i], x[2i+1]) -> (-x[2i+1], x[2i]); CodeGen's
    half-width tables are passed repeat_interleave'd to width R.
    Computed in float32 (float64 for float64 x), rounded once to x's dtype. Contiguous output.
    """
    if isinstance(cos, torch.Tensor) and cos.dim() == 2:
        cos = cos.unsqueeze(0)
    if isinstance(sin, torch.Tensor) and sin.dim() == 2:
        sin = sin.unsqueeze(0)
    return _ops.rotary(x, cos, sin, bool(interleaved))


@torch.library.register_fake("pyqkv::rotary")
def _rotary_fake(x, cos, sin, interleaved):
    torch._check(x.dim() == 4, lambda: f"x: expected a 4-D tensor [B, S, n, Dh], got {list(x.shape)}")
    torch._check(
        cos.dim() == 3 and sin.shape == cos.shape,
        lambda: f"cos, sin: expected [B or 1, S, R], got {list(cos.shape)}, {list(sin.shape)}",
    )
    B, S, n, Dh = x.shape
    R = cos.shape[2]
    torch._check(
        cos.shape[0] in (1, B) and cos.shape[1] == S, lambda: f"cos: expected [{B} or 1, {S}, R], got {list(cos.shape)}"
    )
    torch._check(R % 2 == 0 and 0 < R <= Dh, lambda: f"cos: expected an even R with 0 < R <= Dh={Dh}, got R={R}")
    return x.new_empty(B, S, n, Dh)


def _rotate(x, interleaved: bool):
    """rotate_every_two or rotate_half over the last dim (the reference's, in ATen for the backward)."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _partner(t, interleaved: bool):
    """t with each feature moved to its rotation partner's place, no sign: pairs swapped, or halves."""
    if interleaved:
        return torch.stack((t[..., 1::2], t[..., 0::2]), dim=-1).flatten(-2)
    half = t.shape[-1] // 2
    return torch.cat((t[..., half:], t[..., :half]), dim=-1)


def _rotary_setup(ctx, inputs, output):
    x, cos, sin, interleaved = inputs
    ctx.interleaved = interleaved
    ctx.save_for_backward(x, cos, sin)


def _rotary_backward(ctx, grad):
    """The rotation is linear in x: out = x ⊙ cos + M x ⊙ sin with M the signed partner swap, Mᵀ = −M.
    So dx = g ⊙ cos − M (g ⊙ sin), which is the op itself with sin' = −partner(sin) (M(g ⊙ sin) =
    M g ⊙ partner(sin)); features past R get g unchanged. dcos = Σ_heads g ⊙ x, dsin = Σ_heads g ⊙ M x,
    also summed over the batch when the table broadcasts over it."""
    x, cos, sin = ctx.saved_tensors
    R = cos.shape[-1]
    gx = gcos = gsin = None
    if ctx.needs_input_grad[0]:
        gx = _ops.rotary(grad, cos, -_partner(sin, ctx.interleaved), ctx.interleaved)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        acc = _acc_dtype(x.dtype)
        g, xr = grad[..., :R].to(acc), x[..., :R].to(acc)

        def reduce(t, like):  # [B, S, n, R] -> like's shape [B or 1, S, R]
            t = t.sum(dim=2)
            return (t.sum(dim=0, keepdim=True) if like.shape[0] == 1 else t).to(like.dtype)

        if ctx.needs_input_grad[1]:
            gcos = reduce(g * xr, cos)
        if ctx.needs_input_grad[2]:
            gsin = reduce(g * _rotate(xr, ctx.interleaved), sin)
    return gx, gcos, gsin, None


torch.library.register_autograd("pyqkv::rotary", _rotary_backward, setup_context=_rotary_setup)


# --------------------------------------------------------------------------------------------------
# kv_append


def kv_append(k_cache, v_cache, k_new, v_new, start: int) -> None:
    """Write k_new, v_new [B, S, Hkv, Dh] into k_cache, v_cache [B, Hkv, capacity, Dh] at positions
    start .. start + S - 1, in place (the schema marks both caches as mutated). No reallocation: the
    caller (pyqkv.KVCache) owns growth."""
    # int() would truncate 1.5 to 1 and parse "1": only integers are positions (the one integer rule).
    n = checks.integer(start)
    if n is None:
        raise TypeError(f"start: expected an int, got {type(start).__name__} {start!r}")
    _ops.kv_append(k_cache, v_cache, k_new, v_new, n)


@torch.library.register_fake("pyqkv::kv_append")
def _kv_append_fake(k_cache, v_cache, k_new, v_new, start):
    return None
