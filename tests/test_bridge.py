"""Bridge: construction, split weights, forward against the float64 oracle and Hugging Face, masks, KV
cache, training mode, gradients (issue 3 acceptance criteria; SPEC §1, §3, §4, §5)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from test_bridge_oracle import (
    DH,
    Oracle,
    apply_pattern,
    causal_additive_mask,
    gpt2_attention,
    no_hooks_left,
)
from tolerance import assert_close, by_hand, differs, hf_reference

import pyqkv
from pyqkv import reference

D, H = 64, 4


def plain_bridge(
    device,
    *,
    H=4,
    Hkv=2,
    Dh=16,
    D=64,
    layout="blocked",
    conv1d=False,
    bias=True,
    out_bias=True,
    dtype=torch.float32,
    seed=3,
    **flags,
):
    """(bridge, oracle, split weights) from random split weights packed with the REFERENCE packer."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.3  # noqa: E731
    W_Q, W_K, W_V = r(H, D, Dh), r(Hkv, D, Dh), r(Hkv, D, Dh)
    b_Q, b_K, b_V = r(H, Dh), r(Hkv, Dh), r(Hkv, Dh)
    weight = reference.pack_qkv(W_Q, W_K, W_V, layout=layout, conv1d=conv1d)
    fused_bias = reference.pack_qkv_bias(b_Q, b_K, b_V, layout=layout) if bias else None
    W_O = r(H * Dh, D)  # conv1d orientation [H*Dh, D]
    b_O = r(D) if out_bias else None
    out_weight = W_O if conv1d else W_O.t().contiguous()
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    # The Bridge and its oracle get the same weights and layout; only the Bridge takes the flags.
    weights = (to(weight), to(fused_bias), to(out_weight), to(b_O))
    layout_kw = dict(n_heads=H, n_kv_heads=Hkv, d_head=Dh, layout=layout, conv1d=conv1d)
    bridge = pyqkv.Bridge(*weights, **layout_kw, **flags)
    oracle = Oracle(*weights, **layout_kw)
    split = dict(W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V, W_O=W_O.view(H, Dh, D), b_O=b_O)
    return bridge, oracle, {k: to(v) for k, v in split.items()}


def randx(device, B=2, S=7, D=64, dtype=torch.float32, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, D, generator=g).to(device=device, dtype=dtype)


def oracle_grad(oracle, x, loss, dtype=None):
    """dL/dx under the rule: L = loss(oracle's hook_out) through the oracle in float64 and in the Bridge's
    dtype (a Ref of gradients)."""

    def grad(dt):
        xr = x.detach().to(dt).requires_grad_(True)
        loss(oracle.run_in(dt, xr)["hook_out"]).backward()
        return xr.grad

    return by_hand(grad, oracle.dtype if dtype is None else dtype)


# ----------------------------------------------------------------------------------------------------
# Construction


def test_split_weights_follow_gpt2_rule(device):
    m = gpt2_attention(device)
    b = pyqkv.hf.bridge_from_module(m)
    W, bias = m.c_attn.weight, m.c_attn.bias
    assert b.W_Q.shape == (H, D, DH) and b.W_K.shape == (H, D, DH) and b.W_V.shape == (H, D, DH)
    assert b.W_O.shape == (H, DH, D)
    assert b.b_Q.shape == (H, DH) and b.b_K.shape == (H, DH) and b.b_V.shape == (H, DH) and b.b_O.shape == (D,)
    for h in range(H):
        cols = slice(h * DH, (h + 1) * DH)
        assert torch.equal(b.W_Q[h], W[:, cols])
        assert torch.equal(b.W_K[h], W[:, D + h * DH : D + (h + 1) * DH])
        assert torch.equal(b.W_V[h], W[:, 2 * D + h * DH : 2 * D + (h + 1) * DH])
        assert torch.equal(b.b_Q[h], bias[cols])
        assert torch.equal(b.b_K[h], bias[D + h * DH : D + (h + 1) * DH])
        assert torch.equal(b.b_V[h], bias[2 * D + h * DH : 2 * D + (h + 1) * DH])
        assert torch.equal(b.W_O[h], m.c_proj.weight[cols, :])
    assert torch.equal(b.b_O, m.c_proj.bias)


@pytest.mark.parametrize("name", ["W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O"])
def test_split_weights_are_editable_views(device, name):
    """Editing a split weight in place changes the layer exactly as editing that slice of the oracle's
    fused weights does (TransformerLens users patch weights this way)."""
    bridge, _, split = plain_bridge(device, layout="grouped", conv1d=False)
    x = randx(device)
    with torch.no_grad():
        getattr(bridge, name)[1].zero_()
        split[name][1].zero_()
        # The oracle, rebuilt from the edited split weights with the reference packer.
        weight = reference.pack_qkv(split["W_Q"], split["W_K"], split["W_V"], layout="blocked", conv1d=True)
        bias = reference.pack_qkv_bias(split["b_Q"], split["b_K"], split["b_V"], layout="blocked")
        oracle = Oracle(
            weight,
            bias,
            split["W_O"].reshape(-1, D),
            split["b_O"],
            n_heads=4,
            n_kv_heads=2,
            d_head=16,
            layout="blocked",
            conv1d=True,
        )
        assert_close(bridge(x), oracle(x), f"output after zeroing {name}[1]")


HF_OPTIONS = [
    pytest.param(dict(), 0, id="default"),
    pytest.param(dict(scale_attn_weights=False), 0, id="scale_attn_weights=False"),
    pytest.param(dict(scale_attn_by_inverse_layer_idx=True), 2, id="inverse_layer_idx"),
    pytest.param(
        dict(scale_attn_by_inverse_layer_idx=True, scale_attn_weights=False), 3, id="inverse_layer_idx-unscaled"
    ),
    pytest.param(dict(reorder_and_upcast_attn=True), 1, id="reorder_and_upcast"),
]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("options,layer_idx", HF_OPTIONS)
def test_bridge_from_module_equals_hf_module(device, impl, options, layer_idx):
    m = gpt2_attention(device, layer_idx=layer_idx, attn_implementation=impl, **options)
    b = pyqkv.hf.bridge_from_module(m)
    expected_scale = DH**-0.5 if options.get("scale_attn_weights", True) else 1.0
    if options.get("scale_attn_by_inverse_layer_idx"):
        expected_scale /= layer_idx + 1
    assert b.cfg.scale == pytest.approx(expected_scale, rel=1e-12)
    assert b.cfg.reorder_and_upcast_attn == options.get("reorder_and_upcast_attn", False)
    x = randx(device, S=9)
    # HF's reorder_and_upcast_attn computes the scores in float32 in any dtype: its mask stays float32.
    mask_dtype = (lambda dt: torch.float32) if options.get("reorder_and_upcast_attn") else (lambda dt: dt)
    with torch.no_grad():
        expected = hf_reference(
            m, lambda m, dt: m(x.to(dt), attention_mask=causal_additive_mask(9, dtype=mask_dtype(dt), device=device))[0]
        )
        out = b(x)
    assert_close(out, expected, "Bridge vs HF GPT2Attention")
    assert_close(out, Oracle.from_gpt2(m)(x), "Bridge vs the oracle")


def test_bridge_from_module_scale_attn_weights_false_is_not_scaled(device):
    """SPEC fix: scale_attn_weights=False means no 1/sqrt(Dh): the scores are the raw dot products."""
    m = gpt2_attention(device, scale_attn_weights=False)
    b = pyqkv.hf.bridge_from_module(m)
    x = randx(device, S=5)
    _, cache = b.run_with_cache(x, names_filter=["hook_q", "hook_k", "hook_attn_scores"])
    q, k = cache["hook_q"], cache["hook_k"]
    raw = by_hand(lambda dt: torch.einsum("bshd,bkhd->bhsk", q.to(dt), k.to(dt)), q.dtype)
    tri = torch.ones(5, 5, dtype=torch.bool, device=device).tril()
    assert_close(cache["hook_attn_scores"][..., tri], raw[..., tri], "unscaled scores")


def test_bridge_from_module_flags_and_cfg(device):
    """The fork flags given to bridge_from_module land in cfg and can be switched there (the refused
    combinations and values are rows of tests/test_bad_input.py)."""
    m = gpt2_attention(device)
    b = pyqkv.hf.bridge_from_module(m, use_split_qkv_input=True, use_attn_result=True)
    assert b.cfg.use_split_qkv_input and b.cfg.use_attn_result and not b.cfg.use_attn_in
    b.cfg.use_split_qkv_input = False
    b.cfg.use_attn_in = True
    assert b.cfg.use_attn_in and not b.cfg.use_split_qkv_input


LAYOUT_CASES = [
    pytest.param("blocked", True, 4, 4, id="blocked-conv1d-MHA"),
    pytest.param("blocked", True, 4, 1, id="blocked-conv1d-MQA"),
    pytest.param("blocked", False, 4, 2, id="blocked-linear-GQA"),
    pytest.param("blocked", False, 4, 1, id="blocked-linear-MQA"),
    pytest.param("interleaved", False, 4, 4, id="interleaved-linear"),
    pytest.param("interleaved", True, 4, 4, id="interleaved-conv1d"),
    pytest.param("grouped", False, 4, 2, id="grouped-linear-GQA"),
    pytest.param("grouped", False, 8, 2, id="grouped-linear-H8-Hkv2"),
    pytest.param("grouped", False, 4, 1, id="grouped-linear-MQA"),
    pytest.param("codegen", False, 8, 8, id="codegen-linear"),
]


@pytest.mark.parametrize("layout,conv1d,H_,Hkv", LAYOUT_CASES)
def test_plain_tensors_layouts(device, layout, conv1d, H_, Hkv):
    b, oracle, split = plain_bridge(device, H=H_, Hkv=Hkv, layout=layout, conv1d=conv1d)
    for name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O"):
        got = getattr(b, name)
        assert got.shape == split[name].shape, name
        assert torch.equal(got, split[name]), f"{name} differs from the weight that was packed"
    x = randx(device, S=9)
    with torch.no_grad():
        assert_close(b(x), oracle(x), f"{layout} forward")
        pad = torch.ones(2, 9, dtype=torch.long, device=device)
        pad[1, :3] = 0
        assert_close(b(x, attention_mask=pad), oracle(x, mask=pad), f"{layout} forward, padded")


def test_plain_tensors_without_biases(device):
    b, oracle, split = plain_bridge(device, bias=False, out_bias=False)
    assert b.qkv_bias is None and b.out_bias is None
    assert torch.count_nonzero(b.b_Q) == 0 and torch.count_nonzero(b.b_O) == 0
    x = randx(device)
    assert_close(b(x), oracle(x))


def test_bridge_shares_weights_but_holds_no_reference_to_module(device):
    """bridge_from_module keeps no second copy: the Bridge's parameters are the module's own (an edit of
    either is an edit of the layer), and it keeps no reference to the module itself."""
    m = gpt2_attention(device)
    b = pyqkv.hf.bridge_from_module(m)
    assert b.qkv_weight is m.c_attn.weight and b.out_weight is m.c_proj.weight
    x = randx(device)
    before = b(x).detach()
    with torch.no_grad():
        m.c_attn.weight[:, :16].mul_(2.0)
    assert not torch.equal(b(x).detach(), before), "editing the HF module did not change the Bridge"
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None, "the Bridge keeps the HF module alive"


def test_deepcopy_is_independent(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device)
    b2 = copy.deepcopy(b)
    assert torch.equal(b2(x), b(x))
    with torch.no_grad():
        b2.out_bias.add_(1.0)
    b2.cfg.use_attn_result = True
    assert not b.cfg.use_attn_result
    calls = []
    b2.add_hook("hook_z", lambda t, hook: calls.append(hook.name))
    assert_close(b(x), oracle(x), "original after editing the copy")
    assert calls == [] and no_hooks_left(b)
    b2(x)
    assert calls == ["hook_z"]


def test_state_dict_round_trip(device):
    src, oracle, _ = plain_bridge(device, seed=3)
    fresh, _, _ = plain_bridge(device, seed=4)
    x = randx(device)
    assert not torch.equal(fresh(x), src(x))
    sd = src.state_dict()
    assert set(sd) == {"qkv_weight", "qkv_bias", "out_weight", "out_bias"}
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), src(x))
    assert_close(fresh(x), oracle(x))


def test_state_dict_round_trip_from_hf(device):
    src = pyqkv.hf.bridge_from_module(gpt2_attention(device, seed=1))
    fresh = pyqkv.hf.bridge_from_module(gpt2_attention(device, seed=2))
    fresh.load_state_dict(src.state_dict())
    x = randx(device)
    assert torch.equal(fresh(x), src(x))


# ----------------------------------------------------------------------------------------------------
# Forward: masks


def test_no_mask_is_causal(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device, S=9)
    out = b(x)
    assert_close(out, oracle(x))
    x2 = x.clone()
    x2[:, -1] += 1.0
    out2 = b(x2)
    assert torch.equal(out2[:, :-1], out[:, :-1]), "a later position changed an earlier output"


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.float32])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_2d(device, mask_dtype, side):
    b, oracle, split = plain_bridge(device)
    x = randx(device, B=3, S=8)
    pad = torch.ones(3, 8, dtype=torch.long, device=device)
    if side == "left":
        pad[1, :3] = 0
        pad[2, :7] = 0
    else:
        pad[1, 5:] = 0
        pad[2, 1:] = 0
    mask = pad.to(mask_dtype)
    with torch.no_grad():
        out = b(x, attention_mask=mask)  # fast path: no hooks
    assert torch.isfinite(out).all()
    assert_close(out, oracle(x, mask=pad), "padded forward")
    out2, cache = b.run_with_cache(x, attention_mask=mask)  # every point hooked: the split path
    for name, t in cache.items():
        assert not torch.isnan(t).any(), f"NaN in {name}"
    assert_close(out2, oracle(x, mask=pad), "padded forward, hooked")
    if side == "left":
        # a left-pad query sees no key at all: all-zero pattern row, zero z row, output = b_O
        for bi, n_pad in ((1, 3), (2, 7)):
            assert torch.count_nonzero(cache["hook_pattern"][bi, :, :n_pad]) == 0
            assert torch.count_nonzero(cache["hook_z"][bi, :n_pad]) == 0
            assert torch.equal(out[bi, :n_pad], split["b_O"].expand(n_pad, -1))
    exp = oracle.run(x, mask=pad)
    assert_close(cache["hook_pattern"], exp["hook_pattern"], "pattern")


def test_padding_mask_masks_keys_not_adds(device):
    """SPEC fix: a {0,1} 2-D mask masks keys (it is not added to the scores)."""
    b, oracle, _ = plain_bridge(device)
    x = randx(device, B=1, S=6)
    pad = torch.tensor([[1, 0, 1, 0, 1, 1]], device=device)
    _, cache = b.run_with_cache(x, attention_mask=pad, names_filter="hook_pattern")
    assert torch.count_nonzero(cache["hook_pattern"][..., [1, 3]]) == 0
    assert_close(cache["hook_pattern"], oracle.run(x, mask=pad)["hook_pattern"])


def test_fully_padded_sequence_gives_no_nan(device):
    b, _, split = plain_bridge(device)
    x = randx(device, B=2, S=5)
    pad = torch.ones(2, 5, dtype=torch.bool, device=device)
    pad[0] = False
    for hooked in (False, True):
        if hooked:
            out, cache = b.run_with_cache(x, attention_mask=pad)
            assert all(not torch.isnan(t).any() for t in cache.values())
        else:
            out = b(x, attention_mask=pad)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], split["b_O"].expand(5, -1))


@pytest.mark.parametrize("batch_dim", [1, 2])
def test_4d_all_zero_additive_mask_is_not_causal(device, batch_dim):
    """A 4-D mask is authoritative: all zeros means every query sees every key (no causal added)."""
    b, oracle, _ = plain_bridge(device)
    x = randx(device, S=7)
    mask = torch.zeros(batch_dim, 1, 7, 7, device=device)
    out = b(x, attention_mask=mask)
    assert_close(out, oracle(x, causal=False), "non-causal via 4-D zeros")
    assert differs(out, oracle(x)), "the result is still causal"
    # hooked (split) path agrees
    out2, cache = b.run_with_cache(x, attention_mask=mask, names_filter="hook_attn_scores")
    assert_close(out2, oracle(x, causal=False), "non-causal via 4-D zeros, scores hooked")


def test_4d_per_head_additive_bias(device):
    """Finite values of an additive mask are added to the scores (ALiBi-like biases), per head."""
    b, oracle, _ = plain_bridge(device)
    x = randx(device, S=6)
    mask = torch.randn(2, H, 6, 6, device=device)
    mask = mask.masked_fill(torch.ones(6, 6, dtype=torch.bool, device=device).triu(1), torch.finfo(torch.float32).min)
    exp = oracle.run(x, mask=mask, causal=False)
    assert_close(b(x, attention_mask=mask), exp["hook_out"], "additive bias")
    out, cache = b.run_with_cache(x, attention_mask=mask, names_filter=["hook_attn_scores", "hook_pattern"])
    assert_close(out, exp["hook_out"], "additive bias, hooked")
    assert_close(cache["hook_pattern"], exp["hook_pattern"], "pattern with additive bias")


def test_4d_hf_causal_mask_equals_default(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device, S=7)
    assert_close(b(x, attention_mask=causal_additive_mask(7, device=device)), oracle(x))


def test_4d_bool_mask(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device, S=6)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 1, 6, 6, generator=g) > 0.4).to(device)
    mask[..., 0, :] = False  # one fully hidden query row
    exp = oracle.run(x, mask=mask, causal=False)
    out = b(x, attention_mask=mask)
    assert torch.isfinite(out).all()
    assert_close(out, exp["hook_out"], "bool 4-D mask")
    out2, cache = b.run_with_cache(x, attention_mask=mask)
    assert_close(cache["hook_pattern"], exp["hook_pattern"], "bool 4-D mask pattern")
    assert torch.count_nonzero(cache["hook_z"][:, 0]) == 0


def test_non_contiguous_input(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device, S=8).transpose(0, 1).contiguous().transpose(0, 1)
    assert not x.is_contiguous()
    assert_close(b(x), oracle(x))


def test_bfloat16_forward(device):
    b, oracle, _ = plain_bridge(device, dtype=torch.bfloat16)
    x = randx(device, dtype=torch.bfloat16)
    out = b(x)
    assert out.dtype == torch.bfloat16
    assert_close(out, oracle(x), "bfloat16 forward")


# ----------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("kind", ["gpt2", "gqa", "mqa"])
@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_incremental_equals_full(device, kind, padded):
    if kind == "gpt2":
        m = gpt2_attention(device)
        b, oracle = pyqkv.hf.bridge_from_module(m), Oracle.from_gpt2(m)
    else:
        b, oracle, _ = plain_bridge(device, Hkv=2 if kind == "gqa" else 1)
    x = randx(device, S=12)
    pad = torch.ones(2, 12, dtype=torch.long, device=device)
    if padded:
        pad[1, :4] = 0
    full_exp = oracle.run(x, mask=pad if padded else None)
    with torch.no_grad():
        full = b(x, attention_mask=pad if padded else None)
        cache = pyqkv.KVCache()
        outs, pos = [], 0
        for n in (5, 3, 1, 1, 1, 1):
            mask = pad[:, : pos + n] if padded else None
            outs.append(b(x[:, pos : pos + n], attention_mask=mask, kv_cache=cache))
            pos += n
            assert cache.length == pos
    inc = torch.cat(outs, 1)
    assert_close(inc, full_exp["hook_out"], "incremental vs oracle")
    assert_close(full, full_exp["hook_out"], "full-sequence Bridge vs oracle")
    assert_close(cache.keys, full_exp["hook_k"], "cached keys")
    assert_close(cache.values, full_exp["hook_v"], "cached values")
    assert cache.keys.shape == (2, 12, oracle.Hkv, 16)


def test_kv_cache_with_grad_enabled(device):
    """Outside no_grad (weights require grad) the cached path must give the same result and gradients
    that reach this call's inputs."""
    b, oracle, _ = plain_bridge(device)
    x = randx(device, S=6)
    cache = pyqkv.KVCache()
    o1 = b(x[:, :4], kv_cache=cache)
    x2 = x[:, 4:].clone().requires_grad_(True)
    o2 = b(x2, kv_cache=cache)
    assert_close(torch.cat([o1, o2], 1), oracle(x), "cached with grad")
    o2.sum().backward()
    assert x2.grad is not None and torch.isfinite(x2.grad).all()
    assert_close(x2.grad, oracle_grad(oracle, x, lambda out: out[:, 4:].sum())[:, 4:], "dL/dx of the new positions")


def test_kv_cache_grows_by_doubling_in_place(device, monkeypatch):
    b, oracle, _ = plain_bridge(device)
    x = randx(device, S=10)
    cache = pyqkv.KVCache(capacity=2)
    caps, ptrs = [], []
    appended = []
    real = pyqkv.ops.kv_append
    monkeypatch.setattr(pyqkv.ops, "kv_append", lambda *a: (appended.append(a[-1]), real(*a))[1])
    with torch.no_grad():
        outs = []
        for i in range(10):
            prefix = None if cache.length == 0 else cache.k_storage[:, :, : cache.length].clone()
            old_ptr = None if cache.k_storage is None else cache.k_storage.data_ptr()
            outs.append(b(x[:, i : i + 1], kv_cache=cache))
            caps.append(cache.capacity)
            ptrs.append(cache.k_storage.data_ptr())
            if prefix is not None:
                assert torch.equal(cache.k_storage[:, :, : prefix.shape[2]], prefix), "earlier rows changed"
                if caps[-1] == caps[-2]:
                    assert ptrs[-1] == old_ptr, "storage reallocated although not full"
    assert caps == [2, 2, 4, 4, 8, 8, 8, 8, 16, 16]
    assert appended == list(range(10)), "kv_append must write each step at the current length"
    assert cache.k_storage.shape == (2, 2, 16, 16) and cache.v_storage.shape == (2, 2, 16, 16)
    assert_close(torch.cat(outs, 1), oracle(x))


def test_kv_cache_default_capacity_and_big_append(device):
    b, _, _ = plain_bridge(device)
    cache = pyqkv.KVCache()
    with torch.no_grad():
        b(randx(device, S=3), kv_cache=cache)
        first = cache.capacity
        assert first >= 3
        b(randx(device, S=first), kv_cache=cache)  # overflows: at least doubles, at least what is needed
    assert cache.capacity >= max(2 * first, first + 3)
    assert cache.length == first + 3


def test_kv_cache_ignores_garbage_beyond_length(device):
    """Slots beyond the valid length may hold anything (NaN here): results must not change."""
    b, oracle, _ = plain_bridge(device)
    x = randx(device, S=9)
    exp = oracle.run(x)
    for hook in (None, "hook_pattern", "hook_attn_scores"):
        cache = pyqkv.KVCache(capacity=32)
        with torch.no_grad():
            o1 = b(x[:, :5], kv_cache=cache)
            cache.k_storage[:, :, cache.length :] = float("nan")
            cache.v_storage[:, :, cache.length :] = float("nan")
            fwd = [] if hook is None else [(hook, lambda t, hook: None)]
            o2 = b.run_with_hooks(x[:, 5:], fwd_hooks=fwd, kv_cache=cache)
        assert_close(torch.cat([o1, o2], 1), exp["hook_out"], f"NaN beyond length, hook={hook}")


@pytest.mark.parametrize("capacity", [4, 16], ids=["regrow", "in-place"])
@pytest.mark.parametrize(
    "first,second", [("inference", "no_grad"), ("no_grad", "inference"), ("inference", "inference")]
)
def test_kv_cache_across_inference_mode(device, first, second, capacity):
    """A cache filled under torch.inference_mode keeps working outside it (and the other way round)."""
    b, oracle, _ = plain_bridge(device)
    x = randx(device, S=8)
    mode = {"inference": torch.inference_mode, "no_grad": torch.no_grad}
    cache = pyqkv.KVCache(capacity=capacity)
    with mode[first]():
        o1 = b(x[:, :3], kv_cache=cache)
    with mode[second]():
        o2 = b(x[:, 3:], kv_cache=cache)
    with torch.no_grad():
        o3 = b(x[:, :1], kv_cache=pyqkv.KVCache())
    assert_close(torch.cat([o1, o2], 1), oracle(x), f"{first} then {second}")
    assert_close(o3, oracle(x[:, :1]))


def test_pattern_edit_under_inference_mode(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device)

    def uniform_head0(t, hook):
        t[:, 0] = torch.ones_like(t[:, 0]).tril() / torch.arange(1, 8, device=t.device).view(7, 1)

    exp = oracle(
        x,
        edits={
            "hook_pattern": lambda p: torch.cat(
                [(torch.ones_like(p[:, :1]).tril() / torch.arange(1, 8, device=p.device).view(7, 1)), p[:, 1:]], 1
            )
        },
    )
    with torch.inference_mode():
        out = b.run_with_hooks(x, fwd_hooks=[("hook_pattern", uniform_head0)])
    assert_close(out, exp, "in-place pattern edit under inference_mode")


def test_kv_cache_reset_and_load(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device, S=6)
    exp = oracle.run(x)
    cache = pyqkv.KVCache()
    with torch.no_grad():
        b(randx(device, S=3, seed=9), kv_cache=cache)
        cache.reset()
        assert len(cache) == 0
        o1 = b(x[:, :4], kv_cache=cache)
        loaded = pyqkv.KVCache()
        loaded.load(cache.keys.clone(), cache.values.clone())
        o2 = b(x[:, 4:], kv_cache=loaded)
    assert_close(torch.cat([o1, o2], 1), exp["hook_out"])


# ----------------------------------------------------------------------------------------------------
# Training mode


def test_train_mode_dropout(device):
    m = gpt2_attention(device, attn_pdrop=0.3, resid_pdrop=0.2)
    b = pyqkv.hf.bridge_from_module(m)
    assert not b.training, "bridge_from_module must follow the module's eval() mode"
    x = randx(device, S=8)
    oracle = Oracle.from_gpt2(m)
    exp = oracle.run(x)
    assert_close(b(x), exp["hook_out"], "eval: no dropout")
    b.train()
    torch.manual_seed(123)
    o1 = b(x)
    torch.manual_seed(123)
    o2 = b(x)
    assert torch.equal(o1, o2), "train mode not reproducible with a fixed seed"
    assert differs(o1, exp["hook_out"]), "train output equals eval output"
    # Structure: dropout on the pattern (before hook_pattern) and on the projected output.
    torch.manual_seed(7)
    out, cache = b.run_with_cache(x, names_filter=["hook_pattern", "hook_z", "hook_v"])
    pat, z, v = cache["hook_pattern"], cache["hook_z"], cache["hook_v"]
    kept = pat != 0
    assert 0 < kept.sum() < (exp["hook_pattern"].hi != 0).sum(), "hook_pattern did not see a dropped-out pattern"
    assert_close(
        pat[kept], exp["hook_pattern"].map(lambda p: p / (1 - 0.3))[kept], "kept pattern entries scaled by 1/(1-p)"
    )
    assert_close(z, by_hand(lambda dt: apply_pattern(pat.to(dt), v.to(dt)), z.dtype), "z from the dropped pattern")
    y = by_hand(lambda dt: torch.einsum("bshe,hed->bsd", z.to(dt), oracle.W_O.to(dt)) + oracle.b_O.to(dt), z.dtype)
    dropped = out == 0
    assert dropped.any() and not dropped.all(), "no output dropout"
    assert_close(out[~dropped], y.map(lambda t: t / (1 - 0.2))[~dropped], "output dropout after the projection")


def test_train_mode_matches_hf_with_same_seed(device):
    """HF draws the same two dropout masks (pattern, then output): same seed, same result."""
    m = gpt2_attention(device, attn_pdrop=0.3, resid_pdrop=0.2)
    b = pyqkv.hf.bridge_from_module(m).train()
    m.train()
    x = randx(device, S=8)

    def hf_train(m, dt):
        torch.manual_seed(11)
        return m(x.to(dt), attention_mask=causal_additive_mask(8, dtype=dt, device=device))[0]

    expected = hf_reference(m, hf_train)  # the same dropout masks in float32 and float64 (same draws)
    torch.manual_seed(11)
    out = b(x)
    assert_close(out, expected, "train mode vs HF, same seed")


def test_train_mode_p0_equals_eval(device):
    m = gpt2_attention(device, attn_pdrop=0.0, resid_pdrop=0.0)
    b = pyqkv.hf.bridge_from_module(m)
    x = randx(device)
    ev = b(x)
    b.train()
    assert torch.equal(b(x), ev)


# ----------------------------------------------------------------------------------------------------
# Gradients


def _tiny_bridge(device, **flags):
    torch.manual_seed(0)
    Dm, Hq, Hkv, Dh = 6, 2, 1, 3
    return pyqkv.Bridge(
        torch.randn(Dm, (Hq + 2 * Hkv) * Dh, dtype=torch.float64, device=device) * 0.5,
        torch.randn((Hq + 2 * Hkv) * Dh, dtype=torch.float64, device=device) * 0.5,
        torch.randn(Hq * Dh, Dm, dtype=torch.float64, device=device) * 0.5,
        torch.randn(Dm, dtype=torch.float64, device=device) * 0.5,
        n_heads=Hq,
        n_kv_heads=Hkv,
        d_head=Dh,
        **flags,
    )


GRAD_PATHS = [
    pytest.param({}, [], None, id="fused"),
    pytest.param({}, [], "padded", id="fused-padded"),
    pytest.param({}, [("hook_pattern", lambda t, hook: None)], None, id="pattern-readonly"),
    pytest.param({}, [("hook_pattern", lambda t, hook: t * 0.5)], "padded", id="pattern-edited"),
    pytest.param({}, [("hook_attn_scores", lambda t, hook: None)], "padded", id="scores"),
    pytest.param(dict(use_split_qkv_input=True), [("hook_k_input", lambda t, hook: None)], None, id="split-qkv"),
    pytest.param(dict(use_attn_in=True), [("hook_attn_in", lambda t, hook: None)], None, id="attn-in"),
    pytest.param(dict(use_attn_result=True), [("hook_result", lambda t, hook: None)], None, id="attn-result"),
]


@pytest.mark.parametrize("flags,fwd_hooks,mask", GRAD_PATHS)
def test_gradcheck(device, flags, fwd_hooks, mask):
    b = _tiny_bridge(device, **flags)
    x = torch.randn(2, 4, 6, dtype=torch.float64, device=device, requires_grad=True)
    am = None
    if mask == "padded":
        am = torch.ones(2, 4, dtype=torch.long, device=device)
        am[1, :2] = 0
    names = [n for n, _ in b.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in b.named_parameters())

    def f(x, *ps):
        with b.hooks(fwd_hooks=fwd_hooks):
            return torch.func.functional_call(b, dict(zip(names, ps)), (x,), {"attention_mask": am})

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)
    assert no_hooks_left(b)


def test_gradients_match_oracle(device):
    b, oracle, _ = plain_bridge(device)
    x = randx(device, S=6).requires_grad_(True)
    w = torch.randn(2, 6, 64, device=device)
    (b(x) * w).sum().backward()
    assert_close(x.grad, oracle_grad(oracle, x, lambda out: (out * w.to(out.dtype)).sum()), "dL/dx")
    assert b.qkv_weight.grad is not None and b.out_weight.grad is not None


def test_kv_cache_under_gradcheck(device):
    """Gradients of a cached step wrt its own input (the cache holds earlier positions as constants)."""
    b = _tiny_bridge(device)
    x = torch.randn(1, 5, 6, dtype=torch.float64, device=device)

    def f(x2):
        cache = pyqkv.KVCache()
        with torch.no_grad():
            b(x[:, :3], kv_cache=cache)
        return b(x2, kv_cache=cache)

    assert torch.autograd.gradcheck(f, (x[:, 3:].clone().requires_grad_(True),), eps=1e-6, atol=1e-6, fast_mode=True)
