"""A long decode: thousands of single-token Bridge steps through one pyqkv.KVCache, crossing many of its
growth steps, equal to recomputing the whole sequence from scratch at checkpoints.

The cache starts at capacity 8 and doubles as it fills (8 -> 16 -> ... -> 4096: nine reallocations, each
copying the rows so far), while every step appends one row in place. Batch row 1 is a left-padded prompt,
so every step also passes a 2-D padding mask over all K = cached + 1 positions. At each checkpoint the
step's output must equal (a) the matching row of one Bridge forward over the whole sequence without a cache
and (b) the float64 reference (pyqkv.reference: split weights, projections, attention with causal and
padding), and the cache's keys and values must equal the reference projections, each by the tolerance
rule (the reference run in float64 and in float32). Small D and H keep the whole test at a few seconds.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import Ref, assert_close

import pyqkv
from pyqkv import reference as ref

B, D, H, HKV, DH = 2, 16, 4, 2, 8
PROMPT, PAD = 5, 2  # batch row 1: its first PAD prompt positions are padding
STEPS = 3000
CAPACITY = 8
T = PROMPT + STEPS
# Around each reallocation (the cache holds 8, 16, ... rows), early steps, and the end.
CHECKPOINTS = sorted({PROMPT, PROMPT + 1, 8, 9, 16, 17, 64, 65, 1024, 1025, 2048, 2049, T // 2, T - 1, T})


def layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.4  # noqa: E731
    w = {
        "weight": r(D, (H + 2 * HKV) * DH),
        "bias": r((H + 2 * HKV) * DH),
        "out_weight": r(H * DH, D),
        "out_bias": r(D),
    }
    bridge = pyqkv.Bridge(
        w["weight"],
        w["bias"],
        w["out_weight"],
        w["out_bias"],
        n_heads=H,
        n_kv_heads=HKV,
        d_head=DH,
        layout="blocked",
        conv1d=True,
    )
    return bridge, w


def reference_rows(w, x, pad, rows, dtype):
    """The layer from pyqkv.reference, every step in `dtype`, at query positions `rows` of the whole
    sequence x [B, T, D] (causal, padding mask pad [B, T]); also the keys and values [B, T, Hkv, Dh]."""
    w = {name: t.to(dtype) for name, t in w.items()}
    W_Q, W_K, W_V, b_Q, b_K, b_V = ref.split_qkv(
        w["weight"], w["bias"], n_heads=H, n_kv_heads=HKV, d_head=DH, layout="blocked", conv1d=True
    )
    xd = x.to(dtype)
    proj = lambda W, b: torch.einsum("btd,nde->btne", xd, W) + b  # noqa: E731
    k, v = proj(W_K, b_K), proj(W_V, b_V)
    q = proj(W_Q, b_Q)[:, rows]
    out = []
    for i, t in enumerate(rows):  # query position t sees keys 0 .. t (bottom-right causal over K = t + 1)
        z, _, _ = ref.attention(
            q[:, i : i + 1],
            k[:, : t + 1],
            v[:, : t + 1],
            scale=DH**-0.5,
            causal=True,
            mask=pad[:, : t + 1],
            compute_dtype=dtype,
        )
        out.append(z.flatten(2) @ w["out_weight"] + w["out_bias"])
    return torch.cat(out, 1), k, v


@pytest.fixture
def one_thread():
    # A one-token step of this size is a few microseconds of arithmetic and tens of dispatch; with a
    # second OpenMP thread, a machine busy with other work turns each tiny GEMM's thread hand-off into
    # milliseconds. One thread keeps the test's few seconds independent of the machine's load.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_thousands_of_decode_steps_equal_recomputation(one_thread):
    torch.manual_seed(0)
    bridge, w = layer()
    x = torch.randn(B, T, D)
    pad = torch.ones(B, T, dtype=torch.long)
    pad[1, :PAD] = 0
    cache = pyqkv.KVCache(capacity=CAPACITY)
    capacities, outs = [], {}
    with torch.no_grad():
        outs[PROMPT] = bridge(x[:, :PROMPT], attention_mask=pad[:, :PROMPT], kv_cache=cache)[:, -1]
        for t in range(PROMPT + 1, T + 1):  # the step that makes position t - 1, seeing keys 0 .. t - 1
            ptr = cache.k_storage.data_ptr()
            out = bridge(x[:, t - 1 : t], attention_mask=pad[:, :t], kv_cache=cache)
            assert cache.length == t
            if cache.capacity != (capacities[-1] if capacities else CAPACITY):
                capacities.append(cache.capacity)
            else:
                assert cache.k_storage.data_ptr() == ptr, f"step {t}: storage reallocated although not full"
            if t in CHECKPOINTS:
                outs[t] = out[:, 0]
            assert torch.isfinite(out).all(), f"step {t}: non-finite output"
        full = bridge(x, attention_mask=pad)  # the whole sequence at once, no cache
    assert capacities == [16, 32, 64, 128, 256, 512, 1024, 2048, 4096], f"growth steps: {capacities}"

    rows = [t - 1 for t in CHECKPOINTS]
    (want_hi, k_hi, v_hi), (want_lo, k_lo, v_lo) = (
        reference_rows(w, x, pad, rows, dt) for dt in (torch.float64, x.dtype)
    )
    want = Ref(want_hi, want_lo)
    for i, t in enumerate(CHECKPOINTS):
        assert_close(outs[t], want[:, i], f"step {t}: cached decode vs the reference")
        assert_close(full[:, t - 1], want[:, i], f"position {t - 1}: whole-sequence forward vs the reference")
    assert_close(cache.keys, Ref(k_hi, k_lo), "cached keys")
    assert_close(cache.values, Ref(v_hi, v_lo), "cached values")
