"""Where per-call cost dominates: overhead-bound greedy decode of small models, pyqkv against HF sdpa.

A 16-layer model with hidden size 64 and 4 heads spends almost all of a decode step in Python (module
calls, cache bookkeeping, argument checks), so this measures what pyqkv adds per layer per step. Rows, one
random model copied into each, side by side in one process (medians of interleaved rounds, ratios to HF
sdpa's time):

- "HF sdpa": the model as Hugging Face runs it (attn_implementation="sdpa");
- "HF sdpa twin": a second copy of that model, nothing changed: the noise floor of the machine (two equal
  rows differ by this much);
- "attach": pyqkv.hf.attach(model), nothing hooked;
- "attach + hook_z edit": the same with one editing hook (zero head 0 at blocks.0.attn.hook_z);
- "interface": attn_implementation="pyqkv" (pyqkv.hf.enable), nothing hooked;
- "interface + hook_z edit": the same with the one editing hook.

    python bench/overhead.py [--families gpt2 llama] [--reps 15] [--new-tokens 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FAMILIES = {
    "gpt2": ("GPT2Config", dict(n_layer=16, n_embd=64, n_head=4, n_positions=512, vocab_size=1000)),
    "llama": (
        "LlamaConfig",
        dict(
            num_hidden_layers=16,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=128,
            max_position_embeddings=512,
            vocab_size=1000,
        ),
    ),
}


def build_rows(family: str, new_tokens: int) -> dict:
    import transformers

    import pyqkv
    import pyqkv.hf

    cls, kw = FAMILIES[family]
    cfg = getattr(transformers, cls)(bos_token_id=0, eos_token_id=None, pad_token_id=0, **kw)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    edit = [("blocks.0.attn.hook_z", pyqkv.zero_heads([0]))]

    attached = copy.deepcopy(base)
    h_attach = pyqkv.hf.attach(attached)
    routed = copy.deepcopy(base)
    h_iface = pyqkv.hf.enable(routed)

    def hooked(handle, model):
        def run(ids):
            with handle.hooks(fwd_hooks=edit):
                return model.generate(ids, **gen)

        return run

    twin = copy.deepcopy(base)
    return {
        "HF sdpa": lambda ids: base.generate(ids, **gen),
        "HF sdpa twin": lambda ids: twin.generate(ids, **gen),
        "attach": lambda ids: attached.generate(ids, **gen),
        "attach + hook_z edit": hooked(h_attach, attached),
        "interface": lambda ids: routed.generate(ids, **gen),
        "interface + hook_z edit": hooked(h_iface, routed),
    }


def time_rows(fns: dict, ids, reps: int) -> dict:
    names = list(fns)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up
            fns[n](ids)
        for r in range(reps):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                fns[n](ids)
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    results = {}
    print(
        f"overhead-bound decode: batch 1, {a.prompt}-token prompt, {a.new_tokens} new tokens, greedy; "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; medians of {a.reps} interleaved rounds"
    )
    for family in a.families:
        fns = build_rows(family, a.new_tokens)
        ids = torch.randint(1, 1000, (1, a.prompt), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            ref = fns["HF sdpa"](ids)
            for n in ("attach", "interface", "HF sdpa twin"):
                if not torch.equal(fns[n](ids), ref):
                    print(f"warning: {family} {n} generated other tokens than HF sdpa")
        med = time_rows(fns, ids, a.reps)
        base = med["HF sdpa"]
        results[family] = {n: {"median_ms": t * 1e3, "vs_hf_sdpa": t / base} for n, t in med.items()}
        print(f"\n{family} (16 layers, hidden 64, 4 heads)")
        print(f"{'row':<26}{'median ms':>10}{'vs HF sdpa':>12}{'us/layer/step over HF':>24}")
        for n, t in med.items():
            per = (t - base) / (16 * a.new_tokens) * 1e6
            print(f"{n:<26}{t * 1e3:>10.1f}{t / base:>11.2f}x{per:>24.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
