"""attach(model) / detach(model): every supported attention module of a Hugging Face model becomes a
Bridge behind that module's calling convention, and the model-level hook handle over them.

    h = pyqkv.hf.attach(model)              # every supported attention module becomes a Bridge behind its convention
    logits, cache = h.run_with_cache(input_ids, names_filter=["blocks.0.attn.hook_pattern"])
    with h.hooks(fwd_hooks=[("blocks.3.attn.hook_z", ablate_head_5)]):
        model.generate(input_ids, max_new_tokens=8)
    pyqkv.hf.detach(model)                  # the original modules, with the Bridge's current weights
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from pyqkv.bridge import Bridge, Projections
from pyqkv.cache import KVCache
from pyqkv.checks import describe
from pyqkv.hf import checkpoint, placement
from pyqkv.hf.families import SUPPORTED, LayerSpec, family_of, layer_spec
from pyqkv.hf.hf_cache import CacheMirror
from pyqkv.hf.recording import attention_recorder, install_hf_recording_hooks
from pyqkv.hf.residual import ATTN_OUT, ResidualPoints
from pyqkv.hooks import HookedMixin, HookPoint, refuse_model_call_keywords
from pyqkv.points import BLOCK_POINTS


def bridge_from_module(module, spec: Optional[LayerSpec] = None, **flags) -> Bridge:
    """A Bridge equal to `module` (a Hugging Face attention module of a supported family), holding no
    second copy of its weights where the layout allows: a blocked fused weight and the output projection
    are the module's own Parameters; separate Q, K, V projections are packed into one fused weight that
    q_proj.weight, k_proj.weight and v_proj.weight become views of. Other fused layouts (interleaved,
    grouped, codegen) are repacked into a blocked copy (attach then frees the module's own).
    Where the weights cannot be held (offloaded by accelerate, a quantized or PEFT-wrapped projection,
    tensor-parallel shards) the Bridge calls the module's own projections instead (pyqkv.hf.placement).
    Flags: use_split_qkv_input, use_attn_in, use_attn_result, hook_conversions."""
    spec = layer_spec(module) if spec is None else spec
    reason = placement.delegation_reason(spec)
    if reason is not None:
        return _calling_bridge(module, spec, reason, **flags)
    if isinstance(spec.qkv, tuple):
        weight, bias = pack_separate(spec.qkv)
    else:
        weight, bias = spec.qkv.weight, getattr(spec.qkv, "bias", None)
    for name, t in (("qkv weight", weight), ("output weight", spec.out.weight)):
        if t.device.type == "meta":
            raise NotImplementedError(
                f"module: the {type(module).__name__}'s {name} is on the meta device (offloaded, or not loaded "
                f"yet); pyqkv needs the weights in memory to attach"
            )
    bridge = Bridge(
        weight,
        bias,
        spec.out.weight,
        getattr(spec.out, "bias", None),
        layout=spec.layout,
        conv1d=spec.conv1d,
        share_weights=True,
        **spec.bridge_kwargs,
        **spec.bridge_modules,
        **flags,
    )
    return bridge.train(module.training)  # dropout follows the wrapped module's mode


def _calling_bridge(module, spec: LayerSpec, reason: str, **flags) -> Bridge:
    """A Bridge that calls the module's projections (Projections): nothing is copied or viewed. Under tensor
    parallelism it is built with this rank's head counts, and its points say which global heads they hold."""
    kw = dict(spec.bridge_kwargs)
    H, Dh = kw["n_heads"], kw["d_head"]
    Hkv = kw.get("n_kv_heads") or H
    D = placement.d_model_of(spec)
    heads, kv_heads = range(H), range(Hkv)
    if reason.startswith("weights sharded"):
        if spec.layout in ("codegen", "grouped"):
            raise NotImplementedError(
                f"module: a {type(module).__name__} ({spec.layout} layout) under tensor parallelism: its fused "
                f"blocks split across ranks in a layout pyqkv does not read; tensor parallelism is supported for "
                f"per-head (interleaved, separate-projection) and gathered layouts"
            )
        H_local, Hkv_local, heads, kv_heads = placement.local_heads(spec, H, Hkv, Dh, D)
        kw.update(n_heads=H_local, n_kv_heads=Hkv_local)
    bridge = Bridge(
        None,
        None,
        None,
        None,
        layout=spec.layout,
        conv1d=spec.conv1d,
        d_model=D,
        projections=Projections(spec.qkv, spec.out, reason),
        **kw,
        **spec.bridge_modules,
        **flags,
    )
    bridge.set_heads(heads, kv_heads, H, Hkv)
    return bridge.train(module.training)


def pack_separate(projections):
    """(weight [n_out, D], bias [n_out] or None): the Linear projections' weights as one blocked fused
    weight, with each projection's weight (and bias) rebound as a view of it. Projections that already view
    one storage in order (packed before) are left as they are."""
    weights = [p.weight for p in projections]
    biases = [getattr(p, "bias", None) for p in projections]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise TypeError("module: expected a bias on all of q_proj, k_proj and v_proj or on none of them")
    fused_w = _adjacent(weights)
    fused_b = None if biases[0] is None else _adjacent(biases)
    with torch.no_grad():
        if fused_w is None:
            fused_w = torch.cat([w.detach() for w in weights], 0)
            _rebind_rows(projections, "weight", fused_w, "attach")
        if biases[0] is not None and fused_b is None:
            fused_b = torch.cat([b.detach() for b in biases], 0)
            _rebind_rows(projections, "bias", fused_b, "attach")
    return fused_w, fused_b


def _adjacent(tensors):
    """The tensor the given row blocks are consecutive views of (one storage, in order, contiguous), or None."""
    first = tensors[0]
    if not all(t.is_contiguous() and t.dtype == first.dtype and t.device == first.device for t in tensors):
        return None
    storage = first.untyped_storage().data_ptr()
    end = first.storage_offset()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage or t.storage_offset() != end:
            return None
        end += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _rebind_rows(projections, name: str, fused: torch.Tensor, by: str) -> None:
    """projection.<name> := a Parameter viewing its rows of `fused`."""
    start = 0
    for p in projections:
        rows = getattr(p, name).shape[0]
        _replace(p, name, fused[start : start + rows], by)
        start += rows


def _release(spec: LayerSpec) -> None:
    """Free a fused projection the Bridge repacked (a non-blocked layout): while attached the Bridge holds
    the layer's only copy, and detach writes it back. A meta tensor keeps the shape and dtype."""
    if isinstance(spec.qkv, tuple) or spec.layout == "blocked" or placement.delegation_reason(spec) is not None:
        return
    for name in ("weight", "bias"):
        old = getattr(spec.qkv, name, None)
        if old is not None:
            _replace(spec.qkv, name, old.detach().to("meta"), "attach")


def _write_back(bridge: Bridge, spec: LayerSpec) -> None:
    """Give the original module the Bridge's (possibly edited or trained, moved or cast) weights, in its own
    layout: shared Parameters need nothing, separate projections become views of the Bridge's fused
    weight again, and a released fused projection gets a fresh tensor. The Bridge's Parameters the module
    does not take back are retired (an optimizer built while attached holds them)."""
    b = bridge
    if b.projections is not None:  # it called the module's own projections: nothing to give back
        return
    with torch.no_grad():
        if isinstance(spec.qkv, tuple):
            # Always re-made (views, no copy): the Parameters attach took come back here (_replace).
            _rebind_rows(spec.qkv, "weight", b.qkv_weight.detach(), "detach")
            if b.qkv_bias is not None:
                _rebind_rows(spec.qkv, "bias", b.qkv_bias.detach(), "detach")
        elif spec.qkv.weight is not b.qkv_weight:
            weight, bias = checkpoint.fused_in_layout(b, spec.layout, spec.conv1d)
            _replace(spec.qkv, "weight", weight, "detach")
            if getattr(spec.qkv, "bias", None) is not None and bias is not None:
                _replace(spec.qkv, "bias", bias, "detach")
        if spec.out.weight is not b.out_weight:
            out = b.out_weight if spec.conv1d == b._out_conv1d else b.out_weight.t()
            _replace(spec.out, "weight", out.detach().contiguous().clone(), "detach")
        if getattr(spec.out, "bias", None) is not None and b.out_bias is not None and spec.out.bias is not b.out_bias:
            _replace(spec.out, "bias", b.out_bias.detach().clone(), "detach")
    qkv = spec.qkv if isinstance(spec.qkv, tuple) else (spec.qkv,)
    kept = {id(p) for m in (*qkv, spec.out) for p in m.parameters()}
    for name in ("qkv_weight", "qkv_bias", "out_weight", "out_bias"):
        p = getattr(b, name)
        if p is not None and id(p) not in kept:
            checkpoint.retire(p, b, name, "detach")


def _replace(module: nn.Module, name: str, value: torch.Tensor, by: str) -> None:
    """module.<name> := a Parameter over `value` (requires_grad as before): the one place attach and detach
    replace a module's Parameter. The replaced one is retired (pyqkv.hf.checkpoint: an optimizer still
    holding it would train nothing, and its step raises); at detach, the Parameter attach took from this
    module, where something (an optimizer built before attach) still holds it, is given back with the new
    value, so that optimizer works again."""
    old = getattr(module, name)
    new = checkpoint.reclaim(module, name) if by == "detach" else None
    if new is not None:  # (the same attribute of the same module: its shape)
        new.data = value
        new.requires_grad_(old.requires_grad)
    else:
        new = nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(module, name, new)
    checkpoint.retire(old, module, name, by)


class HFAttention(nn.Module):
    """A Bridge behind a Hugging Face attention module's calling convention, in place of the module.

    Called exactly as the original (its forward's signature binds the arguments): the hidden states [B, S, D]
    (whatever the module names its first argument); the cache under `past_key_values`, `layer_past` or
    `cache` (a transformers Cache or a pyqkv.KVCache); HF's mask (4-D additive [B, 1, S or 1, K] or bool
    [B, 1, S, K], 2-D padding [B, K], or None, read by the family's LayerSpec.mask_rule and
    bool_mask_masks); and, as the family passes them, `position_embeddings` (cos, sin), `position_ids`,
    `alibi`, `position_bias` (MPT) and `residual`. Returns what the module returns (LayerSpec.returns):
    (attn_output [B, S, D], attn_weights) for most; attn_weights is the pattern [B, H, S, K] when
    output_attentions is set (on every call for a module that always returns it), else None.
    """

    def __init__(self, bridge: Bridge, original: nn.Module, layer_idx: int, spec: LayerSpec):
        super().__init__()
        self.bridge = bridge
        self.layer_idx = layer_idx
        # Kept outside the Module tree so its parameters appear neither in state_dict nor in parameters().
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_spec", spec)
        object.__setattr__(self, "_call", CallConvention(type(original)))
        heads = spec.hf_cache_heads if spec.hf_cache_heads not in (None, bridge.cfg.n_kv_heads) else None
        object.__setattr__(self, "_mirror", CacheMirror(layer_idx, hand_back_heads=heads))
        # blocks.{i}.hook_attn_out: fired here, after the output projection and before a residual the module
        # adds itself (Bloom), so it is the attention's own output in every family. An attribute read when
        # nothing is hooked, as every Bridge point.
        self.attn_out = HookPoint(ATTN_OUT)
        if spec.returns == "with_dense_bias":
            # GPT-NeoX-Japanese: the last layer's output bias, which the module returns for its block to add
            # (before the block's dropout). The same Parameter, kept in the tree under its own name.
            self.dense_bias = original.dense_bias

    def forward(self, *args, **kwargs):
        a = self._call.arguments(args, kwargs)
        hidden_states = a["hidden_states"]
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            raise TypeError(f"hidden_states: expected a Tensor [B, S, D], got {describe(hidden_states)}")
        if a.get("encoder_hidden_states") is not None:
            raise NotImplementedError("pyqkv Bridge: cross-attention is not supported")
        hf_cache = next((a.get(n) for n in ("past_key_values", "layer_past", "cache") if a.get(n) is not None), None)
        output_attentions = bool(a.get("output_attentions"))
        mask = self._mask(a.get("attention_mask"), hidden_states)
        call = dict(
            attention_mask=mask,
            position_embeddings=self._tables(a.get("position_embeddings")),
            position_ids=a.get("position_ids"),
            alibi=self._alibi(a, hidden_states, hf_cache, output_attentions),
        )
        causal = self._causal(mask)
        if causal is not None:
            call["causal"] = causal
        if self.bridge.cfg.rotary_dim is None:
            call.pop("position_embeddings"), call.pop("position_ids")
        elif call["position_embeddings"] is not None:
            call.pop("position_ids")  # the model's own cos/sin win (SPEC §4)
        recorder = attention_recorder()  # model-level output_attentions (transformers >= 5)
        # The pattern HF returns comes from the Bridge's own return value, never through the public hook
        # points, so a user's hook or conversion rule cannot change what HF sees (beyond the edit it makes).
        weights_wanted = output_attentions or self._spec.weights_always
        call["return_pattern"] = weights_wanted or recorder is not None
        if hf_cache is None or isinstance(hf_cache, KVCache):
            result = self.bridge(hidden_states, kv_cache=hf_cache, **call)
        else:
            result = self._mirror.run(self.bridge, hidden_states, hf_cache, call)
        out, pattern = result if call["return_pattern"] else (result, None)
        out = self.attn_out.fire(out)
        if self._spec.residual_inside:
            out = out + a["residual"]
        if recorder is not None:
            recorder.append(pattern)
        weights = pattern if weights_wanted else None
        if self._spec.returns == "with_dense_bias":
            return out, weights, self.dense_bias
        if self._spec.returns == "list":  # GPT-1: [a] or [a, attentions]
            return [out, weights] if output_attentions else [out]
        return out, weights

    def hand_back_caches(self) -> None:
        """Leave every live Hugging Face cache this layer mirrored in the form the original module expects."""
        self._mirror.hand_back(self.bridge.cfg.n_kv_heads)

    def _tables(self, position_embeddings):
        """The model's position_embeddings as the Bridge takes them: (cos, sin), each [B, S, rotary_dim]."""
        convention = self._spec.position_embeddings
        if position_embeddings is None or convention == "ignore":
            return None
        if convention == "sin_cos_half":  # (sin, cos) [B, S, R/2], one entry per rotated pair
            sin, cos = position_embeddings
            return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        return position_embeddings

    def _mask(self, mask, hidden_states):
        """HF's attention_mask in the Bridge's conventions (bool True = attend; 4-D masks [B, 1 or H, S, K])."""
        if not isinstance(mask, torch.Tensor):
            return mask  # None, or something the Bridge rejects by name
        name = type(self._original).__name__
        if self._spec.bool_mask_masks:  # MPT: masked_fill(mask, min), so True means masked
            if mask.dtype != torch.bool or mask.dim() != 4:
                raise TypeError(
                    f"attention_mask: {name} takes a 4-D bool mask [B, 1, S, K] whose True means masked (as its "
                    f"model builds it), got {mask.dtype} of shape {tuple(mask.shape)}"
                )
            mask = ~mask
        if self._spec.mask_rule == "mask_only" and mask.dim() != 4:
            raise ValueError(
                f"attention_mask: {name} takes its causal mask from a 4-D mask [B, 1, S, K] (as its model builds "
                f"it) or none, got shape {tuple(mask.shape)}"
            )
        S = hidden_states.shape[1]
        if mask.dim() == 4 and mask.shape[2] == 1 and S > 1:
            # A [B, 1, 1, K] key-padding mask (GPT-1's), which HF broadcasts over the query positions.
            mask = mask.expand(mask.shape[0], mask.shape[1], S, mask.shape[3])
        return mask

    def _causal(self, mask) -> Optional[bool]:
        """The Bridge's `causal` for this module: None keeps pyqkv's rule (LayerSpec.mask_rule)."""
        rule = self._spec.mask_rule
        if rule == "and_causal":
            return True  # the module's own causal buffer, on top of whatever mask the model gave
        if rule == "mask_only" and mask is None:
            return False  # no mask, no causality: the module then attends to every key
        return None

    def _past_length(self, hf_cache) -> int:
        """Positions already in the cache this call appends to (0 without one)."""
        if hf_cache is None:
            return 0
        if isinstance(hf_cache, KVCache):
            return hf_cache.length
        cache = getattr(hf_cache, "self_attention_cache", hf_cache)
        return int(cache.get_seq_length(self.layer_idx)) if hasattr(cache, "get_seq_length") else 0

    def _alibi(self, a: dict, hidden_states, hf_cache, output_attentions: bool):
        """The model's ALiBi (`alibi`, or MPT's `position_bias`) as the Bridge adds it to the scaled scores,
        or None."""
        spec = self._spec
        if spec.alibi_scale is None:
            return None
        if spec.alibi_from == "position_bias":
            K = self._past_length(hf_cache) + hidden_states.shape[1]
            return self._position_bias(a.get("position_bias"), K, hidden_states)
        alibi = a.get("alibi")
        if alibi is None:
            return None
        if spec.alibi_in_mask_with_sdpa and not output_attentions and _attn_implementation(self._original) == "sdpa":
            # The model folded alibi into the mask, and the module's SDPA path adds nothing more.
            return alibi.new_zeros(1, 1, alibi.shape[-1])
        return alibi if spec.alibi_scale == 1.0 else alibi * spec.alibi_scale

    def _position_bias(self, bias, K: int, hidden_states):
        """MPT's position_bias [H, 1, L] (arange(1 - L, 1) * slopes over max_seq_len = L positions) as the
        per-key bias [1, H, K] of a call over K keys: HF adds its last K entries to the scaled scores (a
        view, no copy). No position_bias: HF adds nothing."""
        H = self.bridge.cfg.n_heads
        if bias is None:
            return hidden_states.new_zeros(1, 1, K)
        if not isinstance(bias, torch.Tensor) or bias.dim() != 3 or bias.shape[0] not in (1, H) or bias.shape[1] != 1:
            got = f"shape {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"position_bias: expected MPT's ALiBi table [H, 1, L] with H = {H}, got {got}")
        L = bias.shape[2]
        if L < K:
            raise ValueError(
                f"position_bias: the ALiBi table covers L = {L} key positions (config.max_seq_len), this call "
                f"attends over K = {K}"
            )
        return bias[:, 0, L - K :].unsqueeze(0)


class CallConvention:
    """A Hugging Face attention module's forward signature, read once: positional names in order, and
    whether it takes **kwargs. Turns a call's (args, kwargs) into {parameter name: value} with the
    errors Python would give, without inspect's per-call binding."""

    def __init__(self, module_class):
        self.module_name = module_class.__name__
        params = list(inspect.signature(module_class.forward).parameters.values())[1:]  # without self
        P = inspect.Parameter
        self.positional = [p.name for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        self.keyword = {p.name for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
        self.var_keyword = any(p.kind == P.VAR_KEYWORD for p in params)
        self.defaults = {p.name: p.default for p in params if p.default is not P.empty}
        # The hidden states are the first positional argument, whatever the module calls it (GPT-1: `x`).
        names = [p.name for p in params]
        self.hidden = "hidden_states" if "hidden_states" in names or not self.positional else self.positional[0]

    def arguments(self, args, kwargs) -> dict:
        if len(args) > len(self.positional):
            raise TypeError(
                f"{self.module_name} (attached to pyqkv): takes {len(self.positional)} positional arguments, "
                f"got {len(args)}"
            )
        a = dict(self.defaults)
        a.update(zip(self.positional, args))
        for name, value in kwargs.items():
            if name in self.positional[: len(args)]:
                raise TypeError(f"{self.module_name} (attached to pyqkv): got multiple values for argument {name!r}")
            if name not in self.keyword and not self.var_keyword:
                raise TypeError(f"{self.module_name} (attached to pyqkv): got an unexpected keyword argument {name!r}")
            a[name] = value
        if self.hidden not in a:
            raise TypeError(f"{self.module_name} (attached to pyqkv): missing the argument {self.hidden!r}")
        if self.hidden != "hidden_states":
            a["hidden_states"] = a.pop(self.hidden)
        return a


def _attn_implementation(module) -> Optional[str]:
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None)


class AttachedModel(HookedMixin):
    """Model-level hooks over every Bridge of an attached model, named `blocks.{i}.attn.hook_*`, and the
    residual-stream points of its decoder blocks, `blocks.{i}.hook_resid_pre`, `hook_attn_out`,
    `hook_resid_post` (pyqkv.hf.residual).

    Calling it calls the model and returns the model's own output. `run_with_cache(*args, names_filter=...,
    **kwargs)` returns (logits, cache) as TransformerLens's (HookedMixin.run_with_cache: return_type,
    remove_batch_dim, incl_bwd); `run_with_hooks`, `hooks(...)`, `add_hook(...)`, `reset_hooks()` work as on
    a Bridge. After pyqkv.hf.detach(model) the handle raises instead of silently hooking nothing.
    """

    returns_model_output = True

    def __init__(self, model: nn.Module, bridges: list, modules: list = ()):
        # A strong reference: a model built inline (`h = attach(build_model())`) lives as long as its
        # handle. Its attention modules hold the handle too (detach closes it through them): a cycle, which
        # Python's collector frees once neither is reachable; a deepcopy of the model copies both, consistently.
        self.model = model
        self.bridges = bridges  # index i -> Bridge of block i
        self._points = {}
        self._aliases = {}
        self._owner = {}
        self.detached = False
        for i, bridge in enumerate(bridges):
            prefix = f"blocks.{i}.attn."
            bridge.set_hook_prefix(prefix)
            for name, point in bridge.hook_points().items():
                self._points[prefix + name] = point
                self._owner[prefix + name] = (bridge, name)
            for alias, target in bridge.hook_aliases().items():
                self._aliases[prefix + alias] = prefix + target
        # modules: [(path, HFAttention)] in block order, for the residual-stream points.
        residual = ResidualPoints(model, [(i, path) for i, (path, _) in enumerate(modules)], attn_out_from_module=False)
        for i, (_, module) in enumerate(modules):  # fired by the module itself (see HFAttention)
            module.attn_out.name = f"blocks.{i}.{ATTN_OUT}"
            residual.points[module.attn_out.name] = module.attn_out
        self._points.update(sorted(residual.points.items(), key=lambda item: _block_order(item[0])))

    def _compile_target(self) -> nn.Module:
        return self.model

    def hook_points(self) -> dict:
        return self._points

    def _check_attached(self) -> None:
        if self.detached:
            raise RuntimeError(
                f"this AttachedModel's {type(self.model).__name__} was detached (pyqkv.hf.detach(model)): its hook "
                f"points are no longer in the model and no hook would fire; attach again with "
                f"h = pyqkv.hf.attach(model)"
            )

    def _select(self, name_or_filter, *, by_name_strict: bool) -> list:
        # Every way of choosing points (add_hook, hooks(), run_with_cache) passes here: a detached handle
        # raises before anything is registered.
        self._check_attached()
        return super()._select(name_or_filter, by_name_strict=by_name_strict)

    def hook_aliases(self) -> dict:
        return self._aliases

    def hook_gate(self, name: str) -> Optional[str]:
        owner = self._owner.get(name)
        if owner is None:  # a residual-stream point: it always fires
            return None
        bridge, local = owner
        return bridge.hook_gate(local)

    def _close(self) -> None:
        """Called by detach: every hook off (permanent ones too, so no torch hook stays on the model's blocks),
        and the handle refuses further use."""
        for point in self._points.values():
            point.clear("both", including_permanent=True)
            point.ctx.clear()
        self.detached = True

    def __call__(self, *args, **kwargs):
        refuse_model_call_keywords(kwargs, "AttachedModel(...)")
        self._check_attached()
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        state = ", detached" if self.detached else ""
        return f"AttachedModel({type(self.model).__name__}, {len(self.bridges)} bridges{state})"

    def head_output_weights(self, layer: int) -> torch.Tensor:
        """W_O [H, Dh, D] of block `layer` (a view of its Bridge's output weight), for
        ActivationCache.stack_head_results."""
        n = len(self.bridges)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise ValueError(f"layer: expected a block index in [{-n}, {n}), got {layer!r}")
        return self.bridges[layer].W_O


def _block_order(name: str) -> tuple:
    """blocks.{i}.<point>: by block, then in the order of pyqkv.points.BLOCK_POINTS (their firing order)."""
    _, i, local = name.split(".", 2)
    return int(i), [p.name for p in BLOCK_POINTS].index(local)


def attach(model: nn.Module, **flags) -> AttachedModel:
    """Replace, in place, every supported attention module of `model` with a Bridge (behind HF's
    calling convention). Flags (use_split_qkv_input, use_attn_in, use_attn_result) apply to every Bridge.
    Returns the model-level hook handle. Raises TypeError if the model has no supported module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, HFAttention) for m in model.modules()):
        raise ValueError("model: already attached (call pyqkv.hf.detach(model) first)")
    # Cross-attention modules (GPT-2 with add_cross_attention) stay Hugging Face's own.
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if family_of(m) is not None and not getattr(m, "is_cross_attention", False)
    ]
    if not targets:
        found = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
        raise TypeError(
            f"model: no supported attention module found (supported: {', '.join(SUPPORTED)}; found: "
            f"{', '.join(found) or 'none'}){_interface_note(model)}"
        )
    # Every layer's spec first: an unsupported module or configuration raises before the model is touched.
    specs = [(name, m, layer_spec(m)) for name, m in targets]
    built = []
    try:
        for name, m, spec in specs:
            bridge = bridge_from_module(m, spec, **flags)
            built.append((name, m, spec, bridge))
            _release(spec)  # layer by layer, so attaching never holds two copies of every layer at once
    except BaseException:
        for _, _, spec, bridge in built:
            _write_back(bridge, spec)
        raise
    install_hf_recording_hooks(model, [name for name, _ in targets])
    bridges, modules = [], []
    for i, (name, module, spec, bridge) in enumerate(built):
        layer_idx = module.layer_idx if getattr(module, "layer_idx", None) is not None else i
        attached = HFAttention(bridge, module, layer_idx, spec).train(module.training)
        _set_submodule(model, name, attached)
        bridges.append(bridge)
        modules.append((name, attached))
    checkpoint.install(model)  # state_dict / load_state_dict in the original modules' keys
    handle = AttachedModel(model, bridges, modules)
    for _, attached in modules:  # detach() reaches the handle through its modules, to close it
        object.__setattr__(attached, "_handle", handle)
    return handle


def _interface_note(model: nn.Module) -> str:
    """For attach's TypeError: the tier that does work when the model's attention goes through Hugging Face's
    attention interface (BERT, Mixtral, ...), else nothing."""
    from pyqkv.hf.interface import routes_through_interface

    routed = sorted({type(m).__name__ for m in model.modules() if routes_through_interface(m)})
    if not routed:
        return ""
    return (
        f". Its attention ({', '.join(routed)}) goes through Hugging Face's attention interface: "
        f"h = pyqkv.hf.enable(model) gives it pyqkv's attention with the hook points that tier sees (hook_rot_q, "
        f"hook_rot_k, hook_v, hook_attn_scores, hook_pattern, hook_z and the residual stream)"
    )


def detach(model: nn.Module) -> None:
    """Restore the original attention modules, carrying over the Bridges' current weights. The handle that
    attach returned is closed: its hooks are removed and it raises on further use."""
    checkpoint.uninstall(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, HFAttention):
            handle = getattr(module, "_handle", None)
            if handle is not None and not handle.detached:
                handle._close()
            original, spec = module._original, module._spec
            # The model may have been moved, cast, or switched between train() and eval() while attached:
            # the weights come back from the Bridge, and the rest of the original (outside the Module tree,
            # so left behind) follows them.
            _write_back(module.bridge, spec)
            if spec.returns == "with_dense_bias" and original.dense_bias is not module.dense_bias:
                original.dense_bias = module.dense_bias  # replaced while attached
            weight = module.bridge.qkv_weight
            if weight is not None:
                original.to(device=weight.device, dtype=weight.dtype)
            original.train(module.training)
            module.hand_back_caches()
            _set_submodule(model, name, original)


def _set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
