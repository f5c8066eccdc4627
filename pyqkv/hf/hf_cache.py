"""Mirroring a Hugging Face cache into a pyqkv KVCache, per layer.

A Bridge appends to its own preallocated KVCache in place (no torch.cat per token). Inside a Hugging Face
model the cache the model holds is a transformers Cache; each attached layer keeps a KVCache per live HF
cache object and shows HF views of its storage, so HF sees the right length and contents (generate's
bookkeeping, get_seq_length) while the data is written once. Anything HF changed behind our back (a
cache filled by other code, beam reordering, cropping) is noticed and loaded afresh.

The KVCaches live on the HF cache object itself (one attribute, a dict by layer index), not in a table
the mirror keeps: they die with it, and under torch.compile a forward that creates its own cache (the
default use_cache=True) mutates only an object it created, so nothing outside the graph changes and no
guard on a table's contents makes every call recompile.
"""

from __future__ import annotations

import weakref

import torch

from pyqkv.cache import ExternalKV, KVCache
from pyqkv.checks import describe

# The attribute of a transformers Cache (its self-attention cache) that holds {layer index: KVCache}.
MIRRORS_ATTR = "_pyqkv_mirrors"


class CacheMirror:
    """One attached layer's view of the KVCaches it keeps on live Hugging Face cache objects.

    hand_back_heads: the head count the original module caches when it differs from the Bridge's Hkv
    (Falcon's grouped layout broadcasts each KV head over its query group); only then does the mirror
    remember which caches it touched (weakly), so that detach can expand them for the original module."""

    def __init__(self, layer_idx: int, hand_back_heads=None):
        self.layer_idx = layer_idx
        self.hand_back_heads = hand_back_heads
        self._touched = weakref.WeakSet() if hand_back_heads is not None else None

    def run(self, bridge, hidden_states, hf_cache, call: dict):
        """bridge(hidden_states, kv_cache=<this layer's mirror of hf_cache>, **call), then hf_cache updated."""
        self_cache = getattr(hf_cache, "self_attention_cache", hf_cache)  # EncoderDecoderCache
        idx = self.layer_idx
        layers = getattr(self_cache, "layers", None)
        layer = layers[idx] if layers is not None and idx < len(layers) else None
        if getattr(layer, "is_compileable", False):  # a StaticCache layer: HF's own fixed buffers, written by HF
            return bridge(hidden_states, kv_cache=StaticLayerKV(self_cache, idx, call, hidden_states.shape[1]), **call)
        mirrors = getattr(self_cache, MIRRORS_ATTR, None) if layers is not None else None  # (no layers: refused below)
        ours = None if mirrors is None else mirrors.get(idx)
        # In sync while HF's layer still holds the very views this mirror handed it after the last step
        # (crop, beam reordering or another writer replace them): one identity check per step.
        if ours is None or layer is None or ours._views is None or getattr(layer, "keys", None) is not ours._views[2]:
            ours = self._load(bridge, self_cache, layer)
        past = ours.length
        out = bridge(hidden_states, kv_cache=ours, **call)
        keys_hf, values_hf = ours.head_major()  # [B, Hkv, K, Dh]: HF's layout, views of our storage
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

    def _load(self, bridge, self_cache, layer) -> KVCache:
        """A fresh KVCache holding what HF's cache holds for this layer (nothing, or what other code wrote)."""
        if isinstance(self_cache, tuple):
            raise TypeError(
                "past_key_values: legacy tuple caches are not supported; pass a transformers Cache "
                "(e.g. DynamicCache) or a pyqkv.KVCache"
            )
        if not hasattr(self_cache, "update"):
            raise TypeError(
                f"past_key_values: expected a transformers Cache or pyqkv.KVCache, got {type(self_cache).__name__}"
            )
        ours = KVCache()
        past = self_cache.get_seq_length(self.layer_idx) if layer is not None else 0
        if past:
            keys, values = layer.keys, layer.values  # [B, heads, K, Dh]
            Hkv = bridge.cfg.n_kv_heads
            if keys.shape[1] != Hkv and keys.shape[1] % Hkv == 0:
                # Filled by a module that broadcasts each KV head over its query group (Falcon's
                # grouped layout): the group's copies are equal, keep the first of each.
                step = keys.shape[1] // Hkv
                keys, values = keys[:, ::step], values[:, ::step]
            ours.load(keys.transpose(1, 2), values.transpose(1, 2))
        mirrors = getattr(self_cache, MIRRORS_ATTR, None)
        if mirrors is None:
            mirrors = {}
            setattr(self_cache, MIRRORS_ATTR, mirrors)
        mirrors[self.layer_idx] = ours
        if self._touched is not None:
            self._touched.add(self_cache)
        return ours

    def hand_back(self, n_kv_heads: int) -> None:
        """Leave every live HF cache this layer mirrored in the form the original module expects. Falcon's
        grouped layout caches K/V broadcast over each query group (hand_back_heads = H) while the mirror
        holds Hkv heads: expand them once, here, so HF's own module can continue. Other layouts need
        nothing: HF's layer holds plain [B, Hkv, K, Dh] views, and its next update replaces them."""
        for hf_cache in list(self._touched or ()):
            layers = getattr(hf_cache, "layers", ())
            layer = layers[self.layer_idx] if self.layer_idx < len(layers) else None
            keys = getattr(layer, "keys", None)
            if keys is not None and keys.dim() == 4 and keys.shape[1] == n_kv_heads:
                layer.keys = keys.repeat_interleave(self.hand_back_heads // n_kv_heads, dim=1)
                layer.values = layer.values.repeat_interleave(self.hand_back_heads // n_kv_heads, dim=1)
            getattr(hf_cache, MIRRORS_ATTR, {}).pop(self.layer_idx, None)
            self._touched.discard(hf_cache)


class StaticLayerKV(ExternalKV):
    """One call's view of a transformers StaticCache layer (StaticLayer, StaticSlidingWindowLayer): its
    buffers are preallocated at a fixed length, its update() writes this call's keys where its own position
    counter says and returns the buffers, and the 4-D mask Hugging Face built spans them, hiding what is not
    written. The Bridge attends over exactly that, as Hugging Face's eager attention does: fixed shapes (so
    a compiled decode step does not recompile per token), nothing copied into a KVCache."""

    def __init__(self, cache, layer_idx: int, call: dict, S: int):
        self.cache, self.layer_idx = cache, layer_idx
        mask = call.get("attention_mask")
        if mask is None:
            # What sdpa-style masking sends for a prefill into an empty cache: causal, query i seeing keys
            # 0..i of the buffers (top-left), which is causal attention over their first S rows.
            self.K = None
        elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
            self.K = mask.shape[-1]
        else:
            raise ValueError(
                f"attention_mask: a StaticCache layer needs the 4-D mask [B, 1, S, K] Hugging Face builds over "
                f"its buffers (K = their length) or none (a prefill), got {describe(mask)}"
            )
        self.length = 0 if self.K is None else self.K - S
        if self.length < 0:
            raise ValueError(f"attention_mask: spans {self.K} keys, fewer than this call's {S} new positions")
        self._before = None

    def check_appendable(self, shape: tuple, dtype, device) -> None:
        keys = getattr(self.cache.layers[self.layer_idx], "keys", None)
        if not isinstance(keys, torch.Tensor):
            return  # not allocated yet: HF allocates it from the first keys
        B, Hkv, _, Dh = keys.shape
        if (
            (shape[0], shape[2], shape[3]) != (B, Hkv, Dh)
            or (dtype is not None and dtype != keys.dtype)
            or device != keys.device
        ):
            raise ValueError(
                f"past_key_values: StaticCache layer {self.layer_idx} holds batch {B}, {Hkv} KV heads of dim {Dh}, "
                f"{keys.dtype} on {keys.device}; got new keys of shape {tuple(shape)} ({dtype} on {device})"
            )

    def write(self, k_new, v_new):
        S = k_new.shape[1]
        layer = self.cache.layers[self.layer_idx]
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            self._before = counter.clone()
        keys, values = self.cache.update(k_new.transpose(1, 2), v_new.transpose(1, 2), self.layer_idx)
        K = S if self.K is None else self.K
        if keys.shape[2] < K or (self.K is not None and keys.shape[2] != K):
            raise ValueError(
                f"attention_mask: spans {K} keys but the StaticCache layer {self.layer_idx} attends over "
                f"{keys.shape[2]}"
            )
        keys, values = keys[:, :, :K], values[:, :, :K]
        return keys.transpose(1, 2), values.transpose(1, 2)  # [B, K, Hkv, Dh] views of HF's buffers

    def undo(self) -> None:
        if self._before is not None:
            self.cache.layers[self.layer_idx].cumulative_length.copy_(self._before)


def _replicates_dynamic(cache) -> bool:
    cls = getattr(cache, "layer_class_to_replicate", None)
    return cls is not None and cls.__name__ == "DynamicLayer"
