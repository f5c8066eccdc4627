"""`python -m pyqkv` / `pyqkv`: the demo: a GPT-2-small-shaped layer with random weights checked against the
reference, a head ablation, the pattern, decoding with a KVCache, the same on a whole (small, random) Hugging
Face model, and a short timing table. Nothing is downloaded.
`pyqkv bench [...]`: the benchmark table (see pyqkv/bench.py, `pyqkv bench --help`).
`pyqkv bench-model [...]`: a whole GPT-2-small-shaped model against Hugging Face and TransformerLens
(pyqkv/bench_model.py)."""

from __future__ import annotations

import sys

import torch

COMMANDS = ("demo", "bench", "bench-model")
USAGE = "usage: pyqkv [-h] [demo | bench [...] | bench-model [...]]"


def demo(timing_seq=(128, 512), timing_batch=4, reps=7) -> int:
    from pyqkv import KVCache, bench, reference

    torch.manual_seed(0)
    w = bench.LayerWeights.random(**bench.GPT2_SMALL)
    bridge = w.bridge()
    H, Dh = w.n_heads, w.d_head
    B, S, D = 2, 64, w.W_qkv.shape[0]
    x = torch.randn(B, S, D)
    print(f"pyqkv demo: GPT-2-small-shaped attention layer (D={D}, H={H}, Dh={Dh}), random weights, x {list(x.shape)}")

    # 1. Forward, checked against the pure-PyTorch reference (materialized scores and pattern, float64).
    with torch.no_grad():
        out = bridge(x)
        q, k, v = (x @ W + b for W, b in zip(w.W_qkv.split(D, 1), w.b_qkv.split(D)))
        z_ref, _, _ = reference.attention(*(t.view(B, S, H, Dh) for t in (q, k, v)), scale=Dh**-0.5, causal=True)
        out_ref = z_ref.reshape(B, S, D) @ w.W_out + w.b_out
    err = (out - out_ref).abs().max().item()
    print(f"\n1. forward: out {list(out.shape)}; max |bridge - reference| = {err:.2e}")

    # 2. Head ablation through hook_z: zero head 5's z; the change equals head 5's share of the output.
    head = 5

    def ablate(z, hook):  # z: [B, S, H, Dh]
        z[:, :, head] = 0

    with torch.no_grad():
        ablated = bridge.run_with_hooks(x, fwd_hooks=[("hook_z", ablate)])
        _, cache = bridge.run_with_cache(x, names_filter=["hook_z"])
        head_share = cache["hook_z"][:, :, head] @ bridge.W_O[head]
    change = (out - ablated).abs().max().item()
    share_err = ((out - ablated) - head_share).abs().max().item()
    print(
        f"2. ablating head {head} at hook_z moves the output by up to {change:.3f}; "
        f"it equals z[:, :, {head}] @ W_O[{head}] within {share_err:.1e}"
    )

    # 3. The attention pattern from run_with_cache (the pattern is only built because it was asked for).
    with torch.no_grad():
        _, cache = bridge.run_with_cache(x, names_filter=["hook_pattern", "hook_attn_scores"])
    pattern = cache["hook_pattern"]
    rows = pattern.sum(-1)
    print(
        f"3. hook_pattern {list(pattern.shape)}; rows sum to 1 within {(rows - 1).abs().max().item():.1e}; "
        f"upper triangle (future keys) max = {pattern.triu(1).abs().max().item():.1f}"
    )
    print("   head 0, first 6 queries x 6 keys:")
    for i in range(6):
        print("   " + " ".join(f"{p:5.2f}" for p in pattern[0, 0, i, :6].tolist()))

    # 4. Decoding with a KVCache equals the full-sequence forward.
    with torch.no_grad():
        cache_kv = KVCache()
        steps = [bridge(x[:, :48], kv_cache=cache_kv)] + [
            bridge(x[:, t : t + 1], kv_cache=cache_kv) for t in range(48, S)
        ]
    dec_err = (torch.cat(steps, dim=1) - out).abs().max().item()
    print(
        f"4. prefill 48 + 16 single-token steps through a KVCache (capacity {cache_kv.capacity}) equals the "
        f"full forward within {dec_err:.1e}"
    )

    # 5. The headline workflow on a whole Hugging Face model (a small random GPT-2: nothing is downloaded).
    hf_ok = hf_workflow()

    # 6. A short timing table against the reference system's way of computing the layer.
    print("\n6. timing, float32, 2 untimed warm-up rounds then the median of interleaved rounds")
    print("   (`pyqkv bench` gives the full table). Rows: the Bridge with nothing hooked; the Bridge with a")
    print("   read-only hook_pattern (the pattern is written, no second attention); 'reference' computes the")
    print("   layer as TransformerLens's bridge does (three GEMMs, materialized [B,H,S,K] scores and pattern);")
    print("   'torch fused' is PyTorch's best path (addmm + scaled_dot_product_attention + addmm).")
    rows_fns = bench.prefill_rows(w)
    names = [
        "pyqkv fast path",
        "pyqkv + read-only hook_pattern",
        "reference (materialized)",
        "torch fused (addmm+SDPA)",
    ]
    table = []
    for s in timing_seq:
        xs = torch.randn(timing_batch, s, D)
        spread = bench.time_interleaved({n: rows_fns[n] for n in names}, (xs,), reps=reps)
        ref = spread["torch fused (addmm+SDPA)"].median
        for n in names:
            sp = spread[n]
            table.append(
                [
                    f"S={s}",
                    n,
                    f"{sp.median * 1e3:.2f}",
                    f"{sp.min * 1e3:.2f} - {sp.max * 1e3:.2f}",
                    f"{sp.median / ref:.2f}x" + (" (noisy)" if sp.noisy else ""),
                ]
            )
    print(
        bench.format_table(["size", f"row (batch {timing_batch})", "median ms", "min - max", "vs torch fused"], table)
    )

    ok = err < 1e-4 and share_err < 1e-4 and dec_err < 1e-4 and hf_ok
    print("\ndemo", "OK" if ok else "FAILED: a check above did not hold")
    return 0 if ok else 1


def hf_workflow() -> bool:
    """attach on a small random GPT-2, a head ablation at hook_z checked against Hugging Face with that
    head's slice of c_proj zeroed by hand, and every layer's pattern from run_with_cache."""
    try:
        import transformers
    except ImportError:
        print("\n5. (skipped: the Hugging Face part needs transformers: pip install 'pyqkv[hf]')")
        return True
    import pyqkv

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=128, n_head=4, n_layer=4, vocab_size=1000, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 1000, (2, 16))
    layer, head, Dh = 2, 1, 128 // 4
    with torch.no_grad():
        clean = model(ids).logits

        def zero_head_input(module, args):  # HF by hand: zero the head's slice of c_proj's input
            z = args[0].clone()
            z[..., head * Dh : (head + 1) * Dh] = 0
            return (z,)

        handle = model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero_head_input)
        by_hand = model(ids).logits
        handle.remove()

        h = pyqkv.hf.attach(model)  # every GPT2Attention becomes a Bridge, in place, sharing its weights
        attached = model(ids).logits

        def ablate(z, hook):  # z: [B, S, H, Dh]
            z[:, :, head] = 0

        ablated = h.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])  # the logits, as TL
        _, cache = h.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_pattern"))
        pyqkv.hf.detach(model)
    same = (attached - clean).abs().max().item()
    abl = (ablated - by_hand).abs().max().item()
    patterns = [cache[f"blocks.{i}.attn.hook_pattern"] for i in range(4)]
    print(
        f"\n5. pyqkv.hf.attach on a random 4-layer GPT-2 (HF {transformers.__version__}): logits equal HF's within {same:.1e};"
    )
    print(
        f"   zeroing head {head} of layer {layer} at hook_z equals HF with that head zeroed by hand within {abl:.1e};"
    )
    print(f"   run_with_cache gave {len(patterns)} patterns of shape {list(patterns[0].shape)} ([B, H, S, K])")
    return same < 1e-4 and abl < 1e-4 and all(p.shape == (2, 4, 16, 16) for p in patterns)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from pyqkv import bench

        return bench.main(argv[1:])
    if argv and argv[0] == "bench-model":
        from pyqkv import bench_model

        return bench_model.main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] != "demo":
        # An unknown command is an error, said on stderr with the usage (exit 2, as argparse does).
        print(
            f"{USAGE}\npyqkv: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr
        )
        return 2
    return demo()


if __name__ == "__main__":
    sys.exit(main())
