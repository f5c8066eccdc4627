#!/usr/bin/env python3
"""Runs pyqkv's CUDA attention and rotary kernels on the CPU, on the cases of scripts/cuda_smoke.py.

For machines without a GPU: the kernels (csrc/cuda/attention_*.cuh, rotary.cuh), the host preparation
and the plan (csrc/cuda/attention_host.cuh, attention_plan.cuh) are compiled by g++ against stand-in
CUDA headers (tools/cuda_emulate/shim) and run one CTA at a time, each CTA's threads as coroutines
that switch at barriers (tools/cuda_emulate/emu_runtime.h). This checks the attention kernels'
indexing, masking (4-D bool and additive masks, sliding windows), ALiBi bias, softcapping, tiling, online softmax, Flash-Decoding splits and pattern pass against
the oracle, under several simulated GPUs (so that every kernel path and tile size is taken) and thread
orders (so that a missing barrier shows); and the rotary kernel's indexing, grid-stride loop and
rounding. It says nothing about speed, real-hardware races, or the CUDA launch code in attention.cu
and rotary.cu.

    python tools/cuda_emulate/run.py [-k NAME] [--quick]

Needs a CPU torch (the project venv); builds into build/cuda-emulate (about a minute).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import cuda_smoke  # noqa: E402  (the case table the GPU smoke test runs)

# Simulated devices: (name, compute capability major, opt-in shared memory per block, SM count).
DEVICES = [
    ("H200", 9, 232448, 132),
    ("A100", 8, 166912, 108),
    ("small-smem sm_75", 7, 65536, 40),  # no tensor-core path; small tiles for big Dh
]
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}


def build():
    src = HERE
    out = os.path.join(ROOT, "build", "cuda-emulate")
    os.makedirs(out, exist_ok=True)
    return cpp_extension.load(
        name="pyqkv_cuda_emulate",
        sources=[os.path.join(src, "attention_emulate.cpp")],
        extra_include_paths=[os.path.join(src, "shim"), os.path.join(ROOT, "csrc", "cuda"), os.path.join(ROOT, "csrc")],
        # -ffp-contract=off: __fmul_rn / __fadd_rn must stay separately rounded, as on the GPU
        extra_cflags=["-O2", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"],
        build_directory=out,
        verbose=False,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("--quick", action="store_true", help="H200 only, forward order, one half dtype")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    emu = build()
    print(f"built the emulator in {time.time() - t0:.0f}s")
    devices = DEVICES[:1] if args.quick else DEVICES
    failures = runs = 0
    for case in cuda_smoke.attention_cases():
        if args.k not in case.name:
            continue
        dtypes = case.dtypes
        if args.quick:
            dtypes = [d for d in dtypes if d != torch.float16] or dtypes
        for dev_name, major, smem, sms in devices:
            for dtype in dtypes:
                order_names = ["forward"] if args.quick else ["forward", "reverse", "shuffled"]
                # Thread orders matter for the kernels, not the dtype: vary them on one dtype only.
                if dtype != dtypes[0]:
                    order_names = order_names[:1]
                for order_name in order_names:
                    plan = []

                    def run(q, k, v, mask, scale, causal, return_pattern, alibi, softcap, window):
                        z, lse, pattern, desc = emu.attention(
                            q,
                            k,
                            v,
                            mask,
                            scale,
                            causal,
                            return_pattern,
                            alibi,
                            softcap,
                            window,
                            major,
                            smem,
                            sms,
                            ORDERS[order_name],
                            1234,
                        )
                        plan.append(desc)
                        return z, lse, pattern

                    t1 = time.time()
                    try:
                        ok, msg = cuda_smoke.check_attention_case(case, dtype, "cpu", run)
                    except Exception as e:
                        ok, msg = False, f"{type(e).__name__}: {e}"
                    runs += 1
                    failures += not ok
                    print(
                        f"{'ok  ' if ok else 'FAIL'} {case.name} [{str(dtype)[6:]}, {dev_name}, {order_name}] "
                        f"{msg} ({plan[0] if plan else '-'}; {time.time() - t1:.1f}s)",
                        flush=True,
                    )
    # rotary: one kernel for every GPU; vary the dtype, and the grid (fewer CTAs than elements need runs
    # the grid-stride loop; one CTA per 256 elements is the real launch of small inputs)
    for case in cuda_smoke.rotary_cases():
        if args.k not in f"rotary {case.name}":
            continue
        dtypes = case.dtypes[:2] if args.quick else case.dtypes
        for dtype in dtypes:
            for max_blocks in (3,) if args.quick else (3, 1 << 18):
                total = case.B * case.S * case.n * case.Dh
                if max_blocks > 3 and total > 16 * 256:
                    continue  # a full-size grid of a large case: minutes of coroutine set-up, nothing new
                launch = []

                def run(x, cos, sin, interleaved):
                    out, desc = emu.rotary(x, cos, sin, interleaved, max_blocks, ORDERS["shuffled"], 1234)
                    launch.append(desc)
                    return out

                t1 = time.time()
                try:
                    ok, msg = cuda_smoke.check_rotary_case(case, dtype, "cpu", run)
                except Exception as e:
                    ok, msg = False, f"{type(e).__name__}: {e}"
                runs += 1
                failures += not ok
                print(
                    f"{'ok  ' if ok else 'FAIL'} rotary {case.name} [{str(dtype)[6:]}] {msg} "
                    f"({launch[0] if launch else '-'}; {time.time() - t1:.1f}s)",
                    flush=True,
                )
    print(f"{'FAILED' if failures else 'passed'}: {failures} of {runs} runs failed in {time.time() - t0:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
