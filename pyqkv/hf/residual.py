"""The residual-stream hook points of a Hugging Face model's decoder blocks, for both tiers:

    blocks.{i}.hook_resid_pre    [B, S, D]  the hidden states entering block i (HF's hidden_states[i])
    blocks.{i}.hook_attn_out     [B, S, D]  the attention's output (after the output projection), before the
                                            block adds it to the residual stream
    blocks.{i}.hook_resid_post   [B, S, D]  the hidden states leaving block i (before any final norm)

Readable and editable as every point (a hook returning a tensor replaces the activation; in-place edits
count). They fire from torch module hooks on the block (a forward pre-hook and a forward hook) and on the
attention module (a forward hook), registered only while the point has a hook (HookPoint.on_change) and
removed with its last hook: a model with nothing hooked there runs exactly as Hugging Face's own.

The block of an attention module is found generically: its outermost ancestor that is an item of a
ModuleList (the model's list of decoder layers). Blocks that return a tensor (transformers 5, most families)
and blocks that return a tuple (hidden states first) are both read. Parallel-residual blocks (GPT-J, GPT-NeoX,
Falcon, Phi) have the same three boundaries, so the points mean the same there.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from pyqkv.hooks import HookPoint

RESID_PRE, ATTN_OUT, RESID_POST = "hook_resid_pre", "hook_attn_out", "hook_resid_post"


def block_path(model: nn.Module, attention_path: str) -> Optional[str]:
    """The module path of the decoder block holding the attention module at `attention_path`: its outermost
    ancestor that is an item of a ModuleList, or None when it has none (or is such an item itself)."""
    parts = attention_path.split(".")
    for k in range(len(parts) - 1):
        container = model.get_submodule(".".join(parts[: k + 1]))
        if isinstance(container, nn.ModuleList) and parts[k + 1].isdigit():
            path = ".".join(parts[: k + 2])
            return path if path != attention_path else None
    return None


class ResidualPoints:
    """The points `blocks.{i}.hook_resid_pre / hook_resid_post` (and, where the tier asks for it,
    `blocks.{i}.hook_attn_out`) of a model's decoder blocks, with the torch hooks that fire them.

    model: the Hugging Face model. layers: [(i, attention module path)] of the attention modules named
    `blocks.{i}.attn`; a layer whose block cannot be found (or holds a second listed attention module) gets no
    residual points. attn_out_from_module: fire hook_attn_out from a forward hook on the attention module
    (the interface tier); the attach tier fires it inside its own attention module instead and passes False.
    `points`: full name -> HookPoint."""

    def __init__(self, model: nn.Module, layers: list, attn_out_from_module: bool = True):
        self.points = {}
        self._torch_handles = {}  # point name -> the torch RemovableHandle while the point has hooks
        self._targets = {}  # point name -> (module, kind)
        found = [(i, path, block_path(model, path)) for i, path in layers]
        blocks = [b for _, _, b in found]
        for i, path, block in found:
            if block is None or blocks.count(block) > 1:
                continue
            module = model.get_submodule(block)
            names = [(RESID_PRE, module, "pre"), (RESID_POST, module, "post")]
            if attn_out_from_module:
                names.insert(1, (ATTN_OUT, model.get_submodule(path), "post"))
            for local, target, kind in names:
                name = f"blocks.{i}.{local}"
                self._targets[name] = (target, kind)
                self.points[name] = HookPoint(name, on_change=self._sync)

    def _sync(self, point: HookPoint) -> None:
        """Register the torch hook of `point` when it gets its first hook; remove it with its last."""
        handle = self._torch_handles.get(point.name)
        if point.active and handle is None:
            module, kind = self._targets[point.name]
            # prepend: Hugging Face's own forward hooks (its output_hidden_states recorders) see the edit.
            if kind == "pre":
                hidden = _hidden_states_argument(type(module))
                fn = _pre_hook(point, hidden)
                self._torch_handles[point.name] = module.register_forward_pre_hook(fn, with_kwargs=True, prepend=True)
            else:
                fn = _post_hook(point)
                self._torch_handles[point.name] = module.register_forward_hook(fn, prepend=True)
        elif not point.active and handle is not None:
            handle.remove()
            del self._torch_handles[point.name]


def _hidden_states_argument(module_class) -> str:
    """The name of a block's first forward argument (the hidden states, when passed by keyword)."""
    params = list(inspect.signature(module_class.forward).parameters)[1:]
    return "hidden_states" if "hidden_states" in params or not params else params[0]


def _checked(point: HookPoint, module: nn.Module, tensor) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        got = f"shape {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise TypeError(
            f"{point.name}: expected {type(module).__name__}'s hidden states as a Tensor [B, S, D], got {got}"
        )
    return tensor


def _pre_hook(point: HookPoint, hidden: str):
    def fire_resid_pre(module, args, kwargs):
        if args:
            x = _checked(point, module, args[0])
            new = point.fire(x)
            return None if new is x else ((new, *args[1:]), kwargs)
        x = _checked(point, module, kwargs.get(hidden))
        new = point.fire(x)
        return None if new is x else (args, {**kwargs, hidden: new})

    return fire_resid_pre


def _post_hook(point: HookPoint):
    def fire_output(module, args, output):
        if isinstance(output, (tuple, list)):  # (hidden states, ...): older blocks and attention modules
            x = _checked(point, module, output[0] if output else None)
            new = point.fire(x)
            return None if new is x else type(output)((new, *output[1:]))
        x = _checked(point, module, output)
        new = point.fire(x)
        return None if new is x else new

    return fire_output
