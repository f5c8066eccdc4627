"""torch.compile over a hooked model: hooks compile into the graph, and a hook Dynamo cannot trace falls back.

Hook firing is plain Python over plain attributes (pyqkv.hooks: `HookPoint.active`, `may_edit`, the hook
lists), so Dynamo traces a user's hooks into the model's one graph, and its guards are on those attributes:
adding or removing a hook recompiles once, the same hooks on new inputs reuse the graph.

    h = pyqkv.hf.attach(model)
    h.compile(fullgraph=True)                      # model.compile(...) with the fallback below
    logits, cache = h.run_with_cache(ids, names_filter="blocks.*.attn.hook_z")

A hook Dynamo cannot trace (a print, a call into a C library) breaks the graph, which fullgraph=True turns
into an error. Through `compile` on a hooked object (AttachedModel, InterfaceHooks, Bridge) such an error
whose traced stack passes through a registered hook runs the call eagerly instead, with one warning
naming the hook, and keeps running eagerly while that hook is registered. An error raised anywhere else
is the caller's and propagates unchanged.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import nn

from pyqkv.hooks import _fn_name


def compile_hooked(module: nn.Module, hook_points: Callable[[], dict], **compile_kwargs) -> None:
    """`module.compile(**compile_kwargs)` (torch.compile of its call, in place), with calls falling back to
    eager while a hook that Dynamo cannot trace is registered at one of `hook_points()`."""
    nn.Module.compile(module, **compile_kwargs)  # not module.compile: a Bridge's is HookedMixin.compile
    # nn.Module.compile keeps the compiled call here and Module.__call__ uses it when set (torch >= 2.2).
    compiled = module._compiled_call_impl
    module._compiled_call_impl = EagerFallback(compiled, module._call_impl, hook_points)


class EagerFallback:
    """Calls `compiled`; where Dynamo cannot trace a registered hook, calls `eager` instead (warned once per
    hook) for as long as that hook stays registered."""

    def __init__(self, compiled: Callable, eager: Callable, hook_points: Callable[[], dict]):
        self.compiled = compiled
        self.eager = eager
        self.hook_points = hook_points
        self.untraceable: list = []  # hook functions Dynamo failed on (identity, not equality)

    def __call__(self, *args, **kwargs):
        if self.untraceable and self._untraceable_registered():
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.Unsupported as error:
            found = self._hook_in(error)
            if found is None:
                raise
            name, fn = found
            self.untraceable.append(fn)
            reason = str(error).strip().splitlines()[0]
            warnings.warn(
                f"{name}: torch.compile cannot trace the hook {_fn_name(fn)} ({reason}); the model runs eagerly "
                f"while it is registered",
                stacklevel=2,
            )
            return self.eager(*args, **kwargs)

    def _registered(self):
        for name, point in self.hook_points().items():
            for handle in (*point.fwd, *point.bwd):
                yield name, handle.fn

    def _untraceable_registered(self) -> bool:
        return any(fn is bad for _, fn in self._registered() for bad in self.untraceable)

    def _hook_in(self, error) -> Optional[tuple]:
        """(point name, hook function) of a registered hook whose code is on the stack Dynamo was tracing
        when it gave up; None when no hook is (the error is not about a hook)."""
        stack = getattr(error, "real_stack", None) or getattr(error, "user_stack", None) or ()
        frames = [(f.filename, f.name) for f in stack]
        for name, fn in self._registered():
            code = _code_of(fn)
            if code is not None and (code.co_filename, code.co_name) in frames:
                return name, fn
        return None


def _code_of(fn):
    """The code object a hook's call runs first: a function's, a partial's function's, a callable's __call__."""
    fn = getattr(fn, "func", fn)  # functools.partial
    code = getattr(fn, "__code__", None)
    if code is None and callable(fn):
        code = getattr(type(fn).__call__, "__code__", None)
    return code
