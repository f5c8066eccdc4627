"""Checkpoints and training while a Hugging Face model is attached.

attach() puts an HFAttention (holding a Bridge) where each attention module was, and the Bridge holds the
layer's Q, K, V weights as one blocked fused Parameter. Left alone, torch would then save the Bridge's
names (`...self_attn.bridge.qkv_weight`), which Hugging Face does not know: from_pretrained would fill the
projections with fresh random weights. install() gives every HFAttention three hooks that make it read and
write its original module's own keys, shapes and layouts instead:

- a state_dict post-hook: the layer's entries become the original module's (`q_proj.weight` [H Dh, D],
  GPT-2's Conv1D `c_attn.weight` [D, 3 D], GPT-NeoX's interleaved `query_key_value.weight`), in the
  original's order, with the Bridge's current values; each one its own tensor (safetensors refuses two
  entries viewing one buffer, as q_proj, k_proj and v_proj would otherwise);
- a load_state_dict pre-hook that takes those keys, writes the projections into the Bridge (in its
  layout) and hands the rest (norms, dense_bias) to torch under the names they have while attached; a key
  of the layer that is neither is unexpected, a missing one is reported under its Hugging Face name;
- a load_state_dict post-hook that renames what torch reports missing inside the layer to the original's
  key, and drops the Bridge's own projection Parameters, which no checkpoint names.
Where the Bridge calls the module's own projections (offloaded, quantized, wrapped: pyqkv.hf.placement),
those modules are in the tree and only their names change.

Training: attach replaces some Parameters (the separate Q, K, V projections packed into one fused weight;
a repacked non-blocked fused projection), and detach gives the module its own back. An optimizer built
before would hold Parameters that no longer take part in the forward: they get no gradient and the
optimizer skips them, silently. retire() records each such Parameter (weakly), and a global optimizer
step pre-hook refuses to step an optimizer that holds one, naming it.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from pyqkv import ops

# ---------------------------------------------------------------------------------------------------
# The Bridge's weights in the original module's layout (also what detach writes back).


def fused_in_layout(bridge, layout: str, conv1d: bool):
    """(weight, bias or None): the Bridge's Q, K, V weights as a fused projection of `layout` (SPEC §5) and
    orientation (conv1d: [D, n_out], else [n_out, D]), new tensors."""
    b = bridge
    return ops.pack_qkv(
        b.W_Q, b.W_K, b.W_V, *((b.b_Q, b.b_K, b.b_V) if b.qkv_bias is not None else ()), layout=layout, conv1d=conv1d
    )


def _shares_fused(bridge, spec) -> bool:
    """The Bridge's fused Parameter is the module's own, in its layout and orientation (blocked layouts)."""
    return spec.layout == "blocked" and bridge._qkv_conv1d == spec.conv1d


def _out_weight(bridge, conv1d: bool) -> torch.Tensor:
    """The Bridge's output weight in the module's orientation (the same Parameter when shared)."""
    return bridge.out_weight if bridge._out_conv1d == conv1d else bridge.out_weight.t()


def _heads_weight(bridge, which: int) -> torch.Tensor:
    """W_Q (0), W_K (1) or W_V (2): [heads, D, Dh] views of the fused weight."""
    return (bridge.W_Q, bridge.W_K, bridge.W_V)[which]


def _heads_bias(bridge, which: int) -> torch.Tensor:
    return (bridge.b_Q, bridge.b_K, bridge.b_V)[which]


# ---------------------------------------------------------------------------------------------------
# One attached layer's keys


_PROJECTION, _TREE, _OUTSIDE = "projection", "tree", "outside"


class _Entry:
    """Where the value of one of the original module's keys lives while attached: `kind` _PROJECTION (made
    from the Bridge's weights: `role` q/k/v/qkv/out, `part` weight/bias), _TREE (an entry of the attached
    tree, under `target`), or _OUTSIDE (a tensor only the original holds, outside the tree: `tensor`)."""

    __slots__ = ("kind", "role", "part", "target", "tensor", "shape")

    def __init__(self, kind, shape, role=None, part=None, target=None, tensor=None):
        self.kind, self.shape, self.role, self.part, self.target, self.tensor = kind, shape, role, part, target, tensor


class _Layer:
    """One attached layer (an HFAttention) read in its original module's keys. Built on each call (a walk of
    two small module trees), so it follows whatever happened since attach (a move, a cast, a replaced norm).

    entries: original-relative key -> _Entry, in the original's state_dict order;
    internal: attached-relative keys of the Bridge's own projection Parameters (named by no checkpoint);
    extra: attached-relative keys no original key accounts for (kept under their own names, never dropped).
    """

    def __init__(self, attn: nn.Module):
        self.attn = attn
        self.bridge, self.spec, original = attn.bridge, attn._spec, attn._original
        held = self.bridge.projections is None  # else the Bridge calls the module's projections, in the tree
        attached_state = _own_state(attn)
        attached_paths = {id(m): name for name, m in attn.named_modules() if name}
        roles = {}
        if held:
            qkv = self.spec.qkv
            roles = {id(m): r for m, r in zip(qkv, "qkv")} if isinstance(qkv, tuple) else {id(qkv): "qkv"}
            roles[id(self.spec.out)] = "out"
        self.entries = {}
        for path, m in original.named_modules():
            local = {}
            m._save_to_state_dict(local, "", keep_vars=True)  # the module's own keys, as it saves them
            for key, t in local.items():
                hf_key = f"{path}.{key}" if path else key
                shape = t.shape if isinstance(t, torch.Tensor) else None
                if id(m) in roles and key in ("weight", "bias"):
                    entry = _Entry(_PROJECTION, shape, role=roles[id(m)], part=key)
                elif id(m) in attached_paths:
                    entry = _Entry(_TREE, shape, target=f"{attached_paths[id(m)]}.{key}")
                elif not path and key in attached_state:  # the module's own tensor, kept on the HFAttention
                    entry = _Entry(_TREE, shape, target=key)
                else:
                    entry = _Entry(_OUTSIDE, shape, tensor=t)
                self.entries[hf_key] = entry
        b = self.bridge
        fused = {id(p) for p in (b.qkv_weight, b.qkv_bias, b.out_weight, b.out_bias) if p is not None}
        self.internal = {k for k, t in attached_state.items() if held and id(t) in fused}
        targets = {e.target for e in self.entries.values() if e.kind == _TREE}
        self.extra = [k for k in attached_state if k not in targets and k not in self.internal]

    # -- saving

    def projection_values(self, keep_vars: bool) -> dict:
        """(role, part) -> the value saved for it: the Bridge's own Parameter where the module shares it
        (detached unless keep_vars), else a new contiguous tensor."""
        b, spec = self.bridge, self.spec
        fix = (lambda t: t) if keep_vars else (lambda t: t.detach())
        values = {}
        if isinstance(spec.qkv, tuple):
            for which, role in enumerate("qkv"):
                W = _heads_weight(b, which)  # [heads, D, Dh] -> Linear's [heads Dh, D]
                values[role, "weight"] = W.detach().transpose(1, 2).reshape(-1, W.shape[1]).clone()
                if b.qkv_bias is not None:
                    values[role, "bias"] = _heads_bias(b, which).detach().reshape(-1).clone()
        elif _shares_fused(b, spec):
            values["qkv", "weight"] = fix(b.qkv_weight)
            if b.qkv_bias is not None:
                values["qkv", "bias"] = fix(b.qkv_bias)
        else:
            with torch.no_grad():
                weight, bias = fused_in_layout(b, spec.layout, spec.conv1d)
            values["qkv", "weight"], values["qkv", "bias"] = weight, bias
        out = _out_weight(b, spec.conv1d)
        values["out", "weight"] = fix(out) if out is b.out_weight else out.detach().contiguous()
        values["out", "bias"] = None if b.out_bias is None else fix(b.out_bias)
        return values

    def save(self, destination: dict, prefix: str) -> None:
        """Replace the layer's attached entries in `destination` (a state_dict being made) by the original's."""
        saved = {k[len(prefix) :]: destination.pop(k) for k in [k for k in destination if k.startswith(prefix)]}
        # state_dict hooks are not told keep_vars; torch detaches every entry unless it is set, and the
        # attached tree always holds a Parameter, so its entries say which it was.
        keep_vars = any(isinstance(v, nn.Parameter) for v in saved.values())
        projections = None
        for hf_key, e in self.entries.items():
            if e.kind == _PROJECTION:
                projections = projections or self.projection_values(keep_vars)
                value = projections[e.role, e.part]
            elif e.kind == _TREE:
                value = saved.get(e.target)
            else:
                value = e.tensor if keep_vars or not isinstance(e.tensor, torch.Tensor) else e.tensor.detach()
            if value is not None:
                destination[prefix + hf_key] = value
        for key in self.extra:
            if key in saved:
                destination[prefix + key] = saved[key]
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:  # per-module versions, as the original's modules would record them
            for name, _ in self.attn.named_modules():
                if name:
                    metadata.pop(prefix + name, None)
            for name, m in self.attn._original.named_modules():
                metadata[(prefix + name) if name else prefix[:-1]] = dict(version=m._version)

    # -- loading

    def load(self, state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs) -> dict:
        """Take the layer's keys out of `state_dict`: the projections are written into the Bridge, the
        tree's entries put back under their attached names for torch to load. Returns {attached key: the
        original's key} for the post-hook's renaming of what torch then reports missing."""
        given = {k[len(prefix) :]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
        projections = {}
        renames = {prefix + k: None for k in self.internal}  # None: not a key of the model, drop it
        for hf_key, e in self.entries.items():
            if e.kind == _TREE:
                renames[prefix + e.target] = prefix + hf_key
            if hf_key not in given:
                if e.kind != _TREE and strict:  # (torch reports a missing tree entry itself: renamed)
                    missing_keys.append(prefix + hf_key)
                continue
            value = given.pop(hf_key)
            if e.kind == _TREE:
                state_dict[prefix + e.target] = value
            elif _fits(prefix + hf_key, value, e.shape, error_msgs):
                if e.kind == _PROJECTION:
                    projections[e.role, e.part] = value
                else:
                    with torch.no_grad():
                        e.tensor.copy_(value)
        for key in self.extra:
            if key in given:
                state_dict[prefix + key] = given.pop(key)
        if strict:
            unexpected_keys.extend(prefix + k for k in given)
        if projections:
            with torch.no_grad():
                self._write_projections(projections)
        return renames

    def _write_projections(self, values: dict) -> None:
        """Copy checkpoint tensors (the module's layout and orientation, shapes checked) into the Bridge."""
        b, spec, c = self.bridge, self.spec, self.bridge.cfg
        for (role, part), value in values.items():
            if role == "out":
                (_out_weight(b, spec.conv1d) if part == "weight" else b.out_bias).copy_(value)
            elif role in ("q", "k", "v"):  # a separate projection (Linear): [heads Dh, D] / [heads Dh]
                which = "qkv".index(role)
                if part == "weight":
                    W = _heads_weight(b, which)
                    W.copy_(value.reshape(W.shape[0], c.d_head, W.shape[1]).transpose(1, 2))
                else:
                    bias = _heads_bias(b, which)
                    bias.copy_(value.reshape(bias.shape))
            else:  # the fused projection, split by the module's layout
                like = b.qkv_weight
                t = value.to(device=like.device, dtype=like.dtype)
                if part == "bias":  # a bias is a fused weight with one input row (as ops.split_qkv splits it)
                    t, conv1d = t.unsqueeze(0), True
                else:
                    conv1d = spec.conv1d
                split = ops.split_qkv(
                    t,
                    None,
                    n_heads=c.n_heads,
                    n_kv_heads=c.n_kv_heads,
                    d_head=c.d_head,
                    layout=spec.layout,
                    conv1d=conv1d,
                )[:3]
                for which, s in enumerate(split):
                    target = _heads_weight(b, which) if part == "weight" else _heads_bias(b, which)
                    target.copy_(s if part == "weight" else s.squeeze(1))


def _own_state(module: nn.Module) -> dict:
    """module's state_dict(keep_vars=True) entries, without running any state_dict hook (ours included)."""
    state = {}
    for name, m in module.named_modules():
        m._save_to_state_dict(state, f"{name}." if name else "", keep_vars=True)
    return state


def _fits(key: str, value, shape, error_msgs: list) -> bool:
    """torch's own checks (and messages) for a checkpoint tensor loaded into a model tensor of `shape`."""
    if not torch.overrides.is_tensor_like(value):
        error_msgs.append(
            f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like object from '
            f"checkpoint but received {type(value)}"
        )
        return False
    if shape is not None and value.shape != shape:
        error_msgs.append(
            f"size mismatch for {key}: copying a param with shape {value.shape} from checkpoint, the shape in "
            f"current model is {shape}."
        )
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# The hooks (module-level functions taking the module: a deep copy of an attached model keeps working).

_renames_pending = weakref.WeakKeyDictionary()  # HFAttention -> renames, from its load pre-hook to its post-hook


def _save_hook(attn, destination, prefix, local_metadata) -> None:
    _Layer(attn).save(destination, prefix)


def _load_pre_hook(attn, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    renames = _Layer(attn).load(state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs)
    _renames_pending[attn] = renames


def _load_post_hook(attn, incompatible_keys) -> None:
    renames = _renames_pending.pop(attn, {})
    missing = incompatible_keys.missing_keys
    missing[:] = [renames.get(k, k) for k in missing if not (k in renames and renames[k] is None)]


_HOOKS = (_save_hook, _load_pre_hook, _load_post_hook)


def install(model: nn.Module) -> None:
    """Make every HFAttention of `model` save and load its original module's keys, and remember where each
    attached layer sits (for the names in the optimizer's error)."""
    for path, attn in _attached(model):
        attn.register_state_dict_post_hook(_save_hook)
        attn.register_load_state_dict_pre_hook(_load_pre_hook)
        attn.register_load_state_dict_post_hook(_load_post_hook)
        _paths[attn.bridge] = f"{path}.bridge" if path else "bridge"
        for name, m in attn._original.named_modules():
            _paths[m] = ".".join(p for p in (path, name) if p)


def uninstall(model: nn.Module) -> None:
    """Remove install()'s hooks from every HFAttention of `model` (detach calls it before it hands the
    original modules back). Found by function, not by handle, so a deep copy's hooks go too."""
    for _, attn in _attached(model):
        for hooks in (attn._state_dict_hooks, attn._load_state_dict_pre_hooks, attn._load_state_dict_post_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "hook", h) in _HOOKS]:
                del hooks[key]
        _renames_pending.pop(attn, None)


def _attached(model: nn.Module):
    from pyqkv.hf.attached import HFAttention  # (attached imports this module)

    return [(path, m) for path, m in model.named_modules() if isinstance(m, HFAttention)]


# ---------------------------------------------------------------------------------------------------
# Parameters that left the model, and the optimizer step that would silently skip them

_retired = {}  # id(Parameter) -> (weakref to it, weakref to its former owner, attribute name, "attach"/"detach", path)
_paths = weakref.WeakKeyDictionary()  # module -> its dotted path in the model it was attached in
_step_hook = None


def retire(param, owner: nn.Module, name: str, by: str) -> None:
    """Record that `param`, until now `owner.<name>`, no longer takes part in the model (pyqkv.hf.<by>
    replaced it). Weakly: the record goes with the Parameter."""
    global _step_hook
    if not isinstance(param, nn.Parameter):
        return
    key = id(param)
    path = _paths.get(owner)  # known at detach; at attach, install() names the owner only after this
    entry = (weakref.ref(param, lambda _, key=key: _retired.pop(key, None)), weakref.ref(owner), name, by, path)
    _retired[key] = entry
    if _step_hook is None:
        # Global, registered once: while no retired Parameter is alive it returns at its first line.
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _step_hook = register_optimizer_step_pre_hook(_refuse_retired)


def reclaim(owner: nn.Module, name: str) -> Optional[nn.Parameter]:
    """The Parameter attach took from `owner.<name>`, if it is still alive (an optimizer built before attach
    holds it), for detach to give back; no longer retired either way."""
    for key, (ref, owner_ref, n, by, _) in list(_retired.items()):
        if by == "attach" and n == name and owner_ref() is owner:
            del _retired[key]
            if ref() is not None:
                return ref()
    return None


def _retired_name(param) -> Optional[str]:
    entry = _retired.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    _, owner_ref, name, by, path = entry
    owner = owner_ref()
    path = path if path is not None else _paths.get(owner) if owner is not None else None
    where = f"{path}.{name}" if path else f"{type(owner).__name__}.{name}"
    return f"{where} {list(param.shape)} (replaced by pyqkv.hf.{by})"


def _refuse_retired(optimizer, args, kwargs):
    if not _retired:
        return None
    held = [n for group in optimizer.param_groups for p in group["params"] if (n := _retired_name(p)) is not None]
    if held:
        shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        raise RuntimeError(
            f"optimizer.step(): this {type(optimizer).__name__} holds {len(held)} Parameter(s) the model no longer "
            f"uses: {shown}. They get no gradient, so the step would train nothing for them. pyqkv.hf.attach "
            f"fuses a layer's Q, K, V weights into one Parameter (bridge.qkv_weight) and detach gives the module "
            f"its own back: this optimizer was built before pyqkv.hf.attach (or before detach). Build it from "
            f"model.parameters() after attach (and again after detach)."
        )
    return None
