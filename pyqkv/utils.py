"""TransformerLens's `utils.get_act_name`, for the hook points pyqkv has: short names to full hook names.

    get_act_name("pattern", 3)       -> "blocks.3.attn.hook_pattern"
    get_act_name("k6")               -> "blocks.6.attn.hook_k"       (TransformerLens's compact form)
    get_act_name("resid_pre", 2)     -> "blocks.2.hook_resid_pre"
    get_act_name("blocks.0.attn.hook_z") -> unchanged (a full name passes through)

pyqkv hooks attention only, so only the attention names and the residual-stream names are known; any other
short name (TransformerLens's MLP or LayerNorm names included) raises ValueError listing the known ones.
"""

from __future__ import annotations

import operator
import re
from typing import Optional, Union

# Short names of points inside a block's attention: "blocks.{l}.attn.hook_<name>". TransformerLens puts
# attn_in and the split q/k/v inputs at "blocks.{l}.hook_<name>"; in pyqkv they are points of the attention
# Bridge, so they live under "attn." like the rest (q_normed / k_normed are pyqkv's own).
ATTN_NAMES = (
    "q",
    "k",
    "v",
    "z",
    "rot_q",
    "rot_k",
    "q_normed",
    "k_normed",
    "attn_scores",
    "pattern",
    "result",
    "attn_in",
    "q_input",
    "k_input",
    "v_input",
)
# Short names of residual-stream points of a block: "blocks.{l}.hook_<name>". pyqkv's models have resid_pre,
# attn_out and resid_post (pyqkv.points.BLOCK_POINTS); resid_mid and mlp_out are known so that a cache holding
# them (added by hand, or from another tool) answers TransformerLens's short keys.
RESID_NAMES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
# TransformerLens's aliases of the names above.
NAME_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v"}
# TransformerLens's aliases of layer_type ("" = directly in the block).
LAYER_TYPE_ALIASES = {"a": "attn", "attention": "attn", "m": "mlp", "b": "", "block": "", "blocks": ""}

_COMPACT = re.compile(r"^([a-z]+)(\d+)(.*)$")  # "k6" -> k, 6; "pattern0a" -> pattern, 0, a


def known_short_names() -> list:
    """Every short name get_act_name takes (aliases included)."""
    return list(ATTN_NAMES) + list(RESID_NAMES) + list(NAME_ALIASES)


def get_act_name(name: str, layer: Optional[Union[int, str]] = None, layer_type: Optional[str] = None) -> str:
    """The full hook name of a short activation name, with TransformerLens's rules.

    name: a short name ("pattern", "z", "resid_pre", ... or an alias: "attn" = "pattern", "attn_logits" =
        "attn_scores", "key"/"query"/"value" = "k"/"q"/"v"), TransformerLens's compact form ("k6" = ("k", 6)),
        or a full name ("blocks.0.attn.hook_z", "hook_z"), returned unchanged when no layer or layer_type is
        given.
    layer: the block index (>= 0; an int or a string of digits). Negative layers count from the end only
        through ActivationCache (`cache["z", -1]`), which knows the number of layers. Without a layer the name
        has no "blocks.{l}." prefix (as in TransformerLens: "z" -> "attn.hook_z").
    layer_type: as TransformerLens: ignored for attention names (always "attn"); otherwise "a"/"attention" ->
        "attn", "m" -> "mlp", "b"/"block"/"blocks" -> none, anything else used as given.

    Raises ValueError for an unknown short name (listing the known ones), a negative layer, or a full name
    given with a layer; TypeError for arguments of the wrong type.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str (a short or full activation name), got {type(name).__name__}")
    if layer_type is not None and not isinstance(layer_type, str):
        raise TypeError(f"layer_type: expected a str such as 'attn' or 'a', or None, got {type(layer_type).__name__}")
    is_full = "." in name or name.startswith("hook_")
    if is_full:
        if layer is None and layer_type is None:
            return name
        raise ValueError(
            f"name: {name!r} is a full hook name, which takes no layer or layer_type (got layer={layer!r}, "
            f"layer_type={layer_type!r}); pass a short name such as 'z' with a layer instead"
        )
    compact = _COMPACT.match(name)
    if compact is not None and layer is None:
        name, layer, rest = compact.group(1), compact.group(2), compact.group(3)
        layer_type = rest or layer_type
    name = NAME_ALIASES.get(name, name)
    if name not in ATTN_NAMES and name not in RESID_NAMES:
        raise ValueError(
            f"name: unknown activation name {name!r}; pyqkv knows {', '.join(known_short_names())} (or a full "
            f"hook name such as 'blocks.0.attn.hook_z')"
        )
    prefix = "" if layer is None else f"blocks.{_layer_index(layer)}."
    if name in ATTN_NAMES:
        layer_type = "attn"
    elif layer_type is not None:
        layer_type = LAYER_TYPE_ALIASES.get(layer_type, layer_type)
    middle = f"{layer_type}." if layer_type else ""
    return f"{prefix}{middle}hook_{name}"


def _layer_index(layer) -> int:
    if isinstance(layer, str):
        if not layer.isdigit():
            raise ValueError(f"layer: expected a block index (an int >= 0 or a string of digits), got {layer!r}")
        return int(layer)
    if isinstance(layer, bool):
        raise TypeError("layer: expected a block index (an int), got bool")
    try:
        index = operator.index(layer)
    except TypeError:
        raise TypeError(f"layer: expected a block index (an int), got {type(layer).__name__}") from None
    if index < 0:
        raise ValueError(
            f"layer: expected a block index >= 0, got {index}; negative layers count from the end through "
            f"an ActivationCache (cache['z', {index}]), which knows the number of layers"
        )
    return index


__all__ = ["get_act_name", "known_short_names"]
