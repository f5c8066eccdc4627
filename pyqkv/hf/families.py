"""The Hugging Face attention families pyqkv wraps: one reader per family, turning a module into a
LayerSpec (what a Bridge needs from it, and how the module is called).

Modules are recognized by class name along the MRO, so this module never imports transformers. HF
internals are read by feature (an attribute present, a signature), never by version number; a module
of a supported family whose shape is not one this reader knows raises an error naming the attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    """What a Bridge needs from one Hugging Face attention module, and how that module is called.

    qkv / out: the fused QKV projection and the output projection (their .weight / .bias);
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
    """

    family: str
    qkv: nn.Module
    out: nn.Module
    conv1d: bool
    layout: str
    bridge_kwargs: dict
    residual_inside: bool = False
    alibi_scale: Optional[float] = None
    alibi_in_mask_with_sdpa: bool = False
    hf_cache_heads: Optional[int] = None
    position_embeddings: str = "cos_sin"


def attr(module, *names):
    """The first of `names` that `module` has: HF internals are read by feature, never by version. A module
    with none of them is one this reader does not know: say which attributes were looked for."""
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    wanted = " or ".join(repr(n) for n in names)
    raise TypeError(
        f"module: this {type(module).__name__} has no attribute {wanted}; pyqkv does not know this version of "
        f"the module (supported: {', '.join(SUPPORTED)})"
    )


def takes_argument(module, name: str) -> bool:
    """Whether the module's forward names the argument `name` (a feature of its calling convention)."""
    import inspect

    return name in inspect.signature(type(module).forward).parameters


def _rope(config, head_dim):
    """(rotary_dim, rotary_base) from a config's rope_parameters (transformers >= 5) or older fields."""
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return int(head_dim * factor), float(base)


def _dropout_p(d) -> float:
    return float(d.p) if isinstance(d, nn.Dropout) else float(d or 0.0)


def _gpt2(m) -> LayerSpec:
    if getattr(m, "is_cross_attention", False):
        raise ValueError("module: a cross-attention GPT2Attention is not supported (self-attention only)")
    return LayerSpec(
        "GPT-2", m.c_attn, m.c_proj, conv1d=True, layout="blocked",
        bridge_kwargs=dict(
            n_heads=m.num_heads, d_head=m.head_dim, layer_idx=m.layer_idx,
            scale_attn_weights=m.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=m.scale_attn_by_inverse_layer_idx,
            reorder_and_upcast_attn=m.reorder_and_upcast_attn,
            attn_dropout=_dropout_p(m.attn_dropout), resid_dropout=_dropout_p(m.resid_dropout),
        ),
    )


def _neox(m) -> LayerSpec:
    # query_key_value's output is [B, S, H, 3 * Dh]: per head [Q_h, K_h, V_h].
    _, base = _rope(m.config, m.head_size)
    return LayerSpec(
        "GPT-NeoX", m.query_key_value, m.dense, conv1d=False, layout="interleaved",
        bridge_kwargs=dict(
            n_heads=m.config.num_attention_heads, d_head=m.head_size, scale=m.scaling,
            rotary_dim=m.rotary_ndims or None, rotary_base=base, attn_dropout=_dropout_p(m.attention_dropout),
        ),
    )


def _phi3(m) -> LayerSpec:
    rotary_dim, base = _rope(m.config, m.head_dim)
    return LayerSpec(
        "Phi-3", m.qkv_proj, m.o_proj, conv1d=False, layout="blocked",
        bridge_kwargs=dict(
            n_heads=m.config.num_attention_heads, n_kv_heads=m.num_key_value_heads, d_head=m.head_dim,
            scale=m.scaling, rotary_dim=rotary_dim, rotary_base=base, attn_dropout=_dropout_p(m.attention_dropout),
        ),
    )


def _bigcode(m) -> LayerSpec:
    if getattr(m, "is_cross_attention", False):
        raise ValueError("module: a cross-attention GPTBigCodeAttention is not supported (self-attention only)")
    # multi_query: [all Q heads | K | V]; otherwise c_attn's output is [B, S, H, 3 * Dh] (per head Q, K, V).
    return LayerSpec(
        "GPT-BigCode", m.c_attn, m.c_proj, conv1d=False, layout="blocked" if m.multi_query else "interleaved",
        bridge_kwargs=dict(
            n_heads=m.num_heads, n_kv_heads=m.kv_heads, d_head=m.head_dim, scale=m.scaling,
            attn_dropout=_dropout_p(m.attn_pdrop), resid_dropout=_dropout_p(m.resid_dropout),
        ),
    )


def _falcon(m) -> LayerSpec:
    cfg = m.config
    H, Dh = m.num_heads, m.head_dim
    if cfg.new_decoder_architecture:  # per KV group: [Q of its heads, K, V]
        layout, Hkv = "grouped", cfg.num_kv_heads
    elif cfg.multi_query:  # [all Q heads | K | V]
        layout, Hkv = "blocked", 1
    else:  # per head [Q_h, K_h, V_h]
        layout, Hkv = "interleaved", H
    kwargs = dict(n_heads=H, n_kv_heads=Hkv, d_head=Dh, scale=m.inv_norm_factor)
    if cfg.alibi:
        kwargs.update(alibi=True, attn_dropout=_dropout_p(m.attention_dropout))  # dropout only on the ALiBi path
    else:
        rotary_dim, base = _rope(cfg, Dh)
        kwargs.update(rotary_dim=rotary_dim, rotary_base=base)
    return LayerSpec(
        "Falcon", m.query_key_value, m.dense, conv1d=False, layout=layout, bridge_kwargs=kwargs,
        alibi_scale=m.inv_norm_factor if cfg.alibi else None, alibi_in_mask_with_sdpa=bool(cfg.alibi),
        hf_cache_heads=H if cfg.new_decoder_architecture else Hkv,
    )


def _bloom(m) -> LayerSpec:
    return LayerSpec(
        "Bloom", m.query_key_value, m.dense, conv1d=False, layout="interleaved",
        bridge_kwargs=dict(
            n_heads=m.num_heads, d_head=m.head_dim, scale=m.inv_norm_factor, alibi=True,
            attn_dropout=_dropout_p(m.attention_dropout), resid_dropout=_dropout_p(m.hidden_dropout),
        ),
        residual_inside=True, alibi_scale=m.beta,
    )


def _codegen(m) -> LayerSpec:
    if m.rotary_dim is None:
        # CodeGen then rotates each head with a table as wide as the whole model: only H = 1 would work.
        raise ValueError("module: a CodeGenAttention with rotary_dim=None is not supported (set config.rotary_dim)")
    # Newer transformers: `scaling` and a float `attention_dropout`, and the model passes (sin, cos) at half
    # width; older: `scale_attn` (= sqrt(Dh)), an nn.Dropout `attn_dropout`, tables made from position_ids.
    scale = m.scaling if hasattr(m, "scaling") else 1.0 / float(attr(m, "scale_attn"))
    return LayerSpec(
        "CodeGen", m.qkv_proj, m.out_proj, conv1d=False, layout="codegen",
        bridge_kwargs=dict(
            n_heads=m.num_attention_heads, d_head=m.head_dim, scale=scale,
            rotary_dim=m.rotary_dim, rotary_interleaved=True,
            attn_dropout=_dropout_p(attr(m, "attention_dropout", "attn_dropout")),
            resid_dropout=_dropout_p(m.resid_dropout),
        ),
        position_embeddings="sin_cos_half" if takes_argument(m, "position_embeddings") else "cos_sin",
    )


# Supported attention classes (matched by name along the MRO, so transformers is never imported here).
FAMILIES = {
    "GPT2Attention": _gpt2,
    "GPTNeoXAttention": _neox,
    "Phi3Attention": _phi3,
    "GPTBigCodeAttention": _bigcode,
    "FalconAttention": _falcon,
    "BloomAttention": _bloom,
    "CodeGenAttention": _codegen,
}
SUPPORTED = tuple(FAMILIES)


def family_of(module) -> Optional[str]:
    for cls in type(module).__mro__:
        if cls.__name__ in FAMILIES:
            return cls.__name__
    return None


def layer_spec(module) -> LayerSpec:
    """The LayerSpec of a supported Hugging Face attention module; TypeError naming the supported ones else."""
    family = family_of(module)
    if family is None:
        raise TypeError(f"module: expected one of {', '.join(SUPPORTED)}, got {type(module).__name__}")
    return FAMILIES[family](module)


