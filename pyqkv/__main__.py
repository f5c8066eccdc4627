"""`python -m pyqkv` / `pyqkv`: the demo on a GPT-2-small-shaped layer with random weights (nothing is
downloaded). `pyqkv bench [...]`: the benchmark table (see pyqkv/bench.py, `pyqkv bench --help`)."""

from __future__ import annotations

import sys

import torch


def demo(timing_seq=(128, 512), timing_batch=4, reps=5) -> int:
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
    print(f"2. ablating head {head} at hook_z moves the output by up to {change:.3f}; "
          f"it equals z[:, :, {head}] @ W_O[{head}] within {share_err:.1e}")

    # 3. The attention pattern from run_with_cache (the pattern is only built because it was asked for).
    with torch.no_grad():
        _, cache = bridge.run_with_cache(x, names_filter=["hook_pattern", "hook_attn_scores"])
    pattern = cache["hook_pattern"]
    rows = pattern.sum(-1)
    print(f"3. hook_pattern {list(pattern.shape)}; rows sum to 1 within {(rows - 1).abs().max().item():.1e}; "
          f"upper triangle (future keys) max = {pattern.triu(1).abs().max().item():.1f}")
    print("   head 0, first 6 queries x 6 keys:")
    for i in range(6):
        print("   " + " ".join(f"{p:5.2f}" for p in pattern[0, 0, i, :6].tolist()))

    # 4. Decoding with a KVCache equals the full-sequence forward.
    with torch.no_grad():
        cache_kv = KVCache()
        steps = [bridge(x[:, :48], kv_cache=cache_kv)] + [bridge(x[:, t : t + 1], kv_cache=cache_kv) for t in range(48, S)]
    dec_err = (torch.cat(steps, dim=1) - out).abs().max().item()
    print(f"4. prefill 48 + 16 single-token steps through a KVCache (capacity {cache_kv.capacity}) equals the "
          f"full forward within {dec_err:.1e}")

    # 5. A short timing table against the reference system's way of computing the layer.
    print("\n5. timing (median of interleaved runs; `pyqkv bench` gives the full table):")
    rows_fns = bench.prefill_rows(w)
    names = ["pyqkv fast path", "pyqkv + read-only hook_pattern", "reference (materialized)", "torch fused (addmm+SDPA)"]
    table = []
    for s in timing_seq:
        xs = torch.randn(timing_batch, s, D)
        med = bench.time_interleaved({n: rows_fns[n] for n in names}, (xs,), reps=reps)
        for n in names:
            table.append([f"S={s}", n, f"{med[n] * 1e3:.2f}", f"{med[n] / med['reference (materialized)']:.2f}x"])
    print(bench.format_table(["size", f"row (batch {timing_batch}, float32)", "median ms", "vs reference"], table))

    ok = err < 1e-4 and share_err < 1e-4 and dec_err < 1e-4
    print("\ndemo", "OK" if ok else "FAILED: an error above is larger than 1e-4")
    return 0 if ok else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from pyqkv import bench

        return bench.main(argv[1:])
    if argv and argv[0] not in ("demo",):
        print(__doc__)
        return 0 if argv[0] in ("-h", "--help") else 2
    return demo()


if __name__ == "__main__":
    sys.exit(main())
