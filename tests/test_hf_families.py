"""Every supported Hugging Face family (fused QKV, and separate Q/K/V projections packed into one fused
GEMM), whole models built from small random configs (nothing is downloaded), attached with
pyqkv.hf.attach and compared with the unattached HF model itself:

- logits on a left-padded batch at the non-padded positions (float32, by the tolerance rule of
  tests/tolerance.py: HF itself in float32 and float64 is the reference), no NaN anywhere;
- per-layer patterns against HF's own output_attentions;
- cached greedy generation, token for token;
- model-level hooks: hook_pattern [B, H, S, S], hook_k [B, S, Hkv, Dh], hook_rot_q / hook_rot_k on rotary
  families, a head zeroed at hook_z changes the logits (and equals HF with that head zeroed by hand),
  nothing left behind after hooks();
- a cache filled by HF's own modules continued by the Bridges, and weights edited through a Bridge carried
  back by detach;
- parameter memory: attaching adds no weight storage, and an edit through the module's own projection
  weight is an edit of the attached layer (blocked and separate-projection layouts);
- each family's quirk (clip_qkv, a query/key norm, soft-capping, rotate-every-two, the model's own RoPE
  tables, MPT's softmax_scale, position_bias ALiBi and True-means-masked bool mask, causal AND the model's
  mask for ImageGPT and GPT-1, GPT-NeoX-Japanese's returned dense_bias) matters: with the quirk switched
  off in the Bridge, the logits leave HF's.
Families whose module takes no KV cache (GPT-1) generate uncached on both sides and skip the cache checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
import torch
from test_bridge_oracle import Oracle, no_hooks_left
from tolerance import assert_close, by_hand, differs, hf_reference

import pyqkv

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

D, H, DH, VOCAB = 64, 4, 16, 100


@dataclass
class Family:
    """One row of the family table: how to build a small model and what the Bridge must find in it."""

    id: str
    model_cls: str
    config_cls: str
    config: dict
    attention_cls: str
    layout: str
    n_kv_heads: int
    rotary: object = False  # True, False, or one bool per layer
    alibi: bool = False
    qk_norm: bool = False
    quirks: tuple = ()  # names in QUIRK_BREAKERS: switched off, each must move the logits off HF's
    impls: tuple = ("eager",)
    attention_path: str = ""  # dotted path from the model to the list of blocks, then the attention attr
    head_out: str = ""  # dotted path (from the attention module) of the output projection
    dropout: dict = field(default_factory=dict)  # config overrides that switch on every dropout of the family
    configure: object = None  # fn(config): what the config needs before the model builds (a transformers bug)
    build: object = None  # fn(config) -> model, for a family without a causal-LM class of its own
    tweak: object = None  # fn(model), under no_grad, after the random weights: make a quirk's weights matter
    no_cache: str = ""  # why the family's module takes no KV cache ("" = it takes one)

    def make(self, device, impl="eager", seed=0, **overrides):
        cfg_cls = getattr(transformers, self.config_cls)
        cfg = cfg_cls(**{**self.config, **overrides})
        cfg._attn_implementation = impl
        if self.configure is not None:
            self.configure(cfg)
        torch.manual_seed(seed)
        model = self.build(cfg) if self.build is not None else getattr(transformers, self.model_cls)(cfg)
        with torch.no_grad():  # weights large enough that patterns are far from uniform
            for name, p in model.named_parameters():
                if p.dim() >= 2 or "bias" in name:
                    p.normal_(0.0, 0.2 if p.dim() >= 2 else 0.05)
            if self.tweak is not None:
                self.tweak(model)
        return model.to(device).eval()

    def rotary_of(self, layer: int) -> bool:
        return self.rotary[layer] if isinstance(self.rotary, tuple) else self.rotary

    def attentions(self, model):
        blocks_path, attr = self.attention_path.rsplit(":", 1)
        blocks = model.get_submodule(blocks_path)
        return [b.get_submodule(attr) for b in blocks]


COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DECODER = dict(
    hidden_size=D,
    num_attention_heads=H,
    num_hidden_layers=2,
    intermediate_size=128,
    max_position_embeddings=64,
    **COMMON,
)  # the separate-projection decoders' common shape

FAMILIES = [
    Family(
        "gpt2",
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(n_embd=D, n_head=H, n_layer=2, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **COMMON),
        "GPT2Attention",
        "blocked",
        H,
        impls=("eager", "sdpa"),
        attention_path="transformer.h:attn",
        head_out="c_proj",
    ),
    Family(
        "neox",
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        dict(
            hidden_size=D,
            num_attention_heads=H,
            num_hidden_layers=2,
            intermediate_size=128,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            **COMMON,
        ),
        "GPTNeoXAttention",
        "interleaved",
        H,
        rotary=True,
        impls=("eager", "sdpa"),
        attention_path="gpt_neox.layers:attention",
        head_out="dense",
    ),
    Family(
        "phi3",
        "Phi3ForCausalLM",
        "Phi3Config",
        dict(
            hidden_size=D,
            num_attention_heads=H,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=128,
            max_position_embeddings=64,
            original_max_position_embeddings=64,
            **COMMON,
        ),
        "Phi3Attention",
        "blocked",
        2,
        rotary=True,
        impls=("eager", "sdpa"),
        attention_path="model.layers:self_attn",
        head_out="o_proj",
    ),
    Family(
        "phi3-sliding-window",
        "Phi3ForCausalLM",
        "Phi3Config",
        dict(
            hidden_size=D,
            num_attention_heads=H,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=128,
            max_position_embeddings=64,
            original_max_position_embeddings=64,
            sliding_window=4,
            **COMMON,
        ),
        "Phi3Attention",
        "blocked",
        2,
        rotary=True,
        attention_path="model.layers:self_attn",
        head_out="o_proj",
    ),
    Family(
        "bigcode-mqa",
        "GPTBigCodeForCausalLM",
        "GPTBigCodeConfig",
        dict(
            n_embd=D,
            n_head=H,
            n_layer=2,
            n_positions=64,
            multi_query=True,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            **COMMON,
        ),
        "GPTBigCodeAttention",
        "blocked",
        1,
        impls=("eager", "sdpa"),
        attention_path="transformer.h:attn",
        head_out="c_proj",
    ),
    Family(
        "bigcode-mha",
        "GPTBigCodeForCausalLM",
        "GPTBigCodeConfig",
        dict(
            n_embd=D,
            n_head=H,
            n_layer=2,
            n_positions=64,
            multi_query=False,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            **COMMON,
        ),
        "GPTBigCodeAttention",
        "interleaved",
        H,
        attention_path="transformer.h:attn",
        head_out="c_proj",
    ),
    Family(
        "falcon-new-arch",
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            hidden_size=D,
            num_attention_heads=H,
            num_kv_heads=2,
            num_hidden_layers=2,
            new_decoder_architecture=True,
            bias=True,
            max_position_embeddings=64,
            **COMMON,
        ),
        "FalconAttention",
        "grouped",
        2,
        rotary=True,
        impls=("eager", "sdpa"),
        attention_path="transformer.h:self_attention",
        head_out="dense",
    ),
    Family(
        "falcon-classic",
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            hidden_size=D,
            num_attention_heads=H,
            num_hidden_layers=2,
            multi_query=False,
            parallel_attn=False,
            bias=True,
            max_position_embeddings=64,
            **COMMON,
        ),
        "FalconAttention",
        "interleaved",
        H,
        rotary=True,
        impls=("eager", "sdpa"),
        attention_path="transformer.h:self_attention",
        head_out="dense",
    ),
    Family(
        "falcon-classic-alibi",
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            hidden_size=D,
            num_attention_heads=H,
            num_hidden_layers=2,
            multi_query=False,
            alibi=True,
            parallel_attn=False,
            bias=True,
            max_position_embeddings=64,
            **COMMON,
        ),
        "FalconAttention",
        "interleaved",
        H,
        alibi=True,
        impls=("eager", "sdpa"),
        attention_path="transformer.h:self_attention",
        head_out="dense",
    ),
    Family(
        "falcon-mq",
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            hidden_size=D,
            num_attention_heads=H,
            num_hidden_layers=2,
            multi_query=True,
            max_position_embeddings=64,
            **COMMON,
        ),
        "FalconAttention",
        "blocked",
        1,
        rotary=True,
        impls=("eager", "sdpa"),
        attention_path="transformer.h:self_attention",
        head_out="dense",
    ),
    Family(
        "falcon-mq-alibi",
        "FalconForCausalLM",
        "FalconConfig",
        dict(
            hidden_size=D,
            num_attention_heads=H,
            num_hidden_layers=2,
            multi_query=True,
            alibi=True,
            max_position_embeddings=64,
            **COMMON,
        ),
        "FalconAttention",
        "blocked",
        1,
        alibi=True,
        impls=("eager", "sdpa"),
        attention_path="transformer.h:self_attention",
        head_out="dense",
    ),
    Family(
        "bloom",
        "BloomForCausalLM",
        "BloomConfig",
        dict(hidden_size=D, n_head=H, n_layer=2, **COMMON),
        "BloomAttention",
        "interleaved",
        H,
        alibi=True,
        attention_path="transformer.h:self_attention",
        head_out="dense",
    ),
    Family(
        "codegen",
        "CodeGenForCausalLM",
        "CodeGenConfig",
        dict(
            n_embd=D,
            n_head=H,
            n_layer=2,
            n_positions=64,
            n_ctx=64,
            rotary_dim=8,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            **COMMON,
        ),
        "CodeGenAttention",
        "codegen",
        H,
        rotary=True,
        attention_path="transformer.h:attn",
        head_out="out_proj",
    ),
    # Separate Q, K, V projections, packed into one blocked fused weight at attach.
    Family(
        "llama3",
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
            **DECODER,
        ),
        "LlamaAttention",
        "blocked",
        2,
        rotary=True,
        impls=("eager", "sdpa"),
        attention_path="model.layers:self_attn",
        head_out="o_proj",
        quirks=("model_tables",),
    ),
    Family(
        "mistral-sliding",
        "MistralForCausalLM",
        "MistralConfig",
        dict(num_key_value_heads=2, sliding_window=4, **DECODER),
        "MistralAttention",
        "blocked",
        2,
        rotary=True,
        impls=("eager", "sdpa"),
        attention_path="model.layers:self_attn",
        head_out="o_proj",
    ),
    Family(
        "qwen2-bias-window",
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1, **DECODER),
        "Qwen2Attention",
        "blocked",
        2,
        rotary=True,
        impls=("eager", "sdpa"),
        attention_path="model.layers:self_attn",
        head_out="o_proj",
    ),
    Family(
        "qwen3",
        "Qwen3ForCausalLM",
        "Qwen3Config",
        dict(num_key_value_heads=2, head_dim=DH, **DECODER),
        "Qwen3Attention",
        "blocked",
        2,
        rotary=True,
        qk_norm=True,
        impls=("eager", "sdpa"),
        attention_path="model.layers:self_attn",
        head_out="o_proj",
        quirks=("qk_norm",),
    ),
    Family(
        "gemma-mqa",
        "GemmaForCausalLM",
        "GemmaConfig",
        dict(num_key_value_heads=1, head_dim=DH, **DECODER),
        "GemmaAttention",
        "blocked",
        1,
        rotary=True,
        impls=("eager", "sdpa"),
        attention_path="model.layers:self_attn",
        head_out="o_proj",
    ),
    Family(
        "gemma2",
        "Gemma2ForCausalLM",
        "Gemma2Config",
        dict(
            num_key_value_heads=2,
            head_dim=DH,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=30.0,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            **DECODER,
        ),
        "Gemma2Attention",
        "blocked",
        2,
        rotary=True,
        attention_path="model.layers:self_attn",
        head_out="o_proj",
        quirks=("softcap",),
    ),
    Family(
        "gemma3",
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        dict(
            num_key_value_heads=2,
            head_dim=DH,
            query_pre_attn_scalar=24,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            **DECODER,
        ),
        "Gemma3Attention",
        "blocked",
        2,
        rotary=True,
        qk_norm=True,
        impls=("eager", "sdpa"),
        attention_path="model.layers:self_attn",
        head_out="o_proj",
        quirks=("qk_norm", "model_tables"),
    ),
    Family(
        "gptj",
        "GPTJForCausalLM",
        "GPTJConfig",
        dict(
            n_embd=D,
            n_head=H,
            n_layer=2,
            n_positions=64,
            rotary_dim=8,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            **COMMON,
        ),
        "GPTJAttention",
        "blocked",
        H,
        rotary=True,
        impls=("eager", "sdpa"),
        attention_path="transformer.h:attn",
        head_out="out_proj",
        quirks=("rotary_interleaved",),
    ),
    Family(
        "opt",
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            hidden_size=D,
            num_attention_heads=H,
            num_hidden_layers=2,
            ffn_dim=128,
            max_position_embeddings=64,
            word_embed_proj_dim=D,
            dropout=0.0,
            **COMMON,
        ),
        "OPTAttention",
        "blocked",
        H,
        impls=("eager", "sdpa"),
        attention_path="model.decoder.layers:self_attn",
        head_out="out_proj",
    ),
    Family(
        "phi-qk-layernorm",
        "PhiForCausalLM",
        "PhiConfig",
        dict(qk_layernorm=True, resid_pdrop=0.0, embd_pdrop=0.0, **DECODER),
        "PhiAttention",
        "blocked",
        H,
        rotary=True,
        qk_norm=True,
        impls=("eager", "sdpa"),
        attention_path="model.layers:self_attn",
        head_out="dense",
        quirks=("qk_norm",),
    ),
    Family(
        "olmo-clip",
        "OlmoForCausalLM",
        "OlmoConfig",
        dict(clip_qkv=0.5, **DECODER),
        "OlmoAttention",
        "blocked",
        H,
        rotary=True,
        impls=("eager", "sdpa"),
        attention_path="model.layers:self_attn",
        head_out="o_proj",
        quirks=("clip_qkv",),
    ),
    Family(
        "olmo2",
        "Olmo2ForCausalLM",
        "Olmo2Config",
        dict(num_key_value_heads=2, **DECODER),
        "Olmo2Attention",
        "blocked",
        2,
        rotary=True,
        qk_norm=True,
        impls=("eager", "sdpa"),
        attention_path="model.layers:self_attn",
        head_out="o_proj",
        quirks=("qk_norm",),
    ),
    Family(
        "olmo3",
        "Olmo3ForCausalLM",
        "Olmo3Config",
        dict(num_key_value_heads=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"], **DECODER),
        "Olmo3Attention",
        "blocked",
        2,
        rotary=True,
        qk_norm=True,
        attention_path="model.layers:self_attn",
        head_out="o_proj",
    ),
    Family(
        "stablelm-per-head-ln",
        "StableLmForCausalLM",
        "StableLmConfig",
        dict(num_key_value_heads=H, qk_layernorm=True, use_qkv_bias=True, **DECODER),
        "StableLmAttention",
        "blocked",
        H,
        rotary=True,
        qk_norm=True,
        impls=("eager", "sdpa"),
        attention_path="model.layers:self_attn",
        head_out="o_proj",
        quirks=("qk_norm",),
    ),
    Family(
        "smollm3-nope",
        "SmolLM3ForCausalLM",
        "SmolLM3Config",
        dict(num_key_value_heads=2, no_rope_layers=[1, 0], **DECODER),
        "SmolLM3Attention",
        "blocked",
        2,
        rotary=(True, False),
        impls=("eager", "sdpa"),
        attention_path="model.layers:self_attn",
        head_out="o_proj",
    ),
]


def _dbrx_rope_theta(cfg):
    """transformers 5.24's DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not
    declare (its own rotary tables use config.rope_parameters): give it the same base, where it is missing."""
    if not hasattr(cfg.attn_config, "rope_theta"):
        cfg.attn_config.rope_theta = cfg.rope_parameters["rope_theta"]


def _decision_transformer_lm(cfg):
    """Decision Transformer's own GPT-2 stack (DecisionTransformerGPT2Model, whose blocks hold
    DecisionTransformerGPT2Attention) under GPT-2's LM head: the family has no token-level LM class, and
    this is the stack the Decision Transformer runs (tests/test_hf_families.py also attaches to a whole
    DecisionTransformerModel)."""
    from transformers.models.decision_transformer.modeling_decision_transformer import DecisionTransformerGPT2Model

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg.to_dict()))
    model.transformer = DecisionTransformerGPT2Model(cfg)
    return model


def _affine_qk_layernorms(model):
    """Persimmon's Q/K LayerNorms are affine: weights away from 1 (biases are already random)."""
    for name, p in model.named_parameters():
        if "q_layernorm.weight" in name or "k_layernorm.weight" in name:
            p.uniform_(0.5, 1.5)


def _decision_transformer_impls():
    """sdpa where the Decision Transformer's GPT-2 stack declares it (not every transformers does)."""
    from transformers.models.decision_transformer import modeling_decision_transformer as dt

    return (
        ("eager", "sdpa") if getattr(dt.DecisionTransformerGPT2PreTrainedModel, "_supports_sdpa", False) else ("eager",)
    )


def _neox_japanese_rope():
    """Partial RoPE (half of Dh) where the model's rotary tables honour partial_rotary_factor; some
    transformers (5.17) make full-width tables whatever the factor, which HF's own module then cannot
    apply to its rotary_ndims (a shape error inside HF): there, full RoPE."""
    from transformers.models.gpt_neox_japanese import modeling_gpt_neox_japanese as nj

    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    config = transformers.GPTNeoXJapaneseConfig(hidden_size=D, num_attention_heads=H, rope_parameters=rope)
    cos, _ = nj.GPTNeoXJapaneseRotaryEmbedding(config)(torch.zeros(1), torch.arange(2)[None])
    return rope if cos.shape[-1] == DH // 2 else {**rope, "partial_rotary_factor": 1.0}


PERSIMMON = dict(
    hidden_size=D,
    num_attention_heads=H,
    num_hidden_layers=2,
    intermediate_size=128,
    max_position_embeddings=64,
    qk_layernorm=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
)
MPT_ATTN = dict(clip_qkv=0.5, softmax_scale=0.3)  # softmax_scale != Dh^-1/2 = 0.25
DBRX_ATTN = dict(kv_n_heads=2, clip_qkv=0.5)  # clip_qkv must be set: 5.24's clamp(min=None, max=None) raises
# Phi-4-multimodal: tiny vision and audio towers (not run: no images, no audio), longrope over 0.75 of Dh,
# original_max_position_embeddings below max_position_embeddings so the model's tables carry longrope's
# attention factor (and its short factors), which the Bridge's own default tables do not.
PHI4MM = dict(
    num_key_value_heads=2,
    original_max_position_embeddings=32,
    rope_parameters={
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75,
        "short_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0],
        "long_factor": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    },
    vision_config=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        crop_size=28,
    ),
    audio_config=dict(
        hidden_size=32,
        intermediate_size=64,
        num_blocks=1,
        num_attention_heads=2,
        ext_pw_out_channel=32,
        depthwise_separable_out_channel=32,
        nemo_conv_channels=32,
    ),
    **DECODER,
)

FAMILIES += [
    # The remaining fused families.
    Family(
        "phi4-multimodal",
        "Phi4MultimodalForCausalLM",
        "Phi4MultimodalConfig",
        PHI4MM,
        "Phi4MultimodalAttention",
        "blocked",
        2,
        rotary=True,
        impls=("eager", "sdpa"),
        attention_path="model.layers:self_attn",
        head_out="o_proj",
        quirks=("model_tables",),
    ),
    Family(
        "dbrx-clip",
        "DbrxForCausalLM",
        "DbrxConfig",
        dict(
            d_model=D,
            n_heads=H,
            n_layers=2,
            max_seq_len=64,
            attn_config=DBRX_ATTN,
            ffn_config=dict(ffn_hidden_size=128, moe_num_experts=2, moe_top_k=2),
            **COMMON,
        ),  # top 2 of 2: no routing flips
        "DbrxAttention",
        "blocked",
        2,
        rotary=True,
        impls=("eager", "sdpa"),
        configure=_dbrx_rope_theta,
        attention_path="transformer.blocks:norm_attn_norm.attn",
        head_out="out_proj",
        quirks=("clip_qkv",),
    ),
    Family(
        "persimmon",
        "PersimmonForCausalLM",
        "PersimmonConfig",
        dict(**PERSIMMON, **COMMON),
        "PersimmonAttention",
        "interleaved",
        H,
        rotary=True,
        qk_norm=True,
        impls=("eager", "sdpa"),
        tweak=_affine_qk_layernorms,
        attention_path="model.layers:self_attn",
        head_out="dense",
        quirks=("qk_norm",),
    ),
    Family(
        "fuyu",
        "FuyuForCausalLM",
        "FuyuConfig",  # Persimmon as Fuyu's language model; no image patches
        dict(
            text_config=dict(model_type="persimmon", **PERSIMMON, **COMMON),
            hidden_size=D,
            patch_size=4,
            num_channels=3,
            **COMMON,
        ),
        "PersimmonAttention",
        "interleaved",
        H,
        rotary=True,
        qk_norm=True,
        impls=("eager", "sdpa"),
        tweak=_affine_qk_layernorms,
        attention_path="model.language_model.layers:self_attn",
        head_out="dense",
        quirks=("qk_norm",),
    ),
    Family(
        "mpt",
        "MptForCausalLM",
        "MptConfig",
        dict(d_model=D, n_heads=H, n_layers=2, max_seq_len=64, expansion_ratio=2, attn_config=MPT_ATTN, **COMMON),
        "MptAttention",
        "blocked",
        H,
        alibi=True,
        attention_path="transformer.blocks:attn",
        head_out="out_proj",
        quirks=("clip_qkv", "softmax_scale", "position_bias", "bool_mask_masks"),
    ),
    Family(
        "decision-transformer",
        "GPT2LMHeadModel",
        "DecisionTransformerConfig",
        dict(
            state_dim=3,
            act_dim=2,
            hidden_size=D,
            n_head=H,
            n_layer=2,
            n_positions=64,
            max_ep_len=64,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            **COMMON,
        ),
        "DecisionTransformerGPT2Attention",
        "blocked",
        H,
        impls=_decision_transformer_impls(),
        build=_decision_transformer_lm,
        attention_path="transformer.h:attn",
        head_out="c_proj",
    ),
    Family(
        "imagegpt",
        "ImageGPTForCausalImageModeling",
        "ImageGPTConfig",
        dict(
            n_embd=D,
            n_head=H,
            n_layer=2,
            n_positions=64,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            **{**COMMON, "vocab_size": VOCAB + 1},
        ),  # its LM head leaves out the last (start-of-image) token
        "ImageGPTAttention",
        "blocked",
        H,
        attention_path="transformer.h:attn",
        head_out="c_proj",
        quirks=("causal_and_mask",),
    ),
    Family(
        "neox-japanese",
        "GPTNeoXJapaneseForCausalLM",
        "GPTNeoXJapaneseConfig",
        dict(
            hidden_size=D,
            num_attention_heads=H,
            num_hidden_layers=2,
            intermediate_multiple_size=2,
            max_position_embeddings=64,
            rope_parameters=_neox_japanese_rope(),
            **COMMON,
        ),
        "GPTNeoXJapaneseAttention",
        "interleaved",
        H,
        rotary=True,
        attention_path="gpt_neox_japanese.layers:attention",
        head_out="dense",
        quirks=("dense_bias",),
    ),
    Family(
        "openai-gpt",
        "OpenAIGPTLMHeadModel",
        "OpenAIGPTConfig",
        dict(n_embd=D, n_head=H, n_layer=2, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **COMMON),
        "Attention",
        "blocked",
        H,
        attention_path="transformer.h:attn",
        head_out="c_proj",
        quirks=("causal_and_mask",),
        no_cache="GPT-1's Attention takes no KV cache (generate recomputes)",
    ),
]


def _mpt_attention_config(attn_pdrop):
    """MPT's attention config with a dropout rate: MptAttentionConfig declares attn_pdrop an int on some
    transformers versions (5.24: a float is refused by its validator), so the rate is set past it."""
    config = transformers.models.mpt.configuration_mpt.MptAttentionConfig(**MPT_ATTN)
    object.__setattr__(config, "attn_pdrop", attn_pdrop)
    return config


DROPOUT = {  # every dropout the family's attention (and the rest of the model) has, switched on
    "gpt2": dict(attn_pdrop=0.2, resid_pdrop=0.1, embd_pdrop=0.1),
    "neox": dict(attention_dropout=0.2, hidden_dropout=0.1),
    "phi3": dict(attention_dropout=0.2, resid_pdrop=0.1, embd_pdrop=0.1),
    "bigcode-mqa": dict(attn_pdrop=0.2, resid_pdrop=0.1, embd_pdrop=0.1),
    "falcon-classic-alibi": dict(attention_dropout=0.2, hidden_dropout=0.1),
    "falcon-new-arch": dict(attention_dropout=0.2, hidden_dropout=0.1),
    "bloom": dict(attention_dropout=0.2, hidden_dropout=0.1),
    "codegen": dict(attn_pdrop=0.2, resid_pdrop=0.1, embd_pdrop=0.1),
    "llama3": dict(attention_dropout=0.2),
    "qwen3": dict(attention_dropout=0.2),
    "gptj": dict(attn_pdrop=0.2, resid_pdrop=0.1, embd_pdrop=0.1),
    "opt": dict(attention_dropout=0.2, dropout=0.1),
    "phi-qk-layernorm": dict(attention_dropout=0.2, resid_pdrop=0.1, embd_pdrop=0.1),
    "phi4-multimodal": dict(attention_dropout=0.2, resid_pdrop=0.1, embd_pdrop=0.1),
    "dbrx-clip": dict(attn_config={**DBRX_ATTN, "attn_pdrop": 0.2}, resid_pdrop=0.1, emb_pdrop=0.1),
    "persimmon": dict(attention_dropout=0.2, hidden_dropout=0.1),
    "mpt": dict(attn_config=_mpt_attention_config(attn_pdrop=0.2), resid_pdrop=0.1, emb_pdrop=0.1),
    "decision-transformer": dict(attn_pdrop=0.2, resid_pdrop=0.1, embd_pdrop=0.1),
    "imagegpt": dict(attn_pdrop=0.2, resid_pdrop=0.1, embd_pdrop=0.1),
    "neox-japanese": dict(attention_dropout=0.2, hidden_dropout=0.1),
    "openai-gpt": dict(attn_pdrop=0.2, resid_pdrop=0.1, embd_pdrop=0.1),
}
FAMILIES = [replace(f, dropout=DROPOUT.get(f.id, {})) for f in FAMILIES]
IDS = [f.id for f in FAMILIES]


def _declares(fam, impl) -> bool:
    """Whether the family's model class declares the implementation (GPT-J's declares sdpa on 5.24, not on
    5.17): an implementation a model refuses to build with is not one of its rows."""
    return impl == "eager" or bool(getattr(getattr(transformers, fam.model_cls), f"_supports_{impl}", False))


WITH_IMPLS = [pytest.param(f, impl, id=f"{f.id}-{impl}") for f in FAMILIES for impl in f.impls if _declares(f, impl)]


def left_padded(device, B=3, S=10, pads=(0, 3, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    for b, n in enumerate(pads[:B]):
        am[b, :n] = 0
        ids[b, :n] = 0
    return ids.to(device), am.to(device)


def zero_head_pre_hook(head):
    """HF-side oracle for a hook_z head ablation: zero the head's slice of the output projection's input (in
    the input's dtype: the hook is copied with the model into hf_reference's float64 twin)."""

    def pre(module, args, kwargs):
        z = (args[0] if args else kwargs["input"]).clone()
        z[..., head * DH : (head + 1) * DH] = 0
        return ((z,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "input": z})

    return pre


# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_attach_finds_every_layer_with_its_layout(device, fam):
    model = fam.make(device)
    originals = fam.attentions(model)
    assert all(type(a).__name__ == fam.attention_cls for a in originals)
    h = pyqkv.hf.attach(model)
    assert len(h.bridges) == 2
    for b in h.bridges:
        assert (b.cfg.layout, b.cfg.n_heads, b.cfg.n_kv_heads, b.cfg.d_head) == (fam.layout, H, fam.n_kv_heads, DH)
    for i, b in enumerate(h.bridges):
        assert (b.cfg.rotary_dim is not None) == fam.rotary_of(i) and b.cfg.alibi == fam.alibi
        assert b.has_feature("qk_norm") == fam.qk_norm
    assert not any(type(m).__name__ == fam.attention_cls for m in model.modules())
    pyqkv.hf.detach(model)
    assert fam.attentions(model) == originals


@pytest.mark.parametrize("fam, impl", WITH_IMPLS)
def test_logits_equal_hf_on_left_padded_batch(device, fam, impl):
    model = fam.make(device, impl=impl)
    ids, am = left_padded(device)
    with torch.no_grad():
        ref = hf_reference(model, lambda m, dt: m(ids, attention_mask=am).logits)
        pyqkv.hf.attach(model)
        out = model(ids, attention_mask=am).logits
    assert not torch.isnan(out).any(), "NaN in the attached model's logits"
    keep = am.bool()
    assert_close(out[keep], ref[keep], f"{fam.id}: logits at non-padded positions vs HF {impl}")


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_patterns_equal_hf_output_attentions(device, fam):
    """Every layer's hook_pattern [B, H, S, S] equals HF's own pattern (eager) at the non-padded query rows,
    and the model-level output_attentions of the attached model returns the same."""
    model = fam.make(device)
    ids, am = left_padded(device)
    with torch.no_grad():
        ref = hf_reference(model, lambda m, dt: list(m(ids, attention_mask=am, output_attentions=True).attentions))
    h = pyqkv.hf.attach(model)
    with torch.no_grad():
        out, cache = h.run_with_cache(ids, attention_mask=am, names_filter=lambda n: n.endswith("hook_pattern"))
        attached = model(ids, attention_mask=am, output_attentions=True).attentions
    assert no_hooks_left(h)
    keep = am.bool()
    assert len(attached) == len(ref) == 2
    for i in range(2):
        got = cache[f"blocks.{i}.attn.hook_pattern"]
        assert got.shape == (3, H, 10, 10)
        rows = keep[:, None, :].expand(-1, H, -1)  # query rows that are not padding
        assert_close(got[rows], ref[i][rows], f"{fam.id} layer {i} hook_pattern vs HF's attentions")
        assert_close(attached[i][rows], ref[i][rows], f"{fam.id} layer {i} output_attentions vs HF's")
        assert not torch.isnan(got).any()


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_cached_greedy_generation_identical(device, fam):
    """Greedy generate, token for token; cached, except where the family's module takes no cache (GPT-1:
    generate then recomputes the whole prefix every step, on both sides)."""
    model = fam.make(device)
    ids, am = left_padded(device)
    kw = dict(attention_mask=am, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        pyqkv.hf.attach(model)
        out = model.generate(ids, **kw)
    assert out.tolist() == ref.tolist()


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_hook_shapes_and_head_ablation(device, fam):
    model = fam.make(device)
    ids, am = left_padded(device)
    attn = fam.attentions(model)[1]
    handle = attn.get_submodule(fam.head_out).register_forward_pre_hook(zero_head_pre_hook(2), with_kwargs=True)
    with torch.no_grad():
        ref_ablated = hf_reference(model, lambda m, dt: m(ids, attention_mask=am).logits)
    handle.remove()
    h = pyqkv.hf.attach(model)
    names = [
        "blocks.0.attn.hook_pattern",
        "blocks.1.attn.hook_k",
        "blocks.1.attn.hook_v",
        "blocks.0.attn.hook_q",
        "blocks.1.attn.hook_z",
    ]
    if fam.rotary_of(0):
        names += ["blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k"]
    if fam.qk_norm:
        names += ["blocks.0.attn.hook_q_normed", "blocks.0.attn.hook_k_normed"]
    with torch.no_grad():
        plain, cache = h.run_with_cache(ids, attention_mask=am, names_filter=names)
    Hkv = fam.n_kv_heads
    assert cache["blocks.0.attn.hook_pattern"].shape == (3, H, 10, 10)
    assert cache["blocks.1.attn.hook_k"].shape == (3, 10, Hkv, DH)
    assert cache["blocks.1.attn.hook_v"].shape == (3, 10, Hkv, DH)
    assert cache["blocks.0.attn.hook_q"].shape == (3, 10, H, DH)
    assert cache["blocks.1.attn.hook_z"].shape == (3, 10, H, DH)
    if fam.qk_norm:
        assert cache["blocks.0.attn.hook_q_normed"].shape == (3, 10, H, DH)
        assert cache["blocks.0.attn.hook_k_normed"].shape == (3, 10, Hkv, DH)
        assert not torch.equal(cache["blocks.0.attn.hook_q_normed"], cache["blocks.0.attn.hook_q"])
    else:
        with pytest.raises(
            ValueError,
            match=r"^blocks\.0\.attn\.hook_q_normed: this hook point does not fire: this layer has no query/key norm",
        ):
            h.add_hook("blocks.0.attn.hook_q_normed", lambda t, hook: None)
    if fam.rotary_of(0):
        assert cache["blocks.0.attn.hook_rot_q"].shape == (3, 10, H, DH)
        assert cache["blocks.0.attn.hook_rot_k"].shape == (3, 10, Hkv, DH)
        assert not torch.equal(cache["blocks.0.attn.hook_rot_q"], cache["blocks.0.attn.hook_q"])
    else:
        with pytest.raises(
            ValueError,
            match=r"^blocks\.0\.attn\.hook_rot_q: this hook point does not fire: this layer has no rotary embedding",
        ):
            h.add_hook("blocks.0.attn.hook_rot_q", lambda t, hook: None)

    def ablate(z, hook):
        z[:, :, 2] = 0

    with torch.no_grad(), h.hooks(fwd_hooks=[("blocks.1.attn.hook_z", ablate)]):
        ablated = model(ids, attention_mask=am).logits
    assert no_hooks_left(h) and all(no_hooks_left(b) for b in h.bridges)
    keep = am.bool()
    assert differs(plain[keep], ref_ablated[keep]), "zeroing a head changed nothing"
    assert_close(ablated[keep], ref_ablated[keep], f"{fam.id}: head 2 zeroed at hook_z vs HF with it zeroed by hand")
    with torch.no_grad():
        again = model(ids, attention_mask=am).logits
    assert torch.equal(again, plain), "something was left behind after hooks() exited"


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_hooks_by_filter_on_every_layer(device, fam):
    """hooks() and add_hook accept a name filter (a callable or a list) across all layers."""
    model = fam.make(device)
    ids, am = left_padded(device)
    h = pyqkv.hf.attach(model)
    seen = []
    with torch.no_grad(), h.hooks(fwd_hooks=[(lambda n: n.endswith("hook_k"), lambda t, hook: seen.append(hook.name))]):
        model(ids, attention_mask=am)
    assert seen == ["blocks.0.attn.hook_k", "blocks.1.attn.hook_k"]
    h.add_hook(["blocks.1.attn.hook_v", "blocks.0.attn.hook_v"], lambda t, hook: seen.append(hook.name))
    with torch.no_grad():
        model(ids, attention_mask=am)
    assert seen[2:] == ["blocks.0.attn.hook_v", "blocks.1.attn.hook_v"]
    h.reset_hooks()
    assert no_hooks_left(h)


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_continue_from_cache_filled_by_hf_and_back(device, fam):
    """A DynamicCache prefilled by the original modules is continued by the Bridges; after detach, HF's own
    modules continue the cache the Bridges filled."""
    if fam.no_cache:
        pytest.skip(fam.no_cache)
    model = fam.make(device)
    ids, _ = left_padded(device, pads=(0, 0, 0))
    nxt = torch.full((3, 1), 7, device=device)
    with torch.no_grad():
        full = hf_reference(model, lambda m, dt: m(torch.cat([ids, nxt], 1)).logits)
        cache = DynamicCache(config=model.config)
        model(ids[:, :6], past_key_values=cache, use_cache=True)
        pyqkv.hf.attach(model)
        out = model(ids[:, 6:], past_key_values=cache, use_cache=True).logits
        assert cache.get_seq_length() == 10
        pyqkv.hf.detach(model)
        back = model(nxt, past_key_values=cache, use_cache=True).logits
    assert_close(
        out, full[:, 6:10], f"{fam.id}: HF's cache continued by the attached model vs HF on the whole sequence"
    )
    assert_close(back, full[:, 10:], f"{fam.id}: the Bridges' cache continued by HF vs HF on the whole sequence")


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_detach_writes_edited_weights_back_in_the_family_layout(device, fam):
    model = fam.make(device)
    ids, am = left_padded(device)
    with torch.no_grad():
        before = model(ids, attention_mask=am).logits
    h = pyqkv.hf.attach(model)
    with torch.no_grad():
        h.bridges[0].W_Q[1].mul_(1.5)  # views: these edit the layer itself
        h.bridges[1].W_V[0].add_(0.05)
        h.bridges[1].W_O[3].mul_(0.5)
        edited = model(ids, attention_mask=am).logits
        pyqkv.hf.detach(model)
        restored = hf_reference(model, lambda m, dt: m(ids, attention_mask=am).logits)
    keep = am.bool()
    assert differs(before[keep], restored[keep]), "the edits had no effect"
    assert_close(edited[keep], restored[keep], f"{fam.id}: edited attached model vs HF with the written-back weights")


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_bridge_from_module_split_weights_match_hf_projection(device, fam):
    """W_Q, W_K, W_V (HookedTransformer format) reproduce what the module's own fused projection computes
    for each head: a check of the layout that does not go through the Bridge's forward."""
    model = fam.make(device)
    attn = fam.attentions(model)[0]
    bridge = pyqkv.hf.bridge_from_module(attn)
    x = torch.randn(2, 5, D, device=device)
    clip = bridge.cfg.clip_qkv  # OLMo's clamp comes right after the projection, before hook_q/k/v

    def projection(W, b):
        def fn(dt):
            t = torch.einsum("bsd,hde->bshe", x.to(dt), W.to(dt)) + b.to(dt)
            return t if clip is None else t.clamp(-clip, clip)

        return fn

    with torch.no_grad():
        _, cache = bridge.run_with_cache(x, names_filter=["hook_q", "hook_k", "hook_v"])
        for name, W, b in (
            ("hook_q", bridge.W_Q, bridge.b_Q),
            ("hook_k", bridge.W_K, bridge.b_K),
            ("hook_v", bridge.W_V, bridge.b_V),
        ):
            assert_close(cache[name], by_hand(projection(W, b), x.dtype), f"{fam.id} {name} vs x @ W + b by hand")


@pytest.mark.parametrize("fam", [f for f in FAMILIES if f.dropout], ids=[f.id for f in FAMILIES if f.dropout])
def test_train_mode_dropout_matches_hf_same_seed(device, fam):
    """train(): the pattern dropout and the output dropout draw in HF's order, so one seed gives HF's logits;
    gradients reach every Bridge; eval() switches them off again."""
    model = fam.make(device, **fam.dropout).train()
    ids, _ = left_padded(device, pads=(0, 0, 0))

    def hf_train(m, dt):
        torch.manual_seed(3)
        return m(ids).logits

    with torch.no_grad():
        ref = hf_reference(model, hf_train)  # the same dropout masks in float32 and float64 (same draws)
    h = pyqkv.hf.attach(model)
    assert all(b.training for b in h.bridges)
    torch.manual_seed(3)
    out = model(ids).logits
    assert_close(out, ref, f"{fam.id}: train-mode logits vs HF's with the same seed")
    out.square().mean().backward()
    assert all(b.qkv_weight.grad is not None and b.qkv_weight.grad.abs().sum() > 0 for b in h.bridges)
    model.eval()
    with torch.no_grad():
        assert differs(model(ids).logits, ref), "dropout still on after eval()"


def _storage_bytes(modules) -> int:
    """Bytes of the distinct parameter storages reachable from `modules` (shared storage counted once)."""
    seen = {}
    for m in modules:
        for p in m.parameters():
            if p.device.type != "meta":
                seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_attach_adds_no_weight_memory(device, fam):
    """The model's distinct parameter storages, the attached originals (held outside the tree) included,
    take the same bytes before attach, while attached and after detach (within 1 %)."""
    model = fam.make(device)
    before = _storage_bytes([model])
    pyqkv.hf.attach(model)
    originals = [m._original for m in model.modules() if isinstance(m, pyqkv.hf.HFAttention)]
    attached = _storage_bytes([model, *originals])
    pyqkv.hf.detach(model)
    after = _storage_bytes([model])
    assert abs(attached - before) <= 0.01 * before, f"{fam.id}: {before} bytes before attach, {attached} attached"
    assert abs(after - before) <= 0.01 * before, f"{fam.id}: {before} bytes before attach, {after} after detach"


SHARED = [f for f in FAMILIES if f.layout == "blocked"]


@pytest.mark.parametrize("fam", SHARED, ids=[f.id for f in SHARED])
def test_edit_through_the_module_projection_is_an_edit_of_the_layer(device, fam):
    """Blocked and separate-projection layouts share storage with the module: an in-place edit of the
    module's own query weight while attached equals the same edit through bridge.W_Q, and detach returns
    modules that still share it."""
    model = fam.make(device)
    ids, am = left_padded(device)
    h = pyqkv.hf.attach(model)
    original = [m._original for m in model.modules() if isinstance(m, pyqkv.hf.HFAttention)][0]
    spec = pyqkv.hf.layer_spec(original)
    with torch.no_grad():
        saved = h.bridges[0].W_Q[1].clone()
        h.bridges[0].W_Q[1].mul_(1.5)
        by_bridge = model(ids, attention_mask=am).logits
        h.bridges[0].W_Q[1].copy_(saved)  # (not div_: the module's edit below then writes the same bits)
        q_weight = spec.qkv[0].weight if isinstance(spec.qkv, tuple) else spec.qkv.weight
        head1 = (
            q_weight[DH : 2 * DH] if not spec.conv1d else q_weight[:, DH : 2 * DH]
        )  # Q rows (Linear) / columns (Conv1D) of head 1
        head1.mul_(1.5)
        by_module = model(ids, attention_mask=am).logits
    # the same weights in the same storage: the same logits, exactly
    assert torch.equal(by_module, by_bridge), f"{fam.id}: edit through the module differs from the edit through W_Q"
    pyqkv.hf.detach(model)
    keep = am.bool()  # HF's own modules give padded query rows values of their own
    with torch.no_grad():
        after = hf_reference(model, lambda m, dt: m(ids, attention_mask=am).logits)
    assert_close(by_module[keep], after[keep], f"{fam.id}: edited through the module vs HF after detach")


def _break_model_tables(h, model):
    """The model's own (cos, sin) ignored: each Bridge makes default tables from positions."""
    for m in model.modules():
        if isinstance(m, pyqkv.hf.HFAttention):
            object.__setattr__(m, "_tables", lambda pe: None)


def _break(attribute, value):
    def breaker(h, model):
        for b in h.bridges:
            setattr(b.cfg, attribute, value(b.cfg) if callable(value) else value)

    return breaker


def _break_qk_norm(h, model):
    for b in h.bridges:
        b.q_norm, b.k_norm = torch.nn.Identity(), torch.nn.Identity()


def _break_spec(**changes):
    """The attached modules read their family's LayerSpec with these fields changed."""

    def breaker(h, model):
        for m in model.modules():
            if isinstance(m, pyqkv.hf.HFAttention):
                object.__setattr__(m, "_spec", replace(m._spec, **changes))

    return breaker


def _break_position_bias(h, model):
    """MPT's position_bias ignored: no ALiBi."""
    for m in model.modules():
        if isinstance(m, pyqkv.hf.HFAttention):
            object.__setattr__(m, "_position_bias", lambda bias, K, hidden: hidden.new_zeros(1, 1, K))


def _break_dense_bias(h, model):
    """GPT-NeoX-Japanese's third return value dropped: the block adds no output bias."""
    for m in model.modules():
        if isinstance(m, pyqkv.hf.HFAttention):
            m.dense_bias = None


QUIRK_BREAKERS = {
    "clip_qkv": _break("clip_qkv", None),
    "softmax_scale": _break("scale", lambda cfg: cfg.d_head**-0.5),
    "position_bias": _break_position_bias,
    "bool_mask_masks": _break_spec(bool_mask_masks=False),  # MPT's True = masked read as True = attend
    "causal_and_mask": _break_spec(mask_rule="model"),  # the model's 4-D mask taken as authoritative
    "dense_bias": _break_dense_bias,
    "softcap": _break("softcap", None),
    "rotary_interleaved": _break("rotary_interleaved", lambda cfg: not cfg.rotary_interleaved),
    "qk_norm": _break_qk_norm,
    "model_tables": _break_model_tables,
}
WITH_QUIRKS = [pytest.param(f, q, id=f"{f.id}-{q}") for f in FAMILIES for q in f.quirks]


@pytest.mark.parametrize("fam, quirk", WITH_QUIRKS)
def test_each_quirk_matters(device, fam, quirk):
    """The family's quirk is honoured, not incidental: with it switched off in the Bridges, the attached
    model leaves HF's logits (fails the tolerance rule the quirk-on comparison passes)."""
    model = fam.make(device)
    ids, am = left_padded(device)
    keep = am.bool()
    with torch.no_grad():
        ref = hf_reference(model, lambda m, dt: m(ids, attention_mask=am).logits)[keep]
        h = pyqkv.hf.attach(model)
        assert_close(model(ids, attention_mask=am).logits[keep], ref, f"{fam.id}: logits with {quirk} vs HF")
        QUIRK_BREAKERS[quirk](h, model)
        broken = model(ids, attention_mask=am).logits[keep]
    gap = (broken - ref.hi).abs().max().item()
    assert differs(broken, ref), f"{fam.id}: switching off {quirk} moved the logits by only {gap:.1e}"


def test_unsupported_module_names_the_supported_ones():
    with pytest.raises(TypeError) as e:
        pyqkv.hf.bridge_from_module(torch.nn.Linear(4, 4))
    for name in (
        "GPT2Attention",
        "GPTNeoXAttention",
        "Phi3Attention",
        "GPTBigCodeAttention",
        "FalconAttention",
        "BloomAttention",
        "CodeGenAttention",
        "LlamaAttention",
        "Qwen3Attention",
        "Gemma3Attention",
    ):
        assert name in str(e.value)
    assert "Linear" in str(e.value)
    with pytest.raises(TypeError, match="no supported attention module.*found: MyAttention"):

        class MyAttention(torch.nn.Module):
            pass

        pyqkv.hf.attach(torch.nn.Sequential(MyAttention()))


# ----------------------------------------------------------------------------------------------------
# The remaining fused families: what the per-row checks above do not reach.

BY_ID = {f.id: f for f in FAMILIES}


def _cast(value, dtype):
    """value with every floating-point tensor in it (also inside a tuple or dict) cast to dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _module_inputs(fam, model, x):
    """What the family's model passes its attention modules besides the hidden states and the mask."""
    S = x.shape[1]
    if fam.id == "mpt":
        return dict(
            position_bias=model.transformer.build_mpt_alibi_tensor(H, model.config.max_seq_len, device=x.device)
        )
    positions = torch.arange(S, device=x.device)[None]
    return dict(
        position_ids=positions, position_embeddings=model.gpt_neox_japanese.rotary_emb(x, position_ids=positions)
    )


@pytest.mark.parametrize("fam_id", ["mpt", "neox-japanese"])
def test_module_whose_causality_is_its_mask_attends_everywhere_without_one(device, fam_id):
    """MPT and GPT-NeoX-Japanese take causality from the model's mask alone: called without a mask, HF's
    module attends to every key (future included), and so does the attached one; with the model's 4-D
    causal mask both are causal."""
    fam = BY_ID[fam_id]
    model = fam.make(device)
    x = torch.randn(2, 6, D, device=device)
    extra = _module_inputs(fam, model, x)
    causal = torch.ones(6, 6, dtype=torch.bool, device=device).tril()[None, None].expand(2, 1, 6, 6)
    causal = ~causal if fam_id == "mpt" else torch.zeros(2, 1, 6, 6, device=device).masked_fill(~causal, -3e38)

    def hf(m, dt):
        return [m(_cast(x, dt), attention_mask=_cast(mask, dt), **_cast(extra, dt))[0] for mask in (None, causal)]

    with torch.no_grad():
        ref_open, ref_causal = hf_reference(fam.attentions(model)[0], hf)
        pyqkv.hf.attach(model)
        attn = fam.attentions(model)[0]
        assert isinstance(attn, pyqkv.hf.HFAttention)
        out_open = attn(x, attention_mask=None, **extra)[0]
        out_causal = attn(x, attention_mask=causal, **extra)[0]
    assert_close(out_open, ref_open, f"{fam_id}: no mask, attached module vs HF's")
    assert_close(out_causal, ref_causal, f"{fam_id}: the causal mask, attached module vs HF's")
    assert differs(out_open, ref_causal), f"{fam_id}: no mask gave the causal output"


def test_mpt_and_neox_japanese_reject_masks_their_modules_cannot_read(device):
    mpt = BY_ID["mpt"].make(device)
    x = torch.randn(2, 5, D, device=device)
    table = mpt.transformer.build_mpt_alibi_tensor(H, 64, device=device)  # [H, 1, 64]
    pyqkv.hf.attach(mpt)
    attn = BY_ID["mpt"].attentions(mpt)[0]
    bool_mask = torch.zeros(2, 1, 5, 5, dtype=torch.bool, device=device)
    with pytest.raises(
        TypeError,
        match=r"^attention_mask: MptAttention takes a 4-D bool mask \[B, 1, S, K\] whose "
        r"True means masked .*got torch.float32 of shape \(2, 1, 5, 5\)",
    ):
        attn(x, position_bias=table, attention_mask=torch.zeros(2, 1, 5, 5, device=device))
    with pytest.raises(
        ValueError,
        match=r"^position_bias: expected MPT's ALiBi table \[H, 1, L\] with H = 4, got "
        r"shape \(4, 5, 64\)",
    ):
        attn(x, position_bias=table.expand(H, 5, 64), attention_mask=bool_mask)
    with pytest.raises(ValueError, match=r"^position_bias: the ALiBi table covers L = 3 key positions .*K = 5"):
        attn(x, position_bias=table[..., :3], attention_mask=bool_mask)
    with pytest.raises(TypeError, match=r"^hidden_states: expected a Tensor \[B, S, D\], got list"):
        attn([x], position_bias=table, attention_mask=bool_mask)
    fam = BY_ID["neox-japanese"]
    model = fam.make(device)
    extra = _module_inputs(fam, model, x)
    pyqkv.hf.attach(model)
    with pytest.raises(
        ValueError,
        match=r"^attention_mask: GPTNeoXJapaneseAttention takes its causal mask from a "
        r"4-D mask \[B, 1, S, K\] .*got shape \(2, 5\)",
    ):
        fam.attentions(model)[0](x, attention_mask=torch.ones(2, 5, device=device), **extra)


def test_openai_gpt_minus_1e4_future_fill_equals_hiding_the_future(device):
    """GPT-1's causal buffer replaces every future score with -1e4, not the dtype's minimum, so pyqkv's
    mask rule would not count it as hidden; the Bridge hides the future outright instead. The two are equal
    on every row that has a visible score above -1e4 + 104: exp(-1e4 - max) underflows to exactly 0 in
    float32. Checked with scores far larger than any tiny config gives (c_attn x 8), where HF's future
    weights are exactly 0. The one difference: a row with no visible key (a left-padded query) gets HF's
    weight on the future keys, and zeros (no NaN) from pyqkv; such rows are padding."""
    fam = BY_ID["openai-gpt"]
    model = fam.make(device)
    attn = fam.attentions(model)[0]
    with torch.no_grad():
        attn.c_attn.weight.mul_(8.0)
    _, am = left_padded(device)
    x = torch.randn(3, 10, D, device=device)

    def mask(dt):  # as OpenAIGPTModel builds it, in its dtype
        return (1.0 - am[:, None, None, :].to(dt)) * torch.finfo(dt).min

    with torch.no_grad():
        q, k, _ = attn.c_attn(x).split(D, dim=2)
        scores = torch.einsum("bshd,bkhd->bhsk", q.view(3, 10, H, DH), k.view(3, 10, H, DH)) / DH**0.5
        ref, ref_pattern = hf_reference(
            attn, lambda m, dt: list(m(x.to(dt), attention_mask=mask(dt), output_attentions=True))
        )
        pyqkv.hf.attach(model)
        out, pattern = fam.attentions(model)[0](x, attention_mask=mask(torch.float32), output_attentions=True)
    assert scores.abs().max() > 200, "the scores are not large: the check would be weak"
    keep = am.bool()
    future = torch.ones(10, 10, dtype=torch.bool, device=device).triu(1)
    visible_row_future = keep[:, None, :, None] & future  # [B, 1, S, K]: future keys of non-padded queries
    assert (ref_pattern.lo[visible_row_future.expand_as(ref_pattern.lo)] == 0).all(), (
        "HF's -1e4 fill left weight on a future key"
    )
    assert_close(out[keep], ref[keep], "GPT-1 output with large scores vs HF's")
    by_query = ref_pattern.map(lambda p: p.transpose(1, 2))
    assert_close(pattern.transpose(1, 2)[keep], by_query[keep], "GPT-1 pattern at non-padded queries vs HF's")
    # Row 0 of sequence 1 is padding: every key it may see is padded, and HF puts its weight on the future.
    ones = by_hand(lambda dt: torch.ones(H, dtype=dt, device=device), torch.float32)
    assert_close(ref_pattern.lo[1, :, 0, 3:].sum(-1), ones, "HF's weight on the future keys of a padded query")
    assert (pattern[1, :, 0] == 0).all() and not torch.isnan(out).any()


def test_gpt1_is_matched_by_its_qualified_name_not_any_attention_class():
    """GPT-1's module class is called just `Attention`: a class of that name from anywhere else is not
    taken for it (attach finds nothing to wrap, rather than failing to read a foreign module)."""

    class Attention(torch.nn.Module):
        pass

    assert pyqkv.hf.family_of(Attention()) is None
    assert "transformers.models.openai.modeling_openai.Attention" in pyqkv.hf.SUPPORTED
    with pytest.raises(TypeError, match="no supported attention module.*found: Attention"):
        pyqkv.hf.attach(torch.nn.Sequential(Attention()))


def test_decision_transformer_model_attached_equals_hf(device):
    """The whole DecisionTransformerModel (states, actions, returns-to-go in, three tokens per timestep),
    left-padded: its predictions at the non-padded timesteps equal HF's."""
    cfg = transformers.DecisionTransformerConfig(
        state_dim=3,
        act_dim=2,
        hidden_size=D,
        n_head=H,
        n_layer=2,
        n_positions=64,
        max_ep_len=64,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.DecisionTransformerModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or "bias" in name:
                p.normal_(0.0, 0.2 if p.dim() >= 2 else 0.05)
    model = model.to(device).eval()
    B, T = 3, 6
    g = torch.Generator().manual_seed(2)
    inputs = dict(
        states=torch.randn(B, T, 3, generator=g),
        actions=torch.randn(B, T, 2, generator=g),
        rewards=torch.randn(B, T, 1, generator=g),
        returns_to_go=torch.randn(B, T, 1, generator=g),
        timesteps=torch.arange(T).expand(B, T).contiguous(),
    )
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    inputs = {k: v.to(device) for k, v in inputs.items()}
    names = ("state_preds", "action_preds", "return_preds")

    def hf(m, dt):
        got = m(**_cast(inputs, dt), attention_mask=mask.to(device))
        return {name: getattr(got, name) for name in names}

    with torch.no_grad():
        ref = hf_reference(model, hf)
        h = pyqkv.hf.attach(model)
        out = model(**inputs, attention_mask=mask.to(device))
    assert len(h.bridges) == 2
    keep = mask.bool().to(device)
    for name in names:
        assert_close(getattr(out, name)[keep], ref[name][keep], f"Decision Transformer {name} vs HF's")


def test_bridge_causal_keyword_applies_causal_and_the_mask(device):
    """Bridge.forward(causal=...): None keeps the rule (a 4-D mask is authoritative); True is the causal mask
    AND the given mask, whatever its form (what ImageGPT's and GPT-1's glue ask for); False is the mask
    alone (and no mask at all: every key)."""
    torch.manual_seed(0)
    B, S = 2, 5
    weight, out_weight = torch.randn(D, 3 * D) * 0.2, torch.randn(D, D) * 0.2
    bridge = pyqkv.Bridge(weight, None, out_weight, None, n_heads=H, d_head=DH)
    oracle = Oracle(weight, None, out_weight, None, n_heads=H, d_head=DH)  # written out with the mask it is given
    x = torch.randn(B, S, D)
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, :2] = False
    minimum = torch.finfo(torch.float32).min
    bidirectional = torch.zeros(B, 1, S, S).masked_fill(~pad[:, None, None, :], minimum)  # padding only
    tril = torch.ones(S, S, dtype=torch.bool).tril()
    folded = bidirectional.masked_fill(~tril, minimum)  # the same padding with causality folded in
    with torch.no_grad():
        assert torch.equal(bridge(x, bidirectional, causal=None), bridge(x, bidirectional))
        causal_and_mask = oracle(x, mask=folded, causal=False)
        assert_close(
            bridge(x, bidirectional, causal=True), causal_and_mask, "causal AND a 4-D mask vs the folded mask by hand"
        )
        assert differs(bridge(x, bidirectional), causal_and_mask), "a 4-D mask alone was made causal"
        assert_close(bridge(x, None, causal=False), oracle(x, causal=False), "no mask, not causal vs every key by hand")
        assert_close(
            bridge(x, pad, causal=False),
            oracle(x, mask=bidirectional, causal=False),
            "padding alone vs the padding mask by hand",
        )
        assert torch.equal(bridge(x, pad, causal=True), bridge(x, pad)), (
            "padding and causal differs from the default rule"
        )
    with pytest.raises(TypeError, match=r"^causal: expected a bool, got str"):
        bridge(x, causal="yes")
