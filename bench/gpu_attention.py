#!/usr/bin/env python3
"""GPU benchmark of pyqkv's CUDA attention op against PyTorch, side by side in one process.

    python bench/gpu_attention.py [--json out.json] [--quick]

Rows (bf16, H = 32, Dh = 128, inputs in pyqkv's [B, S, H, Dh] layout; PyTorch is given the same memory
as [B, H, S, Dh] views, and contiguous copies, and the faster of the two counts):
  ceilings  the device-to-device copy bandwidth (bytes read + written) and a bf16 GEMM rate, measured here;
  prefill   causal (and one non-causal) attention, S in {2048, 8192}, B in {1, 2, 4, 8}, against
            F.scaled_dot_product_attention: TFLOP/s (causal counts half the S x S products) and the ratio;
  decode    one query position against a cache of 8192 or 32768 keys held in a larger KVCache-style buffer
            (a strided view, as pyqkv's cache hands it over), MHA and GQA (Hkv = 8): the K/V bytes read per
            second against the measured copy bandwidth, and SDPA's time on the same view;
  pattern   return_pattern=True against the materialized PyTorch computation (matmul, mask, float32
            softmax, matmul), as hooked attention tools do it: time ratio.
Each time is the median over repeats of a timed loop between CUDA events, after warm-up. Every row also
checks the output against PyTorch's (relative Frobenius error), so a fast wrong kernel cannot pass.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pyqkv  # noqa: E402  (registers the ops)

H, DH = 32, 128
DT = torch.bfloat16


def timed(fn, *, target_ms=300.0, max_iters=50, repeats=5) -> float:
    """Median milliseconds per call of fn(): warm-up, then `repeats` loops of n calls between events."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    n = int(max(1, min(max_iters, target_ms / repeats / one)))
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return statistics.median(times)


def rel_err(out, want) -> float:
    out, want = out.float(), want.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return (torch.linalg.vector_norm(out - want) / torch.linalg.vector_norm(want).clamp_min(1e-30)).item()


def ceilings() -> dict:
    n = 2 << 30  # 2 GiB, far beyond L2
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), target_ms=200)
    copy_gbs = 2 * n / (ms * 1e-3) / 1e9
    a = torch.randn(8192, 8192, device="cuda", dtype=DT)
    b = torch.randn(8192, 8192, device="cuda", dtype=DT)
    ms_mm = timed(lambda: a @ b, target_ms=300)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_gbs, "gemm_bf16_TFLOPs": 2 * 8192**3 / (ms_mm * 1e-3) / 1e12}


def pyqkv_attn(q, k, v, causal, pattern=False):
    return torch.ops.pyqkv.attention(q, k, v, None, 1.0 / math.sqrt(q.shape[-1]), causal, pattern, None)


def sdpa_best(q, k, v, causal):
    """(ms, z) of PyTorch's SDPA: on transposed views of our layout, and on contiguous [B, H, S, Dh]."""
    gqa = q.shape[2] != k.shape[2]
    views = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    conts = tuple(t.contiguous() for t in views)
    best = None
    for qq, kk, vv in (views, conts):
        fn = lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, enable_gqa=gqa)  # noqa: E731
        ms = timed(fn)
        if best is None or ms < best[0]:
            best = (ms, fn().transpose(1, 2))
    return best


def prefill_rows(quick: bool) -> list:
    rows = []
    shapes = [(b, s, True) for s in (2048, 8192) for b in ((1, 8) if quick else (1, 2, 4, 8))]
    shapes.append((4, 2048, False))
    for B, S, causal in shapes:
        q, k, v = (torch.randn(B, S, H, DH, device="cuda", dtype=DT) for _ in range(3))
        flops = 4 * B * H * S * S * DH * (0.5 if causal else 1.0)
        ms = timed(lambda: pyqkv_attn(q, k, v, causal))
        z = pyqkv_attn(q, k, v, causal)[0]
        ms_ref, z_ref = sdpa_best(q, k, v, causal)
        rows.append({
            "B": B, "S": S, "causal": causal, "pyqkv_ms": ms, "sdpa_ms": ms_ref,
            "pyqkv_TFLOPs": flops / ms / 1e9, "sdpa_TFLOPs": flops / ms_ref / 1e9,
            "ratio_vs_sdpa": ms_ref / ms, "rel_err": rel_err(z, z_ref),
        })
        del q, k, v, z, z_ref
        torch.cuda.empty_cache()
    return rows


def decode_rows(quick: bool, copy_gbs: float) -> list:
    rows = []
    for ctx in (8192, 32768):
        for Hkv in (32, 8):
            for B in ((1, 8) if not quick else (8,)):
                cap = ctx + 512  # the cache's buffer is larger than what is filled: k, v are strided views
                kbuf = torch.randn(B, cap, Hkv, DH, device="cuda", dtype=DT)
                vbuf = torch.randn(B, cap, Hkv, DH, device="cuda", dtype=DT)
                k, v = kbuf[:, :ctx], vbuf[:, :ctx]
                q = torch.randn(B, 1, H, DH, device="cuda", dtype=DT)
                ms = timed(lambda: pyqkv_attn(q, k, v, True), target_ms=100, max_iters=200)
                z = pyqkv_attn(q, k, v, True)[0]
                # causal with one query at the end sees every key: SDPA's equivalent is no mask
                ms_ref, z_ref = sdpa_best(q, k, v, False)
                kv_bytes = 2 * B * ctx * Hkv * DH * k.element_size()
                gbs = kv_bytes / (ms * 1e-3) / 1e9
                rows.append({
                    "B": B, "context": ctx, "Hkv": Hkv, "pyqkv_us": ms * 1e3, "sdpa_us": ms_ref * 1e3,
                    "pyqkv_GBps": gbs, "fraction_of_copy": gbs / copy_gbs, "ratio_vs_sdpa": ms_ref / ms,
                    "rel_err": rel_err(z, z_ref),
                })
                del kbuf, vbuf, k, v, q, z, z_ref
                torch.cuda.empty_cache()
    return rows


def materialized(q, k, v, scale, causal_mask):
    """What a hooked Python attention does: every [B, H, S, K] intermediate is a tensor."""
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(causal_mask, float("-inf"))
    pattern = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return (pattern @ vh).transpose(1, 2), pattern


def pattern_rows(quick: bool) -> list:
    rows = []
    for B, S in ((1, 2048), (4, 2048), (1, 4096)) if not quick else ((1, 2048),):
        q, k, v = (torch.randn(B, S, H, DH, device="cuda", dtype=DT) for _ in range(3))
        scale = 1.0 / math.sqrt(DH)
        cm = torch.ones(S, S, dtype=torch.bool, device="cuda").triu(1)
        ms = timed(lambda: pyqkv_attn(q, k, v, True, pattern=True))
        ms_ref = timed(lambda: materialized(q, k, v, scale, cm))
        z, _, p = pyqkv_attn(q, k, v, True, pattern=True)
        z_ref, p_ref = materialized(q, k, v, scale, cm)
        rows.append({
            "B": B, "S": S, "pyqkv_ms": ms, "materialized_ms": ms_ref, "speedup": ms_ref / ms,
            "pattern_GBps": B * H * S * S * 2 / (ms * 1e-3) / 1e9,
            "rel_err_z": rel_err(z, z_ref), "rel_err_pattern": rel_err(p, p_ref),
        })
        del q, k, v, z, p, z_ref, p_ref
        torch.cuda.empty_cache()
    return rows


def table(title, rows, cols) -> str:
    lines = [title, "  ".join(f"{c:>14}" for c in cols)]
    for r in rows:
        lines.append("  ".join(f"{r[c]:>14.4g}" if isinstance(r[c], float) else f"{str(r[c]):>14}" for c in cols))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--quick", action="store_true", help="fewer rows")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: skipped")
        return 0
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    result["ceilings"] = ceilings()
    print(f"{result['device']}, torch {result['torch']}: copy {result['ceilings']['copy_GBps']:.0f} GB/s, "
          f"bf16 GEMM {result['ceilings']['gemm_bf16_TFLOPs']:.0f} TFLOP/s", flush=True)
    sections = [
        ("prefill", lambda: prefill_rows(args.quick),
         ["B", "S", "causal", "pyqkv_ms", "sdpa_ms", "pyqkv_TFLOPs", "sdpa_TFLOPs", "ratio_vs_sdpa", "rel_err"]),
        ("decode", lambda: decode_rows(args.quick, result["ceilings"]["copy_GBps"]),
         ["B", "context", "Hkv", "pyqkv_us", "sdpa_us", "pyqkv_GBps", "fraction_of_copy", "ratio_vs_sdpa", "rel_err"]),
        ("pattern", lambda: pattern_rows(args.quick),
         ["B", "S", "pyqkv_ms", "materialized_ms", "speedup", "pattern_GBps", "rel_err_z", "rel_err_pattern"]),
    ]
    for name, fn, cols in sections:
        try:
            result[name] = fn()
            print(table(f"== {name}", result[name], cols), flush=True)
        except Exception as e:  # keep the other sections' numbers
            result[name] = f"{type(e).__name__}: {e}"
            print(f"== {name}: FAILED: {result[name]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
