"""KVCache: preallocated key/value storage that grows by doubling and appends in place.

The reference system grows its cache with torch.cat, an O(K) copy per generated token. Here a step
writes only its new rows (the native kv_append op); storage is reallocated only when it is full, to
twice its capacity, so the copying is amortized O(1) per token. A sliding-window cache drops its oldest
positions (keep_last) by moving where the valid positions start, without a copy; when appends reach the
storage's end the valid positions move to its front, again amortized O(1) per token.
"""

from __future__ import annotations

from typing import Optional

import torch

from pyqkv import checks, ops


class KVCache:
    """Keys and values of one attention layer: storage [B, Hkv, capacity, Dh], `length` valid positions
    (from `start` on: 0 unless keep_last dropped the oldest).

    Constructible with no arguments: batch size, head shape, dtype and device are taken from the first
    append, and a later append that does not match raises ValueError. reset() forgets them as well as the
    positions: the next append may have any batch, head shape, dtype and device (the storage is reused
    when it matches). `keys` / `values` are views [B, length, Hkv, Dh] of the valid positions (what the
    attention op reads, no copy).
    """

    MIN_CAPACITY = 64

    def __init__(self, capacity: Optional[int] = None):
        if capacity is not None:
            # The one integer rule (pyqkv/checks.py): any integer type (numpy's too), not a float or a bool.
            n = checks.integer(capacity)
            if n is None:
                raise TypeError(
                    f"capacity: expected a positive int or None, got {type(capacity).__name__} {capacity!r}"
                )
            capacity = n
            if capacity < 1:
                raise ValueError(f"capacity: expected a positive int or None, got {capacity}")
        self._initial_capacity = capacity
        self.k_storage: Optional[torch.Tensor] = None
        self.v_storage: Optional[torch.Tensor] = None
        self.length = 0
        # Where the valid positions begin in the storage: keep_last() drops the oldest by moving it, so that
        # a sliding window costs no copy per token.
        self.start = 0
        self._views = None  # (length, start, k_storage, keys, values) of the last head_major() call
        # False after reset(): the storage is kept for reuse, but its shape binds no append until the next.
        self._bound = True

    def __len__(self) -> int:
        return self.length

    @property
    def capacity(self) -> int:
        return 0 if self.k_storage is None else self.k_storage.shape[2]

    @property
    def keys(self) -> torch.Tensor:
        return self.head_major()[0].transpose(1, 2)

    @property
    def values(self) -> torch.Tensor:
        return self.head_major()[1].transpose(1, 2)

    def head_major(self):
        """(keys, values) [B, Hkv, length, Dh]: views of the valid positions in the storage's own layout
        (Hugging Face's cache layout). Made once per length and storage, since a decode step asks for
        them twice (the attention op and a Hugging Face cache's mirror)."""
        views = self._views
        if views is None or views[0] != self.length or views[1] != self.start or views[2] is not self.k_storage:
            if self.k_storage is None:
                raise ValueError("kv_cache: empty (nothing appended yet)")
            L, s, k, v = self.length, self.start, self.k_storage, self.v_storage
            views = self._views = (L, s, k, k[:, :, s : s + L], v[:, :, s : s + L])
        return views[3], views[4]

    def keep_last(self, n: int) -> None:
        """Forget all but the last n positions (all of them if it holds at most n): a sliding window's cache.
        No copy: the valid positions start later in the storage."""
        count = checks.integer(n)
        if count is None or count < 0:
            got = f"{type(n).__name__} {n!r}" if count is None else f"{count}"
            exc = TypeError if count is None else ValueError
            raise exc(f"n: expected a non-negative int, got {got}")
        drop = max(self.length - count, 0)
        self.start += drop
        self.length -= drop

    def reset(self) -> None:
        """Forget every position and the batch / head shape, dtype and device: the next append may have any
        (another batch, another layer's heads). The storage is kept and reused when the next append matches
        it, else replaced."""
        self.length = 0
        self.start = 0
        self._bound = False

    def signature(self) -> str:
        if self.k_storage is None:
            return "unallocated"
        if not self._bound:
            return "empty after reset()"
        B, Hkv, _, Dh = self.k_storage.shape
        return f"batch {B}, {Hkv} KV heads of dim {Dh}, {self.k_storage.dtype} on {self.k_storage.device}"

    def check_compatible(self, k_new: torch.Tensor) -> None:
        """Raise ValueError if k_new [B, S, Hkv, Dh] cannot be appended to this cache."""
        _check_keys(k_new, "k_new")
        self.check_appendable(tuple(k_new.shape), k_new.dtype, k_new.device)

    def check_appendable(self, shape: tuple, dtype: Optional[torch.dtype], device: torch.device) -> None:
        """Raise ValueError if keys of this shape [B, S, Hkv, Dh], dtype (None: not checked) and device
        cannot be appended: the Bridge asks before it runs any hook, the append asks again."""
        if self.k_storage is None or not self._bound:
            return
        if not self._storage_fits(shape, dtype, device):
            raise ValueError(
                f"kv_cache: holds {self.signature()}; got new keys of shape {tuple(shape)} "
                f"({dtype if dtype is not None else 'dtype unknown'} on {device}). Use a fresh KVCache (or reset() "
                f"it) for another batch, head shape, dtype or device."
            )

    def _storage_fits(self, shape: tuple, dtype: Optional[torch.dtype], device: torch.device) -> bool:
        """Whether keys of this shape [B, S, Hkv, Dh], dtype (None: not compared) and device can be written
        into the storage (which must exist)."""
        B, Hkv, _, Dh = self.k_storage.shape
        return (
            len(shape) == 4
            and (shape[0], shape[2], shape[3]) == (B, Hkv, Dh)
            and (dtype is None or dtype == self.k_storage.dtype)
            and device == self.k_storage.device
        )

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor):
        """Append k_new, v_new [B, S, Hkv, Dh] (any strides); returns (keys, values) [B, length, Hkv, Dh].

        Every check runs before anything changes: a rejected append leaves length, contents and storage
        as they were."""
        self.check_compatible(k_new)
        _check_pair(k_new, v_new, "k_new", "v_new")
        return self._append(k_new, v_new)

    def _append(self, k_new: torch.Tensor, v_new: torch.Tensor):
        """append() after its checks, for a caller that made them: the Bridge checks the shape, dtype and
        device of this call's keys before any hook runs (check_appendable), and a hook cannot change them."""
        B, S, Hkv, Dh = k_new.shape
        need = self.length + S
        # After reset() (length 0) storage of another shape, dtype or device is replaced, not grown.
        replace = (
            not self._bound
            and self.k_storage is not None
            and not self._storage_fits(tuple(k_new.shape), k_new.dtype, k_new.device)
        )
        # An empty first append still allocates: the cache then knows its batch and head shape, and
        # keys / values are [B, 0, Hkv, Dh] views like those of any other empty cache.
        if replace or self.k_storage is None or self.start + need > self.capacity:
            if not replace and self.k_storage is not None and 2 * need <= self.capacity:
                self._move_to_front()
            else:
                self._grow(need, k_new, 0 if replace else self.capacity)
        ops.kv_append(self.k_storage, self.v_storage, k_new, v_new, self.start + self.length)
        self.length = need
        self._bound = True
        return self.keys, self.values

    def _move_to_front(self) -> None:
        """Move the valid positions to the front of the storage, in place: for a window's cache (keep_last)
        whose appends reached the storage's end while at most half of it is in use after this append
        (need <= capacity / 2 < start: source and destination do not overlap). The next move is then at
        least capacity - need >= need appended positions away: amortized O(1) copying per position."""
        L, s = self.length, self.start
        self.k_storage[:, :, :L] = self.k_storage[:, :, s : s + L]
        self.v_storage[:, :, :L] = self.v_storage[:, :, s : s + L]
        self.start = 0

    def _grow(self, need: int, like: torch.Tensor, old_capacity: int) -> None:
        B, _, Hkv, Dh = like.shape
        capacity = max(need, 2 * old_capacity, self._initial_capacity or self.MIN_CAPACITY)
        # Normal tensors even under torch.inference_mode: an inference tensor could not be appended to
        # in place by a later call made outside inference mode (e.g. prefill in inference_mode, decode
        # under no_grad).
        with torch.inference_mode(False):
            k = like.new_empty(B, Hkv, capacity, Dh)
            v = like.new_empty(B, Hkv, capacity, Dh)
        if self.length:
            L, s = self.length, self.start
            k[:, :, :L] = self.k_storage[:, :, s : s + L]
            v[:, :, :L] = self.v_storage[:, :, s : s + L]
        self.k_storage, self.v_storage = k, v
        self.start = 0

    def load(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents with keys, values [B, L, Hkv, Dh] (e.g. a cache filled elsewhere).
        Checked first: a rejected load keeps the old contents."""
        _check_keys(keys, "keys")
        _check_pair(keys, values, "keys", "values")
        old = self.k_storage, self.v_storage, self.length, self.start, self._bound
        self.k_storage = self.v_storage = None
        self.length = self.start = 0
        try:
            self.append(keys, values)
        except BaseException:
            self.k_storage, self.v_storage, self.length, self.start, self._bound = old
            raise

    def __repr__(self) -> str:
        return f"KVCache(length={self.length}, capacity={self.capacity}, {self.signature()})"


def _check_keys(k: torch.Tensor, name: str) -> None:
    """k must be a floating-point [B, S, Hkv, Dh] tensor: what the attention op reads as keys."""
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor [B, S, Hkv, Dh], got {type(k).__name__}")
    if k.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor [B, S, Hkv, Dh], got {k.dim()}-D {tuple(k.shape)}")
    if not k.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (the attention op reads it), got {k.dtype}")


def _check_pair(k: torch.Tensor, v: torch.Tensor, k_name: str, v_name: str) -> None:
    """v must match k in shape, dtype and device (k already checked by _check_keys)."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{v_name}: expected a Tensor [B, S, Hkv, Dh] like {k_name}, got {type(v).__name__}")
    if v.shape != k.shape:
        raise ValueError(f"{v_name}: expected the shape of {k_name} {tuple(k.shape)}, got {tuple(v.shape)}")
    if v.dtype != k.dtype or v.device != k.device:
        raise TypeError(f"{v_name}: expected {k.dtype} on {k.device} (like {k_name}), got {v.dtype} on {v.device}")


class ExternalKV:
    """The kv_cache protocol for key/value storage another library owns and writes (a transformers
    StaticCache layer: its buffers are preallocated at the full length and attention spans all of them,
    the mask hiding what is not written yet). A Bridge given one calls `write` with this call's keys and
    values and attends over what it returns; nothing is copied into a KVCache.

    length: the key positions before this call's, as the attention sees them (K - S for this call).
    """

    length: int = 0

    def check_appendable(self, shape: tuple, dtype: Optional[torch.dtype], device: torch.device) -> None:
        """Raise ValueError if keys of this shape [B, S, Hkv, Dh], dtype and device cannot be written: the
        Bridge asks before it runs any hook."""

    def write(self, k_new: torch.Tensor, v_new: torch.Tensor):
        """Store k_new, v_new [B, S, Hkv, Dh]; returns (keys, values) [B, length + S, Hkv, Dh] to attend over."""
        raise NotImplementedError

    def undo(self) -> None:
        """Take back the last write (the attention after it failed)."""
