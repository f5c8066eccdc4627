"""Property-based tests (hypothesis) of every native op against pyqkv.reference, within the one tolerance
rule of tests/tolerance.py (data movement exactly).

Each example draws shapes (1 and sizes just off the CPU kernel's tiles: 64/128 query rows, 256-key blocks,
8-wide vector loops), a dtype, a GQA ratio, strides (q/k/v as non-contiguous views of one fused projection,
heads-major storage, every other feature), a mask (none, a 2-D padding mask in bool/int/float, a 4-D
additive mask of any broadcast shape with hidden entries and finite biases) and causal alignment with
K >= S and K < S. Tensor values come from a seeded generator, so a failing example is reproduced from the
printed draw alone.

Two profiles, chosen by the environment variable PYQKV_FUZZ:
    ci    (default) a few dozen examples per property, derandomized: the same examples on every run, the
          whole file in well under a minute on 2 cores;
    long  thousands of examples in all, random each run (`make fuzz`).
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerance import assert_close_by_rule

from pyqkv import ops
from pyqkv import reference as ref

PROFILE = os.environ.get("PYQKV_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"PYQKV_FUZZ: expected 'ci' or 'long', got {PROFILE!r}")
LONG = PROFILE == "long"


def fuzz(ci: int, long: int):
    """Settings of one property: `ci` examples (derandomized) or `long` examples (random)."""
    return settings(
        max_examples=long if LONG else ci,
        derandomize=not LONG,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# The reference materializes [B, H, S, K] in float64: keep each example's work bounded (elements of
# the score tensor times Dh).
WORK = 3e7 if LONG else 2e6

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
dtypes = st.sampled_from(DTYPES)
seeds = st.integers(0, 2**31 - 1)


def small_or_edge(small_hi: int, edges):
    """Mostly small sizes; sometimes one just below, at or above a tile edge."""
    return st.one_of(st.integers(1, small_hi), st.sampled_from(edges))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# --------------------------------------------------------------------------------------------------
# split_qkv / pack_qkv: every layout, Conv1D and Linear orientation, strided weights, round trips


@st.composite
def layout_heads(draw):
    layout = draw(st.sampled_from(ref.LAYOUTS))
    if layout == "codegen":
        H = 4 * draw(st.integers(1, 3))
        return layout, H, H
    if layout == "interleaved":
        H = draw(st.integers(1, 8))
        return layout, H, H
    Hkv = draw(st.integers(1, 4))
    return layout, Hkv * draw(st.integers(1, 4)), Hkv


def strided(g, shape, kind, dtype):
    """A tensor of `shape` laid out as `kind`: contiguous, transposed storage, or a slice with stride 2
    in its last dim."""
    if kind == "contiguous":
        return randn(g, *shape, dtype=dtype)
    if kind == "transposed":
        return randn(g, *reversed(shape), dtype=dtype).permute(*reversed(range(len(shape))))
    return randn(g, *shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]


@fuzz(ci=40, long=800)
@given(
    layout_heads(),
    st.integers(1, 24),
    st.integers(1, 9),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["contiguous", "transposed", "sliced"]),
    dtypes,
    seeds,
)
def test_split_and_pack_match_reference(lh, D, Dh, conv1d, with_bias, kind, dtype, seed):
    layout, H, Hkv = lh
    g = gen(seed)
    n_out = (H + 2 * Hkv) * Dh
    w = strided(g, (D, n_out) if conv1d else (n_out, D), kind, dtype)
    bias = randn(g, n_out, dtype=dtype) if with_bias else None
    kw = dict(n_heads=H, n_kv_heads=Hkv, d_head=Dh, layout=layout, conv1d=conv1d)
    got = ops.split_qkv(w, bias, **kw)
    want = ref.split_qkv(w, bias, **kw)
    for name, a, b in zip(("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V"), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == dtype and torch.equal(a, b), f"{name} differs from the reference"
    w2, b2 = ops.pack_qkv(*got, layout=layout, conv1d=conv1d)
    assert torch.equal(w2, w), "pack_qkv(split_qkv(w)) != w"
    assert (b2 is None) == (bias is None) and (bias is None or torch.equal(b2, bias))
    # Per-head weights with their own strides pack like the reference and split back.
    W_Q, W_K, W_V = (strided(g, (n, D, Dh), kind, dtype) for n in (H, Hkv, Hkv))
    packed, _ = ops.pack_qkv(W_Q, W_K, W_V, layout=layout, conv1d=conv1d)
    assert torch.equal(packed, ref.pack_qkv(W_Q, W_K, W_V, layout=layout, conv1d=conv1d))
    for a, b in zip(ops.split_qkv(packed, None, **kw)[:3], (W_Q, W_K, W_V)):
        assert torch.equal(a, b), "split_qkv(pack_qkv(W)) != W"


# --------------------------------------------------------------------------------------------------
# per_head_proj: any strides, a broadcast residual (stride 0 over heads), with and without bias


@fuzz(ci=40, long=800)
@given(
    st.integers(1, 3),
    small_or_edge(9, [16, 33]),
    st.integers(1, 6),
    small_or_edge(20, [63, 64, 65]),
    small_or_edge(9, [31, 32, 33]),
    st.sampled_from(["contiguous", "heads_major", "sliced", "broadcast"]),
    st.booleans(),
    dtypes,
    seeds,
)
def test_per_head_proj_matches_reference(B, S, n, D, E, x_kind, with_bias, dtype, seed):
    g = gen(seed)
    if x_kind == "contiguous":
        x = randn(g, B, S, n, D, dtype=dtype)
    elif x_kind == "heads_major":
        x = randn(g, n, B, D, S, dtype=dtype).permute(1, 3, 0, 2)
    elif x_kind == "sliced":
        x = randn(g, B, S, n, 2 * D, dtype=dtype)[..., 1::2]
    else:
        x = randn(g, B, S, D, dtype=dtype)[:, :, None].expand(B, S, n, D)
    W = randn(g, n, D, E, dtype=dtype, scale=D**-0.5)
    b = randn(g, n, E, dtype=dtype) if with_bias else None
    out = ops.per_head_proj(x, W, b)
    assert out.shape == (B, S, n, E) and out.dtype == dtype
    hi = ref.per_head_proj(x.double(), W.double(), None if b is None else b.double())
    assert_close_by_rule(out, hi, ref.per_head_proj(x, W, b), what="per_head_proj")


# --------------------------------------------------------------------------------------------------
# attention and its split form


@st.composite
def attention_shapes(draw):
    """(B, S, K, H, Hkv, Dh): 1s, tails of the kernel's blocks, GQA ratios 1..4, K == S, K > S, K < S."""
    Hkv = draw(st.integers(1, 4))
    H = Hkv * draw(st.integers(1, 4))
    Dh = draw(small_or_edge(16, [7, 8, 9, 31, 32, 33, 63, 64, 65, 80, 96, 128]))
    B = draw(st.integers(1, 3))
    if draw(st.integers(0, 4)) == 0:  # several query and key blocks: > 128 rows per KV group, > 256 keys
        S = draw(st.integers(33, 140))
        K = draw(st.integers(200, 600))
    else:
        S = draw(small_or_edge(20, [63, 64, 65]))
        K = draw(st.one_of(st.just(S), st.integers(1, 40), small_or_edge(40, [255, 256, 257])))
    K = max(1, min(K, int(WORK // max(1, B * H * S * Dh))))  # bounded reference cost
    return B, S, K, H, Hkv, Dh


def qkv_views(g, B, S, K, H, Hkv, Dh, kind, dtype, scale):
    """q [B,S,H,Dh], k, v [B,K,Hkv,Dh] laid out as `kind`:
    fused        column blocks of one projection [B, L, (H + 2 Hkv) Dh] (two when K != S), as the Bridge;
    heads_major  [B, heads, L, Dh] storage seen as [B, L, heads, Dh];
    sliced       every other feature of a [.., 2 Dh] tensor (stride 2 in Dh);
    contiguous."""
    if kind == "fused":
        n = (H + 2 * Hkv) * Dh

        def cut(f):
            q, k, v = f.split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
            return q.unflatten(-1, (H, Dh)), k.unflatten(-1, (Hkv, Dh)), v.unflatten(-1, (Hkv, Dh))

        q, k, v = cut(randn(g, B, S, n, dtype=dtype, scale=scale))
        if K != S:
            _, k, v = cut(randn(g, B, K, n, dtype=dtype, scale=scale))
        return q, k, v
    out = []
    for L, heads in ((S, H), (K, Hkv), (K, Hkv)):
        if kind == "heads_major":
            out.append(randn(g, B, heads, L, Dh, dtype=dtype, scale=scale).transpose(1, 2))
        elif kind == "sliced":
            out.append(randn(g, B, L, heads, 2 * Dh, dtype=dtype, scale=scale)[..., ::2])
        else:
            out.append(randn(g, B, L, heads, Dh, dtype=dtype, scale=scale))
    return tuple(out)


@st.composite
def masks(draw, B, H, S, K, dtype, seed):
    """None, a 2-D padding mask [B, K] (bool, int64 or float 0/1; sometimes a batch row with no key), a
    4-D bool mask [B or 1, 1 or H, S, K] (True = attend), or a 4-D additive mask of that shape in q's
    dtype or float32 (sometimes a stride-0 expand over B as Hugging Face passes it), with hidden entries
    (the dtype's minimum, -inf or NaN: the one mask rule hides all three) and/or finite biases."""
    g = gen(seed + 1)
    kind = draw(st.sampled_from(["none", "pad2d", "add4d", "bool4d"]))
    if kind == "none":
        return None
    p_hidden = draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    if kind == "pad2d":
        keep = torch.rand(B, K, generator=g) >= p_hidden
        if draw(st.booleans()):
            keep[-1, : draw(st.integers(1, K))] = False  # left padding
        return keep.to(draw(st.sampled_from([torch.bool, torch.int64, dtype])))
    mdtype = draw(st.sampled_from([dtype, torch.float32]))
    b_dim, h_dim = draw(st.sampled_from([1, B])), draw(st.sampled_from([1, H]))
    bias = randn(g, b_dim, h_dim, S, K, scale=draw(st.sampled_from([0.0, 1.0, 4.0])))
    hidden = torch.rand(b_dim, h_dim, S, K, generator=g) < p_hidden
    if kind == "bool4d":
        m = ~hidden
    else:
        fill = draw(st.sampled_from([torch.finfo(mdtype).min, float("-inf"), float("nan")]))
        m = bias.to(mdtype).masked_fill(hidden, fill)
    if b_dim == 1 and draw(st.booleans()):
        m = m.expand(B, h_dim, S, K)
    return m


def refs(q, k, v, *, scale, causal, mask):
    hi = ref.attention(q, k, v, scale=scale, causal=causal, mask=mask, return_pattern=True)
    lo = ref.attention(q, k, v, scale=scale, causal=causal, mask=mask, return_pattern=True, compute_dtype=q.dtype)
    return hi, lo


@fuzz(ci=60, long=2000)
@given(
    attention_shapes(),
    st.sampled_from(["fused", "heads_major", "sliced", "contiguous"]),
    dtypes,
    st.booleans(),
    st.booleans(),
    st.sampled_from([0.3, 1.0, 3.0]),
    seeds,
    st.data(),
)
def test_attention_matches_reference(shape, kind, dtype, causal, return_pattern, magnitude, seed, data):
    B, S, K, H, Hkv, Dh = shape
    g = gen(seed)
    q, k, v = qkv_views(g, B, S, K, H, Hkv, Dh, kind, dtype, magnitude)
    mask = data.draw(masks(B, H, S, K, dtype, seed), label="mask")
    scale = Dh**-0.5
    (z_hi, lse_hi, p_hi), (z_lo, lse_lo, p_lo) = refs(q, k, v, scale=scale, causal=causal, mask=mask)
    z, lse, pattern = ops.attention(q, k, v, scale=scale, causal=causal, mask=mask, return_pattern=return_pattern)
    assert z.shape == (B, S, H, Dh) and z.dtype == dtype
    assert lse.shape == (B, H, S) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_by_rule(z, z_hi, z_lo, what="z")
    assert_close_by_rule(lse, lse_hi, lse_lo, what="lse")  # -inf exactly on rows with no visible key
    if return_pattern:
        assert pattern.shape == (B, H, S, K) and pattern.dtype == dtype
        assert_close_by_rule(pattern, p_hi, p_lo, what="pattern")
        vis = ref.visible_keys(B, H, S, K, causal=causal, mask=mask).expand(B, H, S, K)
        assert (pattern[~vis] == 0).all(), "a hidden key got weight"
    else:
        assert pattern is None


@fuzz(ci=40, long=1000)
@given(
    attention_shapes(),
    st.sampled_from(["fused", "heads_major", "sliced", "contiguous"]),
    dtypes,
    st.booleans(),
    st.booleans(),
    seeds,
    st.data(),
)
def test_split_form_matches_reference(shape, kind, dtype, causal, upcast, seed, data):
    """attn_scores -> attn_softmax -> attn_apply, the path of a hook on hook_attn_scores (upcast: half-type
    scores and softmax in float32, as reorder_and_upcast_attn asks)."""
    B, S, K, H, Hkv, Dh = shape
    g = gen(seed)
    q, k, v = qkv_views(g, B, S, K, H, Hkv, Dh, kind, dtype, 1.0)
    mask = data.draw(masks(B, H, S, K, dtype, seed), label="mask")
    scale = Dh**-0.5
    score_dtype = torch.float32 if upcast and dtype in (torch.bfloat16, torch.float16) else dtype
    scores = ops.attn_scores(q, k, scale=scale, causal=causal, mask=mask, dtype=score_dtype)
    assert scores.shape == (B, H, S, K) and scores.dtype == score_dtype
    vis = ref.visible_keys(B, H, S, K, causal=causal, mask=mask).expand(B, H, S, K)
    assert (scores[~vis] == torch.finfo(score_dtype).min).all(), "hidden scores must hold the dtype's minimum"
    s_hi = ref.attn_scores(q, k, scale=scale, causal=causal, mask=mask)
    s_lo = ref.attn_scores(
        q.to(score_dtype), k.to(score_dtype), scale=scale, causal=causal, mask=mask, compute_dtype=score_dtype
    )
    if vis.any():
        assert_close_by_rule(scores[vis], s_hi[vis], s_lo[vis], what="attn_scores")
    pattern = ops.attn_softmax(scores, dtype=dtype)
    z = ops.attn_apply(pattern, v)
    (z_hi, _, p_hi), (z_lo, _, p_lo) = refs(q, k, v, scale=scale, causal=causal, mask=mask)
    assert_close_by_rule(pattern, p_hi, p_lo, what="attn_softmax pattern")
    assert (pattern[~vis] == 0).all()
    assert_close_by_rule(z, z_hi, z_lo, what="attn_apply z")


# --------------------------------------------------------------------------------------------------
# kv_append


@st.composite
def append_case(draw):
    B, Hkv, Dh = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(small_or_edge(9, [32, 64]))
    capacity = draw(st.integers(1, 40))
    S = draw(st.integers(0, capacity))
    start = draw(st.integers(0, capacity - S))
    return B, Hkv, Dh, capacity, S, start


@fuzz(ci=40, long=800)
@given(
    append_case(),
    st.sampled_from(["own", "window", "heads_outer"]),
    st.sampled_from(["fused", "heads_major", "sliced", "contiguous"]),
    dtypes,
    seeds,
)
def test_kv_append_matches_reference(case, cache_kind, new_kind, dtype, seed):
    """In place, exactly the rows start .. start + S - 1, through any cache strides: the whole buffer
    around the cache (NaN outside the written rows) must equal the reference's."""
    B, Hkv, Dh, capacity, S, start = case
    g = gen(seed)
    if cache_kind == "own":
        buf = torch.full((2, B, Hkv, capacity, Dh), float("nan"), dtype=dtype)
        k_cache, v_cache = buf[0], buf[1]
    elif cache_kind == "window":  # a window of a longer, wider buffer
        buf = torch.full((2, B + 1, Hkv, capacity + 5, Dh), float("nan"), dtype=dtype)
        k_cache, v_cache = buf[0, 1:, :, 3 : 3 + capacity], buf[1, 1:, :, 3 : 3 + capacity]
    else:  # heads-outer storage [Hkv, B, capacity, Dh] seen as [B, Hkv, capacity, Dh]
        buf = torch.full((2, Hkv, B, capacity, Dh), float("nan"), dtype=dtype)
        k_cache, v_cache = buf[0].transpose(0, 1), buf[1].transpose(0, 1)
    H = Hkv
    _, k_new, v_new = qkv_views(g, B, max(S, 1), max(S, 1), H, Hkv, Dh, new_kind, dtype, 1.0)
    k_new, v_new = k_new[:, :S], v_new[:, :S]
    want = buf.clone()
    if cache_kind == "own":
        wk, wv = want[0], want[1]
    elif cache_kind == "window":
        wk, wv = want[0, 1:, :, 3 : 3 + capacity], want[1, 1:, :, 3 : 3 + capacity]
    else:
        wk, wv = want[0].transpose(0, 1), want[1].transpose(0, 1)
    ref.kv_append(wk, wv, k_new, v_new, start)
    ops.kv_append(k_cache, v_cache, k_new, v_new, start)
    assert torch.equal(buf.nan_to_num(7.0), want.nan_to_num(7.0)), "kv_append wrote other memory or other values"


# --------------------------------------------------------------------------------------------------
# rotary


@fuzz(ci=30, long=600)
@given(
    st.integers(1, 3),
    small_or_edge(12, [63, 64, 65]),
    st.integers(1, 6),
    st.integers(1, 40),
    st.booleans(),
    st.sampled_from(["batched", "shared", "2d"]),
    st.sampled_from(["contiguous", "heads_major", "sliced", "fused"]),
    dtypes,
    st.booleans(),
    seeds,
    st.data(),
)
def test_rotary_matches_reference(B, S, n, half_dh, interleaved, tables, kind, dtype, tables_in_x_dtype, seed, data):
    """RoPE on the first R of Dh features (partial when R < Dh), both rotation styles, tables per batch row,
    shared ([1, S, R]) or 2-D ([S, R]), in float32 or x's dtype; x with any strides."""
    g = gen(seed)
    Dh = 2 * half_dh
    R = 2 * data.draw(st.integers(1, half_dh), label="R / 2")
    if kind == "fused":  # a head block of a fused projection, as the Bridge passes q and k
        x = randn(g, B, S, 3 * n * Dh, dtype=dtype)[..., n * Dh : 2 * n * Dh].unflatten(-1, (n, Dh))
    elif kind == "heads_major":
        x = randn(g, B, n, S, Dh, dtype=dtype).transpose(1, 2)
    elif kind == "sliced":
        x = randn(g, B, S, n, 2 * Dh, dtype=dtype)[..., ::2]
    else:
        x = randn(g, B, S, n, Dh, dtype=dtype)
    angles = torch.rand(B if tables == "batched" else 1, S, R, generator=g, dtype=torch.float64) * 50
    cos, sin = angles.cos(), angles.sin()
    table_dtype = dtype if tables_in_x_dtype else torch.float32
    cos, sin = cos.to(table_dtype), sin.to(table_dtype)
    if tables == "2d":
        cos, sin = cos[0], sin[0]
    out = ops.rotary(x, cos, sin, interleaved=interleaved)
    assert out.shape == x.shape and out.dtype == dtype
    hi = ref.rotary(x.double(), cos.double(), sin.double(), interleaved=interleaved)
    lo = ref.rotary(x, cos, sin, interleaved=interleaved, compute_dtype=dtype)
    assert_close_by_rule(out, hi, lo, what="rotary")
    assert torch.equal(out[..., R:], x[..., R:]), "features past R must pass through unchanged"


# --------------------------------------------------------------------------------------------------
# ALiBi: a per-key bias [B or 1, H or 1, K] on the scaled scores, fused and split form


@fuzz(ci=30, long=800)
@given(
    attention_shapes(),
    st.sampled_from(["fused", "heads_major", "contiguous"]),
    dtypes,
    st.booleans(),
    st.sampled_from(["B", 1]),
    st.sampled_from(["H", 1]),
    st.booleans(),
    seeds,
    st.data(),
)
def test_attention_with_alibi_matches_reference(shape, kind, dtype, causal, b_dim, h_dim, alibi_f32, seed, data):
    B, S, K, H, Hkv, Dh = shape
    g = gen(seed)
    q, k, v = qkv_views(g, B, S, K, H, Hkv, Dh, kind, dtype, 1.0)
    mask = data.draw(masks(B, H, S, K, dtype, seed), label="mask")
    slopes = torch.rand(B if b_dim == "B" else 1, H if h_dim == "H" else 1, 1, generator=g)
    alibi = (-slopes * torch.arange(K - 1, -1, -1)).to(torch.float32 if alibi_f32 else dtype)  # Bloom-like
    scale = Dh**-0.5
    kw = dict(scale=scale, causal=causal, mask=mask, alibi=alibi)
    z, lse, pattern = ops.attention(q, k, v, return_pattern=True, **kw)
    hi = ref.attention(q, k, v, return_pattern=True, **kw)
    lo = ref.attention(q, k, v, return_pattern=True, compute_dtype=dtype, **kw)
    for name, got, h, lw in zip(("z", "lse", "pattern"), (z, lse, pattern), hi, lo):
        assert_close_by_rule(got, h, lw, what=f"{name} with alibi")
    scores = ops.attn_scores(q, k, **kw)
    vis = ref.visible_keys(B, H, S, K, causal=causal, mask=mask).expand(B, H, S, K)
    assert (scores[~vis] == torch.finfo(dtype).min).all(), "alibi must not unhide a hidden entry"
    if vis.any():
        s_hi = ref.attn_scores(q, k, **kw)
        s_lo = ref.attn_scores(q, k, compute_dtype=dtype, **kw)
        assert_close_by_rule(scores[vis], s_hi[vis], s_lo[vis], what="attn_scores with alibi")
    assert_close_by_rule(ops.attn_apply(ops.attn_softmax(scores), v), hi[0], lo[0], what="split-form z with alibi")


# --------------------------------------------------------------------------------------------------
# softcap (Gemma 2) and sliding windows: fused op and split form


@fuzz(ci=30, long=800)
@given(
    attention_shapes(),
    st.sampled_from(["fused", "heads_major", "sliced"]),
    dtypes,
    st.sampled_from([None, 0.0, 0.5, 5.0, 50.0]),
    st.one_of(st.none(), st.integers(1, 8), st.integers(9, 700)),
    st.booleans(),
    seeds,
    st.data(),
)
def test_softcap_and_window_match_reference(shape, kind, dtype, softcap, window, return_pattern, seed, data):
    """Any softcap and window (W = 1, W < K, W >= K) with any mask, causal (a window needs it): the fused
    op and the split form against the reference; hidden keys (outside the window) get weight exactly 0."""
    B, S, K, H, Hkv, Dh = shape
    g = gen(seed)
    q, k, v = qkv_views(g, B, S, K, H, Hkv, Dh, kind, dtype, 3.0)
    mask = data.draw(masks(B, H, S, K, dtype, seed), label="mask")
    kw = dict(scale=Dh**-0.5, causal=True, mask=mask, softcap=softcap, window=window)
    z, lse, pattern = ops.attention(q, k, v, return_pattern=return_pattern, **kw)
    hi = ref.attention(q, k, v, return_pattern=True, **kw)
    lo = ref.attention(q, k, v, return_pattern=True, compute_dtype=dtype, **kw)
    assert_close_by_rule(z, hi[0], lo[0], what="z")
    assert_close_by_rule(lse, hi[1], lo[1], what="lse")
    vis = ref.visible_keys(B, H, S, K, causal=True, mask=mask, window=window).expand(B, H, S, K)
    if return_pattern:
        assert_close_by_rule(pattern, hi[2], lo[2], what="pattern")
        assert (pattern[~vis] == 0).all(), "a hidden key got weight"
    scores = ops.attn_scores(q, k, **kw)
    assert (scores[~vis] == torch.finfo(dtype).min).all()
    assert_close_by_rule(ops.attn_apply(ops.attn_softmax(scores), v), hi[0], lo[0], what="split-form z")
