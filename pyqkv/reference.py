"""Pure-PyTorch versions of every pyqkv op: the executable spec and the oracle of the tests.

Written for reading, not speed: every intermediate is materialized. Imports nothing of pyqkv, so the
oracle never depends on what it checks. Notation: B batch, S query positions, K key positions
(cache included), H query heads, Hkv key/value heads, Dh head dim, D model dim.
"""

from __future__ import annotations

import torch

LAYOUTS = ("blocked", "interleaved", "grouped", "codegen")

# CodeGen's qkv_proj is split into this many model-parallel blocks (HF `mp_num`).
CODEGEN_MP_NUM = 4


def fused_columns(layout: str, n_heads: int, n_kv_heads: int, d_head: int):
    """Column ranges of the fused output for each head: three lists (q, k, v) of start offsets.

    Head h of Q occupies fused output features q[h] .. q[h] + Dh - 1; likewise K and V (SPEC §5).
    """
    H, Hkv, Dh = n_heads, n_kv_heads, d_head
    if layout == "blocked":  # [all Q heads | all K heads | all V heads]
        q = [h * Dh for h in range(H)]
        k = [(H + g) * Dh for g in range(Hkv)]
        v = [(H + Hkv + g) * Dh for g in range(Hkv)]
    elif layout == "interleaved":  # per head h: [Q_h, K_h, V_h]
        q = [3 * h * Dh for h in range(H)]
        k = [(3 * g + 1) * Dh for g in range(Hkv)]
        v = [(3 * g + 2) * Dh for g in range(Hkv)]
    elif layout == "grouped":  # per KV group g: [Q of the G heads of g, K_g, V_g]
        G = H // Hkv
        q = [((h // G) * (G + 2) + h % G) * Dh for h in range(H)]
        k = [(g * (G + 2) + G) * Dh for g in range(Hkv)]
        v = [(g * (G + 2) + G + 1) * Dh for g in range(Hkv)]
    elif layout == "codegen":  # mp_num blocks, each [Q part, V part, K part]
        per = H // CODEGEN_MP_NUM
        q = [((h // per) * 3 * per + h % per) * Dh for h in range(H)]
        v = [((h // per) * 3 * per + per + h % per) * Dh for h in range(H)]
        k = [((h // per) * 3 * per + 2 * per + h % per) * Dh for h in range(H)]
    else:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return q, k, v


def _as_in_out(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """The fused weight as [D, n_out] (x @ W orientation) whatever its storage."""
    return weight if conv1d else weight.t()


def split_qkv(weight, bias, *, n_heads, n_kv_heads=None, d_head, layout, conv1d):
    """Fused weight [D, n_out] (conv1d) or [n_out, D] (Linear), bias [n_out] ->
    W_Q [H,D,Dh], W_K [Hkv,D,Dh], W_V [Hkv,D,Dh], b_Q [H,Dh], b_K [Hkv,Dh], b_V [Hkv,Dh] (None without bias)."""
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    q, k, v = fused_columns(layout, n_heads, n_kv_heads, d_head)
    w = _as_in_out(weight, conv1d)

    def take(starts, t, dim):
        return torch.stack([t.narrow(dim, s, d_head) for s in starts])

    W_Q, W_K, W_V = (take(s, w, 1) for s in (q, k, v))
    if bias is None:
        return W_Q, W_K, W_V, None, None, None
    b_Q, b_K, b_V = (take(s, bias, 0) for s in (q, k, v))
    return W_Q, W_K, W_V, b_Q, b_K, b_V


def pack_qkv(W_Q, W_K, W_V, *, layout="blocked", conv1d=True):
    """Inverse of split_qkv for the weight: W_Q [H,D,Dh], W_K/W_V [Hkv,D,Dh] -> fused weight."""
    H, D, Dh = W_Q.shape
    Hkv = W_K.shape[0]
    q, k, v = fused_columns(layout, H, Hkv, Dh)
    out = W_Q.new_empty(D, (H + 2 * Hkv) * Dh)
    for starts, W in ((q, W_Q), (k, W_K), (v, W_V)):
        for h, s in enumerate(starts):
            out[:, s : s + Dh] = W[h]
    return out if conv1d else out.t().contiguous()


def pack_qkv_bias(b_Q, b_K, b_V, *, layout="blocked"):
    """Inverse of split_qkv for the bias: b_Q [H,Dh], b_K/b_V [Hkv,Dh] -> fused bias [n_out]."""
    return pack_qkv(b_Q.unsqueeze(1), b_K.unsqueeze(1), b_V.unsqueeze(1), layout=layout).squeeze(0)


def per_head_proj(x, W, b=None):
    """x [B,S,n,D], W [n,D,E], b [n,E] -> [B,S,n,E]: head n projected with its own W[n]."""
    out = torch.einsum("bsnd,nde->bsne", x, W)
    return out if b is None else out + b


def kv_append(k_cache, v_cache, k_new, v_new, start):
    """Write k_new/v_new [B,S,Hkv,Dh] into caches [B,Hkv,capacity,Dh] at start..start+S-1, in place."""
    S = k_new.shape[1]
    k_cache[:, :, start : start + S] = k_new.transpose(1, 2)
    v_cache[:, :, start : start + S] = v_new.transpose(1, 2)


def visible_keys(B, H, S, K, *, causal, mask=None, window=None, device=None):
    """Bool [B,H or 1,S,K]: True where query i may see key j.

    Causal is bottom-right aligned: query i (0-based in this call) sits at position p = K - S + i and
    sees keys 0 .. p, so a one-token step sees the whole cache. A sliding window of W keys (Hugging
    Face's sliding_window, causal only) also hides keys j <= p - W: query i sees the W keys p - W + 1 .. p. A 2-D mask [B,K] removes keys where it is 0/False. A 4-D bool
    mask keeps the entries where it is True. A 4-D additive mask keeps an entry iff its value is greater
    than half the mask dtype's most negative finite value (so Hugging Face's finfo.min, -inf and NaN
    hide); the kept values are biases added to the scores.

        S=3, K=5, causal:   keys 0 1 2 3 4
                  query 0:       x x x . .
                  query 1:       x x x x .
                  query 2:       x x x x x
    """
    vis = torch.ones(B, 1, S, K, dtype=torch.bool, device=device)
    p = torch.arange(S, device=device).view(S, 1) + (K - S)
    j = torch.arange(K, device=device).view(1, K)
    if causal:
        vis = vis & (j <= p)
    if window:
        vis = vis & (j > p - window)
    if mask is not None:
        if mask.dim() == 2:
            vis = vis & (mask != 0).view(B, 1, 1, K)
        elif mask.dtype == torch.bool:
            vis = vis & mask
        else:
            vis = vis & (mask > torch.finfo(mask.dtype).min / 2)
    return vis


def _alibi_scores(alibi, compute_dtype):
    """alibi [B or 1, H or 1, K] -> [B or 1, H or 1, 1, K]: the same bias for every query position."""
    return alibi.to(compute_dtype).unsqueeze(2)


def _softcapped(scores, softcap):
    """Gemma 2's logit softcapping: c * tanh(s / c) on the scaled scores, before any bias."""
    return softcap * torch.tanh(scores / softcap) if softcap else scores


def attention(
    q,
    k,
    v,
    *,
    scale,
    causal,
    mask=None,
    return_pattern=False,
    alibi=None,
    softcap=None,
    window=None,
    compute_dtype=torch.float64,
):
    """q [B,S,H,Dh], k/v [B,K,Hkv,Dh] -> (z [B,S,H,Dh], lse [B,H,S], pattern [B,H,S,K] or None).

    Computed in float64 (float32 accumulation would do; float64 makes the oracle exact enough to judge
    float32 kernels) and cast back to q's dtype. GQA: query head h reads kv head h // (H / Hkv).
    A query row with no visible key gives zeros in z and pattern, and lse = -inf.

    scores = softcap(scale * q.k) + alibi[b, h, j] + mask[b, h, i, j]: softcap(s) = c * tanh(s / c) when
    softcap = c is given (Gemma 2; None or 0 = off); alibi [B or 1, H or 1, K] is a per-key bias (Bloom,
    Falcon-RW), the same for every query position; it hides nothing by itself (visibility comes from
    causal, window and mask only). window: W keys per query, see visible_keys.

    compute_dtype: the dtype every step runs in. The tests also run the oracle in the inputs' own low
    precision (e.g. bfloat16) to measure how much error plain PyTorch makes there: the tolerance rule
    |kernel - ref_fp64| <= 2 |ref_in_dtype - ref_fp64| + atol (DESIGN.md, Testing).
    """
    B, S, H, Dh = q.shape
    K, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    qf, kf, vf = (t.to(compute_dtype).transpose(1, 2) for t in (q, k, v))  # [B, heads, seq, Dh]
    kf = kf.repeat_interleave(group, dim=1)
    vf = vf.repeat_interleave(group, dim=1)
    scores = _softcapped((qf @ kf.transpose(-1, -2)) * scale, softcap)  # [B,H,S,K]
    if alibi is not None:
        scores = scores + _alibi_scores(alibi, compute_dtype)
    if mask is not None and mask.dim() == 4 and mask.is_floating_point():
        scores = scores + mask.to(compute_dtype)
    vis = visible_keys(B, H, S, K, causal=causal, mask=mask, window=window, device=q.device)
    scores = scores.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf on rows with no visible key
    pattern = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # -inf - -inf = nan -> 0
    z = (pattern @ vf).transpose(1, 2)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (
        z.to(q.dtype),
        lse.to(lse_dtype),
        pattern.to(q.dtype) if return_pattern else None,
    )


def attn_scores(q, k, *, scale, causal, mask=None, alibi=None, softcap=None, window=None, compute_dtype=torch.float64):
    """Scaled, softcapped, masked scores [B,H,S,K] in q's dtype; hidden entries hold the dtype's most
    negative value. softcap, alibi and window as in attention. compute_dtype: the dtype the product and
    the additions run in (see attention)."""
    B, S, H, _ = q.shape
    K, Hkv = k.shape[1], k.shape[2]
    qf = q.to(compute_dtype).transpose(1, 2)
    kf = k.to(compute_dtype).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    scores = _softcapped((qf @ kf.transpose(-1, -2)) * scale, softcap)
    if alibi is not None:
        scores = scores + _alibi_scores(alibi, compute_dtype)
    if mask is not None and mask.dim() == 4 and mask.is_floating_point():
        scores = scores + mask.to(compute_dtype)
    vis = visible_keys(B, H, S, K, causal=causal, mask=mask, window=window, device=q.device)
    return scores.to(q.dtype).masked_fill(~vis, torch.finfo(q.dtype).min)


def pattern_slice(
    q,
    k,
    lse,
    *,
    scale,
    causal,
    mask=None,
    alibi=None,
    softcap=None,
    window=None,
    heads=None,
    queries=None,
    keys=None,
    compute_dtype=torch.float64,
):
    """Entries of the pattern (and the scores) at chosen heads, query rows and key columns, from the lse.

    q [B,S,H,Dh], k [B,K,Hkv,Dh] and the other arguments as in attention; lse [B,H,S] (attention's).
    heads, queries, keys: None (all) or 1-D int64 indices in [0, H), [0, S), [0, K). Returns (pattern, scores),
    each [B, H', S', K'] in q's dtype: pattern = exp(score - lse) where the query sees the key, 0 elsewhere;
    scores as attn_scores (hidden entries at the dtype's most negative value). Written as the definition:
    the full [B,H,S,K] scores, then the slice (the op never builds them).
    """
    B, S, H, _ = q.shape
    K = k.shape[1]
    full = attn_scores(  # unrounded (q, k cast first), for the exponent
        q.to(compute_dtype),
        k.to(compute_dtype),
        scale=scale,
        causal=causal,
        mask=mask,
        alibi=alibi,
        softcap=softcap,
        window=window,
        compute_dtype=compute_dtype,
    )
    vis = visible_keys(B, H, S, K, causal=causal, mask=mask, window=window, device=q.device).expand(B, H, S, K)
    # attn_scores(q, k) itself: the same values rounded once to q's dtype, hidden entries at its most negative
    scores = full.to(q.dtype).masked_fill(~vis, torch.finfo(q.dtype).min)
    row_lse = lse.to(compute_dtype).unsqueeze(-1)
    pattern = torch.where(
        vis & (row_lse > float("-inf")), torch.exp(full - row_lse), torch.zeros((), dtype=compute_dtype)
    )

    def take(t):
        if heads is not None:
            t = t[:, heads]
        if queries is not None:
            t = t[:, :, queries]
        return t if keys is None else t[..., keys]

    return take(pattern).to(q.dtype), take(scores)


def rotate_half(x):
    """GPT-NeoX / Llama: [x1, x2] -> [-x2, x1] over the last dim, halves of width R/2."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_every_two(x):
    """GPT-J / CodeGen: pairs (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def rotary(x, cos, sin, *, interleaved=False, compute_dtype=None):
    """RoPE on the first R features of every head, Hugging Face's formula; features R .. Dh-1 pass through.

    x [B,S,n,Dh]; cos, sin [B or 1, S, R] or [S, R] (full width R: HF's tables, or CodeGen's half-width
    ones repeat_interleave'd), R even, R <= Dh. Broadcast over the n heads (and over B when their dim 0
    is 1):

        out[..., :R] = x[..., :R] * cos + rotate(x[..., :R]) * sin

    with rotate = rotate_half (interleaved=False) or rotate_every_two (interleaved=True). Returns
    [B,S,n,Dh] in x's dtype. compute_dtype: the dtype the products and the sum run in (default float64,
    the truth); the tests also run it in x's own dtype, which is exactly what Hugging Face does.
    """
    compute_dtype = torch.float64 if compute_dtype is None else compute_dtype
    if cos.dim() == 2:
        cos = cos.unsqueeze(0)
    if sin.dim() == 2:
        sin = sin.unsqueeze(0)
    R = cos.shape[-1]
    x_rot = x[..., :R].to(compute_dtype)
    c = cos.to(compute_dtype).unsqueeze(2)  # [B or 1, S, 1, R]: the same for every head
    s = sin.to(compute_dtype).unsqueeze(2)
    rotate = rotate_every_two if interleaved else rotate_half
    out = x_rot * c + rotate(x_rot) * s
    return torch.cat((out.to(x.dtype), x[..., R:]), dim=-1)
