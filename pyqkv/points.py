"""The hook-point table: every fact about a hook point lives in one row here.

The Bridge makes its points from it (names, aliases, firing order, gates), the conversion rules take
their kernel layouts and default hook formats from it, and the README's list of points is generated
from it (`python -m pyqkv.points` prints the markdown; a test checks the README holds exactly that).

Notation: B batch, S positions in this call, K key positions (cache included), H query heads, Hkv
key/value heads, Dh head dim, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class PointSpec:
    """One hook point.

    name: the canonical name; aliases: other names of the same point (one hook, not two).
    hook_shape: what a hook function and the activation cache see (the hook format).
    kernel_layout / kernel_rank: the layout the kernels use; a user's conversion pattern starts from it.
    default_rule: the einops pattern from the kernel layout to the hook format (None: they are the same).
    flag: the Bridge config flag that must be on for the point to fire (None: no flag).
    requires: a feature the layer must have for the point to fire ("rotary": a rotary embedding;
        "qk_norm": a normalization of queries and keys), or None.
    fires: when it fires, in words (for the README and error messages).
    interface: what the attn_implementation="pyqkv" tier (pyqkv.hf.interface) does with the point: SEEN (it
        fires there) or the reason it cannot (that tier receives Q, K, V already projected and returns z).
        Every row says which: a point the tier silently never fired would invalidate an analysis.
    """

    name: str
    hook_shape: str
    kernel_layout: str
    kernel_rank: int
    fires: str
    default_rule: Optional[str] = None
    aliases: tuple = ()
    flag: Optional[str] = None
    requires: Optional[str] = None
    interface: str = ""

    @property
    def head_axis(self) -> Optional[tuple]:
        """(dim of the head axis in the hook format, "H" or "Hkv"), or None for a point without heads."""
        axes = [a.strip() for a in self.hook_shape.strip("[]").split(",")]
        for i, a in enumerate(axes):
            if a in ("H", "Hkv"):
                return i, a
        return None


_HEADS = "b s (h d) -> b s h d"
# PointSpec.interface of a point the attn_implementation="pyqkv" tier fires.
SEEN = "seen"
_PROJECTED = "the interface receives Q, K, V already projected, not the layer's input"
_SPLIT = "the interface receives Q, K, V already projected (no split-input path)"
_AFTER_Z = "the output projection runs after the interface returns: use hook_z here"

# Firing order (SPEC §2).
POINTS = (
    PointSpec("hook_in", "[B, S, D]", "[B, S, D]", 3, "always, first", interface=_PROJECTED),
    PointSpec(
        "hook_attn_in",
        "[B, S, H, D]",
        "[B, S, H, D]",
        4,
        "the residual copied per head; K and V use its first Hkv heads",
        flag="use_attn_in",
        interface=_PROJECTED,
    ),
    PointSpec(
        "hook_q_input",
        "[B, S, H, D]",
        "[B, S, H, D]",
        4,
        "the residual copied per query head",
        flag="use_split_qkv_input",
        interface=_SPLIT,
    ),
    PointSpec(
        "hook_k_input",
        "[B, S, Hkv, D]",
        "[B, S, Hkv, D]",
        4,
        "the residual copied per KV head",
        flag="use_split_qkv_input",
        interface=_SPLIT,
    ),
    PointSpec(
        "hook_v_input",
        "[B, S, Hkv, D]",
        "[B, S, Hkv, D]",
        4,
        "the residual copied per KV head",
        flag="use_split_qkv_input",
        interface=_SPLIT,
    ),
    PointSpec(
        "hook_q",
        "[B, S, H, Dh]",
        "[B, S, H*Dh]",
        3,
        "always: the projection's queries",
        default_rule=_HEADS,
        aliases=("q.hook_out",),
        interface="the interface sees Q only after qk-norm and RoPE: use hook_rot_q here",
    ),
    PointSpec(
        "hook_k",
        "[B, S, Hkv, Dh]",
        "[B, S, Hkv*Dh]",
        3,
        "always: this call's keys, before the cache append",
        default_rule=_HEADS,
        aliases=("k.hook_out",),
        interface="the interface sees K only after RoPE and cache.update: use hook_rot_k here",
    ),
    PointSpec(
        "hook_v",
        "[B, S, Hkv, Dh]",
        "[B, S, Hkv*Dh]",
        3,
        "always: this call's values, before the cache append",
        default_rule=_HEADS,
        aliases=("v.hook_out",),
        interface=SEEN,
    ),
    PointSpec(
        "hook_q_normed",
        "[B, S, H, Dh]",
        "[B, S, H*Dh]",
        3,
        "after the query norm, before RoPE",
        default_rule=_HEADS,
        requires="qk_norm",
        interface="the interface sees Q only after qk-norm and RoPE: use hook_rot_q here",
    ),
    PointSpec(
        "hook_k_normed",
        "[B, S, Hkv, Dh]",
        "[B, S, Hkv*Dh]",
        3,
        "after the key norm, before RoPE",
        default_rule=_HEADS,
        requires="qk_norm",
        interface="the interface sees K only after qk-norm, RoPE and cache.update: use hook_rot_k here",
    ),
    PointSpec(
        "hook_rot_q",
        "[B, S, H, Dh]",
        "[B, S, H*Dh]",
        3,
        "after RoPE",
        default_rule=_HEADS,
        requires="rotary",
        interface=SEEN,
    ),
    PointSpec(
        "hook_rot_k",
        "[B, S, Hkv, Dh]",
        "[B, S, Hkv*Dh]",
        3,
        "after RoPE, before the cache append",
        default_rule=_HEADS,
        requires="rotary",
        interface=SEEN,
    ),
    PointSpec(
        "hook_attn_scores",
        "[B, H, S, K]",
        "[B, H, S, K]",
        4,
        "scaled (and soft-capped) scores with the masks applied, before the softmax",
        interface=SEEN,
    ),
    PointSpec(
        "hook_pattern",
        "[B, H, S, K]",
        "[B, H, S, K]",
        4,
        "the softmax output (after attention dropout)",
        interface=SEEN,
    ),
    PointSpec(
        "hook_z",
        "[B, S, H, Dh]",
        "[B, S, H*Dh]",
        3,
        "always: pattern · V, the output projection's input",
        default_rule=_HEADS,
        aliases=("o.hook_in",),
        interface=SEEN,
    ),
    PointSpec(
        "hook_result",
        "[B, S, H, D]",
        "[B, S, H, D]",
        4,
        "each head's output before the head sum and the output bias",
        flag="use_attn_result",
        interface=_AFTER_Z,
    ),
    PointSpec(
        "hook_out",
        "[B, S, D]",
        "[B, S, D]",
        3,
        "always, last",
        aliases=("hook_hidden_states", "o.hook_out"),
        interface=_AFTER_Z,
    ),
)

_undeclared = [p.name for p in POINTS if not p.interface]
if _undeclared:  # each row must say what the interface tier does with it (see PointSpec.interface)
    raise AssertionError(f"pyqkv.points: no interface verdict for {_undeclared}")

# The residual-stream points of a model's decoder blocks, `blocks.{i}.<name>`, beside the attention's own
# `blocks.{i}.attn.<name>` (pyqkv.hf.residual). Both tiers fire them: they are read at the block's and the
# attention module's boundaries, which Hugging Face's code exposes in every family.
BLOCK_POINTS = (
    PointSpec(
        "hook_resid_pre",
        "[B, S, D]",
        "[B, S, D]",
        3,
        "the hidden states entering decoder block i (Hugging Face's hidden_states[i])",
        interface=SEEN,
    ),
    PointSpec(
        "hook_attn_out",
        "[B, S, D]",
        "[B, S, D]",
        3,
        "the attention's output after the output projection, before the block adds it to the residual stream",
        interface=SEEN,
    ),
    PointSpec(
        "hook_resid_post",
        "[B, S, D]",
        "[B, S, D]",
        3,
        "the hidden states leaving decoder block i (before any final norm)",
        interface=SEEN,
    ),
)

BY_NAME = {p.name: p for p in POINTS}
HOOK_NAMES = tuple(p.name for p in POINTS)
HOOK_ALIASES = {alias: p.name for p in POINTS for alias in p.aliases}
# What a layer without the feature lacks, in words (gate messages, the README).
FEATURE_WORDS = {"rotary": "rotary embedding (rotary_dim is None)", "qk_norm": "query/key norm (qk_norm is None)"}


def canonical(name: str) -> str:
    """The canonical name of a point or alias (names that are neither are returned unchanged)."""
    return HOOK_ALIASES.get(name, name)


def markdown_table(points=POINTS) -> str:
    """The README's table of hook points, made from POINTS (or BLOCK_POINTS)."""
    rows = ["| hook point | aliases | hook format | fires |", "|---|---|---|---|"]
    for p in points:
        when = p.fires
        if p.flag:
            when += f" (only with `{p.flag}`)"
        if p.requires:
            when += f" (only on layers with a {FEATURE_WORDS[p.requires].split(' (')[0]})"
        aliases = ", ".join(f"`{a}`" for a in p.aliases)
        rows.append(f"| `{p.name}` | {aliases} | {p.hook_shape} | {when} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
