#!/usr/bin/env python3
"""CUDA smoke test: every CUDA op of pyqkv against the oracle, pyqkv/reference.py, on tricky cases.

The first thing to run on a GPU machine, after building the project against a CUDA torch:

    python scripts/cuda_smoke.py            # all cases
    python scripts/cuda_smoke.py -k decode  # cases whose name contains "decode"

Prints one line per case with each output's largest error and the tolerance rule's bound, and exits
non-zero on any mismatch (or any NaN). Without a GPU it prints "no GPU: skipped" and exits 0.

The attention and rotary cases are the one case table of tests/op_cases.py, which pytest also runs on
every device (tests/test_ops.py, tests/test_rotary.py), checked by the one tolerance rule of
tests/tolerance.py: max |kernel - ref_fp64| <= 2 max |ref_in_dtype - ref_fp64| + atol(dtype), the
reference run in float64 and in the kernel's dtype. tools/cuda_emulate/run.py runs the same cases on CPU
threads through the CUDA kernels compiled for an emulated GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import op_cases  # noqa: E402  (the case table; loads pyqkv/reference.py by path, imports nothing of pyqkv)
import tolerance  # noqa: E402

ref = op_cases.ref
ALL_DTYPES = op_cases.ALL_DTYPES
AttnCase, RotaryCase = op_cases.AttnCase, op_cases.RotaryCase
attention_cases, rotary_cases = op_cases.attention_cases, op_cases.rotary_cases
build_attention_inputs, build_rotary_inputs = op_cases.build_attention_inputs, op_cases.build_rotary_inputs
check_attention_case, check_rotary_case = op_cases.check_attention_case, op_cases.check_rotary_case


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
                packed = torch.ops.pyqkv.pack_qkv(
                    *[t.transpose(1, 2).contiguous().transpose(1, 2) for t in got], layout, conv1d
                )
                ok = ok and torch.equal(packed, w) and packed.shape == w.shape
                results.append((f"split/pack {layout} conv1d={conv1d} {dtype}", ok, "exact" if ok else "MISMATCH"))
    return results


def check_per_head_proj(device):
    results = []
    g = torch.Generator().manual_seed(2)
    B, S, n, D, E = 2, 7, 4, 24, 16
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        W = torch.randn(n, D, E, generator=g).to(device, dtype)
        b = torch.randn(n, E, generator=g).to(device, dtype)
        resid = torch.randn(B, S, D, generator=g).to(device, dtype)
        for kind, x in (
            ("general", torch.randn(B, S, n, D, generator=g).to(device, dtype)),
            ("broadcast", resid[:, :, None].expand(B, S, n, D)),
        ):
            for bias in (None, b):
                got = torch.ops.pyqkv.per_head_proj(x, W, bias)
                hi = ref.per_head_proj(x.double(), W.double(), None if bias is None else bias.double())
                lo = ref.per_head_proj(x, W, bias)  # plain PyTorch in the kernel's dtype
                err, bound, failure = tolerance.rule_check(got, hi, lo, what="per_head_proj")
                ok = failure is None and got.shape == (B, S, n, E) and got.dtype == dtype and got.device == x.device
                msg = f"{err:.1e}/{bound:.1e}" + ("" if failure is None else f"  <-- {failure}")
                results.append((f"per_head_proj {kind} bias={bias is not None} {dtype}", ok, msg))
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
    parser.add_argument(
        "--backend",
        default=None,
        help="force this attention backend (pyqkv.ops.BACKENDS); cases it refuses are skipped",
    )
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
        z, lse, pattern = torch.ops.pyqkv.attention(
            q, k, v, mask, scale, causal, return_pattern, alibi, softcap, window
        )
        return z, lse, pattern

    for case in attention_cases():
        if args.k not in case.name:
            continue
        for dtype in case.dtypes:
            backend = "?"
            try:
                q, k, v, mask, scale, alibi, _, _ = build_attention_inputs(case, dtype, device)
                backend = pyqkv.ops.attention_plan(
                    q,
                    k,
                    v,
                    scale=scale,
                    causal=case.causal,
                    mask=mask,
                    return_pattern=case.pattern,
                    alibi=alibi,
                    softcap=case.softcap,
                    window=case.window,
                ).backend
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
