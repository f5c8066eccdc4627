"""Pattern slices at long context (issue 23): a GPT-2-small-shaped model (12 heads, d_model 768, GPT2Model:
no language-model head, whose [S, 50257] logits would dwarf everything else) with 4 layers, batch 1,
float32, attached with pyqkv.hf.attach. Rows, each in its own subprocess so that its peak memory is its own
(resource.getrusage(RUSAGE_SELF).ru_maxrss, the peak resident set of the whole process: weights, activations
and what the interpreter holds):

- "unhooked": the attached model's forward, nothing hooked (the fused op, no [B, H, S, K] tensor);
- "last row": run_with_cache of every layer's hook_pattern with pattern_queries=-1: [1, 12, 1, S] each;
- "first column": the same with pattern_keys=0: [1, 12, S, 1] each;
- "whole pattern": run_with_cache of every layer's whole hook_pattern ([1, 12, S, S] each), run only at
  sizes that fit here (--full-sizes); the largest S whose whole-pattern run fits in --budget-gb is computed
  from them: peak = (the cached patterns, exactly 4 layers x 12 heads x 4 bytes x S^2) + b S + c, with b and
  c fitted to the measured runs (a free quadratic fitted to small S is dominated by the linear activations
  and extrapolates badly), and the slice rows are then run at that S.

The machine is shared and noisy, so the rows run interleaved: --rounds rounds, each running every row once in
a fresh subprocess (one warm-up forward, then --reps timed ones); a row's time is the median over all its timed
forwards, its peak memory the largest of its processes' peaks, and the ratios compare rows measured side by side.

    python bench/pattern_slice.py [--seq 8192] [--rounds 3] [--reps 1] [--full-sizes 2048 4096 6144] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ROWS = {
    "unhooked": None,
    "last row": dict(pattern_queries=-1),
    "first column": dict(pattern_keys=0),
    "whole pattern": {},
}


def run_row(row: str, S: int, reps: int) -> dict:
    """In this process: build the model, run the row, return its median time and this process's peak RSS."""
    import torch
    import transformers

    import pyqkv
    import pyqkv.hf

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=N_LAYER, n_embd=768, n_head=N_HEAD, n_positions=S, vocab_size=50257)
    model = transformers.GPT2Model(cfg).eval()
    h = pyqkv.hf.attach(model)
    ids = torch.randint(0, cfg.vocab_size, (1, S))
    selection = ROWS[row]
    names = lambda name: name.endswith("hook_pattern")  # noqa: E731

    def forward():
        if selection is None:
            return h(ids), None
        return h.run_with_cache(ids, names_filter=names, return_type="output", **selection)

    times, shapes = [], None
    with torch.no_grad():
        for i in range(reps + 1):
            t0 = time.perf_counter()
            _, cache = forward()
            if i:  # the first forward warms up (allocator, thread pool, one-time set-up)
                times.append(time.perf_counter() - t0)
            if cache is not None:
                shapes = {k: list(v.shape) for k, v in cache.items()}
            del cache
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return dict(
        row=row,
        S=S,
        median_s=statistics.median(times),
        times_s=times,
        peak_rss_mb=peak_kib / 1024,
        cached_shape=None if shapes is None else shapes.get("blocks.0.attn.hook_pattern"),
        threads=torch.get_num_threads(),
    )


def in_subprocess(row: str, S: int, reps: int) -> dict:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_row", row, "--seq", str(S), "--reps", str(reps)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"  S={S:6d} {row:14s} median {result['median_s']:8.3f} s   peak RSS {result['peak_rss_mb']:8.1f} MB"
        f"   cached {result['cached_shape']}",
        flush=True,
    )
    return result


def interleaved(rows, S: int, rounds: int, reps: int) -> list:
    """Every row once per round, in a fresh process each: (row -> merged result) in the order of rows."""
    runs = {row: [] for row in rows}
    for _ in range(rounds):
        for row in rows:
            runs[row].append(in_subprocess(row, S, reps))
    merged = []
    for results in runs.values():
        times = [t for r in results for t in r["times_s"]]
        merged.append(
            dict(
                results[0],
                median_s=statistics.median(times),
                times_s=times,
                peak_rss_mb=max(r["peak_rss_mb"] for r in results),
                peak_rss_mb_each=[r["peak_rss_mb"] for r in results],
            )
        )
    return merged


def ratios(results) -> None:
    base = results[0]
    for r in results[1:]:
        r["time_ratio"] = r["median_s"] / base["median_s"]
        r["peak_ratio"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        print(
            f"  S={r['S']}: {r['row']}: time {r['time_ratio']:.3f}x ({r['median_s']:.2f} s vs {base['median_s']:.2f} s), "
            f"peak memory {r['peak_ratio']:.3f}x ({r['peak_rss_mb']:.0f} MB vs {base['peak_rss_mb']:.0f} MB) of unhooked"
        )


N_LAYER, N_HEAD = 4, 12


def cached_mb(S: int) -> float:
    """The whole-pattern run's cache: every layer's [1, H, S, S] float32 pattern."""
    return N_LAYER * N_HEAD * 4 * S * S / 2**20


def fit_full(points) -> tuple:
    """Least squares peak_mb - cached_mb(S) = b S + c through the measured whole-pattern runs."""
    import numpy as np

    S = np.array([p["S"] for p in points], dtype=float)
    y = np.array([p["peak_rss_mb"] - cached_mb(p["S"]) for p in points], dtype=float)
    (b, c), *_ = np.linalg.lstsq(np.stack([S, np.ones_like(S)], axis=1), y, rcond=None)
    return float(b), float(c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--full-sizes", type=int, nargs="*", default=[2048, 4096, 6144])
    ap.add_argument("--budget-gb", type=float, default=24.0)
    ap.add_argument("--skip-budget-run", action="store_true", help="do not run the slice rows at the budget's S")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._row is not None:
        print(json.dumps(run_row(args._row, args.seq, args.reps)))
        return

    print(
        f"GPT-2-small-shaped GPT2Model, 4 layers, batch 1, float32; {args.rounds} rounds x {args.reps} timed forwards"
    )
    slice_rows = ("unhooked", "last row", "first column")
    results = interleaved(slice_rows, args.seq, args.rounds, args.reps)
    ratios(results)
    full = [in_subprocess("whole pattern", S, 1) for S in args.full_sizes]
    b, c = fit_full(full)
    a = cached_mb(1)
    for p in full:
        p["predicted_peak_mb"] = a * p["S"] ** 2 + b * p["S"] + c
    budget_mb = args.budget_gb * 1e9 / 2**20
    S_fit = int((-b + (b * b - 4 * a * (c - budget_mb)) ** 0.5) / (2 * a))
    whole_at_seq_mb = a * args.seq**2 + b * args.seq + c
    print(
        f"  whole pattern: peak = {a:.4e} S^2 (the cache) + {b:.4f} S + {c:.1f} MB (fitted; at the measured sizes "
        f"{', '.join('%.0f' % p['predicted_peak_mb'] for p in full)} MB predicted): {whole_at_seq_mb / 1024:.1f} GiB "
        f"at S={args.seq}; the largest S within {args.budget_gb} GB: {S_fit}"
    )
    at_budget = []
    if not args.skip_budget_run:
        at_budget = interleaved(slice_rows, S_fit, 1, args.reps)
        ratios(at_budget)
    report = dict(
        command=" ".join([os.path.basename(sys.executable), "bench/pattern_slice.py", *sys.argv[1:]]),
        model="GPT2Model n_layer=4 n_embd=768 n_head=12, batch 1, float32, attached (pyqkv.hf.attach)",
        rows=results,
        whole_pattern_runs=full,
        whole_pattern_fit_mb=dict(a=a, b=b, c=c, at_seq_gib=whole_at_seq_mb / 1024),
        largest_S_whole_pattern_within_budget=S_fit,
        budget_gb=args.budget_gb,
        slice_rows_at_that_S=at_budget,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
