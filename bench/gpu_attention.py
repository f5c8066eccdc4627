#!/usr/bin/env python3
"""GPU benchmark of pyqkv's CUDA attention op against PyTorch, side by side in one process.

    python bench/gpu_attention.py [--json out.json] [--quick]

Rows (bf16 unless stated, H = 32, Dh = 128, inputs in pyqkv's [B, S, H, Dh] layout; PyTorch is given the
same memory as [B, H, S, Dh] views, and contiguous copies, and the faster of the two counts):
  ceilings  the device-to-device copy bandwidth (bytes read + written) and a bf16 GEMM rate, measured here;
  prefill   causal attention, B in {1, 4}, S in {1024, 4096, 8192}, Hkv in {32, 8}, with no padding and
            left-padded (a 2-D padding mask; SDPA gets the equivalent 4-D bool mask), against
            F.scaled_dot_product_attention: TFLOP/s (causal counts half the S x S products) and the ratio;
            float32 rows at S = 1024;
  decode    one query position per step against a cache that grows by one key every step, as in
            generation (contexts 2k .. 32k, B in {1, 16}, Hkv in {32, 8}, the cache a strided view of a
            larger KVCache-style buffer): the K/V bytes read per second against the measured copy
            bandwidth, and SDPA's time on the same views (its cuDNN graph is rebuilt per new length);
  pattern   return_pattern=True at S in {1024, 2048, 4096} against the materialized PyTorch computation
            (matmul, mask, float32 softmax, matmul), as hooked attention tools do it: time ratio;
  backends  one prefill and one decode shape with each backend forced (pyqkv.ops.attention_backend),
            where the plan lets it run; the plan's refusals otherwise.
Each time is the median over repeats of a timed loop between CUDA events, after warm-up. Every row also
checks the output against PyTorch's (relative Frobenius error), so a fast wrong kernel cannot pass.
The JSON has the issue's top-level "summary": prefill_time_vs_sdpa (max over shapes of pyqkv time / SDPA
time), decode_fraction_of_copy (min over contexts >= 8k), pattern_speedup_vs_materialized (min); the
model-level keys are null here (a model-level benchmark measures them).
"""

from __future__ import annotations

import argparse
import datetime
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


def pyqkv_attn(q, k, v, causal, pattern=False, mask=None):
    return torch.ops.pyqkv.attention(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]), causal, pattern, None)


def sdpa_best(q, k, v, causal, attn_mask=None):
    """(ms, z) of PyTorch's SDPA: on transposed views of our layout, and on contiguous [B, H, S, Dh].
    attn_mask (a bool [B, 1, S, K], True = attend) replaces causal when given."""
    gqa = q.shape[2] != k.shape[2]
    views = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    conts = tuple(t.contiguous() for t in views)
    best = None
    for qq, kk, vv in (views, conts):
        fn = lambda: F.scaled_dot_product_attention(  # noqa: E731
            qq, kk, vv, attn_mask=attn_mask, is_causal=causal and attn_mask is None, enable_gqa=gqa
        )
        ms = timed(fn)
        if best is None or ms < best[0]:
            best = (ms, fn().transpose(1, 2))
    return best


def left_padding(B, S, device="cuda"):
    """A 2-D padding mask [B, S] (True = attend) whose odd batch rows start after S // 8 pad keys; the
    equivalent bool [B, 1, S, S] mask for SDPA (causal and padding); and the rows to compare [B, S, 1].
    A pad query sees no key: pyqkv gives it zeros, SDPA NaN, so SDPA's mask lets those rows see
    themselves and the error is measured on the other rows."""
    keep = torch.ones(B, S, dtype=torch.bool, device=device)
    keep[1::2, : S // 8] = False
    allowed = torch.ones(S, S, dtype=torch.bool, device=device).tril() & keep[:, None, None, :]
    empty = ~allowed.any(-1, keepdim=True)
    allowed = allowed | (empty & torch.eye(S, dtype=torch.bool, device=device)[None, None])
    return keep, allowed, ~empty.view(B, 1, S).transpose(1, 2)  # rows to compare: [B, S, 1]


def prefill_rows(quick: bool) -> list:
    rows = []
    shapes = [
        (B, S, Hkv, pad, DT)
        for S in ((1024, 4096) if quick else (1024, 4096, 8192))
        for B in (1, 4)
        for Hkv in (32, 8)
        for pad in (False, True)
    ]
    shapes += [(1, 1024, 32, False, torch.float32), (1, 1024, 8, False, torch.float32)]
    for B, S, Hkv, pad, dt in shapes:
        q = torch.randn(B, S, H, DH, device="cuda", dtype=dt)
        k, v = (torch.randn(B, S, Hkv, DH, device="cuda", dtype=dt) for _ in range(2))
        flops = 4 * B * H * S * S * DH * 0.5
        mask = sdpa_mask = None
        rows_ok = torch.ones(B, S, 1, dtype=torch.bool, device="cuda")
        if pad:
            mask, sdpa_mask, rows_ok = left_padding(B, S)
        ms = timed(lambda: pyqkv_attn(q, k, v, True, mask=mask))
        z = pyqkv_attn(q, k, v, True, mask=mask)[0]
        ms_ref, z_ref = sdpa_best(q, k, v, True, attn_mask=sdpa_mask)
        ok = rows_ok.unsqueeze(-1).expand_as(z)
        rows.append(
            {
                "B": B,
                "S": S,
                "Hkv": Hkv,
                "padded": pad,
                "dtype": str(dt)[6:],
                "pyqkv_ms": ms,
                "sdpa_ms": ms_ref,
                "pyqkv_TFLOPs": flops / ms / 1e9,
                "sdpa_TFLOPs": flops / ms_ref / 1e9,
                "time_vs_sdpa": ms / ms_ref,
                "rel_err": rel_err(z[ok], z_ref[ok]),
                "backend": plan_name(q, k, v, mask),
            }
        )
        del q, k, v, z, z_ref
        torch.cuda.empty_cache()
    return rows


def plan_name(q, k, v, mask=None, causal=True, pattern=False) -> str:
    return pyqkv.ops.attention_plan(q, k, v, scale=DH**-0.5, causal=causal, mask=mask, return_pattern=pattern).backend


def decode_rows(quick: bool, copy_gbs: float) -> list:
    """A generation-like loop: `steps` calls, the cache one key longer at each (k, v are views of a
    preallocated buffer, as pyqkv.KVCache hands them over)."""
    rows = []
    steps = 16 if quick else 32
    for ctx in (8192, 32768) if quick else (2048, 8192, 16384, 32768):
        for Hkv in (32, 8):
            for B in (1, 16):
                if B * ctx * Hkv * DH * 2 * 2 > 24 << 30:
                    continue  # keep the buffers within a few tens of GB
                cap = ctx + steps + 512
                kbuf = torch.randn(B, cap, Hkv, DH, device="cuda", dtype=DT)
                vbuf = torch.randn(B, cap, Hkv, DH, device="cuda", dtype=DT)
                q = torch.randn(B, 1, H, DH, device="cuda", dtype=DT)
                kvs = [(kbuf[:, : ctx + i], vbuf[:, : ctx + i]) for i in range(steps)]

                def ours():
                    for k, v in kvs:
                        pyqkv_attn(q, k, v, True)

                qt = q.transpose(1, 2)
                kvt = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in kvs]

                def sdpa():
                    for k, v in kvt:
                        F.scaled_dot_product_attention(qt, k, v, enable_gqa=Hkv != H)

                ms = timed(ours, target_ms=100, max_iters=20) / steps
                ms_ref = timed(sdpa, target_ms=100, max_iters=20) / steps
                k, v = kvs[-1]
                z = pyqkv_attn(q, k, v, True)[0]
                z_ref = F.scaled_dot_product_attention(qt, *kvt[-1], enable_gqa=Hkv != H).transpose(1, 2)
                kv_bytes = 2 * B * (ctx + steps / 2) * Hkv * DH * kbuf.element_size()
                gbs = kv_bytes / (ms * 1e-3) / 1e9
                rows.append(
                    {
                        "B": B,
                        "context": ctx,
                        "Hkv": Hkv,
                        "pyqkv_us": ms * 1e3,
                        "sdpa_us": ms_ref * 1e3,
                        "pyqkv_GBps": gbs,
                        "fraction_of_copy": gbs / copy_gbs,
                        "time_vs_sdpa": ms / ms_ref,
                        "rel_err": rel_err(z, z_ref),
                        "backend": plan_name(q, k, v),
                    }
                )
                del kbuf, vbuf, kvs, kvt, q, z, z_ref
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
    for B, S in ((1, 1024), (1, 2048), (1, 4096)) if not quick else ((1, 1024), (1, 2048)):
        q, k, v = (torch.randn(B, S, H, DH, device="cuda", dtype=DT) for _ in range(3))
        scale = 1.0 / math.sqrt(DH)
        cm = torch.ones(S, S, dtype=torch.bool, device="cuda").triu(1)
        ms = timed(lambda: pyqkv_attn(q, k, v, True, pattern=True))
        ms_ref = timed(lambda: materialized(q, k, v, scale, cm))
        z, _, p = pyqkv_attn(q, k, v, True, pattern=True)
        z_ref, p_ref = materialized(q, k, v, scale, cm)
        rows.append(
            {
                "B": B,
                "S": S,
                "pyqkv_ms": ms,
                "materialized_ms": ms_ref,
                "speedup": ms_ref / ms,
                "pattern_GBps": B * H * S * S * 2 / (ms * 1e-3) / 1e9,
                "rel_err_z": rel_err(z, z_ref),
                "rel_err_pattern": rel_err(p, p_ref),
                "backend": plan_name(q, k, v, pattern=True),
            }
        )
        del q, k, v, z, p, z_ref, p_ref
        torch.cuda.empty_cache()
    return rows


def backend_rows(quick: bool) -> list:
    """Each backend forced on one prefill shape (B=1, S=4096, GQA 32/8) and one decode shape (B=1, 8k
    keys, GQA): its time where the plan lets it run, else its reasons."""
    rows = []
    for kind, S, K in (("prefill", 4096, 4096), ("decode", 1, 8192)):
        q = torch.randn(1, S, H, DH, device="cuda", dtype=DT)
        k, v = (torch.randn(1, K, 8, DH, device="cuda", dtype=DT) for _ in range(2))
        ms_ref, z_ref = sdpa_best(q, k, v, S == K)
        for name in pyqkv.ops.BACKENDS:
            with pyqkv.ops.attention_backend(name):
                p = pyqkv.ops.attention_plan(q, k, v, scale=DH**-0.5, causal=True)
                if p.backend is None:
                    rows.append(
                        {
                            "shape": kind,
                            "backend": name,
                            "ms": None,
                            "time_vs_sdpa": None,
                            "rel_err": None,
                            "refused": "; ".join(p.refusals.get(name, []))[:200],
                        }
                    )
                    continue
                ms = timed(lambda: pyqkv_attn(q, k, v, True))
                z = pyqkv_attn(q, k, v, True)[0]
            rows.append(
                {
                    "shape": kind,
                    "backend": name,
                    "ms": ms,
                    "time_vs_sdpa": ms / ms_ref,
                    "rel_err": rel_err(z, z_ref),
                    "refused": "",
                }
            )
        del q, k, v, z_ref
        torch.cuda.empty_cache()
    return rows


def summary(result) -> dict:
    """The issue's top-level keys (None where this benchmark does not measure them)."""

    def rows(name):
        return result[name] if isinstance(result.get(name), list) else []

    pre = [r["time_vs_sdpa"] for r in rows("prefill") if r["dtype"] == "bfloat16"]
    dec = [r["fraction_of_copy"] for r in rows("decode") if r["context"] >= 8192]
    pat = [r["speedup"] for r in rows("pattern")]
    return {
        "prefill_time_vs_sdpa": max(pre) if pre else None,
        "decode_fraction_of_copy": min(dec) if dec else None,
        "pattern_speedup_vs_materialized": min(pat) if pat else None,
        "generate_tokens_per_s_vs_hf_sdpa": None,
        "generate_hooked_vs_hf_sdpa": None,
        "run_with_cache_patterns_vs_hf_eager": None,
        "peak_memory_patterns_vs_hf_eager": None,
    }


def table(title, rows, cols) -> str:
    lines = [title, "  ".join(f"{c:>14}" for c in cols)]
    for r in rows:
        lines.append("  ".join(f"{r[c]:>14.4g}" if isinstance(r[c], float) else f"{str(r[c])[:60]:>14}" for c in cols))
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
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    result["ceilings"] = ceilings()
    print(
        f"{result['device']}, torch {result['torch']}: copy {result['ceilings']['copy_GBps']:.0f} GB/s, "
        f"bf16 GEMM {result['ceilings']['gemm_bf16_TFLOPs']:.0f} TFLOP/s",
        flush=True,
    )
    sections = [
        (
            "prefill",
            lambda: prefill_rows(args.quick),
            [
                "B",
                "S",
                "Hkv",
                "padded",
                "dtype",
                "pyqkv_ms",
                "sdpa_ms",
                "pyqkv_TFLOPs",
                "time_vs_sdpa",
                "rel_err",
                "backend",
            ],
        ),
        (
            "decode",
            lambda: decode_rows(args.quick, result["ceilings"]["copy_GBps"]),
            [
                "B",
                "context",
                "Hkv",
                "pyqkv_us",
                "sdpa_us",
                "pyqkv_GBps",
                "fraction_of_copy",
                "time_vs_sdpa",
                "rel_err",
                "backend",
            ],
        ),
        (
            "pattern",
            lambda: pattern_rows(args.quick),
            [
                "B",
                "S",
                "pyqkv_ms",
                "materialized_ms",
                "speedup",
                "pattern_GBps",
                "rel_err_z",
                "rel_err_pattern",
                "backend",
            ],
        ),
        (
            "backends",
            lambda: backend_rows(args.quick),
            ["shape", "backend", "ms", "time_vs_sdpa", "rel_err", "refused"],
        ),
    ]
    for name, fn, cols in sections:
        try:
            result[name] = fn()
            print(table(f"== {name}", result[name], cols), flush=True)
        except Exception as e:  # keep the other sections' numbers
            result[name] = f"{type(e).__name__}: {e}"
            print(f"== {name}: FAILED: {result[name]}", flush=True)
    result["summary"] = summary(result)
    print("summary:", json.dumps(result["summary"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
