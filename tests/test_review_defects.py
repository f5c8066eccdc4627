"""Issue 21 (code review), items 4, 6, 7 and 9: the behaviours that are not malformed-input rows of
tests/test_bad_input.py's table (those rows are there: the float 2-D masks, the integer arguments).

- item 4: a 2-D float mask is a padding mask only when it holds 0 and 1 alone; the Bridge's pre-check and
  the op reach the same verdict from one rule (the C++ check_padding_mask).
- item 6: KVCache.reset() forgets the batch and head shape, dtype and device (its error message says so).
- item 7: one integer rule (pyqkv.checks.integer) for the Bridge, KVCache and the ops: numpy's integers are
  accepted everywhere, a bool or a float is refused with the argument's name.
- item 9: the Hugging Face glue's guards that rested on today's transformers: the empty StaticCache prefill
  of the interface tier (keys past S must be the unwritten, all-zero part of the buffer), and the head
  counts of a tensor-parallel shard (whole heads and whole query groups only).
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import pyqkv
from pyqkv import KVCache, checks, ops
from pyqkv.bridge import Projections

np = pytest.importorskip("numpy")

D, H, HKV, DH = 32, 4, 2, 8
N_OUT = (H + 2 * HKV) * DH


def weights(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(device)  # noqa: E731
    return r(D, N_OUT), r(N_OUT), r(H * DH, D), r(D)


# --------------------------------------------------------------------------------------------------
# item 4: 2-D float masks


def test_float_2d_mask_of_0_and_1_is_a_padding_mask(device):
    """A float 0/1 mask is still accepted and reads exactly as the bool one (1 = attend), in the fused op, the
    split form and the Bridge; the refused ones are rows of test_bad_input.py."""
    q, k, v = (torch.randn(2, s, h, 8, device=device) for s, h in ((3, 4), (5, 2), (5, 2)))
    keep = torch.tensor([[True, True, False, True, True], [False, False, True, True, True]], device=device)
    for dtype in (torch.float32, torch.float16, torch.float64):
        z, lse, _ = ops.attention(q, k, v, scale=0.3, causal=True, mask=keep.to(dtype))
        z_b, lse_b, _ = ops.attention(q, k, v, scale=0.3, causal=True, mask=keep)
        assert torch.equal(z, z_b) and torch.equal(lse, lse_b)
        s_f = ops.attn_scores(q, k, scale=0.3, causal=True, mask=keep.to(dtype))
        assert torch.equal(s_f, ops.attn_scores(q, k, scale=0.3, causal=True, mask=keep))
    b = pyqkv.Bridge(*weights(device), n_heads=H, n_kv_heads=HKV, d_head=DH)
    x = torch.randn(2, 5, D, device=device)
    with torch.no_grad():
        assert torch.equal(b(x, attention_mask=keep.float()), b(x, attention_mask=keep))


def test_additive_2d_mask_is_refused_not_inverted(device):
    """The review's two symptoms: an all-visible additive 2-D mask (hiding key 0 with finfo.min) used to leave
    key 0 the only visible key, and the Bridge agreed. Now both refuse it, by the same rule and message
    (the Bridge before any hook fires)."""
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    q, k, v = q.to(device), k.to(device), v.to(device)
    additive = torch.zeros(1, 4, device=device)
    additive[0, 0] = torch.finfo(torch.float32).min
    with pytest.raises(ValueError) as op_error:
        ops.attention(q, k, v, scale=0.3, causal=True, mask=additive)
    b = pyqkv.Bridge(*weights(device), n_heads=H, n_kv_heads=HKV, d_head=DH)
    fired = []
    b.add_hook("hook_in", lambda t, hook: fired.append(hook.name))
    with pytest.raises(ValueError) as bridge_error:
        b(torch.randn(1, 4, D, device=device), attention_mask=additive)
    assert fired == []
    op_msg, bridge_msg = str(op_error.value), str(bridge_error.value)
    assert op_msg.startswith("mask: ") and bridge_msg.startswith("attention_mask: ")
    # One rule, one message: only the argument's name differs.
    assert op_msg[len("mask: ") :] == bridge_msg[len("attention_mask: ") :]
    assert "pass it as 4-D [B, 1, S, K]" in op_msg
    # The 4-D form of the same mask is the additive mask it meant: key 0 hidden.
    _, _, p4 = ops.attention(
        q, k, v, scale=0.3, causal=False, mask=additive[:, None, None, :].expand(1, 1, 2, 4), return_pattern=True
    )
    assert torch.count_nonzero(p4[..., 0]) == 0 and torch.all(p4[..., 1:] > 0)


def test_float_mask_rule_is_skipped_for_meta_tensors():
    """Values that cannot be read (meta: the backend plan of meta tensors) are not read; the op reads them at
    run time."""
    meta = torch.empty(2, 5, device="meta")
    torch.ops.pyqkv.check_padding_mask(meta, "mask")  # no error, no read
    torch.ops.pyqkv.check_padding_mask(torch.tensor([[0.0, 1.0]]), "mask")


def test_mask_rule_under_torch_compile(device):
    """The Bridge's pre-check calls the C++ rule as an op, which must not break a fullgraph compile: bool and
    float 0/1 masks compile to one graph and equal eager; an additive 2-D mask (whose values the tracer cannot
    read) is still refused when the compiled graph runs, by the fused op's own check."""
    b = pyqkv.Bridge(*weights(device), n_heads=H, n_kv_heads=HKV, d_head=DH)
    compiled = torch.compile(b, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, D, device=device)
    keep = torch.ones(2, 5, dtype=torch.bool, device=device)
    keep[1, :2] = False
    with torch.no_grad():
        for mask in (keep, keep.float()):
            assert torch.equal(compiled(x, attention_mask=mask), b(x, attention_mask=mask))
        additive = torch.zeros(2, 5, device=device)
        additive[:, 0] = torch.finfo(torch.float32).min
        with pytest.raises(ValueError, match=r"expected a 2-D float mask to hold only 0 \(pad\) and 1 \(attend\)"):
            compiled(x, attention_mask=additive)


# --------------------------------------------------------------------------------------------------
# item 6: KVCache.reset() forgets the shape


def kv(B, S, Hkv=2, Dh=4, dtype=torch.float32, device="cpu"):
    """New keys and values [B, S, Hkv, Dh]."""
    return tuple(torch.randn(B, S, Hkv, Dh, dtype=dtype, device=device) for _ in range(2))


def test_reset_forgets_the_batch_as_the_error_message_says(device):
    cache = KVCache()
    cache.append(*kv(2, 3, device=device))
    with pytest.raises(ValueError, match=r"holds batch 2.*Use a fresh KVCache \(or reset\(\) it\) for another batch"):
        cache.append(*kv(1, 1, device=device))
    cache.reset()
    k1, v1 = kv(1, 2, device=device)
    keys, values = cache.append(k1, v1)
    assert cache.length == 2 and torch.equal(keys, k1) and torch.equal(values, v1)
    # The new batch binds the cache again, until the next reset().
    with pytest.raises(ValueError, match=r"kv_cache: holds batch 1, 2 KV heads of dim 4"):
        cache.append(*kv(2, 1, device=device))


def test_reset_accepts_another_head_shape_dtype_and_device_and_reuses_matching_storage(device):
    cache = KVCache(capacity=8)
    cache.append(*kv(2, 3, device=device))
    ptr, capacity = cache.k_storage.data_ptr(), cache.capacity
    cache.reset()
    assert "empty after reset()" in repr(cache)
    k, v = kv(2, 5, device=device)
    cache.append(k, v)  # the same shape: the same storage, rows overwritten
    assert cache.k_storage.data_ptr() == ptr and cache.capacity == capacity
    assert torch.equal(cache.keys, k) and torch.equal(cache.values, v)
    cache.reset()
    k, v = kv(3, 2, Hkv=1, Dh=8, dtype=torch.float64, device=device)  # another batch, heads, dtype
    cache.append(k, v)
    assert cache.k_storage.shape[:2] == (3, 1) and cache.k_storage.dtype == torch.float64
    assert torch.equal(cache.keys, k) and torch.equal(cache.values, v)
    other = "meta" if torch.device(device).type == "cpu" else "cpu"
    cache.reset()
    cache.append(*kv(1, 1, device=other))  # and another device
    assert cache.k_storage.device.type == torch.device(other).type and cache.length == 1


def test_rejected_append_after_reset_changes_nothing(device):
    cache = KVCache()
    cache.append(*kv(2, 3, device=device))
    cache.reset()
    ptr = cache.k_storage.data_ptr()
    k, _ = kv(1, 2, device=device)
    with pytest.raises(ValueError, match=r"^v_new: expected the shape of k_new"):
        cache.append(k, torch.randn(1, 3, 2, 4, device=device))
    assert cache.length == 0 and cache.k_storage.data_ptr() == ptr
    cache.append(*kv(1, 1, device=device))  # still free to take any batch
    assert cache.keys.shape == (1, 1, 2, 4)


def test_bridge_reuses_a_reset_cache_for_another_batch(device):
    b = pyqkv.Bridge(*weights(device), n_heads=H, n_kv_heads=HKV, d_head=DH)
    cache = KVCache()
    x2, x1 = torch.randn(2, 4, D, device=device), torch.randn(1, 5, D, device=device)
    with torch.no_grad():
        b(x2, kv_cache=cache)
        cache.reset()
        got = torch.cat([b(x1[:, :3], kv_cache=cache), b(x1[:, 3:], kv_cache=cache)], 1)
        assert torch.allclose(got, b(x1), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# item 7: one integer rule


def test_integer_rule():
    assert checks.integer(3) == 3 and type(checks.integer(np.int64(3))) is int
    assert checks.integer(np.int32(-2)) == -2 and checks.integer(torch.tensor(4)) == 4
    for not_an_int in (True, False, np.bool_(True), torch.tensor(True), 1.5, 2.0, np.float64(2.0), "2", None):
        assert checks.integer(not_an_int) is None, not_an_int
    assert checks.integer(torch.tensor(2.0)) is None and checks.integer(torch.tensor([1, 2])) is None


def test_numpy_integers_are_accepted_everywhere(device):
    """The Bridge (every integer argument), KVCache(capacity) and the ops (kv_append start, window) take
    numpy's integers as the ints they are; the Bridge keeps plain ints in its config."""
    w = weights(device)
    ints = dict(n_heads=4, n_kv_heads=2, d_head=8, window=3, rotary_dim=4, layer_idx=2)
    b_int = pyqkv.Bridge(*w, scale_attn_by_inverse_layer_idx=True, **ints)
    b_np = pyqkv.Bridge(*w, scale_attn_by_inverse_layer_idx=True, **{n: np.int64(v) for n, v in ints.items()})
    assert b_np.cfg == b_int.cfg
    assert all(type(getattr(b_np.cfg, n)) is int for n in ("n_heads", "n_kv_heads", "d_head", "window", "rotary_dim"))
    x = torch.randn(2, 6, D, device=device)
    with torch.no_grad():
        assert torch.equal(b_np(x), b_int(x))
    qkv, out = nn.Linear(D, N_OUT).to(device), nn.Linear(H * DH, D).to(device)
    calling = pyqkv.Bridge(
        None, None, None, None, n_heads=H, n_kv_heads=HKV, d_head=DH, d_model=np.int64(D),
        projections=Projections(qkv, out, "test"), conv1d=False,
    )  # fmt: skip
    assert type(calling.cfg.d_model) is int and calling.cfg.d_model == D
    cache = KVCache(np.int64(8))
    cache.append(*kv(2, 3, device=device))
    assert cache.capacity == 8
    k_cache, v_cache = torch.zeros(2, 2, 10, 4, device=device), torch.zeros(2, 2, 10, 4, device=device)
    k_new, v_new = kv(2, 3, device=device)
    ops.kv_append(k_cache, v_cache, k_new, v_new, np.int64(4))
    assert torch.equal(k_cache[:, :, 4:7], k_new.transpose(1, 2))
    q, k, v = (
        torch.randn(2, 3, 4, 8, device=device),
        torch.randn(2, 5, 2, 8, device=device),
        torch.randn(2, 5, 2, 8, device=device),
    )
    z_np, _, _ = ops.attention(q, k, v, scale=0.3, causal=True, window=np.int32(2))
    assert torch.equal(z_np, ops.attention(q, k, v, scale=0.3, causal=True, window=2)[0])
    assert torch.equal(
        ops.attn_scores(q, k, scale=0.3, causal=True, window=np.int64(2)),
        ops.attn_scores(q, k, scale=0.3, causal=True, window=2),
    )


BRIDGE_INTEGERS = {  # argument -> (extra arguments that make it used, the start of its message)
    "n_heads": ({"n_kv_heads": 1}, "n_heads: expected a positive int"),
    "n_kv_heads": ({}, "n_kv_heads: expected a positive divisor of n_heads=4"),
    "d_head": ({}, "d_head: expected a positive int"),
    "window": ({}, "window: expected a positive int"),
    "rotary_dim": ({}, "rotary_dim: expected None or an even int"),
    "layer_idx": ({"scale_attn_by_inverse_layer_idx": True}, "layer_idx: expected an int >= 0"),
}


@pytest.mark.parametrize("bad", [True, 1.5, np.float64(2.0), np.bool_(True)], ids=repr)
def test_bool_and_float_are_refused_with_the_argument_name(bad):
    """Every integer argument refuses a bool and a float the same way, naming itself (and numpy's integer of
    the same value is accepted)."""
    w = weights("cpu")
    for name, (extra, message) in BRIDGE_INTEGERS.items():
        with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")) as info:
            pyqkv.Bridge(*w, **{"n_heads": H, "n_kv_heads": HKV, "d_head": DH, **extra, name: bad})
        assert f"got {bad!r}" in str(info.value)
    qkv, out = nn.Linear(D, N_OUT), nn.Linear(H * DH, D)
    with pytest.raises(ValueError, match=r"^d_model: expected a positive int"):
        pyqkv.Bridge(
            None, None, None, None, n_heads=H, n_kv_heads=HKV, d_head=DH, d_model=bad,
            projections=Projections(qkv, out, "test"), conv1d=False,
        )  # fmt: skip
    with pytest.raises(TypeError, match=r"^capacity: expected a positive int or None"):
        KVCache(bad)
    with pytest.raises(TypeError, match=r"^start: expected an int"):
        ops.kv_append(
            torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), bad
        )
    q = torch.randn(1, 2, 1, 4)
    with pytest.raises(TypeError, match=r"^window: expected None or an int"):
        ops.attention(q, q, q, scale=0.5, causal=True, window=bad)
    with pytest.raises(TypeError, match=r"^window: expected None or an int"):
        ops.attn_scores(q, q, scale=0.5, causal=True, window=bad)


# --------------------------------------------------------------------------------------------------
# item 9 (a): the interface tier's empty StaticCache prefill


class _CausalModule(nn.Module):
    """What attention_forward reads from the calling module: is_causal and training."""

    is_causal = True


def _static_prefill(tail):
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, S, K, Dh = 2, 4, 2, 3, 7, 8
    q = torch.randn(B, Hq, S, Dh, generator=g)
    k, v = torch.randn(B, Hkv, K, Dh, generator=g), torch.randn(B, Hkv, K, Dh, generator=g)
    k[:, :, S:], v[:, :, S:] = 0, 0
    tail(k, v, S)
    return q, k, v


@pytest.mark.parametrize(
    "where",
    ["keys", "values", "one-entry", "nan"],
)
def test_static_prefill_slice_refuses_written_keys(where):
    """mask None, causal and K > S are read as an empty StaticCache prefill, whose keys past S are unwritten
    (zeros): written ones there (a past that a mask-less caller hands over) raise instead of being dropped."""
    from pyqkv.hf import interface as hf_interface

    def tail(k, v, S):
        if where == "keys":
            k[:, :, S:] = 1.0
        elif where == "values":
            v[:, :, S + 1] = -2.0
        elif where == "one-entry":
            k[1, 0, -1, 3] = 1e-6
        else:
            v[0, 1, S, 0] = float("nan")

    q, k, v = _static_prefill(tail)
    with pytest.raises(ValueError) as info:
        hf_interface.attention_forward(_CausalModule(), q, k, v, None, scaling=0.25)
    message = str(info.value)
    for fragment in (
        "key, value: _CausalModule passed attention_mask None with S=3 queries and K=7 keys",
        "empty StaticCache prefill",
        "got nonzero ones",
        "explicit attention mask",
    ):
        assert fragment in message, message


def test_static_prefill_refuses_written_keys_under_torch_compile():
    """Compiled, the check cannot branch on data: it is an assertion op in the graph, raising when it runs."""
    from pyqkv.hf import interface as hf_interface

    def tail(k, v, S):
        k[:, :, S:] = 1.0

    q, k, v = _static_prefill(tail)
    module = _CausalModule()
    compiled = torch.compile(
        lambda q, k, v: hf_interface.attention_forward(module, q, k, v, None, scaling=0.25)[0],
        backend="aot_eager",
        fullgraph=True,
    )
    with pytest.raises(RuntimeError, match="empty StaticCache prefill"):
        compiled(q, k, v)
    q, k, v = _static_prefill(lambda k, v, S: None)
    torch.testing.assert_close(
        compiled(q, k, v), hf_interface.attention_forward(module, q, k, v, None, scaling=0.25)[0]
    )


def test_static_prefill_with_unwritten_tail_still_slices():
    """The legitimate case keeps working: an all-zero tail is dropped, and the result is top-left causal over
    the first S keys (sdpa's reading)."""
    from pyqkv.hf import interface as hf_interface

    q, k, v = _static_prefill(lambda k, v, S: None)
    z, _ = hf_interface.attention_forward(_CausalModule(), q, k, v, None, scaling=0.25)
    S = q.shape[2]
    kk, vv = (t[:, :, :S].repeat_interleave(2, 1).double() for t in (k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), kk, vv, is_causal=True, scale=0.25)
    assert torch.allclose(z.double(), ref.transpose(1, 2), atol=1e-5)


def test_static_cache_generation_through_the_interface_matches_eager():
    """The guard on the real flow: a tiny Llama from a random config (no download), a StaticCache prefill
    without a mask (K = max_cache_len > S, the tail unwritten) and decode steps, pyqkv vs eager."""
    transformers = pytest.importorskip("transformers")
    import pyqkv.hf  # noqa: F401  (registers "pyqkv")

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    eager = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    ours = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="pyqkv").eval()
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    outs = []
    with torch.no_grad():
        for m in (eager, ours):
            cache = transformers.StaticCache(config=m.config, max_cache_len=12)
            outs.append(
                [m(ids[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in ((0, 4), (4, 5), (5, 6))]
            )
    for step, (a, b) in enumerate(zip(*outs)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), f"step {step}"


# --------------------------------------------------------------------------------------------------
# item 9 (b): tensor-parallel shards must hold whole heads


def fused_spec(width):
    return types.SimpleNamespace(qkv=nn.Linear(D, width, bias=False))


def separate_spec(q, k, v):
    return types.SimpleNamespace(qkv=(nn.Linear(D, q), nn.Linear(D, k), nn.Linear(D, v)))


@pytest.mark.parametrize(
    "spec, fragments",
    [
        (
            fused_spec(40),
            (
                "fused qkv projection gives a shard of 40 features = 5 heads of d_head=8",
                "multiple of n_heads/n_kv_heads + 2 = 4 heads",
            ),
        ),
        (
            fused_spec(36),
            ("qkv projection (Linear) gives a shard of 36 features", "multiple of the head size d_head=8"),
        ),
        (fused_spec(48), ("shard of 48 features = 6 heads of d_head=8",)),
        (separate_spec(16, 12, 12), ("k projection (Linear) gives a shard of 12 features", "d_head=8")),
        (
            separate_spec(8, 8, 8),
            ("shards give q 8, k 8 and v 8 features (head size d_head=8)", "2 query heads per KV head"),
        ),
        (separate_spec(16, 8, 16), ("shards give q 16, k 8 and v 16 features", "k and v of equal size")),
    ],
    ids=[
        "fused-cuts-a-group",
        "fused-cuts-a-head",
        "fused-group-and-a-half",
        "separate-cuts-a-head",
        "separate-cuts-a-group",
        "separate-k-v-differ",
    ],
)
def test_local_heads_refuses_shards_that_are_not_whole_heads(spec, fragments):
    """H=4, Hkv=2, Dh=8: a rank's shard must be whole heads, and whole query groups (2 Q heads with their K and
    V head); anything else would have given other heads' indices (groups // (ratio + 2))."""
    from pyqkv.hf import placement

    with pytest.raises(ValueError) as info:
        placement.local_heads(spec, H, HKV, DH, D)
    message = str(info.value)
    assert message.startswith("module: under tensor parallelism this rank's"), message
    for fragment in fragments:
        assert fragment in message, message


def test_local_heads_whole_heads(tmp_path):
    """Whole shards still work: every head on the rank (no parallelism), and one aligned group on the one rank
    of a single-process group (q0 = kv0 = 0)."""
    import torch.distributed as dist

    from pyqkv.hf import placement

    H_, Hkv_, heads, kv_heads = placement.local_heads(fused_spec(N_OUT), H, HKV, DH, D)
    assert (H_, Hkv_, list(heads), list(kv_heads)) == (4, 2, [0, 1, 2, 3], [0, 1])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert placement.local_heads(fused_spec(32), H, HKV, DH, D) == (2, 1, range(0, 2), range(0, 1))
        assert placement.local_heads(separate_spec(16, 8, 8), H, HKV, DH, D) == (2, 1, range(0, 2), range(0, 1))
    finally:
        dist.destroy_process_group()
