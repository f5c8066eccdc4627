"""Readers of the attention families with separate Q, K and V projections (q_proj, k_proj, v_proj): the
decoders most interpretability work studies. attach() packs the three projections into one blocked fused
weight [(H + 2 Hkv) Dh, D] and makes q_proj.weight, k_proj.weight and v_proj.weight views of it, so the
Bridge runs one GEMM, holds no second copy, and an edit through either side is the same edit.

Quirks, each read from the module (by feature, never by version):
- Llama 2/3 (+ SmolLM, TinyLlama, CodeLlama), Mistral: RoPE tables (llama3/yarn/linear scaling included)
  come from the model as (cos, sin); Mistral's sliding window arrives inside HF's mask.
- Qwen2/2.5: Q/K/V biases; per-layer sliding window (in the mask).
- Qwen3, Gemma 3: an RMS norm over Dh of every head on Q and K, before RoPE (q_norm / k_norm).
- OLMo 2 / OLMo 3: an RMS norm over the whole Q (and K) projection, before the head split.
- Gemma: MQA and Dh = 256 (config); Gemma 2: scale = query_pre_attn_scalar^-1/2 (the module's `scaling`)
  and attention-logit soft-capping inside the attention op.
- GPT-J: rotate-every-two RoPE over rotary_dim (tables (sin, cos) at half width on newer transformers,
  made from position_ids on older ones, as CodeGen).
- OPT: Q/K/V/out biases; HF scales Q before the product (pyqkv scales the scores: equal within rounding).
- Phi-1/1.5/2: partial RoPE (rotary_ndims), optional per-head LayerNorm on Q and K (qk_layernorm).
- OLMo: clip_qkv, the clamp of Q, K and V right after the projection.
- StableLM: partial RoPE, optional Q/K/V bias, optional per-head LayerNorm with a separate norm per head.
- SmolLM3: no RoPE on the layers that config.no_rope_layers marks (the model passes tables anyway).
"""

from __future__ import annotations

import torch
from torch import nn

from pyqkv.hf.spec import LayerSpec, UnsupportedModule, attr, dropout_p, takes_argument


class HeadsSecond(nn.Module):
    """Runs a norm that expects [B, heads, S, Dh] (StableLM's per-head LayerNorm) on [B, S, heads, Dh]."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.norm(t.transpose(1, 2)).transpose(1, 2)


def _heads(m):
    """(H, Hkv, Dh) from the module, or its config where the module does not keep them."""
    config = getattr(m, "config", None)
    H = getattr(m, "num_heads", None) or getattr(m, "num_attention_heads", None) or config.num_attention_heads
    Hkv = getattr(m, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None) or H
    return int(H), int(Hkv), int(attr(m, "head_dim"))


def _separate(
    family: str,
    m,
    *,
    out: str = "o_proj",
    scale=None,
    rotary_dim=None,
    interleaved=False,
    conventions="cos_sin",
    q_norm=None,
    k_norm=None,
    qk_norm_per_head=True,
    clip_qkv=None,
    softcap=None,
) -> LayerSpec:
    if not getattr(m, "is_causal", True):
        raise UnsupportedModule(
            f"module: this {type(m).__name__} is bidirectional (is_causal=False); pyqkv wraps causal attention only"
        )
    H, Hkv, Dh = _heads(m)
    kwargs = dict(
        n_heads=H,
        n_kv_heads=Hkv,
        d_head=Dh,
        scale=float(attr(m, "scaling")) if scale is None else scale,
        attn_dropout=dropout_p(attr(m, "attention_dropout", "dropout", "attn_dropout")),
        resid_dropout=dropout_p(getattr(m, "resid_dropout", 0.0)),
        rotary_dim=rotary_dim,
        rotary_interleaved=interleaved,
        clip_qkv=clip_qkv,
        softcap=softcap,
        qk_norm_per_head=qk_norm_per_head,
    )
    modules = {} if q_norm is None else {"q_norm": q_norm, "k_norm": k_norm}
    return LayerSpec(
        family,
        (m.q_proj, m.k_proj, m.v_proj),
        getattr(m, out),
        conv1d=False,
        layout="blocked",
        bridge_kwargs=kwargs,
        position_embeddings=conventions if rotary_dim is not None else "ignore",
        bridge_modules=modules,
    )


def _full_rope(m) -> int:
    return int(attr(m, "head_dim"))


def _llama(family):
    def read(m) -> LayerSpec:
        return _separate(family, m, rotary_dim=_full_rope(m))

    return read


def _qk_normed(family, per_head=True):
    def read(m) -> LayerSpec:
        return _separate(
            family,
            m,
            rotary_dim=_full_rope(m),
            q_norm=m.q_norm,
            k_norm=m.k_norm,
            qk_norm_per_head=per_head,
            softcap=getattr(m, "attn_logit_softcapping", None),
        )

    return read


def _gemma2(m) -> LayerSpec:
    return _separate("Gemma 2", m, rotary_dim=_full_rope(m), softcap=attr(m, "attn_logit_softcapping"))


def _gptj(m) -> LayerSpec:
    rotary_dim = m.rotary_dim if m.rotary_dim is not None else _full_rope(m)
    # Newer transformers pass (sin, cos) at half width; older ones make the tables in the module from
    # position_ids, as the Bridge does when no tables are given.
    conventions = "sin_cos_half" if takes_argument(m, "position_embeddings") else "cos_sin"
    # Older transformers: scores / scale_attn (= sqrt(Dh)) instead of `scaling`.
    scale = float(m.scaling) if hasattr(m, "scaling") else 1.0 / float(attr(m, "scale_attn"))
    return _separate(
        "GPT-J", m, out="out_proj", scale=scale, rotary_dim=rotary_dim, interleaved=True, conventions=conventions
    )


def _opt(m) -> LayerSpec:
    return _separate("OPT", m, out="out_proj")


def _phi(m) -> LayerSpec:
    norms = dict(q_norm=m.q_layernorm, k_norm=m.k_layernorm) if getattr(m, "qk_layernorm", False) else {}
    return _separate("Phi", m, out="dense", rotary_dim=int(attr(m, "rotary_ndims")), **norms)


def _olmo(m) -> LayerSpec:
    return _separate("OLMo", m, rotary_dim=_full_rope(m), clip_qkv=getattr(m.config, "clip_qkv", None))


def _stablelm(m) -> LayerSpec:
    norms = {}
    if getattr(m, "qk_layernorm", False):  # one LayerNorm per head, applied on [B, H, S, Dh]
        norms = dict(q_norm=HeadsSecond(m.q_layernorm), k_norm=HeadsSecond(m.k_layernorm))
    return _separate("StableLM", m, rotary_dim=int(attr(m, "rotary_ndims")), **norms)


def _smollm3(m) -> LayerSpec:
    return _separate("SmolLM3", m, rotary_dim=_full_rope(m) if attr(m, "use_rope") else None)


# Module class name -> reader.
READERS = {
    "LlamaAttention": _llama("Llama"),
    "MistralAttention": _llama("Mistral"),
    "Qwen2Attention": _llama("Qwen2"),
    "GemmaAttention": _llama("Gemma"),
    "Gemma2Attention": _gemma2,
    "Qwen3Attention": _qk_normed("Qwen3"),
    "Gemma3Attention": _qk_normed("Gemma 3"),
    "Olmo2Attention": _qk_normed("OLMo 2", per_head=False),
    "Olmo3Attention": _qk_normed("OLMo 3", per_head=False),
    "GPTJAttention": _gptj,
    "OPTAttention": _opt,
    "PhiAttention": _phi,
    "OlmoAttention": _olmo,
    "StableLmAttention": _stablelm,
    "SmolLM3Attention": _smollm3,
}
