"""Greedy generate of a small Mistral with a sliding window, pyqkv.hf.attach against HF sdpa.

Hugging Face's DynamicSlidingWindowLayer keeps the last window - 1 positions of each layer with a
torch.cat of the whole window per token. Attached layers keep it in sync with their own KVCache instead
(pyqkv/hf/hf_cache.py): a step appends its rows in place and drops the oldest by moving where the valid
positions start (KVCache.keep_last). Rows, one random model copied into each, side by side in one process
(medians of interleaved rounds, ratios to HF sdpa's time):

- "HF sdpa": the model as Hugging Face runs it (attn_implementation="sdpa");
- "HF sdpa twin": a second copy, nothing changed: the noise floor of the machine;
- "attach": pyqkv.hf.attach(model), nothing hooked, the window kept in sync;
- "attach, window reloaded (before)": the same attached model with the sliding layers handled as before
  this change: the new rows handed to HF's own update (its torch.cat), and the window loaded afresh into
  a new KVCache on the next step (the mirror's fallback for cache layers it does not keep in sync).

    python bench/window_generate.py [--window 1024] [--prompt 1024] [--new-tokens 32] [--batch 4]
                                    [--layers 4] [--reps 9] [--threads N] [--clock wall|cpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_rows(a) -> dict:
    import transformers

    import pyqkv
    import pyqkv.hf
    from pyqkv.hf import hf_cache

    cfg = transformers.MistralConfig(
        num_hidden_layers=a.layers,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=a.prompt + a.new_tokens + 8,
        sliding_window=a.window,
        vocab_size=1000,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    gen = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
    twin = copy.deepcopy(base)
    attached = copy.deepcopy(base)
    pyqkv.hf.attach(attached)
    kept_in_sync = hf_cache._kept_in_sync

    def as_before(layer, cache):
        return None if hf_cache._is_window(layer) else kept_in_sync(layer, cache)

    def reloaded(ids):
        hf_cache._kept_in_sync = as_before
        try:
            return attached.generate(ids, **gen)
        finally:
            hf_cache._kept_in_sync = kept_in_sync

    return {
        "HF sdpa": lambda ids: base.generate(ids, **gen),
        "HF sdpa twin": lambda ids: twin.generate(ids, **gen),
        "attach": lambda ids: attached.generate(ids, **gen),
        "attach, window reloaded (before)": reloaded,
    }


def main(argv=None) -> int:
    from pyqkv.bench import format_table, time_interleaved

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (on a machine shared with other work; best with --threads 1)",
    )
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if a.window >= a.prompt + a.new_tokens:
        p.error(f"--window: expected less than prompt + new tokens ({a.prompt + a.new_tokens}), got {a.window}")
    fns = build_rows(a)
    ids = torch.randint(1, 1000, (a.batch, a.prompt), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = fns["HF sdpa"](ids)
        for name, fn in fns.items():
            if not torch.equal(fn(ids), ref):
                print(f"warning: {name} generated other tokens than HF sdpa")
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    spread = time_interleaved(fns, (ids,), reps=a.reps, warmup=1, clock=clock)
    base = spread["HF sdpa"].median
    print(
        f"Mistral-shaped, {a.layers} layers, hidden 128, 4 heads (2 KV heads, Dh 32), sliding window {a.window}; "
        f"batch {a.batch}, {a.prompt}-token prompt, {a.new_tokens} new tokens, greedy, float32; "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; {a.clock} time, medians of {a.reps} "
        "interleaved rounds"
    )
    table = [
        [
            name,
            f"{sp.median * 1e3:.1f}",
            f"{sp.min * 1e3:.1f} - {sp.max * 1e3:.1f}" + (" noisy" if sp.noisy else ""),
            f"{sp.median / base:.2f}x",
        ]
        for name, sp in spread.items()
    ]
    print(format_table(["row", "median ms", "min - max", "vs HF sdpa"], table))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "config": {k: v for k, v in vars(a).items() if k != "json"}
                    | {"threads": torch.get_num_threads(), "torch": torch.__version__},
                    "rows": {
                        n: {"median_ms": sp.median * 1e3, "min_ms": sp.min * 1e3, "max_ms": sp.max * 1e3}
                        | {"vs_hf_sdpa": sp.median / base}
                        for n, sp in spread.items()
                    },
                },
                f,
                indent=2,
            )
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
