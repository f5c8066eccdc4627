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

HookFn = Callable[[torch.Tensor, "HookPoint"], Optional[torch.Tensor]]
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

    def add(
        self, fn: HookFn, dir: str = "fwd", prepend: bool = False, is_permanent: bool = False, read_only: bool = False
    ) -> HookHandle:
        _check_hook_args(self.name, fn, dir, prepend, is_permanent)
        handle = HookHandle(self, fn, dir, is_permanent, read_only)
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

    def _changed(self) -> None:
        self.active = bool(self.fwd or self.bwd)
        self.may_edit = bool(self.bwd) or any(not h.read_only for h in self.fwd)

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

    def _backward_hooks(self, handles: tuple):
        """The gradient hook of one forward: the backward hooks registered then, each called only while it
        is still registered (a backward after the hooks() context ended or after remove() calls none)."""

        def on_grad(grad):
            for handle in handles:
                if handle not in self.bwd:
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


def gather_heads(point: HookPoint, tensor: torch.Tensor) -> torch.Tensor:
    """A point's tensor with every rank's heads along its head axis, in global order: the collective
    run_with_cache(gather=True) makes. Unchanged where the tensor already holds every head."""
    if point.heads is None or len(point.heads) == point.n_heads_total:
        return tensor
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{point.name}: gather=True needs torch.distributed initialized (this rank holds heads "
            f"{point.heads.start}..{point.heads.stop - 1} of {point.n_heads_total})"
        )
    starts = [None] * dist.get_world_size()
    dist.all_gather_object(starts, (point.heads.start, len(point.heads)))
    widest = max(n for _, n in starts)
    dim = point.head_dim
    pad = list(tensor.shape)
    pad[dim] = widest - tensor.shape[dim]
    padded = torch.cat([tensor, tensor.new_zeros(pad)], dim) if pad[dim] else tensor.contiguous()
    parts = [torch.empty_like(padded) for _ in starts]
    dist.all_gather(parts, padded)
    ordered = sorted(zip(starts, parts), key=lambda item: item[0][0])
    return torch.cat([part.narrow(dim, 0, n) for (_, n), part in ordered], dim)


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
    """A short list of hook names: model-level names `blocks.{i}.<point>` are folded into one line."""
    names = list(names)
    parsed = [_BLOCK_NAME.match(n) for n in names]
    if names and all(parsed):
        layers = sorted({int(m.group(1)) for m in parsed})
        points = list(dict.fromkeys(m.group(2) for m in parsed))
        shared = points[0].split(".")[0] + "."  # e.g. "attn.", when every point is under it
        if not all(p.startswith(shared) for p in points):
            shared = ""
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
        points = [p[len(shared) :] for p in points]
        return f"blocks.{{{span}}}.{shared}<point> with <point> one of {', '.join(points)}"
    return ", ".join(names)


def _fn_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


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

    # --- lookup -----------------------------------------------------------------------------------
    def _resolve(self, name: str) -> str:
        points = self.hook_points()
        canonical = self.hook_aliases().get(name, name)
        if canonical not in points:
            valid = list(points) + list(self.hook_aliases())
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

    def run_with_hooks(self, *args, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, **kwargs):
        """Run the forward with temporary hooks. Backward hooks fire only while registered, and these are
        removed on return: with bwd_hooks call backward inside `with model.hooks(...)` instead, or pass
        reset_hooks_end=False (warned, as TransformerLens warns)."""
        if bwd_hooks and reset_hooks_end:
            warnings.warn(
                "bwd_hooks: removed when run_with_hooks returns, before any backward pass can call them; run the "
                "backward inside `with model.hooks(bwd_hooks=...)`, or pass reset_hooks_end=False",
                stacklevel=2,
            )
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, reset_hooks_end=reset_hooks_end):
            return self(*args, **kwargs)

    def run_with_cache(self, *args, names_filter: NameFilter = None, gather: bool = False, **kwargs):
        """Run the forward and return (output, cache): canonical names (and aliases asked for by name)
        mapped to detached hook-format tensors. A point named exactly that cannot fire (a flag is off, the
        layer lacks the feature, the tier cannot see it) raises ValueError saying why; globs and predicates
        skip such points.

        gather: under tensor parallelism, where each rank's points hold its own heads, all-gather them so
        every rank's cache holds every head in global order (a collective: call it on every rank)."""
        if not isinstance(gather, bool):
            raise TypeError(f"gather: expected a bool, got {type(gather).__name__}")
        cache = ActivationCache(model=self)
        # A point named exactly that cannot fire here raises (naming what enables it): a cache that silently
        # lacks an asked-for entry invalidates the analysis built on it. Globs and predicates skip such points.
        selected = self._select(names_filter, by_name_strict=True)
        aliases_asked = {}
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if names_filter is not None and not callable(names_filter):
            for name in names_filter:
                canonical = self.hook_aliases().get(name)
                if canonical is not None:
                    aliases_asked.setdefault(canonical, []).append(name)

        def saver(name):
            # Keyed by the name in this object's namespace (the one names_filter used), not hook.name:
            # a Bridge inside an attached model has points named "blocks.{i}.attn.hook_*".
            def save(tensor, hook):
                cache[name] = tensor.detach()
                for alias in aliases_asked.get(name, ()):
                    cache[alias] = cache[name]

            return save

        points = self.hook_points()
        added = [points[n].add(saver(n), read_only=True) for n in selected]
        try:
            out = self(*args, **kwargs)
        finally:
            for handle in added:
                handle.remove()
        if gather:
            for name in selected:
                if name in cache:
                    cache[name] = gather_heads(points[name], cache[name])
                    for alias in aliases_asked.get(name, ()):
                        cache[alias] = cache[name]
        return out, cache
