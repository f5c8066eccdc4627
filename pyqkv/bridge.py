"""Bridge: hookable fused-QKV attention that builds an intermediate only when a hook or the cache asks.

Notation: B batch, S positions in this call, K key positions (cache included), H heads, Hkv KV heads,
Dh head dim, D model dim. Data flows one way: validate and pick a path here -> pyqkv.ops -> kernels.

Paths (DESIGN.md, "Fast-path selection"):
- nothing hooked at hook_attn_scores / hook_pattern: the fused attention op, no [B,H,S,K] tensor;
- a hook on hook_pattern only: the same op also writes the pattern; z is recomputed from the pattern
  only if a hook replaced or edited it in place (or needs its gradient);
- a hook on hook_attn_scores: the split form (scores -> softmax -> apply);
- fork flags with nothing hooked at the fork point: the fused GEMM, never an H-fold copy of the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyqkv import checks, ops, positions
from pyqkv.attend import attend
from pyqkv.cache import ExternalKV, KVCache
from pyqkv.checks import describe
from pyqkv.conversions import Identity, make_rule
from pyqkv.hooks import HookedMixin, HookPoint
from pyqkv.points import BY_NAME, FEATURE_WORDS, HOOK_ALIASES, HOOK_NAMES


@dataclass
class BridgeConfig:
    """Shapes and flags of one Bridge. The three use_* flags may be changed at any time."""

    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    layout: str = "blocked"
    scale: float = 1.0
    reorder_and_upcast_attn: bool = False
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_attn_result: bool = False
    # Positions. rotary_dim: the first rotary_dim features of every Q and K head are rotated (RoPE; None =
    # no rotary embedding); rotary_interleaved: rotate-every-two pairs (GPT-J, CodeGen) instead of
    # rotate-half (GPT-NeoX, Llama); rotary_base: the frequency base when the Bridge makes cos/sin itself.
    # alibi: a per-head linear bias on key positions (Bloom, Falcon-RW), added to the scaled scores.
    rotary_dim: Optional[int] = None
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False
    alibi: bool = False
    # clip_qkv: Q, K and V clamped to [-clip_qkv, clip_qkv] right after the projection (OLMo, DBRX, MPT).
    # softcap: attention-logit soft-capping, scores = softcap * tanh(scores / softcap) (Gemma 2).
    # window: a sliding window of this many keys (the query's own included), bottom-right aligned.
    # qk_norm: None, "head" (a norm over Dh of every head) or "projection" (over all of Q's or K's features).
    clip_qkv: Optional[float] = None
    softcap: Optional[float] = None
    window: Optional[int] = None
    qk_norm: Optional[str] = None

    def __setattr__(self, name, value):
        if name in ("use_split_qkv_input", "use_attn_in", "use_attn_result"):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
            other = {"use_split_qkv_input": "use_attn_in", "use_attn_in": "use_split_qkv_input"}.get(name)
            if value and other and getattr(self, other, False):
                raise ValueError(f"{name}: cannot be set while {other} is set (they are mutually exclusive)")
        super().__setattr__(name, value)


@dataclass
class Projections:
    """Projection modules a Bridge calls instead of holding their weights.

    For weights the Bridge cannot hold or view: offloaded ones (on the meta device between forwards,
    loaded by accelerate's hooks around each module's own forward), quantized or PEFT-wrapped projections,
    tensor-parallel shards (whose wrapped forward does the communication). qkv: one fused module whose
    output [B, S, n_out] is in the Bridge's layout, or (q, k, v) modules; out: the output projection
    (bias included). reason: why, in words, for the errors of what then cannot work (W_Q views, the
    per-head flags)."""

    qkv: object
    out: nn.Module
    reason: str


def attention_scale(d_head, *, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, layer_idx=None):
    """GPT-2's rule: Dh^-0.5 unless scale_attn_weights is False, divided by (layer_idx + 1) when asked."""
    scale = d_head**-0.5 if scale_attn_weights else 1.0
    if scale_attn_by_inverse_layer_idx:
        if layer_idx is None:
            raise ValueError("layer_idx: expected an int when scale_attn_by_inverse_layer_idx is set, got None")
        scale /= float(layer_idx + 1)
    return scale


class Bridge(nn.Module, HookedMixin):
    """One attention layer with a fused QKV weight, re-computed in hookable steps.

    Args:
        weight: fused QKV weight, [D, (H + 2 Hkv) Dh] when conv1d (GPT-2's Conv1D) else
            [(H + 2 Hkv) Dh, D] (nn.Linear), in the given `layout`.
        bias: fused QKV bias [(H + 2 Hkv) Dh] or None.
        out_weight: output projection, [H Dh, D] when conv1d else [D, H Dh]. out_bias: [D] or None.
        n_heads, n_kv_heads (default n_heads), d_head; layout: "blocked", "interleaved", "grouped",
            "codegen" (SPEC §5); conv1d: the orientation of both weights.
        scale: attention scale; default from scale_attn_weights / scale_attn_by_inverse_layer_idx /
            layer_idx (GPT-2's options).
        reorder_and_upcast_attn: scores and softmax in float32, pattern cast back to V's dtype.
        attn_dropout, resid_dropout: dropout probabilities used in train() mode.
        use_split_qkv_input, use_attn_in, use_attn_result: SPEC §3 flags (also settable on .cfg).
        hook_conversions: {hook name: einops pattern or rule object} overriding the hook format of a point
            (see pyqkv.conversions for each point's kernel layout).

    Forward: bridge(x [B, S, D], attention_mask=None, kv_cache=None) -> [B, S, D].
    """

    def __init__(
        self,
        weight,
        bias,
        out_weight,
        out_bias,
        *,
        n_heads: int,
        n_kv_heads: Optional[int] = None,
        d_head: int,
        layout: str = "blocked",
        conv1d: bool = True,
        scale: Optional[float] = None,
        layer_idx: Optional[int] = None,
        scale_attn_weights: bool = True,
        scale_attn_by_inverse_layer_idx: bool = False,
        reorder_and_upcast_attn: bool = False,
        attn_dropout: float = 0.0,
        resid_dropout: float = 0.0,
        use_split_qkv_input: bool = False,
        use_attn_in: bool = False,
        use_attn_result: bool = False,
        rotary_dim: Optional[int] = None,
        rotary_base: float = 10000.0,
        rotary_interleaved: bool = False,
        alibi: bool = False,
        clip_qkv: Optional[float] = None,
        softcap: Optional[float] = None,
        window: Optional[int] = None,
        q_norm: Optional[nn.Module] = None,
        k_norm: Optional[nn.Module] = None,
        qk_norm_per_head: bool = True,
        share_weights: bool = False,
        projections: Optional[Projections] = None,
        d_model: Optional[int] = None,
        hook_conversions: Optional[dict] = None,
    ):
        nn.Module.__init__(self)
        # Integers follow the one rule of checks.integer (numpy's integers too; not bool or float), and are
        # kept as plain ints.
        n_heads = checks.positive_int("n_heads", n_heads)
        d_head = checks.positive_int("d_head", d_head)
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        n_kv = checks.integer(n_kv_heads)
        if n_kv is None or n_kv < 1 or n_heads % n_kv:
            raise ValueError(f"n_kv_heads: expected a positive divisor of n_heads={n_heads}, got {n_kv_heads!r}")
        n_kv_heads = n_kv
        if rotary_dim is not None:
            rdim = checks.integer(rotary_dim)
            if rdim is None or rdim < 2 or rdim % 2 or rdim > d_head:
                raise ValueError(
                    f"rotary_dim: expected None or an even int in [2, d_head={d_head}], got {rotary_dim!r}"
                )
            rotary_dim = rdim
        if not isinstance(rotary_base, (int, float)) or isinstance(rotary_base, bool) or rotary_base <= 1:
            raise ValueError(f"rotary_base: expected a number > 1, got {rotary_base!r}")
        checks.boolean("rotary_interleaved", rotary_interleaved)
        checks.boolean("alibi", alibi)
        if projections is not None:
            for name, t in (("weight", weight), ("bias", bias), ("out_weight", out_weight), ("out_bias", out_bias)):
                if t is not None:
                    raise ValueError(
                        f"{name}: expected None with projections (the Bridge calls the modules), got {describe(t)}"
                    )
            d_model = checks.positive_int("d_model", d_model)
            for name, value in (
                ("use_split_qkv_input", use_split_qkv_input),
                ("use_attn_in", use_attn_in),
                ("use_attn_result", use_attn_result),
            ):
                if value:
                    raise ValueError(
                        f"{name}: needs the projection weights, which this Bridge does not hold ({projections.reason})"
                    )
        for name, t in (("weight", weight), ("out_weight", out_weight), ("bias", bias), ("out_bias", out_bias)):
            if projections is not None:
                break
            if t is None and name in ("bias", "out_bias"):
                continue
            if not isinstance(t, torch.Tensor):
                if name == "bias":
                    continue  # the split below names its expected shape
                raise TypeError(f"{name}: expected a floating-point Tensor, got {describe(t)}")
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point Tensor, got {describe(t)}")
            if name != "weight":
                ops._check_like(name, t, "weight", weight)
        attn_dropout = checks.probability("attn_dropout", attn_dropout)
        resid_dropout = checks.probability("resid_dropout", resid_dropout)
        if layer_idx is not None:
            idx = checks.integer(layer_idx)
            if idx is None or idx < 0:
                raise ValueError(f"layer_idx: expected an int >= 0, got {layer_idx!r}")
            layer_idx = idx
        if scale is None:
            scale = attention_scale(
                d_head,
                scale_attn_weights=scale_attn_weights,
                scale_attn_by_inverse_layer_idx=scale_attn_by_inverse_layer_idx,
                layer_idx=layer_idx,
            )
        scale = ops._check_scale(scale)  # the attention op's own rule for its scale argument
        clip_qkv = _positive_or_none("clip_qkv", clip_qkv)
        # Pre-checks, here rather than at the first call (a Bridge is built whole); 0 means off, as in the op.
        softcap = None if (ops._check_softcap(softcap) or 0.0) == 0.0 else _positive_or_none("softcap", softcap)
        if window is not None:
            window = checks.positive_int("window", window)
        checks.boolean("share_weights", share_weights)
        checks.boolean("qk_norm_per_head", qk_norm_per_head)
        if (q_norm is None) != (k_norm is None):
            raise ValueError(f"q_norm, k_norm: expected both or neither, got {describe(q_norm)} and {describe(k_norm)}")
        for name, m in (("q_norm", q_norm), ("k_norm", k_norm)):
            if m is not None and not isinstance(m, nn.Module):
                raise TypeError(
                    f"{name}: expected an nn.Module (called on [B, S, heads, Dh] or [B, S, heads*Dh]), got {describe(m)}"
                )
        share_qkv = share_weights and layout == "blocked"
        if projections is not None:
            D = d_model
        elif share_qkv:
            # The source's own tensors become the Bridge's parameters (the same Parameter objects when they
            # are Parameters): no copy, and an edit through either is the same edit.
            n_out = (n_heads + 2 * n_kv_heads) * d_head
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1 if conv1d else 0] != n_out:
                raise ValueError(
                    f"weight: expected {'[D, ' + str(n_out) + ']' if conv1d else '[' + str(n_out) + ', D]'} = "
                    f"(n_heads + 2 * n_kv_heads) * d_head, got {describe(weight)}"
                )
            if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n_out,)):
                raise ValueError(
                    f"bias: expected shape ({n_out},) = (n_heads + 2 * n_kv_heads) * d_head, got {describe(bias)}"
                )
            fused_w, fused_b = weight, bias
            D = weight.shape[0] if conv1d else weight.shape[1]
        else:
            with torch.no_grad():
                # Split with the source layout, then pack blocked: every layout runs the same one-GEMM forward
                # with Q, K, V as zero-copy column blocks of its output.
                split = ops.split_qkv(
                    weight, bias, n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_head, layout=layout, conv1d=conv1d
                )
                fused_w, fused_b = ops.pack_qkv(*split, layout="blocked", conv1d=True)
            D = fused_w.shape[0]
        hd = n_heads * d_head
        want = (hd, D) if conv1d else (D, hd)
        if projections is None and tuple(out_weight.shape) != want:
            raise ValueError(
                f"out_weight: expected shape {want} ({'conv1d [H*Dh, D]' if conv1d else 'Linear [D, H*Dh]'}), "
                f"got {tuple(out_weight.shape)}"
            )
        if out_bias is not None and (not isinstance(out_bias, torch.Tensor) or tuple(out_bias.shape) != (D,)):
            raise ValueError(f"out_bias: expected shape ({D},), got {describe(out_bias)}")

        self.projections = None  # None: the Bridge's own GEMMs over the weights it holds
        if projections is not None:
            self.qkv_weight = self.qkv_bias = self.out_weight = self.out_bias = None
            qkv = projections.qkv
            self.qkv_module = nn.ModuleList(qkv) if isinstance(qkv, (tuple, list)) else qkv
            self.out_module = projections.out
            self.projections = projections.reason
        else:
            # Blocked fused weight: [D, (H + 2 Hkv) Dh] (conv1d) or [(H + 2 Hkv) Dh, D] when shared with a Linear.
            self.qkv_weight = _parameter(fused_w)
            self.qkv_bias = None if fused_b is None else _parameter(fused_b)
            if share_weights:  # the output projection is shared in any layout: its layout is the same everywhere
                self.out_weight = _parameter(out_weight)
                self.out_bias = None if out_bias is None else _parameter(out_bias)
            else:
                self.out_weight = nn.Parameter((out_weight if conv1d else out_weight.t()).detach().clone().contiguous())
                self.out_bias = None if out_bias is None else nn.Parameter(out_bias.detach().clone())
        self.q_norm, self.k_norm = q_norm, k_norm

        self.cfg = BridgeConfig(
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            d_head=d_head,
            d_model=D,
            layout=layout,
            scale=scale,
            reorder_and_upcast_attn=bool(reorder_and_upcast_attn),
            attn_dropout=attn_dropout,
            resid_dropout=resid_dropout,
            rotary_dim=rotary_dim,
            rotary_base=float(rotary_base),
            rotary_interleaved=rotary_interleaved,
            alibi=alibi,
            clip_qkv=clip_qkv,
            softcap=softcap,
            window=window,
            qk_norm=None if q_norm is None else ("head" if qk_norm_per_head else "projection"),
        )
        # The orientation of the stored weights: conv1d ([D, n_out], [H*Dh, D]: x @ W), or nn.Linear's
        # ([n_out, D], [D, H*Dh]) when they are shared with a Linear-oriented source.
        self._qkv_conv1d = conv1d if share_qkv else True
        self._out_conv1d = conv1d if share_weights else True
        self.cfg.use_split_qkv_input = use_split_qkv_input
        self.cfg.use_attn_in = use_attn_in
        self.cfg.use_attn_result = use_attn_result

        conversions = dict(hook_conversions or {})
        by_point = {}
        for n in conversions:
            by_point.setdefault(HOOK_ALIASES.get(n, n), []).append(n)
        clash = next((sorted(names) for names in by_point.values() if len(names) > 1), None)
        if clash:
            raise ValueError(
                f"hook_conversions: {' and '.join(map(repr, clash))} name the same hook point; give one rule"
            )
        unknown = [n for n in conversions if HOOK_ALIASES.get(n, n) not in BY_NAME]
        if unknown:
            raise KeyError(f"hook_conversions: unknown hook points {unknown}; valid: {', '.join(HOOK_NAMES)}")
        self._points = {}
        for name in HOOK_NAMES:
            rule = make_rule(name, conversions.get(name, _alias_value(conversions, name)), d_head=d_head)
            self._points[name] = HookPoint(name, rule=None if isinstance(rule, Identity) else rule)
        self._custom_rules = {HOOK_ALIASES.get(n, n) for n in conversions}
        self.set_heads(range(n_heads), range(n_kv_heads), n_heads, n_kv_heads)

    def set_heads(self, heads: range, kv_heads: range, n_heads_total: int, n_kv_heads_total: int) -> None:
        """Which global heads this layer's tensors hold: all of them on one process; under tensor
        parallelism a rank's own (hook.heads then says which, and pyqkv.zero_heads uses it). A point
        whose hook format a user's conversion rule changed has no known head axis (heads None)."""
        for name, point in self._points.items():
            axis = None if name in self._custom_rules else BY_NAME[name].head_axis
            point.hold_heads(axis, heads, kv_heads, n_heads_total, n_kv_heads_total)

    # ---------------------------------------------------------------------------------------------
    # Weights in HookedTransformer format. The native split op turned the source layout into the blocked
    # fused weight at construction; split per head, a blocked weight is a set of strided views, so these
    # are zero-copy and an in-place edit (bridge.W_Q[3].zero_()) changes the layer, as it does W_O.

    def _held(self, name: str) -> None:
        """The weight views exist only where the Bridge holds the weights."""
        if self.projections is not None:
            raise RuntimeError(
                f"{name}: this Bridge calls its projection modules ({self.projections}) and holds no weights to "
                f"view; an edit there would not persist. Edit the module's own weights where they are in memory."
            )

    def _head_block(self, tensor, which: int):
        """Q (0), K (1) or V (2) of the blocked fused weight ([D, n_out] or [n_out, D]) as [heads, D, Dh], or
        of the fused bias [n_out] as [heads, Dh]: views, no copy."""
        c = self.cfg
        heads = c.n_heads if which == 0 else c.n_kv_heads
        start = (0, c.n_heads, c.n_heads + c.n_kv_heads)[which] * c.d_head
        if tensor.dim() == 1:
            return tensor.narrow(0, start, heads * c.d_head).view(heads, c.d_head)
        if self._qkv_conv1d:
            return tensor.narrow(1, start, heads * c.d_head).view(c.d_model, heads, c.d_head).transpose(0, 1)
        return tensor.narrow(0, start, heads * c.d_head).view(heads, c.d_head, c.d_model).transpose(1, 2)

    def _bias_block(self, which: int):
        if self.qkv_bias is not None:
            return self._head_block(self.qkv_bias, which)
        heads = self.cfg.n_heads if which == 0 else self.cfg.n_kv_heads
        return self.qkv_weight.new_zeros(heads, self.cfg.d_head)

    @property
    def W_Q(self) -> torch.Tensor:
        """[H, D, Dh]"""
        self._held("W_Q")
        return self._head_block(self.qkv_weight, 0)

    @property
    def W_K(self) -> torch.Tensor:
        """[Hkv, D, Dh] (not expanded to H)"""
        self._held("W_K")
        return self._head_block(self.qkv_weight, 1)

    @property
    def W_V(self) -> torch.Tensor:
        """[Hkv, D, Dh]"""
        self._held("W_V")
        return self._head_block(self.qkv_weight, 2)

    @property
    def b_Q(self) -> torch.Tensor:
        """[H, Dh] (zeros, not a view, when the layer has no QKV bias)"""
        self._held("b_Q")
        return self._bias_block(0)

    @property
    def b_K(self) -> torch.Tensor:
        """[Hkv, Dh]"""
        self._held("b_K")
        return self._bias_block(1)

    @property
    def b_V(self) -> torch.Tensor:
        """[Hkv, Dh]"""
        self._held("b_V")
        return self._bias_block(2)

    @property
    def W_O(self) -> torch.Tensor:
        """[H, Dh, D]: a view of the output weight"""
        c = self.cfg
        self._held("W_O")
        w = self.out_weight if self._out_conv1d else self.out_weight.t()  # [H*Dh, D]
        return w.view(c.n_heads, c.d_head, c.d_model)

    @property
    def b_O(self) -> torch.Tensor:
        """[D] (zeros when the layer has no output bias)"""
        self._held("b_O")
        return self.out_bias if self.out_bias is not None else self.out_weight.new_zeros(self.cfg.d_model)

    # ---------------------------------------------------------------------------------------------
    # Hook points

    compile = HookedMixin.compile  # nn.Module.compile comes first in the MRO; this one keeps the hook fallback

    def _compile_target(self) -> nn.Module:
        return self

    def hook_points(self) -> dict:
        return self._points

    def hook_aliases(self) -> dict:
        return HOOK_ALIASES

    def hook_gate(self, name: str) -> Optional[str]:
        spec = BY_NAME[name]
        if spec.flag is not None and self.projections is not None:
            return f"{spec.flag} needs the projection weights, which this Bridge does not hold ({self.projections})"
        if spec.flag is not None and not getattr(self.cfg, spec.flag):
            return f"set {spec.flag} first (bridge.cfg.{spec.flag} = True)"
        if spec.requires is not None and not self.has_feature(spec.requires):
            return f"this layer has no {FEATURE_WORDS[spec.requires]}"
        return None

    def has_feature(self, feature: str) -> bool:
        """Whether this layer has a feature that hook points may require ("rotary", "qk_norm")."""
        if feature == "rotary":
            return self.cfg.rotary_dim is not None
        if feature == "qk_norm":
            return self.q_norm is not None
        return False

    def set_hook_prefix(self, prefix: str) -> None:
        """Name the points `prefix + local name` (e.g. "blocks.3.attn.") for hooks used inside a model."""
        for name, point in self._points.items():
            point.name = prefix + name

    def _hooked(self, name: str) -> bool:
        return self._points[name].active

    # ---------------------------------------------------------------------------------------------
    # Forward

    def forward(
        self,
        x: torch.Tensor,
        attention_mask=None,
        kv_cache: Optional[KVCache] = None,
        *,
        position_ids: Optional[torch.Tensor] = None,
        position_embeddings=None,
        alibi: Optional[torch.Tensor] = None,
        return_pattern: bool = False,
        causal: Optional[bool] = None,
    ):
        """x [B, S, D] -> out [B, S, D], or (out, pattern [B, H, S, K]) with return_pattern.

        attention_mask: None (causal only); a padding mask [B, K] (bool True / 1 = attend) over all key
        positions, cache included; or a 4-D additive float mask [B, 1 or H, S, K] (0 = visible, very
        negative = hidden) or 4-D bool mask (True = attend), which is authoritative: no causal mask is
        added to it. kv_cache: a pyqkv.KVCache; this call's keys and values are appended to it in place.

        Rotary layers (rotary_dim set): position_embeddings = (cos, sin), each [B or 1, S, rotary_dim] (or
        [S, rotary_dim]), as Hugging Face models compute them, are used as given; otherwise they are made
        from position_ids [B or 1, S] (default: cached length + 0 .. S-1) and rotary_base.
        ALiBi layers (alibi set): alibi, the per-key bias [B, H, K] (Hugging Face's [B*H, 1, K] is accepted),
        is added to the scaled scores as given; otherwise it is made from Bloom's slopes and the key
        positions (counted over a 2-D padding mask when one is given).
        causal: None (the rule above: causal unless a 4-D mask is given); True: the causal mask AND the
        given mask, whatever its form (for a module that applies its own causal mask on top of a model
        mask that need not be causal: ImageGPT's bidirectional padding mask); False: only the given mask,
        no causal mask (for a module whose causality comes from its mask alone, called without one).
        return_pattern: also return the pattern this call used (after attention dropout and after any
        hook_pattern hook, in [B, H, S, K] whatever the hook format), for callers such as Hugging Face's
        output_attentions; it goes through no hook of its own.
        """
        c = self.cfg
        H, Hkv, Dh = c.n_heads, c.n_kv_heads, c.d_head
        checks.input_like_weights(x, c.d_model, self.qkv_weight)  # (shape only when the modules are called)
        if kv_cache is not None and not isinstance(kv_cache, (KVCache, ExternalKV)):
            raise TypeError(f"kv_cache: expected a pyqkv.KVCache or None, got {describe(kv_cache)}")
        checks.boolean("return_pattern", return_pattern)
        if causal is not None:
            checks.boolean("causal", causal)
        B, S, _ = x.shape
        past = 0 if kv_cache is None else kv_cache.length
        K = past + S
        mask, default_causal = checks.attention_mask(attention_mask, B, S, K, H, x.device)
        causal = default_causal if causal is None else causal
        rotary = positions.prepare_rotary(c, position_embeddings, position_ids, B, S, past, x)
        alibi = positions.prepare_alibi(c, alibi, attention_mask, B, K, x)
        if kv_cache is not None:  # before any hook runs: a cache of another shape raises with nothing fired
            kv_cache.check_appendable((B, S, Hkv, Dh), self._key_dtype(x), x.device)

        x = self._points["hook_in"].fire(x)
        q, k, v = self._project_qkv(x)  # [B, S, H*Dh], [B, S, Hkv*Dh] x 2 (kernel layout)
        q = self._points["hook_q"].fire(q)
        k = self._points["hook_k"].fire(k)
        v = self._points["hook_v"].fire(v)
        if self.q_norm is not None:  # after the projection hooks, before RoPE (Qwen3, Gemma 3, OLMo 2, ...)
            q = self._points["hook_q_normed"].fire(self._normed(self.q_norm, q, H))
            k = self._points["hook_k_normed"].fire(self._normed(self.k_norm, k, Hkv))
        q4, k4, v4 = q.view(B, S, H, Dh), k.view(B, S, Hkv, Dh), v.view(B, S, Hkv, Dh)
        if rotary is not None:
            # After the projection hooks, before the cache: the cache holds rotated keys, as HF's does.
            cos, sin = rotary
            q4 = self._points["hook_rot_q"].fire(ops.rotary(q4, cos, sin, interleaved=c.rotary_interleaved).flatten(2))
            k4 = self._points["hook_rot_k"].fire(ops.rotary(k4, cos, sin, interleaved=c.rotary_interleaved).flatten(2))
            q4, k4 = q4.view(B, S, H, Dh), k4.view(B, S, Hkv, Dh)

        if kv_cache is None:
            return self._attend_and_project(q4, k4, v4, mask, causal, alibi, return_pattern)
        if isinstance(kv_cache, ExternalKV):  # storage another library owns (pyqkv.hf: a StaticCache layer)
            k_all, v_all = kv_cache.write(k4, v4)
            try:
                return self._attend_and_project(q4, k_all, v_all, mask, causal, alibi, return_pattern)
            except BaseException:
                kv_cache.undo()
                raise
        grad_through_cache = torch.is_grad_enabled() and (k4.requires_grad or v4.requires_grad)
        past_k, past_v = (kv_cache.keys, kv_cache.values) if grad_through_cache and past else (None, None)
        if self.projections is None:  # checked before any hook ran (check_appendable above)
            k_all, v_all = kv_cache._append(k4, v4)
        else:  # the keys' dtype was unknown until the modules ran: the full checks
            k_all, v_all = kv_cache.append(k4, v4)
        if grad_through_cache and past:
            # The cache holds detached copies: attend over [past, new] with the new rows still in the graph.
            k_all, v_all = torch.cat([past_k, k4], dim=1), torch.cat([past_v, v4], dim=1)
        elif grad_through_cache:
            k_all, v_all = k4, v4
        try:
            return self._attend_and_project(q4, k_all, v_all, mask, causal, alibi, return_pattern)
        except BaseException:
            kv_cache.length = past  # a failure mid-way leaves the cache as it was
            raise

    def _key_dtype(self, x) -> Optional[torch.dtype]:
        """The dtype this call's keys will have: x's (the held weights' dtype, checked), autocast's inside
        an autocast region, None (unknown until they exist) when the projection modules are called."""
        if self.projections is not None:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def _call_projections(self, x):
        """Q, K, V in kernel layout [B, S, heads*Dh] from the projection modules: a fused module's output is
        in the Bridge's layout (blocked: column views; other layouts: the one split op, a copy)."""
        c = self.cfg
        B, S, _ = x.shape
        H, Hkv, Dh = c.n_heads, c.n_kv_heads, c.d_head
        if isinstance(self.qkv_module, nn.ModuleList):
            q, k, v = (m(x) for m in self.qkv_module)
        else:
            qkv = self.qkv_module(x)  # [B, S, (H + 2 Hkv) Dh] in the module's own layout
            if c.layout == "blocked":
                q, k, v = qkv[..., : H * Dh], qkv[..., H * Dh : (H + Hkv) * Dh], qkv[..., (H + Hkv) * Dh :]
            else:  # an activation is a one-input-row "weight": the same split op as the weights'
                parts = ops.split_qkv(
                    qkv.reshape(B * S, -1), None, n_heads=H, n_kv_heads=Hkv, d_head=Dh, layout=c.layout, conv1d=True
                )[:3]
                q, k, v = (t.transpose(0, 1).reshape(B, S, -1) for t in parts)  # [heads, B*S, Dh] -> [B, S, heads*Dh]
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        return q, k, v

    def _normed(self, norm: nn.Module, t: torch.Tensor, heads: int) -> torch.Tensor:
        """A query or key norm on t [B, S, heads*Dh]: over Dh of each head, or over the whole projection."""
        if self.cfg.qk_norm == "projection":
            return norm(t)
        B, S, _ = t.shape
        return norm(t.view(B, S, heads, self.cfg.d_head)).reshape(B, S, heads * self.cfg.d_head)

    def _project_qkv(self, x):
        """Q, K, V in kernel layout: column blocks of one fused GEMM, unless a fork point is hooked."""
        c = self.cfg
        B, S, D = x.shape
        H, Hkv, Dh = c.n_heads, c.n_kv_heads, c.d_head
        forks = {}  # "q" / "k" / "v" -> per-head input [B, S, heads, D] chosen by a hooked fork point
        if c.use_attn_in and self._hooked("hook_attn_in"):
            # A real copy: a hook may edit one head's input in place, which a broadcast view cannot take.
            attn_in = self._points["hook_attn_in"].fire(x.unsqueeze(2).expand(B, S, H, D).contiguous())
            forks = {"q": attn_in, "k": attn_in[:, :, :Hkv], "v": attn_in[:, :, :Hkv]}
        elif c.use_split_qkv_input:
            for kind, heads in (("q", H), ("k", Hkv), ("v", Hkv)):
                if self._hooked(f"hook_{kind}_input"):
                    forks[kind] = self._points[f"hook_{kind}_input"].fire(
                        x.unsqueeze(2).expand(B, S, heads, D).contiguous()
                    )

        out = {}
        if self.projections is not None:  # the model's own modules (offloaded, quantized, sharded weights)
            return self._call_projections(x)
        if len(forks) < 3:
            # Unhooked fork points read the residual directly: the fused GEMM equals the per-head
            # projection of an H-fold copy of x, without making the copy.
            qkv = _linear(x, self.qkv_weight, self.qkv_bias, self._qkv_conv1d)  # [B, S, (H + 2 Hkv) Dh]
            if c.clip_qkv is not None:  # on the fresh GEMM output, before any hook sees Q, K or V
                qkv = qkv.clamp(-c.clip_qkv, c.clip_qkv)
            out = {"q": qkv[..., : H * Dh], "k": qkv[..., H * Dh : (H + Hkv) * Dh], "v": qkv[..., (H + Hkv) * Dh :]}
        if forks:
            for kind, per_head_in in forks.items():
                which = "qkv".index(kind)
                W = self._head_block(self.qkv_weight, which)
                b = None if self.qkv_bias is None else self._head_block(self.qkv_bias, which)
                out[kind] = ops.per_head_proj(per_head_in, W, b).flatten(2)
                if c.clip_qkv is not None:
                    out[kind] = out[kind].clamp(-c.clip_qkv, c.clip_qkv)
        return out["q"], out["k"], out["v"]

    def _attend_and_project(self, q4, k_all, v_all, mask, causal, alibi, return_pattern):
        """Attention, hook_attn_scores .. hook_z, the output projection and hook_out. Returns out, or
        (out, pattern) with return_pattern."""
        c = self.cfg
        B, S, H, Dh = q4.shape
        dropout_p = c.attn_dropout if self.training else 0.0
        z, pattern = attend(
            q4,
            k_all,
            v_all,
            scale=c.scale,
            causal=causal,
            mask=mask,
            alibi=alibi,
            softcap=c.softcap,
            # a 4-D mask already holds the window: it is authoritative, and causal is then False
            window=c.window if causal else None,
            dropout_p=dropout_p,
            want_pattern=return_pattern,
            scores_point=self._points["hook_attn_scores"],
            pattern_point=self._points["hook_pattern"],
            score_dtype=torch.float32 if c.reorder_and_upcast_attn else None,
        )
        z = self._points["hook_z"].fire(z.reshape(B, S, H * Dh))
        if c.use_attn_result and self._hooked("hook_result"):
            result = ops.per_head_proj(z.view(B, S, H, Dh), self.W_O)  # [B, S, H, D] before b_O
            out = self._points["hook_result"].fire(result).sum(dim=2)
            if self.out_bias is not None:
                out = out + self.out_bias
        elif self.projections is not None:
            out = self.out_module(z)
        else:
            out = _linear(z, self.out_weight, self.out_bias, self._out_conv1d)
        if self.training and c.resid_dropout:
            out = F.dropout(out, c.resid_dropout, training=True)
        out = self._points["hook_out"].fire(out)
        return (out, pattern) if return_pattern else out

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"n_heads={c.n_heads}, n_kv_heads={c.n_kv_heads}, d_head={c.d_head}, d_model={c.d_model}, "
            f"layout={c.layout!r}, scale={c.scale:.4g}"
        )

    def head_output_weights(self, layer: int = 0) -> torch.Tensor:
        """W_O [H, Dh, D] for ActivationCache.stack_head_results: a lone Bridge is layer 0 of its cache."""
        if layer not in (0, -1) or isinstance(layer, bool):
            raise ValueError(f"layer: a lone Bridge is one layer, expected 0 (or -1), got {layer!r}")
        return self.W_O


def _linear(x, weight, bias, conv1d: bool):
    """x [..., in] @ W + b as one GEMM over the flattened leading dims; W is [in, out] (conv1d) or [out, in]
    (nn.Linear, read transposed in place)."""
    w = weight if conv1d else weight.t()
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(x2, w) if bias is None else torch.addmm(bias, x2, w)
    return y.view(*x.shape[:-1], w.shape[1])


def _parameter(t: torch.Tensor) -> nn.Parameter:
    """t itself when it is a Parameter (shared, not copied), else a Parameter over the same storage."""
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach())


def _positive_or_none(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected None or a positive number, got {type(value).__name__} {value!r}")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name}: expected None or a positive finite number, got {value!r}")
    return float(value)


def _alias_value(conversions: dict, canonical: str):
    for alias, target in HOOK_ALIASES.items():
        if target == canonical and alias in conversions:
            return conversions[alias]
    return None
