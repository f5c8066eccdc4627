"""Hook points and the hook API researchers know from TransformerLens, without its costs.

A HookPoint is a plain object, not a Module: a point with no hooks costs one list check on the forward
path. Hook functions are called as TransformerLens calls them, `fn(tensor, hook=point)`, and return
None (keep the possibly in-place edited activation) or a replacement tensor. `hook.name` is the
canonical name, `hook.layer()` the block index in a model, `hook.ctx` a dict the hook may use. Nothing
per call is kept once the call returns.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import operator
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch

from pyqkv.activation_cache import ActivationCache  # noqa: F401 (also importable from here)
from pyqkv.distributed import gather_heads

HookFn = Callable[[torch.Tensor, "HookPoint"], Optional[torch.Tensor]]

# The points whose tensor is [B, H, S, K] (a query row and a key column per entry): the ones run_with_cache's
# pattern_heads / pattern_queries / pattern_keys slice.
PATTERN_POINTS = ("hook_attn_scores", "hook_pattern")


@dataclass(frozen=True, eq=False)
class PatternSlice:
    """Which entries of a [B, H, S, K] attention tensor (hook_pattern, hook_attn_scores) a read-only hook
    wants: run_with_cache's pattern_heads, pattern_queries and pattern_keys. Each is None (the whole axis),
    an int, a slice, a list of ints or a 1-D integer tensor; negative indices count from the end of H, S
    (this call's query positions) and K (every key, a KV cache's included). An int keeps its axis, so the
    slice is [B, len(heads) or H, len(queries) or S, len(keys) or K]. The rule is ops.slice_indices."""

    heads: object = None
    queries: object = None
    keys: object = None

    KEYWORDS = ("pattern_heads", "pattern_queries", "pattern_keys")

    def __post_init__(self):
        from pyqkv.ops import slice_indices  # (ops loads the native library: imported when first needed)

        for name, value in zip(self.KEYWORDS, (self.heads, self.queries, self.keys)):
            slice_indices(name, value)  # the types now, before anything runs; the ranges per call

    def resolve(self, H: int, S: int, K: int, device):
        """(heads, queries, keys) as 1-D int64 tensors on `device` (None for a whole axis); ValueError
        naming the keyword for an index out of range."""
        from pyqkv.ops import slice_indices

        return (
            slice_indices("pattern_heads", self.heads, H, "H, the query heads", device),
            slice_indices("pattern_queries", self.queries, S, "S, the query positions of this call", device),
            slice_indices("pattern_keys", self.keys, K, "K, the key positions (a KV cache's included)", device),
        )

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """These entries of a full [B, H, S, K] tensor (a new tensor: the full one may be freed)."""
        _, H, S, K = tensor.shape
        heads, queries, keys = self.resolve(H, S, K, tensor.device)
        for dim, index in ((1, heads), (2, queries), (3, keys)):
            if index is not None:
                tensor = tensor.index_select(dim, index)
        return tensor


NameFilter = Union[None, str, Iterable[str], Callable[[str], bool]]


@dataclass(eq=False)
class HookHandle:
    """One registered hook; `remove()` takes it off its point (idempotent).

    read_only: the hook promises not to change its tensor (run_with_cache's savers): a point whose
    hooks are all read-only lets the Bridge keep what it computed before them (no recomputation of z
    from a read pattern). A user's hook is never read-only: it may edit in place by any means."""

    point: "HookPoint"
    fn: HookFn
    dir: str
    is_permanent: bool
    read_only: bool = False
    # A read-only hook of a [B, H, S, K] point that wants only these entries (run_with_cache with
    # pattern_heads / _queries / _keys): it is called with them, never with the whole tensor.
    select: Optional[PatternSlice] = None

    def remove(self) -> None:
        self.point.remove(self)


@dataclass(eq=False)
class HookPoint:
    """A named place in the forward where hooks may read or replace an activation: the one hook-firing
    rule of pyqkv (the Bridge, pyqkv.attend and the attention-interface tier all fire through it).

    name: the canonical name (e.g. "hook_pattern", or "blocks.3.attn.hook_pattern" inside a model).
    fwd / bwd: registered HookHandles in run order (read them; change them through add / remove / clear).
    ctx: scratch space for hooks; cleared by reset_hooks.
    heads: the global head indices the tensor holds along head_dim (range(0, H) on one process; a slice
    of them on a tensor-parallel rank), None for points without heads.
    rule: the conversion from the caller's layout to the hook format and back (pyqkv.conversions; None:
    the caller's tensor is already in hook format).

    What a caller reads, all plain attributes kept up to date by add / remove / clear (so a check costs
    an attribute read, and torch.compile guards on them instead of on data):
    active: some hook is registered (fire() would do anything);
    may_edit: some hook may change the tensor: a forward hook that is not read-only (it may write in
        place by index assignment, `.data` or numpy, none of which a caller can see), or a backward hook
        (its gradient must reach the tensor the caller continues with).
    slice_only: the PatternSlice every hook wants when all of them are read-only forward hooks wanting the
        same slice (run_with_cache with pattern_* keywords, no other hook): the caller may then compute just
        those entries and call fire_slice instead of fire (pyqkv.attend). None otherwise.
    """

    name: str
    fwd: list = field(default_factory=list)
    bwd: list = field(default_factory=list)
    ctx: dict = field(default_factory=dict)
    # For a point with a head axis: the global indices of the heads its tensor holds (all of them on one
    # process; this rank's under tensor parallelism), their total count, and the axis in the hook format.
    heads: Optional[range] = None
    n_heads_total: Optional[int] = None
    head_dim: Optional[int] = None
    rule: object = None
    active: bool = False
    may_edit: bool = False
    slice_only: Optional[PatternSlice] = None
    # Called with the point after every add / remove / clear: lets a point that fires from a torch module
    # hook (pyqkv.hf.residual) register that hook only while the point has hooks.
    on_change: Optional[Callable[["HookPoint"], None]] = None

    def add(
        self,
        fn: HookFn,
        dir: str = "fwd",
        prepend: bool = False,
        is_permanent: bool = False,
        read_only: bool = False,
        select: Optional[PatternSlice] = None,
    ) -> HookHandle:
        _check_hook_args(self.name, fn, dir, prepend, is_permanent)
        if select is not None and not (read_only or dir == "bwd"):
            raise ValueError(f"{self.name}: select: only a read-only hook (a cache's saver) may take a slice")
        handle = HookHandle(self, fn, dir, is_permanent, read_only, select)
        hooks = self.fwd if dir == "fwd" else self.bwd
        hooks.insert(0, handle) if prepend else hooks.append(handle)
        self._changed()
        return handle

    def remove(self, handle: HookHandle) -> None:
        """Take one hook off (no-op when it is not registered here any more)."""
        hooks = self.fwd if handle.dir == "fwd" else self.bwd
        if handle in hooks:
            hooks.remove(handle)
            self._changed()

    def clear(self, dir: str = "both", including_permanent: bool = False) -> None:
        """Remove the hooks of direction `dir` ("fwd", "bwd", "both"); permanent ones only when asked."""
        for d, hooks in (("fwd", self.fwd), ("bwd", self.bwd)):
            if dir in (d, "both"):
                hooks[:] = [h for h in hooks if h.is_permanent and not including_permanent]
        self._changed()

    def hold_heads(self, head_axis, heads: range, kv_heads: range, n_heads: int, n_kv_heads: int) -> None:
        """Say which global heads this point's tensor holds along its head axis: `head_axis` is the point's
        (dim, "H" or "Hkv") from pyqkv/points.py, or None (no head axis, or one a conversion rule moved)."""
        if head_axis is None:
            self.heads = self.n_heads_total = self.head_dim = None
            return
        dim, kind = head_axis
        self.head_dim = dim
        self.heads, self.n_heads_total = (heads, n_heads) if kind == "H" else (kv_heads, n_kv_heads)

    def _changed(self) -> None:
        self.active = bool(self.fwd or self.bwd)
        self.may_edit = bool(self.bwd) or any(not h.read_only for h in self.fwd)
        wanted = {id(h.select): h.select for h in self.fwd}
        one = next(iter(wanted.values())) if len(wanted) == 1 else None
        self.slice_only = one if not self.bwd and all(h.read_only for h in self.fwd) else None
        if self.on_change is not None:
            self.on_change(self)

    def fire(self, tensor: torch.Tensor) -> torch.Tensor:
        """Run this point's hooks on `tensor` (the caller's layout); returns the activation to continue with.

        Inactive: returns `tensor` itself (an attribute read). Active: the rule converts it to hook format,
        the forward hooks run in order (each returns None to keep the possibly edited tensor, or a
        replacement of the same shape, dtype and device), the backward hooks are registered on the result,
        and the rule takes it back to the caller's layout."""
        if not self.active:
            return tensor
        rule = self.rule
        hooked = tensor if rule is None else rule.convert(tensor)
        for handle in tuple(self.fwd):
            if handle.select is not None:  # a read-only saver of some entries: they alone, from the whole tensor
                handle.fn(handle.select.take(hooked), hook=self)
                continue
            out = handle.fn(hooked, hook=self)  # TransformerLens's calling convention
            if out is not None:
                hooked = check_hook_output(self, handle.fn, out, hooked)
        if self.bwd and hooked.requires_grad:
            hooked.register_hook(self._backward_hooks(tuple(self.bwd)))
        if rule is None:
            return hooked
        back = rule.revert(hooked)
        if back.shape != tensor.shape:
            raise ValueError(
                f"{self.name}: conversion rule {rule!r} reverted the hook's tensor to shape {tuple(back.shape)}; "
                f"expected the kernel layout {tuple(tensor.shape)}"
            )
        return back

    def fire_slice(self, entries: torch.Tensor) -> None:
        """Fire a point whose hooks all want the same slice (slice_only is not None) with just those entries,
        which the caller computed without the whole tensor. The hooks are read-only: nothing comes back."""
        for handle in tuple(self.fwd):
            handle.fn(entries, hook=self)

    def _backward_hooks(self, handles: tuple):
        """The gradient hook of one forward: the backward hooks registered then, each called only while it
        is still registered (a backward after the hooks() context ended or after remove() calls none)."""

        def on_grad(grad):
            for handle in handles:
                if handle not in self.bwd:
                    continue
                if handle.select is not None:  # a saver of some entries of the gradient
                    handle.fn(handle.select.take(grad), hook=self)
                    continue
                out = handle.fn(grad, hook=self)
                if out is not None:
                    grad = check_hook_output(self, handle.fn, out, grad)
            return grad

        return on_grad

    def layer(self) -> int:
        """The block index in a model-level name ("blocks.3.attn.hook_z" -> 3), as TransformerLens's
        HookPoint.layer(); ValueError for a point that is not inside a model's blocks."""
        parts = self.name.split(".")
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"{self.name}: not a point inside a model's blocks (expected 'blocks.<i>.<...>')")
        return int(parts[1])

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, fwd={len(self.fwd)}, bwd={len(self.bwd)})"


def zero_heads(heads) -> HookFn:
    """A hook that zeroes the given GLOBAL head indices of any point with a head axis (hook_z, hook_pattern,
    hook_q, ...), in place. Under tensor parallelism each rank zeroes those of its own heads, so the same
    hook gives the same model output as on one process.

        h.run_with_hooks(ids, fwd_hooks=[("blocks.3.attn.hook_z", pyqkv.zero_heads([2, 5]))])
    """
    wanted = sorted({operator.index(h) for h in heads})

    def zero(tensor, hook):
        if hook.heads is None:
            raise ValueError(f"{hook.name}: zero_heads needs a point with a head axis (e.g. hook_z), this one has none")
        bad = [h for h in wanted if not 0 <= h < hook.n_heads_total]
        if bad:
            raise ValueError(f"{hook.name}: expected head indices in [0, {hook.n_heads_total}), got {bad}")
        local = [h - hook.heads.start for h in wanted if h in hook.heads]
        if local:
            tensor.index_fill_(hook.head_dim, torch.tensor(local, device=tensor.device), 0)

    zero.__qualname__ = f"zero_heads({wanted})"
    return zero


def check_hook_output(point: HookPoint, fn: HookFn, out, like: torch.Tensor) -> torch.Tensor:
    """A hook's replacement must be a tensor of the activation's shape, dtype and device."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{point.name}: hook {_fn_name(fn)} returned {type(out).__name__}; expected None or a Tensor")
    if out.shape != like.shape:
        raise ValueError(
            f"{point.name}: hook {_fn_name(fn)} returned shape {tuple(out.shape)}; expected {tuple(like.shape)}"
        )
    if out.dtype != like.dtype or out.device != like.device:
        raise TypeError(
            f"{point.name}: hook {_fn_name(fn)} returned {out.dtype} on {out.device}; expected {like.dtype} on "
            f"{like.device}"
        )
    return out


def _check_hook_args(where: str, fn, dir, prepend, is_permanent) -> None:
    if dir not in ("fwd", "bwd"):
        raise ValueError(f"dir: expected 'fwd' or 'bwd', got {dir!r}")
    if not callable(fn):
        raise TypeError(f"hook for {where}: expected a callable fn(tensor, hook=point), got {type(fn).__name__}")
    # A truthy string or number here is almost always an argument passed in the wrong position.
    for name, value in (("prepend", prepend), ("is_permanent", is_permanent)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


def _hook_pairs(arg_name: str, pairs) -> list:
    """fwd_hooks / bwd_hooks as a list of (name or filter, fn) pairs, checked before any hook is added."""
    if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[0], str) and callable(pairs[1]):
        raise TypeError(f"{arg_name}: expected a list of (name, fn) pairs, got one pair {pairs[0]!r}; wrap it in [...]")
    if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
        raise TypeError(f"{arg_name}: expected a list of (name, fn) pairs, got {type(pairs).__name__}")
    checked = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            got = (
                f"{type(pair).__name__} of length {len(pair)}"
                if isinstance(pair, (tuple, list))
                else type(pair).__name__
            )
            raise TypeError(f"{arg_name}[{i}]: expected a (name, fn) pair, got {got}")
        checked.append(tuple(pair))
    return checked


def _warn_nothing_selected(what: str) -> None:
    # Python shows a UserWarning once per calling location, so a loop over a bad filter warns once.
    warnings.warn(f"{what} selects no hook point that can fire: nothing will be hooked or cached", stacklevel=4)


_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def summarize_names(names) -> str:
    """A short list of hook names: model-level names `blocks.{i}.<point>` are folded into one line per kind
    (the attention's `blocks.{i}.attn.<point>`, the block's own `blocks.{i}.<point>`)."""
    names = list(names)
    parsed = [_BLOCK_NAME.match(n) for n in names]
    if names and all(parsed):
        layers = sorted({int(m.group(1)) for m in parsed})
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
        groups = {}  # "attn." or "" -> points, in first-seen order
        for m in parsed:
            point = m.group(2)
            shared = point.split(".")[0] + "." if "." in point else ""
            groups.setdefault(shared, {})[point[len(shared) :]] = None
        return "; ".join(
            f"blocks.{{{span}}}.{shared}<point> with <point> one of {', '.join(points)}"
            for shared, points in groups.items()
        )
    return ", ".join(names)


def _fn_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


# The values of return_type: TransformerLens's ("logits", "loss", "both", None) and pyqkv's "output" (what the
# model itself returns: Hugging Face's output object, or a Bridge's attention output).
RETURN_TYPES = ("logits", "loss", "both", None, "output")
# return_type left out: "logits" on a model, "output" on a Bridge.
DEFAULT = type("Default", (), {"__repr__": lambda self: "DEFAULT", "__slots__": ()})()


class HookedMixin:
    """The hook API over a set of hook points: add_hook, hooks(), run_with_hooks, run_with_cache.

    A subclass provides `hook_points()` (canonical name -> HookPoint), `hook_aliases()` (alias ->
    canonical name) and `hook_gate(name)` (None when the point can fire, else the reason it cannot,
    e.g. a config flag that is off), and a `__call__` that runs the forward.
    """

    # --- provided by the subclass -----------------------------------------------------------------
    def hook_points(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def hook_aliases(self) -> dict:
        return {}

    def hook_gate(self, name: str) -> Optional[str]:
        return None

    def suggested_names(self) -> list:
        """The names an unknown-name KeyError lists and suggests from (a tier may leave out the points it
        refuses)."""
        return list(self.hook_points()) + list(self.hook_aliases())

    # --- lookup -----------------------------------------------------------------------------------
    def _resolve(self, name: str) -> str:
        points = self.hook_points()
        canonical = self.hook_aliases().get(name, name)
        if canonical not in points:
            valid = self.suggested_names()
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.8)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"unknown hook point {name!r}{hint or '.'} Valid names: {summarize_names(valid)}")
        return canonical

    def _select(self, name_or_filter: NameFilter, *, by_name_strict: bool) -> list:
        """Canonical names chosen by a name, a list of names, a glob or a predicate.

        An exact name (or alias) of a gated point raises when by_name_strict; filters skip gated points.
        """
        points = self.hook_points()
        if name_or_filter is None:
            return [n for n in points if self.hook_gate(n) is None]
        if callable(name_or_filter) and not isinstance(name_or_filter, str):
            chosen = [n for n in points if self.hook_gate(n) is None and name_or_filter(n)]
            if not chosen:
                _warn_nothing_selected(f"the filter {_fn_name(name_or_filter)}")
            return chosen
        if not isinstance(name_or_filter, str) and not hasattr(name_or_filter, "__iter__"):
            raise TypeError(
                f"names_filter: expected a hook name, a glob, a list of names or a predicate, got "
                f"{type(name_or_filter).__name__}"
            )
        names = [name_or_filter] if isinstance(name_or_filter, str) else list(name_or_filter)
        chosen = []
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"names_filter: expected hook names (str), got {type(name).__name__}")
            if any(c in name for c in "*?[") and name not in points:
                matched = [n for n in points if fnmatch.fnmatchcase(n, name) and self.hook_gate(n) is None]
                if not matched:
                    _warn_nothing_selected(f"the pattern {name!r}")
                chosen += matched
                continue
            canonical = self._resolve(name)
            reason = self.hook_gate(canonical)
            if reason is not None:
                if by_name_strict:
                    raise ValueError(f"{name}: this hook point does not fire: {reason}")
                continue
            chosen.append(canonical)
        return list(dict.fromkeys(chosen))

    def _compile_target(self):  # pragma: no cover - interface
        """The nn.Module whose call `compile` compiles (the model, or the Bridge itself)."""
        raise NotImplementedError

    def compile(self, **compile_kwargs) -> None:
        """torch.compile the model in place (`Module.compile(**compile_kwargs)`, e.g. fullgraph=True), hooks
        included: they trace into its graph, and adding or removing one recompiles once. A hook Dynamo
        cannot trace runs the call eagerly instead, with one warning naming it (pyqkv.compiling)."""
        from pyqkv.compiling import compile_hooked

        compile_hooked(self._compile_target(), self.hook_points, **compile_kwargs)

    # --- registration -----------------------------------------------------------------------------
    def add_hook(
        self, name_or_filter, fn: HookFn, dir: str = "fwd", prepend: bool = False, is_permanent: bool = False
    ) -> list:
        """Add `fn` at one point (a name or alias) or at every point a filter selects.

        Returns the handles. A gated point named explicitly raises ValueError (e.g. "set
        use_split_qkv_input first"); an unknown name raises KeyError listing the valid names.
        """
        where = name_or_filter if isinstance(name_or_filter, str) else "the selected hook points"
        _check_hook_args(where, fn, dir, prepend, is_permanent)
        points = self.hook_points()
        names = self._select(name_or_filter, by_name_strict=True)
        return [points[n].add(fn, dir=dir, prepend=prepend, is_permanent=is_permanent) for n in names]

    def remove_hooks(self, dir: str = "both", including_permanent: bool = False) -> None:
        """Remove hooks in direction `dir` ("fwd", "bwd" or "both"); permanent ones only when asked."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir: expected 'fwd', 'bwd' or 'both', got {dir!r}")
        for point in self.hook_points().values():
            point.clear(dir, including_permanent=including_permanent)
            if including_permanent:
                point.ctx.clear()

    def reset_hooks(self, including_permanent: bool = False) -> None:
        """Remove every hook (permanent ones too when asked) and clear the points' ctx."""
        self.remove_hooks("both", including_permanent=including_permanent)
        for point in self.hook_points().values():
            point.ctx.clear()

    @contextlib.contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True):
        """`with model.hooks(fwd_hooks=[(name, fn)], bwd_hooks=[...]):` adds the hooks for the body and
        removes exactly those on exit, also when the body (or adding a later hook) raises."""
        pairs_by_dir = (("fwd", _hook_pairs("fwd_hooks", fwd_hooks)), ("bwd", _hook_pairs("bwd_hooks", bwd_hooks)))
        added = []
        try:
            for d, pairs in pairs_by_dir:
                for name, fn in pairs:
                    added += self.add_hook(name, fn, dir=d)
            yield self
        finally:
            if reset_hooks_end:
                for handle in added:
                    handle.remove()

    # --- running the model, with TransformerLens's keywords --------------------------------------------
    # Whether __call__ runs a whole model whose output holds logits (AttachedModel, InterfaceHooks: True) or
    # one attention layer (a Bridge: False), which decides what return_type may ask for.
    returns_model_output = False

    def run_with_hooks(
        self,
        *args,
        fwd_hooks=(),
        bwd_hooks=(),
        reset_hooks_end: bool = True,
        return_type=DEFAULT,
        loss_per_token: bool = False,
        **kwargs,
    ):
        """Run the forward with temporary hooks and return what `return_type` asks for (see
        `model_output`: the logits tensor by default on a model, the attention output on a Bridge).

        Backward hooks fire only while registered, and these are removed on return: with bwd_hooks call
        backward inside `with model.hooks(...)` instead, or pass reset_hooks_end=False (warned, as
        TransformerLens warns). A TransformerLens keyword pyqkv does not implement raises TypeError
        (TL_NOT_IMPLEMENTED); it never reaches the model."""
        refuse_tl_keywords(kwargs, "run_with_hooks")
        return_type = self._check_return_type(return_type, loss_per_token)
        if bwd_hooks and reset_hooks_end:
            warnings.warn(
                "bwd_hooks: removed when run_with_hooks returns, before any backward pass can call them; run the "
                "backward inside `with model.hooks(bwd_hooks=...)`, or pass reset_hooks_end=False",
                stacklevel=2,
            )
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, reset_hooks_end=reset_hooks_end):
            out = self(*args, **kwargs)
        return model_output(self, out, args, kwargs, return_type, loss_per_token)

    def run_with_cache(
        self,
        *args,
        names_filter: NameFilter = None,
        return_type=DEFAULT,
        loss_per_token: bool = False,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        device=None,
        gather: bool = False,
        pattern_heads=None,
        pattern_queries=None,
        pattern_keys=None,
        **kwargs,
    ):
        """Run the forward and return (output, cache), as TransformerLens's run_with_cache.

        output: what `return_type` asks for (see `model_output`): on a model the logits tensor by default,
            "loss", "both" (logits, loss), None, or "output" (Hugging Face's output object); on a Bridge its
            attention output [B, S, D].
        cache: an ActivationCache of canonical names (and aliases asked for by name) -> detached hook-format
            tensors.
        names_filter: None (every point that can fire), a name or alias, a glob ("blocks.*.attn.hook_z"), a
            list of those, or a predicate on canonical names. A point named exactly that cannot fire (a flag
            is off, the layer lacks the feature, the tier cannot see it) raises ValueError saying why; globs
            and predicates skip such points, and warn when they select nothing.
        remove_batch_dim: cache every tensor without its batch dimension (ValueError when the batch is not 1).
        incl_bwd: as TransformerLens, also save gradients under `<name>_grad`: run_with_cache calls
            backward() on the output itself, so the output must be the scalar loss (return_type="loss").
        device: move every cached tensor there (default: where it was computed).
        gather: under tensor parallelism, where each rank's points hold its own heads, all-gather them so
            every rank's cache holds every head in global order (a collective: call it on every rank).
        pattern_heads, pattern_queries, pattern_keys: cache only these entries of hook_pattern and
            hook_attn_scores (and of their _grad with incl_bwd): [B, len(heads) or H, len(queries) or S,
            len(keys) or K]. Each None (all), an int, a slice, a list or a 1-D integer tensor; negative
            indices count from the end of H, S (this call's queries) and K (every key, a cache's included).
            When nothing else hooks those points (no user hook, no training-mode dropout, no output_attentions,
            no incl_bwd), the layer computes only these entries, from the lse of its fused attention
            (ops.pattern_slice): no [B, H, S, K] tensor exists. A user's hook there still sees the whole
            tensor, and the cache holds the slice of what it left. ValueError when names_filter selects
            neither point, and for an index out of range (naming the keyword).
        A TransformerLens keyword pyqkv does not implement raises TypeError (TL_NOT_IMPLEMENTED); it never
        reaches the model."""
        refuse_tl_keywords(kwargs, "run_with_cache")
        for name, value in (("remove_batch_dim", remove_batch_dim), ("incl_bwd", incl_bwd), ("gather", gather)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
        return_type = self._check_return_type(return_type, loss_per_token)
        if incl_bwd and (return_type != "loss" or loss_per_token):
            asked = f"return_type={return_type!r}" + (", loss_per_token=True" if loss_per_token else "")
            raise ValueError(
                f"incl_bwd=True: run_with_cache calls backward() on its output, as TransformerLens does, so the "
                f"output must be a scalar: pass return_type='loss' (got {asked}). For gradients of anything else, "
                f"call backward yourself inside `with h.hooks(bwd_hooks=...)`"
            )
        if device is not None:
            device = torch.device(device)
        cache = ActivationCache(model=self)
        # A point named exactly that cannot fire here raises (naming what enables it): a cache that silently
        # lacks an asked-for entry invalidates the analysis built on it. Globs and predicates skip such points.
        selected = self._select(names_filter, by_name_strict=True)
        select, sliced = self._pattern_slice(selected, pattern_heads, pattern_queries, pattern_keys)
        aliases_asked = {}
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if names_filter is not None and not callable(names_filter):
            for name in names_filter:
                canonical = self.hook_aliases().get(name)
                if canonical is not None:
                    aliases_asked.setdefault(canonical, []).append(name)

        def saver(name, suffix=""):
            # Keyed by the name in this object's namespace (the one names_filter used), not hook.name:
            # a Bridge inside an attached model has points named "blocks.{i}.attn.hook_*".
            def save(tensor, hook):
                saved = tensor.detach()
                if remove_batch_dim:
                    if saved.dim() == 0 or saved.shape[0] != 1:
                        raise ValueError(
                            f"remove_batch_dim=True: {name}{suffix} has shape {tuple(saved.shape)}; expected a batch "
                            f"size of 1 in dim 0 (run one sequence, or cache the batch and slice it)"
                        )
                    saved = saved[0]
                if device is not None:
                    saved = saved.to(device)
                cache[name + suffix] = saved
                for alias in aliases_asked.get(name, ()):
                    cache[alias + suffix] = saved

            return save

        points = self.hook_points()
        added = [points[n].add(saver(n), read_only=True, select=sliced.get(n)) for n in selected]
        if incl_bwd:
            added += [points[n].add(saver(n, "_grad"), dir="bwd", select=sliced.get(n)) for n in selected]
        try:
            out = self(*args, **kwargs)
            result = model_output(self, out, args, kwargs, return_type, loss_per_token)
            if incl_bwd:
                if not result.requires_grad:
                    raise RuntimeError(
                        "incl_bwd=True: the loss does not require grad (is run_with_cache running under "
                        "torch.no_grad() or torch.inference_mode()?), so no gradient can be cached"
                    )
                result.backward()  # inside: the gradient savers fire only while registered
        finally:
            for handle in added:
                handle.remove()
        if remove_batch_dim:
            cache.has_batch_dim = False
        if gather:
            for name in selected:
                for suffix in ("", "_grad"):
                    if name + suffix in cache:
                        cache[name + suffix] = gather_heads(points[name], cache[name + suffix])
                        for alias in aliases_asked.get(name, ()):
                            cache[alias + suffix] = cache[name + suffix]
        return result, cache

    def _pattern_slice(self, selected: list, heads, queries, keys):
        """run_with_cache's pattern_heads / _queries / _keys: (the PatternSlice or None, {selected [B, H, S, K]
        point: it}). ValueError naming the keyword when no such point is selected, or when a point's tensor is
        not [B, H, S, K] indexed by global heads (a user's conversion rule, a tensor-parallel rank's heads)."""
        given = [n for n, v in zip(PatternSlice.KEYWORDS, (heads, queries, keys)) if v is not None]
        if not given:
            return None, {}
        select = PatternSlice(heads, queries, keys)  # TypeError naming the keyword for a wrong type
        points = self.hook_points()
        sliced = [n for n in selected if n.rsplit(".", 1)[-1] in PATTERN_POINTS]
        if not sliced:
            raise ValueError(
                f"{given[0]}: slices the cached {' and '.join(PATTERN_POINTS)}, but names_filter selects neither "
                f"(cache them, e.g. names_filter=lambda name: name.endswith('hook_pattern'))"
            )
        from pyqkv.conversions import Identity

        for n in sliced:
            point = points[n]
            if point.rule is not None and not isinstance(point.rule, Identity):
                raise ValueError(
                    f"{given[0]}: {n} has the conversion rule {point.rule!r}, so its hook format is not "
                    f"[B, H, S, K] and the indices would not mean query rows and key columns"
                )
            if heads is not None and point.heads is not None and len(point.heads) != point.n_heads_total:
                raise ValueError(
                    f"pattern_heads: {n} holds heads {point.heads.start}..{point.heads.stop - 1} of "
                    f"{point.n_heads_total} on this rank (tensor parallelism); select heads after gathering "
                    f"(cache[name][:, heads]) instead"
                )
        return select, {n: select for n in sliced}

    def _check_return_type(self, return_type, loss_per_token):
        """return_type with its default resolved: "logits" on a model, "output" on a Bridge."""
        if not isinstance(loss_per_token, bool):
            raise TypeError(f"loss_per_token: expected a bool, got {type(loss_per_token).__name__}")
        if return_type is DEFAULT:
            return_type = "logits" if self.returns_model_output else "output"
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type: expected one of {', '.join(map(repr, RETURN_TYPES))}, got {return_type!r}")
        if not self.returns_model_output and return_type not in ("output", None):
            raise ValueError(
                f"return_type={return_type!r}: a {type(self).__name__} is one attention layer and returns its "
                f"attention output [B, S, D], which has no logits or loss; use 'output' (the default) or None, or "
                f"run a whole model attached with pyqkv.hf.attach"
            )
        if loss_per_token and return_type not in ("loss", "both"):
            raise ValueError(f"loss_per_token=True: only with return_type 'loss' or 'both', got {return_type!r}")
        return return_type


# TransformerLens keywords (of HookedTransformer.forward, run_with_cache and run_with_hooks) that pyqkv does
# not implement, with why. The one list: run_with_cache, run_with_hooks and a model handle's __call__ refuse
# them by name. Hugging Face models take **kwargs and may drop an unknown keyword without a word, so these
# never reach the model.
TL_NOT_IMPLEMENTED = {
    "prepend_bos": "pyqkv takes token ids, not text: tokenize with or without BOS before the call",
    "padding_side": "pyqkv takes token ids, not text: pad with the tokenizer and pass attention_mask",
    "tokens": "the model's input_ids are the tokens (the loss of return_type='loss' is computed from them)",
    "start_at_layer": "the Hugging Face model runs whole; patch blocks.{i}.hook_resid_pre instead",
    "stop_at_layer": "the Hugging Face model runs whole; read blocks.{i}.hook_resid_pre from the cache instead",
    "shortformer_pos_embed": "positions are the Hugging Face model's own",
    "past_kv_cache": "pass Hugging Face's past_key_values (a transformers Cache) instead",
    "pos_slice": "slice the cached tensors after the call (cache[name][:, pos])",
    "clear_contexts": "hook.ctx is cleared by reset_hooks()",
    "return_cache_object": "run_with_cache always returns an ActivationCache (a dict)",
    "reset_hooks_end": "run_with_cache always removes its own saving hooks and no others",
}


def refuse_tl_keywords(kwargs: dict, where: str) -> None:
    """TypeError for a TransformerLens keyword pyqkv does not implement (TL_NOT_IMPLEMENTED)."""
    for name in kwargs:
        if name in TL_NOT_IMPLEMENTED:
            raise TypeError(
                f"{where}: {name} is a TransformerLens keyword that pyqkv does not implement "
                f"({TL_NOT_IMPLEMENTED[name]}); it is not passed on to the model"
            )


# The keywords of run_with_cache / run_with_hooks: calling a model handle directly calls the model (and
# returns its own output), which must not receive them (a Hugging Face model may drop them without a word).
RUN_KEYWORDS = (
    "return_type",
    "loss_per_token",
    "names_filter",
    "remove_batch_dim",
    "incl_bwd",
    "fwd_hooks",
    "bwd_hooks",
    *PatternSlice.KEYWORDS,
)


def refuse_model_call_keywords(kwargs: dict, where: str) -> None:
    """TypeError for a keyword of run_with_cache / run_with_hooks, or a TransformerLens keyword pyqkv does not
    implement, passed to a call of the model handle itself."""
    refuse_tl_keywords(kwargs, where)
    for name in kwargs:
        if name in RUN_KEYWORDS:
            raise TypeError(
                f"{where}: {name} is a keyword of run_with_cache / run_with_hooks; calling the handle calls the "
                f"Hugging Face model and returns its own output, so it is not passed on"
            )


def model_output(handle, out, args, kwargs, return_type, loss_per_token: bool):
    """What run_with_cache / run_with_hooks return for `return_type`, from the model's output `out`:

    "logits": the logits tensor [B, S, V] (Hugging Face's `out.logits`); "loss": TransformerLens's next-token
    loss from the input ids, the mean over positions 0..S-2 of -log p(ids[:, t+1] | logits[:, t]) (masked by
    attention_mask when one is passed: a transition counts when both of its tokens are attended), or that
    [B, S-1] per position with loss_per_token; "both": (logits, loss); None: nothing; "output": `out` as is.
    A model whose output has no logits (no language-model head) raises ValueError for logits and loss."""
    if return_type == "output":
        return out
    if return_type is None:
        return None
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        model = getattr(handle, "model", handle)
        raise ValueError(
            f"return_type={return_type!r}: {type(model).__name__} returned {type(out).__name__}, which has no "
            f"logits (a model without a language-model head, or return_dict=False); pass return_type='output' "
            f"for the model's own output, or None for the cache alone"
        )
    if return_type == "logits":
        return logits
    loss = next_token_loss(logits, _input_ids(args, kwargs), kwargs.get("attention_mask"), loss_per_token)
    return loss if return_type == "loss" else (logits, loss)


def _input_ids(args, kwargs) -> torch.Tensor:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() != 2:
        raise ValueError(
            "return_type='loss' / 'both': the loss is computed from the token ids, as TransformerLens does; "
            "expected input_ids [B, S] (the first argument or input_ids=), got "
            f"{type(ids).__name__ if not isinstance(ids, torch.Tensor) else f'{ids.dtype} {tuple(ids.shape)}'}"
        )
    return ids


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask=None, per_token: bool = False):
    """TransformerLens's lm_cross_entropy_loss: logits [B, S, V] at position t predict input_ids[:, t + 1].
    Returns the mean of -log p over the B*(S-1) predictions ([B, S-1] with per_token); with a [B, S]
    attention_mask a prediction counts only when both its token and the next are attended (zero per token)."""
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(
            f"return_type='loss': expected logits [B, S, V] over the input ids [B, S] = {list(input_ids.shape)}, "
            f"got logits of shape {tuple(logits.shape)}"
        )
    log_probs = torch.log_softmax(logits, dim=-1)
    predicted = log_probs[:, :-1].gather(-1, input_ids[:, 1:, None].to(logits.device))[..., 0]
    if attention_mask is not None:
        attended = attention_mask.to(device=logits.device).bool()
        counted = attended[:, :-1] & attended[:, 1:]
        predicted = predicted * counted
        n = counted.sum()
    else:
        n = predicted.numel()
    return -predicted if per_token else -predicted.sum() / n
