"""Model-level benchmark: a whole model with random weights, side by side in one process, medians of
interleaved rounds and ratios. On the CPU (the default): GPT-2-small-shaped (12 layers, D = 768, H = 12),
float32, B = 2, S = 512. On a GPU (`--device cuda`, what `make gpu-check` runs): a Pythia-1.4B-shaped
GPT-NeoX (24 layers, D = 2048, H = 16) and a Llama-shaped GQA model of similar size (16 layers, D = 2048,
H = 32, Hkv = 8), bfloat16, with the generate rows.

Rows:
- "HF sdpa": the unattached model with attn_implementation="sdpa", nothing asked for (the baseline of
  the unhooked rows);
- "pyqkv attached": the same model attached with pyqkv.hf.attach, nothing hooked;
- "HF eager + output_attentions": every layer's pattern, the way Hugging Face gives it;
- "TransformerLens bridge run_with_cache": TransformerLens's TransformerBridge (the reference system)
  caching every layer's hook_pattern; only when transformer_lens can be imported (`make bench-model`
  installs it into build/bench-peers);
- "pyqkv run_with_cache": the attached model caching every layer's hook_pattern.
With --generate N: greedy generation of N new tokens (tokens/s) by HF sdpa, by the attached model with
nothing hooked, and with a hook_z head ablation on every layer (pyqkv.zero_heads).
With --overhead [FAMILY ...] (from a checkout): the overhead-bound decode of bench/overhead.py (16 layers,
hidden 64, batch 1, greedy), its rows against HF sdpa.
Peak MB: on the CPU the extra resident memory of one call, measured in a fresh process that builds that
row alone, with its high-water mark reset just before the call (pyqkv.bench.call_peak_kib; what the row
returns, patterns or logits, counts); on a GPU torch.cuda.max_memory_allocated over one call, above what
was allocated before it. `--shape tiny` (2 layers, hidden 32, 1000-token vocabulary) checks the
benchmark itself quickly: at S = 3072 its patterns are 288 MiB (S = 3136: 300 MiB).

    python -m pyqkv bench-model [--batch 2] [--seq 512] [--reps 5] [--json FILE]
    python -m pyqkv bench-model --device cuda --dtype bfloat16 --shape pythia-1.4b --batch 8 --seq 2048 --generate 256
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import tempfile
from typing import Optional

import torch

from pyqkv.bench import _peak_mb_in_child, format_table, time_interleaved

VOCAB = 50257
SHAPES = {  # name: (transformers config class, its arguments); vocabulary 50257 unless the arguments say
    "gpt2-small": (
        "GPT2Config",
        dict(n_layer=12, n_head=12, n_embd=768, n_positions=4096, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    ),
    "pythia-1.4b": (
        "GPTNeoXConfig",
        dict(
            num_hidden_layers=24,
            hidden_size=2048,
            num_attention_heads=16,
            intermediate_size=8192,
            max_position_embeddings=4096,
        ),
    ),
    # A small model for quick checks of the benchmark itself: long sequences cost memory (patterns,
    # L * B * H * S * S) long before they cost time, and a small vocabulary keeps the logits small.
    "tiny": (
        "GPT2Config",
        dict(
            n_layer=2,
            n_head=4,
            n_embd=32,
            n_positions=4096,
            vocab_size=1000,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        ),
    ),
    "llama-gqa-1b": (
        "LlamaConfig",
        dict(
            num_hidden_layers=16,
            hidden_size=2048,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=8192,
            max_position_embeddings=4096,
        ),
    ),
}


def _config(shape: str, layers=None):
    import transformers

    cls, kw = SHAPES[shape]
    kw = {"vocab_size": VOCAB, **kw}
    if layers is not None:
        kw["n_layer" if cls == "GPT2Config" else "num_hidden_layers"] = layers
    cfg = getattr(transformers, cls)(bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)
    cfg._attn_implementation = "eager"
    return cfg


def _tiny_tokenizer(directory: str, vocab: int):
    """A word-level tokenizer saved to `directory` (TransformerLens's bridge wants one; it is never used
    here: the rows take token ids)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="t0", pad_token="t0", bos_token="t0", eos_token="t0"
    )
    fast.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


def have_transformer_lens() -> bool:
    try:
        import transformer_lens.model_bridge  # noqa: F401
    except Exception:
        return False
    return True


def rows(
    layers=None,
    seed: int = 0,
    shape: str = "gpt2-small",
    device="cpu",
    dtype=torch.float32,
    generate: int = 0,
    names=None,
) -> dict:
    """Row name -> callable(ids). Each kind of row (HF sdpa, HF eager, attached, TransformerLens) has its
    own copy of one random model. names: build only these rows (None: all), so that a process measuring
    one row's memory holds nothing of the others."""
    import transformers

    import pyqkv

    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_config(_config(shape, layers)).to(device=device, dtype=dtype).eval()
    copies = {}

    def model(kind: str):
        """(model, handle): the row kind's copy of base, made on first use; the handle of "attached"."""
        if kind not in copies:
            m = copy.deepcopy(base)
            if kind == "sdpa":
                m.config._attn_implementation = "sdpa"
            copies[kind] = (m, pyqkv.hf.attach(m) if kind == "attached" else None)
        return copies[kind]

    def patterns(h):
        return lambda ids: h.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))[1]

    # name: (the copy it runs on, fn(model, handle) -> the row's callable)
    makers = {
        "HF sdpa": ("sdpa", lambda m, h: lambda ids: m(ids).logits),
        "pyqkv attached": ("attached", lambda m, h: lambda ids: m(ids).logits),
        "HF eager + output_attentions": ("eager", lambda m, h: lambda ids: m(ids, output_attentions=True).attentions),
        "pyqkv run_with_cache": ("attached", lambda m, h: patterns(h)),
    }
    if generate:
        kw = dict(max_new_tokens=generate, min_new_tokens=generate, do_sample=False, pad_token_id=0)

        def ablated(m, h):
            ablate = [(f"blocks.{i}.attn.hook_z", pyqkv.zero_heads([0])) for i in range(len(h.bridges))]

            def run(ids):
                with h.hooks(fwd_hooks=ablate):
                    return m.generate(ids, **kw)

            return run

        makers["generate: HF sdpa"] = ("sdpa", lambda m, h: lambda ids: m.generate(ids, **kw))
        makers["generate: pyqkv"] = ("attached", lambda m, h: lambda ids: m.generate(ids, **kw))
        makers["generate: pyqkv + hook_z ablation"] = ("attached", ablated)
    if have_transformer_lens():
        makers["TransformerLens bridge run_with_cache"] = (None, lambda m, h: _transformer_lens_row(base))
    if names is not None:
        unknown = sorted(set(names) - set(makers))
        if unknown:
            raise ValueError(f"names: expected row names among {sorted(makers)}, got unknown {unknown}")
    return {
        name: make(*(model(kind) if kind else (None, None)))
        for name, (kind, make) in makers.items()
        if names is None or name in names
    }


def _transformer_lens_row(base):
    """TransformerLens's TransformerBridge (the reference system) on a copy of base, caching every
    layer's hook_pattern."""
    from transformer_lens.model_bridge import TransformerBridge

    directory = tempfile.mkdtemp(prefix="pyqkv-bench-tl-")
    tok = _tiny_tokenizer(directory, base.config.vocab_size)
    base.config.save_pretrained(directory)
    tl = TransformerBridge.boot_transformers(directory, hf_model=copy.deepcopy(base), tokenizer=tok)
    return lambda ids: tl.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))[1]


def check_rows_agree(fns: dict, ids) -> float:
    """Every row computes the same model: the max |difference| of their logits / patterns (a sanity check
    of the benchmark itself; the tests check pyqkv against Hugging Face)."""
    with torch.inference_mode():
        ref_logits = fns["HF sdpa"](ids)
        worst = (fns["pyqkv attached"](ids) - ref_logits).abs().max().item()
        ref_patterns = fns["HF eager + output_attentions"](ids)
        for name in ("pyqkv run_with_cache", "TransformerLens bridge run_with_cache"):
            if name in fns:
                cache = fns[name](ids)
                for i, p in enumerate(ref_patterns):
                    worst = max(worst, (cache[f"blocks.{i}.attn.hook_pattern"].float() - p.float()).abs().max().item())
    return worst


def _synced(fn, device):
    """fn followed by a device synchronize, so wall-clock timing sees the GPU's work."""
    if torch.device(device).type != "cuda":
        return fn

    def call(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return call


def peak_memory_mb(row: str, B: int, S: int, layers, shape: str) -> Optional[float]:
    """Extra peak resident memory (MB) of one call of `row`, in a fresh process that builds that row alone
    (pyqkv.bench.call_peak_kib: the high-water mark reset just before the call); None where the kernel
    cannot measure it."""
    code = (
        "import torch; from pyqkv import bench, bench_model; "
        f"fns = bench_model.rows({layers!r}, shape={shape!r}, names=[{row!r}]); "
        f"ids = torch.randint(0, bench_model._config({shape!r}).vocab_size, ({B}, {S})); "
        f"fn = fns[{row!r}]; fn(ids[:, :8]); print(bench.call_peak_kib(fn, ids))"
    )
    return _peak_mb_in_child(code)


def cuda_peak_mb(fn, args) -> float:
    """torch.cuda.max_memory_allocated over one call, above what was allocated before it (MB)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        fn(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run(
    batch=2,
    seq=512,
    reps=5,
    layers=None,
    memory=True,
    quiet=False,
    shape="gpt2-small",
    device="cpu",
    dtype=torch.float32,
    generate=0,
    generate_batches=(1, 16),
    prompt=32,
) -> dict:
    say = (lambda *a: None) if quiet else print
    fns = rows(layers, shape=shape, device=device, dtype=dtype, generate=generate)
    g = torch.Generator().manual_seed(1)
    vocab = _config(shape, layers).vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    agree = check_rows_agree(fns, ids)
    forward = {n: _synced(f, device) for n, f in fns.items() if not n.startswith("generate")}
    spread: dict = time_interleaved(forward, (ids,), reps=reps)
    if not memory:
        mem = {}
    elif torch.device(device).type == "cuda":
        mem = {name: cuda_peak_mb(fn, (ids,)) for name, fn in forward.items()}
    else:
        mem = {name: peak_memory_mb(name, batch, seq, layers, shape) for name in forward}
    entry = {}
    for name, sp in spread.items():
        base = spread["HF sdpa"] if name in ("HF sdpa", "pyqkv attached") else spread["HF eager + output_attentions"]
        entry[name] = {
            "median_ms": sp.median * 1e3,
            "min_ms": sp.min * 1e3,
            "max_ms": sp.max * 1e3,
            "noisy": sp.noisy,
            "vs_baseline": sp.median / base.median,
            "peak_mb": mem.get(name),
        }
    summary = {
        "unhooked_vs_hf_sdpa": spread["pyqkv attached"].median / spread["HF sdpa"].median,
        "run_with_cache_patterns_vs_hf_eager": spread["HF eager + output_attentions"].median
        / spread["pyqkv run_with_cache"].median,  # a speedup: > 1 is faster than HF eager
    }
    tl = "TransformerLens bridge run_with_cache"
    if tl in spread:
        summary["run_with_cache_patterns_vs_transformer_lens"] = (
            spread[tl].median / spread["pyqkv run_with_cache"].median
        )
    eager_mb, ours_mb = mem.get("HF eager + output_attentions"), mem.get("pyqkv run_with_cache")
    if eager_mb and ours_mb is not None:  # (None: not measurable here; tiny sizes can stay below a page)
        summary["peak_memory_patterns_vs_hf_eager"] = ours_mb / eager_mb
    generation = {}
    if generate:
        gen = {n: _synced(f, device) for n, f in fns.items() if n.startswith("generate")}
        for B in generate_batches:
            p_ids = torch.randint(0, vocab, (B, prompt), generator=g).to(device)
            sp = time_interleaved(gen, (p_ids,), reps=max(1, reps // 2), warmup=1)
            generation[B] = {n: {"tokens_per_s": B * generate / x.median, "median_s": x.median} for n, x in sp.items()}
        base = "generate: HF sdpa"
        summary["generate_tokens_per_s_vs_hf_sdpa"] = min(
            r["generate: pyqkv"]["tokens_per_s"] / r[base]["tokens_per_s"] for r in generation.values()
        )
        summary["generate_hooked_vs_hf_sdpa"] = min(
            r["generate: pyqkv + hook_z ablation"]["tokens_per_s"] / r[base]["tokens_per_s"]
            for r in generation.values()
        )
    n_layers = _config(shape, layers).num_hidden_layers
    say(
        f"{shape}-shaped model ({n_layers} layers), random weights, {str(dtype)[6:]} on {device}, batch {batch}, S={seq}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; rows agree within {agree:.1e}"
    )
    table = [
        [
            name,
            f"{e['median_ms']:.0f}",
            f"{e['min_ms']:.0f} - {e['max_ms']:.0f}" + (" noisy" if e["noisy"] else ""),
            f"{e['vs_baseline']:.2f}x",
            "-" if e["peak_mb"] is None else f"{e['peak_mb']:.0f}",
        ]
        for name, e in entry.items()
    ]
    say(format_table(["row", "median ms", "min - max", "vs HF (sdpa / eager)", "peak MB"], table))
    for B, r in generation.items():
        say(
            f"generate {generate} tokens after a {prompt}-token prompt, batch {B}: "
            + ", ".join(f"{n[10:]} {x['tokens_per_s']:.0f} tok/s" for n, x in r.items())
        )
    say("summary: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    if memory and None in mem.values():
        say("(peak MB -: this kernel does not let a process reset its memory high-water mark, /proc/self/clear_refs)")
    if tl not in spread:
        say("(no TransformerLens row: transformer_lens is not importable; `make bench-model` provides it)")
    return {
        "config": dict(
            shape=shape,
            batch=batch,
            seq=seq,
            layers=n_layers,
            dtype=str(dtype)[6:],
            device=str(device),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
            gpu=torch.cuda.get_device_name() if torch.device(device).type == "cuda" else None,
        ),
        "rows": entry,
        "generate": generation,
        "summary": summary,
        "rows_agree": agree,
    }


@functools.lru_cache(maxsize=1)
def _overhead_module():
    """bench/overhead.py of this checkout (the overhead-bound decode's rows live there, once), imported by
    path: it is not part of the installed package."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "overhead.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"--overhead: expected bench/overhead.py of a pyqkv checkout at {path} (it is not installed with the "
            "package); run from a checkout"
        )
    spec = importlib.util.spec_from_file_location("pyqkv_bench_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overhead_decode(families=("gpt2", "llama"), new_tokens=64, reps=15, prompt=8, quiet=False) -> dict:
    """The overhead-bound decode (16 layers, hidden 64, 4 heads, batch 1, greedy: almost all of a step is
    per-call cost) with bench/overhead.py's rows (HF sdpa and its twin, attach and the interface tier, each
    with and without one editing hook_z hook), timed as the other rows here: medians of interleaved rounds,
    ratios to HF sdpa. Result: {family: {row: {median_ms, min_ms, max_ms, noisy, vs_hf_sdpa}}}."""
    say = (lambda *a: None) if quiet else print
    overhead = _overhead_module()
    say(
        f"\noverhead-bound decode: batch 1, {prompt}-token prompt, {new_tokens} new tokens, greedy "
        f"(bench/overhead.py's rows); medians of {reps} interleaved rounds"
    )
    result = {}
    for family in families:
        fns = overhead.build_rows(family, new_tokens)
        ids = torch.randint(1, 1000, (1, prompt), generator=torch.Generator().manual_seed(1))
        spread = time_interleaved(fns, (ids,), reps=reps, warmup=1)
        base = spread["HF sdpa"].median
        result[family] = {
            name: {
                "median_ms": sp.median * 1e3,
                "min_ms": sp.min * 1e3,
                "max_ms": sp.max * 1e3,
                "noisy": sp.noisy,
                "vs_hf_sdpa": sp.median / base,
            }
            for name, sp in spread.items()
        }
        table = [
            [
                f"{family}: {name}",
                f"{e['median_ms']:.1f}",
                f"{e['min_ms']:.1f} - {e['max_ms']:.1f}" + (" noisy" if e["noisy"] else ""),
                f"{e['vs_hf_sdpa']:.2f}x",
            ]
            for name, e in result[family].items()
        ]
        say(format_table(["row", "median ms", "min - max", "vs HF sdpa"], table))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="pyqkv bench-model",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=["gpt2-small"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--reps", type=int, default=5, help="interleaved rounds")
    p.add_argument("--generate", type=int, default=0, help="new tokens per generate row (0: no generate rows)")
    p.add_argument("--generate-batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--no-memory", action="store_true", help="skip peak memory")
    p.add_argument(
        "--overhead",
        nargs="*",
        metavar="FAMILY",
        help="add the overhead-bound decode rows of bench/overhead.py for these families (none named: gpt2 llama)",
    )
    p.add_argument("--overhead-tokens", type=int, default=64, help="new tokens per overhead-bound decode row")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    a = p.parse_args(argv)
    overhead = None
    if a.overhead is not None:  # before measuring: minutes of timing must not end in a missing file
        try:
            overhead = _overhead_module()
        except FileNotFoundError as e:
            print(e, file=sys.stderr)
            return 1
        unknown = sorted(set(a.overhead) - set(overhead.FAMILIES))
        if unknown:
            p.error(f"--overhead: expected families among {sorted(overhead.FAMILIES)}, got {unknown}")
    results = {}
    for shape in a.shape:
        results[shape] = run(
            a.batch,
            a.seq,
            a.reps,
            a.layers,
            memory=not a.no_memory,
            shape=shape,
            device=a.device,
            dtype=getattr(torch, a.dtype),
            generate=a.generate,
            generate_batches=a.generate_batch,
        )
    if overhead is not None:
        families = a.overhead or list(overhead.FAMILIES)
        results["overhead-decode"] = overhead_decode(families, a.overhead_tokens, reps=max(a.reps, 3))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results if len(results) > 1 else next(iter(results.values())), f, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
