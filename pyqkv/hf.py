"""Hugging Face glue: Bridge.from_hf for single modules, attach(model) / detach(model) for whole models.

Families (FAMILIES below, one function each reading a module into a LayerSpec): GPT-2 (Conv1D, blocked),
GPT-NeoX / Pythia (interleaved, partial RoPE), Phi-3 (blocked GQA, RoPE), GPT-BigCode (blocked MQA or
interleaved MHA), Falcon (grouped GQA for new_decoder_architecture, interleaved classic, blocked
multi_query; RoPE or ALiBi), Bloom (interleaved, ALiBi, residual added inside attention), CodeGen (codegen
layout, rotate-every-two RoPE over rotary_dim).

The only module of pyqkv that knows Hugging Face; it recognizes modules by class name, so importing it
does not import transformers. A Bridge copies the weights it needs from the module: it keeps no
reference to the model.

    h = pyqkv.hf.attach(model)              # every supported attention module becomes a Bridge behind its convention
    logits, cache = h.run_with_cache(input_ids, names_filter=["blocks.0.attn.hook_pattern"])
    with h.hooks(fwd_hooks=[("blocks.3.attn.hook_z", ablate_head_5)]):
        model.generate(input_ids, max_new_tokens=8)
    pyqkv.hf.detach(model)                  # the original modules, with the Bridge's current weights
"""

from __future__ import annotations

import inspect
import sys
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from pyqkv import ops
from pyqkv.bridge import Bridge
from pyqkv.cache import KVCache
from pyqkv.hooks import HookedMixin

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
    return LayerSpec(
        "CodeGen", m.qkv_proj, m.out_proj, conv1d=False, layout="codegen",
        bridge_kwargs=dict(
            n_heads=m.num_attention_heads, d_head=m.head_dim, scale=1.0 / m.scale_attn,
            rotary_dim=m.rotary_dim, rotary_interleaved=True,
            attn_dropout=_dropout_p(m.attn_dropout), resid_dropout=_dropout_p(m.resid_dropout),
        ),
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


def _family(module) -> Optional[str]:
    for cls in type(module).__mro__:
        if cls.__name__ in FAMILIES:
            return cls.__name__
    return None


def layer_spec(module) -> LayerSpec:
    """The LayerSpec of a supported Hugging Face attention module; TypeError naming the supported ones else."""
    family = _family(module)
    if family is None:
        raise TypeError(f"module: expected one of {', '.join(SUPPORTED)}, got {type(module).__name__}")
    return FAMILIES[family](module)


def bridge_from_module(module, spec: Optional[LayerSpec] = None, **flags) -> Bridge:
    """A Bridge equal to `module` (a Hugging Face attention module of a supported family)."""
    spec = layer_spec(module) if spec is None else spec
    bridge = Bridge(
        spec.qkv.weight,
        getattr(spec.qkv, "bias", None),
        spec.out.weight,
        getattr(spec.out, "bias", None),
        layout=spec.layout,
        conv1d=spec.conv1d,
        **spec.bridge_kwargs,
        **flags,
    )
    return bridge.train(module.training)  # dropout follows the wrapped module's mode


def _write_back(bridge: Bridge, spec: LayerSpec) -> None:
    """Copy the Bridge's (possibly edited or trained) weights into the original module, in its own layout."""
    with torch.no_grad():
        b = bridge
        weight, bias = ops.pack_qkv(b.W_Q, b.W_K, b.W_V, *(
            (b.b_Q, b.b_K, b.b_V) if b.qkv_bias is not None else ()), layout=spec.layout, conv1d=spec.conv1d)
        spec.qkv.weight.copy_(weight)
        if getattr(spec.qkv, "bias", None) is not None and bias is not None:
            spec.qkv.bias.copy_(bias)
        spec.out.weight.copy_(b.out_weight if spec.conv1d else b.out_weight.t())
        if getattr(spec.out, "bias", None) is not None and b.out_bias is not None:
            spec.out.bias.copy_(b.out_bias)


class HFAttention(nn.Module):
    """A Bridge behind a Hugging Face attention module's calling convention, in place of the module.

    Called exactly as the original (its forward's signature binds the arguments): the hidden states; the
    cache under `past_key_values`, `layer_past` or `cache` (a transformers Cache or a pyqkv.KVCache); HF's
    mask (4-D additive or bool, or None); and, as the family passes them, `position_embeddings` (cos, sin),
    `position_ids`, `alibi` and `residual`. Returns (attn_output, attn_weights) as HF expects; attn_weights
    is the pattern when output_attentions is set.
    """

    def __init__(self, bridge: Bridge, original: nn.Module, layer_idx: int, spec: LayerSpec):
        super().__init__()
        self.bridge = bridge
        self.layer_idx = layer_idx
        # Kept outside the Module tree so its parameters appear neither in state_dict nor in parameters().
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_spec", spec)
        object.__setattr__(self, "_signature", inspect.signature(type(original).forward))
        # HF cache object -> our preallocated KVCache for this layer; dies with the HF cache.
        object.__setattr__(self, "_kv", weakref.WeakKeyDictionary())

    def forward(self, *args, **kwargs):
        try:
            bound = self._signature.bind(self._original, *args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self._original).__name__} (attached to pyqkv): {e}") from None
        a = dict(bound.arguments)
        a.update(a.pop("kwargs", {}))
        hidden_states = a["hidden_states"]
        if a.get("encoder_hidden_states") is not None:
            raise NotImplementedError("pyqkv Bridge: cross-attention is not supported")
        hf_cache = next((a.get(n) for n in ("past_key_values", "layer_past", "cache") if a.get(n) is not None), None)
        output_attentions = bool(a.get("output_attentions"))
        call = dict(attention_mask=a.get("attention_mask"), position_embeddings=a.get("position_embeddings"),
                    position_ids=a.get("position_ids"), alibi=self._alibi(a.get("alibi"), output_attentions))
        if self.bridge.cfg.rotary_dim is None:
            call.pop("position_embeddings"), call.pop("position_ids")
        elif call["position_embeddings"] is not None:
            call.pop("position_ids")  # the model's own cos/sin win (SPEC §4)

        captured = {}
        handle = None
        recorder = _attention_recorder()  # model-level output_attentions (transformers >= 5)
        if output_attentions or recorder is not None:
            handle = self.bridge.hook_points()["hook_pattern"].add(lambda t, hook: captured.setdefault("p", t))
        try:
            if hf_cache is None or isinstance(hf_cache, KVCache):
                out = self.bridge(hidden_states, kv_cache=hf_cache, **call)
            else:
                out = self._forward_with_hf_cache(hidden_states, hf_cache, call)
        finally:
            if handle is not None:
                handle.remove()
        if self._spec.residual_inside:
            out = out + a["residual"]
        pattern = captured.get("p")
        if recorder is not None and pattern is not None:
            recorder.append(pattern)
        return out, pattern

    def hand_back_caches(self, spec: LayerSpec) -> None:
        """Leave every live Hugging Face cache this layer mirrored in the form the original module expects.
        Falcon's grouped layout caches K/V broadcast over each query group (hf_cache_heads = H), while the
        mirror holds Hkv heads: expand them once, here, so HF's own module can continue the cache."""
        heads = spec.hf_cache_heads
        Hkv = self.bridge.cfg.n_kv_heads
        if heads is None or heads == Hkv:
            return
        for hf_cache in list(self._kv.keys()):
            layers = getattr(hf_cache, "layers", ())
            layer = layers[self.layer_idx] if self.layer_idx < len(layers) else None
            keys = getattr(layer, "keys", None)
            if keys is not None and keys.dim() == 4 and keys.shape[1] == Hkv:
                layer.keys = keys.repeat_interleave(heads // Hkv, dim=1)
                layer.values = layer.values.repeat_interleave(heads // Hkv, dim=1)
            self._kv.pop(hf_cache, None)

    def _alibi(self, alibi, output_attentions: bool):
        """The model's alibi tensor as the Bridge adds it to the scaled scores, or None."""
        spec = self._spec
        if spec.alibi_scale is None or alibi is None:
            return None
        if spec.alibi_in_mask_with_sdpa and not output_attentions and _attn_implementation(self._original) == "sdpa":
            # The model folded alibi into the mask, and the module's SDPA path adds nothing more.
            return alibi.new_zeros(1, 1, alibi.shape[-1])
        return alibi if spec.alibi_scale == 1.0 else alibi * spec.alibi_scale

    def _forward_with_hf_cache(self, hidden_states, hf_cache, call: dict):
        if isinstance(hf_cache, tuple):
            raise TypeError(
                "past_key_values: legacy tuple caches are not supported; pass a transformers Cache "
                "(e.g. DynamicCache) or a pyqkv.KVCache"
            )
        if not hasattr(hf_cache, "update"):
            raise TypeError(f"past_key_values: expected a transformers Cache or pyqkv.KVCache, got {type(hf_cache).__name__}")
        self_cache = getattr(hf_cache, "self_attention_cache", hf_cache)  # EncoderDecoderCache
        idx = self.layer_idx
        layer = self_cache.layers[idx] if idx < len(getattr(self_cache, "layers", ())) else None
        ours = self._kv.get(self_cache)
        # Our storage stays authoritative while HF's layer still holds our views; anything else (a cache
        # filled by other code, beam reordering, cropping) is loaded afresh from HF's tensors.
        in_sync = (
            ours is not None
            and layer is not None
            and ours.k_storage is not None
            and getattr(layer, "keys", None) is not None
            and layer.keys.numel() > 0
            and layer.keys.data_ptr() == ours.k_storage.data_ptr()
            and layer.keys.shape[-2] == ours.length
        )
        if not in_sync:
            ours = KVCache()
            past = self_cache.get_seq_length(idx) if layer is not None else 0
            if past:
                keys, values = layer.keys, layer.values  # [B, heads, K, Dh]
                Hkv = self.bridge.cfg.n_kv_heads
                if keys.shape[1] != Hkv and keys.shape[1] % Hkv == 0:
                    # Filled by a module that broadcasts each KV head over its query group (Falcon's
                    # grouped layout): the group's copies are equal, keep the first of each.
                    step = keys.shape[1] // Hkv
                    keys, values = keys[:, ::step], values[:, ::step]
                ours.load(keys.transpose(1, 2), values.transpose(1, 2))
            self._kv[self_cache] = ours
        past = ours.length
        out = self.bridge(hidden_states, kv_cache=ours, **call)
        keys_hf = ours.k_storage[:, :, : ours.length]  # [B, Hkv, K, Dh]: HF's layout, a view of our storage
        values_hf = ours.v_storage[:, :, : ours.length]
        if type(layer).__name__ == "DynamicLayer" or (layer is None and _replicates_dynamic(self_cache)):
            if layer is None or not layer.is_initialized:
                # Let HF create and initialize the layer (and any before it) through its own code path.
                self_cache.update(keys_hf[:, :, :0], values_hf[:, :, :0], idx)
                layer = self_cache.layers[idx]
            # Mirror views of our preallocated storage: HF sees the right length, no torch.cat per step.
            layer.keys, layer.values = keys_hf, values_hf
        else:  # any other cache type keeps its own storage: give it the new rows the ordinary way
            self_cache.update(keys_hf[:, :, past:], values_hf[:, :, past:], idx)
        return out


def _attn_implementation(module) -> Optional[str]:
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None)


def _output_capturing():
    """transformers' output-capturing module (transformers >= 5) when transformers is loaded, else None.
    Looked up in sys.modules: this module never imports transformers itself."""
    return sys.modules.get("transformers.utils.output_capturing")


def _attention_recorder():
    """The list transformers >= 5 collects `output_attentions` patterns into during this forward, or None.
    HF fills it from forward hooks on its attention classes, which an HFAttention is not, so HFAttention
    appends its pattern itself."""
    collector = getattr(_output_capturing(), "_active_collector", None)
    collected = collector.get() if collector is not None else None
    recorder = collected.get("attentions") if isinstance(collected, dict) else None
    return recorder if isinstance(recorder, list) else None


def _install_hf_recording_hooks(model: nn.Module, target_names) -> None:
    """transformers >= 5 installs its output-recording hooks on the first output_attentions request, on
    the model whose forward records (the nearest PreTrainedModel above the attention modules). Let it do
    so now, while the original modules are in the tree: after detach they record again."""
    install = getattr(_output_capturing(), "maybe_install_capturing_hooks", None)
    if install is None:
        return
    owners = {}
    for name in target_names:
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            owner = model.get_submodule(".".join(parts[:i]))
            if hasattr(owner, "_can_record_outputs") and hasattr(owner, "config"):
                owners[id(owner)] = owner
                break
    for owner in owners.values():
        install(owner)


def _replicates_dynamic(cache) -> bool:
    cls = getattr(cache, "layer_class_to_replicate", None)
    return cls is not None and cls.__name__ == "DynamicLayer"


class AttachedModel(HookedMixin):
    """Model-level hooks over every Bridge of an attached model, named `blocks.{i}.attn.hook_*`.

    Calling it calls the model. `run_with_cache(*args, names_filter=..., **kwargs)` returns (model
    output, cache); `hooks(...)`, `add_hook(...)`, `reset_hooks()` work as on a Bridge.
    """

    def __init__(self, model: nn.Module, bridges: list):
        self._model_ref = weakref.ref(model)
        self.bridges = bridges  # index i -> Bridge of block i
        self._points = {}
        self._aliases = {}
        self._owner = {}
        for i, bridge in enumerate(bridges):
            prefix = f"blocks.{i}.attn."
            bridge.set_hook_prefix(prefix)
            for name, point in bridge.hook_points().items():
                self._points[prefix + name] = point
                self._owner[prefix + name] = (bridge, name)
            for alias, target in bridge.hook_aliases().items():
                self._aliases[prefix + alias] = prefix + target

    @property
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("the attached model no longer exists")
        return model

    def hook_points(self) -> dict:
        return self._points

    def hook_aliases(self) -> dict:
        return self._aliases

    def hook_gate(self, name: str) -> Optional[str]:
        bridge, local = self._owner[name]
        return bridge.hook_gate(local)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return f"AttachedModel({type(self.model).__name__}, {len(self.bridges)} bridges)"


def attach(model: nn.Module, **flags) -> AttachedModel:
    """Replace, in place, every supported attention module of `model` with a Bridge (behind HF's
    calling convention). Flags (use_split_qkv_input, use_attn_in, use_attn_result) apply to every Bridge.
    Returns the model-level hook handle. Raises TypeError if the model has no supported module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, HFAttention) for m in model.modules()):
        raise ValueError("model: already attached (call pyqkv.hf.detach(model) first)")
    # Cross-attention modules (GPT-2 with add_cross_attention) stay Hugging Face's own.
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if _family(m) is not None and not getattr(m, "is_cross_attention", False)
    ]
    if not targets:
        found = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
        raise TypeError(
            f"model: no supported attention module found (supported: {', '.join(SUPPORTED)}; found: "
            f"{', '.join(found) or 'none'})"
        )
    # Build every Bridge first: an unsupported configuration raises before the model is touched.
    built = []
    for name, m in targets:
        spec = layer_spec(m)
        built.append((name, m, spec, bridge_from_module(m, spec, **flags)))
    _install_hf_recording_hooks(model, [name for name, _ in targets])
    bridges = []
    for i, (name, module, spec, bridge) in enumerate(built):
        layer_idx = module.layer_idx if getattr(module, "layer_idx", None) is not None else i
        _set_submodule(model, name, HFAttention(bridge, module, layer_idx, spec).train(module.training))
        bridges.append(bridge)
    return AttachedModel(model, bridges)


def detach(model: nn.Module) -> None:
    """Restore the original attention modules, carrying over the Bridges' current weights."""
    for name, module in list(model.named_modules()):
        if isinstance(module, HFAttention):
            original = module._original
            # The model may have been moved, cast, or switched between train() and eval() while attached:
            # the original (outside the Module tree, so left behind) follows the Bridge.
            weight = module.bridge.qkv_weight
            original.to(device=weight.device, dtype=weight.dtype).train(module.training)
            spec = layer_spec(original)
            _write_back(module.bridge, spec)
            module.hand_back_caches(spec)
            _set_submodule(model, name, original)


def _set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
