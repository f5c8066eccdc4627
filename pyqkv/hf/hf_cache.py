"""Mirroring a Hugging Face cache into a pyqkv KVCache, per layer.

A Bridge appends to its own preallocated KVCache in place (no torch.cat per token). Inside a Hugging Face
model the cache the model holds is a transformers Cache; each attached layer keeps a KVCache per live HF
cache object and shows HF views of its storage, so HF sees the right length and contents (generate's
bookkeeping, get_seq_length) while the data is written once. That holds for DynamicLayer and for
DynamicSlidingWindowLayer (Mistral, Gemma 2 / 3 ... with sliding_window set), whose window is kept by
dropping the oldest positions in place (KVCache.keep_last), not by HF's torch.cat of the whole window per
token. Anything HF changed behind our back (a cache filled by other code, beam reordering, cropping) is
noticed and loaded afresh; other cache types keep their own storage and get the new rows through update().

The views are live: a tensor taken from HF's layer between steps keeps the positions of that step only
until the mirror reuses their storage (a window's dropped positions are overwritten by later ones); clone
it to keep it.

The KVCaches live on the HF cache object itself (one attribute, a dict by layer index), not in a table
the mirror keeps: they die with it, and under torch.compile a forward that creates its own cache (the
default use_cache=True) mutates only an object it created, so nothing outside the graph changes and no
guard on a table's contents makes every call recompile. A StaticCache layer is not mirrored at all: the
Bridge attends over its own fixed buffers (StaticLayerKV).
"""

from __future__ import annotations

import weakref

import torch

from pyqkv.cache import ExternalKV, KVCache
from pyqkv.checks import describe

# The attribute of a transformers Cache (its self-attention cache) that holds, by layer index, the entry
# [our KVCache, the key tensor handed to HF's layer after the last step (or _NOTHING)].
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
        entry = None if mirrors is None else mirrors.get(idx)
        # In sync while HF's layer still holds the very key view this mirror handed it after the last step
        # (crop, beam reordering, reset or another writer replace it): one identity check per step.
        if entry is None or layer is None or getattr(layer, "keys", None) is not entry[1]:
            entry = self._load(bridge, self_cache, layer)
        ours = entry[0]
        past = ours.length
        out = bridge(hidden_states, kv_cache=ours, **call)
        appended = ours.length - past
        kind = _kept_in_sync(layer, self_cache)
        if kind is None:  # any other cache type keeps its own storage: give it the new rows the ordinary way
            keys_hf, values_hf = ours.head_major()  # [B, Hkv, K, Dh]
            self_cache.update(keys_hf[:, :, past:], values_hf[:, :, past:], idx)
            entry[1] = _NOTHING  # HF's layer holds its own tensors: loaded afresh next step
            return out
        if layer is None or not layer.is_initialized:
            # Let HF create and initialize the layer (and any before it) through its own code path.
            keys_hf, values_hf = ours.head_major()
            self_cache.update(keys_hf[:, :, :0], values_hf[:, :, :0], idx)
            layer = self_cache.layers[idx]
        if kind == "window":
            # HF's DynamicSlidingWindowLayer keeps the last sliding_window - 1 positions (the next query sees
            # those and itself) and counts every position in cumulative_length, which its mask sizes and
            # get_seq_length read. The same here, without its torch.cat of the window: the oldest positions
            # are dropped by moving where ours start (KVCache.keep_last).
            ours.keep_last(layer.sliding_window - 1)
            layer.cumulative_length += appended
        # Mirror views of our preallocated storage: HF sees the right length and contents, no torch.cat.
        layer.keys, layer.values = ours.head_major()
        entry[1] = layer.keys
        return out

    def _load(self, bridge, self_cache, layer) -> list:
        """A fresh KVCache holding what HF's cache holds for this layer (nothing, or what other code wrote),
        as this HF cache's entry [KVCache, _NOTHING]: nothing handed to HF yet."""
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
            if _is_window(layer):
                # A layer recording its past (assisted decoding) keeps more until HF crops it; a step sees
                # only the last sliding_window - 1 of them, as its mask sizes (get_mask_sizes) say.
                first = max(keys.shape[2] - (layer.sliding_window - 1), 0)
                keys, values = keys[:, :, first:], values[:, :, first:]
            ours.load(keys.transpose(1, 2), values.transpose(1, 2))
        mirrors = getattr(self_cache, MIRRORS_ATTR, None)
        if mirrors is None:
            mirrors = {}
            setattr(self_cache, MIRRORS_ATTR, mirrors)
        entry = mirrors[self.layer_idx] = [ours, _NOTHING]
        if self._touched is not None:
            self._touched.add(self_cache)
        return entry

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
        self._written = 0  # rows the last write() stored

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
        S = self._written = k_new.shape[1]
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
        """Step HF's position counter back over the rows write() stored (its update advanced it by them);
        no copy of the counter is taken per step for this rare path."""
        counter = getattr(self.cache.layers[self.layer_idx], "cumulative_length", None)
        if self._written and isinstance(counter, torch.Tensor):
            counter.sub_(self._written)


_NOTHING = object()  # no tensor HF's layer can hold: the next step loads afresh


def _is_window(layer) -> bool:
    return type(layer).__name__ == "DynamicSlidingWindowLayer"


def _kept_in_sync(layer, cache):
    """How HF's layer is kept in sync with the mirror after a step: "dynamic" (it holds views of our
    storage), "window" (the same, its oldest positions dropped as DynamicSlidingWindowLayer drops them), or
    None: it keeps storage of its own, and the mirror hands it the new rows through its update(). A window
    layer recording its past (assisted decoding: it keeps every position until HF crops it) is left to HF's
    own update, which knows when to crop."""
    if layer is None:
        return "dynamic" if _replicates_dynamic(cache) else None
    name = type(layer).__name__  # the exact classes: a subclass may store its keys otherwise
    if name == "DynamicLayer":
        return "dynamic"
    if name == "DynamicSlidingWindowLayer" and not getattr(layer, "record_past", False):
        return "window"
    return None


def _replicates_dynamic(cache) -> bool:
    cls = getattr(cache, "layer_class_to_replicate", None)
    return cls is not None and cls.__name__ == "DynamicLayer"
