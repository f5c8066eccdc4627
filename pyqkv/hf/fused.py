"""Readers of the fused-QKV attention families: one function per module class, returning its LayerSpec.

GPT-2 (Conv1D, blocked), GPT-NeoX / Pythia (interleaved, partial RoPE), Phi-3 (blocked GQA, RoPE),
GPT-BigCode (blocked MQA or interleaved MHA), Falcon (grouped GQA for new_decoder_architecture,
interleaved classic, blocked multi_query; RoPE or ALiBi), Bloom (interleaved, ALiBi, residual added
inside attention), CodeGen (codegen layout, rotate-every-two RoPE over rotary_dim).

And the rest of the fused families, each quirk read from the module (by feature, never by version):
- Phi-4-multimodal's text stack: a copy of Phi-3's module under another class name (not a subclass).
- DBRX: blocked GQA, clip_qkv on the fused output (Q, K and V alike), full RoPE.
- Persimmon (and Fuyu's language model): interleaved with bias, partial RoPE, an affine LayerNorm over
  Dh of every Q and K head before RoPE (qk_layernorm).
- MPT: blocked, clip_qkv, softmax_scale, its own ALiBi as `position_bias`, a bool mask whose True means
  masked, causality from the mask alone; eager only (it never calls HF's attention interface).
- Decision Transformer: a GPT-2 copy under another class name.
- ImageGPT: GPT-2's attributes, but its own causal `bias` buffer on top of the model's padding mask.
- GPT-NeoX-Japanese: interleaved, partial RoPE, returns a third value (the last layer's `dense_bias`).
- OpenAI GPT-1: GPT-2's Conv1D blocked layout, a causal `bias` buffer on top of the model's [B, 1, 1, K]
  padding mask, no KV cache, returns a list.
"""

from __future__ import annotations

from dataclasses import replace

from pyqkv.hf.spec import LayerSpec, UnsupportedModule, attr, dropout_p, rope_config, takes_argument


def _gpt2(m, family: str = "GPT-2") -> LayerSpec:
    if getattr(m, "is_cross_attention", False):
        raise ValueError(f"module: a cross-attention {type(m).__name__} is not supported (self-attention only)")
    return LayerSpec(
        family,
        m.c_attn,
        m.c_proj,
        conv1d=True,
        layout="blocked",
        bridge_kwargs=dict(
            n_heads=m.num_heads,
            d_head=m.head_dim,
            layer_idx=m.layer_idx,
            scale_attn_weights=m.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=m.scale_attn_by_inverse_layer_idx,
            reorder_and_upcast_attn=m.reorder_and_upcast_attn,
            attn_dropout=dropout_p(m.attn_dropout),
            resid_dropout=dropout_p(m.resid_dropout),
        ),
    )


def _neox(m) -> LayerSpec:
    # query_key_value's output is [B, S, H, 3 * Dh]: per head [Q_h, K_h, V_h].
    _, base = rope_config(m.config, m.head_size)
    return LayerSpec(
        "GPT-NeoX",
        m.query_key_value,
        m.dense,
        conv1d=False,
        layout="interleaved",
        bridge_kwargs=dict(
            n_heads=m.config.num_attention_heads,
            d_head=m.head_size,
            scale=m.scaling,
            rotary_dim=m.rotary_ndims or None,
            rotary_base=base,
            attn_dropout=dropout_p(m.attention_dropout),
        ),
    )


def _phi3(m, family: str = "Phi-3") -> LayerSpec:
    rotary_dim, base = rope_config(m.config, m.head_dim)
    return LayerSpec(
        family,
        m.qkv_proj,
        m.o_proj,
        conv1d=False,
        layout="blocked",
        bridge_kwargs=dict(
            n_heads=m.config.num_attention_heads,
            n_kv_heads=m.num_key_value_heads,
            d_head=m.head_dim,
            scale=m.scaling,
            rotary_dim=rotary_dim,
            rotary_base=base,
            attn_dropout=dropout_p(m.attention_dropout),
        ),
    )


def _bigcode(m) -> LayerSpec:
    if getattr(m, "is_cross_attention", False):
        raise ValueError("module: a cross-attention GPTBigCodeAttention is not supported (self-attention only)")
    # multi_query: [all Q heads | K | V]; otherwise c_attn's output is [B, S, H, 3 * Dh] (per head Q, K, V).
    return LayerSpec(
        "GPT-BigCode",
        m.c_attn,
        m.c_proj,
        conv1d=False,
        layout="blocked" if m.multi_query else "interleaved",
        bridge_kwargs=dict(
            n_heads=m.num_heads,
            n_kv_heads=m.kv_heads,
            d_head=m.head_dim,
            scale=m.scaling,
            attn_dropout=dropout_p(m.attn_pdrop),
            resid_dropout=dropout_p(m.resid_dropout),
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
        kwargs.update(alibi=True, attn_dropout=dropout_p(m.attention_dropout))  # dropout only on the ALiBi path
    else:
        rotary_dim, base = rope_config(cfg, Dh)
        kwargs.update(rotary_dim=rotary_dim, rotary_base=base)
    return LayerSpec(
        "Falcon",
        m.query_key_value,
        m.dense,
        conv1d=False,
        layout=layout,
        bridge_kwargs=kwargs,
        alibi_scale=m.inv_norm_factor if cfg.alibi else None,
        alibi_in_mask_with_sdpa=bool(cfg.alibi),
        hf_cache_heads=H if cfg.new_decoder_architecture else Hkv,
    )


def _bloom(m) -> LayerSpec:
    return LayerSpec(
        "Bloom",
        m.query_key_value,
        m.dense,
        conv1d=False,
        layout="interleaved",
        bridge_kwargs=dict(
            n_heads=m.num_heads,
            d_head=m.head_dim,
            scale=m.inv_norm_factor,
            alibi=True,
            attn_dropout=dropout_p(m.attention_dropout),
            resid_dropout=dropout_p(m.hidden_dropout),
        ),
        residual_inside=True,
        alibi_scale=m.beta,
    )


def _codegen(m) -> LayerSpec:
    if m.rotary_dim is None:
        # CodeGen then rotates each head with a table as wide as the whole model: only H = 1 would work.
        raise ValueError("module: a CodeGenAttention with rotary_dim=None is not supported (set config.rotary_dim)")
    # Newer transformers: `scaling` and a float `attention_dropout`, and the model passes (sin, cos) at half
    # width; older: `scale_attn` (= sqrt(Dh)), an nn.Dropout `attn_dropout`, tables made from position_ids.
    scale = m.scaling if hasattr(m, "scaling") else 1.0 / float(attr(m, "scale_attn"))
    return LayerSpec(
        "CodeGen",
        m.qkv_proj,
        m.out_proj,
        conv1d=False,
        layout="codegen",
        bridge_kwargs=dict(
            n_heads=m.num_attention_heads,
            d_head=m.head_dim,
            scale=scale,
            rotary_dim=m.rotary_dim,
            rotary_interleaved=True,
            attn_dropout=dropout_p(attr(m, "attention_dropout", "attn_dropout")),
            resid_dropout=dropout_p(m.resid_dropout),
        ),
        position_embeddings="sin_cos_half" if takes_argument(m, "position_embeddings") else "cos_sin",
    )


def _phi4_multimodal(m) -> LayerSpec:
    # Phi4MultimodalAttention is Phi3Attention's code under another name (transformers copies, it does
    # not subclass), so it is read as Phi-3, by name.
    return _phi3(m, "Phi-4-multimodal")


def _dbrx(m) -> LayerSpec:
    clip = m.clip_qkv  # HF clamps the fused output to [-clip_qkv, clip_qkv]: Q, K and V alike
    if clip is not None and not clip > 0:
        raise UnsupportedModule(f"module: DbrxAttention.clip_qkv: expected None or a positive number, got {clip!r}")
    _, base = rope_config(m.config, m.head_dim)  # the model's rotary tables use config.rope_parameters
    return LayerSpec(
        "DBRX",
        m.Wqkv,
        m.out_proj,
        conv1d=False,
        layout="blocked",
        bridge_kwargs=dict(
            n_heads=m.num_heads,
            n_kv_heads=m.num_key_value_heads,
            d_head=m.head_dim,
            scale=m.scaling,
            rotary_dim=m.head_dim,
            rotary_base=base,
            clip_qkv=None if clip is None else float(clip),
            attn_dropout=dropout_p(m.attention_dropout),
        ),
    )


def _persimmon(m) -> LayerSpec:
    # query_key_value's output is [B, S, H, 3, Dh]: per head [Q_h, K_h, V_h].
    _, base = rope_config(m.config, m.head_dim)
    # qk_layernorm: nn.LayerNorm(Dh) on [B, S, H, Dh], before RoPE: the Bridge's per-head q_norm / k_norm.
    norms = dict(q_norm=m.q_layernorm, k_norm=m.k_layernorm) if attr(m, "qk_layernorm") else {}
    return LayerSpec(
        "Persimmon",
        m.query_key_value,
        m.dense,
        conv1d=False,
        layout="interleaved",
        bridge_kwargs=dict(
            n_heads=m.num_heads,
            d_head=m.head_dim,
            scale=m.scaling,
            rotary_dim=int(attr(m, "rotary_ndims")),
            rotary_base=base,
            attn_dropout=dropout_p(m.config.attention_dropout),  # the rate HF's forward uses
        ),
        bridge_modules=norms,
    )


def _mpt(m) -> LayerSpec:
    clip = m.clip_qkv
    if clip is not None and clip < 0:
        raise UnsupportedModule(f"module: MptAttention.clip_qkv: expected None, 0 or a positive number, got {clip!r}")
    return LayerSpec(
        "MPT",
        m.Wqkv,
        m.out_proj,
        conv1d=False,
        layout="blocked",
        bridge_kwargs=dict(
            n_heads=m.n_heads,
            d_head=m.head_dim,
            scale=float(m.softmax_scale),
            alibi=True,
            clip_qkv=float(clip) if clip else None,  # HF clamps only when clip_qkv is truthy
            attn_dropout=dropout_p(m.attn_dropout_p),
        ),
        alibi_scale=1.0,
        alibi_from="position_bias",
        mask_rule="mask_only",
        bool_mask_masks=True,
        weights_always=True,
    )


def _imagegpt(m) -> LayerSpec:
    # GPT-2's attributes; the model's mask is a bidirectional padding mask unless config.is_decoder, and
    # the module's `bias` buffer adds causality on top of it either way.
    return replace(_gpt2(m, "ImageGPT"), mask_rule="and_causal")


def _neox_japanese(m) -> LayerSpec:
    # query_key_value's output is [B, S, H, 3 * Dh]: per head [Q_h, K_h, V_h]; scores / sqrt(Dh).
    # The module keeps no config and cannot run without the model's (cos, sin) tables, which the Bridge
    # then uses as given: the base is only the Bridge's own fallback.
    config = getattr(m, "config", None)
    base = rope_config(config, m.head_size)[1] if config is not None else 10000.0
    return LayerSpec(
        "GPT-NeoX-Japanese",
        m.query_key_value,
        m.dense,
        conv1d=False,
        layout="interleaved",
        bridge_kwargs=dict(
            n_heads=m.num_attention_heads,
            d_head=m.head_size,
            scale=1.0 / float(m.norm_factor),
            rotary_dim=int(m.rotary_ndims),
            rotary_base=base,
            attn_dropout=dropout_p(m.attention_dropout),
        ),
        mask_rule="mask_only",
        returns="with_dense_bias",
    )


def _openai_gpt(m) -> LayerSpec:
    H = m.n_head
    D = m.split_size
    # The module's causal buffer puts -1e4 (not the dtype's minimum) on future keys: it replaces the
    # score, so a future key's weight is exp(-1e4 - max) = 0 in float32/16 whenever the row has a visible
    # score above -1e4 + 104. pyqkv hides future keys outright: equal on every row with a visible key
    # whose score is not itself near -1e4 (see tests/test_hf_families.py, the GPT-1 test).
    return LayerSpec(
        "OpenAI GPT",
        m.c_attn,
        m.c_proj,
        conv1d=True,
        layout="blocked",
        bridge_kwargs=dict(
            n_heads=H,
            d_head=D // H,
            scale=(D // H) ** -0.5 if m.scale else 1.0,
            attn_dropout=dropout_p(m.attn_dropout),
            resid_dropout=dropout_p(m.resid_dropout),
        ),
        mask_rule="and_causal",
        returns="list",
    )


# Module class name -> reader.
READERS = {
    "GPT2Attention": _gpt2,
    "GPTNeoXAttention": _neox,
    "Phi3Attention": _phi3,
    "GPTBigCodeAttention": _bigcode,
    "FalconAttention": _falcon,
    "BloomAttention": _bloom,
    "CodeGenAttention": _codegen,
    "Phi4MultimodalAttention": _phi4_multimodal,
    "DbrxAttention": _dbrx,
    "PersimmonAttention": _persimmon,
    "MptAttention": _mpt,
    "DecisionTransformerGPT2Attention": lambda m: _gpt2(m, "Decision Transformer"),
    "ImageGPTAttention": _imagegpt,
    "GPTNeoXJapaneseAttention": _neox_japanese,
    # OpenAI GPT-1's module is named just `Attention`, as are classes of many other libraries: it is
    # registered under its qualified name, which pyqkv.hf.families also matches.
    "transformers.models.openai.modeling_openai.Attention": _openai_gpt,
}
