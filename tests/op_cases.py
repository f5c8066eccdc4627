"""The one case table of the attention and rotary ops, and the checks every runner applies to it.

Run by pytest on every device (tests/test_ops.py, tests/test_rotary.py: CPU, and CUDA where present), by
the GPU smoke test (scripts/cuda_smoke.py) and through the CPU emulator of the CUDA kernels
(tools/cuda_emulate/run.py, via cuda_smoke). A runner passes `run`, the op under test; the checks compare
it with pyqkv/reference.py by the one tolerance rule (tests/tolerance.py), ref_hi in float64 and ref_lo
in the kernel's dtype, and check what must hold exactly (hidden keys get weight 0, a row that sees no key
gives z = 0 and lse = -inf, features past R pass through, the input is not modified).

Importable without pyqkv (the GPU smoke test loads it by path): the reference is loaded from
pyqkv/reference.py by path, and only tests/tolerance.py is imported besides torch.

Notation: B batch, S query positions, K key positions, H query heads, Hkv key/value heads, Dh head dim;
rotary: n heads, R rotated features.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import tolerance  # noqa: E402


def _load_reference():
    """pyqkv/reference.py by path: the oracle imports nothing of pyqkv, so neither does this."""
    path = os.path.join(os.path.dirname(HERE), "pyqkv", "reference.py")
    spec = importlib.util.spec_from_file_location("pyqkv_reference_by_path", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ref = _load_reference()
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


# --------------------------------------------------------------------------------------------------
# attention


@dataclass(frozen=True)
class AttnCase:
    """One attention input. q, k, v come from one fused projection [B, S, (H + 2 Hkv) Dh] (non-contiguous
    views) when K == S; when K != S, k and v are windows of a cache [B, Hkv, K + 7, Dh] whose unused
    slots hold NaN (results must not change)."""

    name: str
    B: int
    S: int
    K: int
    H: int
    Hkv: int
    Dh: int
    causal: bool = True
    # None; 2-D [B, K]: "pad" (bool), "pad_int" (int64), "pad_float" (0/1 in q's dtype), "pad_all" (batch
    # row 1 sees nothing), "pad_nan" (padded keys' K/V rows hold NaN). Batch row 1 is left-padded: its
    # first 3 keys are hidden, so with causal and S == K its first queries see no key.
    # 4-D: "add" (additive, hidden = the mask dtype's minimum, visible = finite biases), "add_nan"
    # (hidden = NaN or -inf: hidden by the one mask rule), "bias" (finite biases only), "bool4d" (True =
    # attend). Random ~20% of the entries hidden, query row 0 of batch 0 fully hidden.
    mask: str | None = None
    mask_shape: str = "B1"  # 4-D masks: "B1" [B, 1, S, K], "BH" [B, H, S, K], "11x" [1, 1, S, K] expanded to B
    mask_dtype: str = "f32"  # additive 4-D masks: "f32", "q" (q's dtype), "f16"
    mask_causal: bool = False  # the causal structure folded into the 4-D mask, as Hugging Face passes it
    pattern: bool = False  # also run with return_pattern=True (every case runs without it)
    scale: float | None = None  # default Dh ** -0.5
    q_gain: float = 1.0  # multiplies q: large logits exercise the online-softmax rescaling and the softcap
    layout: str = "fused"  # "fused" (above), "q_stride2" (q with last-dim stride 2), "any_strides" (no dim unit-stride)
    # None; "per_batch" [B, H, K], "b1" [1, H, K], "heads1" [B, 1, K], "expanded" [1, H, K] expanded to
    # [B, H, K] (stride 0 over B), "strided" [B, H, K] read through strides (every other entry of
    # transposed storage whose other entries are NaN)
    alibi: str | None = None
    alibi_dtype: str = "f32"  # "f32", "q", "f16", "f64"
    softcap: float | None = None  # Gemma 2's logit softcapping (with q_gain > 1 the cap bites)
    window: int | None = None  # a sliding window of W keys (causal only)
    dtypes: tuple = ALL_DTYPES


def _softcap_window_cases(c):
    """Gemma 2's softcap and sliding windows on the tails of the CPU kernel's blocks: large logits (q x 4) so
    that the cap bites, a [1, H, K] alibi in q's dtype with every softcap."""
    shapes = [  # (B, S, K, H, Hkv, Dh, mask): decode, GQA/MQA, Dh 80, several key and query blocks
        (2, 1, 40, 12, 4, 64, {}),
        (2, 17, 40, 12, 1, 80, dict(mask="pad")),
        (1, 89, 89, 12, 4, 32, dict(mask="add", mask_shape="BH", mask_dtype="q")),
        (1, 89, 300, 4, 2, 64, dict(mask="bool4d", mask_shape="BH")),  # the window skips whole key blocks
        (1, 130, 140, 4, 4, 80, {}),
    ]
    settings = [(5.0, None), (None, 1), (None, 16), (2.0, 33), (0.0, 300)]
    return [
        c(
            f"softcap={sc} window={w} B{B}-S{S}-K{K}-H{H}-Hkv{Hkv}-Dh{Dh}-{m.get('mask', 'nomask')}",
            B,
            S,
            K,
            H,
            Hkv,
            Dh,
            q_gain=4.0,
            softcap=sc,
            window=w,
            alibi="b1" if sc else None,
            alibi_dtype="q",
            pattern=True,
            **m,
        )
        for B, S, K, H, Hkv, Dh, m in shapes
        for sc, w in settings
    ]


# Every mask kind, causal and not, at one shape with K > S (the masks' own rows of test cases).
MASK_KINDS = {
    "nomask": {},
    "pad": dict(mask="pad"),
    "pad_int": dict(mask="pad_int"),
    "pad_float": dict(mask="pad_float"),
    "add [B,1,S,K] q-dtype": dict(mask="add", mask_dtype="q"),
    "add [B,H,S,K] q-dtype": dict(mask="add", mask_shape="BH", mask_dtype="q"),
    "add [1,1,S,K] expanded q-dtype": dict(mask="add", mask_shape="11x", mask_dtype="q"),
    "add [B,1,S,K] float32": dict(mask="add"),
    "add_nan [B,H,S,K]": dict(mask="add_nan", mask_shape="BH", mask_dtype="q"),
    "bool4d [B,H,S,K]": dict(mask="bool4d", mask_shape="BH"),
    "bool4d [1,1,S,K] expanded": dict(mask="bool4d", mask_shape="11x"),
    "bias [B,H,S,K] finite": dict(mask="bias", mask_shape="BH", mask_dtype="q"),
}

# Every alibi kind with no mask, 2-D padding and 4-D additive masks.
ALIBI_MASKS = [
    ("per_batch", "q", {}),
    ("b1", "q", dict(mask="pad")),
    ("heads1", "f32", dict(mask="add", mask_dtype="q")),
    ("expanded", "q", dict(mask="add", mask_shape="BH", mask_dtype="q")),
    ("strided", "f64", dict(mask="add", mask_shape="BH")),
    ("per_batch", "q", dict(mask="pad_int")),
]


def attention_cases() -> list[AttnCase]:
    """The table. Sizes hit the tails of every kernel's tiles (CPU: 64 queries x 128 keys; CUDA: tensor-core
    tiles, the decode kernel's 8 rows per KV head, Flash-Decoding splits), every Dh in {32, 64, 80} and
    odd ones, Hkv in {H, H/3, 1}, K == S, K > S and K < S (rows that see nothing)."""
    c = AttnCase
    return [
        # shapes: prefill, cache, decode, tails ---------------------------------------------------------
        c("prefill gqa causal fused-view +pattern", 2, 89, 89, 12, 4, 64, pattern=True),
        c("cache K>S Dh80 +pattern", 2, 17, 40, 4, 4, 80, pattern=True),
        c("Dh72 tile tail", 1, 65, 65, 2, 1, 72),
        c("odd Dh33 non-causal", 1, 20, 31, 2, 2, 33, causal=False, pattern=True),
        c("decode S=1 K=24 sees the whole cache", 2, 1, 24, 12, 12, 32, pattern=True),
        c("decode S=1 K=1 MQA non-causal", 2, 1, 1, 12, 1, 64, causal=False, pattern=True),
        c("S=17 Dh64 pad", 2, 17, 17, 12, 4, 64, mask="pad", pattern=True),
        c(
            "K>S Dh80 MQA add q-dtype non-causal",
            2,
            17,
            40,
            12,
            1,
            80,
            causal=False,
            mask="add",
            mask_dtype="q",
            pattern=True,
        ),
        c("K>S Dh32 MHA pad_int", 2, 17, 40, 12, 12, 32, mask="pad_int", pattern=True),
        c(
            "S=89 K=112 add [B,H,S,K] q-dtype",
            1,
            89,
            112,
            12,
            4,
            32,
            mask="add",
            mask_shape="BH",
            mask_dtype="q",
            pattern=True,
        ),
        c("S=89 Dh80 MHA non-causal", 1, 89, 89, 12, 12, 80, causal=False, pattern=True),
        c("S=89 MQA add [B,H,S,K]", 1, 89, 89, 12, 1, 64, mask="add", mask_shape="BH", mask_dtype="q", pattern=True),
        c("several query and key blocks pad", 1, 130, 300, 12, 4, 64, mask="pad", pattern=True),
        c(
            "several blocks Dh80 finite bias non-causal",
            1,
            130,
            300,
            4,
            2,
            80,
            causal=False,
            mask="bias",
            mask_shape="BH",
            mask_dtype="q",
            pattern=True,
        ),
        c("causal K<S: first S-K rows see nothing", 1, 150, 20, 4, 2, 32, pattern=True),
        c("S=6 K=37 cache pad non-causal", 2, 6, 37, 12, 4, 64, causal=False, mask="pad", pattern=True),
        c("S=1 K=37 cache pad", 2, 1, 37, 12, 4, 64, mask="pad", pattern=True),
        c("any strides causal", 2, 9, 13, 4, 2, 16, layout="any_strides", pattern=True),
        c(
            "any strides non-causal scale 0.37",
            2,
            9,
            13,
            4,
            2,
            16,
            causal=False,
            scale=0.37,
            layout="any_strides",
            pattern=True,
        ),
        # masks ---------------------------------------------------------------------------------------------
        c("pad2d bool left-padding +pattern", 2, 24, 24, 4, 2, 64, mask="pad", pattern=True),
        c("pad2d int64", 2, 24, 24, 4, 2, 64, mask="pad_int"),
        c("pad2d batch fully padded", 2, 12, 12, 2, 1, 32, mask="pad_all", pattern=True),
        c("pad2d NaN in padded K/V", 2, 40, 40, 4, 2, 64, mask="pad_nan"),
        c("left padding S=K=17: rows that see nothing", 2, 17, 17, 4, 2, 32, mask="pad", pattern=True),
        c(
            "hf4d: causal and padding folded into an additive mask",
            2,
            17,
            17,
            4,
            2,
            32,
            causal=False,
            mask="add",
            mask_dtype="q",
            mask_causal=True,
            pattern=True,
        ),
        c("add4d [B,1,S,K] +pattern", 2, 30, 30, 4, 4, 64, causal=False, mask="add", mask_causal=True, pattern=True),
        c(
            "add4d expanded [1,1,S,K]",
            2,
            30,
            30,
            4,
            4,
            64,
            causal=False,
            mask="add",
            mask_shape="11x",
            mask_causal=True,
        ),
        c(
            "add4d per-head [B,H,S,K]",
            2,
            30,
            30,
            4,
            2,
            64,
            causal=False,
            mask="add",
            mask_shape="BH",
            mask_causal=True,
            pattern=True,
        ),
        c("add4d float16 mask", 2, 30, 30, 4, 4, 64, causal=False, mask="add", mask_dtype="f16", mask_causal=True),
        c(
            "add4d NaN entries hide +pattern",
            2,
            30,
            30,
            4,
            2,
            64,
            causal=False,
            mask="add_nan",
            mask_causal=True,
            pattern=True,
        ),
        c(
            "bool4d [B,1,S,K] +pattern",
            2,
            30,
            30,
            4,
            2,
            64,
            causal=False,
            mask="bool4d",
            mask_causal=True,
            pattern=True,
        ),
        c("bool4d expanded causal", 2, 89, 89, 12, 4, 64, mask="bool4d", mask_shape="11x"),
        *[
            c(
                f"mask {kind} {'causal' if causal else 'non-causal'} K>S",
                2,
                17,
                40,
                12,
                4,
                32,
                causal=causal,
                pattern=True,
                **kw,
            )
            for kind, kw in MASK_KINDS.items()
            for causal in (True, False)
        ],
        # decode: the decode kernel (attention_decode.cuh, at most 8 query rows per KV head, no pattern),
        # Flash-Decoding splits ----------------------------------------------------------------------------
        c("decode bool4d S=1", 2, 1, 700, 8, 2, 64, causal=False, mask="bool4d", mask_causal=True),
        c("causal K<S: empty rows +pattern", 1, 8, 5, 2, 2, 32, pattern=True),
        c("causal K<S prefill: empty rows +pattern", 1, 40, 20, 2, 1, 64, pattern=True),
        c("decode S=1 K=5000 split", 2, 1, 5000, 32, 8, 128),
        c("decode S=1 K=5000 +pattern", 1, 1, 5000, 8, 2, 64, pattern=True),
        c("decode S=4 MQA", 1, 4, 300, 16, 1, 64),
        c("decode MHA S=1 pad2d NaN slots", 2, 1, 700, 4, 4, 64, mask="pad_nan"),
        c("decode S=2 K=1: an empty causal row", 1, 2, 1, 4, 2, 32),
        c("decode Dh80 R=3 (idle lanes, idle rows)", 1, 1, 333, 6, 2, 80),
        c("decode GQA R=8 K=2000 split", 2, 1, 2000, 16, 2, 128),
        c("decode fully padded batch", 2, 1, 50, 4, 2, 64, mask="pad_all"),
        c("decode Dh256 split", 1, 1, 900, 4, 1, 256),
        c(
            "decode S=1 add4d bcast + alibi",
            2,
            1,
            400,
            8,
            4,
            64,
            causal=False,
            mask="add",
            mask_shape="11x",
            mask_causal=True,
            alibi="b1",
        ),
        c("decode S=3 pad2d", 2, 3, 700, 8, 2, 64, mask="pad"),
        c("decode S=2 add4d split", 2, 2, 600, 8, 2, 64, causal=False, mask="add", mask_causal=True),
        # numerics and odd sizes ------------------------------------------------------------------------------
        c("big logits rescaling", 1, 200, 200, 2, 2, 64, scale=1.0, q_gain=4.0),
        c("q last-dim stride 2", 1, 33, 33, 2, 2, 64, layout="q_stride2", pattern=True),
        c("Dh256", 1, 70, 70, 2, 2, 256, dtypes=(bf16, f16, f32)),
        c("Dh300 (CUDA-core fallback)", 1, 20, 20, 2, 2, 300, dtypes=(bf16, f32)),
        c("S=K=1", 1, 1, 1, 2, 1, 32, pattern=True),
        c("S=K=64 exact tile", 1, 64, 64, 2, 2, 64, pattern=True),
        c("tiny float64", 1, 3, 5, 2, 1, 4, pattern=True, dtypes=(f64,)),
        c("no keys K=0", 1, 3, 0, 2, 1, 16, causal=False, pattern=True),
        # ALiBi: a per-key bias [B or 1, H or 1, K] ---------------------------------------------------------
        c("alibi prefill gqa causal +pattern", 2, 89, 89, 12, 4, 64, pattern=True, alibi="per_batch"),
        c("alibi cache K>S Dh80 pad2d +pattern", 2, 17, 40, 4, 4, 80, mask="pad", pattern=True, alibi="b1"),
        c(
            "alibi add4d per-head non-causal +pattern",
            2,
            30,
            30,
            4,
            2,
            64,
            causal=False,
            mask="add",
            mask_shape="BH",
            mask_causal=True,
            pattern=True,
            alibi="heads1",
            alibi_dtype="f16",
        ),
        c("alibi causal K<S strided bias +pattern", 1, 40, 20, 2, 1, 64, pattern=True, alibi="strided"),
        c("alibi decode S=1 K=1500 split", 2, 1, 1500, 8, 2, 64, alibi="per_batch"),
        c("alibi decode S=2 pad2d +pattern", 2, 2, 300, 8, 2, 64, mask="pad", pattern=True, alibi="b1"),
        *[
            c(
                f"alibi {a} ({adt}) {kw.get('mask', 'nomask')} {'causal' if causal else 'non-causal'} K>S",
                2,
                17,
                40,
                12,
                4,
                32,
                causal=causal,
                alibi=a,
                alibi_dtype=adt,
                pattern=True,
                **kw,
            )
            for a, adt, kw in ALIBI_MASKS
            for causal in (True, False)
        ],
        c("alibi decode S=1 K=24 MHA", 2, 1, 24, 12, 12, 32, alibi="per_batch", alibi_dtype="q", pattern=True),
        c("alibi S=89 K=112 pad", 1, 89, 112, 12, 4, 32, mask="pad", alibi="per_batch", alibi_dtype="q", pattern=True),
        c(
            "alibi several blocks MQA non-causal",
            1,
            130,
            300,
            12,
            1,
            64,
            causal=False,
            alibi="per_batch",
            alibi_dtype="q",
            pattern=True,
        ),
        c("alibi causal K<S", 1, 150, 20, 4, 2, 32, alibi="per_batch", alibi_dtype="q", pattern=True),
        c(
            "alibi Dh80 add [1,1,S,K] expanded",
            2,
            17,
            17,
            12,
            12,
            80,
            mask="add",
            mask_shape="11x",
            mask_dtype="q",
            alibi="per_batch",
            alibi_dtype="q",
            pattern=True,
        ),
        c(
            "alibi left padding S=K=17: rows that see nothing",
            2,
            17,
            17,
            4,
            2,
            32,
            mask="pad",
            alibi="per_batch",
            alibi_dtype="q",
            pattern=True,
        ),
        c("alibi cache S=6 K=37 pad strided", 2, 6, 37, 12, 4, 64, mask="pad", alibi="strided", pattern=True),
        # softcap (Gemma 2) and sliding windows -----------------------------------------------------------
        c("softcap prefill gqa +pattern", 2, 89, 89, 12, 4, 64, pattern=True, softcap=5.0, q_gain=3.0),
        c("softcap decode split + alibi", 2, 1, 1500, 8, 2, 64, softcap=2.0, q_gain=3.0, alibi="b1"),
        c(
            "softcap add4d non-causal",
            2,
            30,
            30,
            4,
            2,
            64,
            causal=False,
            mask="add",
            mask_causal=True,
            softcap=1.0,
            q_gain=3.0,
        ),
        c("window prefill K>S +pattern", 2, 89, 120, 12, 4, 64, pattern=True, window=33),
        c("window tensor-core tiles skipped", 1, 200, 200, 4, 2, 64, window=17),
        c("window decode S=1 split", 2, 1, 3000, 8, 2, 128, window=700),
        c("window decode S=3 pad2d +pattern", 2, 3, 400, 8, 2, 64, mask="pad", pattern=True, window=5),
        c("window W=1 sees itself only", 1, 20, 20, 2, 1, 32, pattern=True, window=1),
        c(
            "window + softcap + bool4d",
            2,
            40,
            40,
            4,
            2,
            64,
            mask="bool4d",
            mask_causal=True,
            window=9,
            softcap=3.0,
            q_gain=3.0,
        ),
        *_softcap_window_cases(c),
    ]


def _randn(shape, gen, dtype, device):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


_DTYPES = {"f32": f32, "f64": f64, "f16": f16}


def _dtype(code, q_dtype):
    return q_dtype if code == "q" else _DTYPES[code]


def build_alibi(case: AttnCase, dtype, device):
    """The case's ALiBi bias as Bloom builds it: -slope_h * position_j, positions of batch row b offset by b."""
    B, H, K, kind = case.B, case.H, case.K, case.alibi
    adt = _dtype(case.alibi_dtype, dtype)
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
    pos = (torch.arange(K).view(1, 1, K) - torch.arange(B).view(B, 1, 1)).float()
    full = -slopes.view(1, H, 1) * pos  # [B, H, K]
    if kind == "per_batch":
        return full.to(device=device, dtype=adt)
    if kind == "b1":
        return full[:1].to(device=device, dtype=adt)
    if kind == "heads1":
        return (-0.25 * pos).to(device=device, dtype=adt)
    if kind == "expanded":
        return full[:1].to(device=device, dtype=adt).expand(B, H, K)
    if kind == "strided":
        buf = torch.full((2 * K, H, B), float("nan"), dtype=adt)
        buf[::2] = full.permute(2, 1, 0).to(adt)
        return buf.to(device).permute(2, 1, 0)[..., ::2]
    raise ValueError(f"alibi kind {kind!r}")


def _build_mask(case: AttnCase, dtype, device, g):
    B, S, K, H = case.B, case.S, case.K, case.H
    kind = case.mask
    if kind is None:
        return None
    if kind.startswith("pad"):
        keep = torch.rand((B, K), generator=g) > 0.15
        keep[0] = True
        if B > 1:
            keep[1, : min(3, K)] = False  # left padding: with causal and S == K, query 0 of batch 1 sees nothing
        if kind == "pad_all" and B > 1:
            keep[1] = False
        mdtype = {"pad_int": torch.int64, "pad_float": dtype}.get(kind, torch.bool)
        return keep.to(device=device, dtype=mdtype)
    lead = 1 if case.mask_shape == "11x" else B
    heads = H if case.mask_shape == "BH" else 1
    shape = (lead, heads, S, K)
    hidden = torch.rand(shape, generator=g) < 0.2
    if case.mask_causal:
        hidden |= torch.arange(K).view(1, K) > (K - S) + torch.arange(S).view(S, 1)
    if S > 0 and K > 0:
        hidden[0, 0, 0] = True  # one fully hidden row
        if heads > 1:
            hidden[-1, -1, S // 2, : K // 2] = True
    bias = -torch.rand(shape, generator=g) * 2.0  # ordinary biases stay biases
    if kind == "bool4d":
        m = ~hidden
    else:
        mdtype = _dtype(case.mask_dtype, dtype)
        if kind == "bias":
            m = bias.to(mdtype)
        elif kind == "add":
            m = bias.to(mdtype).masked_fill(hidden, torch.finfo(mdtype).min)
        elif kind == "add_nan":
            fill = torch.where(torch.rand(shape, generator=g) < 0.5, float("nan"), float("-inf"))
            m = torch.where(hidden, fill, bias).to(mdtype)
        else:
            raise ValueError(f"mask kind {kind!r}")
    m = m.to(device)
    return m.expand(B, 1, S, K) if case.mask_shape == "11x" else m


def build_attention_inputs(case: AttnCase, dtype, device, seed=0):
    """q, k, v, mask, scale, alibi, and the k, v the reference should see (NaNs replaced by zeros where the
    op must ignore them: the reference multiplies through)."""
    g = torch.Generator().manual_seed(seed)
    B, S, K, H, Hkv, Dh = case.B, case.S, case.K, case.H, case.Hkv, case.Dh
    if case.layout == "any_strides":  # non-unit strides in every dim, Dh included
        q = _randn((B, H, S, 2 * Dh), g, dtype, device).transpose(1, 2)[..., ::2]
        k = _randn((Hkv, K, B, 2 * Dh), g, dtype, device).permute(2, 1, 0, 3)[..., 1::2]
        v = _randn((B, K, Hkv, 3 * Dh), g, dtype, device)[..., Dh : 2 * Dh]
    else:
        fused = _randn((B, S, (H + 2 * Hkv) * Dh), g, dtype, device)
        if case.layout == "q_stride2":
            q = _randn((B, S, H, 2 * Dh), g, dtype, device)[..., ::2]
        else:
            q = fused[..., : H * Dh].unflatten(-1, (H, Dh))
        if K == S:
            k = fused[..., H * Dh : (H + Hkv) * Dh].unflatten(-1, (Hkv, Dh))
            v = fused[..., (H + Hkv) * Dh :].unflatten(-1, (Hkv, Dh))
        else:
            cap = K + 7
            kc = torch.full((B, Hkv, cap, Dh), float("nan"), dtype=dtype, device=device)
            vc = torch.full((B, Hkv, cap, Dh), float("nan"), dtype=dtype, device=device)
            kc[:, :, :K] = _randn((B, Hkv, K, Dh), g, dtype, device)
            vc[:, :, :K] = _randn((B, Hkv, K, Dh), g, dtype, device)
            k, v = kc[:, :, :K].transpose(1, 2), vc[:, :, :K].transpose(1, 2)
    q = q * case.q_gain if case.q_gain != 1.0 else q
    k_ref, v_ref = k, v
    mask = _build_mask(case, dtype, device, g)
    if case.mask == "pad_nan":
        # Garbage in padded keys must not reach the output (0 * NaN): the CPU op skips zero weights, the
        # CUDA kernels zero padded V rows. The reference multiplies through, so it sees zeros.
        hole = (~mask).view(B, K, 1, 1)
        k, v = k.masked_fill(hole, float("nan")), v.masked_fill(hole, float("nan"))
        k_ref, v_ref = k.masked_fill(hole, 0.0), v.masked_fill(hole, 0.0)
    scale = case.scale if case.scale is not None else Dh**-0.5
    alibi = build_alibi(case, dtype, device) if case.alibi is not None else None
    return q, k, v, mask, scale, alibi, k_ref, v_ref


def attention_refs(q, k, v, **kw):
    """(reference in float64, reference in q's dtype), each (z, lse, pattern): the rule's ref_hi, ref_lo
    (the same computation when q is float64)."""
    kw = dict(kw, return_pattern=True)
    hi = ref.attention(q, k, v, **kw)
    return hi, hi if q.dtype == f64 else ref.attention(q, k, v, **kw, compute_dtype=q.dtype)


def _rule(problems, summary, what, got, hi, lo):
    err, bound, failure = tolerance.rule_check(got, hi, lo, what=what)
    summary.append(f"{what} {err:.1e}/{bound:.1e}")
    if failure is not None:
        problems.append(failure)


def check_attention_case(case: AttnCase, dtype, device, run):
    """Runs `run(q, k, v, mask, scale, causal, return_pattern, alibi, softcap, window) -> (z, lse, pattern)`
    on the case without the pattern and, when case.pattern, with it, and checks every output against the
    reference. Returns (ok, message): the message gives each output's error / the rule's bound, and every
    problem."""
    q, k, v, mask, scale, alibi, k_ref, v_ref = build_attention_inputs(case, dtype, device)
    kw = dict(scale=scale, causal=case.causal, mask=mask, alibi=alibi, softcap=case.softcap, window=case.window)
    (z_hi, lse_hi, p_hi), (z_lo, lse_lo, p_lo) = attention_refs(q, k_ref, v_ref, **kw)
    B, S, K, H = case.B, case.S, case.K, case.H
    vis = ref.visible_keys(B, H, S, K, causal=case.causal, mask=mask, window=case.window, device=q.device).expand(
        B, H, S, K
    )
    empty = ~vis.any(-1)  # [B, H, S]: rows that see no key
    acc = f64 if dtype == f64 else f32
    q_before = q.clone()
    problems, summary = [], []
    for rp in (False, True) if case.pattern else (False,):
        z, lse, pattern = run(q, k, v, mask, scale, case.causal, rp, alibi, case.softcap, case.window)
        tag = " (+pattern)" if rp else ""
        if z.shape != z_hi.shape or z.dtype != dtype or not z.is_contiguous() or z.device != q.device:
            problems.append(
                f"z{tag}: shape/dtype/layout {tuple(z.shape)} {z.dtype} {z.device} contiguous={z.is_contiguous()}"
            )
            continue
        if lse.shape != lse_hi.shape or lse.dtype != acc:
            problems.append(
                f"lse{tag}: shape/dtype {tuple(lse.shape)} {lse.dtype}, expected {tuple(lse_hi.shape)} {acc}"
            )
            continue
        _rule(problems, summary, "z" + tag, z, z_hi, z_lo)
        _rule(problems, summary, "lse" + tag, lse, lse_hi, lse_lo)  # -inf exactly where the reference has it
        if (z.transpose(1, 2)[empty] != 0).any():
            problems.append(f"z{tag}: a row that sees no key is not exactly 0")
        if not rp:
            if pattern is not None and pattern.numel() != 0:
                problems.append("pattern: not requested but not empty")
        elif pattern is None or pattern.shape != p_hi.shape or pattern.dtype != dtype:
            problems.append("pattern: missing or wrong shape/dtype")
        else:
            _rule(problems, summary, "pattern", pattern, p_hi, p_lo)
            if (pattern[~vis] != 0).any():
                problems.append("pattern: a hidden key got weight")
    if not torch.equal(q, q_before):
        problems.append("q was modified")
    msg = " ".join(summary)
    return not problems, msg + ("" if not problems else "  <-- " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# pattern_slice: entries of the pattern at chosen heads, query rows and key columns, from attention's lse


def pattern_slice_selections(case: AttnCase) -> list:
    """(name, heads, queries, keys) for a case: 1-D int64 index tensors in range, or None for a whole axis."""
    S, K, H = case.S, case.K, case.H
    ix = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    chosen = [("last row", None, ix(S - 1), None), ("first column", None, None, ix(0))]
    chosen.append(("repeats", ix(H - 1, 0, H - 1), ix(S - 1, 0, S - 1), ix(min(3, K - 1), K - 1, 0, 0)))
    return chosen if S > 0 and K > 0 else []


def check_pattern_slice_case(case: AttnCase, dtype, device, attention, pattern_slice):
    """Runs `attention(q, k, v, mask, scale, causal, return_pattern, alibi, softcap, window) -> (z, lse, pattern)`
    and `pattern_slice(q, k, lse, mask, scale, causal, alibi, softcap, window, heads, queries, keys, return_scores,
    score_dtype) -> (pattern, scores)` on the case and checks every selection of pattern_slice_selections against
    the reference's pattern by the tolerance rule, hidden entries exactly 0 and hidden scores at the dtype's
    minimum. The reference is the op's own definition (reference.pattern_slice) from the same lse: the lse is an
    input of the op, and a float32 lse of large logits (|lse| ~ 500, half an ulp ~ 1.5e-5) moves every entry of
    its row by that much relative, whoever computes exp(score - lse). Returns (ok, message) as
    check_attention_case."""
    q, k, v, mask, scale, alibi, k_ref, v_ref = build_attention_inputs(case, dtype, device)
    kw = dict(scale=scale, causal=case.causal, mask=mask, alibi=alibi, softcap=case.softcap, window=case.window)
    B, S, K, H = case.B, case.S, case.K, case.H
    vis = ref.visible_keys(B, H, S, K, causal=case.causal, mask=mask, window=case.window, device=q.device)
    vis = vis.expand(B, H, S, K)
    _, lse, _ = attention(q, k, v, mask, scale, case.causal, False, alibi, case.softcap, case.window)
    p_hi, _ = ref.pattern_slice(q.to(f64), k_ref.to(f64), lse, **kw)
    p_lo = p_hi if dtype == f64 else ref.pattern_slice(q, k_ref, lse, **kw, compute_dtype=dtype)[0]
    problems, summary = [], []
    for name, heads, queries, keys in pattern_slice_selections(case):
        idx = [None if t is None else t.to(device) for t in (heads, queries, keys)]

        def take(t):
            for dim, i in zip((1, 2, 3), idx):
                if i is not None:
                    t = t.index_select(dim, i)
            return t

        pattern, scores = pattern_slice(
            q, k, lse, mask, scale, case.causal, alibi, case.softcap, case.window, *idx, True, None
        )
        want = take(p_hi)
        if pattern.shape != want.shape or pattern.dtype != dtype or scores.shape != want.shape:
            problems.append(f"{name}: shape/dtype {tuple(pattern.shape)} {pattern.dtype}, expected {tuple(want.shape)}")
            continue
        _rule(problems, summary, name, pattern, want, take(p_lo))
        hidden = ~take(vis)
        if (pattern[hidden] != 0).any():
            problems.append(f"{name}: a hidden entry got weight")
        if (scores[hidden] != torch.finfo(dtype).min).any():
            problems.append(f"{name}: a hidden score is not the dtype's minimum")
    msg = " ".join(summary)
    return not problems, msg + ("" if not problems else "  <-- " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# rotary


@dataclass(frozen=True)
class RotaryCase:
    name: str
    B: int
    S: int
    n: int
    Dh: int
    R: int
    interleaved: bool = False  # rotate-every-two (GPT-J, CodeGen); else rotate-half (NeoX, Llama)
    # Random tables (not cos/sin of angles), so that a feature that reads its partner's entry shows up:
    # "fp32_b1" [1, S, R] float32, "fp32" [B, S, R] float32 (as Hugging Face computes them), "b1" [1, S, R]
    # and "per_batch" [B, S, R] in x's dtype, "strided" [B, S, R] float64 read through strides.
    table: str = "fp32_b1"
    # "fused": x is, in turn, the Q heads of a blocked fused projection [all Q | all K | all V] (head stride
    # Dh) and the K heads of GPT-NeoX's interleaved one (per head [Q_h, K_h, V_h], head stride 3 Dh), as the
    # Bridge passes them; "stride2": x with last-dim stride 2; "any_strides": permuted storage, stride 2.
    layout: str = "fused"
    dtypes: tuple = ALL_DTYPES


# Every Dh in {32, 64, 80}, S in {1, 17, 89}, n in {1, 4, 12} and every table kind, each with R = Dh (full),
# Dh / 2 (partial) and 2, in both rotation styles.
ROTARY_SHAPES = [  # (B, S, n, Dh, table)
    (2, 1, 1, 32, "b1"),
    (2, 17, 4, 64, "fp32"),
    (1, 89, 12, 80, "per_batch"),
    (3, 89, 1, 64, "fp32_b1"),
    (2, 17, 12, 32, "strided"),
    (2, 1, 4, 80, "fp32"),
    (2, 89, 4, 80, "b1"),
]
ROTARY_WIDTHS = {"full": lambda Dh: Dh, "partial": lambda Dh: Dh // 2, "two": lambda Dh: 2}


def rotary_cases() -> list[RotaryCase]:
    c = RotaryCase
    return [
        c("neox full fused-view", 2, 89, 12, 64, 64),
        c("neox partial Dh80 R40 per-batch tables", 2, 17, 4, 80, 40, table="per_batch"),
        c("codegen every-two partial R32", 2, 17, 16, 64, 32, interleaved=True),
        c("every-two R=2 float64 strided tables", 1, 1, 1, 32, 2, interleaved=True, table="strided"),
        c("rotate-half x last-dim stride 2", 2, 9, 3, 16, 10, layout="stride2", table="strided"),
        c("long sequence many heads", 2, 300, 32, 128, 64, dtypes=(bf16, f32)),
        c("rotate-half any strides", 2, 9, 3, 16, 10, layout="any_strides", table="strided"),
        c("every-two any strides", 2, 9, 3, 16, 10, interleaved=True, layout="any_strides", table="strided"),
        *[
            c(
                f"B{B}-S{S}-n{n}-Dh{Dh}-{table} R={width} {'every-two' if il else 'rotate-half'}",
                B,
                S,
                n,
                Dh,
                ROTARY_WIDTHS[width](Dh),
                interleaved=il,
                table=table,
            )
            for B, S, n, Dh, table in ROTARY_SHAPES
            for width in ROTARY_WIDTHS
            for il in (False, True)
        ],
    ]


def build_rotary_inputs(case: RotaryCase, dtype, device, seed=0):
    """([x, ...] the views of the case's layout, cos, sin)."""
    g = torch.Generator().manual_seed(seed)
    B, S, n, Dh, R = case.B, case.S, case.n, case.Dh, case.R
    if case.layout == "stride2":
        xs = [_randn((B, S, n, 2 * Dh), g, dtype, device)[..., ::2]]
    elif case.layout == "any_strides":
        xs = [_randn((n, S, B, 2 * Dh), g, dtype, device).permute(2, 1, 0, 3)[..., ::2]]
    else:
        fused = _randn((B, S, 3 * n * Dh), g, dtype, device)
        xs = [fused[..., : n * Dh].unflatten(-1, (n, Dh)), fused.unflatten(-1, (n, 3 * Dh))[..., Dh : 2 * Dh]]
    if case.table == "fp32_b1":
        cos, sin = (_randn((1, S, R), g, f32, device) for _ in range(2))
    elif case.table == "fp32":
        cos, sin = (_randn((B, S, R), g, f32, device) for _ in range(2))
    elif case.table == "b1":
        cos, sin = (_randn((1, S, R), g, dtype, device) for _ in range(2))
    elif case.table == "per_batch":
        cos, sin = (_randn((B, S, R), g, dtype, device) for _ in range(2))
    elif case.table == "strided":
        cos, sin = (_randn((R * 2, S, B), g, f64, device).permute(2, 1, 0)[..., ::2] for _ in range(2))
    else:
        raise ValueError(f"table kind {case.table!r}")
    return xs, cos, sin


def rotary_refs(x, cos, sin, interleaved):
    """(reference in float64, reference in x's dtype): the rule's ref_hi, ref_lo."""
    hi = ref.rotary(x, cos, sin, interleaved=interleaved)
    return hi, ref.rotary(x, cos, sin, interleaved=interleaved, compute_dtype=x.dtype)


def check_rotary_case(case: RotaryCase, dtype, device, run):
    """Runs `run(x, cos, sin, interleaved) -> out` on each x of the case and checks it: the rule against the
    reference for the rotated features, x's own values exactly past R, a new contiguous tensor in x's
    dtype, x untouched. Returns (ok, message)."""
    xs, cos, sin = build_rotary_inputs(case, dtype, device)
    problems, summary = [], []
    for i, x in enumerate(xs):
        what = "out" if len(xs) == 1 else ("out (Q heads, blocked)", "out (K heads, NeoX interleaved)")[i]
        before = x.clone()
        out = run(x, cos, sin, case.interleaved)
        if out.shape != x.shape or out.dtype != dtype or not out.is_contiguous() or out.device != x.device:
            problems.append(
                f"{what}: shape/dtype/layout {tuple(out.shape)} {out.dtype} contiguous={out.is_contiguous()}"
            )
            continue
        if not torch.equal(x, before):
            problems.append(f"{what}: x was modified")
        if not torch.equal(out[..., case.R :], x[..., case.R :]):
            problems.append(f"{what}: features past R changed")
        _rule(problems, summary, what, out, *rotary_refs(x, cos, sin, case.interleaved))
    msg = " ".join(summary)
    return not problems, msg + ("" if not problems else "  <-- " + "; ".join(problems))
