"""Hugging Face glue: Bridge.from_hf for single modules, attach(model) / detach(model) for whole models.

The only module of pyqkv that knows Hugging Face; it recognizes modules by class name, so importing it
does not import transformers. A Bridge copies the weights it needs from the module: it keeps no
reference to the model.

    h = pyqkv.hf.attach(model)              # every GPT2Attention becomes a Bridge behind HF's convention
    logits, cache = h.run_with_cache(input_ids, names_filter=["blocks.0.attn.hook_pattern"])
    with h.hooks(fwd_hooks=[("blocks.3.attn.hook_z", ablate_head_5)]):
        model.generate(input_ids, max_new_tokens=8)
    pyqkv.hf.detach(model)                  # the original modules, with the Bridge's current weights
"""

from __future__ import annotations

import sys
import weakref
from typing import Optional

import torch
from torch import nn

from pyqkv.bridge import Bridge
from pyqkv.cache import KVCache
from pyqkv.hooks import HookedMixin

SUPPORTED = ("GPT2Attention",)


def _family(module) -> Optional[str]:
    for cls in type(module).__mro__:
        if cls.__name__ in SUPPORTED:
            return cls.__name__
    return None


def bridge_from_module(module, **flags) -> Bridge:
    """A Bridge equal to `module` (a Hugging Face attention module of a supported family)."""
    family = _family(module)
    if family is None:
        raise TypeError(f"module: expected one of {', '.join(SUPPORTED)}, got {type(module).__name__}")
    if getattr(module, "is_cross_attention", False):
        raise ValueError("module: a cross-attention GPT2Attention is not supported (self-attention only)")
    bridge = Bridge(
        module.c_attn.weight,
        module.c_attn.bias,
        module.c_proj.weight,
        module.c_proj.bias,
        n_heads=module.num_heads,
        d_head=module.head_dim,
        layout="blocked",
        conv1d=True,  # GPT-2's Conv1D stores [in, out]
        layer_idx=module.layer_idx,
        scale_attn_weights=module.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=module.scale_attn_by_inverse_layer_idx,
        reorder_and_upcast_attn=module.reorder_and_upcast_attn,
        attn_dropout=module.attn_dropout.p,
        resid_dropout=module.resid_dropout.p,
        **flags,
    )
    return bridge.train(module.training)  # dropout follows the wrapped module's mode


def _write_back(bridge: Bridge, module) -> None:
    """Copy the Bridge's (possibly edited or trained) weights into the original GPT2Attention."""
    with torch.no_grad():
        module.c_attn.weight.copy_(bridge.qkv_weight)  # blocked, [in, out]: GPT-2's own layout
        if module.c_attn.bias is not None and bridge.qkv_bias is not None:
            module.c_attn.bias.copy_(bridge.qkv_bias)
        module.c_proj.weight.copy_(bridge.out_weight)
        if module.c_proj.bias is not None and bridge.out_bias is not None:
            module.c_proj.bias.copy_(bridge.out_bias)


class HFAttention(nn.Module):
    """A Bridge behind Hugging Face's attention calling convention, in place of the original module.

    Takes the hidden states, the cache under any of `past_key_values`, `layer_past` or `cache` (a
    transformers Cache or a pyqkv.KVCache), HF's mask (4-D additive or bool, or None), and returns
    (attn_output, attn_weights) as HF expects; attn_weights is the pattern when output_attentions is set.
    """

    def __init__(self, bridge: Bridge, original: nn.Module, layer_idx: int):
        super().__init__()
        self.bridge = bridge
        self.layer_idx = layer_idx
        # Kept outside the Module tree so its parameters appear neither in state_dict nor in parameters().
        object.__setattr__(self, "_original", original)
        # HF cache object -> our preallocated KVCache for this layer; dies with the HF cache.
        object.__setattr__(self, "_kv", weakref.WeakKeyDictionary())

    def forward(self, hidden_states, past_key_values=None, attention_mask=None, layer_past=None, cache=None,
                output_attentions: bool = False, encoder_hidden_states=None, **kwargs):
        if encoder_hidden_states is not None:
            raise NotImplementedError("pyqkv Bridge: cross-attention is not supported")
        hf_cache = next((c for c in (past_key_values, layer_past, cache) if c is not None), None)
        captured = {}
        handle = None
        recorder = _attention_recorder()  # model-level output_attentions (transformers >= 5)
        if output_attentions or recorder is not None:
            handle = self.bridge.hook_points()["hook_pattern"].add(lambda t, hook: captured.setdefault("p", t))
        try:
            if hf_cache is None or isinstance(hf_cache, KVCache):
                out = self.bridge(hidden_states, attention_mask=attention_mask, kv_cache=hf_cache)
            else:
                out = self._forward_with_hf_cache(hidden_states, attention_mask, hf_cache)
        finally:
            if handle is not None:
                handle.remove()
        pattern = captured.get("p")
        if recorder is not None and pattern is not None:
            recorder.append(pattern)
        return out, pattern

    def _forward_with_hf_cache(self, hidden_states, attention_mask, hf_cache):
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
                ours.load(layer.keys.transpose(1, 2), layer.values.transpose(1, 2))
            self._kv[self_cache] = ours
        past = ours.length
        out = self.bridge(hidden_states, attention_mask=attention_mask, kv_cache=ours)
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


def _output_capturing():
    """transformers' output-capturing module (transformers >= 5) when transformers is loaded, else None.
    Looked up in sys.modules: this module never imports transformers itself."""
    return sys.modules.get("transformers.utils.output_capturing")


def _attention_recorder():
    """The list transformers >= 5 collects `output_attentions` patterns into during this forward, or None.
    HF fills it from forward hooks on GPT2Attention modules, which an HFAttention is not, so HFAttention
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
    built = [(name, m, bridge_from_module(m, **flags)) for name, m in targets]
    _install_hf_recording_hooks(model, [name for name, _ in targets])
    bridges = []
    for i, (name, module, bridge) in enumerate(built):
        layer_idx = module.layer_idx if getattr(module, "layer_idx", None) is not None else i
        _set_submodule(model, name, HFAttention(bridge, module, layer_idx).train(module.training))
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
            _write_back(module.bridge, original)
            _set_submodule(model, name, original)


def _set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
