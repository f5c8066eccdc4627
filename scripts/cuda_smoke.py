#!/usr/bin/env python3
"""CUDA smoke test: every CUDA op of pyqkv against the oracle, pyqkv/reference.py, on tricky cases.

The first thing to run on a GPU machine, after building the project against a CUDA torch:

    python scripts/cuda_smoke.py            # all cases
    python scripts/cuda_smoke.py -k decode  # cases whose name contains "decode"

Prints one line per case with the largest error per output and exits non-zero on any mismatch (or any
NaN). Without a GPU it prints "no GPU: skipped" and exits 0. The attention cases are also run, on CPU
threads, by tools/cuda_emulate/run.py, which executes the same kernels without a GPU.

Tolerances (|out - ref| <= atol + rtol * |ref|, ref computed in float64): float64 1e-9, float32 5e-5,
float16 5e-3, bfloat16 3e-2; lse is float32 for the half types, so it is held to 2e-3 there. The rotary
cases are run by tools/cuda_emulate/run.py as well.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {  # (atol, rtol) for z and pattern
    torch.float64: (1e-9, 1e-9),
    torch.float32: (5e-5, 5e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
LSE_TOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def load_reference():
    """pyqkv/reference.py by path: the oracle imports nothing of pyqkv, so neither does this."""
    spec = importlib.util.spec_from_file_location("pyqkv_reference", os.path.join(ROOT, "pyqkv", "reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ref = load_reference()


# --------------------------------------------------------------------------------------------------
# attention cases


@dataclass(frozen=True)
class AttnCase:
    name: str
    B: int
    S: int
    K: int
    H: int
    Hkv: int
    Dh: int
    causal: bool = True
    mask: str | None = None  # None, "pad", "pad_int", "pad_all", "pad_nan", "add", "add_bcast", "add_heads", "add_f16",
    # "add_nan" (hidden entries NaN: hidden by the one mask rule), "bool4d" / "bool4d_bcast" (True = attend)
    pattern: bool = False
    scale: float | None = None  # default Dh ** -0.5
    q_gain: float = 1.0  # multiplies q: large logits exercise the online-softmax rescaling
    q_stride2: bool = False  # q with a non-unit last-dim stride
    alibi: str | None = None  # None, "per_batch" [B,H,K], "b1" [1,H,K], "heads1_f16" [B,1,K] float16, "strided"
    softcap: float | None = None  # Gemma 2's logit softcapping (with q_gain > 1 the cap bites)
    window: int | None = None  # a sliding window of W keys (causal only)
    dtypes: tuple = ALL_DTYPES


def attention_cases():
    c = AttnCase
    cases = [
        c("prefill gqa causal fused-view", 2, 89, 89, 12, 4, 64),
        c("prefill gqa causal +pattern", 2, 89, 89, 12, 4, 64, pattern=True),
        c("cache K>S Dh80 +pattern", 2, 17, 40, 4, 4, 80, pattern=True),
        c("Dh72 tile tail", 1, 65, 65, 2, 1, 72),
        c("odd Dh33 non-causal", 1, 20, 31, 2, 2, 33, causal=False, pattern=True),
        c("pad2d bool left-padding +pattern", 2, 24, 24, 4, 2, 64, mask="pad", pattern=True),
        c("pad2d int64", 2, 24, 24, 4, 2, 64, mask="pad_int"),
        c("pad2d batch fully padded", 2, 12, 12, 2, 1, 32, mask="pad_all", pattern=True),
        c("pad2d NaN in padded K/V", 2, 40, 40, 4, 2, 64, mask="pad_nan"),
        c("add4d [B,1,S,K] +pattern", 2, 30, 30, 4, 4, 64, causal=False, mask="add", pattern=True),
        c("add4d expanded [1,1,S,K]", 2, 30, 30, 4, 4, 64, causal=False, mask="add_bcast"),
        c("add4d per-head [1,H,S,K]", 2, 30, 30, 4, 2, 64, causal=False, mask="add_heads", pattern=True),
        c("add4d float16 mask", 2, 30, 30, 4, 4, 64, causal=False, mask="add_f16"),
        c("add4d NaN entries hide +pattern", 2, 30, 30, 4, 2, 64, causal=False, mask="add_nan", pattern=True),
        c("bool4d [B,1,S,K] +pattern", 2, 30, 30, 4, 2, 64, causal=False, mask="bool4d", pattern=True),
        c("bool4d expanded causal", 2, 89, 89, 12, 4, 64, mask="bool4d_bcast"),
        c("decode bool4d S=1", 2, 1, 700, 8, 2, 64, causal=False, mask="bool4d"),
        c("causal K<S: empty rows +pattern", 1, 8, 5, 2, 2, 32, pattern=True),
        c("causal K<S prefill: empty rows +pattern", 1, 40, 20, 2, 1, 64, pattern=True),
        c("decode S=1 K=5000 split", 2, 1, 5000, 32, 8, 128),
        c("decode S=1 K=5000 +pattern", 1, 1, 5000, 8, 2, 64, pattern=True),
        c("decode S=4 MQA", 1, 4, 300, 16, 1, 64),
        # the decode kernel (attention_decode.cuh): at most 8 query rows per KV head, no pattern
        c("decode MHA S=1 pad2d NaN slots", 2, 1, 700, 4, 4, 64, mask="pad_nan"),
        c("decode S=2 K=1: an empty causal row", 1, 2, 1, 4, 2, 32),
        c("decode Dh80 R=3 (idle lanes, idle rows)", 1, 1, 333, 6, 2, 80),
        c("decode GQA R=8 K=2000 split", 2, 1, 2000, 16, 2, 128),
        c("decode fully padded batch", 2, 1, 50, 4, 2, 64, mask="pad_all"),
        c("decode Dh256 split", 1, 1, 900, 4, 1, 256),
        c("decode S=1 add4d bcast + alibi", 2, 1, 400, 8, 4, 64, causal=False, mask="add_bcast", alibi="b1"),
        c("decode S=3 pad2d", 2, 3, 700, 8, 2, 64, mask="pad"),
        c("decode S=2 add4d split", 2, 2, 600, 8, 2, 64, causal=False, mask="add"),
        c("big logits rescaling", 1, 200, 200, 2, 2, 64, scale=1.0, q_gain=4.0),
        c("q last-dim stride 2", 1, 33, 33, 2, 2, 64, q_stride2=True, pattern=True),
        c("Dh256", 1, 70, 70, 2, 2, 256, dtypes=(torch.bfloat16, torch.float16, torch.float32)),
        c("Dh300 (CUDA-core fallback)", 1, 20, 20, 2, 2, 300, dtypes=(torch.bfloat16, torch.float32)),
        c("S=K=1", 1, 1, 1, 2, 1, 32, pattern=True),
        c("S=K=64 exact tile", 1, 64, 64, 2, 2, 64, pattern=True),
        c("tiny float64", 1, 3, 5, 2, 1, 4, pattern=True, dtypes=(torch.float64,)),
        c("no keys K=0", 1, 3, 0, 2, 1, 16, causal=False, pattern=True),
        c("alibi prefill gqa causal +pattern", 2, 89, 89, 12, 4, 64, pattern=True, alibi="per_batch"),
        c("alibi cache K>S Dh80 pad2d +pattern", 2, 17, 40, 4, 4, 80, mask="pad", pattern=True, alibi="b1"),
        c("alibi add4d per-head non-causal +pattern", 2, 30, 30, 4, 2, 64, causal=False, mask="add_heads", pattern=True,
          alibi="heads1_f16"),
        c("alibi causal K<S strided bias +pattern", 1, 40, 20, 2, 1, 64, pattern=True, alibi="strided"),
        c("alibi decode S=1 K=1500 split", 2, 1, 1500, 8, 2, 64, alibi="per_batch"),
        c("alibi decode S=2 pad2d +pattern", 2, 2, 300, 8, 2, 64, mask="pad", pattern=True, alibi="b1"),
        c("softcap prefill gqa +pattern", 2, 89, 89, 12, 4, 64, pattern=True, softcap=5.0, q_gain=3.0),
        c("softcap decode split + alibi", 2, 1, 1500, 8, 2, 64, softcap=2.0, q_gain=3.0, alibi="b1"),
        c("softcap add4d non-causal", 2, 30, 30, 4, 2, 64, causal=False, mask="add", softcap=1.0, q_gain=3.0),
        c("window prefill K>S +pattern", 2, 89, 120, 12, 4, 64, pattern=True, window=33),
        c("window tensor-core tiles skipped", 1, 200, 200, 4, 2, 64, window=17),
        c("window decode S=1 split", 2, 1, 3000, 8, 2, 128, window=700),
        c("window decode S=3 pad2d +pattern", 2, 3, 400, 8, 2, 64, mask="pad", pattern=True, window=5),
        c("window W=1 sees itself only", 1, 20, 20, 2, 1, 32, pattern=True, window=1),
        c("window + softcap + bool4d", 2, 40, 40, 4, 2, 64, mask="bool4d", window=9, softcap=3.0, q_gain=3.0),
    ]
    return cases


def _randn(shape, gen, dtype, device):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def build_alibi(kind, B, H, K, device):
    """An ALiBi bias as Bloom builds it: -slope_h * position_j, positions of batch row b offset by b.
    "strided" is every other entry of a buffer whose other entries are NaN (never to be read)."""
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
    pos = (torch.arange(K).view(1, 1, K) - torch.arange(B).view(B, 1, 1)).float()
    full = -slopes.view(1, H, 1) * pos  # [B, H, K]
    if kind == "per_batch":
        return full.to(device)
    if kind == "b1":
        return full[:1].to(device)
    if kind == "heads1_f16":
        return (-0.25 * pos).to(device=device, dtype=torch.float16)
    if kind == "strided":
        buf = torch.full((B, H, 2 * K), float("nan"))
        buf[..., ::2] = full
        return buf.to(device)[..., ::2]
    raise ValueError(kind)


def build_attention_inputs(case: AttnCase, dtype, device, seed=0):
    """q, k, v, mask, scale, alibi, and the inputs the reference should see (NaNs replaced where the op
    must ignore them). q comes from one fused projection [B, S, (H + 2 Hkv) Dh] (a non-contiguous view); K/V
    come from a cache [B, Hkv, capacity, Dh] whose unused slots hold NaN when K > S (also views)."""
    g = torch.Generator().manual_seed(seed)
    B, S, K, H, Hkv, Dh = case.B, case.S, case.K, case.H, case.Hkv, case.Dh
    fused = _randn((B, S, (H + 2 * Hkv) * Dh), g, dtype, device)
    if case.q_stride2:
        q = _randn((B, S, H, 2 * Dh), g, dtype, device)[..., ::2]
    else:
        q = fused[..., : H * Dh].unflatten(-1, (H, Dh))
    q = q * case.q_gain if case.q_gain != 1.0 else q
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
    k_ref, v_ref = k, v

    mask = None
    if case.mask in ("pad", "pad_int", "pad_nan", "pad_all"):
        keep = torch.rand((B, K), generator=g) > 0.15
        keep[0] = True
        if B > 1:
            keep[1, : min(3, K)] = False  # left padding: with causal, query 0 of batch 1 sees nothing
        if case.mask == "pad_all" and B > 1:
            keep[1] = False
        keep = keep.to(device)
        mask = keep.to(torch.int64) if case.mask == "pad_int" else keep
        if case.mask == "pad_nan":
            # Garbage in padded keys must not reach the output (0 * NaN): the CPU op skips zero weights,
            # the CUDA kernels zero padded V rows. The reference multiplies through, so it sees zeros.
            hole = (~keep).view(B, K, 1, 1)
            k = k.masked_fill(hole, float("nan"))
            v = v.masked_fill(hole, float("nan"))
            k_ref, v_ref = k.masked_fill(hole, 0.0), v.masked_fill(hole, 0.0)
    elif case.mask is not None and (case.mask.startswith("add") or case.mask.startswith("bool4d")):
        mdtype = torch.float16 if case.mask == "add_f16" else torch.float32
        heads = H if case.mask == "add_heads" else 1
        lead = 1 if case.mask in ("add_bcast", "bool4d_bcast") else B
        i = torch.arange(S).view(S, 1)
        j = torch.arange(K).view(1, K)
        hidden = (j > (K - S) + i).expand(lead, heads, S, K).clone()  # HF-style: causal inside the mask
        hidden[0, 0, 0] = True  # one fully hidden row
        if heads > 1:
            hidden[-1, -1, S // 2, : K // 2] = True
        bias = -torch.rand((lead, heads, S, K), generator=g) * 2.0  # ordinary biases stay biases
        fill = float("nan") if case.mask == "add_nan" else torch.finfo(mdtype).min
        m = ~hidden if case.mask.startswith("bool4d") else bias.masked_fill(hidden, fill).to(mdtype)
        mask = m.to(device)
        if case.mask in ("add_bcast", "bool4d_bcast"):
            mask = mask.expand(B, 1, S, K)  # stride 0 over the batch
    scale = case.scale if case.scale is not None else Dh**-0.5
    alibi = build_alibi(case.alibi, B, H, K, device) if case.alibi is not None else None
    return q, k, v, mask, scale, alibi, k_ref, v_ref


def _max_err(out, want, atol, rtol):
    """(max abs error, ok) over finite reference entries; NaN anywhere in out fails."""
    if out.numel() == 0:
        return 0.0, True
    out64, want64 = out.double(), want.double()
    if torch.isnan(out64).any():
        return float("nan"), False
    err = (out64 - want64).abs()
    ok = bool((err <= atol + rtol * want64.abs()).all())
    return float(err.max()), ok


def check_attention_case(case: AttnCase, dtype, device, run):
    """Runs `run(q, k, v, mask, scale, causal, return_pattern, alibi, softcap, window) -> (z, lse, pattern)` and compares
    with the reference. Returns (ok, message)."""
    q, k, v, mask, scale, alibi, k_ref, v_ref = build_attention_inputs(case, dtype, device)
    z, lse, pattern = run(q, k, v, mask, scale, case.causal, case.pattern, alibi, case.softcap, case.window)
    zr, lser, pr = ref.attention(q, k_ref, v_ref, scale=scale, causal=case.causal, mask=mask, return_pattern=True,
                                 alibi=alibi, softcap=case.softcap, window=case.window)
    atol, rtol = TOL[dtype]
    problems = []
    if z.shape != zr.shape or z.dtype != dtype or not z.is_contiguous():
        problems.append(f"z: shape/dtype/layout {tuple(z.shape)} {z.dtype} contiguous={z.is_contiguous()}")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if lse.shape != lser.shape or lse.dtype != acc:
        problems.append(f"lse: shape/dtype {tuple(lse.shape)} {lse.dtype}, expected {tuple(lser.shape)} {acc}")
    ez, okz = _max_err(z, zr, atol, rtol)
    # lse: -inf exactly where the reference has -inf (no visible key), close elsewhere.
    empty = torch.isneginf(lser)
    if not torch.equal(torch.isneginf(lse), empty):
        problems.append("lse: -inf on the wrong rows")
    fin = ~empty
    el, okl = _max_err(lse[fin], lser[fin], LSE_TOL[dtype], LSE_TOL[dtype])
    msg = f"z {ez:.2e} lse {el:.2e}"
    if not okz:
        problems.append(f"z error {ez:.3e} > atol {atol} + rtol {rtol}")
    if not okl:
        problems.append(f"lse error {el:.3e}")
    if case.pattern:
        if pattern is None or pattern.shape != pr.shape or pattern.dtype != dtype:
            problems.append("pattern: missing or wrong shape/dtype")
        else:
            ep, okp = _max_err(pattern, pr, atol, rtol)
            msg += f" pattern {ep:.2e}"
            if not okp:
                problems.append(f"pattern error {ep:.3e}")
    elif pattern is not None and pattern.numel() != 0:
        problems.append("pattern: not requested but not empty")
    return not problems, msg + ("" if not problems else "  <-- " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# rotary cases


@dataclass(frozen=True)
class RotaryCase:
    name: str
    B: int
    S: int
    n: int
    Dh: int
    R: int
    interleaved: bool = False
    table: str = "fp32_b1"  # "fp32_b1" [1,S,R] float32, "x_per_batch" [B,S,R] in x's dtype, "f64_strided"
    x_stride2: bool = False  # x with a non-unit last-dim stride (else a view of one fused projection)
    dtypes: tuple = ALL_DTYPES


def rotary_cases():
    c = RotaryCase
    return [
        c("neox full fused-view", 2, 89, 12, 64, 64),
        c("neox partial Dh80 R40 per-batch tables", 2, 17, 4, 80, 40, table="x_per_batch"),
        c("codegen every-two partial R32", 2, 17, 16, 64, 32, interleaved=True),
        c("every-two R=2 float64 strided tables", 1, 1, 1, 32, 2, interleaved=True, table="f64_strided"),
        c("rotate-half x last-dim stride 2", 2, 9, 3, 16, 10, x_stride2=True, table="f64_strided"),
        c("long sequence many heads", 2, 300, 32, 128, 64, dtypes=(torch.bfloat16, torch.float32)),
    ]


def build_rotary_inputs(case: RotaryCase, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, S, n, Dh, R = case.B, case.S, case.n, case.Dh, case.R
    if case.x_stride2:
        x = _randn((B, S, n, 2 * Dh), g, dtype, device)[..., ::2]
    else:  # GPT-NeoX's interleaved fused projection: per head [Q_h, K_h, V_h], x = the K heads
        x = _randn((B, S, n * 3 * Dh), g, dtype, device).unflatten(-1, (n, 3 * Dh))[..., Dh : 2 * Dh]
    # random tables (not cos/sin of angles): a feature that reads its partner's entry shows up
    if case.table == "fp32_b1":
        cos, sin = (_randn((1, S, R), g, torch.float32, device) for _ in range(2))
    elif case.table == "x_per_batch":
        cos, sin = (_randn((B, S, R), g, dtype, device) for _ in range(2))
    else:
        cos, sin = (_randn((R * 2, S, B), g, torch.float64, device).permute(2, 1, 0)[..., ::2] for _ in range(2))
    return x, cos, sin


def check_rotary_case(case: RotaryCase, dtype, device, run):
    """Runs `run(x, cos, sin, interleaved) -> out` and compares with the reference (rotated features) and
    with x exactly (the features past R). Returns (ok, message)."""
    x, cos, sin = build_rotary_inputs(case, dtype, device)
    out = run(x, cos, sin, case.interleaved)
    want = ref.rotary(x, cos, sin, interleaved=case.interleaved)
    problems = []
    if out.shape != x.shape or out.dtype != dtype or not out.is_contiguous():
        problems.append(f"out: shape/dtype/layout {tuple(out.shape)} {out.dtype} contiguous={out.is_contiguous()}")
    atol, rtol = TOL[dtype]
    err, ok = _max_err(out, want, atol, rtol)
    if not ok:
        problems.append(f"error {err:.3e} > atol {atol} + rtol {rtol}")
    if not torch.equal(out[..., case.R :], x[..., case.R :]):
        problems.append("features past R changed")
    return not problems, f"out {err:.2e}" + ("" if not problems else "  <-- " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# the other ops (CUDA only: they are data movement or ATen GEMMs)


def check_split_pack(device):
    results = []
    g = torch.Generator().manual_seed(1)
    D, Dh = 24, 16
    for layout, H, Hkv in (("blocked", 8, 2), ("interleaved", 8, 8), ("grouped", 8, 2), ("codegen", 8, 8)):
        for conv1d in (True, False):
            for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.int32, torch.bool):
                n_out = (H + 2 * Hkv) * Dh
                w = torch.randn((D, n_out) if conv1d else (n_out, D), generator=g) * 10
                w = (w > 0) if dtype == torch.bool else w.to(dtype)
                w = w.to(device).t().contiguous().t()  # column-major storage: any strides must work
                got = torch.ops.pyqkv.split_qkv(w, H, Hkv, Dh, layout, conv1d)
                want = ref.split_qkv(w, None, n_heads=H, n_kv_heads=Hkv, d_head=Dh, layout=layout, conv1d=conv1d)[:3]
                ok = all(torch.equal(a, b) for a, b in zip(got, want))
                packed = torch.ops.pyqkv.pack_qkv(*[t.transpose(1, 2).contiguous().transpose(1, 2) for t in got],
                                                  layout, conv1d)
                ok = ok and torch.equal(packed, w) and packed.shape == w.shape
                results.append((f"split/pack {layout} conv1d={conv1d} {dtype}", ok, "exact" if ok else "MISMATCH"))
    return results


def check_per_head_proj(device):
    results = []
    g = torch.Generator().manual_seed(2)
    B, S, n, D, E = 2, 7, 4, 24, 16
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float64, 1e-10)):
        W = torch.randn(n, D, E, generator=g).to(device, dtype)
        b = torch.randn(n, E, generator=g).to(device, dtype)
        resid = torch.randn(B, S, D, generator=g).to(device, dtype)
        for kind, x in (("general", torch.randn(B, S, n, D, generator=g).to(device, dtype)),
                        ("broadcast", resid[:, :, None].expand(B, S, n, D))):
            for bias in (None, b):
                got = torch.ops.pyqkv.per_head_proj(x, W, bias)
                want = ref.per_head_proj(x.double(), W.double(), None if bias is None else bias.double())
                err, ok = _max_err(got, want, tol, tol)
                ok = ok and got.shape == (B, S, n, E) and got.dtype == dtype and got.device == x.device
                results.append((f"per_head_proj {kind} bias={bias is not None} {dtype}", ok, f"{err:.2e}"))
    return results


def check_kv_append(device):
    results = []
    g = torch.Generator().manual_seed(3)
    B, Hkv, cap, Dh, S, H, start = 2, 3, 20, 16, 5, 6, 7
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        kc = torch.full((B, Hkv, cap, Dh), float("nan"), dtype=dtype, device=device)
        vc = kc.clone()
        fused = torch.randn(B, S, (H + 2 * Hkv) * Dh, generator=g).to(device, dtype)
        kn = fused[..., H * Dh : (H + Hkv) * Dh].unflatten(-1, (Hkv, Dh))
        vn = fused[..., (H + Hkv) * Dh :].unflatten(-1, (Hkv, Dh))
        kr, vr = kc.clone(), vc.clone()
        ptrs = (kc.data_ptr(), vc.data_ptr())
        torch.ops.pyqkv.kv_append(kc, vc, kn, vn, start)
        ref.kv_append(kr, vr, kn, vn, start)
        ok = torch.equal(kc.nan_to_num(7.0), kr.nan_to_num(7.0)) and torch.equal(vc.nan_to_num(7.0), vr.nan_to_num(7.0))
        ok = ok and ptrs == (kc.data_ptr(), vc.data_ptr())
        results.append((f"kv_append {dtype}", ok, "exact, in place" if ok else "MISMATCH"))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("--backend", default=None,
                        help="force this attention backend (pyqkv.ops.BACKENDS); cases it refuses are skipped")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: skipped")
        return 0
    sys.path.insert(0, ROOT)
    import pyqkv  # noqa: F401  (registers the ops)

    if args.backend is not None:
        pyqkv.ops.attention_backend(args.backend).__enter__()  # for the whole run

    for op in ("split_qkv", "pack_qkv", "per_head_proj", "attention", "kv_append", "rotary"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pyqkv::{op}", "CUDA"):
            print(f"FAIL: pyqkv::{op} has no CUDA kernel (was the extension built with CUDA?)")
            return 1
    device = "cuda"
    print(f"pyqkv CUDA smoke test on {torch.cuda.get_device_name()} (torch {torch.__version__})")
    failures = 0
    t0 = time.time()

    def attention_op(q, k, v, mask, scale, causal, return_pattern, alibi, softcap, window):
        z, lse, pattern = torch.ops.pyqkv.attention(q, k, v, mask, scale, causal, return_pattern, alibi, softcap,
                                                    window)
        return z, lse, pattern

    for case in attention_cases():
        if args.k not in case.name:
            continue
        for dtype in case.dtypes:
            backend = "?"
            try:
                q, k, v, mask, scale, alibi, _, _ = build_attention_inputs(case, dtype, device)
                backend = pyqkv.ops.attention_plan(q, k, v, scale=scale, causal=case.causal, mask=mask,
                                                   return_pattern=case.pattern, alibi=alibi, softcap=case.softcap,
                                                   window=case.window).backend
                if backend is None:  # only with --backend: the forced backend refuses this case
                    print(f"skip attention {case.name} [{str(dtype)[6:]}]: {args.backend} refuses it", flush=True)
                    continue
                ok, msg = check_attention_case(case, dtype, device, attention_op)
                torch.cuda.synchronize()
            except Exception as e:  # a launch failure or an illegal address: report it, keep going
                ok, msg = False, f"{type(e).__name__}: {e}"
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} attention {case.name} [{str(dtype)[6:]}, {backend}]: {msg}", flush=True)
    for case in rotary_cases():
        if args.k not in f"rotary {case.name}":
            continue
        for dtype in case.dtypes:
            try:
                ok, msg = check_rotary_case(case, dtype, device, torch.ops.pyqkv.rotary)
                torch.cuda.synchronize()
            except Exception as e:
                ok, msg = False, f"{type(e).__name__}: {e}"
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} rotary {case.name} [{str(dtype)[6:]}]: {msg}", flush=True)
    for check in (check_split_pack, check_per_head_proj, check_kv_append):
        if args.k and args.k not in check.__name__:
            continue
        try:
            rows = check(device)
            torch.cuda.synchronize()
        except Exception as e:
            rows = [(check.__name__, False, f"{type(e).__name__}: {e}")]
        for name, ok, msg in rows:
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {msg}", flush=True)
    print(f"{'FAILED' if failures else 'passed'}: {failures} failure(s) in {time.time() - t0:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
