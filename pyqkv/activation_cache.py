"""ActivationCache: what `run_with_cache` returns, with the TransformerLens API researchers use on attention.

A dict of hook name -> detached hook-format tensor (SPEC §2), plus, as TransformerLens's ActivationCache:

    cache["pattern", 0]            # = cache["blocks.0.attn.hook_pattern"]   [B, H, S, K]
    cache["z", -1]                 # the last layer's hook_z                 [B, S, H, Dh]
    cache.stack_activation("pattern")                          # [n_layers, B, H, S, K]
    heads, labels = cache.stack_head_results(return_labels=True)  # [n_layers*H, B, S, D], "L0H0", ...
    cache.remove_batch_dim(); cache.to("cpu")

Notation: B batch, S positions in the call, K key positions (cache included), H query heads, Hkv key/value
heads, Dh head dim, D model dim, L layers.

The cache keeps the hook handle that made it (`cache.model`: an AttachedModel, InterfaceHooks or a lone
Bridge). Methods that need weights get them from it (the output projection W_O through
`model.head_output_weights(layer)`); set `cache.model = None` to let the model go. pyqkv wraps attention
only, so TransformerLens's methods that need the embeddings, the MLPs, the LayerNorms or the unembedding
exist here and raise NotImplementedError naming what is missing.
"""

from __future__ import annotations

import operator
import re
import warnings
from typing import Optional

import torch

from pyqkv.utils import get_act_name

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# TransformerLens's name of an attention layer's output, and pyqkv's name of the same tensor.
_TL_ATTN_OUT = re.compile(r"^(blocks\.\d+\.)?hook_attn_out$")
# A point of the attention inside block 0 (or with no block), as a lone Bridge names it: "hook_<x>".
_LONE_POINT = re.compile(r"^(?:blocks\.0\.)?attn\.(hook_\w+)$")

_ATTENTION_ONLY = (
    "pyqkv hooks attention (blocks.{l}.attn.hook_*) and the residual stream at the block boundaries "
    "(blocks.{l}.hook_resid_pre, hook_attn_out, hook_resid_post) only"
)
# How to do by hand what apply_ln_to_stack / stack_head_results(apply_ln=True) do in TransformerLens for the
# final norm (tests/test_tl_analysis.py checks this recipe against TransformerLens's apply_ln_to_stack). The
# scale is that of the whole residual stream entering the norm: running the norm module on the stack instead
# would normalize each component by its own statistics and add the norm's bias to each.
_FINAL_LN_BY_HAND = (
    "scale the stack by hand as TransformerLens does: from x = cache['resid_post', -1] (the residual stream "
    "entering the final norm, sliced at the stack's positions), scale = sqrt(var + eps) for a LayerNorm "
    "(x.var(-1, unbiased=False, keepdim=True)) or sqrt(mean(x**2) + eps) for an RMSNorm; then "
    "(stack - stack.mean(-1, keepdim=True)) / scale for a LayerNorm, stack / scale for an RMSNorm. Hugging "
    "Face's weights are not folded: multiply the norm's weight into the unembedding direction. (For block "
    "l's input norm, use cache['resid_pre', l] and that norm.)"
)


class ActivationCache(dict):
    """Hook name -> detached hook-format tensor, as `run_with_cache` returns it, with TransformerLens's
    ActivationCache API for attention.

    data: the initial {name: tensor}. model: the hook handle the activations came from (AttachedModel,
    InterfaceHooks or Bridge), or None; methods that need weights or the number of layers use it.
    has_batch_dim: False once remove_batch_dim() has run.

    Keys: a full name (`cache["blocks.0.attn.hook_z"]`) as in any dict, or TransformerLens's short forms
    `cache[name]`, `cache[name, layer]`, `cache[name, layer, layer_type]` (see pyqkv.utils.get_act_name), with
    negative layers counting from the end. A missing key raises KeyError naming the full name and listing what
    is cached. TransformerLens's `cache["attn_out", l]` reads pyqkv's `blocks.{l}.attn.hook_out` (the same
    tensor) when the cache has no `blocks.{l}.hook_attn_out`; a lone Bridge's cache (names without the
    "blocks.{l}.attn." prefix) answers short keys for layer 0.
    """

    def __init__(self, data=None, model=None, has_batch_dim: bool = True):
        super().__init__(data if data is not None else {})
        self.model = model
        self.has_batch_dim = has_batch_dim

    def __reduce__(self):
        """Pickling (torch.save, multiprocessing) keeps the tensors and has_batch_dim, not the model: a saved
        cache is data, and the hook handle (with the whole model, or a weak reference) is not picklable data.
        Reattach one with `cache.model = h` after loading."""
        return (type(self), (dict(self), None, self.has_batch_dim))

    def __copy__(self) -> "ActivationCache":
        return type(self)(dict(self), model=self.model, has_batch_dim=self.has_batch_dim)

    # --- names and layers -------------------------------------------------------------------------------
    def _names(self):
        """The hook names that decide the layer structure: the model's points, else the cached names."""
        return self.model.hook_points() if self.model is not None else self.keys()

    @property
    def n_layers(self) -> int:
        """The number of blocks: 1 + the largest l of a `blocks.{l}.` name of the model's hook points (of the
        cached names when the cache has no model); 1 for a lone Bridge."""
        layers = [int(m.group(1)) for m in map(_BLOCK.match, self._names()) if m]
        return max(layers) + 1 if layers else 1

    def _is_lone_layer(self) -> bool:
        """Whether the names are a lone Bridge's ("hook_z"), with no "blocks.{l}." prefix."""
        return not any(_BLOCK.match(n) for n in self._names())

    def _point_name(self, layer: int, point: str) -> str:
        """The cache key of an attention point ("hook_z") of a layer, in this cache's namespace."""
        if self._is_lone_layer():
            if layer != 0:
                raise KeyError(f"layer: a lone Bridge's cache has one layer (0), got layer {layer}")
            return point
        return f"blocks.{layer}.attn.{point}"

    def _layer_index(self, layer, what: str) -> int:
        """A layer index in [0, n_layers), negative ones counting from the end (KeyError out of range)."""
        if isinstance(layer, bool):
            raise TypeError(f"{what}: expected a layer index (an int), got bool")
        try:
            index = operator.index(layer)
        except TypeError:
            raise TypeError(f"{what}: expected a layer index (an int), got {type(layer).__name__}") from None
        n = self.n_layers
        if not -n <= index < n:
            raise KeyError(f"{what}: layer {index} is out of range for {n} layers (expected -{n} <= layer < {n})")
        return index + n if index < 0 else index

    def _layers_up_to(self, layer, what: str) -> int:
        """TransformerLens's `layer` of the stacking methods: the layers strictly before it are included;
        -1 and None mean all of them. Returns that count, in [0, n_layers]."""
        n = self.n_layers
        if layer is None or (not isinstance(layer, bool) and isinstance(layer, int) and layer == -1):
            return n
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise ValueError(
                f"{what}: expected an int in [0, {n}] (the layers strictly before it are included) or -1/None "
                f"(all {n} layers), got {layer!r}"
            )
        return layer

    # --- lookup -----------------------------------------------------------------------------------------
    def __getitem__(self, key):
        if isinstance(key, str) and dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        return dict.__getitem__(self, self._resolve(key))

    def _resolve(self, key) -> str:
        """The cached full name a key stands for (KeyError naming the full name when it is not cached)."""
        if isinstance(key, str):
            name, layer, layer_type = key, None, None
        elif isinstance(key, tuple) and 1 <= len(key) <= 3:
            name, layer, layer_type = (key + (None, None))[:3]
        else:
            raise TypeError(
                f"key: expected a hook name (str) or a tuple (name, layer[, layer_type]), got "
                f"{type(key).__name__}{f' of length {len(key)}' if isinstance(key, tuple) else ''}"
            )
        if layer is not None and not isinstance(layer, str):
            layer = self._layer_index(layer, f"key {key!r}")
        try:
            full = get_act_name(name, layer, layer_type)
        except ValueError as e:
            raise KeyError(f"key {key!r}: {e}") from None
        candidates = [full]
        attn_out = _TL_ATTN_OUT.match(full)
        if attn_out:
            candidates.append(f"{attn_out.group(1) or ''}attn.hook_out")
        if self._is_lone_layer():
            candidates += [m.group(1) for m in map(_LONE_POINT.match, list(candidates)) if m]
        for candidate in candidates:
            if dict.__contains__(self, candidate):
                return candidate
        from pyqkv.hooks import summarize_names  # here: pyqkv.hooks imports this module

        cached = f"cached: {summarize_names(self.keys())}" if self else "the cache is empty"
        hint = "" if len(candidates) == 1 else f" (nor {', '.join(map(repr, candidates[1:]))})"
        raise KeyError(
            f"{full!r}{hint} is not in the cache (key {key!r}); {cached}. run_with_cache's names_filter chooses "
            f"what is cached"
        )

    def stack_activation(self, activation_name: str, layer=-1, sublayer_type: Optional[str] = None) -> torch.Tensor:
        """One activation of every layer before `layer`, stacked: [layers, *the activation's shape], e.g.
        stack_activation("pattern") -> [L, B, H, S, K], stack_activation("z", 2) -> [2, B, S, H, Dh].

        activation_name: a short name (get_act_name). layer: the layers strictly before it are stacked; -1
        or None (default) means all. sublayer_type: get_act_name's layer_type (attention names need none)."""
        n = self._layers_up_to(layer, "layer")
        if n == 0:
            raise ValueError("layer: 0 stacks no layer (expected 1 or more, or -1/None for all layers)")
        return torch.stack([self[(activation_name, i, sublayer_type)] for i in range(n)], dim=0)

    # --- the tensors ------------------------------------------------------------------------------------
    def _map_tensors(self, fn) -> None:
        """Replace every tensor by fn(tensor), in place; an alias entry (the same tensor under two names)
        stays one tensor."""
        done = {}
        for name, value in list(self.items()):
            if id(value) not in done:
                done[id(value)] = fn(value)
            dict.__setitem__(self, name, done[id(value)])

    def to(self, device, move_model: bool = False) -> "ActivationCache":
        """Move every tensor to `device`, in place; returns self (as TransformerLens's cache.to).

        move_model: also move the model the cache came from (the torch module under the hook handle: the
        attached Hugging Face model, or the Bridge). TransformerLens has deprecated this argument; it is kept
        because moving the module is all it takes here. Methods that use weights (stack_head_results) move
        the weights to the cache's device themselves, so the model need not follow the cache."""
        device = torch.device(device)
        if move_model:
            module = self._module()
            module.to(device)
        self._map_tensors(lambda t: t.to(device))
        return self

    def _module(self) -> torch.nn.Module:
        if self.model is None:
            raise ValueError("move_model: this cache has no model (ActivationCache(..., model=None)) to move")
        module = self.model if isinstance(self.model, torch.nn.Module) else getattr(self.model, "model", None)
        if not isinstance(module, torch.nn.Module):
            raise NotImplementedError(
                f"move_model: expected the cache's model to be a torch module or to hold one as .model, got "
                f"{type(self.model).__name__}"
            )
        return module

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch dimension (dim 0, of size 1) of every tensor, in place; returns self.

        Raises ValueError when some tensor's batch size is not 1. A second call warns and changes nothing
        (TransformerLens logs a warning there)."""
        if not self.has_batch_dim:
            warnings.warn("remove_batch_dim: the batch dimension was already removed; nothing changed", stacklevel=2)
            return self
        bad = [f"{name} {tuple(v.shape)}" for name, v in self.items() if v.dim() == 0 or v.shape[0] != 1]
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise ValueError(
                f"remove_batch_dim: expected a batch size of 1 (dim 0) in every tensor, got {', '.join(bad[:3])}"
                f"{more}; use apply_slice_to_batch_dim(i) to keep one batch row"
            )
        self._map_tensors(lambda t: t[0])
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice) -> "ActivationCache":
        """A new cache (same model) with every tensor's batch dimension sliced: batch_slice is an int (the
        batch dimension is removed), a slice or (start, stop[, step]) tuple, a list or 1-D tensor of
        indices, or None (unchanged)."""
        if not self.has_batch_dim:
            raise ValueError("apply_slice_to_batch_dim: this cache has no batch dimension (remove_batch_dim ran)")
        index = _Slice(batch_slice, "batch_slice")
        sliced = {}
        for name, value in self.items():
            sliced[name] = index.apply(value, 0)
        return ActivationCache(sliced, model=self.model, has_batch_dim=index.mode != "int")

    def toggle_autodiff(self, mode: bool = False) -> None:
        """torch.set_grad_enabled(mode), globally (not only for pyqkv), with a warning, as TransformerLens.
        `with torch.inference_mode():` does the same without touching global state."""
        if not isinstance(mode, bool):
            raise TypeError(f"mode: expected a bool, got {type(mode).__name__}")
        warnings.warn(f"toggle_autodiff: changed torch's global state, set autodiff to {mode}", stacklevel=2)
        torch.set_grad_enabled(mode)

    # --- per-head outputs -------------------------------------------------------------------------------
    def _head_output_weights(self, layer: int, what: str) -> torch.Tensor:
        """W_O [H, Dh, D] of a layer, from the model, detached."""
        if self.model is None:
            raise NotImplementedError(
                f"{what}: needs the output projection W_O of layer {layer}, and this cache has no model "
                f"(ActivationCache(..., model=None)); use a cache from run_with_cache, or pass model=<the "
                f"AttachedModel or Bridge>"
            )
        weights = getattr(self.model, "head_output_weights", None)
        if weights is None:
            raise NotImplementedError(
                f"{what}: needs the output projection W_O of layer {layer}, and the cache's model "
                f"({type(self.model).__name__}) has no head_output_weights(layer)"
            )
        return weights(layer).detach()

    def _head_results(self, layer: int, pos: "_Slice", what: str) -> torch.Tensor:
        """Each head's output of a layer [B, S', H, D] (S' after pos_slice), before the head sum and b_O:
        the cached hook_result when there is one (use_attn_result), else hook_z [B, S, H, Dh] @ W_O."""
        result_name = self._point_name(layer, "hook_result")
        if dict.__contains__(self, result_name):
            return pos.apply(dict.__getitem__(self, result_name), -3)
        z_name = self._point_name(layer, "hook_z")
        if not dict.__contains__(self, z_name):
            raise KeyError(
                f"{what}: the cache has no {z_name!r}: run_with_cache must cache {z_name} (e.g. "
                f"names_filter=lambda name: name.endswith('hook_z'))"
            )
        z = dict.__getitem__(self, z_name)
        W_O = self._head_output_weights(layer, what)
        if z.dim() < 3 or tuple(z.shape[-2:]) != tuple(W_O.shape[:2]):
            raise ValueError(
                f"{what}: {z_name} has shape {tuple(z.shape)}, expected [B, S, H, Dh] with [H, Dh] = "
                f"{list(W_O.shape[:2])} of layer {layer}'s W_O {tuple(W_O.shape)} (is it this model's cache?)"
            )
        z = pos.apply(z, -3)
        return torch.einsum("...hd,hdm->...hm", z, W_O.to(device=z.device, dtype=z.dtype))

    def compute_head_results(self) -> None:
        """Cache each layer's per-head outputs as hook_result [B, S, H, D] (hook_z @ W_O, before the head sum
        and b_O), as TransformerLens's; layers that already have hook_result keep it (a warning when all do).
        Needs every layer's hook_z and a model with head_output_weights (not the interface tier)."""
        computed = 0
        everything = _Slice(None, "pos_slice")
        for layer in range(self.n_layers):
            name = self._point_name(layer, "hook_result")
            if not dict.__contains__(self, name):
                dict.__setitem__(self, name, self._head_results(layer, everything, "compute_head_results"))
                computed += 1
        if computed == 0:
            warnings.warn("compute_head_results: every layer's hook_result is already cached", stacklevel=2)

    def stack_head_results(
        self,
        layer=-1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice=None,
        apply_ln: bool = False,
    ):
        """Each head's contribution to the residual stream, for every head of the layers before `layer`:
        [layers*H, B, S', D] (S' after pos_slice; no B after remove_batch_dim), ordered L0H0, L0H1, ...

        A head's contribution is its hook_z [B, S, H, Dh] times W_O [H, Dh, D] (the cached hook_result where
        the model ran with use_attn_result), before b_O: a layer's heads summed, plus b_O, are its
        attention output (blocks.{l}.attn.hook_out).

        layer: the layers strictly before it are included; -1 or None (default) means all.
        return_labels: also return the labels ["L0H0", "L0H1", ...] (and "remainder").
        incl_remainder: append the rest of the residual stream, resid_post of layer `layer` - 1 minus the
            sum of the heads (TransformerLens's definition; before block 0, resid_pre of block 0). The cache
            must hold it (`blocks.{l}.hook_resid_post`: run_with_cache caches it with names_filter None, or
            name it); KeyError names it otherwise.
        pos_slice: positions to keep (dim S): an int (the dimension is removed), a slice or (start, stop[,
            step]) tuple, a list or 1-D tensor of indices, or None (all).
        apply_ln: NotImplementedError: it needs the model's final LayerNorm, which pyqkv does not wrap (the
            error says how to scale the stack by hand).

        Raises KeyError when a layer's hook_z is not cached, NotImplementedError when the model has no output
        projection to read (the attn_implementation="pyqkv" tier: use pyqkv.hf.attach).
        """
        what = "stack_head_results"
        if apply_ln:
            raise NotImplementedError(
                f"{what}(apply_ln=True): needs the model's final LayerNorm (ln_final), which pyqkv does not wrap "
                f"({_ATTENTION_ONLY}); {_FINAL_LN_BY_HAND}"
            )
        n = self._layers_up_to(layer, "layer")
        pos = _Slice(pos_slice, "pos_slice")
        parts, labels = [], []
        for i in range(n):
            heads = self._head_results(i, pos, what).movedim(-2, 0)  # [H, B, S', D]
            parts.append(heads)
            labels += [f"L{i}H{h}" for h in range(heads.shape[0])]
        if n == 0:  # no head: an empty stack [0, B, S', D], shaped from layer 0's heads
            parts.append(self._head_results(0, pos, what).movedim(-2, 0)[:0])
        stack = torch.cat(parts, dim=0)
        if incl_remainder:
            resid = ("resid_post", n - 1) if n > 0 else ("resid_pre", 0)
            full = get_act_name(*resid)
            if not dict.__contains__(self, full):
                raise KeyError(
                    f"{what}(incl_remainder=True): needs the residual stream {full!r}, which is not in the "
                    f"cache; cache it (run_with_cache(..., names_filter=[..., {full!r}])), or leave "
                    f"incl_remainder False"
                )
            remainder = pos.apply(dict.__getitem__(self, full), -2) - stack.sum(dim=0)
            stack = torch.cat([stack, remainder[None].to(stack.dtype)], dim=0)
            labels.append("remainder")
        return (stack, labels) if return_labels else stack

    # --- TransformerLens methods that need parts of the model pyqkv does not wrap -----------------------
    def accumulated_resid(self, *args, **kwargs):
        """NotImplementedError: TransformerLens stacks resid_pre, resid_mid and the final resid_post and applies
        the final LayerNorm; pyqkv has no resid_mid and does not wrap the LayerNorm (stack_activation("resid_pre")
        gives the block inputs)."""
        raise _unsupported("accumulated_resid", "resid_mid (between attention and MLP) and the final LayerNorm")

    def decompose_resid(self, *args, **kwargs):
        """NotImplementedError: needs the embeddings and every attention and MLP output."""
        raise _unsupported("decompose_resid", "the embeddings (hook_embed, hook_pos_embed) and the MLP outputs")

    def logit_attrs(self, *args, **kwargs):
        """NotImplementedError: needs the unembedding W_U and the final LayerNorm."""
        raise _unsupported("logit_attrs", "the unembedding (W_U) and the final LayerNorm (ln_final)")

    def apply_ln_to_stack(self, *args, **kwargs):
        """NotImplementedError: needs the LayerNorms' scales; the error says how to scale a stack by hand from the
        cached residual stream."""
        raise _unsupported(
            "apply_ln_to_stack", "the LayerNorms and their scales (ln_final.hook_scale, ln1, ln2)", _FINAL_LN_BY_HAND
        )

    def get_neuron_results(self, *args, **kwargs):
        """NotImplementedError: needs the MLP neurons and W_out."""
        raise _unsupported("get_neuron_results", "the MLP neurons (blocks.{l}.mlp.hook_post) and W_out")

    def stack_neuron_results(self, *args, **kwargs):
        """NotImplementedError: needs the MLP neurons and W_out."""
        raise _unsupported("stack_neuron_results", "the MLP neurons (blocks.{l}.mlp.hook_post) and W_out")

    def get_full_resid_decomposition(self, *args, **kwargs):
        """NotImplementedError: needs the embeddings, the MLP neurons and every bias."""
        raise _unsupported(
            "get_full_resid_decomposition", "the embeddings, the MLP neurons (and W_out) and the blocks' biases"
        )

    # ----------------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        """Names and shapes; names that differ only in the layer are one entry: blocks.{0-11}.attn.hook_z."""
        groups = {}
        for name, value in self.items():
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            m = _BLOCK.match(name)
            groups.setdefault((m.group(2) if m else name, shape, m is not None), []).append(
                int(m.group(1)) if m else None
            )
        parts = []
        for (point, shape, in_block), layers in groups.items():
            parts.append(f"{f'blocks.{_span(layers)}.' if in_block else ''}{point}: {shape}")
        return f"ActivationCache({', '.join(parts)})"


def _span(layers: list) -> str:
    """3 -> "3"; [0, 1, 2] -> "{0-2}"; [0, 2] -> "{0,2}"."""
    if len(layers) == 1:
        return str(layers[0])
    if layers == list(range(layers[0], layers[0] + len(layers))):
        return f"{{{layers[0]}-{layers[-1]}}}"
    return "{" + ",".join(map(str, layers)) + "}"


def _unsupported(
    method: str, missing: str, instead: str = "use TransformerLens for it, or compute it from the Hugging Face model"
) -> NotImplementedError:
    return NotImplementedError(f"ActivationCache.{method}: needs {missing}, and {_ATTENTION_ONLY}; {instead}")


class _Slice:
    """TransformerLens's Slice over one dimension: None (all), an int (the dimension is removed), a slice or a
    (start, stop[, step]) tuple, or a list / 1-D tensor / array of indices."""

    def __init__(self, index, what: str):
        self.what = what
        if index is None:
            self.index, self.mode = slice(None), "identity"
        elif isinstance(index, bool):
            raise TypeError(f"{what}: expected an int, a slice, a tuple or a list of indices, got bool")
        elif isinstance(index, int):
            self.index, self.mode = index, "int"
        elif isinstance(index, slice):
            self.index, self.mode = index, "slice"
        elif isinstance(index, tuple) and 1 <= len(index) <= 3 and all(i is None or isinstance(i, int) for i in index):
            self.index, self.mode = slice(*index), "slice"
        elif isinstance(index, (list, torch.Tensor)) or hasattr(index, "__array__"):
            indices = torch.as_tensor(index)
            if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
                raise TypeError(
                    f"{what}: expected a 1-D list of integer indices, got {indices.dtype} of shape "
                    f"{tuple(indices.shape)}"
                )
            self.index, self.mode = indices.long(), "array"
        else:
            raise TypeError(
                f"{what}: expected None, an int, a slice, a (start, stop[, step]) tuple, or a list or 1-D tensor "
                f"of indices, got {type(index).__name__}"
            )

    def apply(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        if self.mode == "identity":
            return tensor
        dim = dim % tensor.dim()
        index = self.index.to(tensor.device) if self.mode == "array" else self.index
        return tensor[(slice(None),) * dim + (index,)]


__all__ = ["ActivationCache", "get_act_name"]
