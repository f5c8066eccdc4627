"""Position information for a Bridge: RoPE cos/sin tables and ALiBi biases, made here or taken from the
caller (a Hugging Face model passes its own), checked before any hook runs or any state changes.

Notation: B batch, S positions in this call, K key positions (cache included), H heads, R rotary dim.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from pyqkv.checks import describe


def rotary_tables(positions, rotary_dim: int, base: float = 10000.0, *, interleaved: bool = False, dtype=torch.float32):
    """RoPE's (cos, sin) [B or 1, S, rotary_dim] for integer positions [B or 1, S]: angle = position * base^(-2i/R)
    for pair i, laid out for the rotation style (halves: [f0..f(R/2-1), f0..f(R/2-1)]; interleaved: f0 f0 f1 f1 ..).
    The frequencies are computed as GPT-NeoX and CodeGen compute theirs (float32 powers of the base)."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=positions.device).float() / rotary_dim)
    )
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [B or 1, S, R/2]
    angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def alibi_slopes(n_heads: int, device=None) -> torch.Tensor:
    """ALiBi's per-head slopes [H] (Press et al.; the rule Bloom and Falcon use, including head counts that
    are not a power of two), float32 powers computed as Bloom computes them, so the bias matches bit for bit."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = torch.tensor(2.0 ** (-(2.0 ** -(math.log2(closest) - 3))), dtype=torch.float32, device=device)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32, device=device))
    if closest != n_heads:
        extra = torch.tensor(2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32, device=device)
        odd = torch.arange(1, 1 + 2 * min(closest, n_heads - closest), 2, dtype=torch.int32, device=device)
        slopes = torch.cat([slopes, torch.pow(extra, odd)])
    return slopes


def alibi_bias(slopes: torch.Tensor, K: int, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The per-key ALiBi bias [B or 1, H, K] = slope_h * position_k. Positions count only the attended keys
    of a 2-D padding mask [B, K] (as Bloom does: a left-padded row starts at 0), else they are 0 .. K-1."""
    if padding_mask is None:
        positions = torch.arange(K, device=slopes.device, dtype=torch.float32).unsqueeze(0)
    else:
        attend = (padding_mask != 0).to(torch.float32)
        positions = (attend.cumsum(-1) - 1) * attend
    return slopes.view(1, -1, 1) * positions.unsqueeze(1)


def prepare_rotary(cfg, position_embeddings, position_ids, B: int, S: int, past: int, x: torch.Tensor):
    """(cos, sin) [B or 1, S, rotary_dim] in float32 (float64 for float64 layers), or None without RoPE.

    position_embeddings (cos, sin), as a model computes them, win; else the tables are made from
    position_ids [B or 1, S] (default: past .. past + S - 1) and cfg.rotary_base."""
    if cfg.rotary_dim is None:
        for name, value in (("position_embeddings", position_embeddings), ("position_ids", position_ids)):
            if value is not None:
                raise ValueError(
                    f"{name}: this layer has no rotary embedding (rotary_dim is None), got {describe(value)}"
                )
        return None
    R = cfg.rotary_dim
    if position_embeddings is not None:
        if not (isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2):
            raise TypeError(
                f"position_embeddings: expected a pair (cos, sin) of [B or 1, S, {R}] tensors, got "
                f"{describe(position_embeddings)}"
            )
        tables = []
        for name, t in zip(("cos", "sin"), position_embeddings):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"position_embeddings ({name}): expected a floating-point Tensor, got {describe(t)}")
            if t.dim() == 2:
                t = t.unsqueeze(0)
            if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != S or t.shape[2] != R:
                raise ValueError(
                    f"position_embeddings ({name}): expected shape [B or 1, S, rotary_dim] = [{B} or 1, {S}, {R}], "
                    f"got {tuple(t.shape)}"
                )
            if t.device != x.device:
                raise ValueError(f"position_embeddings ({name}): expected device {x.device}, got {t.device}")
            tables.append(t)
        if tables[1].shape != tables[0].shape:
            raise ValueError(
                f"position_embeddings (sin): expected the shape of cos {list(tables[0].shape)}, "
                f"got {list(tables[1].shape)}"
            )
        return tables[0], tables[1]
    if position_ids is None:
        positions = torch.arange(past, past + S, device=x.device).unsqueeze(0)
    else:
        if (
            not isinstance(position_ids, torch.Tensor)
            or position_ids.is_floating_point()
            or position_ids.is_complex()
            or position_ids.dtype == torch.bool
        ):
            raise TypeError(f"position_ids: expected an integer Tensor [B or 1, S], got {describe(position_ids)}")
        positions = position_ids.unsqueeze(0) if position_ids.dim() == 1 else position_ids
        if positions.dim() != 2 or positions.shape[0] not in (1, B) or positions.shape[1] != S:
            raise ValueError(
                f"position_ids: expected shape [B or 1, S] = [{B} or 1, {S}], got {tuple(position_ids.shape)}"
            )
        if positions.device != x.device:
            raise ValueError(f"position_ids: expected device {x.device}, got {positions.device}")
    return rotary_tables(
        positions,
        R,
        cfg.rotary_base,
        interleaved=cfg.rotary_interleaved,
        dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
    )


def prepare_alibi(cfg, alibi, attention_mask, B: int, K: int, x: torch.Tensor):
    """The per-key ALiBi bias [B or 1, H, K] for the attention op, or None.

    A given alibi (Hugging Face's [B*H, 1, K], or [B, H, K] / [B, H, 1, K]) is used as given; else, on an
    ALiBi layer, it is made from Bloom's slopes and the key positions (counted over a 2-D padding mask)."""
    H = cfg.n_heads
    if alibi is None:
        if not cfg.alibi:
            return None
        pad = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        return alibi_bias(alibi_slopes(H, device=x.device), K, padding_mask=pad)
    if not cfg.alibi:
        raise ValueError(f"alibi: this layer has no ALiBi (alibi=False), got {describe(alibi)}")
    if not isinstance(alibi, torch.Tensor) or not alibi.is_floating_point():
        raise TypeError(f"alibi: expected a floating-point Tensor [B, H, K], got {describe(alibi)}")
    if alibi.device != x.device:
        raise ValueError(f"alibi: expected device {x.device}, got {alibi.device}")
    if alibi.dim() == 3 and alibi.shape[1] == 1 and alibi.shape[0] == B * H and alibi.shape[2] == K:
        return alibi.view(B, H, K)  # Hugging Face's [B*H, 1, K]
    if alibi.dim() == 4 and alibi.shape[2] == 1:
        alibi = alibi.squeeze(2)  # [B, H, 1, K]
    if alibi.dim() != 3 or alibi.shape[0] not in (1, B) or alibi.shape[1] not in (1, H) or alibi.shape[2] != K:
        raise ValueError(
            f"alibi: expected a per-key bias [B or 1, H or 1, K] = [{B}, {H}, {K}] (or [B*H, 1, K]), got "
            f"{tuple(alibi.shape)}"
        )
    return alibi
