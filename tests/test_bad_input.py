"""Malformed input to every public entry point, in one table: the native ops (pyqkv.ops), Bridge
construction, Bridge forward (x, attention_mask, kv_cache), KVCache, hooks and their return values, and
conversion rules. Each case raises ValueError, TypeError, RuntimeError or KeyError whose message names the
argument (or hook point), what was expected and what was received; never a crash or a silent result.

After every case the objects it touched are checked: each Bridge of the case gives bit for bit the output
it gave before, holds no hook and no hook ctx, and its config is unchanged; the Bridge's KVCache and the
standalone KVCache hold the same length and contents as before and still work (the next decode step equals
the reference by the tolerance rule); an op still gives the reference result on good input. Each bad input
is one row, here and nowhere else.

CASES is the table: (id, entry point, call(env), exception, message fragments). Fragments may name the
case's devices as {device} and {other} (a second device: cuda <-> cpu, or meta on a machine without a GPU,
which every device check sees as different).

Empty tensors (B = 0, S = 0, K = 0) are not errors: EMPTY_CASES checks that each entry point returns the
empty (or, for K = 0, the all-zeros) result the reference gives, with the right shapes.

Sizes: the Bridge has D = 32, H = 4, Hkv = 2, Dh = 8 (blocked, Conv1D); its cache holds 4 positions of a
7-position input x [2, 7, 32] and the bad calls pass the last 3 (x_new). The standalone KVCache holds
[2, 3, 2, 4].
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import pytest
import torch
from conftest import skip_unless_available
from tolerance import Ref, assert_close, assert_close_by_rule

import pyqkv
from pyqkv import KVCache, ops
from pyqkv import reference as ref

D, H, HKV, DH = 32, 4, 2, 8
N_OUT = (H + 2 * HKV) * DH  # 64
PAST, S_NEW = 4, 3
_ops = torch.ops.pyqkv


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# The Bridge under test, and the float64 reference it must keep matching


def layer_weights(device):
    g = torch.Generator().manual_seed(11)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(device)  # noqa: E731
    return {"weight": r(D, N_OUT), "bias": r(N_OUT), "out_weight": r(H * DH, D), "out_bias": r(D)}


def make_bridge(w, **kw):
    return pyqkv.Bridge(
        w["weight"], w["bias"], w["out_weight"], w["out_bias"], n_heads=H, n_kv_heads=HKV, d_head=DH, **kw
    )


def reference_layer(w, x, dtype=torch.float64):
    """The layer on the whole sequence x [B, T, D] from pyqkv.reference (causal), every step in `dtype`:
    [B, T, D]."""
    w = {name: p.to(dtype) for name, p in w.items()}
    W_Q, W_K, W_V, b_Q, b_K, b_V = ref.split_qkv(
        w["weight"], w["bias"], n_heads=H, n_kv_heads=HKV, d_head=DH, layout="blocked", conv1d=True
    )
    xd = x.to(dtype)
    q, k, v = (torch.einsum("btd,nde->btne", xd, W) + b for W, b in ((W_Q, b_Q), (W_K, b_K), (W_V, b_V)))
    z, _, _ = ref.attention(q, k, v, scale=DH**-0.5, causal=True, compute_dtype=dtype)
    return z.flatten(2) @ w["out_weight"] + w["out_bias"]


def reference_ref(w, x):
    """reference_layer under the tolerance rule: (float64, x's dtype)."""
    return Ref(reference_layer(w, x), reference_layer(w, x, x.dtype))


class Env:
    """What a case may touch: `bridge` with a KVCache `cache` holding PAST positions of x, a standalone
    KVCache `kv`, and any further Bridge made with `bridge_with(**kwargs)`. check_unchanged() is the
    after-error contract. `fired` lists the hook_in calls of these Bridges during the case (a permanent
    hook that check_unchanged removes first): a bad forward argument fails before any hook fires."""

    def __init__(self, device):
        # The device as tensors report it ("cuda:0", not "cuda"): messages name a tensor's device.
        self.device = torch.empty(0, device=device).device
        self.other = "meta" if self.device.type == "cpu" else "cpu"
        self.w = layer_weights(device)
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(2, PAST + S_NEW, D, generator=g).to(device)
        self.x_new = self.x[:, PAST:]
        self._bridges, self._watches, self.fired = [], [], []
        self.bridge = self.bridge_with()
        self.cache = KVCache(capacity=5)  # the failing calls would have to grow it
        with torch.no_grad():
            self.bridge(self.x[:, :PAST], kv_cache=self.cache)
        self.kv = KVCache()
        self.kv.append(t(2, 3, 2, 4, device=device), t(2, 3, 2, 4, device=device))
        self._caches = [(c, c.length, c.keys.clone(), c.values.clone()) for c in (self.cache, self.kv)]
        self.fired.clear()

    def bridge_with(self, **kwargs) -> pyqkv.Bridge:
        b = make_bridge(self.w, **kwargs)
        with torch.no_grad():
            self._bridges.append((b, b(self.x), dataclasses.asdict(b.cfg), b.training))
        self._watches += b.add_hook("hook_in", lambda t, hook: self.fired.append(hook.name), is_permanent=True)
        return b

    def check_unchanged(self) -> None:
        for handle in self._watches:
            handle.remove()
        for b, before, cfg, training in self._bridges:
            leftover = {n: (len(p.fwd), len(p.bwd)) for n, p in b.hook_points().items() if p.fwd or p.bwd}
            assert not leftover, f"hooks left after the error: {leftover}"
            assert all(p.ctx == {} for p in b.hook_points().values()), "hook ctx left after the error"
            assert dataclasses.asdict(b.cfg) == cfg and b.training == training, "the Bridge's config changed"
            with torch.no_grad():
                assert torch.equal(b(self.x), before), "the Bridge's output changed after the error"
        for cache, length, keys, values in self._caches:
            assert cache.length == length, f"KVCache length {length} became {cache.length}"
            assert torch.equal(cache.keys, keys) and torch.equal(cache.values, values), "KVCache contents changed"
        with torch.no_grad():
            out = self.bridge(self.x_new, kv_cache=self.cache)
        assert_close(out, reference_ref(self.w, self.x)[:, PAST:], "the next decode step after the error")
        k_new, v_new = t(2, 2, 2, 4, device=self.device), t(2, 2, 2, 4, device=self.device)
        keys, values = self.kv.keys.clone(), self.kv.values.clone()
        self.kv.append(k_new, v_new)
        assert torch.equal(self.kv.keys, torch.cat([keys, k_new], 1))
        assert torch.equal(self.kv.values, torch.cat([values, v_new], 1))


# --------------------------------------------------------------------------------------------------
# The table


class Case(NamedTuple):
    id: str
    entry: str  # the entry point: "ops.<op>", "Bridge()", "Bridge.forward", "KVCache", "hooks", "conversions"
    call: Callable[[Env], object]
    exc: type
    fragments: tuple[str, ...]
    needs_cuda: bool = False


VE, TE, RE = ValueError, TypeError, RuntimeError
f64, i64 = torch.float64, torch.int64


# The ops on good input except for the arguments given. Good sizes: attention B=2, S=3, K=5, H=4, Hkv=2,
# Dh=8 (alibi [2, 4, 5]); rotary x [2, 3, 4, 8], cos/sin [1, 3, 6]; per_head_proj B=2, S=3, n=4, D=8, E=5;
# split/pack H=4, Hkv=2, Dh=2, D=8 (n_out = 16); kv_append B=2, Hkv=2, capacity=10, Dh=4, S=3.


def attn(e, *, q=None, k=None, v=None, mask=None, alibi=None, softcap=None, window=None):
    d = e.device
    q = t(2, 3, 4, 8, device=d) if q is None else q
    k = t(2, 5, 2, 8, device=d) if k is None else k
    v = t(2, 5, 2, 8, device=d) if v is None else v
    return ops.attention(q, k, v, scale=0.35, causal=True, mask=mask, alibi=alibi, softcap=softcap, window=window)


def scores(e, *, q=None, k=None, mask=None, alibi=None):
    """ops.attn_scores, the split form."""
    q = t(2, 3, 4, 8, device=e.device) if q is None else q
    k = t(2, 5, 2, 8, device=e.device) if k is None else k
    return ops.attn_scores(q, k, scale=0.35, causal=True, mask=mask, alibi=alibi)


def rope(e, *, x=None, cos=None, sin=None, raw=False):
    """ops.rotary (or the raw op, which takes no 2-D tables)."""
    d = e.device
    x = t(2, 3, 4, 8, device=d) if x is None else x
    cos = t(1, 3, 6, device=d) if cos is None else cos
    sin = t(1, 3, 6, device=d) if sin is None else sin
    return _ops.rotary(x, cos, sin, False) if raw else ops.rotary(x, cos, sin)


def php(e, *, x=None, W=None, b=None):
    x = t(2, 3, 4, 8, device=e.device) if x is None else x
    W = t(4, 8, 5, device=e.device) if W is None else W
    return ops.per_head_proj(x, W, b)


def split(e, weight=None, bias=None, *, H=4, Hkv=2, Dh=2, layout="blocked", conv1d=True):
    weight = t(8, 16, device=e.device) if weight is None else weight
    return ops.split_qkv(weight, bias, n_heads=H, n_kv_heads=Hkv, d_head=Dh, layout=layout, conv1d=conv1d)


def pack(e, W_Q=None, W_K=None, W_V=None, *biases, layout="blocked"):
    W_Q = t(4, 8, 2, device=e.device) if W_Q is None else W_Q
    W_K = t(2, 8, 2, device=e.device) if W_K is None else W_K
    W_V = t(2, 8, 2, device=e.device) if W_V is None else W_V
    return ops.pack_qkv(W_Q, W_K, W_V, *biases, layout=layout)


def append(e, *, k_cache=None, v_cache=None, k_new=None, v_new=None, start=4):
    d = e.device
    k_cache = t(2, 2, 10, 4, device=d) if k_cache is None else k_cache
    v_cache = t(2, 2, 10, 4, device=d) if v_cache is None else v_cache
    k_new = t(2, 3, 2, 4, device=d) if k_new is None else k_new
    v_new = t(2, 3, 2, 4, device=d) if v_new is None else v_new
    return ops.kv_append(k_cache, v_cache, k_new, v_new, start)


def with_cache(buf_fn):
    """Calls `buf_fn(k_cache)` with a fresh cache, so a case can pass views of it."""
    return lambda e: buf_fn(e, t(2, 2, 10, 4, device=e.device))


def additive_2d(B, K, *, device, dtype=torch.float32, hide=0):
    """An additive-style 2-D mask [B, K] (0 = visible, finfo.min = hidden) hiding key `hide`: ambiguous as a
    padding mask (read as 1 = attend it would be inverted), so refused."""
    m = torch.zeros(B, K, dtype=dtype, device=device)
    m[:, hide] = torch.finfo(dtype).min
    return m


def float_2d(B, K, value, at, *, device, dtype=torch.float32):
    """A float 0/1 padding mask [B, K] (all ones) but for one entry `value` at `at`."""
    m = torch.ones(B, K, dtype=dtype, device=device)
    m[at] = value
    return m


# A float 2-D mask must hold only 0 and 1: the start of the message (the C++ rule names the argument).
FLOAT_2D = "expected a 2-D float mask to hold only 0 (pad) and 1 (attend)"
ADDITIVE_4D = "for an additive mask (0 = visible, very negative = hidden) pass it as 4-D [B, 1, S, K]"


# fmt: off
OP_CASES = [
    # attention ----------------------------------------------------------------------------------
    Case("attn-q-rank", "ops.attention", lambda e: attn(e, q=t(2, 3, 32, device=e.device)), VE, ("q: expected a 4-D tensor [B, S, H, Dh]", "got 3-D", "[2, 3, 32]")),
    Case("attn-k-rank", "ops.attention", lambda e: attn(e, k=t(2, 5, 2, 8, 1, device=e.device)), VE, ("k: expected a 4-D tensor", "got 5-D", "[2, 5, 2, 8, 1]")),
    Case("attn-v-rank", "ops.attention", lambda e: attn(e, v=t(2, 5, 16, device=e.device)), VE, ("v: expected a 4-D tensor", "[2, 5, 16]")),
    Case("attn-k-head-dim", "ops.attention", lambda e: attn(e, k=t(2, 5, 2, 6, device=e.device)), VE, ("k: expected shape [2, K, Hkv, 8]", "[2, 5, 2, 6]")),
    Case("attn-k-batch", "ops.attention", lambda e: attn(e, k=t(3, 5, 2, 8, device=e.device)), VE, ("k: expected shape [2, K, Hkv, 8]", "[3, 5, 2, 8]")),
    Case("attn-v-not-k-shape", "ops.attention", lambda e: attn(e, v=t(2, 6, 2, 8, device=e.device)), VE, ("v: expected the shape of k [2, 5, 2, 8]", "[2, 6, 2, 8]")),
    Case("attn-H-not-multiple-of-Hkv", "ops.attention", lambda e: attn(e, k=t(2, 5, 3, 8, device=e.device), v=t(2, 5, 3, 8, device=e.device)), VE, ("k: expected a KV head count that divides H=4", "Hkv=3", "[2, 5, 3, 8]")),
    Case("attn-mask-2d-shape", "ops.attention", lambda e: attn(e, mask=torch.ones(2, 6, dtype=torch.bool, device=e.device)), VE, ("mask: expected a 2-D padding mask [B, K] = [2, 5]", "[2, 6]")),
    Case("attn-mask-rank-3", "ops.attention", lambda e: attn(e, mask=t(2, 3, 5, device=e.device)), VE, ("mask:", "got 3-D", "[2, 3, 5]")),
    Case("attn-mask-4d-S", "ops.attention", lambda e: attn(e, mask=t(2, 1, 4, 5, device=e.device)), VE, ("mask: expected a 4-D additive mask [B or 1, 1 or H, S, K] = [2, 1 or 4, 3, 5]", "[2, 1, 4, 5]")),
    Case("attn-mask-4d-heads", "ops.attention", lambda e: attn(e, mask=t(2, 2, 3, 5, device=e.device)), VE, ("mask: expected a 4-D additive mask", "[2, 2, 3, 5]")),
    Case("attn-mask-4d-bool-shape", "ops.attention", lambda e: attn(e, mask=torch.ones(2, 1, 3, 4, dtype=torch.bool, device=e.device)), VE, ("mask: expected a 4-D additive mask [B or 1, 1 or H, S, K] = [2, 1 or 4, 3, 5] (or a bool one", "got [2, 1, 3, 4]")),
    Case("attn-mask-4d-int", "ops.attention", lambda e: attn(e, mask=torch.zeros(2, 1, 3, 5, dtype=i64, device=e.device)), TE, ("mask: expected a floating-point additive 4-D mask", "Long")),
    Case("attn-mask-complex", "ops.attention", lambda e: attn(e, mask=torch.ones(2, 5, dtype=torch.complex64, device=e.device)), TE, ("mask: expected a bool, integer or float padding mask", "ComplexFloat")),
    Case("attn-mixed-dtype-k", "ops.attention", lambda e: attn(e, k=t(2, 5, 2, 8, dtype=f64, device=e.device)), TE, ("k: expected dtype Float (the dtype of q)", "got Double")),
    Case("attn-mixed-dtype-v", "ops.attention", lambda e: attn(e, v=t(2, 5, 2, 8, dtype=torch.float16, device=e.device)), TE, ("v: expected dtype Float (the dtype of q)", "got Half")),
    Case("attn-integer-qkv", "ops.attention", lambda e: attn(e, q=torch.ones(2, 3, 4, 8, dtype=i64, device=e.device), k=torch.ones(2, 5, 2, 8, dtype=i64, device=e.device), v=torch.ones(2, 5, 2, 8, dtype=i64, device=e.device)), TE, ("q: expected a floating-point tensor", "got Long")),
    Case("attn-k-other-device", "ops.attention", lambda e: attn(e, k=t(2, 5, 2, 8, device="cpu")), VE, ("k: expected device cuda", "got cpu"), needs_cuda=True),
    # ALiBi: [B or 1, H or 1, K] ------------------------------------------------------------------
    Case("attn-alibi-rank-2", "ops.attention", lambda e: attn(e, alibi=t(4, 5, device=e.device)), VE, ("alibi: expected a 3-D tensor [B or 1, H or 1, K]", "got 2-D", "[4, 5]")),
    Case("attn-alibi-rank-4", "ops.attention", lambda e: attn(e, alibi=t(2, 4, 3, 5, device=e.device)), VE, ("alibi: expected a 3-D tensor [B or 1, H or 1, K]", "got 4-D", "[2, 4, 3, 5]")),
    Case("attn-alibi-bloom-shape", "ops.attention", lambda e: attn(e, alibi=t(8, 1, 5, device=e.device)), VE, ("alibi: expected shape [B or 1, H or 1, K] = [2 or 1, 4 or 1, 5]", "got [8, 1, 5]")),
    Case("attn-alibi-K", "ops.attention", lambda e: attn(e, alibi=t(2, 4, 6, device=e.device)), VE, ("alibi: expected shape [B or 1, H or 1, K] = [2 or 1, 4 or 1, 5]", "got [2, 4, 6]")),
    Case("attn-alibi-kv-heads", "ops.attention", lambda e: attn(e, alibi=t(2, 2, 5, device=e.device)), VE, ("alibi: expected shape", "4 or 1", "got [2, 2, 5]")),
    Case("attn-alibi-integer", "ops.attention", lambda e: attn(e, alibi=torch.zeros(2, 4, 5, dtype=i64, device=e.device)), TE, ("alibi: expected a floating-point tensor", "got Long")),
    Case("attn-alibi-bool", "ops.attention", lambda e: attn(e, alibi=torch.zeros(1, 4, 5, dtype=torch.bool, device=e.device)), TE, ("alibi: expected a floating-point tensor", "got Bool")),
    Case("attn-alibi-other-device", "ops.attention", lambda e: attn(e, alibi=t(2, 4, 5, device="cpu")), VE, ("alibi: expected device cuda", "(the device of q)", "got cpu"), needs_cuda=True),
    Case("raw-attn-alibi-shape", "ops.attention", lambda e: _ops.attention(t(2, 3, 4, 8, device=e.device), t(2, 5, 2, 8, device=e.device), t(2, 5, 2, 8, device=e.device), None, 0.35, True, False, t(1, 1, 4, device=e.device)), VE, ("alibi: expected shape [B or 1, H or 1, K]", "got [1, 1, 4]")),
    # the split form of attention (composites used for hook_attn_scores) --------------------------
    Case("scores-H-not-multiple-of-Hkv", "ops.attention", lambda e: ops.attn_scores(t(2, 3, 4, 8, device=e.device), t(2, 5, 3, 8, device=e.device), scale=0.35, causal=True), VE, ("k: expected a KV head count that divides H=4", "Hkv=3")),
    Case("scores-k-head-dim", "ops.attention", lambda e: ops.attn_scores(t(2, 3, 4, 8, device=e.device), t(2, 5, 2, 6, device=e.device), scale=0.35, causal=True), VE, ("k: expected shape [2, K, Hkv, 8]", "[2, 5, 2, 6]")),
    Case("scores-mask-4d-int", "ops.attention", lambda e: ops.attn_scores(t(2, 3, 4, 8, device=e.device), t(2, 5, 2, 8, device=e.device), scale=0.35, causal=True, mask=torch.ones(2, 1, 3, 5, dtype=i64, device=e.device)), TE, ("mask: expected a floating-point additive 4-D mask", "or a bool one", "got Long")),
    Case("scores-mask-2d-shape", "ops.attention", lambda e: ops.attn_scores(t(2, 3, 4, 8, device=e.device), t(2, 5, 2, 8, device=e.device), scale=0.35, causal=True, mask=torch.ones(2, 7, device=e.device)), VE, ("mask: expected a 2-D padding mask [B, K] = [2, 5]", "[2, 7]")),
    Case("scores-alibi-rank", "ops.attention", lambda e: scores(e, alibi=t(8, 5, device=e.device)), VE, ("alibi: expected a 3-D tensor [B or 1, H or 1, K]", "[8, 5]")),
    Case("scores-alibi-shape", "ops.attention", lambda e: scores(e, alibi=t(8, 1, 5, device=e.device)), VE, ("alibi: expected shape [B or 1, H or 1, K] = [2 or 1, 4 or 1, 5]", "got [8, 1, 5]")),
    Case("scores-alibi-integer", "ops.attention", lambda e: scores(e, alibi=torch.zeros(2, 4, 5, dtype=i64, device=e.device)), TE, ("alibi: expected a floating-point tensor", "got Long")),
    Case("scores-alibi-other-device", "ops.attention", lambda e: scores(e, alibi=t(2, 4, 5, device="cpu")), VE, ("alibi: expected device cuda", "got cpu"), needs_cuda=True),
    Case("scores-q-integer", "ops.attention", lambda e: ops.attn_scores(torch.ones(2, 3, 4, 8, dtype=i64, device=e.device), t(2, 5, 2, 8, device=e.device), scale=0.35, causal=True), TE, ("q: expected a floating-point tensor", "got Long")),
    Case("softmax-integer-scores", "ops.attention", lambda e: ops.attn_softmax(torch.ones(2, 4, 3, 5, dtype=i64, device=e.device)), TE, ("scores: expected a floating-point tensor", "got Long")),
    Case("apply-v-keys", "ops.attention", lambda e: ops.attn_apply(t(2, 4, 3, 5, device=e.device), t(2, 6, 2, 8, device=e.device)), VE, ("v: expected shape [2, 5, Hkv, Dh]", "[2, 6, 2, 8]")),
    Case("apply-pattern-rank", "ops.attention", lambda e: ops.attn_apply(t(2, 4, 3, device=e.device), t(2, 5, 2, 8, device=e.device)), VE, ("pattern: expected a 4-D tensor [B, H, S, K]", "[2, 4, 3]")),
    # softcap (Gemma 2) and window (sliding window), the fused op and the split form --------------------
    Case("attn-softcap-negative", "ops.attention", lambda e: attn(e, softcap=-1.0), VE, ("softcap: expected None, 0 (off) or a positive finite float", "got -1")),
    Case("attn-softcap-nan", "ops.attention", lambda e: attn(e, softcap=float("nan")), VE, ("softcap: expected None, 0 (off) or a positive finite float", "got nan")),
    Case("attn-softcap-inf", "ops.attention", lambda e: attn(e, softcap=float("inf")), VE, ("softcap: expected None, 0 (off) or a positive finite float", "got inf")),
    Case("attn-softcap-str", "ops.attention", lambda e: attn(e, softcap="50"), TE, ("softcap: expected None or a float", "got str '50'")),
    Case("attn-window-zero", "ops.attention", lambda e: attn(e, window=0), VE, ("window: expected None or W >= 1", "got 0")),
    Case("attn-window-negative", "ops.attention", lambda e: attn(e, window=-3), VE, ("window: expected None or W >= 1", "got -3")),
    Case("attn-window-not-causal", "ops.attention", lambda e: ops.attention(t(2, 3, 4, 8, device=e.device), t(2, 5, 2, 8, device=e.device), t(2, 5, 2, 8, device=e.device), scale=0.35, causal=False, window=4), VE, ("window: expected causal=True with a sliding window", "got window=4 with causal=False")),
    Case("attn-window-float", "ops.attention", lambda e: attn(e, window=2.5), TE, ("window: expected None or an int", "got float 2.5")),
    Case("raw-attn-window-not-causal", "ops.attention", lambda e: _ops.attention(t(2, 3, 4, 8, device=e.device), t(2, 5, 2, 8, device=e.device), t(2, 5, 2, 8, device=e.device), None, 0.35, False, False, None, None, 2), VE, ("window: expected causal=True", "got window=2 with causal=False")),
    Case("raw-attn-softcap-negative", "ops.attention", lambda e: _ops.attention(t(2, 3, 4, 8, device=e.device), t(2, 5, 2, 8, device=e.device), t(2, 5, 2, 8, device=e.device), None, 0.35, True, True, None, -0.5), VE, ("softcap: expected None, 0 (off) or a positive finite float", "got -0.5")),
    Case("scores-softcap-negative", "ops.attention", lambda e: ops.attn_scores(t(2, 3, 4, 8, device=e.device), t(2, 5, 2, 8, device=e.device), scale=0.35, causal=True, softcap=-2.0), VE, ("softcap: expected None, 0 (off) or a positive finite float", "got -2")),
    Case("scores-window-not-causal", "ops.attention", lambda e: ops.attn_scores(t(2, 3, 4, 8, device=e.device), t(2, 5, 2, 8, device=e.device), scale=0.35, causal=False, window=3), VE, ("window: expected causal=True", "got window=3 with causal=False")),
    Case("scores-window-zero", "ops.attention", lambda e: ops.attn_scores(t(2, 3, 4, 8, device=e.device), t(2, 5, 2, 8, device=e.device), scale=0.35, causal=True, window=0), VE, ("window: expected None or W >= 1", "got 0")),
    # rotary ------------------------------------------------------------------------------------
    Case("rope-x-rank", "ops.rotary", lambda e: rope(e, x=t(2, 3, 32, device=e.device)), VE, ("x: expected a 4-D tensor [B, S, n, Dh]", "got 3-D", "[2, 3, 32]")),
    Case("rope-cos-rank-4", "ops.rotary", lambda e: rope(e, cos=t(1, 3, 1, 6, device=e.device)), VE, ("cos: expected a 3-D tensor [B or 1, S, R]", "got 4-D", "[1, 3, 1, 6]")),
    Case("rope-cos-rank-1", "ops.rotary", lambda e: rope(e, cos=t(6, device=e.device)), VE, ("cos: expected a 3-D tensor [B or 1, S, R]", "got 1-D", "[6]")),
    Case("rope-raw-cos-2d", "ops.rotary", lambda e: rope(e, cos=t(3, 6, device=e.device), sin=t(3, 6, device=e.device), raw=True), VE, ("cos: expected a 3-D tensor [B or 1, S, R]", "got 2-D", "[3, 6]")),
    Case("rope-sin-rank", "ops.rotary", lambda e: rope(e, sin=t(2, 1, 3, 6, device=e.device)), VE, ("sin: expected a 3-D tensor [B or 1, S, R]", "got 4-D", "[2, 1, 3, 6]")),
    Case("rope-cos-S", "ops.rotary", lambda e: rope(e, cos=t(1, 4, 6, device=e.device), sin=t(1, 4, 6, device=e.device)), VE, ("cos: expected shape [B or 1, S, R] = [2 or 1, 3, R]", "got [1, 4, 6]")),
    Case("rope-cos-batch", "ops.rotary", lambda e: rope(e, cos=t(3, 3, 6, device=e.device), sin=t(3, 3, 6, device=e.device)), VE, ("cos: expected shape [B or 1, S, R] = [2 or 1, 3, R]", "got [3, 3, 6]")),
    Case("rope-odd-R", "ops.rotary", lambda e: rope(e, cos=t(1, 3, 5, device=e.device), sin=t(1, 3, 5, device=e.device)), VE, ("cos: expected an even rotary width R with 0 < R <= Dh=8", "got R=5", "[1, 3, 5]")),
    Case("rope-R-past-Dh", "ops.rotary", lambda e: rope(e, cos=t(1, 3, 10, device=e.device), sin=t(1, 3, 10, device=e.device)), VE, ("cos: expected an even rotary width R with 0 < R <= Dh=8", "got R=10")),
    Case("rope-R-zero", "ops.rotary", lambda e: rope(e, cos=t(1, 3, 0, device=e.device), sin=t(1, 3, 0, device=e.device)), VE, ("cos: expected an even rotary width R with 0 < R <= Dh=8", "got R=0")),
    Case("rope-sin-not-cos-shape", "ops.rotary", lambda e: rope(e, sin=t(1, 3, 4, device=e.device)), VE, ("sin: expected the shape of cos [1, 3, 6]", "got [1, 3, 4]")),
    Case("rope-x-integer", "ops.rotary", lambda e: rope(e, x=torch.ones(2, 3, 4, 8, dtype=i64, device=e.device)), TE, ("x: expected a floating-point tensor", "got Long")),
    Case("rope-cos-integer", "ops.rotary", lambda e: rope(e, cos=torch.ones(1, 3, 6, dtype=torch.int32, device=e.device)), TE, ("cos: expected a floating-point tensor", "got Int")),
    Case("rope-sin-bool", "ops.rotary", lambda e: rope(e, sin=torch.ones(1, 3, 6, dtype=torch.bool, device=e.device)), TE, ("sin: expected a floating-point tensor", "got Bool")),
    Case("rope-cos-other-device", "ops.rotary", lambda e: rope(e, cos=t(1, 3, 6, device="cpu")), VE, ("cos: expected device cuda", "(the device of x)", "got cpu"), needs_cuda=True),
    Case("rope-sin-other-device", "ops.rotary", lambda e: rope(e, sin=t(1, 3, 6, device="cpu")), VE, ("sin: expected device cuda", "got cpu"), needs_cuda=True),
    # per_head_proj ------------------------------------------------------------------------------
    Case("proj-x-rank", "ops.per_head_proj", lambda e: php(e, x=t(2, 3, 8, device=e.device)), VE, ("x: expected a 4-D tensor [B, S, n, D]", "got 3-D", "[2, 3, 8]")),
    Case("proj-W-rank", "ops.per_head_proj", lambda e: php(e, W=t(8, 5, device=e.device)), VE, ("W: expected a 3-D tensor [n, D, E]", "got 2-D", "[8, 5]")),
    Case("proj-W-heads", "ops.per_head_proj", lambda e: php(e, W=t(3, 8, 5, device=e.device)), VE, ("W: expected size 4 at dim 0 (n, the head count of x)", "[3, 8, 5]")),
    Case("proj-W-model-dim", "ops.per_head_proj", lambda e: php(e, W=t(4, 7, 5, device=e.device)), VE, ("W: expected size 8 at dim 1 (D, the last dim of x)", "[4, 7, 5]")),
    Case("proj-b-size", "ops.per_head_proj", lambda e: php(e, b=t(4, 6, device=e.device)), VE, ("b: expected size 5 at dim 1 (E, the last dim of W)", "[4, 6]")),
    Case("proj-b-heads", "ops.per_head_proj", lambda e: php(e, b=t(3, 5, device=e.device)), VE, ("b: expected size 4 at dim 0", "[3, 5]")),
    Case("proj-b-rank", "ops.per_head_proj", lambda e: php(e, b=t(20, device=e.device)), VE, ("b: expected a 2-D tensor [n, E]", "got 1-D", "[20]")),
    Case("proj-x-integer", "ops.per_head_proj", lambda e: php(e, x=torch.ones(2, 3, 4, 8, dtype=i64, device=e.device), W=torch.ones(4, 8, 5, dtype=i64, device=e.device)), TE, ("x: expected a floating-point tensor", "got Long")),
    Case("proj-W-dtype", "ops.per_head_proj", lambda e: php(e, W=t(4, 8, 5, dtype=f64, device=e.device)), TE, ("W: expected dtype Float (the dtype of x)", "got Double")),
    Case("proj-b-dtype", "ops.per_head_proj", lambda e: php(e, b=t(4, 5, dtype=torch.bfloat16, device=e.device)), TE, ("b: expected dtype Float (the dtype of x)", "got BFloat16")),
    # split_qkv ----------------------------------------------------------------------------------
    Case("split-unknown-layout", "ops.split_qkv", lambda e: split(e, layout="nope"), VE, ("layout: expected one of", "'blocked'", "got 'nope'")),
    Case("split-unknown-layout-raw-op", "ops.split_qkv", lambda e: _ops.split_qkv(t(8, 16, device=e.device), 4, 2, 2, "nope", True), VE, ("layout: expected one of", "got 'nope'")),
    Case("split-weight-size", "ops.split_qkv", lambda e: split(e, t(8, 18, device=e.device)), VE, ("weight: expected size 16 = (n_heads 4 + 2 * n_kv_heads 2) * d_head 2 at dim 1", "[8, 18]")),
    Case("split-weight-orientation", "ops.split_qkv", lambda e: split(e, t(8, 16, device=e.device), conv1d=False), VE, ("weight: expected size 16", "at dim 0 (Linear stores [out, in])", "[8, 16]")),
    Case("split-weight-rank", "ops.split_qkv", lambda e: split(e, t(8, 16, 1, device=e.device)), VE, ("weight: expected a 2-D tensor", "got 3-D", "[8, 16, 1]")),
    Case("split-bias-size", "ops.split_qkv", lambda e: split(e, bias=t(15, device=e.device)), VE, ("bias: expected shape (16,)", "got (15,)")),
    Case("split-bias-rank", "ops.split_qkv", lambda e: split(e, bias=t(1, 16, device=e.device)), VE, ("bias: expected shape (16,)", "got (1, 16)")),
    Case("split-H-not-multiple-of-Hkv", "ops.split_qkv", lambda e: split(e, t(8, 20, device=e.device), H=4, Hkv=3), VE, ("n_kv_heads: expected a divisor of n_heads=4", "got 3")),
    Case("split-interleaved-gqa", "ops.split_qkv", lambda e: split(e, layout="interleaved"), VE, ("layout: 'interleaved' needs n_kv_heads == n_heads (4)", "n_kv_heads=2")),
    Case("split-codegen-heads", "ops.split_qkv", lambda e: split(e, t(8, 36, device=e.device), H=6, Hkv=6, layout="codegen"), VE, ("layout: 'codegen' needs", "divisible by 4", "n_heads=6")),
    Case("split-d-head-zero", "ops.split_qkv", lambda e: split(e, Dh=0), VE, ("d_head: expected a positive head dim", "got 0")),
    # pack_qkv -----------------------------------------------------------------------------------
    Case("pack-W_Q-rank", "ops.pack_qkv", lambda e: pack(e, t(8, 8, device=e.device)), VE, ("W_Q: expected a 3-D tensor [H, D, Dh]", "got 2-D", "[8, 8]")),
    Case("pack-W_K-model-dim", "ops.pack_qkv", lambda e: pack(e, None, t(2, 7, 2, device=e.device)), VE, ("W_K: expected shape [2, 8, 2]", "[2, 7, 2]")),
    Case("pack-W_V-heads", "ops.pack_qkv", lambda e: pack(e, None, None, t(3, 8, 2, device=e.device)), VE, ("W_V: expected shape [2, 8, 2]", "[3, 8, 2]")),
    Case("pack-W_V-dtype", "ops.pack_qkv", lambda e: pack(e, None, None, t(2, 8, 2, dtype=f64, device=e.device)), TE, ("W_V: expected dtype Float (the dtype of W_Q)", "got Double")),
    Case("pack-H-not-multiple-of-Hkv", "ops.pack_qkv", lambda e: pack(e, None, t(3, 8, 2, device=e.device), t(3, 8, 2, device=e.device)), VE, ("n_kv_heads: expected a divisor of n_heads=4", "got 3")),
    Case("pack-unknown-layout", "ops.pack_qkv", lambda e: pack(e, layout="fused"), VE, ("layout: expected one of", "got 'fused'")),
    Case("pack-b_K-shape", "ops.pack_qkv", lambda e: pack(e, None, None, None, t(4, 2, device=e.device), t(2, 3, device=e.device), t(2, 2, device=e.device)), VE, ("b_K: expected shape (2, 2)", "got (2, 3)")),
    Case("pack-b_V-missing", "ops.pack_qkv", lambda e: pack(e, None, None, None, t(4, 2, device=e.device), t(2, 2, device=e.device), None), VE, ("b_V: expected shape (2, 2)", "got NoneType")),
    # kv_append ----------------------------------------------------------------------------------
    Case("append-start-negative", "ops.kv_append", lambda e: append(e, start=-1), VE, ("start: expected 0 <= start and start + S <= capacity 10", "S = 3", "got start=-1")),
    Case("append-start-past-capacity", "ops.kv_append", lambda e: append(e, start=8), VE, ("start: expected 0 <= start and start + S <= capacity 10", "got start=8")),
    Case("append-k_new-heads", "ops.kv_append", lambda e: append(e, k_new=t(2, 3, 3, 4, device=e.device), v_new=t(2, 3, 3, 4, device=e.device)), VE, ("k_new: expected shape [2, S, 2, 4]", "[2, 3, 3, 4]")),
    Case("append-k_new-batch", "ops.kv_append", lambda e: append(e, k_new=t(1, 3, 2, 4, device=e.device), v_new=t(1, 3, 2, 4, device=e.device)), VE, ("k_new: expected shape [2, S, 2, 4]", "[1, 3, 2, 4]")),
    Case("append-v_new-shape", "ops.kv_append", lambda e: append(e, v_new=t(2, 4, 2, 4, device=e.device)), VE, ("v_new: expected the shape of k_new [2, 3, 2, 4]", "[2, 4, 2, 4]")),
    Case("append-v_cache-shape", "ops.kv_append", lambda e: append(e, v_cache=t(2, 2, 12, 4, device=e.device)), VE, ("v_cache: expected the shape of k_cache [2, 2, 10, 4]", "[2, 2, 12, 4]")),
    Case("append-k_cache-rank", "ops.kv_append", lambda e: append(e, k_cache=t(2, 10, 4, device=e.device), v_cache=t(2, 10, 4, device=e.device)), VE, ("k_cache: expected a 4-D tensor [B, Hkv, capacity, Dh]", "got 3-D", "[2, 10, 4]")),
    Case("append-k_new-rank", "ops.kv_append", lambda e: append(e, k_new=t(2, 3, 8, device=e.device), v_new=t(2, 3, 8, device=e.device)), VE, ("k_new: expected a 4-D tensor [B, S, Hkv, Dh]", "[2, 3, 8]")),
    Case("append-caches-alias", "ops.kv_append", lambda e: (lambda c: append(e, k_cache=c, v_cache=c))(t(2, 2, 10, 4, device=e.device)), VE, ("v_cache: expected a tensor that does not overlap k_cache",)),
    Case("append-k_new-dtype", "ops.kv_append", lambda e: append(e, k_new=t(2, 3, 2, 4, dtype=f64, device=e.device), v_new=t(2, 3, 2, 4, dtype=f64, device=e.device)), TE, ("k_new: expected dtype Float (the dtype of k_cache)", "got Double")),
]
# fmt: on

# fmt: off
OP_CASES += [
    # attention ----------------------------------------------------------------------------------
    Case("attn-H-zero", "ops.attention", lambda e: attn(e, q=t(2, 3, 0, 8, device=e.device)), VE, ("q: expected H > 0 heads of Dh > 0 features", "[2, 3, 0, 8]")),
    Case("attn-Dh-zero", "ops.attention", lambda e: attn(e, q=t(2, 3, 4, 0, device=e.device), k=t(2, 5, 2, 0, device=e.device), v=t(2, 5, 2, 0, device=e.device)), VE, ("q: expected H > 0 heads of Dh > 0 features", "[2, 3, 4, 0]")),
    Case("attn-Hkv-zero", "ops.attention", lambda e: attn(e, k=t(2, 5, 0, 8, device=e.device), v=t(2, 5, 0, 8, device=e.device)), VE, ("k: expected a KV head count that divides H=4", "got Hkv=0")),
    Case("attn-mask-rank-0", "ops.attention", lambda e: attn(e, mask=torch.tensor(1.0, device=e.device)), VE, ("mask: expected a 2-D padding mask [B, K] or a 4-D additive mask", "got 0-D")),
    Case("attn-mask-rank-1", "ops.attention", lambda e: attn(e, mask=torch.ones(5, device=e.device)), VE, ("mask: expected a 2-D padding mask", "got 1-D", "[5]")),
    Case("attn-mask-rank-5", "ops.attention", lambda e: attn(e, mask=t(2, 1, 1, 3, 5, device=e.device)), VE, ("mask: expected a 2-D padding mask", "got 5-D")),
    Case("attn-mask-4d-batch", "ops.attention", lambda e: attn(e, mask=t(3, 1, 3, 5, device=e.device)), VE, ("mask: expected a 4-D additive mask [B or 1, 1 or H, S, K] = [2, 1 or 4, 3, 5]", "[3, 1, 3, 5]")),
    Case("attn-mask-2d-batch", "ops.attention", lambda e: attn(e, mask=torch.ones(3, 5, dtype=torch.bool, device=e.device)), VE, ("mask: expected a 2-D padding mask [B, K] = [2, 5]", "[3, 5]")),
    Case("attn-q-complex", "ops.attention", lambda e: attn(e, q=t(2, 3, 4, 8, device=e.device).to(torch.complex64)), TE, ("q: expected a floating-point tensor", "got ComplexFloat")),
    Case("attn-q-bool", "ops.attention", lambda e: attn(e, q=torch.ones(2, 3, 4, 8, dtype=torch.bool, device=e.device)), TE, ("q: expected a floating-point tensor", "got Bool")),
    Case("attn-q-None", "ops.attention", lambda e: ops.attention(None, t(2, 5, 2, 8, device=e.device), t(2, 5, 2, 8, device=e.device), scale=0.3, causal=True), TE, ("q: expected a tensor [B, S, H, Dh]", "got None")),
    Case("attn-q-not-a-tensor", "ops.attention", lambda e: attn(e, q=[[1.0]]), RE, ("Expected a value of type 'Tensor' for argument 'q'", "found type 'list'")),
    Case("attn-mask-not-a-tensor", "ops.attention", lambda e: attn(e, mask=[[1, 1, 1, 1, 1]] * 2), RE, ("for argument 'mask'", "found type 'list'")),
    Case("attn-v-other-device", "ops.attention", lambda e: attn(e, v=t(2, 5, 2, 8, device="cpu")), VE, ("v: expected device cuda", "got cpu"), needs_cuda=True),
    Case("attn-mask-other-device", "ops.attention", lambda e: attn(e, mask=torch.ones(2, 5, dtype=torch.bool)), VE, ("mask: expected device cuda", "got cpu"), needs_cuda=True),
    # a 2-D float mask other than 0 / 1 (issue 21 item 4): refused, never read as "nonzero = attend"
    Case("attn-mask-2d-float-additive", "ops.attention", lambda e: attn(e, mask=additive_2d(2, 5, device=e.device)), VE, (f"mask: {FLOAT_2D}", "got -3.40282e+38 at [0, 0]", ADDITIVE_4D, "or pass a bool or integer padding mask")),
    Case("attn-mask-2d-float-nan", "ops.attention", lambda e: attn(e, mask=float_2d(2, 5, float("nan"), (1, 3), device=e.device)), VE, (f"mask: {FLOAT_2D}", "got nan at [1, 3]")),
    Case("attn-mask-2d-float-two", "ops.attention", lambda e: attn(e, mask=float_2d(2, 5, 2.0, (0, 4), device=e.device)), VE, (f"mask: {FLOAT_2D}", "got 2 at [0, 4]")),
    Case("attn-mask-2d-half-neg-inf", "ops.attention", lambda e: attn(e, mask=float_2d(2, 5, float("-inf"), (1, 0), dtype=torch.float16, device=e.device)), VE, (f"mask: {FLOAT_2D}", "got -inf at [1, 0]")),
    Case("attn-mask-2d-float-strided", "ops.attention", lambda e: attn(e, mask=additive_2d(5, 2, device=e.device, hide=1).t()), VE, (f"mask: {FLOAT_2D}", "at [1, 0]")),
    Case("scores-mask-2d-float-additive", "ops.attention", lambda e: scores(e, mask=additive_2d(2, 5, device=e.device, hide=2)), VE, (f"mask: {FLOAT_2D}", "at [0, 2]", ADDITIVE_4D)),
    Case("plan-mask-2d-float-additive", "ops.attention", lambda e: ops.attention_plan(_q(e), _k(e), _k(e), scale=0.3, causal=True, mask=additive_2d(2, 5, device=e.device)), VE, (f"mask: {FLOAT_2D}",)),
    Case("raw-check_padding_mask-values", "ops.attention", lambda e: _ops.check_padding_mask(float_2d(2, 5, 0.5, (0, 1), device=e.device), "mask"), VE, (f"mask: {FLOAT_2D}", "got 0.5 at [0, 1]")),
    Case("raw-check_padding_mask-rank", "ops.attention", lambda e: _ops.check_padding_mask(torch.ones(5, device=e.device), "attention_mask"), VE, ("attention_mask: expected a 2-D tensor [B, K] (a padding mask)", "got 1-D")),
    Case("raw-check_padding_mask-complex", "ops.attention", lambda e: _ops.check_padding_mask(torch.ones(2, 5, dtype=torch.complex64, device=e.device), "mask"), TE, ("mask: expected a bool, integer or float padding mask", "got ComplexFloat")),
    # split form ---------------------------------------------------------------------------------
    Case("scores-k-rank", "ops.attention", lambda e: scores(e, k=t(2, 5, 16, device=e.device)), VE, ("k: expected a 4-D tensor [B, K, Hkv, Dh]", "[2, 5, 16]")),
    Case("scores-Hkv-zero", "ops.attention", lambda e: scores(e, k=t(2, 5, 0, 8, device=e.device)), VE, ("k: expected a KV head count that divides H=4", "Hkv=0")),
    Case("scores-mask-rank-3", "ops.attention", lambda e: scores(e, mask=t(2, 3, 5, device=e.device)), VE, ("mask: expected a 2-D padding mask [B, K] or a 4-D additive mask", "[2, 3, 5]")),
    Case("scores-mask-4d-shape", "ops.attention", lambda e: scores(e, mask=t(2, 1, 4, 5, device=e.device)), VE, ("mask: expected a 4-D additive mask", "[2, 1, 4, 5]")),
    Case("scores-mask-not-a-tensor", "ops.attention", lambda e: scores(e, mask=[[1] * 5] * 2), TE, ("mask: expected a Tensor or None", "got list")),
    Case("scores-k-other-device", "ops.attention", lambda e: scores(e, k=t(2, 5, 2, 8, device="cpu")), VE, ("k: expected device cuda", "got cpu"), needs_cuda=True),
    Case("softmax-not-a-tensor", "ops.attention", lambda e: ops.attn_softmax([[0.0]]), TE, ("scores: expected a floating-point tensor [B, H, S, K]", "got list")),
    Case("apply-pattern-integer", "ops.attention", lambda e: ops.attn_apply(torch.ones(2, 4, 3, 5, dtype=i64, device=e.device), t(2, 5, 2, 8, device=e.device)), TE, ("pattern: expected a floating-point tensor", "got Long")),
    Case("apply-v-H-not-multiple", "ops.attention", lambda e: ops.attn_apply(t(2, 4, 3, 5, device=e.device), t(2, 5, 3, 8, device=e.device)), VE, ("v: expected shape [2, 5, Hkv, Dh] with Hkv dividing H=4", "[2, 5, 3, 8]")),
    Case("apply-v-rank", "ops.attention", lambda e: ops.attn_apply(t(2, 4, 3, 5, device=e.device), t(2, 5, 16, device=e.device)), VE, ("v: expected a 4-D tensor [B, K, Hkv, Dh]", "[2, 5, 16]")),
    # per_head_proj ------------------------------------------------------------------------------
    Case("proj-x-complex", "ops.per_head_proj", lambda e: php(e, x=t(2, 3, 4, 8, device=e.device).to(torch.complex64)), TE, ("x: expected a floating-point tensor", "got ComplexFloat")),
    Case("proj-W-None", "ops.per_head_proj", lambda e: ops.per_head_proj(t(2, 3, 4, 8, device=e.device), None), TE, ("W: expected a tensor [n, D, E]", "got None")),
    Case("proj-x-not-a-tensor", "ops.per_head_proj", lambda e: php(e, x=[1.0]), RE, ("for argument 'x'", "found type 'list'")),
    Case("proj-b-other-device", "ops.per_head_proj", lambda e: php(e, b=t(4, 5, device="cpu")), VE, ("b: expected device cuda", "got cpu"), needs_cuda=True),
    Case("proj-W-other-device", "ops.per_head_proj", lambda e: php(e, W=t(4, 8, 5, device="cpu")), VE, ("W: expected device cuda", "got cpu"), needs_cuda=True),
    # split_qkv / pack_qkv -----------------------------------------------------------------------
    Case("split-weight-complex", "ops.split_qkv", lambda e: split(e, t(8, 16, device=e.device).to(torch.complex64)), TE, ("weight: expected a real tensor", "got ComplexFloat")),
    Case("split-counts-overflow", "ops.split_qkv", lambda e: split(e, H=2**62, Hkv=2**61), VE, ("expected (n_heads + 2 * n_kv_heads) * d_head to fit in int64", "n_heads=4611686018427387904")),
    Case("split-n_heads-negative", "ops.split_qkv", lambda e: split(e, H=-4), VE, ("n_heads: expected a positive head count", "got -4")),
    Case("split-n_heads-not-int", "ops.split_qkv", lambda e: split(e, H="4"), RE, ("Expected a value of type 'int' for argument 'n_heads'", "found type 'str'")),
    Case("split-layout-None", "ops.split_qkv", lambda e: split(e, layout=None), VE, ("layout: expected one of", "got None")),
    Case("pack-W_Q-complex", "ops.pack_qkv", lambda e: pack(e, t(4, 8, 2, device=e.device).to(torch.complex64)), TE, ("W_Q: expected a real tensor", "got ComplexFloat")),
    Case("pack-W_K-no-heads", "ops.pack_qkv", lambda e: pack(e, None, t(0, 8, 2, device=e.device), t(0, 8, 2, device=e.device)), VE, ("n_kv_heads: expected a positive head count", "got 0")),
    Case("pack-W_K-None", "ops.pack_qkv", lambda e: ops.pack_qkv(t(4, 8, 2, device=e.device), None, t(2, 8, 2, device=e.device)), TE, ("W_K: expected a tensor [Hkv, D, Dh]", "got None")),
    Case("pack-W_V-rank", "ops.pack_qkv", lambda e: pack(e, None, None, t(2, 16, device=e.device)), VE, ("W_V: expected a 3-D tensor [Hkv, D, Dh]", "got 2-D", "[2, 16]")),
    Case("pack-W_K-other-device", "ops.pack_qkv", lambda e: pack(e, None, t(2, 8, 2, device="cpu")), VE, ("W_K: expected device cuda", "got cpu"), needs_cuda=True),
    # kv_append ----------------------------------------------------------------------------------
    Case("append-start-overflow", "ops.kv_append", lambda e: append(e, start=2**63 - 2), VE, ("start: expected 0 <= start and start + S <= capacity 10", "got start=9223372036854775806")),
    Case("append-start-not-int", "ops.kv_append", lambda e: _ops.kv_append(t(2, 2, 10, 4), t(2, 2, 10, 4), t(2, 3, 2, 4), t(2, 3, 2, 4), 1.5), RE, ("Expected a value of type 'int' for argument 'start'", "found type 'float'")),
    Case("append-v_cache-None", "ops.kv_append", lambda e: _ops.kv_append(t(2, 2, 10, 4), None, t(2, 3, 2, 4), t(2, 3, 2, 4), 0), TE, ("v_cache: expected a tensor [B, Hkv, capacity, Dh]", "got None")),
    Case("append-v_new-None", "ops.kv_append", lambda e: _ops.kv_append(t(2, 2, 10, 4), t(2, 2, 10, 4), t(2, 3, 2, 4), None, 0), TE, ("v_new: expected a tensor [B, S, Hkv, Dh]", "got None")),
    Case("append-k_cache-expanded", "ops.kv_append", lambda e: append(e, k_cache=t(2, 2, 1, 4, device=e.device).expand(2, 2, 10, 4)), VE, ("k_cache: expected a tensor whose elements do not share memory", "zero stride", "[8, 4, 0, 1]")),
    Case("append-v_cache-expanded", "ops.kv_append", lambda e: append(e, v_cache=t(1, 2, 10, 4, device=e.device).expand(2, 2, 10, 4)), VE, ("v_cache: expected a tensor whose elements do not share memory", "[0, 40, 4, 1]")),
    Case("append-caches-overlapping-windows", "ops.kv_append", lambda e: (lambda buf: append(e, k_cache=buf[:, :, 0:10], v_cache=buf[:, :, 5:15]))(t(2, 2, 20, 4, device=e.device)), VE, ("v_cache: expected a tensor that does not overlap k_cache",)),
    Case("append-k_new-in-its-rows", "ops.kv_append", with_cache(lambda e, c: append(e, k_cache=c, k_new=c[:, :, 2:5].transpose(1, 2), start=4)), VE, ("k_new: expected a tensor that does not overlap the k_cache rows it is written to",)),
    Case("append-v_new-in-k-rows", "ops.kv_append", with_cache(lambda e, c: append(e, k_cache=c, v_new=c[:, :, 4:7].transpose(1, 2), start=4)), VE, ("v_new: expected a tensor that does not overlap the k_cache rows written before it is read",)),
    Case("append-v_cache-dtype", "ops.kv_append", lambda e: append(e, v_cache=t(2, 2, 10, 4, dtype=f64, device=e.device)), TE, ("v_cache: expected dtype Float (the dtype of k_cache)", "got Double")),
    Case("append-v_new-other-device", "ops.kv_append", lambda e: append(e, v_new=t(2, 3, 2, 4, device="cpu")), VE, ("v_new: expected device cuda", "got cpu"), needs_cuda=True),
]


def ctor(e, **override):
    """Bridge(...) with the good arguments of make_bridge except those overridden."""
    kw = dict(e.w, n_heads=H, n_kv_heads=HKV, d_head=DH)
    kw.update(override)
    return pyqkv.Bridge(kw.pop("weight"), kw.pop("bias"), kw.pop("out_weight"), kw.pop("out_bias"), **kw)


class FlattensZ:  # a rule class, passed where an instance belongs
    def convert(self, t):
        return t.flatten()

    def revert(self, t):
        return t


def _boom(tensor, hook):
    raise RuntimeError("boom: the hook's own error")


CONSTRUCTION_CASES = [
    Case("ctor-weight-None", "Bridge()", lambda e: ctor(e, weight=None), TE, ("weight: expected a floating-point Tensor", "got NoneType")),
    Case("ctor-weight-integer", "Bridge()", lambda e: ctor(e, weight=torch.ones(D, N_OUT, dtype=i64)), TE, ("weight: expected a floating-point Tensor", "torch.int64")),
    Case("ctor-weight-rank", "Bridge()", lambda e: ctor(e, weight=t(D * N_OUT, device=e.device)), VE, ("weight: expected a 2-D tensor", "got 1-D")),
    Case("ctor-weight-width", "Bridge()", lambda e: ctor(e, weight=t(D, 60, device=e.device)), VE, ("weight: expected size 64 = (n_heads 4 + 2 * n_kv_heads 2) * d_head 8 at dim 1", "[32, 60]")),
    Case("ctor-weight-orientation", "Bridge()", lambda e: ctor(e, conv1d=False), VE, ("weight: expected size 64", "Linear stores [out, in]", "[32, 64]")),
    Case("ctor-bias-shape", "Bridge()", lambda e: ctor(e, bias=t(60, device=e.device)), VE, ("bias: expected shape (64,)", "got (60,)")),
    Case("ctor-bias-not-a-tensor", "Bridge()", lambda e: ctor(e, bias=[0.0] * N_OUT), VE, ("bias: expected shape (64,)", "got list")),
    Case("ctor-out_weight-shape", "Bridge()", lambda e: ctor(e, out_weight=t(D, 30, device=e.device)), VE, ("out_weight: expected shape (32, 32) (conv1d [H*Dh, D])", "got (32, 30)")),
    Case("ctor-out_weight-None", "Bridge()", lambda e: ctor(e, out_weight=None), TE, ("out_weight: expected a floating-point Tensor", "got NoneType")),
    Case("ctor-out_bias-shape", "Bridge()", lambda e: ctor(e, out_bias=t(30, device=e.device)), VE, ("out_bias: expected shape (32,)", "(30,)")),
    Case("ctor-n_heads-zero", "Bridge()", lambda e: ctor(e, n_heads=0), VE, ("n_heads: expected a positive int", "got 0")),
    Case("ctor-n_heads-float", "Bridge()", lambda e: ctor(e, n_heads=4.0), VE, ("n_heads: expected a positive int", "got 4.0")),
    Case("ctor-H-not-multiple-of-Hkv", "Bridge()", lambda e: ctor(e, n_kv_heads=3), VE, ("n_kv_heads: expected a positive divisor of n_heads=4", "got 3")),
    Case("ctor-n_kv_heads-zero", "Bridge()", lambda e: ctor(e, n_kv_heads=0), VE, ("n_kv_heads: expected a positive divisor of n_heads=4", "got 0")),
    Case("ctor-d_head-zero", "Bridge()", lambda e: ctor(e, d_head=0), VE, ("d_head: expected a positive int", "got 0")),
    Case("ctor-layout-unknown", "Bridge()", lambda e: ctor(e, layout="fused"), VE, ("layout: expected one of", "'blocked'", "got 'fused'")),
    Case("ctor-layout-interleaved-gqa", "Bridge()", lambda e: ctor(e, layout="interleaved"), VE, ("layout: 'interleaved' needs n_kv_heads == n_heads (4)", "n_kv_heads=2")),
    Case("ctor-layout-codegen-heads", "Bridge()", lambda e: ctor(e, layout="codegen"), VE, ("layout: 'codegen' needs n_kv_heads == n_heads", "n_kv_heads=2")),
    Case("ctor-flags-exclusive", "Bridge()", lambda e: ctor(e, use_split_qkv_input=True, use_attn_in=True), VE, ("use_attn_in: cannot be set while use_split_qkv_input is set", "mutually exclusive")),
    Case("ctor-flag-not-bool", "Bridge()", lambda e: ctor(e, use_attn_result=1), TE, ("use_attn_result: expected a bool", "got int")),
    Case("ctor-rotary_dim-odd", "Bridge()", lambda e: ctor(e, rotary_dim=3), VE, ("rotary_dim: expected None or an even int in [2, d_head=8]", "got 3")),
    Case("ctor-rotary_dim-above-d_head", "Bridge()", lambda e: ctor(e, rotary_dim=16), VE, ("rotary_dim: expected None or an even int in [2, d_head=8]", "got 16")),
    Case("ctor-rotary_base", "Bridge()", lambda e: ctor(e, rotary_dim=4, rotary_base=0.5), VE, ("rotary_base: expected a number > 1", "got 0.5")),
    Case("ctor-alibi-not-bool", "Bridge()", lambda e: ctor(e, alibi=1), TE, ("alibi: expected a bool", "got int")),
    Case("ctor-layer-scale-without-layer_idx", "Bridge()", lambda e: ctor(e, scale_attn_by_inverse_layer_idx=True), VE, ("layer_idx: expected an int when scale_attn_by_inverse_layer_idx is set", "got None")),
    # conversion rules, checked when the Bridge is built
    Case("ctor-conversion-unknown-point", "Bridge()", lambda e: ctor(e, hook_conversions={"hook_nope": "a -> a"}), KeyError, ("hook_conversions: unknown hook points ['hook_nope']", "hook_pattern")),
    Case("ctor-conversion-not-a-rule", "Bridge()", lambda e: ctor(e, hook_conversions={"hook_z": 42}), TE, ("hook_conversions['hook_z']: expected an einops pattern string or an object with convert() and revert()", "got int")),
    Case("ctor-conversion-a-class", "Bridge()", lambda e: ctor(e, hook_conversions={"hook_z": FlattensZ}), TE, ("hook_conversions['hook_z']", "got the class FlattensZ (pass an instance)")),
    Case("ctor-conversion-no-arrow", "Bridge()", lambda e: ctor(e, hook_conversions={"hook_z": "b s h d"}), VE, ("hook_conversions['hook_z']: expected one 'kernel layout -> hook format' pattern", "got 'b s h d'")),
    Case("ctor-conversion-two-arrows", "Bridge()", lambda e: ctor(e, hook_conversions={"hook_in": "b s d -> b d s -> s"}), VE, ("hook_conversions['hook_in']: expected one 'kernel layout -> hook format' pattern",)),
    Case("ctor-conversion-other-axes", "Bridge()", lambda e: ctor(e, hook_conversions={"hook_z": "b s (h d) -> b s h e"}), VE, ("hook_conversions['hook_z']: expected the same axes on both sides", "['b', 'd', 'h', 's'] -> ['b', 'e', 'h', 's']")),
    Case("ctor-conversion-kernel-rank", "Bridge()", lambda e: ctor(e, hook_conversions={"o.hook_in": "b h s d -> b s h d"}), VE, ("hook_conversions['hook_z']: expected 3 axes on the left", "kernel layout of hook_z is 3-D", "got 4")),
    Case("ctor-conversion-pattern-rank", "Bridge()", lambda e: ctor(e, hook_conversions={"hook_pattern": "b h s -> b s h"}), VE, ("hook_conversions['hook_pattern']: expected 4 axes on the left", "got 3")),
    Case("ctor-conversion-uninferable", "Bridge()", lambda e: ctor(e, hook_conversions={"hook_q": "b s (h e) -> b s h e"}), VE, ("hook_conversions['hook_q']: convert cannot infer the sizes of ['h', 'e']", "only d (= d_head) is given")),
    Case("ctor-conversion-uninferable-revert", "Bridge()", lambda e: ctor(e, hook_conversions={"hook_pattern": "b h s k -> b (h s) k"}), VE, ("hook_conversions['hook_pattern']: revert cannot infer the sizes of ['h', 's']",)),
    Case("ctor-conversion-duplicate-axis", "Bridge()", lambda e: ctor(e, hook_conversions={"hook_z": "b s (h d) -> b s h h"}), VE, ("hook_conversions['hook_z']: cannot parse the pattern", "duplicate dimension \"h\"")),
]


def other_bridge_cache(e, **kw):
    """A KVCache filled by a Bridge of another head shape (or dtype)."""
    n_heads, n_kv, d_head, dtype = kw.get("H", H), kw.get("Hkv", HKV), kw.get("Dh", DH), kw.get("dtype", torch.float32)
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(device=e.device, dtype=dtype)  # noqa: E731
    b = pyqkv.Bridge(r(D, (n_heads + 2 * n_kv) * d_head), None, r(n_heads * d_head, D), None, n_heads=n_heads,
                     n_kv_heads=n_kv, d_head=d_head)
    cache = KVCache()
    with torch.no_grad():
        b(r(2, 2, D), kv_cache=cache)
    return cache


def fwd(e, x=None, **kw):
    return e.bridge(e.x_new if x is None else x, kv_cache=e.cache, **kw)


FORWARD_CASES = [
    Case("fwd-x-None", "Bridge.forward", lambda e: e.bridge(None), TE, ("x: expected a Tensor [B, S, D=32]", "got NoneType")),
    Case("fwd-x-rank-2", "Bridge.forward", lambda e: fwd(e, e.x_new[0]), VE, ("x: expected shape [B, S, D=32]", "got (3, 32)")),
    Case("fwd-x-rank-4", "Bridge.forward", lambda e: fwd(e, e.x_new[None]), VE, ("x: expected shape [B, S, D=32]", "got (1, 2, 3, 32)")),
    Case("fwd-x-model-dim", "Bridge.forward", lambda e: fwd(e, e.x_new[..., :16]), VE, ("x: expected shape [B, S, D=32]", "got (2, 3, 16)")),
    Case("fwd-x-dtype", "Bridge.forward", lambda e: fwd(e, e.x_new.double()), TE, ("x: expected torch.float32 on {device} (the Bridge's weights)", "got torch.float64")),
    Case("fwd-x-integer", "Bridge.forward", lambda e: fwd(e, e.x_new.long()), TE, ("x: expected torch.float32", "got torch.int64")),
    Case("fwd-x-other-device", "Bridge.forward", lambda e: fwd(e, e.x_new.to(e.other)), TE, ("x: expected torch.float32 on {device}", "on {other}")),
    Case("fwd-mask-not-a-tensor", "Bridge.forward", lambda e: fwd(e, attention_mask=[[1] * 7] * 2), TE, ("attention_mask: expected a Tensor or None", "got list")),
    Case("fwd-mask-rank-1", "Bridge.forward", lambda e: fwd(e, attention_mask=torch.ones(7, device=e.device)), VE, ("attention_mask: expected None, a padding mask [B, K] or a 4-D mask", "got 1-D (7,)")),
    Case("fwd-mask-rank-3", "Bridge.forward", lambda e: fwd(e, attention_mask=torch.ones(2, 3, 7, device=e.device)), VE, ("attention_mask: expected None, a padding mask [B, K] or a 4-D mask", "got 3-D (2, 3, 7)")),
    Case("fwd-mask-rank-5", "Bridge.forward", lambda e: fwd(e, attention_mask=torch.zeros(2, 1, 1, 3, 7, device=e.device)), VE, ("attention_mask: expected None", "got 5-D")),
    Case("fwd-mask-2d-new-positions-only", "Bridge.forward", lambda e: fwd(e, attention_mask=torch.ones(2, 3, device=e.device)), VE, ("attention_mask: expected a padding mask [B, K] = [2, 7] (K = cached + new positions)", "got (2, 3)")),
    Case("fwd-mask-2d-batch", "Bridge.forward", lambda e: fwd(e, attention_mask=torch.ones(3, 7, device=e.device)), VE, ("attention_mask: expected a padding mask [B, K] = [2, 7]", "got (3, 7)")),
    Case("fwd-mask-2d-complex", "Bridge.forward", lambda e: fwd(e, attention_mask=torch.ones(2, 7, dtype=torch.complex64, device=e.device)), TE, ("attention_mask: expected bool, integer or float", "torch.complex64")),
    Case("fwd-mask-4d-integer", "Bridge.forward", lambda e: fwd(e, attention_mask=torch.zeros(2, 1, 3, 7, dtype=i64, device=e.device)), TE, ("attention_mask: expected a float additive or bool 4-D mask", "torch.int64")),
    Case("fwd-mask-4d-queries", "Bridge.forward", lambda e: fwd(e, attention_mask=torch.zeros(2, 1, 7, 7, device=e.device)), VE, ("attention_mask: expected a 4-D mask [B or 1, 1 or H, S, K] = [2, 1 or 4, 3, 7]", "got (2, 1, 7, 7)")),
    Case("fwd-mask-4d-heads", "Bridge.forward", lambda e: fwd(e, attention_mask=torch.zeros(2, 2, 3, 7, device=e.device)), VE, ("attention_mask: expected a 4-D mask", "got (2, 2, 3, 7)")),
    Case("fwd-mask-other-device", "Bridge.forward", lambda e: fwd(e, attention_mask=torch.ones(2, 7, device=e.other)), VE, ("attention_mask: expected device {device}", "got {other}")),
    Case("fwd-mask-2d-float-additive", "Bridge.forward", lambda e: fwd(e, attention_mask=additive_2d(2, 7, device=e.device)), VE, (f"attention_mask: {FLOAT_2D}", "got -3.40282e+38 at [0, 0]", ADDITIVE_4D)),
    Case("fwd-mask-2d-float-two", "Bridge.forward", lambda e: fwd(e, attention_mask=float_2d(2, 7, 2.0, (1, 6), device=e.device)), VE, (f"attention_mask: {FLOAT_2D}", "got 2 at [1, 6]")),
    Case("fwd-mask-2d-float-nan-no-cache", "Bridge.forward", lambda e: e.bridge(e.x_new, attention_mask=float_2d(2, 3, float("nan"), (0, 2), device=e.device)), VE, (f"attention_mask: {FLOAT_2D}", "got nan at [0, 2]")),
    # positions: RoPE tables or ids, and ALiBi biases
    Case("fwd-position_ids-without-rotary", "Bridge.forward", lambda e: fwd(e, position_ids=torch.arange(3, device=e.device)[None]), VE, ("position_ids: this layer has no rotary embedding (rotary_dim is None)", "got Tensor")),
    Case("fwd-position_ids-float", "Bridge.forward", lambda e: rotary_fwd(e, position_ids=torch.zeros(2, 3, device=e.device)), TE, ("position_ids: expected an integer Tensor [B or 1, S]", "torch.float32")),
    Case("fwd-position_ids-shape", "Bridge.forward", lambda e: rotary_fwd(e, position_ids=torch.zeros(2, 4, dtype=i64, device=e.device)), VE, ("position_ids: expected shape [B or 1, S] = [2 or 1, 3]", "got (2, 4)")),
    Case("fwd-position_ids-other-device", "Bridge.forward", lambda e: rotary_fwd(e, position_ids=torch.zeros(2, 3, dtype=i64, device=e.other)), VE, ("position_ids: expected device {device}", "got {other}")),
    Case("fwd-position_embeddings-not-a-pair", "Bridge.forward", lambda e: rotary_fwd(e, position_embeddings=torch.ones(2, 3, 4, device=e.device)), TE, ("position_embeddings: expected a pair (cos, sin) of [B or 1, S, 4] tensors", "got Tensor (2, 3, 4)")),
    Case("fwd-position_embeddings-width", "Bridge.forward", lambda e: rotary_fwd(e, position_embeddings=(torch.ones(2, 3, 6, device=e.device),) * 2), VE, ("position_embeddings (cos): expected shape [B or 1, S, rotary_dim] = [2 or 1, 3, 4]", "got (2, 3, 6)")),
    Case("fwd-position_embeddings-integer", "Bridge.forward", lambda e: rotary_fwd(e, position_embeddings=(torch.ones(2, 3, 4, dtype=i64, device=e.device), torch.ones(2, 3, 4, device=e.device))), TE, ("position_embeddings (cos): expected a floating-point Tensor", "torch.int64")),
    Case("fwd-position_embeddings-cos-sin-shapes", "Bridge.forward", lambda e: rotary_fwd(e, position_embeddings=(torch.ones(2, 3, 4, device=e.device), torch.ones(1, 3, 4, device=e.device))), VE, ("position_embeddings (sin): expected the shape of cos [2, 3, 4]", "got [1, 3, 4]")),
    Case("fwd-alibi-without-alibi", "Bridge.forward", lambda e: fwd(e, alibi=torch.zeros(2, H, 7, device=e.device)), VE, ("alibi: this layer has no ALiBi (alibi=False)",)),
    Case("fwd-alibi-keys", "Bridge.forward", lambda e: alibi_fwd(e, alibi=torch.zeros(2, H, 5, device=e.device)), VE, ("alibi: expected a per-key bias [B or 1, H or 1, K] = [2, 4, 3] (or [B*H, 1, K])", "got (2, 4, 5)")),
    Case("fwd-alibi-integer", "Bridge.forward", lambda e: alibi_fwd(e, alibi=torch.zeros(2, H, 3, dtype=i64, device=e.device)), TE, ("alibi: expected a floating-point Tensor [B, H, K]", "torch.int64")),
    Case("fwd-alibi-other-device", "Bridge.forward", lambda e: alibi_fwd(e, alibi=torch.zeros(2, H, 3, device=e.other)), VE, ("alibi: expected device {device}", "got {other}")),
    Case("fwd-kv_cache-not-a-KVCache", "Bridge.forward", lambda e: e.bridge(e.x_new, kv_cache=(e.cache.keys, e.cache.values)), TE, ("kv_cache: expected a pyqkv.KVCache or None", "got tuple")),
    Case("fwd-kv_cache-other-batch", "Bridge.forward", lambda e: fwd(e, torch.cat([e.x_new, e.x_new[:1]])), VE, ("kv_cache: holds batch 2, 2 KV heads of dim 8, torch.float32", "got new keys of shape (3, 3, 2, 8)")),
    Case("fwd-kv_cache-other-kv-heads", "Bridge.forward", lambda e: e.bridge(e.x_new, kv_cache=other_bridge_cache(e, H=4, Hkv=4)), VE, ("kv_cache: holds batch 2, 4 KV heads of dim 8", "got new keys of shape (2, 3, 2, 8)", "fresh KVCache")),
    Case("fwd-kv_cache-other-head-dim", "Bridge.forward", lambda e: e.bridge(e.x_new, kv_cache=other_bridge_cache(e, H=2, Hkv=2, Dh=16)), VE, ("kv_cache: holds batch 2, 2 KV heads of dim 16", "got new keys of shape (2, 3, 2, 8)")),
    Case("fwd-kv_cache-other-dtype", "Bridge.forward", lambda e: e.bridge(e.x_new, kv_cache=other_bridge_cache(e, dtype=f64)), VE, ("kv_cache: holds batch 2, 2 KV heads of dim 8, torch.float64", "got new keys of shape (2, 3, 2, 8) (torch.float32")),
    Case("fwd-kv_cache-mask-for-K-without-cache", "Bridge.forward", lambda e: fwd(e, attention_mask=torch.zeros(2, 1, 3, 3, device=e.device)), VE, ("attention_mask: expected a 4-D mask [B or 1, 1 or H, S, K] = [2, 1 or 4, 3, 7]", "got (2, 1, 3, 3)")),
]


def rotary_fwd(e, **kw):
    return e.bridge_with(rotary_dim=4)(e.x_new, **kw)


def alibi_fwd(e, **kw):
    return e.bridge_with(alibi=True)(e.x_new, **kw)


def hooked(e, point, fn, *, bridge=None, **flags):
    """One forward of x_new through the cache with `fn` at `point` (on a Bridge with `flags` when given)."""
    b = bridge or (e.bridge_with(**flags) if flags else e.bridge)
    cache = e.cache if b is e.bridge else None
    return b.run_with_hooks(e.x_new, fwd_hooks=[(point, fn)], kv_cache=cache)


# (point, flags that make it fire, its hook-format shape for x_new [2, 3, D] after the 4 cached positions)
HOOK_POINTS = [
    ("hook_in", {}, (2, 3, D)),
    ("hook_q", {}, (2, 3, H, DH)),
    ("hook_k", {}, (2, 3, HKV, DH)),
    ("hook_v", {}, (2, 3, HKV, DH)),
    ("hook_attn_scores", {}, (2, H, 3, 7)),
    ("hook_pattern", {}, (2, H, 3, 7)),
    ("hook_z", {}, (2, 3, H, DH)),
    ("hook_out", {}, (2, 3, D)),
    ("hook_attn_in", {"use_attn_in": True}, (2, 3, H, D)),
    ("hook_q_input", {"use_split_qkv_input": True}, (2, 3, H, D)),
    ("hook_k_input", {"use_split_qkv_input": True}, (2, 3, HKV, D)),
    ("hook_result", {"use_attn_result": True}, (2, 3, H, D)),
    ("hook_rot_q", {"rotary_dim": 4}, (2, 3, H, DH)),
    ("hook_rot_k", {"rotary_dim": 4}, (2, 3, HKV, DH)),
]


def _hook_return_cases():
    cases = []
    for point, flags, shape in HOOK_POINTS:
        # Gated points run on a Bridge of their own without a cache, the others on env.bridge through its cache.
        bad = {
            "shape": (lambda t, hook: t[:1], VE, (f"{point}: hook", f"returned shape {(1,) + shape[1:]}", f"expected {shape}")),
            "dtype": (lambda t, hook: t.double(), TE, (f"{point}: hook", "returned torch.float64", "expected torch.float32 on {device}")),
            "integer": (lambda t, hook: t.long(), TE, (f"{point}: hook", "returned torch.int64")),
            "device": (lambda t, hook: torch.zeros(t.shape, device="meta" if t.is_cpu else "cpu"), TE, (f"{point}: hook", "on {other}; expected torch.float32 on {device}")),
            "list": (lambda t, hook: [t], TE, (f"{point}: hook", "returned list; expected None or a Tensor")),
            "float": (lambda t, hook: 0.0, TE, (f"{point}: hook", "returned float; expected None or a Tensor")),
            "raises": (_boom, RE, ("boom: the hook's own error",)),
        }
        for kind, (fn, exc, fragments) in bad.items():
            call = (lambda e, point=point, fn=fn, flags=flags: hooked(e, point, fn, **flags))
            cases.append(Case(f"hook-{point}-returns-{kind}", "hooks", call, exc, fragments))
    return cases


def bwd_hooked(e, point, fn):
    x = e.x_new.clone().requires_grad_(True)
    with e.bridge.hooks(bwd_hooks=[(point, fn)]):
        e.bridge(x).sum().backward()


def hooks_ctx(e, fwd_hooks=(), bwd_hooks=()):
    with e.bridge.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
        return e.bridge(e.x_new, kv_cache=e.cache)


def _noop(tensor, hook):
    return None


HOOK_CASES = [
    Case("hook-name-unknown", "hooks", lambda e: e.bridge.add_hook("hook_patern", _noop), KeyError, ("unknown hook point 'hook_patern'; did you mean 'hook_pattern'?", "Valid names:", "q.hook_out")),
    Case("hook-name-gated", "hooks", lambda e: e.bridge.add_hook("hook_result", _noop), VE, ("hook_result: this hook point does not fire", "set use_attn_result first")),
    Case("hook-name-gated-split-input", "hooks", lambda e: e.bridge.add_hook("hook_q_input", _noop), VE, ("hook_q_input", "set use_split_qkv_input first")),
    Case("hook-name-rotary", "hooks", lambda e: e.bridge.add_hook("hook_rot_k", _noop), VE, ("hook_rot_k: this hook point does not fire", "rotary")),
    Case("hook-name-rotary-q", "hooks", lambda e: e.bridge.add_hook("hook_rot_q", _noop), VE, ("hook_rot_q: this hook point does not fire: this layer has no rotary",)),
    Case("hook-name-gated-k-input", "hooks", lambda e: e.bridge.add_hook("hook_k_input", _noop), VE, ("hook_k_input: this hook point does not fire", "set use_split_qkv_input first")),
    Case("hook-name-gated-attn-in", "hooks", lambda e: e.bridge.add_hook("hook_attn_in", _noop), VE, ("hook_attn_in: this hook point does not fire", "set use_attn_in first")),
    # replacements of another shape than the point's (x_new [2, 3, 32] after 4 cached positions: K = 7)
    Case("hook-hook_q-returns-fewer-features", "hooks", lambda e: hooked(e, "hook_q", lambda t, hook: t[:, :, :2]), VE, ("hook_q: hook", "returned shape (2, 3, 2, 8)", "expected (2, 3, 4, 8)")),
    Case("hook-hook_z-returns-flattened", "hooks", lambda e: hooked(e, "hook_z", lambda t, hook: t.flatten(2)), VE, ("hook_z: hook", "returned shape (2, 3, 32)", "expected (2, 3, 4, 8)")),
    Case("hook-hook_pattern-returns-fewer-keys", "hooks", lambda e: hooked(e, "hook_pattern", lambda t, hook: t[..., :-1]), VE, ("hook_pattern: hook", "returned shape (2, 4, 3, 6)", "expected (2, 4, 3, 7)")),
    Case("hook-hook_out-returns-no-batch", "hooks", lambda e: hooked(e, "hook_out", lambda t, hook: t[0]), VE, ("hook_out: hook", "returned shape (3, 32)", "expected (2, 3, 32)")),
    Case("hook-hook_k-returns-query-heads", "hooks", lambda e: hooked(e, "hook_k", lambda t, hook: t.repeat_interleave(2, dim=2)), VE, ("hook_k: hook", "returned shape (2, 3, 4, 8)", "expected (2, 3, 2, 8)")),
    Case("hook-name-not-a-string", "hooks", lambda e: e.bridge.add_hook(3, _noop), TE, ("names_filter: expected a hook name, a glob, a list of names or a predicate", "got int")),
    Case("hook-names-with-a-non-string", "hooks", lambda e: e.bridge.add_hook(["hook_z", 3], _noop), TE, ("names_filter: expected hook names (str)", "got int")),
    Case("hook-names-second-unknown", "hooks", lambda e: e.bridge.add_hook(["hook_z", "hook_nope"], _noop), KeyError, ("unknown hook point 'hook_nope'",)),
    Case("hook-dir-unknown", "hooks", lambda e: e.bridge.add_hook("hook_z", _noop, dir="up"), VE, ("dir: expected 'fwd' or 'bwd'", "got 'up'")),
    Case("hook-fn-not-callable", "hooks", lambda e: e.bridge.add_hook("hook_z", 3), TE, ("hook for hook_z: expected a callable fn(tensor, hook=point)", "got int")),
    Case("hook-fn-None-by-filter", "hooks", lambda e: e.bridge.add_hook(lambda n: True, None), TE, ("hook for the selected hook points: expected a callable", "got NoneType")),
    Case("hook-prepend-not-bool", "hooks", lambda e: e.bridge.add_hook("hook_z", _noop, "fwd", "yes"), TE, ("prepend: expected a bool", "got str 'yes'")),
    Case("hook-is_permanent-not-bool", "hooks", lambda e: e.bridge.add_hook("hook_z", _noop, is_permanent=1), TE, ("is_permanent: expected a bool", "got int 1")),
    Case("hook-point-add-dir", "hooks", lambda e: e.bridge.hook_points()["hook_z"].add(_noop, dir="backward"), VE, ("dir: expected 'fwd' or 'bwd'", "got 'backward'")),
    Case("hook-remove-dir-unknown", "hooks", lambda e: e.bridge.remove_hooks(dir="all"), VE, ("dir: expected 'fwd', 'bwd' or 'both'", "got 'all'")),
    Case("hooks-one-pair-not-a-list", "hooks", lambda e: hooks_ctx(e, fwd_hooks=("hook_z", _noop)), TE, ("fwd_hooks: expected a list of (name, fn) pairs", "got one pair 'hook_z'", "wrap it in [...]")),
    Case("hooks-pair-too-short", "hooks", lambda e: hooks_ctx(e, fwd_hooks=[("hook_z",)]), TE, ("fwd_hooks[0]: expected a (name, fn) pair", "got tuple of length 1")),
    Case("hooks-not-pairs", "hooks", lambda e: hooks_ctx(e, bwd_hooks=[("hook_z", _noop), "hook_q"]), TE, ("bwd_hooks[1]: expected a (name, fn) pair", "got str")),
    Case("hooks-not-iterable", "hooks", lambda e: hooks_ctx(e, fwd_hooks=3), TE, ("fwd_hooks: expected a list of (name, fn) pairs", "got int")),
    Case("hooks-second-name-unknown", "hooks", lambda e: hooks_ctx(e, fwd_hooks=[("hook_z", _noop), ("hook_nope", _noop)]), KeyError, ("unknown hook point 'hook_nope'",)),
    Case("hooks-body-raises", "hooks", lambda e: hooks_ctx(e, fwd_hooks=[("hook_pattern", _boom)]), RE, ("boom",)),
    Case("run_with_hooks-bad-fwd_hooks", "hooks", lambda e: e.bridge.run_with_hooks(e.x_new, fwd_hooks="hook_z", kv_cache=e.cache), TE, ("fwd_hooks: expected a list of (name, fn) pairs", "got str")),
    Case("run_with_cache-unknown-name", "hooks", lambda e: e.bridge.run_with_cache(e.x_new, names_filter=["hook_z", "hook_nope"], kv_cache=e.cache), KeyError, ("unknown hook point 'hook_nope'",)),
    Case("run_with_cache-filter-not-a-name", "hooks", lambda e: e.bridge.run_with_cache(e.x_new, names_filter=3, kv_cache=e.cache), TE, ("names_filter: expected a hook name", "got int")),
    Case("run_with_cache-float-additive-mask", "hooks", lambda e: e.bridge.run_with_cache(e.x_new, names_filter="hook_attn_scores", kv_cache=e.cache, attention_mask=additive_2d(2, 7, device=e.device, hide=3)), VE, (f"attention_mask: {FLOAT_2D}", "at [0, 3]")),
    Case("run_with_cache-bad-mask", "hooks", lambda e: e.bridge.run_with_cache(e.x_new, names_filter="hook_pattern", kv_cache=e.cache, attention_mask=torch.ones(2, 3, device=e.device)), VE, ("attention_mask: expected a padding mask [B, K] = [2, 7]",)),
    Case("bwd-hook-returns-shape", "hooks", lambda e: bwd_hooked(e, "hook_z", lambda g, hook: g[:1]), VE, ("hook_z: hook", "returned shape (1, 3, 4, 8)", "expected (2, 3, 4, 8)")),
    Case("bwd-hook-returns-dtype", "hooks", lambda e: bwd_hooked(e, "hook_q", lambda g, hook: g.double()), TE, ("hook_q: hook", "returned torch.float64", "expected torch.float32")),
    Case("bwd-hook-returns-list", "hooks", lambda e: bwd_hooked(e, "hook_pattern", lambda g, hook: [g]), TE, ("hook_pattern: hook", "returned list; expected None or a Tensor")),
] + _hook_return_cases()


class Broken:
    """A rule object whose convert or revert misbehaves in one way (the name says which)."""

    def __init__(self, how):
        self.how = how

    def convert(self, t):
        if self.how == "convert-raises":
            raise IndexError("no such axis")
        if self.how == "convert-list":
            return [t]
        if self.how == "convert-device":
            return t.to("meta" if t.is_cpu else "cpu")
        if self.how == "convert-flattens":
            return t.flatten()
        return t

    def revert(self, t):
        if self.how == "revert-None":
            return None
        if self.how == "revert-dtype":
            return t.double()
        if self.how == "revert-drops":
            return t[..., :1]
        return t

    def __repr__(self):
        return f"Broken({self.how!r})"


def with_rule(e, point, how, *, fn=_noop):
    return hooked(e, point, fn, bridge=e.bridge_with(hook_conversions={point: Broken(how)}))


CONVERSION_CASES = [
    Case("rule-convert-raises", "conversions", lambda e: with_rule(e, "hook_z", "convert-raises"), VE, ("hook_z: conversion rule Broken('convert-raises') failed to convert a tensor of shape (2, 3, 32)", "IndexError: no such axis")),
    Case("rule-convert-not-a-tensor", "conversions", lambda e: with_rule(e, "hook_q", "convert-list"), TE, ("hook_q: conversion rule Broken('convert-list').convert returned list; expected a Tensor",)),
    Case("rule-convert-other-device", "conversions", lambda e: with_rule(e, "hook_pattern", "convert-device"), VE, ("hook_pattern: conversion rule Broken('convert-device').convert turned shape (2, 4, 3, 3) torch.float32 on {device}", "on {other}", "expected the same elements, dtype and device")),
    Case("rule-revert-None", "conversions", lambda e: with_rule(e, "hook_k", "revert-None"), TE, ("hook_k: conversion rule Broken('revert-None').revert returned NoneType; expected a Tensor",)),
    Case("rule-revert-dtype", "conversions", lambda e: with_rule(e, "hook_in", "revert-dtype"), VE, ("hook_in: conversion rule Broken('revert-dtype').revert turned shape (2, 3, 32) torch.float32", "into (2, 3, 32) torch.float64")),
    Case("rule-revert-drops-elements", "conversions", lambda e: with_rule(e, "hook_out", "revert-drops"), VE, ("hook_out: conversion rule Broken('revert-drops').revert turned shape (2, 3, 32)", "into (2, 3, 1)")),
    Case("rule-hook-format-not-kernel-layout", "conversions", lambda e: with_rule(e, "hook_z", "convert-flattens"), VE, ("hook_z: conversion rule Broken('convert-flattens') reverted the hook's tensor to shape (192,)", "expected the kernel layout (2, 3, 32)")),
]


def cache_case(fn):
    return lambda e: fn(e.kv, e.device)


KVCACHE_CASES = [
    Case("cache-capacity-zero", "KVCache", lambda e: KVCache(0), VE, ("capacity: expected a positive int or None", "got 0")),
    Case("cache-capacity-negative", "KVCache", lambda e: KVCache(capacity=-8), VE, ("capacity: expected a positive int or None", "got -8")),
    Case("cache-capacity-float", "KVCache", lambda e: KVCache(64.0), TE, ("capacity: expected a positive int or None", "got float 64.0")),
    Case("cache-capacity-bool", "KVCache", lambda e: KVCache(True), TE, ("capacity: expected a positive int or None", "got bool True")),
    Case("cache-capacity-str", "KVCache", lambda e: KVCache("64"), TE, ("capacity: expected a positive int or None", "got str '64'")),
    Case("cache-keys-before-append", "KVCache", lambda e: KVCache().keys, VE, ("kv_cache: empty (nothing appended yet)",)),
    Case("cache-append-k-not-a-tensor", "KVCache", cache_case(lambda c, d: c.append([1.0], t(2, 1, 2, 4, device=d))), TE, ("k_new: expected a Tensor [B, S, Hkv, Dh]", "got list")),
    Case("cache-append-v-not-a-tensor", "KVCache", cache_case(lambda c, d: c.append(t(2, 1, 2, 4, device=d), None)), TE, ("v_new: expected a Tensor [B, S, Hkv, Dh] like k_new", "got NoneType")),
    Case("cache-append-rank", "KVCache", cache_case(lambda c, d: c.append(t(2, 1, 8, device=d), t(2, 1, 8, device=d))), VE, ("k_new: expected a 4-D tensor [B, S, Hkv, Dh]", "got 3-D (2, 1, 8)")),
    Case("cache-append-integer", "KVCache", cache_case(lambda c, d: c.append(torch.ones(2, 1, 2, 4, dtype=i64, device=d), torch.ones(2, 1, 2, 4, dtype=i64, device=d))), TE, ("k_new: expected a floating-point tensor", "got torch.int64")),
    Case("cache-append-v-shape", "KVCache", cache_case(lambda c, d: c.append(t(2, 1, 2, 4, device=d), t(2, 2, 2, 4, device=d))), VE, ("v_new: expected the shape of k_new (2, 1, 2, 4)", "got (2, 2, 2, 4)")),
    Case("cache-append-v-dtype-while-growing", "KVCache", cache_case(lambda c, d: c.append(t(2, 100, 2, 4, device=d), t(2, 100, 2, 4, dtype=f64, device=d))), TE, ("v_new: expected torch.float32 on {device} (like k_new)", "got torch.float64")),
    Case("cache-append-v-other-device", "KVCache", lambda e: e.kv.append(t(2, 1, 2, 4, device=e.device), t(2, 1, 2, 4, device=e.other)), TE, ("v_new: expected torch.float32 on {device} (like k_new)", "on {other}")),
    Case("cache-append-other-batch", "KVCache", cache_case(lambda c, d: c.append(t(3, 1, 2, 4, device=d), t(3, 1, 2, 4, device=d))), VE, ("kv_cache: holds batch 2, 2 KV heads of dim 4, torch.float32", "got new keys of shape (3, 1, 2, 4)", "reset()")),
    Case("cache-append-other-kv-heads", "KVCache", cache_case(lambda c, d: c.append(t(2, 1, 1, 4, device=d), t(2, 1, 1, 4, device=d))), VE, ("kv_cache: holds batch 2, 2 KV heads of dim 4", "(2, 1, 1, 4)")),
    Case("cache-append-other-head-dim", "KVCache", cache_case(lambda c, d: c.append(t(2, 1, 2, 8, device=d), t(2, 1, 2, 8, device=d))), VE, ("kv_cache: holds batch 2, 2 KV heads of dim 4", "(2, 1, 2, 8)")),
    Case("cache-append-other-dtype", "KVCache", cache_case(lambda c, d: c.append(t(2, 1, 2, 4, dtype=torch.bfloat16, device=d), t(2, 1, 2, 4, dtype=torch.bfloat16, device=d))), VE, ("kv_cache: holds", "torch.float32", "(torch.bfloat16 on")),
    Case("cache-append-other-device", "KVCache", lambda e: e.kv.append(t(2, 1, 2, 4, device=e.other), t(2, 1, 2, 4, device=e.other)), VE, ("kv_cache: holds batch 2, 2 KV heads of dim 4, torch.float32 on {device}", "torch.float32 on {other}")),
    Case("cache-load-keys-None", "KVCache", cache_case(lambda c, d: c.load(None, None)), TE, ("keys: expected a Tensor [B, S, Hkv, Dh]", "got NoneType")),
    Case("cache-load-keys-rank", "KVCache", cache_case(lambda c, d: c.load(t(2, 5, 8, device=d), t(2, 5, 8, device=d))), VE, ("keys: expected a 4-D tensor [B, S, Hkv, Dh]", "got 3-D (2, 5, 8)")),
    Case("cache-load-values-shape", "KVCache", cache_case(lambda c, d: c.load(t(2, 5, 2, 4, device=d), t(2, 6, 2, 4, device=d))), VE, ("values: expected the shape of keys (2, 5, 2, 4)", "got (2, 6, 2, 4)")),
    Case("cache-load-empty-values-shape", "KVCache", cache_case(lambda c, d: c.load(t(2, 0, 2, 4, device=d), t(2, 0, 3, 4, device=d))), VE, ("values: expected the shape of keys (2, 0, 2, 4)", "got (2, 0, 3, 4)")),
    Case("cache-load-integer", "KVCache", cache_case(lambda c, d: c.load(torch.ones(2, 5, 2, 4, dtype=i64, device=d), torch.ones(2, 5, 2, 4, dtype=i64, device=d))), TE, ("keys: expected a floating-point tensor", "got torch.int64")),
    Case("cache-load-values-dtype", "KVCache", cache_case(lambda c, d: c.load(t(2, 5, 2, 4, device=d), t(2, 5, 2, 4, dtype=f64, device=d))), TE, ("values: expected torch.float32 on {device} (like keys)", "got torch.float64")),
]
# fmt: on

# Arguments the Python wrappers of the ops and the Bridge's constructor check themselves (scale, start,
# the split form's tensors, biases' dtype and device, dropout probabilities, ambiguous conversion rules).


def _q(e):
    return t(2, 3, 4, 8, device=e.device)


def _k(e, **kw):
    return t(2, 5, 2, 8, device=e.device, **kw)


# fmt: off
ARGUMENT_CASES = [
    # the ops' Python wrappers -----------------------------------------------------------------------------------
    Case("attn-scale-not-a-number", "ops.attention", lambda e: ops.attention(_q(e), _k(e), _k(e), scale="a", causal=True), TE, ("scale: expected a float", "got str 'a'")),
    Case("scores-k-dtype", "ops.attention", lambda e: ops.attn_scores(_q(e), _k(e, dtype=f64), scale=0.3, causal=True), TE, ("k: expected dtype Float (the dtype of q)", "got Double")),
    Case("scores-mask-complex", "ops.attention", lambda e: ops.attn_scores(_q(e), _k(e), scale=0.3, causal=True, mask=torch.ones(2, 5, dtype=torch.complex64, device=e.device)), TE, ("mask: expected a bool, integer or float padding mask", "got ComplexFloat")),
    Case("scores-mask-other-device", "ops.attention", lambda e: ops.attn_scores(_q(e), _k(e), scale=0.3, causal=True, mask=torch.ones(2, 5, device=e.other)), VE, ("mask: expected device {device} (the device of q)", "got {other}")),
    Case("scores-k-None", "ops.attention", lambda e: ops.attn_scores(_q(e), None, scale=0.3, causal=True), TE, ("k: expected a Tensor [B, K, Hkv, Dh]", "got NoneType")),
    Case("scores-dtype-integer", "ops.attention", lambda e: ops.attn_scores(_q(e), _k(e), scale=0.3, causal=True, dtype=i64), TE, ("dtype: expected a floating-point dtype or None", "got Long")),
    Case("softmax-rank-3", "ops.attention", lambda e: ops.attn_softmax(t(2, 4, 3, device=e.device)), VE, ("scores: expected a 4-D tensor [B, H, S, K]", "[2, 4, 3]")),
    Case("apply-v-dtype", "ops.attention", lambda e: ops.attn_apply(t(2, 4, 3, 5, device=e.device), _k(e, dtype=f64)), TE, ("v: expected dtype Float (the dtype of pattern)", "got Double")),
    Case("apply-v-other-device", "ops.attention", lambda e: ops.attn_apply(t(2, 4, 3, 5, device=e.device), t(2, 5, 2, 8, device=e.other)), VE, ("v: expected device {device} (the device of pattern)", "got {other}")),
    Case("apply-pattern-None", "ops.attention", lambda e: ops.attn_apply(None, _k(e)), TE, ("pattern: expected a Tensor [B, H, S, K]", "got NoneType")),
    Case("split-weight-None", "ops.split_qkv", lambda e: ops.split_qkv(None, None, n_heads=4, n_kv_heads=2, d_head=2, layout="blocked", conv1d=True), TE, ("weight: expected a Tensor", "got NoneType")),
    Case("split-bias-dtype", "ops.split_qkv", lambda e: ops.split_qkv(t(8, 16, device=e.device), t(16, dtype=f64, device=e.device), n_heads=4, n_kv_heads=2, d_head=2, layout="blocked", conv1d=True), TE, ("bias: expected dtype torch.float32 (the dtype of weight)", "got torch.float64")),
    Case("split-bias-other-device", "ops.split_qkv", lambda e: ops.split_qkv(t(8, 16, device=e.device), t(16, device=e.other), n_heads=4, n_kv_heads=2, d_head=2, layout="blocked", conv1d=True), VE, ("bias: expected device {device} (the device of weight)", "got {other}")),
    Case("pack-bias-dtype-named", "ops.pack_qkv", lambda e: ops.pack_qkv(t(4, 8, 2), t(2, 8, 2), t(2, 8, 2), t(4, 2), t(2, 2), t(2, 2, dtype=f64)), TE, ("b_V: expected dtype torch.float32 (the dtype of W_Q)", "got torch.float64")),
    Case("pack-bias-other-device", "ops.pack_qkv", lambda e: ops.pack_qkv(*(t(*shape, device=e.device) for shape in ((4, 8, 2), (2, 8, 2), (2, 8, 2), (4, 2), (2, 2))), t(2, 2, device=e.other)), VE, ("b_V: expected device {device} (the device of W_Q)", "got {other}")),
    Case("append-start-float", "ops.kv_append", lambda e: ops.kv_append(t(2, 2, 10, 4), t(2, 2, 10, 4), t(2, 3, 2, 4), t(2, 3, 2, 4), 1.5), TE, ("start: expected an int", "got float 1.5")),
    Case("append-start-str", "ops.kv_append", lambda e: ops.kv_append(t(2, 2, 10, 4), t(2, 2, 10, 4), t(2, 3, 2, 4), t(2, 3, 2, 4), "1"), TE, ("start: expected an int", "got str '1'")),
    # Bridge construction --------------------------------------------------------------------------------
    Case("ctor-bias-dtype", "Bridge()", lambda e: ctor(e, bias=e.w["bias"].double()), TE, ("bias: expected dtype torch.float32 (the dtype of weight)", "got torch.float64")),
    Case("ctor-bias-integer", "Bridge()", lambda e: ctor(e, bias=torch.ones(64, dtype=i64)), TE, ("bias: expected a floating-point Tensor", "torch.int64")),
    Case("ctor-out_weight-dtype", "Bridge()", lambda e: ctor(e, out_weight=e.w["out_weight"].double()), TE, ("out_weight: expected dtype torch.float32 (the dtype of weight)", "got torch.float64")),
    Case("ctor-out_bias-dtype", "Bridge()", lambda e: ctor(e, out_bias=e.w["out_bias"].half()), TE, ("out_bias: expected dtype torch.float32 (the dtype of weight)", "got torch.float16")),
    Case("ctor-out_bias-integer", "Bridge()", lambda e: ctor(e, out_bias=torch.ones(32, dtype=i64)), TE, ("out_bias: expected a floating-point Tensor", "torch.int64")),
    Case("ctor-out_weight-other-device", "Bridge()", lambda e: ctor(e, out_weight=e.w["out_weight"].to(e.other)), VE, ("out_weight: expected device {device} (the device of weight)", "got {other}")),
    Case("ctor-n_heads-bool", "Bridge()", lambda e: ctor(e, n_heads=True, n_kv_heads=1), VE, ("n_heads: expected a positive int", "got True")),
    # one integer rule (checks.integer, issue 21 item 7): any integer type, never a bool or a float
    Case("ctor-n_kv_heads-bool", "Bridge()", lambda e: ctor(e, n_kv_heads=True), VE, ("n_kv_heads: expected a positive divisor of n_heads=4", "got True")),
    Case("ctor-n_kv_heads-float", "Bridge()", lambda e: ctor(e, n_kv_heads=2.0), VE, ("n_kv_heads: expected a positive divisor of n_heads=4", "got 2.0")),
    Case("ctor-d_head-bool", "Bridge()", lambda e: ctor(e, d_head=True), VE, ("d_head: expected a positive int", "got True")),
    Case("ctor-rotary_dim-float", "Bridge()", lambda e: ctor(e, rotary_dim=4.0), VE, ("rotary_dim: expected None or an even int in [2, d_head=8]", "got 4.0")),
    Case("ctor-window-bool", "Bridge()", lambda e: ctor(e, window=True), VE, ("window: expected a positive int", "got True")),
    Case("ctor-window-float", "Bridge()", lambda e: ctor(e, window=1.5), VE, ("window: expected a positive int", "got 1.5")),
    Case("ctor-layer_idx-float", "Bridge()", lambda e: ctor(e, layer_idx=1.5), VE, ("layer_idx: expected an int >= 0", "got 1.5")),
    Case("ctor-layer_idx-bool", "Bridge()", lambda e: ctor(e, scale_attn_by_inverse_layer_idx=True, layer_idx=True), VE, ("layer_idx: expected an int >= 0", "got True")),
    Case("attn-window-bool", "ops.attention", lambda e: attn(e, window=True), TE, ("window: expected None or an int", "got bool True")),
    Case("attn-window-bool-tensor", "ops.attention", lambda e: attn(e, window=torch.tensor(True)), TE, ("window: expected None or an int", "got Tensor")),
    Case("append-start-bool", "ops.kv_append", lambda e: ops.kv_append(t(2, 2, 10, 4), t(2, 2, 10, 4), t(2, 3, 2, 4), t(2, 3, 2, 4), True), TE, ("start: expected an int", "got bool True")),
    Case("append-start-float-tensor", "ops.kv_append", lambda e: ops.kv_append(t(2, 2, 10, 4), t(2, 2, 10, 4), t(2, 3, 2, 4), t(2, 3, 2, 4), torch.tensor(1.0)), TE, ("start: expected an int", "got Tensor")),
    Case("cache-capacity-float-tensor", "KVCache", lambda e: KVCache(torch.tensor(8.0)), TE, ("capacity: expected a positive int or None", "got Tensor")),
    Case("ctor-scale-not-a-number", "Bridge()", lambda e: ctor(e, scale="x"), TE, ("scale: expected a float", "got str 'x'")),
    Case("ctor-scale-nan", "Bridge()", lambda e: ctor(e, scale=float("nan")), VE, ("scale: expected a finite float", "got nan")),
    Case("ctor-layer_idx-negative", "Bridge()", lambda e: ctor(e, scale_attn_by_inverse_layer_idx=True, layer_idx=-1), VE, ("layer_idx: expected an int >= 0", "got -1")),
    Case("ctor-attn_dropout-above-1", "Bridge()", lambda e: ctor(e, attn_dropout=1.5), VE, ("attn_dropout: expected a probability in [0, 1]", "got 1.5")),
    Case("ctor-resid_dropout-negative", "Bridge()", lambda e: ctor(e, resid_dropout=-0.1), VE, ("resid_dropout: expected a probability in [0, 1]", "got -0.1")),
    Case("ctor-resid_dropout-not-a-number", "Bridge()", lambda e: ctor(e, resid_dropout="a"), TE, ("resid_dropout: expected a number", "got str 'a'")),
    # Bridge.cfg: the flags are checked when set, as when the Bridge is built
    Case("cfg-flags-exclusive", "Bridge.cfg", lambda e: setattr(e.bridge_with(use_split_qkv_input=True).cfg, "use_attn_in", True), VE, ("use_attn_in: cannot be set while use_split_qkv_input is set", "mutually exclusive")),
    Case("cfg-flags-exclusive-other-order", "Bridge.cfg", lambda e: setattr(e.bridge_with(use_attn_in=True).cfg, "use_split_qkv_input", True), VE, ("use_split_qkv_input: cannot be set while use_attn_in is set", "mutually exclusive")),
    Case("cfg-flag-not-bool", "Bridge.cfg", lambda e: setattr(e.bridge.cfg, "use_attn_result", 1), TE, ("use_attn_result: expected a bool", "got int")),
    Case("ctor-conversion-alias-and-canonical", "Bridge()", lambda e: ctor(e, hook_conversions={"hook_z": "b s (h d) -> b s h d", "o.hook_in": "b s (h d) -> b h s d"}), VE, ("hook_conversions: 'hook_z' and 'o.hook_in' name the same hook point",)),
]
# fmt: on

CASES = OP_CASES + CONSTRUCTION_CASES + FORWARD_CASES + HOOK_CASES + CONVERSION_CASES + KVCACHE_CASES + ARGUMENT_CASES


def test_table_is_complete():
    """One id per case, and every entry point of the issue has cases."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    entries = {c.entry for c in CASES}
    want = {
        "ops.attention",
        "ops.per_head_proj",
        "ops.split_qkv",
        "ops.pack_qkv",
        "ops.kv_append",
        "Bridge()",
        "Bridge.forward",
        "KVCache",
        "hooks",
        "conversions",
    }
    assert want <= entries, f"entry points without cases: {want - entries}"


def good_call(op: str, device) -> None:
    """The op on good input, against the reference (by the tolerance rule; data movement exactly): it still
    works after the error."""
    if op == "attention":
        q, k, v = t(2, 3, 4, 8, device=device), t(2, 5, 2, 8, device=device), t(2, 5, 2, 8, device=device)
        for alibi in (None, t(2, 4, 5, device=device)):
            z, lse, _ = ops.attention(q, k, v, scale=0.35, causal=True, alibi=alibi)
            (z_hi, lse_hi, _), (z_lo, lse_lo, _) = (
                ref.attention(q, k, v, scale=0.35, causal=True, alibi=alibi, compute_dtype=dt) for dt in (f64, q.dtype)
            )
            assert_close_by_rule(z, z_hi, z_lo, what=f"z (alibi={alibi is not None})")
            assert_close_by_rule(lse, lse_hi, lse_lo, what=f"lse (alibi={alibi is not None})")
    elif op == "rotary":
        x, cos, sin = t(2, 3, 4, 8, device=device), t(1, 3, 6, device=device), t(1, 3, 6, device=device)
        hi, lo = ref.rotary(x, cos, sin), ref.rotary(x, cos, sin, compute_dtype=x.dtype)
        assert_close_by_rule(ops.rotary(x, cos, sin), hi, lo, what="rotary")
    elif op == "per_head_proj":
        x, W, b = t(2, 3, 4, 8, device=device), t(4, 8, 5, device=device), t(4, 5, device=device)
        hi, lo = ref.per_head_proj(x.double(), W.double(), b.double()), ref.per_head_proj(x, W, b)
        assert_close_by_rule(ops.per_head_proj(x, W, b), hi, lo, what="per_head_proj")
    elif op in ("split_qkv", "pack_qkv"):
        w, bias = t(8, 16, device=device), t(16, device=device)
        kw = dict(n_heads=4, n_kv_heads=2, d_head=2, layout="grouped", conv1d=True)
        parts = ops.split_qkv(w, bias, **kw)
        for got, want in zip(parts, ref.split_qkv(w, bias, **kw)):
            assert torch.equal(got, want)
        w2, b2 = ops.pack_qkv(*parts, layout="grouped")
        assert torch.equal(w2, w) and torch.equal(b2, bias)
    elif op == "kv_append":
        k_cache, v_cache = t(2, 2, 10, 4, device=device), t(2, 2, 10, 4, device=device)
        k_new, v_new = t(2, 3, 2, 4, device=device), t(2, 3, 2, 4, device=device)
        k_want, v_want = k_cache.clone(), v_cache.clone()
        ops.kv_append(k_cache, v_cache, k_new, v_new, 7)
        ref.kv_append(k_want, v_want, k_new, v_new, 7)
        assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    else:
        raise AssertionError(op)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_raises_and_changes_nothing(case, device):
    if case.needs_cuda:
        skip_unless_available("cuda")
        if device.type != "cuda":
            pytest.skip("a device-mismatch case: runs with device=cuda")
    env = Env(device)
    with pytest.raises(case.exc) as info:
        case.call(env)
    message = str(info.value)
    fragments = [f.format(device=env.device, other=env.other) for f in case.fragments]
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{case.id}: message lacks {missing}:\n{message}"
    assert len(message) < 600, f"{case.id}: a message of {len(message)} characters:\n{message}"
    if case.entry == "Bridge.forward":
        assert env.fired == [], f"{case.id}: hooks fired before the error: {env.fired}"
    env.check_unchanged()
    if case.entry.startswith("ops."):
        good_call(case.entry[len("ops.") :], env.device)


# --------------------------------------------------------------------------------------------------
# Empty tensors: B = 0, S = 0 (no query), K = 0 (no key) are valid input. Each entry point returns what
# the reference returns: empty tensors of the right shapes, and for K = 0 the result of rows with no
# visible key (zeros, lse = -inf).


def _same(got, want, what):
    """Empty tensors, or the exact values of rows with nothing to sum (zeros, -inf, a bias): equal."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    assert torch.equal(got.double(), want.double()), f"{what}: got {got}, expected {want}"


def empty_attention(e, B, S, K):
    d = e.device
    q, k, v = t(B, S, 4, 8, device=d), t(B, K, 2, 8, device=d), t(B, K, 2, 8, device=d)
    for mask in (None, torch.ones(B, K, dtype=torch.bool, device=d), torch.zeros(B, 1, S, K, device=d)):
        for causal in (True, False):
            got = ops.attention(q, k, v, scale=0.35, causal=causal, mask=mask, return_pattern=True)
            want = ref.attention(q, k, v, scale=0.35, causal=causal, mask=mask, return_pattern=True)
            for name, g, w in zip(("z", "lse", "pattern"), got, want):
                _same(g, w, f"attention {name} (B={B}, S={S}, K={K}, mask={None if mask is None else mask.dim()})")
            sc = ops.attn_scores(q, k, scale=0.35, causal=causal, mask=mask)
            _same(sc, ref.attn_scores(q, k, scale=0.35, causal=causal, mask=mask), "attn_scores")
            p = ops.attn_softmax(sc)
            _same(p, want[2], "attn_softmax")
            _same(ops.attn_apply(p, v), want[0], "attn_apply")


def empty_per_head_proj(e, B, S, n, Din, E):
    d = e.device
    x, W, b = t(B, S, n, Din, device=d), t(n, Din, E, device=d), t(n, E, device=d)
    _same(ops.per_head_proj(x, W, b), ref.per_head_proj(x, W, b), "per_head_proj")
    resid = t(B, S, Din, device=d)[:, :, None].expand(B, S, n, Din)
    _same(ops.per_head_proj(resid, W, None), ref.per_head_proj(resid, W, None), "per_head_proj (broadcast x)")


def empty_split_pack(e):
    w, bias = t(0, 16, device=e.device), t(16, device=e.device)
    got = ops.split_qkv(w, bias, n_heads=4, n_kv_heads=2, d_head=2, layout="grouped", conv1d=True)
    want = ref.split_qkv(w, bias, n_heads=4, n_kv_heads=2, d_head=2, layout="grouped", conv1d=True)
    for g, r in zip(got, want):
        _same(g, r, "split_qkv with D = 0")
    w2, b2 = ops.pack_qkv(*got, layout="grouped")
    _same(w2, w, "pack_qkv with D = 0")
    _same(b2, bias, "pack_qkv bias with D = 0")


def empty_kv_append(e):
    d = e.device
    k_cache, v_cache = t(2, 2, 10, 4, device=d), t(2, 2, 10, 4, device=d)
    before = k_cache.clone(), v_cache.clone()
    for start in (0, 4, 10):  # S = 0 may start anywhere up to the capacity itself
        ops.kv_append(k_cache, v_cache, t(2, 0, 2, 4, device=d), t(2, 0, 2, 4, device=d), start)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    ops.kv_append(
        t(0, 2, 10, 4, device=d), t(0, 2, 10, 4, device=d), t(0, 3, 2, 4, device=d), t(0, 3, 2, 4, device=d), 0
    )


def empty_kv_cache(e):
    d = e.device
    fresh = KVCache()
    keys, values = fresh.append(t(2, 0, 2, 4, device=d), t(2, 0, 2, 4, device=d))
    assert fresh.length == 0 and keys.shape == (2, 0, 2, 4) and values.shape == (2, 0, 2, 4)
    k1, v1 = t(2, 3, 2, 4, device=d), t(2, 3, 2, 4, device=d)
    fresh.append(k1, v1)
    assert torch.equal(fresh.keys, k1) and torch.equal(fresh.values, v1)
    e.kv.append(t(2, 0, 2, 4, device=d), t(2, 0, 2, 4, device=d))  # a no-op: check_unchanged sees it
    loaded = KVCache()
    loaded.load(t(2, 0, 2, 4, device=d), t(2, 0, 2, 4, device=d))
    assert loaded.length == 0 and loaded.keys.shape == (2, 0, 2, 4)
    batchless = KVCache()
    batchless.append(t(0, 3, 2, 4, device=d), t(0, 3, 2, 4, device=d))
    assert batchless.length == 3 and batchless.keys.shape == (0, 3, 2, 4)


def empty_bridge(e, B, S, with_cache):
    b = e.bridge
    x = t(B, S, D, device=e.device)
    with torch.no_grad():
        if with_cache and B == 2:
            out = b(x, kv_cache=e.cache)  # S = 0: attends to nothing new, appends nothing
        else:
            out = b(x, kv_cache=KVCache() if with_cache else None)
        _same(out, reference_layer(e.w, x, out.dtype), f"Bridge output (B={B}, S={S})")
        out2, acts = b.run_with_cache(x)
    _same(out2, out, "run_with_cache output")
    K = S
    for name, shape in (("hook_q", (B, S, H, DH)), ("hook_pattern", (B, H, S, K)), ("hook_z", (B, S, H, DH))):
        assert acts[name].shape == shape, f"{name}: {tuple(acts[name].shape)}, expected {shape}"


EMPTY_CASES = {
    "attention-B0": lambda e: empty_attention(e, 0, 3, 5),
    "attention-S0": lambda e: empty_attention(e, 2, 0, 5),
    "attention-K0": lambda e: empty_attention(e, 2, 3, 0),
    "per_head_proj-B0": lambda e: empty_per_head_proj(e, 0, 3, 4, 8, 5),
    "per_head_proj-S0": lambda e: empty_per_head_proj(e, 2, 0, 4, 8, 5),
    "per_head_proj-n0": lambda e: empty_per_head_proj(e, 2, 3, 0, 8, 5),
    "per_head_proj-D0": lambda e: empty_per_head_proj(e, 2, 3, 4, 0, 5),
    "per_head_proj-E0": lambda e: empty_per_head_proj(e, 2, 3, 4, 8, 0),
    "split-pack-D0": empty_split_pack,
    "kv_append-S0-B0": empty_kv_append,
    "KVCache-S0-B0": empty_kv_cache,
    "Bridge-B0": lambda e: empty_bridge(e, 0, 5, False),
    "Bridge-S0": lambda e: empty_bridge(e, 2, 0, False),
    "Bridge-B0-cache": lambda e: empty_bridge(e, 0, 5, True),
    "Bridge-S0-cache": lambda e: empty_bridge(e, 2, 0, True),
}


@pytest.mark.parametrize("case_id", list(EMPTY_CASES))
def test_empty_tensors_work(case_id, device):
    env = Env(device)
    EMPTY_CASES[case_id](env)
    env.check_unchanged()


# --------------------------------------------------------------------------------------------------
# Not errors: what the checks must still let through.


def test_failed_kv_append_writes_nothing(device):
    """The checks run before any write: a rejected append leaves both caches as they were."""
    k_cache, v_cache = t(2, 2, 10, 4, device=device), t(2, 2, 10, 4, device=device)
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(ValueError, match=r"^v_new: expected the shape of k_new"):
        ops.kv_append(k_cache, v_cache, t(2, 3, 2, 4, device=device), t(2, 4, 2, 4, device=device), 2)
    with pytest.raises(ValueError, match=r"^start: expected 0 <= start and start \+ S <= capacity 10"):
        ops.kv_append(k_cache, v_cache, t(2, 3, 2, 4, device=device), t(2, 3, 2, 4, device=device), 9)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_kv_append_accepts_separate_windows_of_one_buffer(device):
    """Keys and values interleaved in one buffer ([..., 2] halves), and a re-append of the previous row
    (source and destination in one cache, different rows), are not overlaps."""
    buf = torch.zeros(2, 2, 10, 4, 2, device=device)
    k_cache, v_cache = buf[..., 0], buf[..., 1]
    k_new, v_new = t(2, 3, 2, 4, device=device), t(2, 3, 2, 4, device=device)
    want = buf.clone()
    ref.kv_append(want[..., 0], want[..., 1], k_new, v_new, 2)
    ops.kv_append(k_cache, v_cache, k_new, v_new, 2)
    assert torch.equal(buf, want)
    prev_k, prev_v = k_cache[:, :, 4:5].transpose(1, 2), v_cache[:, :, 4:5].transpose(1, 2)
    ref.kv_append(want[..., 0], want[..., 1], prev_k.clone(), prev_v.clone(), 5)
    ops.kv_append(k_cache, v_cache, prev_k, prev_v, 5)
    assert torch.equal(buf, want)
    # Writing the rows onto themselves is a no-op, not an overlap.
    rows_k, rows_v = k_cache[:, :, 2:5].transpose(1, 2), v_cache[:, :, 2:5].transpose(1, 2)
    ops.kv_append(k_cache, v_cache, rows_k, rows_v, 2)
    assert torch.equal(buf, want)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool], ids=str)
def test_split_and_pack_move_any_real_dtype_exactly(dtype, device):
    """split_qkv / pack_qkv only move elements, so integer and bool weights (e.g. a map of where each
    fused column goes) are split exactly like float ones; complex is refused (see CASES)."""
    w = torch.arange(8 * 16).view(8, 16).to(device=device, dtype=dtype)
    got = ops.split_qkv(w, None, n_heads=4, n_kv_heads=2, d_head=2, layout="grouped", conv1d=True)
    want = ref.split_qkv(w, None, n_heads=4, n_kv_heads=2, d_head=2, layout="grouped", conv1d=True)
    for g, r in zip(got[:3], want[:3]):
        assert g.dtype == dtype and torch.equal(g, r)
    assert torch.equal(ops.pack_qkv(*got[:3], layout="grouped")[0], w)


def test_kv_cache_accepts_numpy_integer_capacity():
    np = pytest.importorskip("numpy")
    assert KVCache(np.int64(8))._initial_capacity == 8
