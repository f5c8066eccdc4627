"""KVCache: preallocated key/value storage that grows by doubling and appends in place.

The reference system grows its cache with torch.cat, an O(K) copy per generated token. Here a step
writes only its new rows (the native kv_append op); storage is reallocated only when it is full, to
twice its capacity, so the copying is amortized O(1) per token.
"""

from __future__ import annotations

from typing import Optional

import torch

from pyqkv import ops


class KVCache:
    """Keys and values of one attention layer: storage [B, Hkv, capacity, Dh], `length` valid positions.

    Constructible with no arguments: batch size, head shape, dtype and device are taken from the first
    append, and a later append that does not match raises ValueError. `keys` / `values` are views
    [B, length, Hkv, Dh] of the valid positions (what the attention op reads, no copy).
    """

    MIN_CAPACITY = 64

    def __init__(self, capacity: Optional[int] = None):
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity: expected a positive int or None, got {capacity!r}")
        self._initial_capacity = capacity
        self.k_storage: Optional[torch.Tensor] = None
        self.v_storage: Optional[torch.Tensor] = None
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def capacity(self) -> int:
        return 0 if self.k_storage is None else self.k_storage.shape[2]

    @property
    def keys(self) -> torch.Tensor:
        return self._valid(self.k_storage)

    @property
    def values(self) -> torch.Tensor:
        return self._valid(self.v_storage)

    def _valid(self, storage):
        if storage is None:
            raise ValueError("kv_cache: empty (nothing appended yet)")
        return storage[:, :, : self.length].transpose(1, 2)

    def reset(self) -> None:
        """Forget every position (storage is kept for reuse with the same shapes)."""
        self.length = 0

    def signature(self) -> str:
        if self.k_storage is None:
            return "unallocated"
        B, Hkv, _, Dh = self.k_storage.shape
        return f"batch {B}, {Hkv} KV heads of dim {Dh}, {self.k_storage.dtype} on {self.k_storage.device}"

    def check_compatible(self, k_new: torch.Tensor) -> None:
        """Raise ValueError if k_new [B, S, Hkv, Dh] cannot be appended to this cache."""
        if self.k_storage is None:
            return
        B, Hkv, _, Dh = self.k_storage.shape
        ok = (
            k_new.dim() == 4
            and (k_new.shape[0], k_new.shape[2], k_new.shape[3]) == (B, Hkv, Dh)
            and k_new.dtype == self.k_storage.dtype
            and k_new.device == self.k_storage.device
        )
        if not ok:
            raise ValueError(
                f"kv_cache: holds {self.signature()}; got new keys of shape {tuple(k_new.shape)} "
                f"({k_new.dtype} on {k_new.device}). Use a fresh KVCache (or reset() it) for another batch "
                f"or head shape."
            )

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor):
        """Append k_new, v_new [B, S, Hkv, Dh] (any strides); returns (keys, values) [B, length, Hkv, Dh]."""
        self.check_compatible(k_new)
        if v_new.shape != k_new.shape:
            raise ValueError(f"v_new: expected the shape of k_new {tuple(k_new.shape)}, got {tuple(v_new.shape)}")
        B, S, Hkv, Dh = k_new.shape
        need = self.length + S
        if need > self.capacity:
            self._grow(need, k_new)
        ops.kv_append(self.k_storage, self.v_storage, k_new, v_new, self.length)
        self.length = need
        return self.keys, self.values

    def _grow(self, need: int, like: torch.Tensor) -> None:
        B, _, Hkv, Dh = like.shape
        capacity = max(need, 2 * self.capacity, self._initial_capacity or self.MIN_CAPACITY)
        # Normal tensors even under torch.inference_mode: an inference tensor could not be appended to
        # in place by a later call made outside inference mode (e.g. prefill in inference_mode, decode
        # under no_grad).
        with torch.inference_mode(False):
            k = like.new_empty(B, Hkv, capacity, Dh)
            v = like.new_empty(B, Hkv, capacity, Dh)
        if self.length:
            k[:, :, : self.length] = self.k_storage[:, :, : self.length]
            v[:, :, : self.length] = self.v_storage[:, :, : self.length]
        self.k_storage, self.v_storage = k, v

    def load(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents with keys, values [B, L, Hkv, Dh] (e.g. a cache filled elsewhere)."""
        self.k_storage = self.v_storage = None
        self.length = 0
        if keys.shape[1]:
            self.append(keys, values)
        else:
            self._grow(1, keys)

    def __repr__(self) -> str:
        return f"KVCache(length={self.length}, capacity={self.capacity}, {self.signature()})"
