"""Collectives over hook points under tensor parallelism (each rank's points hold its own heads; see
pyqkv/hf/placement.py for how a sharded layer is attached). Kept apart from the hook model (pyqkv/hooks.py),
which is single-process: only run_with_cache(gather=True) calls into here."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_heads(point, tensor: torch.Tensor) -> torch.Tensor:
    """A point's tensor with every rank's heads along its head axis, in global order: the collective
    run_with_cache(gather=True) makes. Unchanged where the tensor already holds every head."""
    if point.heads is None or len(point.heads) == point.n_heads_total:
        return tensor
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{point.name}: gather=True needs torch.distributed initialized (this rank holds heads "
            f"{point.heads.start}..{point.heads.stop - 1} of {point.n_heads_total})"
        )
    starts = [None] * dist.get_world_size()
    dist.all_gather_object(starts, (point.heads.start, len(point.heads)))
    widest = max(n for _, n in starts)
    dim = point.head_dim
    pad = list(tensor.shape)
    pad[dim] = widest - tensor.shape[dim]
    padded = torch.cat([tensor, tensor.new_zeros(pad)], dim) if pad[dim] else tensor.contiguous()
    parts = [torch.empty_like(padded) for _ in starts]
    dist.all_gather(parts, padded)
    ordered = sorted(zip(starts, parts), key=lambda item: item[0][0])
    return torch.cat([part.narrow(dim, 0, n) for (_, n), part in ordered], dim)
