"""Hooks for every Hugging Face model whose attention goes through transformers' AttentionInterface.

The second, lighter tier beside `pyqkv.hf.attach` (which replaces each supported fused-QKV module by a
Bridge). Here Hugging Face keeps its own projections, qk-norms, RoPE variants, clip_qkv and KV cache; only
the attention itself, from post-RoPE Q and the cached K/V to z, runs on `pyqkv.ops.attention`, under the
implementation name "pyqkv":

    pyqkv.hf.register()                                 # idempotent; `import pyqkv.hf` does it
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="pyqkv")
    # or: model.set_attn_implementation("pyqkv"), or pyqkv.hf.enable(model)
    h = pyqkv.hf.hooks_for(model)
    logits, cache = h.run_with_cache(input_ids, names_filter=["blocks.0.attn.hook_pattern"])
    with h.hooks(fwd_hooks=[("blocks.3.attn.hook_z", ablate_head_5)]):
        model.generate(input_ids, max_new_tokens=8)

Hook points per layer (`blocks.{i}.attn.` + name; B batch, S query positions in this call, K key positions
attention reads in this call, H query heads, Hkv key/value heads, Dh head dim):

| name | shape | what it is here |
|---|---|---|
| hook_v | [B, K, Hkv, Dh] | every value attention reads in this call (past + new) |
| hook_rot_q | [B, S, H, Dh] | Q exactly as attention consumes it: after the projection, any qk-norm, clip_qkv and RoPE (on a family without RoPE this is the projected Q) |
| hook_rot_k | [B, K, Hkv, Dh] | every key attention reads in this call: the cache's past keys and the new ones, after RoPE (not repeated for GQA) |
| hook_attn_scores | [B, H, S, K] | scaled, masked scores before softmax; hidden entries hold the dtype's most negative value |
| hook_pattern | [B, H, S, K] | softmax (after attention dropout in train mode); rows sum to 1, fully masked rows are 0 |
| hook_z | [B, S, H, Dh] | per-head output, the input of the output projection (alias `o.hook_in`) |

K is the number of keys Hugging Face hands to attention after `cache.update`: with a DynamicCache past +
S, with a sliding-window layer what the layer returns (the window and the new keys), with a StaticCache the
whole preallocated buffer (zeros past the current length; the mask hides them), and S on an empty
StaticCache prefill without a mask (see _attend). Which of the K keys are new is not knowable in general
(a StaticCache writes them at cache_position, not at the end), so hook_rot_k / hook_v show all K and a
hook receives its own copy: an edit there changes this call's attention only and never the stored cache
(the next step reads the cache as Hugging Face wrote it).

Not available in this tier (asking for them by name raises ValueError naming `pyqkv.hf.attach`):
pre-RoPE hook_q / hook_k and hook_q_normed / hook_k_normed (the interface never sees them), hook_in,
hook_attn_in, the split-input points, hook_result and hook_out (the output projection runs after the
interface returns). The reasons are pyqkv/points.py's (PointSpec.interface).

The decoder block of each `blocks.{i}.attn` layer also has `blocks.{i}.hook_resid_pre`, `hook_attn_out` and
`hook_resid_post` [B, S, D] (pyqkv.hf.residual), as with attach.

Layer identity: `blocks.{i}.attn.hook_*` with i the module's `layer_idx` (the decoder layer number, also in
hybrid models whose attention sits in some layers only), when no other module shares it; when no module
has a layer_idx, i counts the attention modules in `model.named_modules()` order. Modules that have none or
share one (a vision or audio tower, cross-attention) are named by their module path instead, e.g.
`model.vision_tower.encoder.layers.0.self_attn.hook_pattern`. `h.layers` lists (prefix, module path).
"""

from __future__ import annotations

import inspect
import types
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyqkv import ops
from pyqkv.attend import attend
from pyqkv.conversions import Copy
from pyqkv.hf.recording import attention_recorder
from pyqkv.hf.residual import ResidualPoints
from pyqkv.hooks import HookedMixin, HookPoint, refuse_model_call_keywords
from pyqkv.points import BY_NAME, HOOK_ALIASES, SEEN
from pyqkv.points import POINTS as POINT_SPECS

IMPLEMENTATION = "pyqkv"

# The points this tier can honour, in firing order, and the reason for each it cannot: both read from the
# one table, pyqkv/points.py (PointSpec.interface).
POINTS = tuple(p.name for p in POINT_SPECS if p.interface == SEEN)
_NOT_VISIBLE = {p.name: p.interface for p in POINT_SPECS if p.interface != SEEN}
ALIASES = HOOK_ALIASES

# Keyword arguments Hugging Face passes that do not change attention's result here, and why.
_HARMLESS_KWARGS = {
    "sliding_window",  # already inside the mask HF builds under our name (sdpa_mask's sliding overlay)
    "position_ids",  # positions are already in Q/K (RoPE) and packed sequences in the mask
    "cache_position",
    "use_cache",
    "output_hidden_states",
    "return_dict",
    "past_key_values",
    "past_key_value",
    "deterministic",  # a flash-attention switch; pyqkv's kernels are deterministic
    "output_router_logits",  # MoE outputs to return: the attention math does not read it
    "logits_to_keep",
    "num_items_in_batch",  # loss normalisation
    "seq_idx",  # Mamba layers' packed-sequence index; attention's packing is in the mask (position_ids)
}
# Keyword arguments that change the math and that pyqkv cannot honour (yet): rejected when not None.
_UNSUPPORTED_KWARGS = {
    "s_aux": "attention sinks (gpt-oss style s_aux) are not supported by pyqkv.ops.attention",
    "sinks": "attention sinks are not supported by pyqkv.ops.attention",
    "cu_seq_lens_q": "packed sequences given as cu_seq_lens_* are not supported; pass position_ids only "
    "(the mask HF builds under 'pyqkv' then separates the packed sequences)",
    "cu_seq_lens_k": "packed sequences given as cu_seq_lens_* are not supported; pass position_ids only",
    "max_length_q": "packed sequences (max_length_*) are not supported; pass position_ids only",
    "max_length_k": "packed sequences (max_length_*) are not supported; pass position_ids only",
    "indices": "sparse attention over selected key indices is not supported",
    "block_indices": "block-sparse attention is not supported",
    "head_mask": "head_mask is not supported; zero a head at hook_z instead",
}


def register() -> None:
    """Register pyqkv under the name "pyqkv" in transformers' AttentionInterface and AttentionMaskInterface.

    Idempotent. The mask registration is what makes Hugging Face build a mask at all: for a name missing
    from the mask registry its mask preprocessing exits early and every layer receives attention_mask=None,
    padding included."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, mask_function)


def mask_function(*args, **kwargs):
    """The mask Hugging Face builds for "pyqkv": exactly sdpa's (`transformers.masking_utils.sdpa_mask`), a
    bool [B, 1, S, K] (True = attend) with causality, padding, sliding window and packed sequences in it, or
    None when the mask would be purely causal (or, for bidirectional layers, all visible): attention_forward
    then follows sdpa's rule for None, so the fused causal path needs no [B, 1, S, K] tensor."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# The attention function


def attention_forward(
    module: nn.Module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    softcap=None,
    position_bias=None,
    output_attentions: bool = False,
    **kwargs,
):
    """What every interface-routed Hugging Face attention module calls under attn_implementation="pyqkv".

    query: [B, H, S, Dh] (after projection, qk-norm, RoPE); key, value: [B, Hkv, K, Dh] after cache.update,
    GQA not repeated; attention_mask: what mask_function built (bool [B, 1, S, K], True = attend, or None),
    or a float additive [B|1, 1|H, S, K] mask a caller passed. scaling: None means Dh^-0.5. dropout: the
    attention-dropout probability, applied to the pattern when module.training (as eager does).
    position_bias: an additive [B|1, H, S, K] bias (T5-style), folded into the mask as sdpa does.

    Returns (attn_output [B, S, H, Dh], attn_weights [B, H, S, K] or None): the pattern is returned only
    when Hugging Face records attentions (output_attentions), as eager does.
    """
    _check_kwargs(module, kwargs)
    layer = module.__dict__.get(LAYER_ATTR)
    if layer is not None:
        layer.owner._called = True
    return _attend(
        module,
        layer,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        softcap=softcap,
        position_bias=position_bias,
        want_pattern=bool(output_attentions) or attention_recorder() is not None,
    )


def _check_kwargs(module, kwargs) -> None:
    for name, value in kwargs.items():
        if value is None or name in _HARMLESS_KWARGS:
            continue
        if name in _UNSUPPORTED_KWARGS:
            raise NotImplementedError(f"{name}: {type(module).__name__} passes {name}, but {_UNSUPPORTED_KWARGS[name]}")
        raise NotImplementedError(
            f"{name}: {type(module).__name__} passes the keyword argument {name}={_describe(value)}, which pyqkv's "
            "attention does not know, so it cannot tell whether it changes the result; known: dropout, scaling, "
            f"is_causal, softcap, position_bias, output_attentions, {', '.join(sorted(_HARMLESS_KWARGS))}"
        )


def _attend(
    module, layer, query, key, value, mask, *, dropout, scaling, is_causal, softcap, position_bias, want_pattern
):
    B, H, S, Dh = query.shape
    K = key.shape[2]
    scale = Dh**-0.5 if scaling is None else float(scaling)
    # sdpa's rule for what a mask of None means (transformers/integrations/sdpa_attention.py), since the
    # mask comes from sdpa's mask function: causal only when several queries and the module is causal.
    causal = S > 1 and mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if causal and K > S:
        # Only an empty StaticCache prefill should get here (sdpa_mask returns None with K > S only when the
        # cache held nothing before this call): HF means causal over the first S keys, top-left, and the rest
        # of the buffer is unwritten. pyqkv's causal is bottom-right, so drop the unwritten slots instead,
        # after checking that they are that (anything else would lose keys silently).
        _check_unwritten_tail(module, key, value, S)
        key, value = key[:, :, :S], value[:, :, :S]
        position_bias = None if position_bias is None else position_bias[..., :S]
        K = S
    mask = _op_mask(mask, K, query.dtype)
    if position_bias is not None:
        mask = _fold_position_bias(position_bias, mask, causal, S, K, query.dtype)
        causal = False
    p = float(dropout) if module.training and dropout else 0.0

    q4 = query.transpose(1, 2)  # [B, S, H, Dh], a view: the op reads any strides
    k4, v4 = key.transpose(1, 2), value.transpose(1, 2)  # [B, K, Hkv, Dh]
    points = _NO_POINTS if layer is None else layer.points
    # In the table's order (pyqkv/points.py: hook_v comes before the rotated points there), as POINTS lists them.
    v4 = points["hook_v"].fire(v4)  # (a Copy rule: see _Layer)
    q4 = points["hook_rot_q"].fire(q4)
    k4 = points["hook_rot_k"].fire(k4)
    z, pattern = attend(
        q4,
        k4,
        v4,
        scale=scale,
        causal=causal,
        mask=mask,
        softcap=None if softcap is None else float(softcap),
        dropout_p=p,
        want_pattern=want_pattern,
        scores_point=points["hook_attn_scores"],
        pattern_point=points["hook_pattern"],
        fused=_fused,
    )
    z = points["hook_z"].fire(z)
    # Modules reshape the output with .view(B, S, H * Dh) (sdpa returns it contiguous): a hook's replacement
    # may not be.
    return z.contiguous(), (pattern if want_pattern else None)


def _check_unwritten_tail(module, key, value, S: int) -> None:
    """Raise ValueError unless keys and values past the first S of [B, Hkv, K, Dh] are all zero: the unwritten
    part of a static buffer (StaticCache allocates it with torch.zeros, and its reset() zeroes it), which is
    what an empty StaticCache prefill without a mask hands over. The attention function does not receive the
    cache itself, so the buffer's contents are the evidence. Reads the tail once (a device sync on CUDA), on
    the prefill only: decode steps carry a mask or S = 1."""
    K = key.shape[2]
    written = key[:, :, S:].ne(0).any() | value[:, :, S:].ne(0).any()
    message = (
        f"key, value: {type(module).__name__} passed attention_mask None with S={S} queries and K={K} keys "
        f"(K > S), which pyqkv reads only as an empty StaticCache prefill: expected keys and values past the "
        f"first {S} to be the unwritten (all-zero) part of the static buffer, got nonzero ones there. Pass an "
        f"explicit attention mask (or a cache that returns only the written keys)."
    )
    if torch.compiler.is_compiling():
        # A compiled graph cannot branch on data: the same check as an assertion op in the graph (it raises
        # RuntimeError with this message when the graph runs).
        torch._assert_async(~written, message)
    elif bool(written):
        raise ValueError(message)


def _fused(q4, k4, v4, *, scale, causal, mask, return_pattern=False, alibi=None, softcap=None, window=None):
    """ops.attention, also for a value head dim Dv other than Q/K's Dqk (multi-head latent attention:
    DeepSeek V2/V3, Kimi...). The op wants one head dim: zero features appended to V (or to Q and K) leave
    P·V (and Q·K) unchanged, and z is cut back to [B, S, H, Dv]. This costs one padded copy."""
    Dqk, Dv = q4.shape[-1], v4.shape[-1]
    if Dv < Dqk:
        v4 = F.pad(v4, (0, Dqk - Dv))
    elif Dv > Dqk:
        q4, k4 = F.pad(q4, (0, Dv - Dqk)), F.pad(k4, (0, Dv - Dqk))
    z, lse, pattern = ops.attention(
        q4,
        k4,
        v4,
        scale=scale,
        causal=causal,
        mask=mask,
        return_pattern=return_pattern,
        alibi=alibi,
        softcap=softcap,
        window=window,
    )
    return (z[..., :Dv] if Dv != z.shape[-1] else z), lse, pattern


def _op_mask(mask, K: int, dtype: torch.dtype):
    """HF's mask as pyqkv.ops.attention takes it: None, a bool [B|1, 1|H, S, K] (True = attend, read natively by
    the op) or an additive float one."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(
            f"attention_mask: expected None or a 4-D mask [B, 1, S, K] (bool, True = attend; or additive float), "
            f"got {_describe(mask)}"
        )
    if mask.shape[-1] > K:
        mask = mask[..., :K]  # a mask built for a longer buffer than the keys handed over (eager slices too)
    return mask


def _fold_position_bias(bias, mask, causal: bool, S: int, K: int, dtype):
    """An additive position bias [B|1, H, S, K] merged with the mask into one additive mask, as sdpa's
    create_position_bias_mask does (causal from the module when there is no mask: the K keys are the S
    queries' own here, so top-left and bottom-right agree)."""
    bias = bias.to(dtype)
    if mask is not None and mask.dtype == torch.bool:
        return bias.masked_fill(~mask, torch.finfo(dtype).min)
    if mask is not None:
        return bias + mask
    if causal:
        i = torch.arange(S, device=bias.device).view(S, 1)
        j = torch.arange(K, device=bias.device).view(1, K)
        return bias.masked_fill(j > i + (K - S), torch.finfo(dtype).min)
    return bias


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor {list(obj.shape)} {obj.dtype}"
    return f"{type(obj).__name__} {obj!r}"[:120]


# --------------------------------------------------------------------------------------------------
# Model-level hooks


class _Layer:
    """The hook points of one attention module of a hooked model."""

    __slots__ = ("owner", "prefix", "path", "points")

    # It hangs on a module of the user's model: a copy or a pickle of that model carries no hooks (and no
    # reference to the InterfaceHooks object, whose weak reference to the model cannot be pickled).
    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_restored_as_none, ())

    def __init__(self, owner: "InterfaceHooks", prefix: str, path: str, module: Optional[nn.Module] = None):
        self.owner = owner
        self.prefix = prefix
        self.path = path
        self.points = _layer_points(prefix + ".", *_head_counts(module))


def _head_counts(module) -> tuple:
    """(H, Hkv) of an attention module from its config, or (None, None) when it does not say."""
    config = getattr(module, "config", None)
    H = getattr(config, "num_attention_heads", None)
    Hkv = getattr(config, "num_key_value_heads", None) or H
    ok = all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (H, Hkv))
    return (H, Hkv) if ok else (None, None)


def _layer_points(prefix: str, H: Optional[int] = None, Hkv: Optional[int] = None) -> dict:
    """One layer's hook points. K and V here are the cache's own storage (DynamicCache returns it, a
    StaticCache buffer is written in place later): their hooks get a copy (the Copy rule), so an edit stays
    in this call and the cached activation stays as Hugging Face wrote it. With the head counts known, each
    point with a head axis says which heads it holds (all of them: pyqkv.zero_heads works here too)."""
    copied = ("hook_rot_k", "hook_v")
    points = {}
    for name in POINTS + tuple(_NOT_VISIBLE):
        point = points[name] = HookPoint(prefix + name, rule=Copy() if name in copied else None)
        if H is not None:
            point.hold_heads(BY_NAME[name].head_axis, range(H), range(Hkv), H, Hkv)
    return points


# The points of a module outside any InterfaceHooks: never hooked, so firing them returns the tensor.
_NO_POINTS = _layer_points("")


def _restored_as_none():
    return None


# The attribute of a hooked attention module that holds its _Layer. On the module, not in a global table:
# under torch.compile the lookup is then an attribute read Dynamo guards once, where a table keyed by
# module would be guarded by its contents, which change whenever any other model is hooked or freed.
LAYER_ATTR = "_pyqkv_layer"
# The attribute of a hooked model that holds its InterfaceHooks, so hooks_for(model) twice gives the same
# points. The handle holds the model in turn: `h = pyqkv.hf.enable(build_model())` keeps the model alive
# as long as h (a cycle the garbage collector frees once neither is referenced).
HOOKS_ATTR = "_pyqkv_interface_hooks"


class InterfaceHooks(HookedMixin):
    """Model-level hooks over every attention module that runs pyqkv's attention, named `blocks.{i}.attn.*`.

    The API of `pyqkv.hf.attach`'s AttachedModel: calling it calls the model and returns the model's own
    output; `run_with_cache(*args, names_filter=..., **kwargs)` returns (logits, cache) as TransformerLens's
    (HookedMixin.run_with_cache); `run_with_hooks`, `hooks(...)`, `add_hook(...)`, `reset_hooks()`. The decoder
    blocks of the `blocks.{i}.attn` layers also have `blocks.{i}.hook_resid_pre`, `hook_attn_out` and
    `hook_resid_post` (pyqkv.hf.residual). `layers`: [(hook name prefix, module path)], e.g. ("blocks.0.attn",
    "model.layers.0.self_attn").
    """

    returns_model_output = True

    def __init__(self, model: nn.Module, targets: list, attach_families: str):
        self._model = model
        self._attach_note = attach_families
        self._called = False  # set by attention_forward: some layer ran pyqkv during this call
        self._layers = []
        self._points = {}
        self._aliases = {}
        self._gated = {}
        for prefix, path, module in targets:
            layer = _Layer(self, prefix, path, module)
            self._layers.append(layer)
            prefix = prefix + "."
            for name, point in layer.points.items():
                self._points[prefix + name] = point
                if name in _NOT_VISIBLE:
                    self._gated[prefix + name] = name
            for alias, target in ALIASES.items():
                self._aliases[prefix + alias] = prefix + target
        for (_, _, module), layer in zip(targets, self._layers):
            module.__dict__[LAYER_ATTR] = layer
        numbered = [(int(prefix.split(".")[1]), path) for prefix, path, _ in targets if prefix.startswith("blocks.")]
        self._points.update(ResidualPoints(model, numbered).points)

    @property
    def model(self) -> nn.Module:
        return self._model

    # It hangs on the user's model: a copy or a pickle of that model carries no hooks (hooks_for(copy) makes
    # the copy's own).
    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_restored_as_none, ())

    @property
    def layers(self) -> list:
        return [(layer.prefix, layer.path) for layer in self._layers]

    def _compile_target(self) -> nn.Module:
        return self.model

    def hook_points(self) -> dict:
        return self._points

    def hook_aliases(self) -> dict:
        return self._aliases

    def hook_gate(self, name: str) -> Optional[str]:
        local = self._gated.get(name)
        if local is None:
            return None
        return f"not available with attn_implementation='pyqkv': {_NOT_VISIBLE[local]}; {self._attach_note}"

    def suggested_names(self) -> list:
        """An unknown name's KeyError lists only what this tier fires (not the points it refuses)."""
        seen = [n for n in self._points if n not in self._gated]
        return seen + [a for a, target in self._aliases.items() if target not in self._gated]

    def __call__(self, *args, **kwargs):
        refuse_model_call_keywords(kwargs, "InterfaceHooks(...)")
        # A flag reset before each call, not a counter: under torch.compile a counter's value is guarded
        # on and would change on every call (a recompile each time); the flag is False at every entry.
        self._called = False
        out = self.model(*args, **kwargs)
        if not self._called and self._layers:
            impl = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
            raise RuntimeError(
                f"no attention layer of {type(self.model).__name__} called pyqkv's attention during this call "
                f"(config._attn_implementation is {impl!r}), so no hook could fire; set it back with "
                "model.set_attn_implementation('pyqkv')"
            )
        return out

    def __repr__(self) -> str:
        return f"InterfaceHooks({type(self.model).__name__}, {len(self._layers)} layers)"

    def head_output_weights(self, layer: int):
        """NotImplementedError: this tier runs only the attention core (q, k, v -> z); the output projection
        W_O stays inside Hugging Face's module, so per-head outputs (ActivationCache.stack_head_results)
        need pyqkv.hf.attach."""
        raise NotImplementedError(
            f"head_output_weights({layer!r}): the attn_implementation='pyqkv' tier does not hold the attention "
            f"output projection (W_O [H, Dh, D]), so per-head outputs (ActivationCache.stack_head_results, "
            f"compute_head_results) cannot be computed here; use pyqkv.hf.attach(model). {self._attach_note}"
        )


def routes_through_interface(module: nn.Module) -> bool:
    """Whether the module's own code calls Hugging Face's AttentionInterface (reads the global
    ALL_ATTENTION_FUNCTIONS in a method of its class or a base below nn.Module). Read from the compiled code,
    not the source: Falcon, GPT-Neo, Bloom, MPT, GPT-1, ImageGPT, Bark and GPT-NeoX-Japanese accept
    attn_implementation="pyqkv" in their config but never call it, and are found out here."""
    return _class_routes(type(module))


_ROUTES_CACHE: "weakref.WeakKeyDictionary[type, bool]" = weakref.WeakKeyDictionary()


def _class_routes(cls: type) -> bool:
    cached = _ROUTES_CACHE.get(cls)
    if cached is None:
        cached = False
        # A PreTrainedModel's own methods read the registry (to validate an implementation name) without
        # being an attention layer.
        if any(k.__name__ == "PreTrainedModel" for k in cls.__mro__):
            _ROUTES_CACHE[cls] = False
            return False
        for klass in cls.__mro__:
            if klass in (nn.Module, object):
                break
            if any(
                _code_reads(getattr(_unwrap(f), "__code__", None), "ALL_ATTENTION_FUNCTIONS")
                for f in vars(klass).values()
            ):
                cached = True
                break
        _ROUTES_CACHE[cls] = cached
    return cached


def _unwrap(f):
    """The function under decorators (transformers wraps forward in deprecate_kwarg and similar)."""
    try:
        return inspect.unwrap(f) if callable(f) else f
    except ValueError:  # a __wrapped__ cycle
        return f


def _code_reads(code, name: str) -> bool:
    if not isinstance(code, types.CodeType):
        return False
    if name in code.co_names:
        return True
    return any(_code_reads(c, name) for c in code.co_consts if isinstance(c, types.CodeType))


def _attach_note(model: nn.Module) -> str:
    """Where the full hook set is: pyqkv.hf.attach, when it supports this model's attention classes."""
    import pyqkv.hf as hf

    supported = tuple(getattr(hf, "SUPPORTED", ()))
    found = sorted({type(m).__name__ for m in model.modules() if any(c.__name__ in supported for c in type(m).__mro__)})
    if found:
        return f"pyqkv.hf.attach(model) gives every hook point for this model ({', '.join(found)})"
    mine = sorted({type(m).__name__ for m in model.modules() if routes_through_interface(m)})
    return (
        f"pyqkv.hf.attach(model), the tier with every hook point, does not support "
        f"{', '.join(mine) or type(model).__name__} (it supports {', '.join(supported)})"
    )


def _implementation_of(module: nn.Module, model: nn.Module):
    config = getattr(module, "config", None)
    if config is None:
        config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def _is_cross_attention(path: str, module: nn.Module) -> bool:
    if getattr(module, "is_cross_attention", False):
        return True
    last = path.rsplit(".", 1)[-1]
    return "cross" in last or last in ("encoder_attn", "src_attn", "encoder_decoder_attention")


def _hook_prefixes(modules: list) -> list:
    """The name prefix of each (path, module)'s hook points.

    `blocks.{layer_idx}.attn` for a self-attention module whose layer_idx (the decoder layer it sits in,
    also in hybrid models with attention in some layers only) no other module shares; when no module has
    a layer_idx, `blocks.{i}.attn` in the model's module order. Anything else, such as a vision or audio
    encoder's layers (no layer_idx) or cross-attention (the layer_idx of its self-attention), is named by
    its module path, e.g. `model.decoder.layers.0.encoder_attn`."""

    def idx(path, m):
        i = getattr(m, "layer_idx", None)
        ok = isinstance(i, int) and not isinstance(i, bool) and not _is_cross_attention(path, m)
        return i if ok else None

    ids = [idx(path, m) for path, m in modules]
    if all(i is None for i in ids):
        selfs = iter(range(len(modules)))
        return [path if _is_cross_attention(path, m) else f"blocks.{next(selfs)}.attn" for path, m in modules]
    counts = {i: ids.count(i) for i in ids}
    return [f"blocks.{i}.attn" if i is not None and counts[i] == 1 else path for i, (path, _) in zip(ids, modules)]


def _refuse_attached(model: nn.Module) -> None:
    """ValueError when pyqkv.hf.attach replaced the model's attention: the two tiers do not stack."""
    from pyqkv.hf.attached import HFAttention

    attached = [path for path, m in model.named_modules() if isinstance(m, HFAttention)]
    if attached:
        raise ValueError(
            f"model: already attached with pyqkv.hf.attach ({len(attached)} attention modules are Bridges, e.g. "
            f"{attached[0]}), which has every hook point of this tier and more; use the handle attach returned, "
            f"or call pyqkv.hf.detach(model) first to use attn_implementation='pyqkv' instead"
        )


def hooks_for(model: nn.Module) -> InterfaceHooks:
    """The model-level hooks of a model that runs attn_implementation="pyqkv" (see the module docstring for
    the hook points and their shapes). Calling it twice on one model gives the same object.

    Raises TypeError when no module of the model calls Hugging Face's AttentionInterface (naming
    pyqkv.hf.attach where it supports the model), ValueError when the model does not run "pyqkv"."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    existing = model.__dict__.get(HOOKS_ATTR)
    if existing is not None:
        return existing
    _refuse_attached(model)
    routed = [(path, m) for path, m in model.named_modules() if routes_through_interface(m)]
    if not routed:
        found = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
        raise TypeError(
            f"model: no module of {type(model).__name__} calls Hugging Face's AttentionInterface (attention "
            f"classes found: {', '.join(found) or 'none'}), so attn_implementation='pyqkv' would change nothing; "
            f"{_attach_note(model)}"
        )
    ours = [(path, m) for path, m in routed if _implementation_of(m, model) == IMPLEMENTATION]
    if not ours:
        impls = sorted({str(_implementation_of(m, model)) for _, m in routed})
        raise ValueError(
            f"model: its attention runs attn_implementation={', '.join(impls)}, expected 'pyqkv'; build it with "
            "from_config(cfg, attn_implementation='pyqkv') / from_pretrained(..., attn_implementation='pyqkv'), "
            "or call model.set_attn_implementation('pyqkv') or pyqkv.hf.enable(model)"
        )
    taken = [m.__dict__[LAYER_ATTR] for _, m in ours if m.__dict__.get(LAYER_ATTR) is not None]
    if taken:
        raise ValueError(
            f"model: its attention modules are already hooked through hooks_for() of another model object "
            f"({type(taken[0].owner.model).__name__}); use that one"
        )
    targets = [(prefix, path, m) for (path, m), prefix in zip(ours, _hook_prefixes(ours))]
    hooks = InterfaceHooks(model, targets, _attach_note(model))
    model.__dict__[HOOKS_ATTR] = hooks
    return hooks


def enable(model: nn.Module) -> InterfaceHooks:
    """register(), switch `model` to attn_implementation="pyqkv" and return hooks_for(model).

    Checks first that some module of the model calls the AttentionInterface (TypeError otherwise: for
    Falcon, GPT-Neo, Bloom, MPT... setting the implementation would be a silent no-op) and leaves the model
    untouched when it raises."""
    if not isinstance(model, nn.Module) or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model: expected a Hugging Face PreTrainedModel, got {type(model).__name__}")
    _refuse_attached(model)
    register()
    if not any(routes_through_interface(m) for m in model.modules()):
        hooks_for(model)  # raises the TypeError that explains it
    before = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        return hooks_for(model)
    except Exception:
        model.set_attn_implementation(before)
        raise
