"""Positions in the Bridge: rotary embeddings (rotate-half, partial, rotate-every-two) and ALiBi, against
the float64 oracle of test_bridge_oracle (RoPE and the bias written out there by hand), with the KV cache,
padding, the hook points hook_rot_q / hook_rot_k, every attention path, and bad input. Hugging Face's own
formulas (NeoX/CodeGen rotary tables, Bloom's alibi) are checked where transformers is installed."""

from __future__ import annotations

import pytest
import torch
from test_bridge_oracle import Oracle, no_hooks_left
from tolerance import assert_close, assert_close_by_rule

import pyqkv
from pyqkv.positions import alibi_bias, alibi_slopes, rotary_tables

D, H, DH = 64, 4, 16


def make(device, *, n_kv_heads=H, layout="blocked", seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    n_out = (H + 2 * n_kv_heads) * DH
    w = (torch.randn(D, n_out, generator=g) * 0.3).to(device)
    b = (torch.randn(n_out, generator=g) * 0.1).to(device)
    ow = (torch.randn(H * DH, D, generator=g) * 0.2).to(device)
    ob = (torch.randn(D, generator=g) * 0.1).to(device)
    bridge = pyqkv.Bridge(w, b, ow, ob, n_heads=H, n_kv_heads=n_kv_heads, d_head=DH, layout=layout, **kw).eval()
    oracle = Oracle(w, b, ow, ob, n_heads=H, n_kv_heads=n_kv_heads, d_head=DH, layout=layout)
    return bridge, oracle


def tables(positions, R, interleaved, base=10000.0):
    """cos/sin in float64 from integer positions, written out (not via pyqkv.positions.rotary_tables)."""
    i = torch.arange(R // 2, dtype=torch.float64, device=positions.device)
    angle = positions.double()[..., None] * base ** (-2 * i / R)
    angle = angle.repeat_interleave(2, -1) if interleaved else torch.cat([angle, angle], -1)
    return angle.cos(), angle.sin()


def alibi_by_hand(K, device):
    """Bloom's per-key bias [1, H, K] for positions 0 .. K-1: slope_h * j (the slopes are pyqkv's, checked
    against Bloom's in test_alibi_slopes_and_bias_match_bloom)."""
    return alibi_slopes(H, device=device).view(1, H, 1) * torch.arange(K, device=device).view(1, 1, K)


ROTARY = [  # (rotary_dim, interleaved, n_kv_heads)
    pytest.param(DH, False, H, id="full-half"),
    pytest.param(DH // 2, False, 2, id="partial-half-gqa"),
    pytest.param(DH // 2, True, H, id="partial-every-two"),
    pytest.param(DH, True, 1, id="full-every-two-mqa"),
]


# ----------------------------------------------------------------------------------------------------
# Rotary


@pytest.mark.parametrize("R, interleaved, Hkv", ROTARY)
def test_rotary_bridge_equals_oracle(device, R, interleaved, Hkv):
    bridge, oracle = make(device, n_kv_heads=Hkv, rotary_dim=R, rotary_interleaved=interleaved)
    x = torch.randn(2, 9, D, device=device)
    pos = torch.arange(9, device=device)[None]
    acts = oracle.run(x, rotary=(*tables(pos, R, interleaved), interleaved))
    names = ["hook_q", "hook_k", "hook_rot_q", "hook_rot_k", "hook_pattern", "hook_z", "hook_out"]
    out, cache = bridge.run_with_cache(x, names_filter=names)
    for name in names:
        assert_close(cache[name], acts[name], name)
    assert_close(out, acts["hook_out"], "output")
    assert cache["hook_rot_k"].shape == (2, 9, Hkv, DH)


def test_rotary_hook_points_fire_in_order_and_edits_count(device):
    bridge, oracle = make(device, rotary_dim=8)
    x = torch.randn(2, 6, D, device=device)
    order = []
    bridge.add_hook(lambda n: True, lambda t, hook: order.append(hook.name))
    with torch.no_grad():
        bridge(x)
    bridge.reset_hooks()
    assert order == [
        "hook_in",
        "hook_q",
        "hook_k",
        "hook_v",
        "hook_rot_q",
        "hook_rot_k",
        "hook_attn_scores",
        "hook_pattern",
        "hook_z",
        "hook_out",
    ]

    def zero_head(t, hook):
        t[:, :, 1] = 0  # in place, after RoPE

    cos, sin = tables(torch.arange(6, device=device)[None], 8, False)
    want = oracle(
        x,
        rotary=(cos, sin, False),
        edits={"hook_rot_k": lambda t: t.index_fill(2, torch.tensor([1], device=device), 0.0)},
    )
    kv = pyqkv.KVCache()
    with torch.no_grad():
        got = bridge.run_with_hooks(x, kv_cache=kv, fwd_hooks=[("hook_rot_k", zero_head)])
    assert_close(got, want, "zeroed rotated key head")
    assert torch.all(kv.keys[:, :, 1] == 0), "the cache must hold the keys as hook_rot_k left them"
    assert no_hooks_left(bridge)


@pytest.mark.parametrize("R, interleaved, Hkv", ROTARY)
def test_rotary_decode_with_cache_equals_full_forward(device, R, interleaved, Hkv):
    """Positions continue from the cached length: prefill then single steps equal one full call."""
    bridge, oracle = make(device, n_kv_heads=Hkv, rotary_dim=R, rotary_interleaved=interleaved)
    x = torch.randn(2, 12, D, device=device)
    kv = pyqkv.KVCache(capacity=4)  # grows twice
    with torch.no_grad():
        full = bridge(x)
        parts = [bridge(x[:, :7], kv_cache=kv)] + [bridge(x[:, t : t + 1], kv_cache=kv) for t in range(7, 12)]
    assert kv.length == 12
    want = oracle(x, rotary=(*tables(torch.arange(12, device=device)[None], R, interleaved), interleaved))
    assert_close(full, want, "one call")
    assert_close(torch.cat(parts, 1), want, "prefill + decode: positions continue from the cached length")


def test_rotary_left_padding_with_position_ids(device):
    """A left-padded row with position_ids counted over its tokens gives the unpadded row's outputs."""
    bridge, oracle = make(device, rotary_dim=DH)
    x = torch.randn(1, 6, D, device=device)
    padded = torch.cat([torch.randn(1, 3, D, device=device), x], 1)
    pad = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]], device=device)
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        unpadded = bridge(x)
        got = bridge(padded, attention_mask=pad, position_ids=pos)
        shifted = bridge(padded, attention_mask=pad)  # default positions 0..8: RoPE is relative, same result
    want = oracle(x, rotary=(*tables(torch.arange(6, device=device)[None], DH, False), False))
    assert_close(unpadded, want, "unpadded")
    assert_close(got[:, 3:], want, "left-padded with position_ids")
    assert_close(shifted[:, 3:], want, "left-padded, default positions")
    assert torch.all(got[:, :3] == got[:, :3]), "no NaN in the padded rows"


def test_rotary_position_embeddings_given_are_used(device):
    bridge, oracle = make(device, rotary_dim=DH)
    x = torch.randn(2, 5, D, device=device)
    pos = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]], device=device)
    cos, sin = tables(pos, DH, False, base=500.0)  # not the Bridge's base: only the given tables can match
    with torch.no_grad():
        got = bridge(x, position_embeddings=(cos.float(), sin.float()))
        two_d = bridge(x[:1], position_embeddings=(cos[0].float(), sin[0].float()))
    assert_close(got, oracle(x, rotary=(cos, sin, False)), "given cos/sin")
    assert_close(two_d, oracle(x[:1], rotary=(cos[:1], sin[:1], False)), "[S, R] tables")


def test_rotary_tables_match_hugging_face():
    tr = pytest.importorskip("transformers")
    from transformers.models.codegen.modeling_codegen import create_sinusoidal_positions
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

    cfg = tr.GPTNeoXConfig(
        hidden_size=64,
        num_attention_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )
    pos = torch.tensor([[0, 1, 2, 7, 40], [5, 6, 7, 8, 9]])
    hf_cos, hf_sin = GPTNeoXRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), position_ids=pos)
    cos, sin = rotary_tables(pos, 8, 10000.0)
    cos64, sin64 = tables(pos, 8, False)  # ref_hi; Hugging Face's float32 tables are ref_lo
    assert_close_by_rule(cos, cos64, hf_cos, what="NeoX cos")
    assert_close_by_rule(sin, sin64, hf_sin, what="NeoX sin")
    table = create_sinusoidal_positions(64, 8)  # CodeGen: [sin | cos] halves per position
    sin_cg, cos_cg = table[pos].split(4, -1)
    cos, sin = rotary_tables(pos, 8, 10000.0, interleaved=True)
    assert torch.equal(cos, cos_cg.repeat_interleave(2, -1)) and torch.equal(sin, sin_cg.repeat_interleave(2, -1))


def test_rotary_gradients_and_backward_hooks(device):
    bridge, _ = make(device, rotary_dim=8, rotary_interleaved=True)
    x = torch.randn(2, 5, D, device=device, requires_grad=True)
    seen = []
    with bridge.hooks(bwd_hooks=[("hook_rot_q", lambda g, hook: seen.append(tuple(g.shape)))]):
        bridge(x).square().sum().backward()
    assert seen == [(2, 5, H, DH)]
    assert x.grad is not None and bridge.qkv_weight.grad is not None and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------------------
# ALiBi


def test_alibi_slopes_and_bias_match_bloom():
    pytest.importorskip("transformers")
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for n in (1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 32):
        pad = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
        hf = build_alibi_tensor(pad, n, torch.float32).view(2, n, 6)
        ours = alibi_bias(alibi_slopes(n), 6, padding_mask=pad)
        assert torch.equal(ours, hf), f"{n} heads"


@pytest.mark.parametrize("Hkv", [H, 1])
def test_alibi_bridge_equals_oracle_on_every_path(device, Hkv):
    """Fused op, pattern hook, scores hook (split form): the same bias, the same answer."""
    bridge, oracle = make(device, n_kv_heads=Hkv, alibi=True)
    x = torch.randn(2, 8, D, device=device)
    acts = oracle.run(x, alibi=alibi_by_hand(8, device))
    with torch.no_grad():
        fused = bridge(x)
        _, cache = bridge.run_with_cache(x, names_filter=["hook_pattern"])
        scored, scache = bridge.run_with_cache(x, names_filter=["hook_attn_scores"])
    assert_close(fused, acts["hook_out"], "fused")
    assert_close(cache["hook_pattern"], acts["hook_pattern"], "pattern")
    assert_close(scored, acts["hook_out"], "split form")
    visible = acts["hook_attn_scores"].hi > -1e30
    assert_close(scache["hook_attn_scores"][visible], acts["hook_attn_scores"][visible], "scores")


def test_alibi_given_tensor_forms_and_padding(device):
    bridge, oracle = make(device, alibi=True)
    x = torch.randn(2, 6, D, device=device)
    custom = torch.randn(2, H, 6, device=device)
    with torch.no_grad():
        a = bridge(x, alibi=custom)
        b = bridge(x, alibi=custom.reshape(2 * H, 1, 6))  # Hugging Face's [B*H, 1, K]
        c = bridge(x, alibi=custom[:, :, None, :])  # [B, H, 1, K]
    assert_close(a, oracle(x, alibi=custom), "given alibi")
    assert torch.equal(a, b) and torch.equal(a, c)
    # Positions counted over the padding mask: a left-padded row equals the unpadded one.
    row = torch.randn(1, 5, D, device=device)
    padded = torch.cat([torch.randn(1, 2, D, device=device), row], 1)
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1]], device=device)
    want = oracle(row, alibi=alibi_by_hand(5, device))
    with torch.no_grad():
        assert_close(bridge(row), want, "unpadded alibi row")
        assert_close(bridge(padded, attention_mask=pad)[:, 2:], want, "left-padded alibi row")


def test_alibi_decode_with_cache_equals_full_forward(device):
    bridge, oracle = make(device, alibi=True, n_kv_heads=2)
    x = torch.randn(2, 10, D, device=device)
    kv = pyqkv.KVCache(capacity=3)
    with torch.no_grad():
        full = bridge(x)
        parts = [bridge(x[:, :4], kv_cache=kv)] + [bridge(x[:, t : t + 1], kv_cache=kv) for t in range(4, 10)]
    want = oracle(x, alibi=alibi_by_hand(10, device))
    assert_close(full, want, "one call")
    assert_close(torch.cat(parts, 1), want, "prefill + decode")


def test_alibi_and_rotary_under_torch_compile(device):
    """One graph (fullgraph) with both position schemes at once, equal to eager, with a cache."""
    bridge, oracle = make(device, alibi=True, rotary_dim=8)
    x = torch.randn(2, 7, D, device=device)
    want = oracle(
        x, alibi=alibi_by_hand(7, device), rotary=(*tables(torch.arange(7, device=device)[None], 8, False), False)
    )
    torch._dynamo.reset()  # Bridge.forward's compile cache is per code object: other tests' graphs must not count
    try:
        compiled = torch.compile(bridge, fullgraph=True)
        with torch.no_grad():
            assert_close(bridge(x), want, "eager")
            assert_close(compiled(x), want, "compiled")
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------
# Gating (bad position arguments and configurations are rows of tests/test_bad_input.py)


def test_rotary_points_are_skipped_without_rotary(device):
    """run_with_cache leaves the rotary points out on a layer without rotary (naming one is an error: a row
    of tests/test_bad_input.py)."""
    bridge, _ = make(device)
    _, cache = bridge.run_with_cache(torch.randn(1, 3, D, device=device))
    assert "hook_rot_q" not in cache and "hook_rot_k" not in cache
