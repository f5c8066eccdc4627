"""Typed Python wrappers over the native ops (torch.ops.pyqkv.*), with their fake kernels (so
torch.compile can trace them) and autograd formulas.

Notation: B batch, S query positions, K key positions (cache included), H query heads, Hkv key/value
heads, Dh head dim, D model dim. The argument checks live in C++ (csrc/checks.h and each op's header),
so that torch.ops.pyqkv.* called directly is as safe as these wrappers; they surface here as
ValueError / TypeError naming the argument, what was expected and what was received.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import torch

from pyqkv import _C  # noqa: F401  (loads the shared library: runs its TORCH_LIBRARY registrations)

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


def attention(q, k, v, *, scale: float, causal: bool, mask=None, return_pattern: bool = False, alibi=None):
    """Scaled, masked attention with GQA by index. Returns (z, lse, pattern).

    q: [B, S, H, Dh]; k, v: [B, K, Hkv, Dh], any strides (views into one fused projection are read in
    place). Query head h reads KV head h // (H / Hkv); K and V are never repeated in memory.
    mask: None; a padding mask [B, K] (bool True / nonzero = attend); a bool mask [B or 1, 1 or H, S, K]
    (True = attend, as Hugging Face's sdpa masks); or an additive float mask [B or 1, 1 or H, S, K],
    added to the scores, where an entry is visible iff it is greater than half the mask dtype's most
    negative finite value (so torch.finfo(dtype).min, -inf and NaN hide). A 4-D mask is authoritative.
    causal: bottom-right aligned, so query i sees keys 0 .. K - S + i; a one-token decode step sees the
    whole cache:

        S=2, K=4:   keys 0 1 2 3
            query 0:     x x x .
            query 1:     x x x x

    alibi: None or a per-key bias [B or 1, H or 1, K] (ALiBi: Bloom's and Falcon's [B*H, 1, K] reshaped
    to [B, H, K]), any float dtype and strides, added to every query position's scaled scores:
    score[b, h, i, j] = scale * q·k + alibi[b, h, j] (+ the additive mask). It hides nothing by itself
    (visibility comes from causal and mask) and no [B, H, S, K] bias is ever built.

    Returns z [B, S, H, Dh] (q's dtype), lse [B, H, S] (float32; float64 for float64 inputs; -inf on a
    row with no visible key) and pattern [B, H, S, K] (None unless return_pattern). A row with no
    visible key gives zeros in z and pattern, never NaN. Half types accumulate in float32.
    """
    z, lse, pattern = _ops.attention(q, k, v, mask, _check_scale(scale), bool(causal), bool(return_pattern), alibi)
    return z, lse, (pattern if return_pattern else None)


@torch.library.register_fake("pyqkv::attention")
def _attention_fake(q, k, v, mask, scale, causal, return_pattern, alibi=None):
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "q, k: expected 4-D [B, S, H, Dh] / [B, K, Hkv, Dh]")
    B, S, H, Dh = q.shape
    K = k.shape[1]
    torch._check(k.shape[0] == B and k.shape[3] == Dh, lambda: f"k: expected [B={B}, K, Hkv, Dh={Dh}], got {list(k.shape)}")
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
    q, k, v, mask, scale, causal, return_pattern, alibi = inputs
    ctx.scale, ctx.causal = scale, causal
    ctx.mask_shape = None if mask is None else mask.shape
    ctx.save_for_backward(q, k, v, mask, alibi)


def _attention_backward(ctx, grad_z, grad_lse, grad_pattern):
    """Exact gradients from the recomputed pattern P (in the accumulation dtype):
    dV = Pᵀ dZ, dP = dZ Vᵀ (+ the pattern's own gradient), dS = P ⊙ (dP − rowsum(dP ⊙ P)) + P ⊙ dlse,
    dQ = scale · dS K, dK = scale · dSᵀ Q, d(additive mask) = dS, d(alibi) = dS summed over query
    positions. GQA heads sum into their KV head; broadcast dims of mask and alibi are summed over."""
    q, k, v, mask, alibi = ctx.saved_tensors
    B, S, H, Dh = q.shape
    K, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    acc = _acc_dtype(q.dtype)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    _, _, P = _ops.attention(qa, ka, va, mask, ctx.scale, ctx.causal, True, alibi)
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

    gq = gk = gv = gmask = galibi = None
    if ctx.needs_input_grad[0]:
        gq = (torch.einsum("bngsk,bnkd->bsngd", dS, kt) * ctx.scale).reshape(B, S, H, Dh).to(q.dtype)
    if ctx.needs_input_grad[1]:
        gk = (torch.einsum("bngsk,bngsd->bknd", dS, q5) * ctx.scale).to(k.dtype)
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
    return gq, gk, gv, gmask, None, None, None, galibi


torch.library.register_autograd("pyqkv::attention", _attention_backward, setup_context=_attention_setup)


# --------------------------------------------------------------------------------------------------
# The split form of attention, for a hook on the scores: the [B, H, S, K] scores must exist for the hook
# to see them, so these are composed of ATen ops (autograd and every device for free). Same semantics
# as the fused op: GQA by index, bottom-right causal, hidden entries at the dtype's most negative value.


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.Tensor)) or (
        isinstance(scale, torch.Tensor) and scale.numel() != 1
    ):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale}")
    return scale


def _shape(t) -> str:
    return f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_split_form(q=None, k=None, v=None, mask=None, pattern=None, alibi=None) -> None:
    """The fused op's argument rules (csrc/attention.h), for the composite split form: each failure names
    the argument, what was expected and what was received."""
    for name, t, layout in (("q", q, "[B, S, H, Dh]"), ("k", k, "[B, K, Hkv, Dh]"), ("v", v, "[B, K, Hkv, Dh]"),
                            ("pattern", pattern, "[B, H, S, K]")):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor {layout}, got {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if q is not None and k is not None:
        B, S, H, Dh = q.shape
        if k.shape[0] != B or k.shape[3] != Dh:
            raise ValueError(f"k: expected shape [{B}, K, Hkv, {Dh}] (B and Dh of q {list(q.shape)}), got {list(k.shape)}")
        if k.shape[2] < 1 or H % k.shape[2]:
            raise ValueError(f"k: expected a KV head count that divides H={H}, got Hkv={k.shape[2]}")
        if q.device != k.device:
            raise ValueError(f"k: expected device {q.device} (the device of q), got {k.device}")
        if k.dtype != q.dtype:
            raise TypeError(f"k: expected dtype {q.dtype} (the dtype of q), got {k.dtype}")
        if mask is not None:
            K = k.shape[1]
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask: expected a Tensor or None, got {type(mask).__name__}")
            if mask.device != q.device:
                raise ValueError(f"mask: expected device {q.device} (the device of q), got {mask.device}")
            if mask.dim() == 2 and tuple(mask.shape) != (B, K):
                raise ValueError(f"mask: expected a 2-D padding mask [B, K] = [{B}, {K}], got {list(mask.shape)}")
            if mask.dim() == 2 and mask.is_complex():
                raise TypeError(f"mask: expected a bool, integer or float padding mask, got {mask.dtype}")
            if mask.dim() == 4:
                if not (mask.is_floating_point() or mask.dtype == torch.bool):
                    raise TypeError(f"mask: expected a floating-point additive 4-D mask or a bool one, got {mask.dtype}")
                if mask.shape[0] not in (1, B) or mask.shape[1] not in (1, H) or tuple(mask.shape[2:]) != (S, K):
                    raise ValueError(
                        f"mask: expected a 4-D additive mask [B or 1, 1 or H, S, K] = [{B}, 1 or {H}, {S}, {K}], "
                        f"got {list(mask.shape)}"
                    )
            if mask.dim() not in (2, 4):
                raise ValueError(f"mask: expected a 2-D padding mask [B, K] or a 4-D additive mask, got {_shape(mask)}")
        if alibi is not None:
            K = k.shape[1]
            if not isinstance(alibi, torch.Tensor) or alibi.dim() != 3:
                raise ValueError(f"alibi: expected a 3-D tensor [B or 1, H or 1, K] (a per-key bias), got {_shape(alibi)}")
            if not alibi.is_floating_point():
                raise TypeError(f"alibi: expected a floating-point tensor, got {alibi.dtype}")
            if alibi.device != q.device:
                raise ValueError(f"alibi: expected device {q.device} (the device of q), got {alibi.device}")
            if alibi.shape[0] not in (1, B) or alibi.shape[1] not in (1, H) or alibi.shape[2] != K:
                raise ValueError(
                    f"alibi: expected shape [B or 1, H or 1, K] = [{B} or 1, {H} or 1, {K}], got {list(alibi.shape)}"
                )
    if pattern is not None and v is not None:
        B, H, S, K = pattern.shape
        if v.dtype != pattern.dtype:
            raise TypeError(f"v: expected dtype {pattern.dtype} (the dtype of pattern), got {v.dtype}")
        if v.device != pattern.device:
            raise ValueError(f"v: expected device {pattern.device} (the device of pattern), got {v.device}")
        if v.shape[0] != B or v.shape[1] != K or v.shape[2] < 1 or H % v.shape[2]:
            raise ValueError(
                f"v: expected shape [{B}, {K}, Hkv, Dh] with Hkv dividing H={H} (pattern {list(pattern.shape)}), "
                f"got {list(v.shape)}"
            )


def _grouped_queries(q, Hkv):
    """q [B, S, H, Dh] -> [B, Hkv, G*S, Dh]: the G query heads of each KV head stacked along S."""
    B, S, H, Dh = q.shape
    G = H // Hkv
    return q.reshape(B, S, Hkv, G, Dh).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * S, Dh)


def attn_scores(q, k, *, scale: float, causal: bool, mask=None, dtype: Optional[torch.dtype] = None, alibi=None):
    """Scaled, masked scores [B, H, S, K] (what hook_attn_scores sees), in `dtype` (default q's).

    scale * q·k + alibi[b, h, j] (alibi: None or [B or 1, H or 1, K], as in attention) + the additive
    mask. Hidden entries (causal, padding or an additive entry at or below half the dtype's minimum)
    hold the dtype's most negative finite value, so attn_softmax gives them weight exactly 0.
    """
    _check_tensor("q", q, "[B, S, H, Dh]")
    _check_tensor("k", k, "[B, K, Hkv, Dh]")
    _check_split_form(q=q, k=k, mask=mask, alibi=alibi)
    scale = _check_scale(scale)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating-point dtype or None, got {dtype}")
    B, S, H, Dh = q.shape
    K, Hkv = k.shape[1], k.shape[2]
    dtype = q.dtype if dtype is None else dtype
    qg = _grouped_queries(q.to(dtype), Hkv)
    scores = (qg @ k.to(dtype).permute(0, 2, 3, 1)).reshape(B, H, S, K) * scale
    if alibi is not None:  # [B|1, H|1, K] -> [B|1, H|1, 1, K]: the same bias for every query position
        scores = scores + alibi.to(dtype).unsqueeze(2)
    hidden = torch.zeros((), dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(S, device=q.device).view(S, 1)
        j = torch.arange(K, device=q.device).view(1, K)
        hidden = hidden | (j > (K - S) + i)
    if mask is not None and mask.dim() == 2:
        hidden = hidden | (mask == 0).view(B, 1, 1, K)
    elif mask is not None and mask.dtype == torch.bool:
        hidden = hidden | ~mask
    elif mask is not None:
        scores = scores + mask.to(dtype)
        hidden = hidden | ~(mask > torch.finfo(mask.dtype).min / 2)  # visible iff > threshold: NaN hides
    return scores.masked_fill(hidden, torch.finfo(dtype).min)


def attn_softmax(scores, *, dtype: Optional[torch.dtype] = None):
    """Pattern [B, H, S, K] from scores: softmax in the accumulation dtype; entries at or below half the
    dtype's most negative value get weight 0 and a row with none left is all zeros (never NaN)."""
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(f"scores: expected a floating-point tensor [B, H, S, K], got {_shape(scores)}")
    if scores.dim() != 4:
        raise ValueError(f"scores: expected a 4-D tensor [B, H, S, K], got {_shape(scores)}")
    hidden = scores <= torch.finfo(scores.dtype).min / 2
    s = scores.to(_acc_dtype(scores.dtype)).masked_fill(hidden, float("-inf"))
    any_visible = ~hidden.all(dim=-1, keepdim=True)
    pattern = torch.softmax(s.masked_fill(~any_visible, 0.0), dim=-1).masked_fill(~any_visible, 0.0)
    return pattern.to(scores.dtype if dtype is None else dtype)


def attn_apply(pattern, v):
    """z [B, S, H, Dh] = pattern [B, H, S, K] · v [B, K, Hkv, Dh], GQA by index."""
    _check_tensor("pattern", pattern, "[B, H, S, K]")
    _check_tensor("v", v, "[B, K, Hkv, Dh]")
    _check_split_form(v=v, pattern=pattern)
    B, H, S, K = pattern.shape
    Hkv, Dh = v.shape[2], v.shape[3]
    G = H // Hkv
    z = pattern.reshape(B, Hkv, G * S, K) @ v.to(pattern.dtype).permute(0, 2, 1, 3)  # [B, Hkv, G*S, Dh]
    return z.reshape(B, Hkv, G, S, Dh).permute(0, 3, 1, 2, 4).reshape(B, S, H, Dh)


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
    torch._check(cos.shape[0] in (1, B) and cos.shape[1] == S, lambda: f"cos: expected [{B} or 1, {S}, R], got {list(cos.shape)}")
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
    # int() would truncate 1.5 to 1 and parse "1": only integers are positions.
    if isinstance(start, bool) or not hasattr(type(start), "__index__"):
        raise TypeError(f"start: expected an int, got {type(start).__name__} {start!r}")
    _ops.kv_append(k_cache, v_cache, k_new, v_new, operator.index(start))


@torch.library.register_fake("pyqkv::kv_append")
def _kv_append_fake(k_cache, v_cache, k_new, v_new, start):
    return None
