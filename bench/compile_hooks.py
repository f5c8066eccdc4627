"""Hooks under torch.compile: what caching or editing activations costs in a compiled model.

One random model (GPT-2 or Llama shape, a few layers), side by side in one process, medians of
interleaved rounds, each row's time as a ratio to the compiled unhooked model:

- "HF sdpa eager" / "HF sdpa compiled": the model as Hugging Face runs it, without and with torch.compile;
- "attach compiled": pyqkv.hf.attach(model), h.compile(fullgraph=True), nothing hooked;
- "attach compiled + run_with_cache hook_z": every layer's hook_z cached (the SAE / probing workload);
- "attach compiled + hook_z edit": one editing hook (zero head 0 of layer 0's hook_z);
- "attach eager + run_with_cache hook_z": the same cache without compiling (what compiling buys).

Every compiled row is compiled and warmed up before timing, and checked against its eager twin.

    python bench/compile_hooks.py [--family gpt2|llama] [--layers 4] [--d-model 256] [--batch 4] [--seq 128]
                                  [--reps 15] [--backend inductor] [--json FILE]
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


def build(family: str, layers: int, d_model: int):
    import transformers

    heads = max(1, d_model // 64)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=layers, n_embd=d_model, n_head=heads, n_positions=1024, vocab_size=1000)
    else:
        cfg = transformers.LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=d_model,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=4 * d_model,
            max_position_embeddings=1024,
            vocab_size=1000,
        )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import pyqkv.hf

    base = build(args.family, args.layers, args.d_model)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    z_names = [f"blocks.{i}.attn.hook_z" for i in range(args.layers)]

    def zero_head(z, hook):
        z[:, :, 0] = 0

    hf_eager = base
    hf_compiled = copy.deepcopy(base)
    hf_compiled.compile(fullgraph=True, backend=args.backend)
    attached = copy.deepcopy(base)
    h = pyqkv.hf.attach(attached)
    eager_attached = copy.deepcopy(base)
    h_eager = pyqkv.hf.attach(eager_attached)
    h.compile(fullgraph=True, backend=args.backend)

    rows = {
        "HF sdpa eager": lambda: hf_eager(ids, use_cache=False).logits,
        "HF sdpa compiled": lambda: hf_compiled(ids, use_cache=False).logits,
        "attach compiled": lambda: attached(ids, use_cache=False).logits,
        "attach compiled + run_with_cache hook_z": lambda: h.run_with_cache(ids, names_filter=z_names, use_cache=False),
        "attach compiled + hook_z edit": lambda: (  # the logits (return_type="logits")
            h.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)], use_cache=False)
        ),
        "attach eager + run_with_cache hook_z": lambda: h_eager.run_with_cache(
            ids, names_filter=z_names, use_cache=False
        ),
    }
    with torch.no_grad():
        # Compile and warm every row (the compiled ones compile here, once per hook set), then check.
        warm = {name: fn() for name, fn in rows.items()}
        ref_logits = warm["HF sdpa eager"]
        for name in ("HF sdpa compiled", "attach compiled"):
            torch.testing.assert_close(warm[name], ref_logits, rtol=1e-4, atol=1e-4, msg=name)
        out_c, cache_c = warm["attach compiled + run_with_cache hook_z"]
        out_e, cache_e = warm["attach eager + run_with_cache hook_z"]
        for name in z_names:
            torch.testing.assert_close(cache_c[name], cache_e[name], rtol=1e-4, atol=1e-4, msg=name)
        times = {name: [] for name in rows}
        for _ in range(args.reps):
            for name, fn in rows.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    ref = med["attach compiled"]
    result = {
        "config": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": {
            name: {"median_ms": round(1e3 * m, 3), "vs_attach_compiled": round(m / ref, 3)} for name, m in med.items()
        },
    }
    width = max(map(len, rows))
    print(f"{args.family}, {args.layers} layers, d_model {args.d_model}, B={args.batch}, S={args.seq}, {args.backend}")
    for name, r in result["rows"].items():
        print(f"  {name:<{width}}  {r['median_ms']:9.3f} ms  {r['vs_attach_compiled']:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
