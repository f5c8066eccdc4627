"""Mirroring a Hugging Face cache into a pyqkv KVCache, per layer.

A Bridge appends to its own preallocated KVCache in place (no torch.cat per token). Inside a Hugging Face
model the cache the model holds is a transformers Cache; each attached layer keeps a KVCache per live HF
cache object and shows HF views of its storage, so HF sees the right length and contents (generate's
bookkeeping, get_seq_length) while the data is written once. Anything HF changed behind our back (a
cache filled by other code, beam reordering, cropping) is noticed and loaded afresh.
"""

from __future__ import annotations

import weakref

from pyqkv.cache import KVCache


class CacheMirror:
    """The KVCaches of one attached layer, one per live Hugging Face cache object (weakly keyed: a mirror
    dies with its HF cache)."""

    def __init__(self, layer_idx: int):
        self.layer_idx = layer_idx
        self._kv = weakref.WeakKeyDictionary()

    def run(self, bridge, hidden_states, hf_cache, call: dict):
        """bridge(hidden_states, kv_cache=<this layer's mirror of hf_cache>, **call), then hf_cache updated."""
        self_cache = getattr(hf_cache, "self_attention_cache", hf_cache)  # EncoderDecoderCache
        idx = self.layer_idx
        layers = getattr(self_cache, "layers", None)
        layer = layers[idx] if layers is not None and idx < len(layers) else None
        ours = None if layers is None else self._kv.get(self_cache)  # (no layers: not a Cache, refused below)
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
        self._kv[self_cache] = ours
        return ours

    def hand_back(self, hf_cache_heads, n_kv_heads: int) -> None:
        """Leave every live HF cache this layer mirrored in the form the original module expects, and
        forget them. Falcon's grouped layout caches K/V broadcast over each query group (hf_cache_heads =
        H) while the mirror holds Hkv heads: expand them once, here, so HF's own module can continue."""
        for hf_cache in list(self._kv.keys()):
            if hf_cache_heads is not None and hf_cache_heads != n_kv_heads:
                layers = getattr(hf_cache, "layers", ())
                layer = layers[self.layer_idx] if self.layer_idx < len(layers) else None
                keys = getattr(layer, "keys", None)
                if keys is not None and keys.dim() == 4 and keys.shape[1] == n_kv_heads:
                    layer.keys = keys.repeat_interleave(hf_cache_heads // n_kv_heads, dim=1)
                    layer.values = layer.values.repeat_interleave(hf_cache_heads // n_kv_heads, dim=1)
            self._kv.pop(hf_cache, None)


def _replicates_dynamic(cache) -> bool:
    cls = getattr(cache, "layer_class_to_replicate", None)
    return cls is not None and cls.__name__ == "DynamicLayer"
