"""Hook points of one Bridge (SPEC §2, §3, §3b): names, aliases, shapes, firing order, the return rule,
ablation semantics against the float64 oracle, fork flags, the TransformerLens-style API, backward hooks,
and that no per-call state is left behind."""

from __future__ import annotations

import gc
import itertools
import weakref

import pytest
import torch
from test_bridge import plain_bridge, randx
from test_bridge_oracle import (
    Oracle,
    apply_pattern,
    gpt2_attention,
    no_hooks_left,
    softmax_zero_rows,
)
from tolerance import Ref, assert_close, by_hand, differs

import pyqkv

B, S, D, H, HKV, DH = 2, 6, 64, 4, 2, 16

SHAPES = {
    "hook_in": (B, S, D),
    "hook_attn_in": (B, S, H, D),
    "hook_q_input": (B, S, H, D),
    "hook_k_input": (B, S, HKV, D),
    "hook_v_input": (B, S, HKV, D),
    "hook_q": (B, S, H, DH),
    "hook_k": (B, S, HKV, DH),
    "hook_v": (B, S, HKV, DH),
    "hook_attn_scores": (B, H, S, "K"),
    "hook_pattern": (B, H, S, "K"),
    "hook_z": (B, S, H, DH),
    "hook_result": (B, S, H, D),
    "hook_out": (B, S, D),
}

FLAG_SETS = [
    {},
    dict(use_attn_in=True),
    dict(use_split_qkv_input=True),
    dict(use_attn_result=True),
    dict(use_split_qkv_input=True, use_attn_result=True),
    dict(use_attn_in=True, use_attn_result=True),
]


def flag_id(flags):
    return "+".join(sorted(flags)) or "default"


def expected_order(flags):
    order = ["hook_in"]
    if flags.get("use_attn_in"):
        order.append("hook_attn_in")
    if flags.get("use_split_qkv_input"):
        order += ["hook_q_input", "hook_k_input", "hook_v_input"]
    order += ["hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z"]
    if flags.get("use_attn_result"):
        order.append("hook_result")
    return order + ["hook_out"]


def _noop(t, hook):
    return None


def _raise(t, hook):
    raise RuntimeError("raised by a hook")


# ----------------------------------------------------------------------------------------------------
# Names, shapes, order


@pytest.mark.parametrize("flags", FLAG_SETS, ids=flag_id)
def test_firing_order_and_shapes(device, flags):
    b, oracle, _ = plain_bridge(device, H=H, Hkv=HKV, **flags)
    x = randx(device, B=B, S=S)
    fired = []
    b.add_hook(lambda name: True, lambda t, hook: fired.append((hook.name, tuple(t.shape))))
    cache = pyqkv.KVCache()
    with torch.no_grad():
        b(randx(device, B=B, S=3, seed=8), kv_cache=cache)  # 3 positions in the cache: K = S + 3
        fired.clear()
        b(x, kv_cache=cache)
    assert [n for n, _ in fired] == expected_order(flags)
    for name, shape in fired:
        want = tuple(S + 3 if d == "K" else d for d in SHAPES[name])
        assert shape == want, f"{name}: hook format {shape}, expected {want}"
    b.reset_hooks()
    assert no_hooks_left(b)


@pytest.mark.parametrize("flags", FLAG_SETS, ids=flag_id)
def test_cached_activations_equal_oracle(device, flags):
    b, oracle, _ = plain_bridge(device, H=H, Hkv=HKV, **flags)
    x = randx(device, B=B, S=S)
    pad = torch.ones(B, S, dtype=torch.long, device=device)
    pad[1, :2] = 0
    out, cache = b.run_with_cache(x, attention_mask=pad)
    exp = oracle.run(x, mask=pad)
    assert set(cache) == set(expected_order(flags))
    for name in ("hook_in", "hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z", "hook_out"):
        assert_close(cache[name], exp[name], name)
    if flags.get("use_attn_result"):
        assert_close(cache["hook_result"], exp["hook_result"], "hook_result")
    scores, ref_scores = cache["hook_attn_scores"], exp["hook_attn_scores"]
    hidden = ref_scores.hi <= torch.finfo(torch.float64).min / 2
    assert torch.all(scores[hidden] == torch.finfo(scores.dtype).min), "masked scores must hold the dtype's min"
    assert_close(scores[~hidden], ref_scores[~hidden], "visible scores")
    for name in ("hook_attn_in", "hook_q_input"):
        if name in cache:
            assert torch.equal(cache[name], x.unsqueeze(2).expand(B, S, H, D))
    for name in ("hook_k_input", "hook_v_input"):
        if name in cache:
            assert torch.equal(cache[name], x.unsqueeze(2).expand(B, S, HKV, D))
    assert_close(out, exp["hook_out"])


@pytest.mark.parametrize(
    "alias,canonical",
    [
        ("q.hook_out", "hook_q"),
        ("k.hook_out", "hook_k"),
        ("v.hook_out", "hook_v"),
        ("o.hook_in", "hook_z"),
        ("hook_hidden_states", "hook_out"),
        ("o.hook_out", "hook_out"),
    ],
)
def test_aliases_are_the_same_point(device, alias, canonical):
    b, _, _ = plain_bridge(device)
    x = randx(device)
    seen = []
    b.add_hook(alias, lambda t, hook: seen.append(("alias", hook.name)))
    b.add_hook(canonical, lambda t, hook: seen.append(("canonical", hook.name)))
    assert len(b.hook_points()[canonical].fwd) == 2
    assert alias not in b.hook_points()
    b(x)
    assert seen == [("alias", canonical), ("canonical", canonical)], "one point, fired once per hook, in order"
    b.reset_hooks()
    out, cache = b.run_with_cache(x, names_filter=[alias])
    assert set(cache) == {canonical, alias}
    assert cache[alias] is cache[canonical] or torch.equal(cache[alias], cache[canonical])


def test_alias_cache_and_canonical_cache_agree(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device)
    _, cache = b.run_with_cache(x, names_filter=["q.hook_out", "o.hook_in", "hook_hidden_states", "hook_pattern"])
    assert set(cache) == {
        "q.hook_out",
        "hook_q",
        "o.hook_in",
        "hook_z",
        "hook_hidden_states",
        "hook_out",
        "hook_pattern",
    }
    exp = oracle.run(x)
    assert_close(cache["q.hook_out"], exp["hook_q"])
    assert_close(cache["o.hook_in"], exp["hook_z"])
    assert_close(cache["hook_hidden_states"], exp["hook_out"])


# ----------------------------------------------------------------------------------------------------
# Return rule


def test_none_keeps_and_returned_tensor_replaces(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device)
    exp = oracle(x)
    assert_close(b.run_with_hooks(x, fwd_hooks=[(n, _noop) for n in expected_order({})]), exp, "None keeps")
    out = b.run_with_hooks(x, fwd_hooks=[("hook_out", lambda t, hook: torch.zeros_like(t))])
    assert torch.count_nonzero(out) == 0
    two_x = lambda t, hook: t * 2  # noqa: E731
    assert_close(
        b.run_with_hooks(x, fwd_hooks=[("hook_q", two_x)]),
        oracle(x, edits={"hook_q": lambda q: q * 2}),
        "hook_q replaced",
    )


@pytest.mark.parametrize(
    "point", ["hook_in", "hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "hook_out"]
)
def test_in_place_edits_are_honoured(device, point):
    b, oracle, _ = plain_bridge(device)
    x = randx(device)

    def edit(t):  # head / feature 0 scaled: different for every point, and in place
        t[..., :1] *= 0.5 if point != "hook_attn_scores" else 1.0
        if point == "hook_attn_scores":
            t[:, 0, :, 0] += 2.0  # head 0 favours key 0 (visible to every query)
        return t

    exp = oracle(x, edits={point: lambda t: edit(t.clone())})
    out = b.run_with_hooks(x.clone(), fwd_hooks=[(point, lambda t, hook: (edit(t), None)[1])])
    assert_close(out, exp, f"in-place edit at {point}")
    assert differs(out, oracle(x)), "the edit had no effect"


@pytest.mark.parametrize("point", ["hook_in", "hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z", "hook_out"])
def test_replacements_with_odd_strides(device, point):
    """A hook may return a non-contiguous or broadcast tensor: the forward must not depend on strides."""
    b, oracle, _ = plain_bridge(device)
    x = randx(device)
    cache = pyqkv.KVCache()

    def odd(t):
        if point == "hook_pattern":
            return t.transpose(2, 3).contiguous().transpose(2, 3) * 1.0
        first = t[:1, :1].clone() * 0.5
        return first.expand(t.shape)  # stride 0 over batch and sequence

    exp = oracle(x, edits={point: odd})
    assert_close(b.run_with_hooks(x, fwd_hooks=[(point, lambda t, hook: odd(t))]), exp, f"odd strides at {point}")
    with torch.no_grad():
        out = b.run_with_hooks(x, fwd_hooks=[(point, lambda t, hook: odd(t))], kv_cache=cache)
    assert_close(out, exp, f"odd strides at {point}, with a KV cache")


# ----------------------------------------------------------------------------------------------------
# Ablation and patching semantics


@pytest.mark.parametrize("head", [0, 2])
def test_zeroing_head_at_hook_z_by_hand(device, head):
    m = gpt2_attention(device)
    b = pyqkv.hf.bridge_from_module(m)
    x = randx(device)
    _, cache = b.run_with_cache(x, names_filter="hook_z")
    z = cache["hook_z"].clone()
    z[:, :, head] = 0
    W_O, b_O = m.c_proj.weight.detach(), m.c_proj.bias.detach()
    ablated = by_hand(lambda dt: z.to(dt).flatten(2) @ W_O.to(dt) + b_O.to(dt), z.dtype)

    def ablate(t, hook):
        t[:, :, head] = 0

    out = b.run_with_hooks(x, fwd_hooks=[("hook_z", ablate)])
    assert_close(out, ablated, "ablated output")
    out2 = b.run_with_hooks(
        x, fwd_hooks=[("o.hook_in", lambda t, hook: t.index_fill(2, torch.tensor([head], device=t.device), 0))]
    )
    assert_close(out2, ablated, "ablated output (returned, alias)")


@pytest.mark.parametrize("how", ["returned", "in_place"])
@pytest.mark.parametrize("Hkv", [4, 2, 1])
def test_pattern_edit_changes_z(device, how, Hkv):
    b, oracle, _ = plain_bridge(device, H=4, Hkv=Hkv)
    x = randx(device)
    captured = {}

    def hook(t, hook):
        new = t.clone()
        new[:, 2] = 0
        new[:, 2, :, 0] = 1.0  # head 2 reads only key 0
        captured["p"] = new
        if how == "in_place":
            t.copy_(new)
            return None
        return new

    out, cache = None, None
    with b.hooks(fwd_hooks=[("hook_pattern", hook)]):
        out, cache = b.run_with_cache(x, names_filter=["hook_v", "hook_z"])
    p, v = captured["p"], cache["hook_v"]
    assert_close(
        cache["hook_z"], by_hand(lambda dt: apply_pattern(p.to(dt), v.to(dt)), p.dtype), "z from the edited pattern"
    )
    assert_close(out, oracle(x, edits={"hook_pattern": lambda t: p.to(t.dtype)}), "output")


def test_scores_edit_changes_pattern(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device)

    def edit(t):
        t = t.clone()
        t[:, 1, :, 0] += 3.0  # head 1 favours key 0 (key 0 is visible to every query)
        return t

    with b.hooks(fwd_hooks=[("hook_attn_scores", lambda t, hook: edit(t))]):
        out, cache = b.run_with_cache(x, names_filter=["hook_attn_scores", "hook_pattern"])
    scores = cache["hook_attn_scores"]
    assert_close(
        cache["hook_pattern"],
        by_hand(lambda dt: softmax_zero_rows(scores.to(dt)), scores.dtype),
        "softmax of edited scores",
    )
    exp = oracle.run(x, edits={"hook_attn_scores": edit})
    assert_close(cache["hook_pattern"], exp["hook_pattern"], "pattern")
    assert_close(out, exp["hook_out"], "output")
    unedited = oracle.run(x)["hook_pattern"]
    gain = exp["hook_pattern"].hi[:, 1, :, 0] - unedited.hi[:, 1, :, 0]
    assert (gain >= 0).all() and gain.sum() > 0.1, "head 1 should attend more to key 0"


@pytest.mark.parametrize(
    "flags,fork_hooks",
    [
        ({}, []),
        (dict(use_split_qkv_input=True), []),
        (dict(use_split_qkv_input=True), ["hook_q_input", "hook_k_input", "hook_v_input"]),
        (dict(use_split_qkv_input=True), ["hook_v_input"]),
        (dict(use_attn_in=True), []),
        (dict(use_attn_in=True), ["hook_attn_in"]),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else flag_id(v),
)
def test_hook_in_patch_feeds_everything(device, flags, fork_hooks):
    """SPEC fix: a patch at hook_in reaches Q, K and V also on the fork paths."""
    b, oracle, _ = plain_bridge(device, **flags)
    x, x2 = randx(device, seed=5), randx(device, seed=6)
    hooks = [("hook_in", lambda t, hook: x2)] + [(n, _noop) for n in fork_hooks]
    out, cache = None, None
    with b.hooks(fwd_hooks=hooks):
        out, cache = b.run_with_cache(x, names_filter=["hook_q", "hook_k", "hook_v"])
    exp = oracle.run(x2)
    for name in ("hook_q", "hook_k", "hook_v", "hook_out"):
        assert_close(out if name == "hook_out" else cache[name], exp[name], f"{name} after patching hook_in")


def test_hook_k_v_edits_enter_the_kv_cache(device):
    """hook_k / hook_v fire before the cache append: a patched K is what later steps attend to."""
    b, oracle, _ = plain_bridge(device)
    x = randx(device, S=8)
    zero_v = lambda t: t * 0  # noqa: E731
    cache = pyqkv.KVCache()
    with torch.no_grad():
        o1 = b.run_with_hooks(x[:, :5], fwd_hooks=[("hook_v", lambda t, hook: zero_v(t))], kv_cache=cache)
        o2 = b(x[:, 5:], kv_cache=cache)
    exp1 = oracle.run(x[:, :5], edits={"hook_v": zero_v})
    exp2 = oracle.run(x[:, 5:], past=(exp1["hook_k"], exp1["hook_v"]))
    assert_close(o1, exp1["hook_out"])
    assert_close(o2, exp2["hook_out"], "decode step attends to the patched cached V")


# ----------------------------------------------------------------------------------------------------
# Fork flags


def test_split_qkv_input_without_hook_is_exactly_default(device):
    b, _, _ = plain_bridge(device)
    x = randx(device)
    default = b(x)
    b.cfg.use_split_qkv_input = True
    assert torch.equal(b(x), default)
    b.cfg.use_split_qkv_input = False
    b.cfg.use_attn_in = True
    assert torch.equal(b(x), default)
    b.cfg.use_attn_in = False
    b.cfg.use_attn_result = True
    assert torch.equal(b(x), default)


@pytest.mark.parametrize(
    "zeroed,kept",
    [
        ("hook_q_input", ("hook_k", "hook_v")),
        ("hook_k_input", ("hook_q", "hook_v")),
        ("hook_v_input", ("hook_q", "hook_k")),
    ],
)
def test_zeroing_one_split_input_leaves_the_others_bit_identical(device, zeroed, kept):
    b, _, split = plain_bridge(device, use_split_qkv_input=True)
    x = randx(device)
    _, base = b.run_with_cache(x, names_filter=["hook_q", "hook_k", "hook_v"])
    with b.hooks(fwd_hooks=[(zeroed, lambda t, hook: torch.zeros_like(t))]):
        _, hooked = b.run_with_cache(x, names_filter=["hook_q", "hook_k", "hook_v"])
    for name in kept:
        assert torch.equal(hooked[name], base[name]), f"{name} changed when {zeroed} was zeroed"
    target = {"hook_q_input": "hook_q", "hook_k_input": "hook_k", "hook_v_input": "hook_v"}[zeroed]
    bias = {"hook_q": split["b_Q"], "hook_k": split["b_K"], "hook_v": split["b_V"]}[target]
    assert torch.equal(hooked[target], bias.expand_as(hooked[target])), f"{target} of a zero input is its bias"


def test_split_input_per_head_edit(device):
    """Each head is projected with only its own weight slice."""
    b, oracle, split = plain_bridge(device, H=4, Hkv=2, use_split_qkv_input=True)
    x = randx(device)

    def edit(t, hook):
        t[:, :, 1] = 0  # kv head 1 only

    with b.hooks(fwd_hooks=[("hook_k_input", edit)]):
        out, cache = b.run_with_cache(x, names_filter=["hook_k"])

    def kv_head1_is_its_bias(k):
        k = k.clone()
        k[:, :, 1] = split["b_K"][1].to(k.dtype)
        return k

    exp = oracle.run(x, edits={"hook_k": kv_head1_is_its_bias})
    assert_close(cache["hook_k"], exp["hook_k"], "per-head K input")
    assert_close(out, exp["hook_out"], "output")


def test_attn_in_sees_per_head_copies_and_kv_use_first_heads(device):
    b, oracle, split = plain_bridge(device, H=4, Hkv=2, use_attn_in=True)
    x = randx(device)
    _, base = b.run_with_cache(x, names_filter=["hook_attn_in", "hook_q", "hook_k", "hook_v"])
    assert base["hook_attn_in"].shape == (2, 7, 4, 64)
    assert torch.equal(base["hook_attn_in"], x.unsqueeze(2).expand(2, 7, 4, 64))
    for head, k_changes in ((3, False), (0, True)):

        def zero(t, hook, head=head):
            t[:, :, head] = 0

        with b.hooks(fwd_hooks=[("hook_attn_in", zero)]):
            _, c = b.run_with_cache(x, names_filter=["hook_q", "hook_k", "hook_v"])
        # A zero input projects to the bias; the other heads' projections are the same computation on the
        # same inputs as without the edit: bit for bit.
        assert torch.equal(c["hook_q"][:, :, head], split["b_Q"][head].expand(2, 7, 16)), "zeroed q head"
        others = [h for h in range(4) if h != head]
        assert torch.equal(c["hook_q"][:, :, others], base["hook_q"][:, :, others]), "other q heads"
        if k_changes:
            assert torch.equal(c["hook_k"][:, :, 0], split["b_K"][0].expand(2, 7, 16)), "K reads attn_in head slot 0"
            assert torch.equal(c["hook_v"][:, :, 0], split["b_V"][0].expand(2, 7, 16)), "V reads attn_in head slot 0"
            assert torch.equal(c["hook_k"][:, :, 1], base["hook_k"][:, :, 1]), "kv head 1 unchanged"
        else:
            assert torch.equal(c["hook_k"], base["hook_k"]) and torch.equal(c["hook_v"], base["hook_v"])


def test_attn_result(device):
    m = gpt2_attention(device)
    b = pyqkv.hf.bridge_from_module(m, use_attn_result=True)
    oracle = Oracle.from_gpt2(m)
    x = randx(device)
    out, cache = b.run_with_cache(x, names_filter=["hook_result", "hook_z"])
    exp = oracle.run(x)
    assert cache["hook_result"].shape == (2, 7, 4, 64)
    assert_close(cache["hook_result"], exp["hook_result"], "per-head result")
    result, b_O = cache["hook_result"], m.c_proj.bias.detach()
    assert_close(out, by_hand(lambda dt: result.to(dt).sum(2) + b_O.to(dt), out.dtype), "sum over heads + b_O")
    assert_close(out, exp["hook_out"])
    head1 = lambda t, hook=None: t.index_fill(2, torch.tensor([1], device=t.device), 0)  # noqa: E731
    abl_result = b.run_with_hooks(x, fwd_hooks=[("hook_result", head1)])
    abl_z = b.run_with_hooks(x, fwd_hooks=[("hook_z", head1)])
    ablated = oracle(x, edits={"hook_z": head1})  # head 1's z zeroed: its result is zero too
    assert_close(abl_result, ablated, "a head's result ablated")
    assert_close(abl_z, ablated, "a head's z ablated")


@pytest.mark.parametrize("flags", FLAG_SETS[1:], ids=flag_id)
def test_flags_do_not_change_output(device, flags):
    b_default, _, _ = plain_bridge(device)
    b, oracle, _ = plain_bridge(device, **flags)
    x = randx(device)
    default = b_default(x)
    assert torch.equal(b(x), default), "no hook: the same computation"
    assert_close(b.run_with_cache(x)[0], oracle(x), "identity hooks on every point")


# ----------------------------------------------------------------------------------------------------
# API


def test_filter_sweeps_skip_gated_points(device):
    """A predicate that selects every name hooks only the points that fire (the gated ones are skipped; naming
    one is a row of tests/test_bad_input.py), and a gated point takes hooks once its flag is set."""
    b, _, _ = plain_bridge(device)
    handles = b.add_hook(lambda name: True, _noop)
    assert sorted(h.point.name for h in handles) == sorted(expected_order({}))
    assert not b.hook_points()["hook_result"].fwd and not b.hook_points()["hook_rot_q"].fwd
    b.reset_hooks()
    b.cfg.use_attn_result = True
    assert len(b.add_hook("hook_result", _noop)) == 1
    b.reset_hooks()
    assert no_hooks_left(b)


def test_names_filter_forms(device):
    b, _, _ = plain_bridge(device)
    x = randx(device).requires_grad_(True)
    out, cache = b.run_with_cache(x)
    assert set(cache) == set(expected_order({}))
    assert all(not t.requires_grad for t in cache.values()), "cached tensors must be detached"
    assert out.requires_grad
    assert set(b.run_with_cache(x, names_filter="hook_z")[1]) == {"hook_z"}
    assert set(b.run_with_cache(x, names_filter=["hook_q", "hook_k"])[1]) == {"hook_q", "hook_k"}
    assert set(b.run_with_cache(x, names_filter=lambda n: n.endswith("_v") or n == "hook_out")[1]) == {
        "hook_v",
        "hook_out",
    }
    with pytest.raises(ValueError, match="hook_result: this hook point does not fire"):  # gated, named: refused
        b.run_with_cache(x, names_filter="hook_result")
    assert no_hooks_left(b)


def test_run_with_cache_forwards_kwargs(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device)
    pad = torch.ones(2, 7, dtype=torch.bool, device=device)
    pad[0, :2] = False
    out, cache = b.run_with_cache(x, names_filter="hook_pattern", attention_mask=pad)
    exp = oracle.run(x, mask=pad)
    assert_close(out, exp["hook_out"])
    assert_close(cache["hook_pattern"], exp["hook_pattern"])
    kv = pyqkv.KVCache()
    with torch.no_grad():
        b.run_with_hooks(x[:, :4], fwd_hooks=[("hook_z", _noop)], kv_cache=kv, attention_mask=pad[:, :4])
    assert kv.length == 4


def test_permanent_hooks_and_reset(device):
    b, _, _ = plain_bridge(device)
    x = randx(device)
    calls = []
    b.add_hook("hook_z", lambda t, hook: calls.append("perm"), is_permanent=True)
    b.add_hook("hook_z", lambda t, hook: calls.append("temp"))
    b(x)
    assert calls == ["perm", "temp"]
    b.reset_hooks()
    calls.clear()
    b(x)
    assert calls == ["perm"], "reset_hooks() must keep permanent hooks"
    with b.hooks(fwd_hooks=[("hook_z", lambda t, hook: calls.append("ctx"))]):
        b(x)
    b.run_with_cache(x)
    b.run_with_hooks(x, fwd_hooks=[("hook_out", _noop)])
    calls.clear()
    b(x)
    assert calls == ["perm"]
    b.remove_hooks()
    assert len(b.hook_points()["hook_z"].fwd) == 1
    b.reset_hooks(including_permanent=True)
    assert no_hooks_left(b)


def test_remove_hooks_by_direction(device):
    b, _, _ = plain_bridge(device)
    b.add_hook("hook_q", _noop)
    b.add_hook("hook_q", _noop, dir="bwd")
    b.remove_hooks("fwd")
    assert not b.hook_points()["hook_q"].fwd and len(b.hook_points()["hook_q"].bwd) == 1
    b.remove_hooks("bwd")
    assert no_hooks_left(b)


def test_hook_points_are_not_modules(device):
    """A point with no hooks costs a list check: hook points are plain objects, not submodules."""
    b, _, _ = plain_bridge(device)
    assert list(b.children()) == []
    assert all(not isinstance(p, torch.nn.Module) for p in b.hook_points().values())
    assert set(b.hook_points()) == set(SHAPES) | {"hook_rot_q", "hook_rot_k", "hook_q_normed", "hook_k_normed"}


def test_hooks_context_removes_exactly_what_it_added(device):
    b, _, _ = plain_bridge(device)
    x = randx(device)
    mine = b.add_hook("hook_q", _noop)[0]
    with pytest.raises(RuntimeError, match="body"):
        with b.hooks(fwd_hooks=[("hook_q", _noop), ("hook_pattern", _noop)], bwd_hooks=[("hook_z", _noop)]):
            assert len(b.hook_points()["hook_q"].fwd) == 2 and len(b.hook_points()["hook_z"].bwd) == 1
            b(x)
            raise RuntimeError("body")
    assert b.hook_points()["hook_q"].fwd == [mine]
    assert not b.hook_points()["hook_pattern"].fwd and not b.hook_points()["hook_z"].bwd
    with pytest.raises(KeyError):  # the second name fails: the first is removed again
        with b.hooks(fwd_hooks=[("hook_z", _noop), ("bogus", _noop)]):
            pass
    assert not b.hook_points()["hook_z"].fwd
    mine.remove()
    mine.remove()  # idempotent
    assert no_hooks_left(b)


def test_prepend_and_chaining(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device)
    order = []
    b.add_hook("hook_q", lambda t, hook: (order.append("a"), t * 2)[1])
    b.add_hook("hook_q", lambda t, hook: (order.append("b"), t + 1)[1])
    b.add_hook("hook_q", lambda t, hook: order.append("c"), prepend=True)
    out = b(x)
    assert order == ["c", "a", "b"]
    assert_close(out, oracle(x, edits={"hook_q": lambda q: q * 2 + 1}), "hooks chain in order")
    b.reset_hooks()


def test_hook_name_and_ctx(device):
    b, _, _ = plain_bridge(device)
    x = randx(device)

    def count(t, hook):
        assert isinstance(hook.ctx, dict)
        hook.ctx["n"] = hook.ctx.get("n", 0) + 1
        names.append(hook.name)

    names = []
    b.add_hook("o.hook_in", count)
    b(x)
    b(x)
    assert names == ["hook_z", "hook_z"]
    assert b.hook_points()["hook_z"].ctx["n"] == 2
    b.reset_hooks()
    assert b.hook_points()["hook_z"].ctx == {}


def test_no_per_call_state_left(device):
    b, _, _ = plain_bridge(device, use_attn_result=True)
    x = randx(device)
    refs = []

    def keep_weak(t, hook):
        refs.append(weakref.ref(t))

    with torch.no_grad():
        out = b.run_with_hooks(x, fwd_hooks=[(n, keep_weak) for n in ("hook_q", "hook_pattern", "hook_result")])
    b.run_with_cache(x)
    with pytest.raises(RuntimeError):
        b.run_with_hooks(x, fwd_hooks=[("hook_pattern", _raise)])
    with pytest.raises(ValueError):
        b.run_with_cache(x, names_filter=["hook_pattern"], attention_mask=torch.ones(3, 3, device=device))
    assert no_hooks_left(b)
    del out
    gc.collect()
    assert all(r() is None for r in refs), "an activation outlived its call"
    for p in b.hook_points().values():
        assert p.ctx == {}


# ----------------------------------------------------------------------------------------------------
# Backward hooks


def _oracle_grads(oracle, x, w, *, grad_edits=None):
    """dL/dx of L = sum(out * w) with grad hooks on the oracle's intermediates, through the oracle in float64
    and in the Bridge's dtype: (Ref of dL/dx, {point: Ref of dL/d(point)})."""
    grad_edits = grad_edits or {}
    runs = []
    for dt in (torch.float64, oracle.dtype):
        capture = {}
        xr = x.detach().to(dt).requires_grad_(True)

        def mk(name, capture=capture):
            def f(t):
                def on_grad(g):
                    capture[name] = g
                    return grad_edits[name](g) if name in grad_edits else g

                t.register_hook(on_grad)
                return t

            return f

        edits = {n: mk(n) for n in ("hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z", "hook_out")}
        (oracle.run_in(dt, xr, edits=edits)["hook_out"] * w.to(dt)).sum().backward()
        runs.append((xr.grad, capture))
    (gx_hi, cap_hi), (gx_lo, cap_lo) = runs
    return Ref(gx_hi, gx_lo), {name: Ref(cap_hi[name], cap_lo[name]) for name in cap_hi}


@pytest.mark.parametrize("point", ["hook_q", "hook_k", "hook_v", "hook_pattern", "hook_z", "hook_out"])
def test_backward_hook_sees_and_replaces_gradient(device, point):
    b, oracle, _ = plain_bridge(device)
    x = randx(device).requires_grad_(True)
    w = torch.randn(2, 7, 64, device=device)
    seen = {}

    def scale(g, hook):
        seen["g"] = g.clone()
        seen["name"] = hook.name
        return g * 2

    with b.hooks(bwd_hooks=[(point, scale)]):
        (b(x) * w).sum().backward()
    assert no_hooks_left(b)
    gx_exp, cap = _oracle_grads(oracle, x, w, grad_edits={point: lambda g: g * 2})
    assert seen["name"] == point
    assert seen["g"].shape == cap[point].shape, "backward hook must see the gradient in hook format"
    assert_close(seen["g"], cap[point], f"dL/d{point}")
    assert_close(x.grad, gx_exp, f"dL/dx with dL/d{point} doubled")
    gx_plain, _ = _oracle_grads(oracle, x, w)
    assert not torch.equal(gx_plain.hi, gx_exp.hi), "the scaled gradient should change dL/dx"


def test_backward_hook_on_scores_and_in(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device).requires_grad_(True)
    seen = {}
    hooks = [
        ("hook_attn_scores", lambda g, hook: seen.update(scores=g.shape)),
        ("hook_in", lambda g, hook: seen.update({"in": g.clone()})),
    ]
    with b.hooks(bwd_hooks=hooks):
        b(x).sum().backward()
    assert seen["scores"] == (2, 4, 7, 7)
    assert torch.equal(seen["in"], x.grad)
    gx, _ = _oracle_grads(oracle, x, torch.ones(2, 7, 64, device=device))
    assert_close(x.grad, gx)


def test_backward_hooks_fire_only_while_registered(device):
    """A backward hook fires only while it is registered (TransformerLens: removed hooks never fire): not
    after run_with_hooks returned (it warns, as TransformerLens does, unless reset_hooks_end=False), not
    after the hooks() context ended, not after handle.remove()."""
    b, _, _ = plain_bridge(device)
    x = randx(device).requires_grad_(True)
    calls = []

    def record(g, hook):
        calls.append(g.shape)

    with pytest.warns(UserWarning, match="bwd_hooks: removed when run_with_hooks returns"):
        out = b.run_with_hooks(x, bwd_hooks=[("hook_q", record)])
    assert no_hooks_left(b)
    out.sum().backward()
    assert calls == []

    out = b.run_with_hooks(x, bwd_hooks=[("hook_q", record)], reset_hooks_end=False)
    out.sum().backward()
    assert calls == [torch.Size([2, 7, 4, 16])]
    b.reset_hooks()

    calls.clear()
    with b.hooks(bwd_hooks=[("hook_q", record)]):
        out = b(x)
    out.sum().backward()
    assert calls == []

    (handle,) = b.add_hook("hook_q", record, dir="bwd")
    out = b(x)
    handle.remove()
    out.sum().backward()
    assert calls == []
    assert no_hooks_left(b)


# ----------------------------------------------------------------------------------------------------
# Conversion rules (SPEC §3b)


class HeadsFirst:
    """z as [B, H, S, Dh] instead of [B, S, H, Dh]."""

    def convert(self, t):
        B_, S_, _ = t.shape
        return t.view(B_, S_, H, -1).transpose(1, 2)

    def revert(self, t):
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


@pytest.mark.parametrize("rule", ["b s (h d) -> b h s d", HeadsFirst()], ids=["pattern", "object"])
def test_custom_conversion_rule(device, rule):
    w, bias, ow, ob = (
        torch.randn(64, 192, device=device) * 0.2,
        torch.randn(192, device=device) * 0.2,
        torch.randn(64, 64, device=device) * 0.2,
        torch.randn(64, device=device) * 0.2,
    )
    b = pyqkv.Bridge(w, bias, ow, ob, n_heads=4, d_head=16, hook_conversions={"o.hook_in": rule})
    oracle = Oracle(w, bias, ow, ob, n_heads=4, d_head=16)
    x = randx(device)
    shapes = []

    def ablate(t, hook):
        shapes.append(tuple(t.shape))
        t[:, 1] = 0  # head 1 in the heads-first format

    out = b.run_with_hooks(x, fwd_hooks=[("hook_z", ablate)])
    assert shapes == [(2, 4, 7, 16)]
    assert_close(out, oracle(x, edits={"hook_z": lambda z: z.index_fill(2, torch.tensor([1], device=z.device), 0)}))
    _, cache = b.run_with_cache(x, names_filter="hook_z")
    assert cache["hook_z"].shape == (2, 4, 7, 16)


def test_all_flag_combinations_but_one_are_allowed(device):
    """use_split_qkv_input and use_attn_in exclude each other (that row is in tests/test_bad_input.py); every
    other combination of the two can be set, in either order."""
    b, _, _ = plain_bridge(device)
    for a, c in itertools.product([False, True], repeat=2):
        if a and c:
            continue
        for first, second in (("use_split_qkv_input", "use_attn_in"), ("use_attn_in", "use_split_qkv_input")):
            b.cfg.use_split_qkv_input = b.cfg.use_attn_in = False
            setattr(b.cfg, first, a if first == "use_split_qkv_input" else c)
            setattr(b.cfg, second, a if second == "use_split_qkv_input" else c)
            assert (b.cfg.use_split_qkv_input, b.cfg.use_attn_in) == (a, c)


def test_hooks_are_called_as_transformer_lens_calls_them(device):
    """TransformerLens calls hook(tensor, hook=point): a hook whose `hook` argument is keyword-only works
    (forward and backward), and a standalone Bridge's point has no layer."""
    b, _, _ = plain_bridge(device)
    x = randx(device).requires_grad_(True)
    seen = {}

    def keyword_only(t, *, hook):
        seen[hook.name] = tuple(t.shape)

    with b.hooks(fwd_hooks=[("hook_z", keyword_only)], bwd_hooks=[("hook_q", keyword_only)]):
        b(x).sum().backward()
    assert set(seen) == {"hook_z", "hook_q"}
    with pytest.raises(ValueError, match=r"^hook_z: not a point inside a model's blocks"):
        b.hook_points()["hook_z"].layer()
    assert no_hooks_left(b)


def test_filter_that_selects_nothing_warns(device):
    b, _, _ = plain_bridge(device)
    with pytest.warns(UserWarning, match="selects no hook point"):
        b.run_with_cache(randx(device), names_filter=lambda name: name == "hook_nope")
    with pytest.warns(UserWarning, match="selects no hook point"):
        b.run_with_cache(randx(device), names_filter=["blocks.*"])


def test_run_with_cache_refuses_a_named_point_that_cannot_fire(device):
    """A names_filter entry naming a point that cannot fire on this layer or with these flags raises, naming
    what enables it (the bug class of 'hooks on gated points are accepted and silently never fire'); a glob
    or a predicate skips such points, and nothing is left registered."""
    b, _, _ = plain_bridge(device)  # no rotary embedding, use_attn_result off
    x = randx(device)
    with pytest.raises(ValueError, match=r"hook_result: this hook point does not fire: set use_attn_result first"):
        b.run_with_cache(x, names_filter=["hook_z", "hook_result"])
    with pytest.raises(ValueError, match=r"hook_rot_q: this hook point does not fire: this layer has no rotary"):
        b.run_with_cache(x, names_filter="hook_rot_q")
    assert no_hooks_left(b)
    _, cache = b.run_with_cache(x, names_filter=lambda n: n in ("hook_z", "hook_result"))
    assert set(cache) == {"hook_z"}
