"""Microbenchmarks of one GPT-2-small attention layer (D = 768, H = 12, Dh = 64), side by side in one
process, reported as medians of interleaved runs and ratios. Used by `pyqkv bench` (and the demo);
bench/attention_layer.py runs the same thing from a checkout.

Rows (prefill): the Bridge fast path; the Bridge with a read-only hook_pattern hook; the Bridge with
use_split_qkv_input and no hook; the pure-PyTorch materialized layer (three GEMMs, [B,H,S,K] scores and
pattern, like the reference system); PyTorch's best fused path (addmm + SDPA(is_causal) + addmm).
Decode: one token per step after a prefill, the Bridge with KVCache against the materialized layer
with a torch.cat cache. Each row shows the median and the spread (min - max) of its rounds; a row whose
max exceeds its min by more than NOISY (30 %) is flagged "noisy": the machine was busy, rerun it.
Timings are never used in tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from pyqkv.bridge import Bridge
from pyqkv.cache import KVCache

GPT2_SMALL = dict(d_model=768, n_heads=12, d_head=64)
NOISY = 1.3  # max / min of a row's rounds above this: flagged as noisy


@dataclass
class LayerWeights:
    """A GPT-2-style layer's weights in x @ W orientation, with random values (std 0.02, as GPT-2's init)."""

    W_qkv: torch.Tensor  # [D, 3D] blocked: [Q heads | K heads | V heads]
    b_qkv: torch.Tensor  # [3D]
    W_out: torch.Tensor  # [D, D]
    b_out: torch.Tensor  # [D]
    n_heads: int
    d_head: int

    @classmethod
    def random(cls, d_model=768, n_heads=12, d_head=64, dtype=torch.float32, device="cpu", seed=0):
        g = torch.Generator().manual_seed(seed)
        D, n = d_model, 3 * n_heads * d_head

        def rnd(*shape):
            return (torch.randn(*shape, generator=g) * 0.02).to(dtype=dtype, device=device)

        return cls(rnd(D, n), rnd(n), rnd(n_heads * d_head, D), rnd(D), n_heads, d_head)

    def bridge(self, **flags) -> Bridge:
        return Bridge(
            self.W_qkv,
            self.b_qkv,
            self.W_out,
            self.b_out,
            n_heads=self.n_heads,
            d_head=self.d_head,
            layout="blocked",
            conv1d=True,
            **flags,
        ).eval()


class MaterializedLayer:
    """The layer computed the way the reference system does it: Q, K and V by three separate GEMMs,
    [B,H,S,K] scores and pattern materialized, a torch.cat cache (O(K) copy per token)."""

    def __init__(self, w: LayerWeights):
        hd = w.n_heads * w.d_head
        self.H, self.Dh = w.n_heads, w.d_head
        self.Wq, self.Wk, self.Wv = (w.W_qkv[:, i * hd : (i + 1) * hd].contiguous() for i in range(3))
        self.bq, self.bk, self.bv = (w.b_qkv[i * hd : (i + 1) * hd] for i in range(3))
        self.W_out, self.b_out = w.W_out, w.b_out
        self.k_cache = self.v_cache = None

    def reset(self):
        self.k_cache = self.v_cache = None

    def __call__(self, x, use_cache=False):
        B, S, D = x.shape
        heads = lambda t: t.view(B, S, self.H, self.Dh).transpose(1, 2)  # noqa: E731
        q, k, v = heads(x @ self.Wq + self.bq), heads(x @ self.Wk + self.bk), heads(x @ self.Wv + self.bv)
        if use_cache:
            if self.k_cache is not None:
                k, v = torch.cat([self.k_cache, k], dim=2), torch.cat([self.v_cache, v], dim=2)
            self.k_cache, self.v_cache = k, v
        K = k.shape[2]
        scores = (q @ k.transpose(-1, -2)) * self.Dh**-0.5
        hidden = torch.ones(S, K, dtype=torch.bool, device=x.device).triu(K - S + 1)  # bottom-right causal
        pattern = scores.masked_fill(hidden, torch.finfo(scores.dtype).min).softmax(-1)
        z = (pattern @ v).transpose(1, 2).reshape(B, S, self.H * self.Dh)
        return z @ self.W_out + self.b_out


class TorchFusedLayer:
    """PyTorch's best fused path for the same layer: addmm + SDPA(is_causal=True) + addmm."""

    def __init__(self, w: LayerWeights):
        self.w = w

    def __call__(self, x):
        B, S, D = x.shape
        H, Dh = self.w.n_heads, self.w.d_head
        qkv = torch.addmm(self.w.b_qkv, x.reshape(B * S, D), self.w.W_qkv).view(B, S, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, S, Dh] views
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.addmm(self.w.b_out, z.transpose(1, 2).reshape(B * S, H * Dh), self.w.W_out).view(B, S, D)


def prefill_rows(w: LayerWeights, *, with_compile: bool = False) -> dict:
    """Row name -> callable(x). Each Bridge row has its own Bridge with its hooks installed once."""
    fast = w.bridge()
    pattern_hooked = w.bridge()
    # read-only, as run_with_cache's savers are: the pattern is written, z is not recomputed from it
    pattern_hooked.hook_points()["hook_pattern"].add(lambda pattern, hook: None, is_permanent=True, read_only=True)
    split_input = w.bridge(use_split_qkv_input=True)
    rows = {
        "pyqkv fast path": fast,
        "pyqkv + read-only hook_pattern": pattern_hooked,
        "pyqkv use_split_qkv_input": split_input,
        "reference (materialized)": MaterializedLayer(w),
        "torch fused (addmm+SDPA)": TorchFusedLayer(w),
    }
    if with_compile:
        rows["torch.compile(pyqkv)"] = torch.compile(copy.deepcopy(fast), fullgraph=True)
    return rows


@dataclass
class Spread:
    """Seconds per call over a row's rounds."""

    min: float
    median: float
    max: float

    @property
    def noisy(self) -> bool:
        return self.max > NOISY * self.min

    @classmethod
    def of(cls, times) -> "Spread":
        return cls(min(times), statistics.median(times), max(times))


def time_interleaved(fns: dict, args: tuple, *, reps: int, warmup: int = 2, clock=time.perf_counter) -> dict:
    """{name: Spread} of seconds per call of each fn, running every fn once per round in rotating order so
    slow drifts of the machine hit all rows alike (after `warmup` untimed rounds of every fn). clock: wall
    time by default; time.process_time (this process's CPU time, all its threads) for a machine shared
    with other work, where the wall time of a call depends on what else runs."""
    names = list(fns)
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                fns[name](*args)
        times = {name: [] for name in names}
        for r in range(reps):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = clock()
                fns[name](*args)
                times[name].append(clock() - t0)
    return {name: Spread.of(t) for name, t in times.items()}


def gemm_rate(dtype=torch.float32, m=4096, k=768, n=2304, reps=10) -> float:
    """The machine's measured GEMM rate (GFLOP/s) at the projection's shape."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    t = time_interleaved({"mm": torch.mm}, (a, b), reps=reps)["mm"].median
    return 2 * m * k * n / t / 1e9


def layer_flops(B, S, D, H, Dh, causal=True) -> float:
    """FLOPs of the layer: QKV and output GEMMs plus QKᵀ and PV over the causal half."""
    pairs = S * (S + 1) / 2 if causal else S * S
    return 2 * B * S * D * 3 * H * Dh + 2 * B * S * H * Dh * D + 2 * 2 * B * H * pairs * Dh


def decode_step_times(w: LayerWeights, B: int, context: int, steps: int) -> dict:
    """Per-step seconds of single-token decoding after a prefill of `context` tokens:
    {row: [t_step0, t_step1, ...]} for the Bridge + KVCache and the materialized torch.cat cache."""
    bridge, ref = w.bridge(), MaterializedLayer(w)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randn(B, context, w.W_qkv.shape[0], generator=g, dtype=w.W_qkv.dtype)
    tokens = torch.randn(steps, B, 1, w.W_qkv.shape[0], generator=g, dtype=w.W_qkv.dtype)
    out = {"pyqkv + KVCache": [], "reference + torch.cat": []}
    with torch.inference_mode():
        cache = KVCache()
        bridge(prompt, kv_cache=cache)
        ref.reset()
        ref(prompt, use_cache=True)
        for s in range(steps):
            t0 = time.perf_counter()
            bridge(tokens[s], kv_cache=cache)
            t1 = time.perf_counter()
            ref(tokens[s], use_cache=True)
            t2 = time.perf_counter()
            out["pyqkv + KVCache"].append(t1 - t0)
            out["reference + torch.cat"].append(t2 - t1)
    return out


def peak_memory_mb(row: str, B: int, S: int) -> Optional[float]:
    """Extra peak resident memory (MB) of one call of a prefill row, measured in a fresh process so no
    other row's memory is in it (call_peak_kib); None where the kernel cannot measure it."""
    code = (
        "import torch; from pyqkv import bench; "
        f"w = bench.LayerWeights.random(); rows = bench.prefill_rows(w); x = torch.randn({B}, {S}, 768); "
        f"fn = rows[{row!r}]; fn(x[:, :8]); print(bench.call_peak_kib(fn, x))"
    )
    return _peak_mb_in_child(code)


def _peak_mb_in_child(code: str) -> Optional[float]:
    """Run `code` (which prints call_peak_kib's result last) in a fresh Python process: its KiB as MB."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    last = res.stdout.strip().splitlines()[-1]
    return None if last == "None" else int(last) / 1024


def call_peak_kib(fn, *args) -> Optional[int]:
    """Extra peak resident memory (KiB) of one call fn(*args), under inference_mode, over what this process
    holds just before it; None where the kernel does not let a process reset its high-water mark.

    The high-water mark (VmHWM) is a maximum over the process's life: what it touched before the call
    (building models, other rows, a warm-up) would hide the call below it, which is how a column of such
    differences read 0 MB for a call returning 200 MB of logits. So, just before the call: garbage is
    collected; freed memory that malloc keeps is handed back to the kernel (malloc_trim, glibc), so that
    the call reusing it shows as growth; the high-water mark is reset to the current resident size
    (writing 5 to /proc/self/clear_refs, Linux >= 4.0). The call's result is held until the mark is read:
    what a row returns (patterns, logits) counts."""
    import gc

    gc.collect()
    _malloc_trim()
    if not _reset_high_water():
        return None
    base = high_water_kib()  # = the resident size now
    with torch.inference_mode():
        out = fn(*args)
    peak = high_water_kib()
    del out
    return peak - base


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc; other C libraries: nothing to call
        libc.malloc_trim(0)


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def high_water_kib() -> int:
    """This process's peak resident set size (VmHWM), KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not found in /proc/self/status")


def format_table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def run(
    seq_lens=(128, 512, 1024),
    contexts=(512, 2000),
    batch=4,
    reps=7,
    steps=64,
    memory=True,
    with_compile=False,
    quiet=False,
) -> dict:
    torch.manual_seed(0)
    w = LayerWeights.random(**GPT2_SMALL)
    D, H, Dh = GPT2_SMALL["d_model"], GPT2_SMALL["n_heads"], GPT2_SMALL["d_head"]
    rows = prefill_rows(w, with_compile=with_compile)
    result = {
        "config": dict(
            batch=batch, dtype="float32", threads=torch.get_num_threads(), torch=torch.__version__, **GPT2_SMALL
        ),
        "prefill": {},
        "decode": {},
    }
    rate = gemm_rate()
    result["gemm_gflops"] = rate
    say = (lambda *a: None) if quiet else print
    say(
        f"GPT-2-small attention layer, float32, batch {batch}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; machine GEMM rate {rate:.1f} GFLOP/s"
    )
    baseline = "torch fused (addmm+SDPA)"
    for S in seq_lens:
        x = torch.randn(batch, S, D)
        spread = time_interleaved(rows, (x,), reps=reps)
        med = {name: sp.median for name, sp in spread.items()}
        mem = {name: peak_memory_mb(name, batch, S) for name in rows if "compile" not in name} if memory else {}
        flops = layer_flops(batch, S, D, H, Dh)
        entry = {}
        for name, t in med.items():
            sp = spread[name]
            entry[name] = {
                "median_ms": t * 1e3,
                "min_ms": sp.min * 1e3,
                "max_ms": sp.max * 1e3,
                "noisy": sp.noisy,
                "vs_torch_fused": t / med[baseline],
                "vs_fast_path": t / med["pyqkv fast path"],
                "peak_mb": mem.get(name),
            }
        entry["pyqkv fast path"]["gflops"] = flops / med["pyqkv fast path"] / 1e9
        result["prefill"][S] = entry
        table = [
            [
                name,
                f"{e['median_ms']:.2f}",
                f"{e['min_ms']:.2f} - {e['max_ms']:.2f}" + (" noisy" if e["noisy"] else ""),
                f"{e['vs_torch_fused']:.2f}x",
                f"{e['vs_fast_path']:.2f}x",
                "-" if e["peak_mb"] is None else f"{e['peak_mb']:.0f}",
            ]
            for name, e in entry.items()
        ]
        say(
            f"\nprefill S={S} (fast path {entry['pyqkv fast path']['gflops']:.1f} GFLOP/s = "
            f"{entry['pyqkv fast path']['gflops'] / rate:.0%} of GEMM rate)"
        )
        say(format_table(["row", "median ms", "min - max", "vs torch fused", "vs fast path", "peak MB"], table))
    for ctx in contexts:
        per_step = decode_step_times(w, batch, ctx, steps)
        entry = {}
        for name, ts in per_step.items():
            half = max(1, len(ts) // 2)
            sp = Spread.of(ts)
            entry[name] = {
                "median_ms": sp.median * 1e3,
                "min_ms": sp.min * 1e3,
                "max_ms": sp.max * 1e3,
                "first_half_ms": statistics.median(ts[:half]) * 1e3,
                "second_half_ms": statistics.median(ts[half:] or ts) * 1e3,
            }
        ratio = entry["pyqkv + KVCache"]["median_ms"] / entry["reference + torch.cat"]["median_ms"]
        entry["ratio"] = ratio
        result["decode"][ctx] = entry
        table = [
            [
                name,
                f"{e['median_ms']:.3f}",
                f"{e['min_ms']:.3f} - {e['max_ms']:.3f}",
                f"{e['first_half_ms']:.3f}",
                f"{e['second_half_ms']:.3f}",
            ]
            for name, e in entry.items()
            if name != "ratio"
        ]
        say(f"\ndecode after a {ctx}-token prefill, {steps} steps (pyqkv / reference = {ratio:.2f}x)")
        say(format_table(["row", "median ms/step", "min - max", "first half", "second half"], table))
    return result


def plot(result: dict, path: str) -> None:
    """PNG from run()'s result or its JSON: median time against S per prefill row (left) and per-step
    decode time against the context length (right, when the result has decode rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefill = {int(s): rows for s, rows in result["prefill"].items()}  # JSON turned the keys into strings
    decode = {int(c): rows for c, rows in result.get("decode", {}).items()}
    fig, axes = plt.subplots(1, 2 if decode else 1, figsize=(12 if decode else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    seqs = sorted(prefill)
    for name in prefill[seqs[0]]:
        ax.plot(seqs, [prefill[s][name]["median_ms"] for s in seqs], marker="o", label=name)
    ax.set_xlabel("sequence length S")
    ax.set_ylabel("median ms per layer call")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(f"prefill: GPT-2-small attention layer, float32, batch {result['config']['batch']}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    if decode:
        ax = axes[0][1]
        ctxs = sorted(decode)
        for name in (n for n in decode[ctxs[0]] if n != "ratio"):
            ax.plot(ctxs, [decode[c][name]["median_ms"] for c in ctxs], marker="o", label=name)
        ax.set_xlabel("context length (cached tokens)")
        ax.set_ylabel("median ms per decode step")
        ax.set_title("decode: one token per step")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="pyqkv bench",
        description=__doc__.split("\n\n")[0] + " At the defaults this takes about 3 minutes on a 2-core machine "
        "(most of it the peak-memory subprocesses: --no-memory halves it).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seq", type=int, nargs="+", default=[128, 512, 1024], help="prefill sequence lengths")
    p.add_argument("--context", type=int, nargs="+", default=[512, 2000], help="decode context lengths")
    p.add_argument("--batch", type=int, default=4, help="batch size")
    p.add_argument("--reps", type=int, default=7, help="interleaved rounds per prefill size")
    p.add_argument("--steps", type=int, default=64, help="decode steps per context")
    p.add_argument("--no-memory", action="store_true", help="skip the per-row peak-memory subprocesses")
    p.add_argument("--compile", action="store_true", help="add a torch.compile(bridge) row")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument(
        "--plot",
        metavar="FILE",
        help="write a PNG of prefill and decode times (needs matplotlib: pip install 'pyqkv[bench]')",
    )
    a = p.parse_args(argv)
    if a.plot:  # before measuring: minutes of timing must not end in an ImportError
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("--plot needs matplotlib: pip install 'pyqkv[bench]' (or pip install matplotlib)", file=sys.stderr)
            return 1
    result = run(a.seq, a.context, a.batch, a.reps, a.steps, memory=not a.no_memory, with_compile=a.compile)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {a.json}")
    if a.plot:
        plot(result, a.plot)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
