"""Bad input to the native ops: every case raises ValueError or TypeError whose message names the
argument, what was expected and what was received; afterwards the op still works on good input.

The whole table is ERRORS below, one row per case: (id, op, call, exception, message fragments).
`call(device)` builds its inputs on the device and makes the bad call. Good sizes: attention
B=2, S=3, K=5, H=4, Hkv=2, Dh=8 (alibi [2, 4, 5]); rotary x [2, 3, 4, 8], cos/sin [1, 3, 6];
per_head_proj B=2, S=3, n=4, D=8, E=5; split/pack H=4, Hkv=2, Dh=2, D=8 (n_out = 16); kv_append B=2,
Hkv=2, capacity=10, Dh=4, S=3.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch
from conftest import skip_unless_available

from pyqkv import ops
from pyqkv import reference as ref

_ops = torch.ops.pyqkv


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(device=device, dtype=dtype)


def attn(device, *, q=None, k=None, v=None, mask=None, alibi=None, softcap=None, window=None):
    """ops.attention on good inputs except for the ones given."""
    q = t(2, 3, 4, 8, device=device) if q is None else q
    k = t(2, 5, 2, 8, device=device) if k is None else k
    v = t(2, 5, 2, 8, device=device) if v is None else v
    return ops.attention(q, k, v, scale=0.35, causal=True, mask=mask, alibi=alibi, softcap=softcap, window=window)


def scores(device, *, alibi=None):
    """ops.attn_scores (the split form) on good inputs except for the alibi given."""
    return ops.attn_scores(t(2, 3, 4, 8, device=device), t(2, 5, 2, 8, device=device), scale=0.35, causal=True, alibi=alibi)


def rope(device, *, x=None, cos=None, sin=None, raw=False):
    """ops.rotary (or the raw op, which takes no 2-D tables) on good inputs except for the ones given."""
    x = t(2, 3, 4, 8, device=device) if x is None else x
    cos = t(1, 3, 6, device=device) if cos is None else cos
    sin = t(1, 3, 6, device=device) if sin is None else sin
    return _ops.rotary(x, cos, sin, False) if raw else ops.rotary(x, cos, sin)


def php(device, *, x=None, W=None, b=None):
    """ops.per_head_proj on good inputs except for the ones given."""
    x = t(2, 3, 4, 8, device=device) if x is None else x
    W = t(4, 8, 5, device=device) if W is None else W
    return ops.per_head_proj(x, W, b)


def split(device, weight=None, bias=None, *, H=4, Hkv=2, Dh=2, layout="blocked", conv1d=True):
    weight = t(8, 16, device=device) if weight is None else weight
    return ops.split_qkv(weight, bias, n_heads=H, n_kv_heads=Hkv, d_head=Dh, layout=layout, conv1d=conv1d)


def pack(device, W_Q=None, W_K=None, W_V=None, *biases, layout="blocked"):
    W_Q = t(4, 8, 2, device=device) if W_Q is None else W_Q
    W_K = t(2, 8, 2, device=device) if W_K is None else W_K
    W_V = t(2, 8, 2, device=device) if W_V is None else W_V
    return ops.pack_qkv(W_Q, W_K, W_V, *biases, layout=layout)


def append(device, *, k_cache=None, v_cache=None, k_new=None, v_new=None, start=4):
    k_cache = t(2, 2, 10, 4, device=device) if k_cache is None else k_cache
    v_cache = t(2, 2, 10, 4, device=device) if v_cache is None else v_cache
    k_new = t(2, 3, 2, 4, device=device) if k_new is None else k_new
    v_new = t(2, 3, 2, 4, device=device) if v_new is None else v_new
    return ops.kv_append(k_cache, v_cache, k_new, v_new, start)


class Bad(NamedTuple):
    id: str
    op: str  # which op family: its good call runs after the error
    call: Callable[[torch.device], object]
    exc: type
    fragments: tuple[str, ...]
    needs_cuda: bool = False


VE, TE = ValueError, TypeError
f64, i64 = torch.float64, torch.int64

# fmt: off
ERRORS = [
    # attention ----------------------------------------------------------------------------------
    Bad("attn-q-rank", "attention", lambda d: attn(d, q=t(2, 3, 32, device=d)), VE, ("q: expected a 4-D tensor [B, S, H, Dh]", "got 3-D", "[2, 3, 32]")),
    Bad("attn-k-rank", "attention", lambda d: attn(d, k=t(2, 5, 2, 8, 1, device=d)), VE, ("k: expected a 4-D tensor", "got 5-D", "[2, 5, 2, 8, 1]")),
    Bad("attn-v-rank", "attention", lambda d: attn(d, v=t(2, 5, 16, device=d)), VE, ("v: expected a 4-D tensor", "[2, 5, 16]")),
    Bad("attn-k-head-dim", "attention", lambda d: attn(d, k=t(2, 5, 2, 6, device=d)), VE, ("k: expected shape [2, K, Hkv, 8]", "[2, 5, 2, 6]")),
    Bad("attn-k-batch", "attention", lambda d: attn(d, k=t(3, 5, 2, 8, device=d)), VE, ("k: expected shape [2, K, Hkv, 8]", "[3, 5, 2, 8]")),
    Bad("attn-v-not-k-shape", "attention", lambda d: attn(d, v=t(2, 6, 2, 8, device=d)), VE, ("v: expected the shape of k [2, 5, 2, 8]", "[2, 6, 2, 8]")),
    Bad("attn-H-not-multiple-of-Hkv", "attention", lambda d: attn(d, k=t(2, 5, 3, 8, device=d), v=t(2, 5, 3, 8, device=d)), VE, ("k: expected a KV head count that divides H=4", "Hkv=3", "[2, 5, 3, 8]")),
    Bad("attn-mask-2d-shape", "attention", lambda d: attn(d, mask=torch.ones(2, 6, dtype=torch.bool, device=d)), VE, ("mask: expected a 2-D padding mask [B, K] = [2, 5]", "[2, 6]")),
    Bad("attn-mask-rank-3", "attention", lambda d: attn(d, mask=t(2, 3, 5, device=d)), VE, ("mask:", "got 3-D", "[2, 3, 5]")),
    Bad("attn-mask-4d-S", "attention", lambda d: attn(d, mask=t(2, 1, 4, 5, device=d)), VE, ("mask: expected a 4-D additive mask [B or 1, 1 or H, S, K] = [2, 1 or 4, 3, 5]", "[2, 1, 4, 5]")),
    Bad("attn-mask-4d-heads", "attention", lambda d: attn(d, mask=t(2, 2, 3, 5, device=d)), VE, ("mask: expected a 4-D additive mask", "[2, 2, 3, 5]")),
    Bad("attn-mask-4d-bool-shape", "attention", lambda d: attn(d, mask=torch.ones(2, 1, 3, 4, dtype=torch.bool, device=d)), VE, ("mask: expected a 4-D additive mask [B or 1, 1 or H, S, K] = [2, 1 or 4, 3, 5] (or a bool one", "got [2, 1, 3, 4]")),
    Bad("attn-mask-4d-int", "attention", lambda d: attn(d, mask=torch.zeros(2, 1, 3, 5, dtype=i64, device=d)), TE, ("mask: expected a floating-point additive 4-D mask", "Long")),
    Bad("attn-mask-complex", "attention", lambda d: attn(d, mask=torch.ones(2, 5, dtype=torch.complex64, device=d)), TE, ("mask: expected a bool, integer or float padding mask", "ComplexFloat")),
    Bad("attn-mixed-dtype-k", "attention", lambda d: attn(d, k=t(2, 5, 2, 8, dtype=f64, device=d)), TE, ("k: expected dtype Float (the dtype of q)", "got Double")),
    Bad("attn-mixed-dtype-v", "attention", lambda d: attn(d, v=t(2, 5, 2, 8, dtype=torch.float16, device=d)), TE, ("v: expected dtype Float (the dtype of q)", "got Half")),
    Bad("attn-integer-qkv", "attention", lambda d: attn(d, q=torch.ones(2, 3, 4, 8, dtype=i64, device=d), k=torch.ones(2, 5, 2, 8, dtype=i64, device=d), v=torch.ones(2, 5, 2, 8, dtype=i64, device=d)), TE, ("q: expected a floating-point tensor", "got Long")),
    Bad("attn-k-other-device", "attention", lambda d: attn(d, k=t(2, 5, 2, 8, device="cpu")), VE, ("k: expected device cuda", "got cpu"), needs_cuda=True),
    # ALiBi: [B or 1, H or 1, K] ------------------------------------------------------------------
    Bad("attn-alibi-rank-2", "attention", lambda d: attn(d, alibi=t(4, 5, device=d)), VE, ("alibi: expected a 3-D tensor [B or 1, H or 1, K]", "got 2-D", "[4, 5]")),
    Bad("attn-alibi-rank-4", "attention", lambda d: attn(d, alibi=t(2, 4, 3, 5, device=d)), VE, ("alibi: expected a 3-D tensor [B or 1, H or 1, K]", "got 4-D", "[2, 4, 3, 5]")),
    Bad("attn-alibi-bloom-shape", "attention", lambda d: attn(d, alibi=t(8, 1, 5, device=d)), VE, ("alibi: expected shape [B or 1, H or 1, K] = [2 or 1, 4 or 1, 5]", "got [8, 1, 5]")),
    Bad("attn-alibi-K", "attention", lambda d: attn(d, alibi=t(2, 4, 6, device=d)), VE, ("alibi: expected shape [B or 1, H or 1, K] = [2 or 1, 4 or 1, 5]", "got [2, 4, 6]")),
    Bad("attn-alibi-kv-heads", "attention", lambda d: attn(d, alibi=t(2, 2, 5, device=d)), VE, ("alibi: expected shape", "4 or 1", "got [2, 2, 5]")),
    Bad("attn-alibi-integer", "attention", lambda d: attn(d, alibi=torch.zeros(2, 4, 5, dtype=i64, device=d)), TE, ("alibi: expected a floating-point tensor", "got Long")),
    Bad("attn-alibi-bool", "attention", lambda d: attn(d, alibi=torch.zeros(1, 4, 5, dtype=torch.bool, device=d)), TE, ("alibi: expected a floating-point tensor", "got Bool")),
    Bad("attn-alibi-other-device", "attention", lambda d: attn(d, alibi=t(2, 4, 5, device="cpu")), VE, ("alibi: expected device cuda", "(the device of q)", "got cpu"), needs_cuda=True),
    Bad("raw-attn-alibi-shape", "attention", lambda d: _ops.attention(t(2, 3, 4, 8, device=d), t(2, 5, 2, 8, device=d), t(2, 5, 2, 8, device=d), None, 0.35, True, False, t(1, 1, 4, device=d)), VE, ("alibi: expected shape [B or 1, H or 1, K]", "got [1, 1, 4]")),
    # the split form of attention (composites used for hook_attn_scores) --------------------------
    Bad("scores-H-not-multiple-of-Hkv", "attention", lambda d: ops.attn_scores(t(2, 3, 4, 8, device=d), t(2, 5, 3, 8, device=d), scale=0.35, causal=True), VE, ("k: expected a KV head count that divides H=4", "Hkv=3")),
    Bad("scores-k-head-dim", "attention", lambda d: ops.attn_scores(t(2, 3, 4, 8, device=d), t(2, 5, 2, 6, device=d), scale=0.35, causal=True), VE, ("k: expected shape [2, K, Hkv, 8]", "[2, 5, 2, 6]")),
    Bad("scores-mask-4d-int", "attention", lambda d: ops.attn_scores(t(2, 3, 4, 8, device=d), t(2, 5, 2, 8, device=d), scale=0.35, causal=True, mask=torch.ones(2, 1, 3, 5, dtype=i64, device=d)), TE, ("mask: expected a floating-point additive 4-D mask", "or a bool one", "got Long")),
    Bad("scores-mask-2d-shape", "attention", lambda d: ops.attn_scores(t(2, 3, 4, 8, device=d), t(2, 5, 2, 8, device=d), scale=0.35, causal=True, mask=torch.ones(2, 7, device=d)), VE, ("mask: expected a 2-D padding mask [B, K] = [2, 5]", "[2, 7]")),
    Bad("scores-alibi-rank", "attention", lambda d: scores(d, alibi=t(8, 5, device=d)), VE, ("alibi: expected a 3-D tensor [B or 1, H or 1, K]", "[8, 5]")),
    Bad("scores-alibi-shape", "attention", lambda d: scores(d, alibi=t(8, 1, 5, device=d)), VE, ("alibi: expected shape [B or 1, H or 1, K] = [2 or 1, 4 or 1, 5]", "got [8, 1, 5]")),
    Bad("scores-alibi-integer", "attention", lambda d: scores(d, alibi=torch.zeros(2, 4, 5, dtype=i64, device=d)), TE, ("alibi: expected a floating-point tensor", "got Long")),
    Bad("scores-alibi-other-device", "attention", lambda d: scores(d, alibi=t(2, 4, 5, device="cpu")), VE, ("alibi: expected device cuda", "got cpu"), needs_cuda=True),
    Bad("scores-q-integer", "attention", lambda d: ops.attn_scores(torch.ones(2, 3, 4, 8, dtype=i64, device=d), t(2, 5, 2, 8, device=d), scale=0.35, causal=True), TE, ("q: expected a floating-point tensor", "got Long")),
    Bad("softmax-integer-scores", "attention", lambda d: ops.attn_softmax(torch.ones(2, 4, 3, 5, dtype=i64, device=d)), TE, ("scores: expected a floating-point tensor", "got Long")),
    Bad("apply-v-keys", "attention", lambda d: ops.attn_apply(t(2, 4, 3, 5, device=d), t(2, 6, 2, 8, device=d)), VE, ("v: expected shape [2, 5, Hkv, Dh]", "[2, 6, 2, 8]")),
    Bad("apply-pattern-rank", "attention", lambda d: ops.attn_apply(t(2, 4, 3, device=d), t(2, 5, 2, 8, device=d)), VE, ("pattern: expected a 4-D tensor [B, H, S, K]", "[2, 4, 3]")),
    # softcap (Gemma 2) and window (sliding window), the fused op and the split form --------------------
    Bad("attn-softcap-negative", "attention", lambda d: attn(d, softcap=-1.0), VE, ("softcap: expected None, 0 (off) or a positive finite float", "got -1")),
    Bad("attn-softcap-nan", "attention", lambda d: attn(d, softcap=float("nan")), VE, ("softcap: expected None, 0 (off) or a positive finite float", "got nan")),
    Bad("attn-softcap-inf", "attention", lambda d: attn(d, softcap=float("inf")), VE, ("softcap: expected None, 0 (off) or a positive finite float", "got inf")),
    Bad("attn-softcap-str", "attention", lambda d: attn(d, softcap="50"), TE, ("softcap: expected None or a float", "got str '50'")),
    Bad("attn-window-zero", "attention", lambda d: attn(d, window=0), VE, ("window: expected None or W >= 1", "got 0")),
    Bad("attn-window-negative", "attention", lambda d: attn(d, window=-3), VE, ("window: expected None or W >= 1", "got -3")),
    Bad("attn-window-not-causal", "attention", lambda d: ops.attention(t(2, 3, 4, 8, device=d), t(2, 5, 2, 8, device=d), t(2, 5, 2, 8, device=d), scale=0.35, causal=False, window=4), VE, ("window: expected causal=True with a sliding window", "got window=4 with causal=False")),
    Bad("attn-window-float", "attention", lambda d: attn(d, window=2.5), TE, ("window: expected None or an int", "got float 2.5")),
    Bad("raw-attn-window-not-causal", "attention", lambda d: _ops.attention(t(2, 3, 4, 8, device=d), t(2, 5, 2, 8, device=d), t(2, 5, 2, 8, device=d), None, 0.35, False, False, None, None, 2), VE, ("window: expected causal=True", "got window=2 with causal=False")),
    Bad("raw-attn-softcap-negative", "attention", lambda d: _ops.attention(t(2, 3, 4, 8, device=d), t(2, 5, 2, 8, device=d), t(2, 5, 2, 8, device=d), None, 0.35, True, True, None, -0.5), VE, ("softcap: expected None, 0 (off) or a positive finite float", "got -0.5")),
    Bad("scores-softcap-negative", "attention", lambda d: ops.attn_scores(t(2, 3, 4, 8, device=d), t(2, 5, 2, 8, device=d), scale=0.35, causal=True, softcap=-2.0), VE, ("softcap: expected None, 0 (off) or a positive finite float", "got -2")),
    Bad("scores-window-not-causal", "attention", lambda d: ops.attn_scores(t(2, 3, 4, 8, device=d), t(2, 5, 2, 8, device=d), scale=0.35, causal=False, window=3), VE, ("window: expected causal=True", "got window=3 with causal=False")),
    Bad("scores-window-zero", "attention", lambda d: ops.attn_scores(t(2, 3, 4, 8, device=d), t(2, 5, 2, 8, device=d), scale=0.35, causal=True, window=0), VE, ("window: expected None or W >= 1", "got 0")),
    # rotary ------------------------------------------------------------------------------------
    Bad("rope-x-rank", "rotary", lambda d: rope(d, x=t(2, 3, 32, device=d)), VE, ("x: expected a 4-D tensor [B, S, n, Dh]", "got 3-D", "[2, 3, 32]")),
    Bad("rope-cos-rank-4", "rotary", lambda d: rope(d, cos=t(1, 3, 1, 6, device=d)), VE, ("cos: expected a 3-D tensor [B or 1, S, R]", "got 4-D", "[1, 3, 1, 6]")),
    Bad("rope-cos-rank-1", "rotary", lambda d: rope(d, cos=t(6, device=d)), VE, ("cos: expected a 3-D tensor [B or 1, S, R]", "got 1-D", "[6]")),
    Bad("rope-raw-cos-2d", "rotary", lambda d: rope(d, cos=t(3, 6, device=d), sin=t(3, 6, device=d), raw=True), VE, ("cos: expected a 3-D tensor [B or 1, S, R]", "got 2-D", "[3, 6]")),
    Bad("rope-sin-rank", "rotary", lambda d: rope(d, sin=t(2, 1, 3, 6, device=d)), VE, ("sin: expected a 3-D tensor [B or 1, S, R]", "got 4-D", "[2, 1, 3, 6]")),
    Bad("rope-cos-S", "rotary", lambda d: rope(d, cos=t(1, 4, 6, device=d), sin=t(1, 4, 6, device=d)), VE, ("cos: expected shape [B or 1, S, R] = [2 or 1, 3, R]", "got [1, 4, 6]")),
    Bad("rope-cos-batch", "rotary", lambda d: rope(d, cos=t(3, 3, 6, device=d), sin=t(3, 3, 6, device=d)), VE, ("cos: expected shape [B or 1, S, R] = [2 or 1, 3, R]", "got [3, 3, 6]")),
    Bad("rope-odd-R", "rotary", lambda d: rope(d, cos=t(1, 3, 5, device=d), sin=t(1, 3, 5, device=d)), VE, ("cos: expected an even rotary width R with 0 < R <= Dh=8", "got R=5", "[1, 3, 5]")),
    Bad("rope-R-past-Dh", "rotary", lambda d: rope(d, cos=t(1, 3, 10, device=d), sin=t(1, 3, 10, device=d)), VE, ("cos: expected an even rotary width R with 0 < R <= Dh=8", "got R=10")),
    Bad("rope-R-zero", "rotary", lambda d: rope(d, cos=t(1, 3, 0, device=d), sin=t(1, 3, 0, device=d)), VE, ("cos: expected an even rotary width R with 0 < R <= Dh=8", "got R=0")),
    Bad("rope-sin-not-cos-shape", "rotary", lambda d: rope(d, sin=t(1, 3, 4, device=d)), VE, ("sin: expected the shape of cos [1, 3, 6]", "got [1, 3, 4]")),
    Bad("rope-x-integer", "rotary", lambda d: rope(d, x=torch.ones(2, 3, 4, 8, dtype=i64, device=d)), TE, ("x: expected a floating-point tensor", "got Long")),
    Bad("rope-cos-integer", "rotary", lambda d: rope(d, cos=torch.ones(1, 3, 6, dtype=torch.int32, device=d)), TE, ("cos: expected a floating-point tensor", "got Int")),
    Bad("rope-sin-bool", "rotary", lambda d: rope(d, sin=torch.ones(1, 3, 6, dtype=torch.bool, device=d)), TE, ("sin: expected a floating-point tensor", "got Bool")),
    Bad("rope-cos-other-device", "rotary", lambda d: rope(d, cos=t(1, 3, 6, device="cpu")), VE, ("cos: expected device cuda", "(the device of x)", "got cpu"), needs_cuda=True),
    Bad("rope-sin-other-device", "rotary", lambda d: rope(d, sin=t(1, 3, 6, device="cpu")), VE, ("sin: expected device cuda", "got cpu"), needs_cuda=True),
    # per_head_proj ------------------------------------------------------------------------------
    Bad("proj-x-rank", "per_head_proj", lambda d: php(d, x=t(2, 3, 8, device=d)), VE, ("x: expected a 4-D tensor [B, S, n, D]", "got 3-D", "[2, 3, 8]")),
    Bad("proj-W-rank", "per_head_proj", lambda d: php(d, W=t(8, 5, device=d)), VE, ("W: expected a 3-D tensor [n, D, E]", "got 2-D", "[8, 5]")),
    Bad("proj-W-heads", "per_head_proj", lambda d: php(d, W=t(3, 8, 5, device=d)), VE, ("W: expected size 4 at dim 0 (n, the head count of x)", "[3, 8, 5]")),
    Bad("proj-W-model-dim", "per_head_proj", lambda d: php(d, W=t(4, 7, 5, device=d)), VE, ("W: expected size 8 at dim 1 (D, the last dim of x)", "[4, 7, 5]")),
    Bad("proj-b-size", "per_head_proj", lambda d: php(d, b=t(4, 6, device=d)), VE, ("b: expected size 5 at dim 1 (E, the last dim of W)", "[4, 6]")),
    Bad("proj-b-heads", "per_head_proj", lambda d: php(d, b=t(3, 5, device=d)), VE, ("b: expected size 4 at dim 0", "[3, 5]")),
    Bad("proj-b-rank", "per_head_proj", lambda d: php(d, b=t(20, device=d)), VE, ("b: expected a 2-D tensor [n, E]", "got 1-D", "[20]")),
    Bad("proj-x-integer", "per_head_proj", lambda d: php(d, x=torch.ones(2, 3, 4, 8, dtype=i64, device=d), W=torch.ones(4, 8, 5, dtype=i64, device=d)), TE, ("x: expected a floating-point tensor", "got Long")),
    Bad("proj-W-dtype", "per_head_proj", lambda d: php(d, W=t(4, 8, 5, dtype=f64, device=d)), TE, ("W: expected dtype Float (the dtype of x)", "got Double")),
    Bad("proj-b-dtype", "per_head_proj", lambda d: php(d, b=t(4, 5, dtype=torch.bfloat16, device=d)), TE, ("b: expected dtype Float (the dtype of x)", "got BFloat16")),
    # split_qkv ----------------------------------------------------------------------------------
    Bad("split-unknown-layout", "split_qkv", lambda d: split(d, layout="nope"), VE, ("layout: expected one of", "'blocked'", "got 'nope'")),
    Bad("split-unknown-layout-raw-op", "split_qkv", lambda d: _ops.split_qkv(t(8, 16, device=d), 4, 2, 2, "nope", True), VE, ("layout: expected one of", "got 'nope'")),
    Bad("split-weight-size", "split_qkv", lambda d: split(d, t(8, 18, device=d)), VE, ("weight: expected size 16 = (n_heads 4 + 2 * n_kv_heads 2) * d_head 2 at dim 1", "[8, 18]")),
    Bad("split-weight-orientation", "split_qkv", lambda d: split(d, t(8, 16, device=d), conv1d=False), VE, ("weight: expected size 16", "at dim 0 (Linear stores [out, in])", "[8, 16]")),
    Bad("split-weight-rank", "split_qkv", lambda d: split(d, t(8, 16, 1, device=d)), VE, ("weight: expected a 2-D tensor", "got 3-D", "[8, 16, 1]")),
    Bad("split-bias-size", "split_qkv", lambda d: split(d, bias=t(15, device=d)), VE, ("bias: expected shape (16,)", "got (15,)")),
    Bad("split-bias-rank", "split_qkv", lambda d: split(d, bias=t(1, 16, device=d)), VE, ("bias: expected shape (16,)", "got (1, 16)")),
    Bad("split-H-not-multiple-of-Hkv", "split_qkv", lambda d: split(d, t(8, 20, device=d), H=4, Hkv=3), VE, ("n_kv_heads: expected a divisor of n_heads=4", "got 3")),
    Bad("split-interleaved-gqa", "split_qkv", lambda d: split(d, layout="interleaved"), VE, ("layout: 'interleaved' needs n_kv_heads == n_heads (4)", "n_kv_heads=2")),
    Bad("split-codegen-heads", "split_qkv", lambda d: split(d, t(8, 36, device=d), H=6, Hkv=6, layout="codegen"), VE, ("layout: 'codegen' needs", "divisible by 4", "n_heads=6")),
    Bad("split-d-head-zero", "split_qkv", lambda d: split(d, Dh=0), VE, ("d_head: expected a positive head dim", "got 0")),
    # pack_qkv -----------------------------------------------------------------------------------
    Bad("pack-W_Q-rank", "pack_qkv", lambda d: pack(d, t(8, 8, device=d)), VE, ("W_Q: expected a 3-D tensor [H, D, Dh]", "got 2-D", "[8, 8]")),
    Bad("pack-W_K-model-dim", "pack_qkv", lambda d: pack(d, None, t(2, 7, 2, device=d)), VE, ("W_K: expected shape [2, 8, 2]", "[2, 7, 2]")),
    Bad("pack-W_V-heads", "pack_qkv", lambda d: pack(d, None, None, t(3, 8, 2, device=d)), VE, ("W_V: expected shape [2, 8, 2]", "[3, 8, 2]")),
    Bad("pack-W_V-dtype", "pack_qkv", lambda d: pack(d, None, None, t(2, 8, 2, dtype=f64, device=d)), TE, ("W_V: expected dtype Float (the dtype of W_Q)", "got Double")),
    Bad("pack-H-not-multiple-of-Hkv", "pack_qkv", lambda d: pack(d, None, t(3, 8, 2, device=d), t(3, 8, 2, device=d)), VE, ("n_kv_heads: expected a divisor of n_heads=4", "got 3")),
    Bad("pack-unknown-layout", "pack_qkv", lambda d: pack(d, layout="fused"), VE, ("layout: expected one of", "got 'fused'")),
    Bad("pack-b_K-shape", "pack_qkv", lambda d: pack(d, None, None, None, t(4, 2, device=d), t(2, 3, device=d), t(2, 2, device=d)), VE, ("b_K: expected shape (2, 2)", "got (2, 3)")),
    Bad("pack-b_V-missing", "pack_qkv", lambda d: pack(d, None, None, None, t(4, 2, device=d), t(2, 2, device=d), None), VE, ("b_V: expected shape (2, 2)", "got NoneType")),
    # kv_append ----------------------------------------------------------------------------------
    Bad("append-start-negative", "kv_append", lambda d: append(d, start=-1), VE, ("start: expected 0 <= start and start + S <= capacity 10", "S = 3", "got start=-1")),
    Bad("append-start-past-capacity", "kv_append", lambda d: append(d, start=8), VE, ("start: expected 0 <= start and start + S <= capacity 10", "got start=8")),
    Bad("append-k_new-heads", "kv_append", lambda d: append(d, k_new=t(2, 3, 3, 4, device=d), v_new=t(2, 3, 3, 4, device=d)), VE, ("k_new: expected shape [2, S, 2, 4]", "[2, 3, 3, 4]")),
    Bad("append-k_new-batch", "kv_append", lambda d: append(d, k_new=t(1, 3, 2, 4, device=d), v_new=t(1, 3, 2, 4, device=d)), VE, ("k_new: expected shape [2, S, 2, 4]", "[1, 3, 2, 4]")),
    Bad("append-v_new-shape", "kv_append", lambda d: append(d, v_new=t(2, 4, 2, 4, device=d)), VE, ("v_new: expected the shape of k_new [2, 3, 2, 4]", "[2, 4, 2, 4]")),
    Bad("append-v_cache-shape", "kv_append", lambda d: append(d, v_cache=t(2, 2, 12, 4, device=d)), VE, ("v_cache: expected the shape of k_cache [2, 2, 10, 4]", "[2, 2, 12, 4]")),
    Bad("append-k_cache-rank", "kv_append", lambda d: append(d, k_cache=t(2, 10, 4, device=d), v_cache=t(2, 10, 4, device=d)), VE, ("k_cache: expected a 4-D tensor [B, Hkv, capacity, Dh]", "got 3-D", "[2, 10, 4]")),
    Bad("append-k_new-rank", "kv_append", lambda d: append(d, k_new=t(2, 3, 8, device=d), v_new=t(2, 3, 8, device=d)), VE, ("k_new: expected a 4-D tensor [B, S, Hkv, Dh]", "[2, 3, 8]")),
    Bad("append-caches-alias", "kv_append", lambda d: (lambda c: append(d, k_cache=c, v_cache=c))(t(2, 2, 10, 4, device=d)), VE, ("v_cache: expected a tensor that does not overlap k_cache",)),
    Bad("append-k_new-dtype", "kv_append", lambda d: append(d, k_new=t(2, 3, 2, 4, dtype=f64, device=d), v_new=t(2, 3, 2, 4, dtype=f64, device=d)), TE, ("k_new: expected dtype Float (the dtype of k_cache)", "got Double")),
]
# fmt: on


def good_call(op: str, device) -> None:
    """The op on good input, checked against the reference: it still works after the error."""
    if op == "attention":
        q, k, v = t(2, 3, 4, 8, device=device), t(2, 5, 2, 8, device=device), t(2, 5, 2, 8, device=device)
        z, lse, _ = ops.attention(q, k, v, scale=0.35, causal=True)
        z_r, lse_r, _ = ref.attention(q, k, v, scale=0.35, causal=True)
        torch.testing.assert_close(z, z_r)
        torch.testing.assert_close(lse, lse_r)
        alibi = t(2, 4, 5, device=device)
        z, _, _ = ops.attention(q, k, v, scale=0.35, causal=True, alibi=alibi)
        torch.testing.assert_close(z, ref.attention(q, k, v, scale=0.35, causal=True, alibi=alibi)[0])
    elif op == "rotary":
        x, cos, sin = t(2, 3, 4, 8, device=device), t(1, 3, 6, device=device), t(1, 3, 6, device=device)
        torch.testing.assert_close(ops.rotary(x, cos, sin), ref.rotary(x, cos, sin))
    elif op == "per_head_proj":
        x, W, b = t(2, 3, 4, 8, device=device), t(4, 8, 5, device=device), t(4, 5, device=device)
        torch.testing.assert_close(ops.per_head_proj(x, W, b), ref.per_head_proj(x, W, b))
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


@pytest.mark.parametrize("case", ERRORS, ids=[c.id for c in ERRORS])
def test_bad_input_raises_a_clear_error(case, device):
    if case.needs_cuda:
        skip_unless_available("cuda")
        if device.type != "cuda":
            pytest.skip("a device-mismatch case: runs with device=cuda")
    with pytest.raises(case.exc) as info:
        case.call(device)
    message = str(info.value)
    missing = [f for f in case.fragments if f not in message]
    assert not missing, f"message lacks {missing}:\n{message}"
    good_call(case.op, device)


def test_failed_kv_append_writes_nothing(device):
    """The checks run before any write: a rejected append leaves both caches as they were."""
    k_cache, v_cache = t(2, 2, 10, 4, device=device), t(2, 2, 10, 4, device=device)
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(ValueError):
        ops.kv_append(k_cache, v_cache, t(2, 3, 2, 4, device=device), t(2, 4, 2, 4, device=device), 2)
    with pytest.raises(ValueError):
        ops.kv_append(k_cache, v_cache, t(2, 3, 2, 4, device=device), t(2, 3, 2, 4, device=device), 9)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
