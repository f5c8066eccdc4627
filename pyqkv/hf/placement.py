"""Where a layer's weights live, and what that means for its Bridge: held and viewed (the default), or
called through the model's own projection modules when the Bridge cannot hold them.

- accelerate's CPU or disk offload keeps weights on the meta device between forwards and loads them in
  hooks around each module's own forward: the Bridge must call the module.
- a quantized or PEFT-wrapped projection (anything but a plain nn.Linear, a plain subclass of it, or Conv1D)
  computes its own output.
- transformers' tensor parallelism (tp_plan) shards the weights as DTensors and wraps each projection's
  forward with the communication: the Bridge calls the wrapped modules with this rank's head counts, and
  the row-parallel output projection all-reduces as it does without pyqkv.
A device map that only places whole blocks on devices needs none of this: the weights are real tensors
on their block's device, which the block's hook moves the inputs to.

Notation: H, Hkv heads (global), Dh head dim.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def _modules(spec):
    qkv = spec.qkv if isinstance(spec.qkv, tuple) else (spec.qkv,)
    return (*qkv, spec.out, *spec.bridge_modules.values())


def is_sharded(t) -> bool:
    return type(t).__name__ == "DTensor"


def delegation_reason(spec) -> Optional[str]:
    """Why the Bridge for `spec` must call its projection modules instead of holding their weights, or None."""
    for m in _modules(spec):
        hook = getattr(m, "_hf_hook", None)
        if getattr(hook, "offload", False) or any(getattr(h, "offload", False) for h in getattr(hook, "hooks", ())):
            return f"weights offloaded by accelerate ({type(m).__name__})"
        for name, p in m.named_parameters(recurse=False):
            if p.device.type == "meta":
                return f"weights on the meta device ({type(m).__name__}.{name}: offloaded, or not loaded)"
            if is_sharded(p):
                return "weights sharded by tensor parallelism"
    for m in (spec.qkv if isinstance(spec.qkv, tuple) else (spec.qkv,)) + (spec.out,):
        if not _plain_projection(m):
            return f"a {type(m).__name__} projection (quantized or wrapped), called as it is"
    return None


def _plain_projection(m: nn.Module) -> bool:
    """A projection whose output is `x @ W.T + b` of its own floating-point Parameter: nn.Linear and its
    plain subclasses (Falcon's FalconLinear), and HF's Conv1D. A quantized Linear subclass (bitsandbytes,
    torchao) carries its own Parameter or tensor subclass; a PEFT wrapper is no Linear at all; a
    parametrized weight (torch.nn.utils.parametrize) is computed, not held."""
    if not (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"):
        return False
    w = getattr(m, "weight", None)
    if type(w) is not nn.Parameter or not w.dtype.is_floating_point:
        return False
    return not hasattr(m, "parametrizations")


def d_model_of(spec) -> int:
    """D from the output projection's global weight shape (Linear [D, H*Dh], Conv1D [H*Dh, D])."""
    w = spec.out.weight
    return int(w.shape[1] if spec.conv1d else w.shape[0])


def local_heads(spec, n_heads: int, n_kv_heads: int, d_head: int, d_model: int):
    """(H_local, Hkv_local, heads, kv_heads): the head counts this rank's projections produce and the global
    indices they are, found by running the wrapped projections once on a one-token input (a collective
    under tensor parallelism: every rank attaches) and gathering the ranks' counts."""
    import torch.distributed as dist

    qkv = spec.qkv if isinstance(spec.qkv, tuple) else (spec.qkv,)
    some = next(p for m in qkv for p in m.parameters())
    local = some.to_local() if is_sharded(some) else some
    probe = torch.zeros(1, 1, d_model, dtype=local.dtype, device=local.device)
    with torch.no_grad():
        widths = [m(probe).shape[-1] for m in qkv]
    # Head indices below are whole heads counted over the ranks: a shard that cuts a head (or, fused, a query
    # group from its K and V heads) would be read as other heads than it holds, so it is refused.
    names = ("q", "k", "v") if len(qkv) == 3 else ("qkv",)
    for name, m, width in zip(names, qkv, widths):
        if width < 1 or width % d_head:
            raise ValueError(
                f"module: under tensor parallelism this rank's {name} projection ({type(m).__name__}) gives a shard "
                f"of {width} features, expected a positive multiple of the head size d_head={d_head} (whole heads "
                f"on each rank)"
            )
    ratio = n_heads // n_kv_heads
    if len(qkv) == 3:
        H, Hkv = widths[0] // d_head, widths[1] // d_head
        if widths[2] != widths[1] or H != Hkv * ratio:
            raise ValueError(
                f"module: under tensor parallelism this rank's shards give q {widths[0]}, k {widths[1]} and v "
                f"{widths[2]} features (head size d_head={d_head}), expected k and v of equal size and "
                f"n_heads/n_kv_heads = {ratio} query heads per KV head (whole query groups on each rank)"
            )
    else:
        groups = widths[0] // d_head  # H + 2 Hkv in the fused layout
        if groups % (ratio + 2):
            raise ValueError(
                f"module: under tensor parallelism this rank's fused qkv projection gives a shard of {widths[0]} "
                f"features = {groups} heads of d_head={d_head}, expected a multiple of n_heads/n_kv_heads + 2 = "
                f"{ratio + 2} heads (whole query groups with their K and V heads on each rank)"
            )
        Hkv = groups // (ratio + 2)
        H = Hkv * ratio
    if H == n_heads:  # every rank computes every head (a gathered plan, or no parallelism)
        return H, Hkv, range(n_heads), range(n_kv_heads)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, (H, Hkv))
    rank = dist.get_rank()
    q0 = sum(c[0] for c in counts[:rank])
    kv0 = sum(c[1] for c in counts[:rank])
    return H, Hkv, range(q0, q0 + H), range(kv0, kv0 + Hkv)
