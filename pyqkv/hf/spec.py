"""What pyqkv reads from one Hugging Face attention module (LayerSpec), and the helpers every family
reader uses. HF internals are read by feature (an attribute present, a signature), never by version
number; a module of a supported family whose shape this reader does not know raises an error naming the
attribute it looked for. Nothing here imports transformers.

Notation: B batch, S positions, H heads, Hkv KV heads, Dh head dim, D model dim, R rotary dim.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional, Union

from torch import nn


class UnsupportedModule(TypeError):
    """A module of a known family in a shape (a version, a configuration) pyqkv does not read."""


@dataclass(frozen=True)
class LayerSpec:
    """What a Bridge needs from one Hugging Face attention module, and how that module is called.

    qkv / out: the fused QKV projection (or the three separate Q, K, V projections, which attach packs
        into one fused weight they then view) and the output projection (their .weight / .bias);
    conv1d: GPT-2's Conv1D orientation [in, out] for both, else nn.Linear's [out, in];
    layout: where each head sits in the fused output (SPEC §5);
    bridge_kwargs: the rest of Bridge(...)'s arguments (heads, scale, positions, dropout);
    residual_inside: the module adds its `residual` argument to its output (Bloom);
    alibi_scale: the factor the module applies to the model's `alibi` tensor before adding it to the
        scaled scores (Bloom 1, Falcon 1/sqrt(Dh)); None when the module takes no alibi;
    alibi_in_mask_with_sdpa: the model already folds alibi into the mask, and the module adds it once more
        only on its eager path (Falcon): the Bridge follows whichever path the module would take;
    hf_cache_heads: the head count the module writes into a Hugging Face cache (Falcon's grouped layout
        broadcasts K/V to every query head; the Bridge keeps n_kv_heads).
    position_embeddings: how the model's `position_embeddings` argument reads: "cos_sin" (a pair
        (cos, sin) of [B, S, R] tables, as most families pass them), "sin_cos_half" ((sin, cos) at half
        width [B, S, R/2], each frequency once: GPT-J and CodeGen on newer transformers, rotate-every-two),
        or "ignore" (the model passes tables this layer does not use).
    alibi_from: the argument the module's ALiBi arrives in: "alibi" (a per-key [B*H, 1, K] tensor: Bloom,
        Falcon) or "position_bias" (MPT's [H, 1, L] table over its max_seq_len positions, of which the
        module adds the last K to the scores of a call over K keys).
    mask_rule: how the module combines HF's attention_mask with causality (the Bridge's `causal`):
        "model": the model builds causality into the mask (a 4-D mask is authoritative; with none, or a
        2-D padding mask, the Bridge is causal): pyqkv's own rule, and every interface-routed family's;
        "and_causal": the module applies its own causal mask (a `bias` buffer) and then adds the model's
        mask, which need not be causal (ImageGPT's bidirectional padding mask, GPT-1's [B, 1, 1, K]);
        "mask_only": causality comes only from the model's mask, and with no mask the module attends to
        every key (MPT, GPT-NeoX-Japanese).
    bool_mask_masks: a bool attention_mask's True means masked (MPT's `masked_fill`), the opposite of
        pyqkv's (and HF sdpa's) True = attend.
    returns: what the module returns: "pair" (attn_output, attn_weights or None); "with_dense_bias"
        (attn_output, attn_weights, the module's `dense_bias` Parameter or None, which the block adds:
        GPT-NeoX-Japanese); "list" ([attn_output], plus attn_weights with output_attentions: GPT-1).
    weights_always: the module returns its attention weights on every call, and its caller keeps them
        without telling the module whether it wants them (MPT's block never passes output_attentions on),
        so the Bridge returns its pattern on every call (as HF's eager-only module computes it anyway).
    """

    family: str
    qkv: Union[nn.Module, tuple]  # the fused projection, or (q_proj, k_proj, v_proj) for separate ones
    out: nn.Module
    conv1d: bool
    layout: str
    bridge_kwargs: dict
    residual_inside: bool = False
    alibi_scale: Optional[float] = None
    alibi_in_mask_with_sdpa: bool = False
    hf_cache_heads: Optional[int] = None
    position_embeddings: str = "cos_sin"
    bridge_modules: dict = field(default_factory=dict)  # nn.Modules the Bridge calls (q_norm, k_norm)
    alibi_from: str = "alibi"
    mask_rule: str = "model"
    bool_mask_masks: bool = False
    returns: str = "pair"
    weights_always: bool = False


def attr(module, *names):
    """The first of `names` that `module` has: HF internals are read by feature, never by version. A module
    with none of them is one this reader does not know: say which attributes were looked for."""
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    wanted = " or ".join(repr(n) for n in names)
    raise UnsupportedModule(
        f"module: this {type(module).__name__} has no attribute {wanted}; pyqkv does not know this version of "
        f"the module"
    )


def takes_argument(module, name: str) -> bool:
    """Whether the module's forward names the argument `name` (a feature of its calling convention)."""
    return name in inspect.signature(type(module).forward).parameters


def rope_config(config, head_dim):
    """(rotary_dim, rotary_base) from a config's rope_parameters (transformers >= 5) or older fields."""
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return int(head_dim * factor), float(base)


def dropout_p(d) -> float:
    return float(d.p) if isinstance(d, nn.Dropout) else float(d or 0.0)
