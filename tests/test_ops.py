"""The native ops (pyqkv.ops) against the pure-PyTorch oracle (pyqkv.reference).

Data movement (split_qkv, pack_qkv, kv_append) must match exactly; arithmetic (per_head_proj,
attention and its split form) must satisfy the one tolerance rule in tests/tolerance.py. Every op also
passes torch.library.opcheck, gradcheck in float64 and a torch.compile trace (its fake kernel).

Notation: B batch, S query positions, K key positions, H query heads, Hkv key/value heads, Dh head dim,
D model dim.
"""

from __future__ import annotations

import dataclasses
import math

import op_cases
import pytest
import torch
from conftest import DTYPES
from tolerance import assert_close_by_rule
from torch.profiler import ProfilerActivity, profile

from pyqkv import ops
from pyqkv import reference as ref

LAYOUT_HEADS = [  # (layout, H, Hkv): every head arrangement each layout supports
    ("blocked", 4, 4),
    ("blocked", 4, 2),
    ("blocked", 4, 1),
    ("interleaved", 4, 4),
    ("grouped", 6, 2),
    ("grouped", 4, 1),
    ("grouped", 4, 4),
    ("codegen", 8, 8),
]


def rand(*shape, dtype=torch.float32, device="cpu"):
    """Standard normal values drawn on the CPU (identical on every device), then moved."""
    return torch.randn(*shape).to(device=device, dtype=dtype)


def qkv_views(B, S, K, H, Hkv, Dh, *, dtype, device):
    """q [B,S,H,Dh], k, v [B,K,Hkv,Dh] as non-contiguous views of fused projections [B, L, (H+2Hkv) Dh]
    (blocked: all Q heads, all K heads, all V heads), which is how the Bridge calls attention. With
    K == S all three come from one tensor; otherwise q from one of length S, k and v from one of length K."""
    n = (H + 2 * Hkv) * Dh

    def split(fused):
        q, k, v = fused.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        return q.unflatten(-1, (H, Dh)), k.unflatten(-1, (Hkv, Dh)), v.unflatten(-1, (Hkv, Dh))

    fused_q = rand(B, S, n, dtype=dtype, device=device)
    q, k, v = split(fused_q)
    if K != S:
        _, k, v = split(rand(B, K, n, dtype=dtype, device=device))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    return q, k, v


def alibi_bias(B, H, S, K, *, dtype, device):
    """ALiBi-like finite biases [B, H, S, K]: head h adds -slope_h * (distance of key j from the last key)."""
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
    dist = (K - 1 - torch.arange(K)).float()
    return (-slopes.view(1, H, 1, 1) * dist.view(1, 1, 1, K)).expand(B, H, S, K).to(device=device, dtype=dtype)


def make_mask(kind, B, H, S, K, *, dtype, device):
    """A mask of the given kind. Random hidden entries hide ~25% of the keys; batch row 1 of the 2-D
    masks is left-padded (its first 3 keys hidden)."""
    if kind == "none":
        return None
    if kind.endswith("2d"):
        keep = torch.rand(B, K) > 0.25
        keep[-1, :3] = False
        mask_dtype = {"bool2d": torch.bool, "int2d": torch.int64, "float2d": dtype}[kind]
        return keep.to(device=device, dtype=mask_dtype)
    mask_dtype = torch.float32 if kind == "add4d_fp32" else dtype
    heads = 1 if kind in ("add4d_b1", "add4d_fp32", "add4d_bcast", "bool4d_bcast") else H
    batch = 1 if kind in ("add4d_bcast", "bool4d_bcast") else B
    hidden = torch.rand(batch, heads, S, K) < 0.25
    if kind.startswith("bool4d"):
        m = (~hidden).to(device)
        return m.expand(B, 1, S, K) if kind == "bool4d_bcast" else m
    if kind == "add4d_nan":
        fill = torch.where(torch.rand(batch, heads, S, K) < 0.5, float("nan"), float("-inf"))
        return torch.where(hidden, fill, -torch.rand(batch, heads, S, K)).to(device=device, dtype=mask_dtype)
    if kind == "alibi":
        return alibi_bias(B, H, S, K, dtype=mask_dtype, device=device)
    bias = alibi_bias(B, H, S, K, dtype=torch.float32, device="cpu") if kind == "alibi_hidden" else 0.0
    m = (torch.zeros(batch, heads, S, K) + bias).to(device=device, dtype=mask_dtype)
    m = m.masked_fill(hidden.to(device), torch.finfo(mask_dtype).min)
    return m.expand(B, 1, S, K) if kind == "add4d_bcast" else m


def make_alibi(kind, B, H, K, *, dtype, device):
    """A per-key ALiBi bias [B or 1, H or 1, K] of the given kind: -slope_h * position_j as Bloom builds
    it, the positions of batch row b offset by b (as a left-padded row's would be)."""
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
    pos = torch.arange(K).view(1, 1, K) - torch.arange(B).view(B, 1, 1)  # [B, 1, K]
    full = slopes.view(1, H, 1) * pos  # [B, H, K]
    if kind == "per_batch":
        return full.to(device=device, dtype=dtype)
    if kind == "b1":
        return full[:1].to(device=device, dtype=dtype)
    if kind == "heads1_fp32":
        return (0.3 * pos).to(device=device, dtype=torch.float32)
    if kind == "expanded":
        return full[:1].to(device=device, dtype=dtype).expand(B, H, K)
    if kind == "strided":
        a = torch.zeros(2 * K, H, B, dtype=torch.float64)
        a[::2] = full.permute(2, 1, 0)
        a = a.to(device).permute(2, 1, 0)[..., ::2]
        assert not a.is_contiguous() and a.shape == (B, H, K)
        return a
    raise AssertionError(kind)


# --------------------------------------------------------------------------------------------------
# split_qkv / pack_qkv: pure data movement, so exact equality.


def fused_weight(D, n_out, *, conv1d, contiguous, dtype, device):
    """A fused weight, [D, n_out] (conv1d) or [n_out, D] (Linear); non-contiguous when asked (a
    transposed view, as `module.weight.t()` gives)."""
    shape = (D, n_out) if conv1d else (n_out, D)
    w = rand(*shape, dtype=dtype, device=device) if contiguous else rand(*shape[::-1], dtype=dtype, device=device).t()
    assert w.is_contiguous() == contiguous
    return w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv1d", [True, False], ids=["conv1d", "linear"])
@pytest.mark.parametrize("layout,H,Hkv", LAYOUT_HEADS)
def test_split_qkv_matches_reference(layout, H, Hkv, conv1d, dtype, device):
    D, Dh = 12, 3
    n_out = (H + 2 * Hkv) * Dh
    bias = rand(n_out, dtype=dtype, device=device)
    for contiguous in (True, False):
        w = fused_weight(D, n_out, conv1d=conv1d, contiguous=contiguous, dtype=dtype, device=device)
        got = ops.split_qkv(w, bias, n_heads=H, n_kv_heads=Hkv, d_head=Dh, layout=layout, conv1d=conv1d)
        want = ref.split_qkv(w, bias, n_heads=H, n_kv_heads=Hkv, d_head=Dh, layout=layout, conv1d=conv1d)
        shapes = [(H, D, Dh), (Hkv, D, Dh), (Hkv, D, Dh), (H, Dh), (Hkv, Dh), (Hkv, Dh)]
        for name, g, r, shape in zip(["W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V"], got, want, shapes):
            assert g.shape == shape and g.dtype == dtype and g.device == w.device, name
            assert torch.equal(g, r), f"{name} differs from the reference ({layout}, contiguous={contiguous})"

        # The inverse: pack(split(w)) == w, in the same layout and orientation, bias included.
        w2, b2 = ops.pack_qkv(*got, layout=layout, conv1d=conv1d)
        assert w2.shape == w.shape and torch.equal(w2, w), "pack_qkv(split_qkv(w)) != w"
        assert torch.equal(b2, bias), "pack_qkv(split_qkv(bias)) != bias"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("conv1d", [True, False], ids=["conv1d", "linear"])
@pytest.mark.parametrize("layout,H,Hkv", LAYOUT_HEADS)
def test_pack_qkv_matches_reference(layout, H, Hkv, conv1d, dtype, device):
    D, Dh = 10, 4
    W_Q, W_K, W_V = (
        rand(H, D, Dh, dtype=dtype, device=device),
        rand(Hkv, D, Dh, dtype=dtype, device=device),
        rand(Hkv, D, Dh, dtype=dtype, device=device),
    )
    W_K = W_K.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous inputs are read through strides
    b_Q, b_K, b_V = (
        rand(H, Dh, dtype=dtype, device=device),
        rand(Hkv, Dh, dtype=dtype, device=device),
        rand(Hkv, Dh, dtype=dtype, device=device),
    )
    w, b = ops.pack_qkv(W_Q, W_K, W_V, b_Q, b_K, b_V, layout=layout, conv1d=conv1d)
    assert torch.equal(w, ref.pack_qkv(W_Q, W_K, W_V, layout=layout, conv1d=conv1d))
    assert torch.equal(b, ref.pack_qkv_bias(b_Q, b_K, b_V, layout=layout))
    w_only, none = ops.pack_qkv(W_Q, W_K, W_V, layout=layout, conv1d=conv1d)
    assert none is None and torch.equal(w_only, w)
    # split(pack(W)) == W
    back = ops.split_qkv(w, b, n_heads=H, n_kv_heads=Hkv, d_head=Dh, layout=layout, conv1d=conv1d)
    for name, g, r in zip(["W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V"], back, (W_Q, W_K, W_V, b_Q, b_K, b_V)):
        assert torch.equal(g, r), f"split_qkv(pack_qkv(...)) changed {name}"


def test_pack_qkv_defaults_to_blocked_conv1d(device):
    """The one-GEMM path: pack_qkv's default output is [D, (H+2Hkv) Dh] with [all Q | all K | all V]:
    column block h of x @ w is x @ W_Q[h] because it is W_Q[h] itself."""
    H, Hkv, D, Dh = 4, 2, 8, 3
    W_Q, W_K, W_V = (rand(n, D, Dh, device=device) for n in (H, Hkv, Hkv))
    w, b = ops.pack_qkv(W_Q, W_K, W_V)
    assert b is None and w.shape == (D, (H + 2 * Hkv) * Dh)
    for h in range(H):
        assert torch.equal(w[:, h * Dh : (h + 1) * Dh], W_Q[h]), f"Q head {h}"
    for g in range(Hkv):
        assert torch.equal(w[:, (H + g) * Dh : (H + g + 1) * Dh], W_K[g]), f"K head {g}"
        assert torch.equal(w[:, (H + Hkv + g) * Dh : (H + Hkv + g + 1) * Dh], W_V[g]), f"V head {g}"


def test_split_qkv_gpt2_rule(device):
    """GPT-2's Conv1D c_attn [D, 3D]: W_Q[h] = c_attn.weight[:, h*Dh:(h+1)*Dh], K and V after D and 2D."""
    H, Dh = 12, 8
    D = H * Dh
    weight, bias = rand(D, 3 * D, device=device), rand(3 * D, device=device)
    W_Q, W_K, W_V, b_Q, b_K, b_V = ops.split_qkv(weight, bias, n_heads=H, d_head=Dh, layout="blocked", conv1d=True)
    for h in range(H):
        cols = slice(h * Dh, (h + 1) * Dh)
        assert torch.equal(W_Q[h], weight[:, cols]) and torch.equal(b_Q[h], bias[cols])
        assert torch.equal(W_K[h], weight[:, D:][:, cols]) and torch.equal(b_K[h], bias[D:][cols])
        assert torch.equal(W_V[h], weight[:, 2 * D :][:, cols]) and torch.equal(b_V[h], bias[2 * D :][cols])


def heads_as_models_read_them(y, layout, H, Hkv, Dh):
    """The fused projection output y [N, n_out] cut into q [N,H,Dh], k, v [N,Hkv,Dh] the way the models
    themselves do it (written from their code, independent of pyqkv.reference.fused_columns)."""
    N = y.shape[0]
    if layout == "blocked":  # GPT-2 / Phi-3 / BigCode: [all Q | all K | all V]
        q, k, v = y.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        return q.reshape(N, H, Dh), k.reshape(N, Hkv, Dh), v.reshape(N, Hkv, Dh)
    if layout == "interleaved":  # GPT-NeoX: view(..., H, 3 * Dh) then chunk into q, k, v
        q, k, v = y.view(N, H, 3 * Dh).chunk(3, dim=-1)
        return q, k, v
    if layout == "grouped":  # Falcon new_decoder_architecture / InternLM2: (Hkv, G + 2, Dh)
        g = y.view(N, Hkv, H // Hkv + 2, Dh)
        return g[:, :, :-2].reshape(N, H, Dh), g[:, :, -2], g[:, :, -1]
    if layout == "codegen":  # CodeGen: reshape(mp_num, -1), split into query, value, key of D/mp each
        mp = 4
        parts = y.view(N, mp, -1).split(H // mp * Dh, dim=-1)
        query, value, key = (p.reshape(N, mp, H // mp, Dh).reshape(N, H, Dh) for p in parts)
        return query, key, value
    raise AssertionError(layout)


@pytest.mark.parametrize("conv1d", [True, False], ids=["conv1d", "linear"])
@pytest.mark.parametrize("layout,H,Hkv", LAYOUT_HEADS)
def test_split_qkv_agrees_with_the_models(layout, H, Hkv, conv1d, device):
    """The split weights are the heads a model cuts from x @ W_fused + b. Cutting is linear in the fused
    columns, so the model's cut of the fused weight itself (its D rows taken as D inputs) and of the bias
    must give W_Q, W_K, W_V and b_Q, b_K, b_V exactly."""
    D, Dh = 8, 2
    n_out = (H + 2 * Hkv) * Dh
    w = fused_weight(D, n_out, conv1d=conv1d, contiguous=True, dtype=torch.float64, device=device)
    bias = rand(n_out, dtype=torch.float64, device=device)
    W_Q, W_K, W_V, b_Q, b_K, b_V = ops.split_qkv(
        w, bias, n_heads=H, n_kv_heads=Hkv, d_head=Dh, layout=layout, conv1d=conv1d
    )
    cut_w = heads_as_models_read_them((w if conv1d else w.t()).contiguous(), layout, H, Hkv, Dh)  # [D, heads, Dh] each
    cut_b = heads_as_models_read_them(bias[None], layout, H, Hkv, Dh)  # [1, heads, Dh] each
    for name, W, b, cw, cb in zip("qkv", (W_Q, W_K, W_V), (b_Q, b_K, b_V), cut_w, cut_b):
        assert torch.equal(W, cw.transpose(0, 1)), f"W_{name.upper()} is not the model's cut of the weight"
        assert torch.equal(b, cb[0]), f"b_{name.upper()} is not the model's cut of the bias"


# --------------------------------------------------------------------------------------------------
# per_head_proj


def per_head_refs(x, W, b, dtype):
    """(reference in float64, reference in dtype) for the tolerance rule."""
    hi = ref.per_head_proj(x.double(), W.double(), None if b is None else b.double())
    return hi, ref.per_head_proj(x, W, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_kind", ["contiguous", "strided", "broadcast"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_per_head_proj_matches_reference(x_kind, with_bias, dtype, device):
    B, S, n, D, E = 2, 7, 5, 24, 6
    if x_kind == "contiguous":
        x = rand(B, S, n, D, dtype=dtype, device=device)
    elif x_kind == "strided":  # heads-major storage seen through a permuted view
        x = rand(n, B, D, S, dtype=dtype, device=device).permute(1, 3, 0, 2)
    else:  # the fork path: every head reads the same residual (stride 0 over n)
        x = rand(B, S, D, dtype=dtype, device=device)[:, :, None].expand(B, S, n, D)
        assert x.stride(2) == 0
    W = rand(n, D, E, dtype=dtype, device=device)
    b = rand(n, E, dtype=dtype, device=device) if with_bias else None
    out = ops.per_head_proj(x, W, b)
    assert out.shape == (B, S, n, E) and out.dtype == dtype
    assert_close_by_rule(out, *per_head_refs(x, W, b, dtype), what="per_head_proj")


def largest_allocation(fn, device) -> int:
    """Bytes of the largest single allocation fn makes on device (the profiler's per-op self memory on
    CPU, the peak above the starting point on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)


def test_per_head_proj_broadcast_does_not_materialize_copies(device):
    """x = resid[:, :, None].expand(B, S, n, D) must stay one GEMM over resid: no allocation as large as
    the n-fold copy (B*S*n*D elements). The output (B*S*n*E) and the reordered weight (n*D*E) are far
    smaller because E << B*S and E << D here."""
    B, S, n, D, E = 2, 16, 8, 256, 4
    resid = rand(B, S, D, device=device)
    W, b = rand(n, D, E, device=device), rand(n, E, device=device)
    x = resid[:, :, None].expand(B, S, n, D)
    n_fold_bytes = B * S * n * D * resid.element_size()

    out = ops.per_head_proj(x, W, b)  # warm-up outside the measurement (lazy init, thread pools)
    assert_close_by_rule(out, *per_head_refs(x, W, b, torch.float32), what="per_head_proj")
    used = largest_allocation(lambda: ops.per_head_proj(x, W, b), device)
    assert used < n_fold_bytes, f"per_head_proj allocated {used} B: the n-fold copy is {n_fold_bytes} B"
    # The measurement can see a materialized copy: the same call on x.contiguous() trips it.
    control = largest_allocation(lambda: ops.per_head_proj(x.contiguous(), W, b), device)
    assert control >= n_fold_bytes, "the allocation probe failed to see an n-fold copy"


# --------------------------------------------------------------------------------------------------
# attention: the one case table (tests/op_cases.py), which the GPU smoke test runs too


def run_attention(q, k, v, mask, scale, causal, return_pattern, alibi, softcap, window):
    """The fused op through its Python wrapper, called as op_cases calls a runner."""
    return ops.attention(
        q,
        k,
        v,
        scale=scale,
        causal=causal,
        mask=mask,
        return_pattern=return_pattern,
        alibi=alibi,
        softcap=softcap,
        window=window,
    )


ATTENTION_CASES = op_cases.attention_cases()
ATTENTION_PARAMS = [pytest.param(c, d, id=f"{c.name}-{str(d)[6:]}") for c in ATTENTION_CASES for d in c.dtypes]


def test_attention_case_table_holds_each_case_once():
    names = [c.name for c in ATTENTION_CASES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    seen = {}
    for c in ATTENTION_CASES:
        key = dataclasses.replace(c, name="")
        assert key not in seen, f"{c.name!r} is the case {seen[key]!r} again"
        seen[key] = c.name


@pytest.mark.parametrize("case,dtype", ATTENTION_PARAMS)
def test_attention_matches_reference(case, dtype, device):
    """z, lse (and the pattern) by the tolerance rule; hidden keys weight 0, rows that see no key z = 0 and
    lse = -inf, exactly; without the pattern and, for the cases marked so, with it."""
    ok, msg = op_cases.check_attention_case(case, dtype, device, run_attention)
    assert ok, msg


def exercises_the_split_form(c: op_cases.AttnCase) -> bool:
    """The cases of the table that test what the split form itself does (masks, alibi, softcap, windows,
    rows that see no key): it is ATen ops, without tiles, so the kernels' tile and split sizes add nothing
    but time (its work is bounded as the fuzz tests bound theirs)."""
    features = c.mask or c.alibi or c.softcap is not None or c.window or c.S > c.K or c.K == 0
    return bool(features) and c.B * c.H * c.S * max(c.K, 1) * c.Dh <= 2e6


SPLIT_FORM_PARAMS = [
    pytest.param(c, d, id=f"{c.name}-{str(d)[6:]}")
    for c in ATTENTION_CASES
    if exercises_the_split_form(c)
    for d in c.dtypes
]


@pytest.mark.parametrize("case,dtype", SPLIT_FORM_PARAMS)
def test_split_form_matches_reference(case, dtype, device):
    """attn_scores -> attn_softmax -> attn_apply, the path of a hook on hook_attn_scores: hidden scores hold
    the dtype's minimum; the visible scores, the pattern and z satisfy the rule. It is given the reference's
    K/V (NaN-free): like the reference it multiplies hidden keys' rows by 0."""
    q, _, _, mask, scale, alibi, k, v = op_cases.build_attention_inputs(case, dtype, device)
    B, S, K, H = case.B, case.S, case.K, case.H
    kw = dict(scale=scale, causal=case.causal, mask=mask, alibi=alibi, softcap=case.softcap, window=case.window)
    scores = ops.attn_scores(q, k, **kw)
    assert scores.shape == (B, H, S, K) and scores.dtype == dtype
    vis = ref.visible_keys(B, H, S, K, causal=case.causal, mask=mask, window=case.window, device=q.device).expand(
        B, H, S, K
    )
    assert (scores[~vis] == torch.finfo(dtype).min).all(), "hidden scores must hold finfo(dtype).min"
    s_hi, s_lo = ref.attn_scores(q, k, **kw), ref.attn_scores(q, k, **kw, compute_dtype=dtype)
    assert_close_by_rule(scores[vis], s_hi[vis], s_lo[vis], what="attn_scores")
    additive = mask is not None and mask.dim() == 4 and mask.is_floating_point()
    if case.softcap and not additive:  # what hook_attn_scores sees is softcapped: |scale q.k| <= c, plus alibi
        bias = 0.0 if alibi is None else alibi.double()[:, :, None, :].expand(B, H, S, K)
        rounding = 2 * torch.finfo(dtype).eps * (abs(bias) + case.softcap)  # scores are rounded to q's dtype
        assert ((scores.double() - bias).abs() <= case.softcap + rounding)[vis].all()
    pattern = ops.attn_softmax(scores)
    z = ops.attn_apply(pattern, v)
    (z_hi, _, p_hi), (z_lo, _, p_lo) = op_cases.attention_refs(q, k, v, **kw)
    assert_close_by_rule(pattern, p_hi, p_lo, what="split-form pattern")
    assert (pattern[~vis] == 0).all(), "a hidden key got weight"
    assert_close_by_rule(z, z_hi, z_lo, what="split-form z")
    assert (z.transpose(1, 2)[~vis.any(-1)] == 0).all(), "a row that sees no key is not exactly 0"


# Biases of at most ~0.5 * K: beyond K = 1000, exp of the score underflows float64 for real (weight 0).
ALIBI_F64 = [
    pytest.param(c, id=c.name) for c in ATTENTION_CASES if c.alibi and c.K <= 1000 and torch.float64 in c.dtypes
]


@pytest.mark.parametrize("case", ALIBI_F64)
def test_alibi_hides_nothing(case, device):
    """The visible keys are those of causal, window and mask alone: each gets weight > 0 (float64)."""
    q, k, v, mask, scale, alibi, _, _ = op_cases.build_attention_inputs(case, torch.float64, device)
    _, lse, pattern = run_attention(q, k, v, mask, scale, case.causal, True, alibi, case.softcap, case.window)
    vis = ref.visible_keys(
        case.B, case.H, case.S, case.K, causal=case.causal, mask=mask, window=case.window, device=q.device
    ).expand_as(pattern)
    assert (pattern[vis] > 0).all() and torch.equal(torch.isfinite(lse), vis.any(-1))


def test_softcap_zero_and_large_window_change_nothing(device):
    """softcap=0 is off and a window of at least K keys hides nothing: bitwise the plain op."""
    q, k, v = qkv_views(2, 17, 40, 4, 2, 32, dtype=torch.float32, device=device)
    plain = ops.attention(q, k, v, scale=0.3, causal=True, return_pattern=True)
    same = ops.attention(q, k, v, scale=0.3, causal=True, return_pattern=True, softcap=0.0, window=40)
    for a, b in zip(plain, same):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [float("nan"), float("-inf"), "finfo.min"])
def test_one_mask_rule_for_every_path(hidden, dtype, device):
    """An additive entry is visible iff it is > half the mask dtype's most negative value, so NaN hides
    like -inf and finfo.min (issue 14, defect 1: the split form gave a NaN row). With q = 0 every score is
    0 and the pattern is softmax(mask row) = softmax([0, hidden, -1.6]) = [0.832, 0, 0.168]. The fused op,
    the split form (the path of a hook on hook_attn_scores) and the reference give that row; so does the
    same mask written as a bool mask (True = attend) plus its finite biases. ref_hi is that row computed
    by hand, ref_lo the reference in q's dtype."""
    hidden = torch.finfo(dtype).min if hidden == "finfo.min" else hidden
    B, S, K, H, Dh = 1, 1, 3, 2, 8
    q = torch.zeros(B, S, H, Dh, dtype=dtype, device=device)
    k, v = rand(B, K, H, Dh, dtype=dtype, device=device), rand(B, K, H, Dh, dtype=dtype, device=device)
    mask = torch.tensor([0.0, hidden, -1.6], dtype=dtype).view(1, 1, 1, K).to(device)
    want = torch.tensor([1.0, 0.0, math.exp(-1.6)], dtype=torch.float64)
    want = (want / want.sum()).view(1, 1, 1, K).expand(B, H, S, K)
    lo = ref.attention(q, k, v, scale=1.0, causal=False, mask=mask, return_pattern=True, compute_dtype=dtype)[2]
    _, _, fused = ops.attention(q, k, v, scale=1.0, causal=False, mask=mask, return_pattern=True)
    split = ops.attn_softmax(ops.attn_scores(q, k, scale=1.0, causal=False, mask=mask))
    oracle = ref.attention(q, k, v, scale=1.0, causal=False, mask=mask, return_pattern=True)[2]
    vis = torch.tensor([True, False, True], device=device).view(1, 1, 1, K)
    bias = torch.tensor([0.0, 0.0, -1.6], dtype=dtype).view(1, 1, 1, K).to(device)
    z_bool, _, p_bool = ops.attention(
        q, k, v + 0, scale=1.0, causal=False, mask=vis, return_pattern=True, alibi=bias.view(1, 1, K)
    )
    for name, got in (("fused op", fused), ("split form", split), ("reference", oracle), ("bool mask", p_bool)):
        assert_close_by_rule(got, want, lo, what=name)
    z = ops.attention(q, k, v, scale=1.0, causal=False, mask=mask)[0]
    assert not torch.isnan(z).any()
    assert torch.equal(z, z_bool), "the bool mask and the additive mask give different z"


def test_cpu_pattern_memory_is_reused_only_when_nothing_holds_it():
    """A large CPU pattern (>= 4 MiB) is written into the previous call's memory when nothing holds that
    any more (a read-only hook_pattern drops it: no fresh pages to fault in), never while a tensor or a
    view of it is alive; either way the values are the reference's."""
    B, S, H, Hkv, Dh = 1, 1100, 2, 1, 8  # pattern: 2 * 1100 * 1100 float32 = 9.7 MB
    q, k, v = qkv_views(B, S, S, H, Hkv, Dh, dtype=torch.float32, device="cpu")
    (_, _, p_hi), (_, _, p_lo) = op_cases.attention_refs(q, k, v, scale=0.3, causal=True)

    def pattern():
        p = ops.attention(q, k, v, scale=0.3, causal=True, return_pattern=True)[2]
        assert_close_by_rule(p, p_hi, p_lo, what="pattern")
        return p

    p = pattern()
    ptr, nbytes = p.data_ptr(), p.numel() * p.element_size()
    del p
    # Without the reuse, freed memory would go back to the allocator and this block would likely take it.
    blocker = torch.empty(nbytes, dtype=torch.uint8)
    p = pattern()
    assert p.data_ptr() == ptr, "released memory was not reused"
    del blocker
    held = p.clone()
    p2 = pattern()
    assert p2.data_ptr() != p.data_ptr() and torch.equal(p, held), "memory still held was reused"
    row = p2[0, 0]  # a view keeps the memory alive too
    ptr2 = p2.data_ptr()
    del p2
    assert pattern().data_ptr() != ptr2, "memory held by a view was reused"
    del row


def test_incremental_decoding_equals_full_causal_attention(device):
    """Prefill P tokens, then decode one token at a time with kv_append into a NaN-filled cache: each step's
    z equals the matching row of one causal attention over the whole sequence (bottom-right alignment).
    float64: the reference in the kernel's dtype is the float64 one, so the rule's bound is its atol."""
    B, T, P, H, Hkv, Dh, capacity = 2, 12, 5, 4, 2, 16, 16
    dtype = torch.float64
    q_all, k_all, v_all = qkv_views(B, T, T, H, Hkv, Dh, dtype=dtype, device=device)
    z_full = ref.attention(q_all, k_all, v_all, scale=Dh**-0.5, causal=True)[0]
    k_cache = torch.full((B, Hkv, capacity, Dh), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    steps = [(0, P)] + [(t, t + 1) for t in range(P, T)]
    for lo, hi in steps:
        ops.kv_append(k_cache, v_cache, k_all[:, lo:hi], v_all[:, lo:hi], lo)
        k, v = k_cache[:, :, :hi].transpose(1, 2), v_cache[:, :, :hi].transpose(1, 2)
        z, _, _ = ops.attention(q_all[:, lo:hi], k, v, scale=Dh**-0.5, causal=True)
        assert_close_by_rule(z, z_full[:, lo:hi], z_full[:, lo:hi], what=f"step {lo}:{hi}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_alibi_equals_the_same_bias_as_a_4d_mask(dtype, device):
    """alibi [B, H, K] gives what the additive mask alibi[:, :, None, :] expanded to [B, H, S, K] gives
    (which is how Bloom applies it), without any [B, H, S, K] buffer: the same sums, bit for bit."""
    B, S, K, H, Hkv, Dh = 2, 17, 40, 4, 2, 32
    q, k, v = qkv_views(B, S, K, H, Hkv, Dh, dtype=dtype, device=device)
    alibi = make_alibi("per_batch", B, H, K, dtype=torch.float32, device=device)
    z_a, lse_a, p_a = ops.attention(q, k, v, scale=Dh**-0.5, causal=True, alibi=alibi, return_pattern=True)
    as_mask = alibi[:, :, None, :].expand(B, H, S, K)
    z_m, lse_m, p_m = ops.attention(q, k, v, scale=Dh**-0.5, causal=True, mask=as_mask, return_pattern=True)
    for name, a, m in (("z", z_a, z_m), ("lse", lse_a, lse_m), ("pattern", p_a, p_m)):
        assert torch.equal(a, m), f"{name}: max |alibi - mask| = {(a.double() - m.double()).abs().max().item():.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_form_float32_scores(dtype, device):
    """attn_scores(dtype=float32), what reorder_and_upcast_attn asks for: from the same inputs, float32
    rounding only (ref_lo: the reference in float32 on the same inputs)."""
    B, S, K, H, Hkv, Dh = 2, 17, 23, 12, 4, 32
    q, k, _ = qkv_views(B, S, K, H, Hkv, Dh, dtype=dtype, device=device)
    mask = make_mask("add4d_bh", B, H, S, K, dtype=dtype, device=device)
    alibi = make_alibi("heads1_fp32", B, H, K, dtype=dtype, device=device)
    kw = dict(scale=Dh**-0.5, causal=True, mask=mask, alibi=alibi)
    s32 = ops.attn_scores(q, k, **kw, dtype=torch.float32)
    assert s32.dtype == torch.float32
    vis = ref.visible_keys(B, H, S, K, causal=True, mask=mask, device=q.device).expand(B, H, S, K)
    assert (s32[~vis] == torch.finfo(torch.float32).min).all()
    s_hi = ref.attn_scores(q.double(), k.double(), **kw)  # not rounded to q's dtype
    s_lo = ref.attn_scores(q.float(), k.float(), **kw, compute_dtype=torch.float32)
    assert_close_by_rule(s32[vis], s_hi[vis], s_lo[vis], what="float32 attn_scores")


def test_split_form_alibi_gradient(device):
    """attn_scores is composed of ATen ops: gradients reach alibi (summed over query positions and over
    the batch for a [1, H, K] bias); the split form's and the fused op's equal autograd through the
    reference (float64: the rule's bound is its atol)."""
    B, S, K, H, Hkv, Dh = 2, 5, 7, 4, 2, 8
    q, k, v = (_req(t) for t in qkv_views(B, S, K, H, Hkv, Dh, dtype=f64, device=device))
    alibi = _req(make_alibi("b1", B, H, K, dtype=f64, device=device))
    scores = ops.attn_scores(q, k, scale=0.5, causal=True, alibi=alibi)
    z_split = ops.attn_apply(ops.attn_softmax(scores), v)
    z_fused, _, _ = ops.attention(q, k, v, scale=0.5, causal=True, alibi=alibi)
    z_ref, _, _ = ref.attention(q, k, v, scale=0.5, causal=True, alibi=alibi)
    g = rand(B, S, H, Dh, dtype=f64, device=device)
    want = torch.autograd.grad(z_ref, (q, k, v, alibi), g)
    for path, z in (("split form", z_split), ("fused op", z_fused)):
        got = torch.autograd.grad(z, (q, k, v, alibi), g)
        for name, a, b in zip(("q", "k", "v", "alibi"), got, want):
            assert_close_by_rule(a, b, b, what=f"{path} d{name}")
        assert got[3].shape == (1, H, K)


# --------------------------------------------------------------------------------------------------
# kv_append


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("start,S", [(0, 5), (7, 1), (11, 5), (0, 16)], ids=["prefill", "decode", "to_end", "full"])
def test_kv_append_matches_reference(start, S, dtype, device):
    """In place, through the cache's strides; rows outside [start, start + S) keep their NaN sentinel."""
    B, Hkv, Dh, capacity, H = 2, 3, 8, 16, 6
    _, k_new, v_new = qkv_views(B, S, S, H, Hkv, Dh, dtype=dtype, device=device)  # strided views
    k_cache = torch.full((B, Hkv, capacity, Dh), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_want, v_want = k_cache.clone(), v_cache.clone()
    ptrs = (k_cache.data_ptr(), v_cache.data_ptr())
    ops.kv_append(k_cache, v_cache, k_new, v_new, start)
    ref.kv_append(k_want, v_want, k_new, v_new, start)
    assert (k_cache.data_ptr(), v_cache.data_ptr()) == ptrs, "kv_append must write in place"
    for name, got, want in (("k_cache", k_cache, k_want), ("v_cache", v_cache, v_want)):
        assert torch.equal(got[:, :, start : start + S], want[:, :, start : start + S]), name
        outside = torch.cat([got[:, :, :start], got[:, :, start + S :]], dim=2)
        assert torch.isnan(outside).all(), f"{name}: rows outside [{start}, {start + S}) were written"
    assert torch.equal(k_cache[:, :, start : start + S], k_new.transpose(1, 2))


def test_kv_append_into_a_cache_view(device):
    """The cache may itself be a view (a window of a larger buffer, batch-strided): writes go through it
    and touch nothing else in the buffer."""
    B, Hkv, Dh, S = 2, 2, 4, 3
    buf_k = torch.full((Hkv, B + 1, 20, Dh), -7.0, device=device)
    buf_v = torch.full_like(buf_k, -7.0)
    k_cache, v_cache = buf_k[:, 1:, 2:12].transpose(0, 1), buf_v[:, 1:, 2:12].transpose(0, 1)  # [B, Hkv, 10, Dh]
    k_new, v_new = rand(B, S, Hkv, Dh, device=device), rand(B, S, Hkv, Dh, device=device)
    want_k, want_v = buf_k.clone(), buf_v.clone()
    ref.kv_append(want_k[:, 1:, 2:12].transpose(0, 1), want_v[:, 1:, 2:12].transpose(0, 1), k_new, v_new, 4)
    ops.kv_append(k_cache, v_cache, k_new, v_new, 4)
    assert torch.equal(buf_k, want_k) and torch.equal(buf_v, want_v)


# --------------------------------------------------------------------------------------------------
# opcheck: schema, autograd registration, fake kernel, AOT dispatch (dynamic shapes)

f64 = torch.float64


def _req(t):
    return t.detach().requires_grad_(True)


def opcheck_cases(device):
    """(id, op, args) for torch.library.opcheck: small but representative inputs."""
    B, S, K, H, Hkv, Dh = 2, 3, 5, 4, 2, 8
    q, k, v = (_req(t) for t in qkv_views(B, S, K, H, Hkv, Dh, dtype=f64, device=device))
    pad = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool, device=device)
    add_b1 = _req(make_mask("add4d_b1", B, H, S, K, dtype=f64, device=device))
    add_bh = make_mask("alibi_hidden", B, H, S, K, dtype=f64, device=device)
    qh, kh, vh = qkv_views(B, S, K, H, Hkv, Dh, dtype=torch.bfloat16, device=device)
    attn = torch.ops.pyqkv.attention.default
    w = _req(rand(8, (4 + 2 * 2) * 2, dtype=f64, device=device))
    wl = _req(rand(8, (4 + 2 * 2) * 2, dtype=f64, device=device)).t()  # Linear [n_out, D], strided
    Ws = [_req(rand(n, 8, 2, dtype=f64, device=device)) for n in (4, 2, 2)]
    resid = _req(rand(2, 3, 8, dtype=f64, device=device))
    W, b = _req(rand(4, 8, 5, dtype=f64, device=device)), _req(rand(4, 5, dtype=f64, device=device))
    x = _req(rand(2, 4, 3, 8, dtype=f64, device=device)).transpose(1, 2)  # [B, S, n, D], heads-major storage
    k_cache, v_cache = rand(2, 2, 10, 4, device=device), rand(2, 2, 10, 4, device=device)
    _, k_new, v_new = qkv_views(2, 3, 3, 2, 2, 4, dtype=torch.float32, device=device)
    alibi = _req(make_alibi("per_batch", B, H, K, dtype=f64, device=device))
    alibi_b1_fp32 = make_alibi("b1", B, H, K, dtype=torch.float32, device=device)
    alibi_expanded = make_alibi("expanded", B, H, K, dtype=f64, device=device)
    bool4d = make_mask("bool4d", B, H, S, K, dtype=f64, device=device)
    return [
        ("attention-causal-nomask", attn, (q, k, v, None, 0.35, True, False)),
        ("attention-pattern-pad2d", attn, (q, k, v, pad, 0.35, False, True)),
        ("attention-pattern-add4d-grad", attn, (q, k, v, add_b1, 0.35, True, True)),
        ("attention-alibi-hidden", attn, (q, k, v, add_bh, 0.35, False, False)),
        ("attention-bf16-pattern", attn, (qh, kh, vh, pad, 0.35, True, True)),
        ("attention-alibi-add4d-grad", attn, (q, k, v, add_b1, 0.35, True, True, alibi)),
        ("attention-alibi-pad2d-expanded", attn, (q, k, v, pad, 0.35, False, False, alibi_expanded)),
        ("attention-alibi-bf16-fp32-bias", attn, (qh, kh, vh, None, 0.35, True, True, alibi_b1_fp32)),
        ("attention-softcap-window-grad", attn, (q, k, v, add_b1, 0.35, True, True, alibi, 0.7, 3)),
        ("attention-window-bool4d", attn, (q, k, v, bool4d, 0.35, True, True, None, None, 2)),
        ("attention-softcap-bf16", attn, (qh, kh, vh, pad, 0.35, False, True, None, 1.5, None)),
        (
            "attn_scores-softcap-window",
            torch.ops.pyqkv.attn_scores.default,
            (q, k, add_b1, 0.35, True, alibi, 0.7, 3, None),
        ),
        ("attn_softmax-fp32", torch.ops.pyqkv.attn_softmax.default, (add_bh.to(torch.float32), None)),
        ("attn_apply-gqa", torch.ops.pyqkv.attn_apply.default, (_req(rand(B, H, S, K, dtype=f64, device=device)), v)),
        ("split_qkv-grouped-conv1d", torch.ops.pyqkv.split_qkv.default, (w, 4, 2, 2, "grouped", True)),
        ("split_qkv-blocked-linear", torch.ops.pyqkv.split_qkv.default, (wl, 4, 2, 2, "blocked", False)),
        ("pack_qkv-grouped-linear", torch.ops.pyqkv.pack_qkv.default, (*Ws, "grouped", False)),
        (
            "per_head_proj-broadcast-bias",
            torch.ops.pyqkv.per_head_proj.default,
            (resid[:, :, None].expand(2, 3, 4, 8), W, b),
        ),
        ("per_head_proj-strided-nobias", torch.ops.pyqkv.per_head_proj.default, (x, W, None)),
        ("kv_append", torch.ops.pyqkv.kv_append.default, (k_cache, v_cache, k_new, v_new, 4)),
    ]


OPCHECK_IDS = [
    "attention-causal-nomask",
    "attention-pattern-pad2d",
    "attention-pattern-add4d-grad",
    "attention-alibi-hidden",
    "attention-bf16-pattern",
    "attention-alibi-add4d-grad",
    "attention-alibi-pad2d-expanded",
    "attention-alibi-bf16-fp32-bias",
    "attention-softcap-window-grad",
    "attention-window-bool4d",
    "attention-softcap-bf16",
    "attn_scores-softcap-window",
    "attn_softmax-fp32",
    "attn_apply-gqa",
    "split_qkv-grouped-conv1d",
    "split_qkv-blocked-linear",
    "pack_qkv-grouped-linear",
    "per_head_proj-broadcast-bias",
    "per_head_proj-strided-nobias",
    "kv_append",
]


@pytest.mark.parametrize("case_id", OPCHECK_IDS)
def test_opcheck(case_id, device):
    cases = {c[0]: c[1:] for c in opcheck_cases(device)}
    assert list(cases) == OPCHECK_IDS
    op, args = cases[case_id]
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------------------------------
# gradcheck in float64


@pytest.mark.parametrize("conv1d", [True, False], ids=["conv1d", "linear"])
@pytest.mark.parametrize(
    "layout,H,Hkv", [("blocked", 4, 2), ("interleaved", 2, 2), ("grouped", 4, 2), ("codegen", 4, 4)]
)
def test_gradcheck_split_and_pack(layout, H, Hkv, conv1d, device):
    D, Dh = 3, 2
    n_out = (H + 2 * Hkv) * Dh
    w = _req(fused_weight(D, n_out, conv1d=conv1d, contiguous=False, dtype=f64, device=device))
    bias = _req(rand(n_out, dtype=f64, device=device))
    kw = dict(n_heads=H, n_kv_heads=Hkv, d_head=Dh, layout=layout, conv1d=conv1d)
    assert torch.autograd.gradcheck(lambda w, b: ops.split_qkv(w, b, **kw), (w, bias))
    Ws = [_req(rand(n, D, Dh, dtype=f64, device=device)) for n in (H, Hkv, Hkv)]
    bs = [_req(rand(n, Dh, dtype=f64, device=device)) for n in (H, Hkv, Hkv)]
    assert torch.autograd.gradcheck(lambda *t: ops.pack_qkv(*t, layout=layout, conv1d=conv1d), (*Ws, *bs))


@pytest.mark.parametrize("x_kind", ["strided", "broadcast"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_per_head_proj(x_kind, with_bias, device):
    B, S, n, D, E = 2, 3, 3, 4, 2
    W = _req(rand(n, D, E, dtype=f64, device=device))
    b = _req(rand(n, E, dtype=f64, device=device)) if with_bias else None
    if x_kind == "broadcast":
        resid = _req(rand(B, S, D, dtype=f64, device=device))
        inputs, expand = (resid, W), lambda r: r[:, :, None].expand(B, S, n, D)
    else:
        x = _req(rand(B, n, S, D, dtype=f64, device=device))
        inputs, expand = (x, W), lambda t: t.transpose(1, 2)
    fn = lambda t, W, *b: ops.per_head_proj(expand(t), W, *b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs + ((b,) if with_bias else ()))


def _finite_lse(z, lse, pattern):
    """lse is -inf on rows with no visible key; finite differences there are nan, so those entries are
    replaced by 0 (their gradient must then be 0 too)."""
    return z, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)), pattern


GRAD_CASES = {
    # id: (S, K, H, Hkv, causal, mask kind, return_pattern)
    "gqa-causal-K>S": (3, 5, 4, 2, True, "none", False),
    "gqa-causal-pattern-lse": (3, 5, 4, 2, True, "none", True),
    "mha-pad2d-pattern": (4, 4, 2, 2, False, "bool2d", True),
    "mqa-add4d_b1-grad": (3, 6, 4, 1, True, "add4d_b1", True),
    "gqa-add4d_bh-grad": (3, 5, 4, 2, False, "alibi_hidden", True),
    "fully-masked-row": (4, 4, 4, 2, True, "leftpad", True),
}


@pytest.mark.parametrize("case_id", list(GRAD_CASES))
def test_gradcheck_attention(case_id, device):
    """Gradients wrt q, k, v (and an additive 4-D mask) of every output: z, lse and pattern."""
    S, K, H, Hkv, causal, mask_kind, return_pattern = GRAD_CASES[case_id]
    B, Dh = 2, 4
    q, k, v = (_req(t) for t in qkv_views(B, S, K, H, Hkv, Dh, dtype=f64, device=device))
    if mask_kind == "leftpad":
        mask = torch.ones(B, K, dtype=torch.bool, device=device)
        mask[1, :2] = False  # with causal and S == K: row 1's first 2 queries see nothing
    else:
        mask = make_mask(mask_kind, B, H, S, K, dtype=f64, device=device)
    inputs = [q, k, v]
    if mask is not None and mask.dim() == 4:
        mask = _req(mask)
        inputs.append(mask)

    def fn(q, k, v, *m):
        out = ops.attention(q, k, v, scale=0.5, causal=causal, mask=m[0] if m else mask, return_pattern=return_pattern)
        return _finite_lse(*out) if return_pattern else _finite_lse(*out)[:2]

    # fast_mode checks random projections vᵀ J u of the Jacobian: the full one costs seconds per case here.
    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=True)


def test_gradcheck_attention_full_jacobian(device):
    """One tiny case with the full Jacobian, element by element: GQA, causal with K > S, a per-head
    additive mask with hidden entries that requires grad, every output."""
    B, S, K, H, Hkv, Dh = 1, 2, 3, 2, 1, 3
    q, k, v = (_req(t) for t in qkv_views(B, S, K, H, Hkv, Dh, dtype=f64, device=device))
    mask = _req(make_mask("alibi_hidden", B, H, S, K, dtype=f64, device=device))

    def fn(q, k, v, mask):
        return _finite_lse(*ops.attention(q, k, v, scale=0.5, causal=True, mask=mask, return_pattern=True))

    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


ALIBI_GRAD_CASES = {
    # id: (S, K, H, Hkv, causal, mask kind, alibi kind, return_pattern)
    "gqa-causal-K>S-per_batch": (3, 5, 4, 2, True, "none", "per_batch", False),
    "gqa-causal-b1-pattern-lse": (3, 5, 4, 2, True, "none", "b1", True),
    "mha-pad2d-heads1-pattern": (4, 4, 2, 2, False, "bool2d", "heads1", True),
    "mqa-add4d-per_batch-pattern": (3, 6, 4, 1, True, "add4d_b1", "per_batch", True),
    "fully-masked-row-b1": (4, 4, 4, 2, True, "leftpad", "b1", True),
}


@pytest.mark.parametrize("case_id", list(ALIBI_GRAD_CASES))
def test_gradcheck_attention_alibi(case_id, device):
    """Gradients wrt q, k, v, alibi (and an additive 4-D mask) of every output; a broadcast alibi's
    gradient sums over the dims it broadcasts over."""
    S, K, H, Hkv, causal, mask_kind, alibi_kind, return_pattern = ALIBI_GRAD_CASES[case_id]
    B, Dh = 2, 4
    q, k, v = (_req(t) for t in qkv_views(B, S, K, H, Hkv, Dh, dtype=f64, device=device))
    if mask_kind == "leftpad":
        mask = torch.ones(B, K, dtype=torch.bool, device=device)
        mask[1, :2] = False
    else:
        mask = make_mask(mask_kind, B, H, S, K, dtype=f64, device=device)
    shape = {"per_batch": (B, H, K), "b1": (1, H, K), "heads1": (B, 1, K)}[alibi_kind]
    alibi = _req(rand(*shape, dtype=f64, device=device))
    inputs = [q, k, v, alibi]
    if mask is not None and mask.dim() == 4:
        inputs.append(_req(mask))

    def fn(q, k, v, alibi, *m):
        m = m[0] if m else mask
        out = ops.attention(q, k, v, scale=0.5, causal=causal, mask=m, return_pattern=return_pattern, alibi=alibi)
        return _finite_lse(*out) if return_pattern else _finite_lse(*out)[:2]

    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=True)


def test_gradcheck_attention_alibi_full_jacobian(device):
    """One tiny case with the full Jacobian: GQA, causal with K > S, a [1, H, K] alibi and a per-head
    additive mask, every output."""
    B, S, K, H, Hkv, Dh = 2, 2, 3, 2, 1, 3
    q, k, v = (_req(t) for t in qkv_views(B, S, K, H, Hkv, Dh, dtype=f64, device=device))
    mask = _req(make_mask("alibi_hidden", B, H, S, K, dtype=f64, device=device))
    alibi = _req(rand(1, H, K, dtype=f64, device=device))

    def fn(q, k, v, mask, alibi):
        return _finite_lse(*ops.attention(q, k, v, scale=0.5, causal=True, mask=mask, return_pattern=True, alibi=alibi))

    assert torch.autograd.gradcheck(fn, (q, k, v, mask, alibi))


SOFTCAP_GRAD_CASES = {
    # id: (S, K, H, Hkv, mask kind, softcap, window, alibi, return_pattern)
    "gqa-softcap-K>S-pattern": (3, 5, 4, 2, "none", 0.8, None, False, True),
    "mqa-softcap-add4d-alibi": (3, 6, 4, 1, "add4d_b1", 0.5, None, True, True),
    "gqa-window2-pattern": (4, 6, 4, 2, "none", None, 2, False, True),
    "mha-softcap-window-pad2d": (4, 4, 2, 2, "bool2d", 0.6, 2, True, False),
}


@pytest.mark.parametrize("case_id", list(SOFTCAP_GRAD_CASES))
def test_gradcheck_attention_softcap_window(case_id, device):
    """float64 gradients through the softcap (dR = dS (1 - tanh²(r / c))) and the window, of every
    output, wrt q, k, v (and an additive mask and alibi)."""
    S, K, H, Hkv, mask_kind, softcap, window, with_alibi, return_pattern = SOFTCAP_GRAD_CASES[case_id]
    B, Dh = 2, 4
    q, k, v = (_req(t * 2) for t in qkv_views(B, S, K, H, Hkv, Dh, dtype=f64, device=device))
    mask = make_mask(mask_kind, B, H, S, K, dtype=f64, device=device)
    inputs = [q, k, v]
    if mask is not None and mask.dim() == 4:
        mask = _req(mask)
        inputs.append(mask)
    alibi = _req(rand(1, H, K, dtype=f64, device=device)) if with_alibi else None
    if alibi is not None:
        inputs.append(alibi)

    def fn(q, k, v, *rest):
        rest = list(rest)
        m = rest.pop(0) if mask is not None and mask.dim() == 4 else mask
        a = rest.pop(0) if alibi is not None else None
        out = ops.attention(
            q,
            k,
            v,
            scale=0.5,
            causal=True,
            mask=m,
            return_pattern=return_pattern,
            alibi=a,
            softcap=softcap,
            window=window,
        )
        return _finite_lse(*out) if return_pattern else _finite_lse(*out)[:2]

    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=True)

    # The split form's autograd (its ATen ops) agrees.
    def split(q, k, v, *rest):
        rest = list(rest)
        m = rest.pop(0) if mask is not None and mask.dim() == 4 else mask
        a = rest.pop(0) if alibi is not None else None
        sc = ops.attn_scores(q, k, scale=0.5, causal=True, mask=m, alibi=a, softcap=softcap, window=window)
        return ops.attn_apply(ops.attn_softmax(sc), v)

    assert torch.autograd.gradcheck(split, tuple(inputs), fast_mode=True)


def test_fully_masked_row_has_zero_gradient(device):
    B, S, H, Hkv, Dh, pad = 2, 5, 4, 2, 8, 2
    q, k, v = (_req(t) for t in qkv_views(B, S, S, H, Hkv, Dh, dtype=f64, device=device))
    mask = torch.ones(B, S, dtype=torch.bool, device=device)
    mask[1, :pad] = False
    z, lse, pattern = ops.attention(q, k, v, scale=0.5, causal=True, mask=mask, return_pattern=True)
    (z.sum() + pattern.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(t.grad).all(), f"{name}.grad has non-finite entries"
    assert (q.grad[1, :pad] == 0).all(), "a query that sees nothing must get zero gradient"
    assert (k.grad[1, :pad] == 0).all() and (v.grad[1, :pad] == 0).all(), "hidden keys must get zero gradient"
    assert q.grad[1, pad:].abs().sum() > 0 and v.grad[1, pad:].abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# torch.compile: the fake kernels let dynamo/AOT trace every op into one graph


def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    B, S, H, Hkv, Dh, D = 2, 7, 4, 2, 8, 16
    n_out = (H + 2 * Hkv) * Dh
    weight = _req(rand(D, n_out, device=device))
    bias = rand(n_out, device=device)
    resid = _req(rand(B, S, D, device=device))
    mask = torch.ones(B, S, dtype=torch.bool, device=device)
    mask[1, :2] = False

    def layer(resid, weight):
        W_Q, W_K, W_V, b_Q, b_K, b_V = ops.split_qkv(
            weight, bias, n_heads=H, n_kv_heads=Hkv, d_head=Dh, layout="grouped", conv1d=True
        )
        q = ops.per_head_proj(resid[:, :, None].expand(B, S, H, D), W_Q, b_Q)
        k = ops.per_head_proj(resid[:, :, None].expand(B, S, Hkv, D), W_K, b_K)
        v = ops.per_head_proj(resid[:, :, None].expand(B, S, Hkv, D), W_V, b_V)
        z, lse, pattern = ops.attention(q, k, v, scale=Dh**-0.5, causal=True, mask=mask, return_pattern=True)
        return z, pattern

    graph_ops = []

    def recording_backend(gm, example_inputs):
        graph_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(layer, backend=recording_backend, fullgraph=True)
    z_c, p_c = compiled(resid, weight)
    z_e, p_e = layer(resid, weight)
    assert torch.equal(z_c, z_e) and torch.equal(p_c, p_e), "aot_eager runs the same kernels: bit for bit"
    for op in ("split_qkv", "per_head_proj", "attention"):
        assert any(f"pyqkv.{op}" in t for t in graph_ops), f"pyqkv.{op} is not in the traced graph: {graph_ops}"
    # Backward through the compiled graph equals eager backward.
    g_c = torch.autograd.grad((z_c.sum() + p_c.square().sum()), (resid, weight))
    g_e = torch.autograd.grad((z_e.sum() + p_e.square().sum()), (resid, weight))
    for name, a, b in zip(("resid", "weight"), g_c, g_e):
        assert torch.equal(a, b), f"d{name}: compiled and eager backward differ"

    # And the whole layer equals the reference composition (ref_lo: the same composition in float32).
    def reference_layer(compute_dtype):
        r, w, bi = (t.detach().to(compute_dtype) for t in (resid, weight, bias))
        W_Q, W_K, W_V, b_Q, b_K, b_V = ref.split_qkv(
            w, bi, n_heads=H, n_kv_heads=Hkv, d_head=Dh, layout="grouped", conv1d=True
        )
        rq, rk, rv = (
            ref.per_head_proj(r[:, :, None].expand(B, S, W.shape[0], D), W, b)
            for W, b in ((W_Q, b_Q), (W_K, b_K), (W_V, b_V))
        )
        z, _, p = ref.attention(
            rq, rk, rv, scale=Dh**-0.5, causal=True, mask=mask, return_pattern=True, compute_dtype=compute_dtype
        )
        return z, p

    (z_hi, p_hi), (z_lo, p_lo) = reference_layer(torch.float64), reference_layer(torch.float32)
    assert_close_by_rule(z_c, z_hi, z_lo, what="compiled z")
    assert_close_by_rule(p_c, p_hi, p_lo, what="compiled pattern")
