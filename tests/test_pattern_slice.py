"""Attention pattern slices without the [B, H, S, K] tensor (issue 23): the op pyqkv.ops.pattern_slice (its CPU
kernel, its ATen form that CUDA runs, reference, opcheck, gradcheck, bad input) and run_with_cache's
pattern_heads / pattern_queries / pattern_keys on attached models, the interface tier and the Bridge.

Every slice is compared with the same slice of the whole tensor: the op's with ops.attention(return_pattern=True)
and pyqkv.reference (by the tolerance rule), the cached entries with a run_with_cache of the whole tensors.

Notation: B batch, S query positions, K key positions, H query heads, Hkv key/value heads, Dh head dim.
"""

from __future__ import annotations

import warnings

import op_cases
import pytest
import torch
from op_cases import AttnCase, build_attention_inputs
from tolerance import assert_close_by_rule

import pyqkv
from pyqkv import ops
from pyqkv import reference as ref

f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16

# --------------------------------------------------------------------------------------------------
# The op against the whole pattern

# Shapes that hit the CPU kernel's tails (64 chosen rows per task, 256 chosen keys per block, and the loop /
# GEMM switch), every mask kind, GQA and MQA, a window, softcap with ALiBi, decode, rows that see nothing.
C = AttnCase
OP_CASES = [
    *[C(f"mask {name}", 2, 17, 40, 12, 4, 64, **kw) for name, kw in op_cases.MASK_KINDS.items()],
    C("pad_all: a row sees nothing", 2, 9, 9, 4, 4, 32, mask="pad_all"),
    C("non-causal K<S odd Dh", 1, 20, 13, 2, 2, 33, causal=False, mask="pad"),
    C("window 5 pad GQA", 2, 17, 40, 4, 2, 32, mask="pad", window=5),
    C("window bool4d tails", 1, 89, 300, 4, 2, 80, mask="bool4d", mask_shape="BH", window=33),
    C("softcap alibi per_batch", 2, 17, 40, 4, 4, 64, q_gain=4.0, softcap=2.0, alibi="per_batch", alibi_dtype="q"),
    C("alibi strided add4d", 2, 17, 17, 4, 4, 32, alibi="strided", alibi_dtype="f64", mask="add", mask_shape="BH"),
    C(
        "softcap window alibi b1 add",
        1,
        30,
        30,
        4,
        1,
        64,
        q_gain=3.0,
        softcap=5.0,
        window=9,
        alibi="b1",
        mask="add",
        mask_dtype="q",
    ),
    C("decode S=1 MQA", 2, 1, 24, 12, 1, 32),
    C("no mask 130x280 mm path", 1, 130, 280, 2, 2, 64, causal=False),
]

# (heads, queries, keys) as a user writes them: None = all, negative from the end, repeats, slices.
SELECTIONS = [
    pytest.param((None, [-1], None), id="last-row"),
    pytest.param((None, None, [0]), id="first-column"),
    pytest.param(([1, 0, 1], [-1, 0, -1], [3, -1, 0, 0]), id="lists-repeats"),
    pytest.param((slice(None, None, 2), slice(1, None, 3), slice(None, -2)), id="slices"),
    pytest.param((None, None, None), id="all"),
]


def _indices(sel, H, S, K):
    return tuple(ops.slice_indices(n, v, size, n) for n, v, size in zip(("heads", "queries", "keys"), sel, (H, S, K)))


def _take(t, heads, queries, keys):
    if heads is not None:
        t = t[:, heads]
    if queries is not None:
        t = t[:, :, queries]
    return t if keys is None else t[..., keys]


def _case_inputs(case, dtype):
    q, k, v, mask, scale, alibi, k_ref, v_ref = build_attention_inputs(case, dtype, "cpu")
    kw = dict(scale=scale, causal=case.causal, mask=mask, alibi=alibi, softcap=case.softcap, window=case.window)
    return q, k, v, k_ref, v_ref, kw


@pytest.mark.parametrize("sel", SELECTIONS)
@pytest.mark.parametrize("dtype", [f32, f64, bf16], ids=str)
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c.name)
def test_op_equals_the_slice_of_the_whole_pattern(case, dtype, sel):
    q, k, v, k_ref, v_ref, kw = _case_inputs(case, dtype)
    z, lse, full = ops.attention(q, k, v, return_pattern=True, **kw)
    idx = _indices(sel, case.H, case.S, case.K)
    pattern, scores = ops.pattern_slice(q, k, lse, heads=sel[0], queries=sel[1], keys=sel[2], return_scores=True, **kw)
    want = _take(full, *idx)
    assert pattern.shape == want.shape and pattern.dtype == dtype and scores.dtype == dtype
    # Against the whole pattern of the fused op: the same numbers up to rounding of the last bit(s).
    tol = dict(rtol=1e-2, atol=4e-3) if dtype == bf16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pattern, want, **tol)
    # Against the reference, by the one tolerance rule.
    (_, _, p_hi), (_, _, p_lo) = op_cases.attention_refs(q, k_ref, v_ref, **kw)
    assert_close_by_rule(pattern, _take(p_hi, *idx), _take(p_lo, *idx), what="pattern slice")
    # Hidden entries are exactly 0; the scores are attn_scores' (hidden at finfo.min).
    vis = ref.visible_keys(case.B, case.H, case.S, case.K, causal=case.causal, mask=kw["mask"], window=case.window)
    hidden = ~_take(vis.expand(case.B, case.H, case.S, case.K), *idx)
    assert (pattern[hidden] == 0).all()
    assert (scores[hidden] == torch.finfo(dtype).min).all()
    s_hi = _take(ref.attn_scores(q.double(), k_ref.double(), **kw), *idx)[~hidden]
    s_lo = _take(ref.attn_scores(q, k_ref, compute_dtype=dtype, **kw), *idx)[~hidden]
    assert_close_by_rule(scores[~hidden], s_hi, s_lo, what="scores slice")
    if dtype != bf16:  # attn_scores rounds bfloat16 after each step, the op once: compared by the rule above
        torch.testing.assert_close(scores, _take(ops.attn_scores(q, k, **kw), *idx), **tol)
    # The reference op, from the same lse.
    ref_p, ref_s = ref.pattern_slice(q, k_ref, lse, heads=idx[0], queries=idx[1], keys=idx[2], **kw)
    torch.testing.assert_close(pattern, ref_p, **tol)
    assert torch.equal(ref_s == torch.finfo(dtype).min, scores == torch.finfo(dtype).min)


@pytest.mark.parametrize("dtype", [f32, f64, bf16], ids=str)
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: c.name)
def test_aten_form_equals_the_cpu_kernel(case, dtype):
    """The ATen composition that CUDA runs (checked here on the CPU) gives the CPU kernel's entries."""
    q, k, v, _, _, kw = _case_inputs(case, dtype)
    _, lse, _ = ops.attention(q, k, v, **kw)
    for sel in ((None, None, None), ([1, 0, 1], [-1, 0, -1], [3, -1, 0, 0])):
        heads, queries, keys = _indices(sel, case.H, case.S, case.K)
        args = (q, k, lse, kw["mask"], kw["scale"], kw["causal"], kw["alibi"], kw["softcap"], kw["window"])
        got = torch.ops.pyqkv._pattern_slice_aten(*args, heads, queries, keys, True, f32)
        want = torch.ops.pyqkv.pattern_slice(*args, heads, queries, keys, True, f32)
        tol = dict(rtol=1e-2, atol=4e-3) if dtype == bf16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[0], want[0], **tol)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_memory_is_the_slice_not_the_whole_pattern():
    """The last row of every head at S = K = 2048: the op allocates O(H * K), not O(H * S * K)."""
    B, S, H, Dh = 1, 2048, 4, 32
    q, k, v = (torch.randn(B, S, H, Dh) for _ in range(3))
    _, lse, _ = ops.attention(q, k, v, scale=Dh**-0.5, causal=True)
    with torch.profiler.profile(profile_memory=True) as prof:
        ops.pattern_slice(q, k, lse, scale=Dh**-0.5, causal=True, queries=-1, return_scores=True)
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert 0 < biggest < B * H * S * S * 4 // 64, biggest


# --------------------------------------------------------------------------------------------------
# opcheck, gradcheck, bad input


def _small(dtype=f64, grad=True, B=2, S=5, K=7, H=4, Hkv=2, Dh=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, S, H, Dh, generator=g, dtype=dtype)
    k = torch.randn(B, K, Hkv, Dh, generator=g, dtype=dtype)
    v = torch.randn(B, K, Hkv, Dh, generator=g, dtype=dtype)
    add = torch.randn(B, 1, S, K, generator=g, dtype=dtype) * 0.5
    add[0, 0, 1, :3] = torch.finfo(dtype).min
    alibi = torch.randn(1, H, K, generator=g, dtype=dtype) * 0.3
    _, lse, _ = ops.attention(q, k, v, scale=0.4, causal=True, mask=add, alibi=alibi, softcap=1.5, window=4)
    if grad:
        q, k, lse, add, alibi = (t.detach().requires_grad_() for t in (q, k, lse, add, alibi))
    return q, k, lse, add, alibi


def _ix(*values):
    return torch.tensor(values, dtype=torch.long)


def opcheck_cases():
    q, k, lse, add, alibi = _small()
    qb, kb, lseb, addb, alibib = _small(bf16, grad=False)
    pad = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    op = torch.ops.pyqkv.pattern_slice.default
    return [
        ("all-nomask", op, (q, k, lse, None, 0.4, True)),
        ("rows-pad-scores", op, (q, k, lse, pad, 0.4, False, None, None, None, None, _ix(4, 0), None, True)),
        (
            "everything-grad",
            op,
            (q, k, lse, add, 0.4, True, alibi, 1.5, 4, _ix(3, 0, 3), _ix(-1 + 5, 2), _ix(0, 6, 6), True, f32),
        ),
        ("bf16-columns", op, (qb, kb, lseb, addb, 0.4, True, alibib, 1.5, 4, None, None, _ix(0), True)),
    ]


@pytest.mark.parametrize("case_id", ["all-nomask", "rows-pad-scores", "everything-grad", "bf16-columns"])
def test_opcheck(case_id):
    op, args = {c[0]: c[1:] for c in opcheck_cases()}[case_id]
    torch.library.opcheck(op, args)


def test_gradcheck():
    """Gradients to q, k, lse, the additive mask and alibi, through the softcap, with repeated indices."""
    q, k, lse, add, alibi = _small()

    def f(q, k, lse, add, alibi):
        return ops.pattern_slice(
            q,
            k,
            lse,
            scale=0.4,
            causal=True,
            mask=add,
            alibi=alibi,
            softcap=1.5,
            window=4,
            heads=[3, 0, 3],
            queries=[-1, 2, 2],
            keys=[0, 5, 6, 6],
            return_scores=True,
        )

    assert torch.autograd.gradcheck(f, (q, k, lse, add, alibi))


def test_bad_input_names_the_argument():
    q, k, lse, add, alibi = _small(f32, grad=False)
    kw = dict(scale=0.4, causal=True)
    with pytest.raises(
        ValueError, match=r"queries: expected indices in \[-5, 5\) \(S, the query positions of q = 5\), got 5"
    ):
        ops.pattern_slice(q, k, lse, queries=[0, 5], **kw)
    with pytest.raises(ValueError, match=r"keys: expected indices in \[-7, 7\).*got -8"):
        ops.pattern_slice(q, k, lse, keys=-8, **kw)
    with pytest.raises(ValueError, match=r"heads: expected indices in \[-4, 4\)"):
        ops.pattern_slice(q, k, lse, heads=torch.tensor([4]), **kw)
    with pytest.raises(TypeError, match=r"queries: expected None, an int, a slice.*got float 1.5"):
        ops.pattern_slice(q, k, lse, queries=1.5, **kw)
    with pytest.raises(TypeError, match=r"keys: expected a list of ints, got str"):
        ops.pattern_slice(q, k, lse, keys=[0, "1"], **kw)
    with pytest.raises(TypeError, match=r"heads: expected .* got a 2-D torch.int64 tensor"):
        ops.pattern_slice(q, k, lse, heads=torch.zeros(1, 1, dtype=torch.long), **kw)
    with pytest.raises(TypeError, match=r"queries: expected .* got a 1-D torch.bool tensor"):
        ops.pattern_slice(q, k, lse, queries=torch.ones(5, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match=r"lse: expected shape \[B, H, S\] = \[2, 4, 5\]"):
        ops.pattern_slice(q, k, lse[:, :2], **kw)
    with pytest.raises(TypeError, match=r"lse: expected dtype Float"):
        ops.pattern_slice(q, k, lse.double(), **kw)
    with pytest.raises(TypeError, match=r"lse: expected a Tensor"):
        ops.pattern_slice(q, k, None, **kw)
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor"):
        ops.pattern_slice(q[0], k, lse, **kw)
    with pytest.raises(ValueError, match=r"k: expected shape \[2, K, Hkv, 8\]"):
        ops.pattern_slice(q, k[:1], lse, **kw)
    with pytest.raises(ValueError, match=r"mask: expected a 4-D additive mask"):
        ops.pattern_slice(q, k, lse, mask=add[..., :3], **kw)
    with pytest.raises(ValueError, match=r"alibi: expected shape"):
        ops.pattern_slice(q, k, lse, alibi=alibi[..., :3], **kw)
    with pytest.raises(ValueError, match=r"softcap: expected None, 0"):
        ops.pattern_slice(q, k, lse, softcap=-1.0, **kw)
    with pytest.raises(ValueError, match=r"window: expected causal=True"):
        ops.pattern_slice(q, k, lse, window=2, scale=0.4, causal=False)
    with pytest.raises(TypeError, match=r"score_dtype: expected a floating-point dtype or None, got str"):
        ops.pattern_slice(q, k, lse, score_dtype="float32", **kw)
    with pytest.raises(TypeError, match=r"score_dtype: expected a floating-point dtype"):
        ops.pattern_slice(q, k, lse, score_dtype=torch.int32, **kw)
    with pytest.raises(TypeError, match=r"return_scores: expected a bool"):
        ops.pattern_slice(q, k, lse, return_scores=1, **kw)
    with pytest.raises(TypeError, match=r"scale: expected a float"):
        ops.pattern_slice(q, k, lse, scale="0.4", causal=True)
    # The op itself (no Python wrapper) takes only resolved indices, and names them too.
    with pytest.raises(ValueError, match=r"queries: expected indices in \[0, 5\) .* got -1 at position 1"):
        torch.ops.pyqkv.pattern_slice(q, k, lse, None, 0.4, True, None, None, None, None, _ix(0, -1))
    with pytest.raises(TypeError, match=r"keys: expected None or a 1-D integer tensor of indices, got Float"):
        torch.ops.pyqkv.pattern_slice(q, k, lse, None, 0.4, True, None, None, None, None, None, torch.zeros(2))


def test_traces_under_torch_compile():
    q, k, lse, add, alibi = _small(f32, grad=False)

    def f(q, k, lse):
        return ops.pattern_slice(q, k, lse, scale=0.4, causal=True, queries=torch.tensor([4]), return_scores=True)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for got, want in zip(compiled(q, k, lse), f(q, k, lse)):
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------------
# run_with_cache(pattern_heads=..., pattern_queries=..., pattern_keys=...)

SLICE = dict(pattern_heads=[-1, 0], pattern_queries=[-1, 4], pattern_keys=slice(0, None, 3))
BOTH = lambda name: name.endswith(("hook_pattern", "hook_attn_scores"))  # noqa: E731


class Spy:
    """Records every ops.attention call's return_pattern and every attn_scores call: neither may build the
    [B, H, S, K] tensor while only slices are cached."""

    def __init__(self, monkeypatch):
        self.patterns, self.scores = [], 0
        real_attention, real_scores = ops.attention, ops.attn_scores

        def attention(*args, **kw):
            self.patterns.append(kw.get("return_pattern", False))
            return real_attention(*args, **kw)

        def attn_scores(*args, **kw):
            self.scores += 1
            return real_scores(*args, **kw)

        monkeypatch.setattr(ops, "attention", attention)
        monkeypatch.setattr(ops, "attn_scores", attn_scores)

    def assert_no_whole_tensor(self):
        assert self.patterns and not any(self.patterns), self.patterns
        assert self.scores == 0


def _expected(full, selection):
    _, H, S, K = full.shape
    sel = (selection.get("pattern_heads"), selection.get("pattern_queries"), selection.get("pattern_keys"))
    return _take(full, *_indices(sel, H, S, K))


def _assert_slices(full_cache, sliced_cache, selection, what):
    assert sorted(full_cache.keys()) == sorted(sliced_cache.keys()) and len(full_cache) > 0
    for name in full_cache.keys():
        want = _expected(full_cache[name], selection)
        got = sliced_cache[name]
        assert got.shape == want.shape, (what, name, got.shape, want.shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")


def _compare_runs(h, monkeypatch, *args, selection=SLICE, what="", **kwargs):
    """run_with_cache of the whole tensors, then of the slice (with the spy on): the same entries, the same
    output, and no [B, H, S, K] tensor in the second run."""
    with torch.no_grad():
        out_full, full = h.run_with_cache(*args, names_filter=BOTH, **kwargs)
        with monkeypatch.context() as m:
            spy = Spy(m)
            out_sliced, sliced = h.run_with_cache(*args, names_filter=BOTH, **selection, **kwargs)
        spy.assert_no_whole_tensor()
    torch.testing.assert_close(out_sliced, out_full, rtol=1e-5, atol=1e-5)
    _assert_slices(full, sliced, selection, what)
    return sliced


def _families():
    fams = pytest.importorskip("test_hf_families")
    return {f.id: f for f in fams.FAMILIES}, fams.left_padded


@pytest.mark.parametrize("fam_id", ["gpt2", "llama3", "mistral-sliding", "gemma2", "bloom"])
def test_attached_model_caches_slices(fam_id, monkeypatch):
    """GPT-2, Llama (GQA), Mistral (sliding window), Gemma 2 (softcap), Bloom (ALiBi) on a left-padded batch."""
    families, left_padded = _families()
    model = families[fam_id].make("cpu")
    h = pyqkv.hf.attach(model)
    ids, am = left_padded("cpu")
    sliced = _compare_runs(h, monkeypatch, ids, attention_mask=am, what=fam_id)
    B, S = ids.shape
    assert sliced["blocks.0.attn.hook_pattern"].shape == (B, 2, 2, len(range(0, S, 3)))
    with torch.no_grad():
        assert torch.equal(
            h.run_with_cache(ids, attention_mask=am, names_filter=BOTH, **SLICE)[0], h(ids, attention_mask=am).logits
        )


def test_attached_model_with_a_kv_cache(monkeypatch):
    """A continuation over a DynamicCache: queries count from the end of this call's S, keys from the end of
    K (the cache's keys included)."""
    import copy

    transformers = pytest.importorskip("transformers")
    families, left_padded = _families()
    model = families["llama3"].make("cpu")
    h = pyqkv.hf.attach(model)
    ids, am = left_padded("cpu")
    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(ids[:, :7], attention_mask=am[:, :7], past_key_values=cache, use_cache=True)
    selection = dict(pattern_queries=[-1, 0], pattern_keys=[-1, 0, -3, 2])
    runs = []
    for sel in ({}, selection):
        with torch.no_grad(), monkeypatch.context() as m:
            spy = Spy(m)
            _, c = h.run_with_cache(
                ids[:, 7:], attention_mask=am, past_key_values=copy.deepcopy(cache), names_filter=BOTH, **sel
            )
        runs.append(c)
    spy.assert_no_whole_tensor()
    full, sliced = runs
    assert full["blocks.0.attn.hook_pattern"].shape[2:] == (3, 10)
    _assert_slices(full, sliced, selection, "kv cache")


def test_interface_tier_caches_slices(monkeypatch):
    hfi = pytest.importorskip("test_hf_interface")
    _, ours = hfi.pair("llama")
    h = hfi.hf_interface.hooks_for(ours)
    ids, am = hfi.left_padded()
    _compare_runs(h, monkeypatch, ids, attention_mask=am, what="interface tier")


def test_bridge_caches_slices_with_a_kv_cache(monkeypatch):
    bridge = _bridge()
    x = torch.randn(2, 9, 64)
    am = torch.ones(2, 9, dtype=torch.bool)
    am[1, :3] = False
    _compare_runs(bridge, monkeypatch, x, attention_mask=am, what="bridge")
    # a second call over a KVCache holding the first 6 positions
    runs = []
    for sel in ({}, dict(pattern_queries=-1, pattern_keys=[-2, 0])):
        cache = pyqkv.KVCache()
        with torch.no_grad():
            bridge(x[:, :6], am[:, :6], cache)
            runs.append(bridge.run_with_cache(x[:, 6:], am, cache, names_filter=BOTH, **sel)[1])
    _assert_slices(runs[0], runs[1], dict(pattern_queries=-1, pattern_keys=[-2, 0]), "bridge kv cache")
    assert runs[1]["hook_pattern"].shape == (2, 4, 1, 2)


def _bridge(**flags):
    tb = pytest.importorskip("test_bridge")
    bridge, _, _ = tb.plain_bridge("cpu", **flags)
    return bridge.eval()


def test_a_users_hook_sees_the_whole_pattern_and_the_cache_its_slice():
    """Decision: a user's hook at hook_pattern (or hook_attn_scores) gets the whole [B, H, S, K] tensor, as
    without the keywords; the cache holds the slice of what the hooks left (an edit shows in it)."""
    bridge = _bridge()
    x = torch.randn(2, 9, 64)
    seen = []

    def zero_head_0(p, hook):
        seen.append(p.shape)
        p[:, 0] = 0

    with torch.no_grad(), bridge.hooks(fwd_hooks=[("hook_pattern", zero_head_0)]):
        _, cache = bridge.run_with_cache(x, names_filter="hook_pattern", pattern_heads=[0, 1], pattern_queries=-1)
    assert seen == [torch.Size([2, 4, 9, 9])]
    assert cache["hook_pattern"].shape == (2, 2, 1, 9)
    assert (cache["hook_pattern"][:, 0] == 0).all() and (cache["hook_pattern"][:, 1].sum(-1) - 1).abs().max() < 1e-5


def test_training_dropout_and_gradients_take_the_slice_of_the_whole():
    """Where the whole pattern must exist anyway (train-mode dropout, incl_bwd's gradients), the cache still holds
    the slice: of the pattern after dropout, and of the gradient."""
    sel = dict(pattern_queries=[-1], pattern_keys=[0, 1])
    families, left_padded = _families()
    h = pyqkv.hf.attach(families["gpt2"].make("cpu"))
    ids, am = left_padded("cpu")
    full, sliced = (
        h.run_with_cache(ids, attention_mask=am, names_filter=BOTH, incl_bwd=True, return_type="loss", **s)[1]
        for s in ({}, sel)
    )
    assert "blocks.0.attn.hook_pattern_grad" in sliced
    _assert_slices(full, sliced, sel, "incl_bwd")
    bridge = _bridge(attn_dropout=0.5).train()
    x = torch.randn(2, 9, 64)
    torch.manual_seed(0)
    _, full = bridge.run_with_cache(x, names_filter="hook_pattern")
    torch.manual_seed(0)
    _, sliced = bridge.run_with_cache(x, names_filter="hook_pattern", **sel)
    assert (full["hook_pattern"] == 0).any()  # dropout did drop
    _assert_slices(full, sliced, sel, "dropout")


def test_keyword_errors_name_the_keyword():
    bridge = _bridge()
    x = torch.randn(2, 9, 64)
    with pytest.raises(ValueError, match=r"pattern_queries: slices the cached hook_attn_scores and hook_pattern, but"):
        bridge.run_with_cache(x, names_filter="hook_z", pattern_queries=-1)
    with pytest.raises(ValueError, match=r"pattern_keys: expected indices in \[-9, 9\) .* got 9"):
        bridge.run_with_cache(x, names_filter="hook_pattern", pattern_keys=[0, 9])
    with pytest.raises(ValueError, match=r"pattern_queries: expected indices in \[-9, 9\) .* got -10"):
        bridge.run_with_cache(x, names_filter="hook_pattern", pattern_queries=-10)
    with pytest.raises(ValueError, match=r"pattern_heads: expected indices in \[-4, 4\)"):
        bridge.run_with_cache(x, pattern_heads=[4])
    with pytest.raises(TypeError, match=r"pattern_heads: expected None, an int, a slice.*got str"):
        bridge.run_with_cache(x, names_filter="hook_pattern", pattern_heads="0")
    with pytest.raises(TypeError, match=r"pattern_keys: expected a slice of ints"):
        bridge.run_with_cache(x, names_filter="hook_pattern", pattern_keys=slice(0.5, 2))
    assert not any(p.fwd or p.bwd for p in bridge.hook_points().values())  # nothing left behind
    families, left_padded = _families()
    h = pyqkv.hf.attach(families["gpt2"].make("cpu"))
    ids, _ = left_padded("cpu")
    with pytest.raises(TypeError, match=r"pattern_queries is a keyword of run_with_cache"):
        h(ids, pattern_queries=-1)


def test_a_conversion_rule_on_the_point_refuses_the_keywords():
    bridge = _bridge(hook_conversions={"hook_pattern": "b h s k -> b s h k"})
    with pytest.raises(ValueError, match=r"pattern_queries: hook_pattern has the conversion rule"):
        bridge.run_with_cache(torch.randn(2, 9, 64), names_filter="hook_pattern", pattern_queries=-1)


def test_slices_compile_without_a_graph_break():
    """With Python indices (an int, a list, a slice) the slice path traces whole under torch.compile(fullgraph=True):
    no fallback warning, the same entries as eager."""
    families, left_padded = _families()
    model = families["llama3"].make("cpu")
    h = pyqkv.hf.attach(model)
    ids, am = left_padded("cpu")
    selection = dict(pattern_heads=[0, -1], pattern_queries=-1, pattern_keys=slice(0, None, 2))
    with torch.no_grad():
        _, eager = h.run_with_cache(ids, attention_mask=am, names_filter=BOTH, **selection)
        h.compile(fullgraph=True, backend="eager")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, compiled = h.run_with_cache(ids, attention_mask=am, names_filter=BOTH, **selection)
    for name in eager.keys():
        torch.testing.assert_close(compiled[name], eager[name])


@pytest.mark.parametrize("impl", ["pattern_slice", "_pattern_slice_aten"])
@pytest.mark.parametrize("dtype", [f32, bf16], ids=str)
@pytest.mark.parametrize("case", op_cases.attention_cases(), ids=lambda c: c.name)
def test_case_table(case, dtype, impl, device):
    """The whole attention case table (tests/op_cases.py), on every device (CPU, and CUDA where present), for the
    op and for its ATen form (which CUDA's pattern_slice is) run directly."""
    ok, msg = op_cases.check_pattern_slice_case(
        case, dtype, device, torch.ops.pyqkv.attention, getattr(torch.ops.pyqkv, impl)
    )
    assert ok, msg
