"""Fast-path selection (DESIGN.md): an intermediate is built only when a hook or the cache asks for it, and
every path gives the reference's result. Spies on pyqkv.ops record which ops run (and whether the
attention op was asked for the pattern); the profiler shows which buffers get allocated."""

from __future__ import annotations

import pytest
import tolerance
import torch
from test_bridge import plain_bridge, randx
from test_bridge_oracle import Oracle, apply_pattern, gpt2_attention, no_hooks_left
from tolerance import assert_close, assert_close_by_rule
from torch.profiler import ProfilerActivity, profile

import pyqkv
from pyqkv import reference

SPIED = ("attention", "attn_scores", "attn_softmax", "attn_apply", "per_head_proj")


@pytest.fixture
def spy(monkeypatch):
    """calls: list of op names in call order; 'attention+pattern' when the fused op is asked for it."""
    calls = []

    def wrap(name):
        real = getattr(pyqkv.ops, name)

        def spied(*args, **kwargs):
            rp = kwargs.get("return_pattern", args[6] if name == "attention" and len(args) > 6 else False)
            calls.append(name + ("+pattern" if rp else ""))
            return real(*args, **kwargs)

        monkeypatch.setattr(pyqkv.ops, name, spied)

    for name in SPIED:
        wrap(name)
    return calls


def _noop(t, hook):
    return None


def test_no_hook_is_fused_without_pattern(device, spy):
    b, oracle, _ = plain_bridge(device)
    x = randx(device)
    out = b(x)
    assert spy == ["attention"]
    assert_close(out, oracle(x))


def test_hooks_elsewhere_keep_fast_path(device, spy):
    b, oracle, _ = plain_bridge(device)
    x = randx(device)
    names = ["hook_in", "hook_q", "hook_k", "hook_v", "hook_z", "hook_out"]
    out = b.run_with_hooks(x, fwd_hooks=[(n, _noop) for n in names])
    assert spy == ["attention"]
    assert_close(out, oracle(x))
    spy.clear()
    out2, cache = b.run_with_cache(x, names_filter=names)
    assert spy == ["attention"]
    assert set(cache) == set(names)
    assert_close(out2, oracle(x))


def test_eval_mode_with_dropout_config_is_fast(device, spy):
    b = pyqkv.hf.bridge_from_module(gpt2_attention(device, attn_pdrop=0.5, resid_pdrop=0.5))
    b.eval()
    b(randx(device))
    assert spy == ["attention"]
    spy.clear()
    b.train()
    b(randx(device))
    assert spy[0] == "attention+pattern", "train-mode attention dropout needs the pattern"


def test_cached_pattern_costs_one_pattern_write(device, spy):
    """run_with_cache's savers are read-only: the fused op writes the pattern and its z is kept."""
    b, oracle, _ = plain_bridge(device)
    x = randx(device)
    out, cache = b.run_with_cache(x, names_filter=["hook_pattern", "hook_z"])
    assert spy == ["attention+pattern"], "a cached pattern must not trigger a second pass over V"
    assert cache["hook_pattern"].shape == (2, 4, 7, 7)
    assert_close(out, oracle(x))


def test_user_pattern_hook_recomputes_z(device, spy):
    """Any user hook may edit in place by means no caller can see (.data, numpy): z is recomputed from the
    pattern the hooks leave, decided from which hooks are registered, not from the tensor's version."""
    b, oracle, _ = plain_bridge(device)
    x = randx(device)
    seen = []
    out = b.run_with_hooks(x, fwd_hooks=[("hook_pattern", lambda t, hook: seen.append(t.shape))])
    assert spy == ["attention+pattern", "attn_apply"]
    assert seen == [torch.Size([2, 4, 7, 7])]
    assert_close(out, oracle(x))


@pytest.mark.parametrize("how", ["in_place", "returned", "data", "numpy"])
def test_edited_pattern_recomputes_z(device, spy, how):
    b, oracle, _ = plain_bridge(device)
    x = randx(device)

    def edit(p):
        p = p.clone()
        p[:, 1] = torch.eye(7, device=p.device, dtype=p.dtype)  # head 1 attends to itself only
        return p

    def hook(t, hook):
        if how == "in_place":
            t.copy_(edit(t))
        elif how == "data":  # does not bump the version counter
            t.data.copy_(edit(t))
        elif how == "numpy":  # neither does a write through numpy's view of the memory
            if t.device.type != "cpu":
                pytest.skip("numpy views CPU memory only")
            t.detach().numpy()[:] = edit(t).detach().numpy()
        else:
            return edit(t)
        return None

    out = b.run_with_hooks(x, fwd_hooks=[("hook_pattern", hook)])
    assert spy == ["attention+pattern", "attn_apply"]
    assert_close(out, oracle(x, edits={"hook_pattern": edit}), f"pattern edited {how}")
    assert tolerance.differs(out, oracle(x)), "the edit must change the output"


def test_scores_hook_uses_split_form(device, spy):
    b, oracle, _ = plain_bridge(device)
    x = randx(device)
    out = b.run_with_hooks(x, fwd_hooks=[("hook_attn_scores", _noop)])
    assert spy == ["attn_scores", "attn_softmax", "attn_apply"]
    assert_close(out, oracle(x))


def test_backward_hook_on_pattern_puts_pattern_in_graph(device, spy):
    b, oracle, _ = plain_bridge(device)
    x = randx(device).requires_grad_(True)
    grads = []
    with b.hooks(bwd_hooks=[("hook_pattern", lambda g, hook: grads.append(g.shape))]):
        out = b(x)
        out.sum().backward()
    assert "attn_apply" in spy
    assert grads == [torch.Size([2, 4, 7, 7])]


@pytest.mark.parametrize(
    "flag,point,expected",
    [
        ("use_split_qkv_input", None, []),
        ("use_split_qkv_input", "hook_q_input", ["per_head_proj"]),
        ("use_split_qkv_input", "hook_v_input", ["per_head_proj"]),
        ("use_attn_in", None, []),
        ("use_attn_in", "hook_attn_in", ["per_head_proj"] * 3),
        ("use_attn_result", None, []),
        ("use_attn_result", "hook_result", ["per_head_proj"]),
    ],
)
def test_fork_flags_copy_only_when_hooked(device, spy, flag, point, expected):
    b, oracle, _ = plain_bridge(device, **{flag: True})
    x = randx(device)
    hooks = [] if point is None else [(point, _noop)]
    out = b.run_with_hooks(x, fwd_hooks=hooks)
    assert [c for c in spy if c == "per_head_proj"] == expected
    assert "attention" in spy
    assert_close(out, oracle(x))


# ---------------------------------------------------------------------------------------------------
# Allocations: the profiler lists every buffer allocated in the forward.


def _allocations(fn, device):
    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), profile(activities=acts, profile_memory=True) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    attr = "self_device_memory_usage" if cuda else "self_cpu_memory_usage"
    sizes = [getattr(e, attr) for e in prof.events() if getattr(e, attr, 0) > 0]
    assert sizes, "the profiler recorded no allocation at all (the test would be vacuous)"
    return sizes


B, S, Dm, Hq = 2, 96, 64, 4  # S large against D, so [B,H,S,K] and [B,S,H,D] exceed every other buffer
PATTERN_BYTES = B * Hq * S * S * 4
COPY_BYTES = B * S * Hq * Dm * 4


def _big_bridge(device, **flags):
    b, _, _ = plain_bridge(device, H=Hq, Hkv=Hq, Dh=16, D=Dm, **flags)
    return b, randx(device, B=B, S=S, D=Dm)


def test_fast_path_allocates_no_pattern(device):
    b, x = _big_bridge(device)
    fast = _allocations(lambda: b(x), device)
    assert max(fast) < PATTERN_BYTES, f"fast path allocated {max(fast)} bytes (a [B,H,S,K] is {PATTERN_BYTES})"
    hooked = _allocations(lambda: b.run_with_hooks(x, fwd_hooks=[("hook_pattern", _noop)]), device)
    assert max(hooked) >= PATTERN_BYTES, "the pattern path should have allocated the pattern"
    # a read-only pattern hook: one [B,H,S,K] buffer, not two
    assert sum(s >= PATTERN_BYTES for s in hooked) == 1, sorted(hooked)


def test_fork_flags_without_hook_make_no_copy(device):
    for flags in (dict(use_split_qkv_input=True), dict(use_attn_in=True), dict(use_attn_result=True)):
        b, x = _big_bridge(device, **flags)
        sizes = _allocations(lambda: b(x), device)
        assert max(sizes) < COPY_BYTES, f"{flags}: an H-fold buffer was allocated without a hook"
    b, x = _big_bridge(device, use_split_qkv_input=True)
    sizes = _allocations(lambda: b.run_with_hooks(x, fwd_hooks=[("hook_q_input", _noop)]), device)
    assert max(sizes) >= COPY_BYTES, "a hooked fork point must see a real per-head copy"


# ---------------------------------------------------------------------------------------------------
# Every path equals the reference.


def _pattern_clone(t, hook):
    return t.clone()


PATHS = [
    pytest.param({}, [], id="fused"),
    pytest.param({}, [("hook_pattern", _noop)], id="pattern-readonly"),
    pytest.param({}, [("hook_pattern", _pattern_clone)], id="pattern-replaced-same-values"),
    pytest.param({}, [("hook_pattern", lambda t, hook: t.mul_(1.0))], id="pattern-in-place-identity"),
    pytest.param({}, [("hook_attn_scores", _noop)], id="scores"),
    pytest.param({}, [("hook_attn_scores", _noop), ("hook_pattern", _noop)], id="scores+pattern"),
    pytest.param(
        dict(use_split_qkv_input=True),
        [(n, _noop) for n in ("hook_q_input", "hook_k_input", "hook_v_input")],
        id="split-all",
    ),
    pytest.param(dict(use_split_qkv_input=True), [("hook_k_input", _noop)], id="split-k-only"),
    pytest.param(dict(use_attn_in=True), [("hook_attn_in", _noop)], id="attn-in"),
    pytest.param(dict(use_attn_result=True), [("hook_result", _noop)], id="attn-result"),
    pytest.param(dict(use_attn_result=True, use_split_qkv_input=True), None, id="everything-cached"),
]


@pytest.mark.parametrize("flags,fwd_hooks", PATHS)
@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_every_path_equals_reference(device, flags, fwd_hooks, Hkv):
    b, oracle, _ = plain_bridge(device, H=4, Hkv=Hkv, **flags)
    x = randx(device, B=2, S=10)
    pad = torch.ones(2, 10, dtype=torch.long, device=device)
    pad[0, :3] = 0
    exp = oracle.run(x, mask=pad)

    def run(*args, **kw):
        if fwd_hooks is None:
            return b.run_with_cache(*args, **kw)[0]
        return b.run_with_hooks(*args, fwd_hooks=fwd_hooks, **kw)

    assert_close(run(x, attention_mask=pad), exp["hook_out"], "full sequence")
    cache = pyqkv.KVCache()
    with torch.no_grad():
        o1 = run(x[:, :6], attention_mask=pad[:, :6], kv_cache=cache)
        o2 = run(x[:, 6:8], attention_mask=pad[:, :8], kv_cache=cache)
        o3 = run(x[:, 8:9], attention_mask=pad[:, :9], kv_cache=cache)
        o4 = run(x[:, 9:], attention_mask=pad, kv_cache=cache)
    assert_close(torch.cat([o1, o2, o3, o4], 1), exp["hook_out"], "cached")
    assert no_hooks_left(b)


def test_gpt2_every_path_equals_hf_oracle(device):
    m = gpt2_attention(device, layer_idx=1, scale_attn_by_inverse_layer_idx=True)
    oracle = Oracle.from_gpt2(m)
    x = randx(device, S=9)
    exp = oracle(x)
    for flags in ({}, dict(use_split_qkv_input=True, use_attn_result=True), dict(use_attn_in=True)):
        b = pyqkv.hf.bridge_from_module(m, **flags)
        assert_close(b(x), exp, f"{flags} no hooks")
        assert_close(b.run_with_cache(x)[0], exp, f"{flags} all hooks")
    # The oracle's z is apply_pattern(pattern, v): sanity that the helper and the reference's own z agree
    # (float64, so the rule's ref_lo is its ref_hi).
    e = oracle.run(x)
    z_ref = reference.attention(e["hook_q"].hi, e["k_all"].hi, e["v_all"].hi, scale=oracle.scale, causal=True)[0]
    assert_close_by_rule(apply_pattern(e["hook_pattern"].hi, e["hook_v"].hi), z_ref, z_ref, what="oracle self-check")
