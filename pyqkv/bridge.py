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

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pyqkv import ops
from pyqkv.cache import KVCache
from pyqkv.conversions import make_rule
from pyqkv.hooks import HookedMixin, HookPoint, attach_bwd_hooks, run_fwd_hooks

# Canonical hook points in firing order (SPEC §2).
HOOK_NAMES = (
    "hook_in",
    "hook_attn_in",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "hook_q",
    "hook_k",
    "hook_v",
    "hook_rot_q",
    "hook_rot_k",
    "hook_attn_scores",
    "hook_pattern",
    "hook_z",
    "hook_result",
    "hook_out",
)

# A second name for the same point: one hook, not two.
HOOK_ALIASES = {
    "q.hook_out": "hook_q",
    "k.hook_out": "hook_k",
    "v.hook_out": "hook_v",
    "o.hook_in": "hook_z",
    "o.hook_out": "hook_out",
    "hook_hidden_states": "hook_out",
}

# Points that fire only when a config flag is on.
GATING_FLAGS = {
    "hook_attn_in": "use_attn_in",
    "hook_q_input": "use_split_qkv_input",
    "hook_k_input": "use_split_qkv_input",
    "hook_v_input": "use_split_qkv_input",
    "hook_result": "use_attn_result",
}
ROTARY_POINTS = ("hook_rot_q", "hook_rot_k")


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

    def __setattr__(self, name, value):
        if name in ("use_split_qkv_input", "use_attn_in", "use_attn_result"):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
            other = {"use_split_qkv_input": "use_attn_in", "use_attn_in": "use_split_qkv_input"}.get(name)
            if value and other and getattr(self, other, False):
                raise ValueError(f"{name}: cannot be set while {other} is set (they are mutually exclusive)")
        super().__setattr__(name, value)


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
        hook_conversions: Optional[dict] = None,
    ):
        nn.Module.__init__(self)
        for name, value in (("n_heads", n_heads), ("d_head", d_head)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if not isinstance(n_kv_heads, int) or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads: expected a positive divisor of n_heads={n_heads}, got {n_kv_heads!r}")
        if rotary_dim is not None and (
            not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool) or rotary_dim < 2 or rotary_dim % 2
            or rotary_dim > d_head
        ):
            raise ValueError(f"rotary_dim: expected None or an even int in [2, d_head={d_head}], got {rotary_dim!r}")
        if not isinstance(rotary_base, (int, float)) or isinstance(rotary_base, bool) or rotary_base <= 1:
            raise ValueError(f"rotary_base: expected a number > 1, got {rotary_base!r}")
        for name, value in (("rotary_interleaved", rotary_interleaved), ("alibi", alibi)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
        for name, t in (("weight", weight), ("out_weight", out_weight), ("bias", bias), ("out_bias", out_bias)):
            if t is None and name in ("bias", "out_bias"):
                continue
            if not isinstance(t, torch.Tensor):
                if name == "bias":
                    continue  # the split below names its expected shape
                raise TypeError(f"{name}: expected a floating-point Tensor, got {_describe(t)}")
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point Tensor, got {_describe(t)}")
            if name != "weight":
                ops._check_like(name, t, "weight", weight)
        for name, p in (("attn_dropout", attn_dropout), ("resid_dropout", resid_dropout)):
            if isinstance(p, bool) or not isinstance(p, numbers.Real):
                raise TypeError(f"{name}: expected a number, got {type(p).__name__} {p!r}")
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1], got {p}")
        if scale_attn_by_inverse_layer_idx and scale is None and layer_idx is not None and (
            not isinstance(layer_idx, int) or isinstance(layer_idx, bool) or layer_idx < 0
        ):
            raise ValueError(f"layer_idx: expected an int >= 0, got {layer_idx!r}")
        if scale is None:
            scale = attention_scale(
                d_head,
                scale_attn_weights=scale_attn_weights,
                scale_attn_by_inverse_layer_idx=scale_attn_by_inverse_layer_idx,
                layer_idx=layer_idx,
            )
        if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.Tensor)):
            raise TypeError(f"scale: expected a number, got {type(scale).__name__} {scale!r}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale: expected a finite number, got {float(scale)}")
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
        if tuple(out_weight.shape) != want:
            raise ValueError(
                f"out_weight: expected shape {want} ({'conv1d [H*Dh, D]' if conv1d else 'Linear [D, H*Dh]'}), "
                f"got {tuple(out_weight.shape)}"
            )
        if out_bias is not None and (not isinstance(out_bias, torch.Tensor) or tuple(out_bias.shape) != (D,)):
            raise ValueError(f"out_bias: expected shape ({D},), got {_describe(out_bias)}")

        self.qkv_weight = nn.Parameter(fused_w)  # [D, (H + 2 Hkv) Dh], blocked, x @ W orientation
        self.qkv_bias = None if fused_b is None else nn.Parameter(fused_b)
        self.out_weight = nn.Parameter((out_weight if conv1d else out_weight.t()).detach().clone().contiguous())
        self.out_bias = None if out_bias is None else nn.Parameter(out_bias.detach().clone())

        self.cfg = BridgeConfig(
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            d_head=d_head,
            d_model=D,
            layout=layout,
            scale=float(scale),
            reorder_and_upcast_attn=bool(reorder_and_upcast_attn),
            attn_dropout=float(attn_dropout),
            resid_dropout=float(resid_dropout),
            rotary_dim=rotary_dim,
            rotary_base=float(rotary_base),
            rotary_interleaved=rotary_interleaved,
            alibi=alibi,
        )
        self.cfg.use_split_qkv_input = use_split_qkv_input
        self.cfg.use_attn_in = use_attn_in
        self.cfg.use_attn_result = use_attn_result

        self._points = {name: HookPoint(name) for name in HOOK_NAMES}
        conversions = dict(hook_conversions or {})
        by_point = {}
        for n in conversions:
            by_point.setdefault(HOOK_ALIASES.get(n, n), []).append(n)
        clash = next((sorted(names) for names in by_point.values() if len(names) > 1), None)
        if clash:
            raise ValueError(f"hook_conversions: {' and '.join(map(repr, clash))} name the same hook point; give one rule")
        unknown = [n for n in conversions if HOOK_ALIASES.get(n, n) not in self._points]
        if unknown:
            raise KeyError(f"hook_conversions: unknown hook points {unknown}; valid: {', '.join(HOOK_NAMES)}")
        self._rules = {
            name: make_rule(name, conversions.get(name, _alias_value(conversions, name)), d_head=d_head)
            for name in HOOK_NAMES
        }

    # ---------------------------------------------------------------------------------------------
    # Construction from Hugging Face modules

    @classmethod
    def from_hf(cls, module, **flags) -> "Bridge":
        """Wrap a Hugging Face attention module with a fused QKV weight: GPT2Attention, GPTNeoXAttention,
        Phi3Attention, GPTBigCodeAttention, FalconAttention, BloomAttention or CodeGenAttention (the family
        comes from the module's type; anything else raises TypeError naming these). Flags:
        use_split_qkv_input, use_attn_in, use_attn_result, hook_conversions. The Bridge copies the weights it
        needs, not the module. Positions: called on its own, the Bridge makes its own cos/sin or alibi; inside
        a model (pyqkv.hf.attach) it uses the ones the model passes."""
        from pyqkv import hf

        return hf.bridge_from_module(module, **flags)

    # ---------------------------------------------------------------------------------------------
    # Weights in HookedTransformer format. The native split op turned the source layout into the blocked
    # fused weight at construction; split per head, a blocked weight is a set of strided views, so these
    # are zero-copy and an in-place edit (bridge.W_Q[3].zero_()) changes the layer, as it does W_O.

    def _head_block(self, tensor, which: int):
        """Q (0), K (1) or V (2) of the blocked fused weight [D, n_out] as [heads, D, Dh], or of the fused
        bias [n_out] as [heads, Dh]: views, no copy."""
        c = self.cfg
        heads = c.n_heads if which == 0 else c.n_kv_heads
        start = (0, c.n_heads, c.n_heads + c.n_kv_heads)[which] * c.d_head
        block = tensor.narrow(-1, start, heads * c.d_head)
        if tensor.dim() == 1:
            return block.view(heads, c.d_head)
        return block.view(c.d_model, heads, c.d_head).transpose(0, 1)

    def _bias_block(self, which: int):
        if self.qkv_bias is not None:
            return self._head_block(self.qkv_bias, which)
        heads = self.cfg.n_heads if which == 0 else self.cfg.n_kv_heads
        return self.qkv_weight.new_zeros(heads, self.cfg.d_head)

    @property
    def W_Q(self) -> torch.Tensor:
        """[H, D, Dh]"""
        return self._head_block(self.qkv_weight, 0)

    @property
    def W_K(self) -> torch.Tensor:
        """[Hkv, D, Dh] (not expanded to H)"""
        return self._head_block(self.qkv_weight, 1)

    @property
    def W_V(self) -> torch.Tensor:
        """[Hkv, D, Dh]"""
        return self._head_block(self.qkv_weight, 2)

    @property
    def b_Q(self) -> torch.Tensor:
        """[H, Dh] (zeros, not a view, when the layer has no QKV bias)"""
        return self._bias_block(0)

    @property
    def b_K(self) -> torch.Tensor:
        """[Hkv, Dh]"""
        return self._bias_block(1)

    @property
    def b_V(self) -> torch.Tensor:
        """[Hkv, Dh]"""
        return self._bias_block(2)

    @property
    def W_O(self) -> torch.Tensor:
        """[H, Dh, D]: a view of the output weight"""
        c = self.cfg
        return self.out_weight.view(c.n_heads, c.d_head, c.d_model)

    @property
    def b_O(self) -> torch.Tensor:
        """[D] (zeros when the layer has no output bias)"""
        return self.out_bias if self.out_bias is not None else self.out_weight.new_zeros(self.cfg.d_model)

    # ---------------------------------------------------------------------------------------------
    # Hook points

    def hook_points(self) -> dict:
        return self._points

    def hook_aliases(self) -> dict:
        return HOOK_ALIASES

    def hook_gate(self, name: str) -> Optional[str]:
        flag = GATING_FLAGS.get(name)
        if flag is not None and not getattr(self.cfg, flag):
            return f"set {flag} first (bridge.cfg.{flag} = True)"
        if name in ROTARY_POINTS and self.cfg.rotary_dim is None:
            return "this layer has no rotary embedding (rotary_dim is None)"
        return None

    def set_hook_prefix(self, prefix: str) -> None:
        """Name the points `prefix + local name` (e.g. "blocks.3.attn.") for hooks used inside a model."""
        for name, point in self._points.items():
            point.name = prefix + name

    def _hooked(self, name: str) -> bool:
        point = self._points[name]
        return bool(point.fwd or point.bwd)

    def _fire(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Run the hooks of one point on `tensor` (kernel layout); returns the activation to continue with.
        With no hook this is a list check: no conversion, no call."""
        point = self._points[name]
        if not (point.fwd or point.bwd):
            return tensor
        rule = self._rules[name]
        hooked = rule.convert(tensor)
        hooked = run_fwd_hooks(point, hooked)
        attach_bwd_hooks(point, hooked)
        back = rule.revert(hooked)
        if back.shape != tensor.shape:
            raise ValueError(
                f"{point.name}: conversion rule {rule!r} reverted the hook's tensor to shape {tuple(back.shape)}; "
                f"expected the kernel layout {tuple(tensor.shape)}"
            )
        return back

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
    ) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D].

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
        """
        c = self.cfg
        H, Hkv, Dh = c.n_heads, c.n_kv_heads, c.d_head
        self._check_input(x)
        if kv_cache is not None and not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache: expected a pyqkv.KVCache or None, got {_describe(kv_cache)}")
        B, S, _ = x.shape
        past = 0 if kv_cache is None else kv_cache.length
        K = past + S
        mask, causal = self._prepare_mask(attention_mask, B, S, K, x.device)
        rotary = self._rotary_tables(position_embeddings, position_ids, B, S, past, x)
        alibi = self._prepare_alibi(alibi, attention_mask, B, K, x)

        x = self._fire("hook_in", x)
        q, k, v = self._project_qkv(x)  # [B, S, H*Dh], [B, S, Hkv*Dh] x 2 (kernel layout)
        q = self._fire("hook_q", q)
        k = self._fire("hook_k", k)
        v = self._fire("hook_v", v)
        q4, k4, v4 = q.view(B, S, H, Dh), k.view(B, S, Hkv, Dh), v.view(B, S, Hkv, Dh)
        if rotary is not None:
            # After the projection hooks, before the cache: the cache holds rotated keys, as HF's does.
            cos, sin = rotary
            q4 = self._fire("hook_rot_q", ops.rotary(q4, cos, sin, interleaved=c.rotary_interleaved).flatten(2))
            k4 = self._fire("hook_rot_k", ops.rotary(k4, cos, sin, interleaved=c.rotary_interleaved).flatten(2))
            q4, k4 = q4.view(B, S, H, Dh), k4.view(B, S, Hkv, Dh)

        if kv_cache is None:
            return self._attend_and_project(q4, k4, v4, mask, causal, alibi)
        grad_through_cache = torch.is_grad_enabled() and (k4.requires_grad or v4.requires_grad)
        past_k, past_v = (kv_cache.keys, kv_cache.values) if grad_through_cache and past else (None, None)
        k_all, v_all = kv_cache.append(k4, v4)  # checks shapes first: a mismatch raises before any change
        if grad_through_cache and past:
            # The cache holds detached copies: attend over [past, new] with the new rows still in the graph.
            k_all, v_all = torch.cat([past_k, k4], dim=1), torch.cat([past_v, v4], dim=1)
        elif grad_through_cache:
            k_all, v_all = k4, v4
        try:
            return self._attend_and_project(q4, k_all, v_all, mask, causal, alibi)
        except BaseException:
            kv_cache.length = past  # a failure mid-way leaves the cache as it was
            raise

    def _rotary_tables(self, position_embeddings, position_ids, B, S, past, x):
        """(cos, sin) [B or 1, S, rotary_dim] in float32 (float64 for float64 layers), or None without RoPE.
        Checked here, before any hook runs or any state changes."""
        c = self.cfg
        if c.rotary_dim is None:
            for name, value in (("position_embeddings", position_embeddings), ("position_ids", position_ids)):
                if value is not None:
                    raise ValueError(f"{name}: this layer has no rotary embedding (rotary_dim is None), got {_describe(value)}")
            return None
        R = c.rotary_dim
        if position_embeddings is not None:
            if not (isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2):
                raise TypeError(
                    f"position_embeddings: expected a pair (cos, sin) of [B or 1, S, {R}] tensors, got "
                    f"{_describe(position_embeddings)}"
                )
            tables = []
            for name, t in zip(("cos", "sin"), position_embeddings):
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    raise TypeError(f"position_embeddings ({name}): expected a floating-point Tensor, got {_describe(t)}")
                if t.dim() == 2:
                    t = t.unsqueeze(0)
                if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != S or t.shape[2] != R:
                    raise ValueError(
                        f"position_embeddings ({name}): expected shape [B or 1, S, rotary_dim] = [{B} or 1, {S}, {R}], "
                        f"got {tuple(t.shape)}"
                    )
                if t.device != x.device:
                    raise ValueError(f"position_embeddings ({name}): expected device {x.device}, got {t.device}")
                tables.append(t)
            return tables[0], tables[1]
        if position_ids is None:
            positions = torch.arange(past, past + S, device=x.device).unsqueeze(0)
        else:
            if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point() or position_ids.is_complex() \
                    or position_ids.dtype == torch.bool:
                raise TypeError(f"position_ids: expected an integer Tensor [B or 1, S], got {_describe(position_ids)}")
            positions = position_ids.unsqueeze(0) if position_ids.dim() == 1 else position_ids
            if positions.dim() != 2 or positions.shape[0] not in (1, B) or positions.shape[1] != S:
                raise ValueError(f"position_ids: expected shape [B or 1, S] = [{B} or 1, {S}], got {tuple(position_ids.shape)}")
            if positions.device != x.device:
                raise ValueError(f"position_ids: expected device {x.device}, got {positions.device}")
        return rotary_tables(positions, R, c.rotary_base, interleaved=c.rotary_interleaved,
                             dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    def _prepare_alibi(self, alibi, attention_mask, B, K, x):
        """The per-key ALiBi bias [B or 1, H, K] for the op, or None. Checked before any state changes."""
        c = self.cfg
        H = c.n_heads
        if alibi is None:
            if not c.alibi:
                return None
            pad = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
            return alibi_bias(alibi_slopes(H, device=x.device), K, padding_mask=pad)
        if not c.alibi:
            raise ValueError(f"alibi: this layer has no ALiBi (alibi=False), got {_describe(alibi)}")
        if not isinstance(alibi, torch.Tensor) or not alibi.is_floating_point():
            raise TypeError(f"alibi: expected a floating-point Tensor [B, H, K], got {_describe(alibi)}")
        if alibi.device != x.device:
            raise ValueError(f"alibi: expected device {x.device}, got {alibi.device}")
        if alibi.dim() == 3 and alibi.shape[1] == 1 and alibi.shape[0] == B * H and alibi.shape[2] == K:
            return alibi.view(B, H, K)  # Hugging Face's [B*H, 1, K]
        if alibi.dim() == 4 and alibi.shape[2] == 1:
            alibi = alibi.squeeze(2)  # [B, H, 1, K]
        if alibi.dim() != 3 or alibi.shape[0] not in (1, B) or alibi.shape[1] not in (1, H) or alibi.shape[2] != K:
            raise ValueError(
                f"alibi: expected a per-key bias [B or 1, H or 1, K] = [{B}, {H}, {K}] (or [B*H, 1, K]), got "
                f"{tuple(alibi.shape)}"
            )
        return alibi

    def _check_input(self, x) -> None:
        D = self.cfg.d_model
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a Tensor [B, S, D={D}], got {_describe(x)}")
        if x.dim() != 3 or x.shape[-1] != D:
            raise ValueError(f"x: expected shape [B, S, D={D}], got {tuple(x.shape)}")
        w = self.qkv_weight
        if x.dtype != w.dtype or x.device != w.device:
            raise TypeError(f"x: expected {w.dtype} on {w.device} (the Bridge's weights), got {x.dtype} on {x.device}")

    def _prepare_mask(self, mask, B, S, K, device):
        """(mask for the op, causal). Validates shape, dtype and device before any state changes."""
        if mask is None:
            return None, True
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"attention_mask: expected a Tensor or None, got {_describe(mask)}")
        if mask.device != device:
            raise ValueError(f"attention_mask: expected device {device}, got {mask.device}")
        if mask.dim() == 2:
            if tuple(mask.shape) != (B, K):
                raise ValueError(
                    f"attention_mask: expected a padding mask [B, K] = [{B}, {K}] (K = cached + new positions), "
                    f"got {tuple(mask.shape)}"
                )
            if mask.is_complex():
                raise TypeError(f"attention_mask: expected bool, integer or float, got {mask.dtype}")
            return mask, True
        if mask.dim() == 4:
            H = self.cfg.n_heads
            if mask.shape[0] not in (1, B) or mask.shape[1] not in (1, H) or tuple(mask.shape[2:]) != (S, K):
                raise ValueError(
                    f"attention_mask: expected a 4-D mask [B or 1, 1 or H, S, K] = [{B}, 1 or {H}, {S}, {K}], "
                    f"got {tuple(mask.shape)}"
                )
            if mask.dtype == torch.bool:  # True = attend (Hugging Face's sdpa masks) -> additive
                mask = torch.zeros(mask.shape, dtype=torch.float32, device=device).masked_fill_(
                    ~mask, torch.finfo(torch.float32).min
                )
            elif not mask.is_floating_point():
                raise TypeError(f"attention_mask: expected a float additive or bool 4-D mask, got {mask.dtype}")
            return mask, False
        raise ValueError(
            f"attention_mask: expected None, a padding mask [B, K] or a 4-D mask [B, 1 or H, S, K], got "
            f"{mask.dim()}-D {tuple(mask.shape)}"
        )

    def _project_qkv(self, x):
        """Q, K, V in kernel layout: column blocks of one fused GEMM, unless a fork point is hooked."""
        c = self.cfg
        B, S, D = x.shape
        H, Hkv, Dh = c.n_heads, c.n_kv_heads, c.d_head
        forks = {}  # "q" / "k" / "v" -> per-head input [B, S, heads, D] chosen by a hooked fork point
        if c.use_attn_in and self._hooked("hook_attn_in"):
            # A real copy: a hook may edit one head's input in place, which a broadcast view cannot take.
            attn_in = self._fire("hook_attn_in", x.unsqueeze(2).expand(B, S, H, D).contiguous())
            forks = {"q": attn_in, "k": attn_in[:, :, :Hkv], "v": attn_in[:, :, :Hkv]}
        elif c.use_split_qkv_input:
            for kind, heads in (("q", H), ("k", Hkv), ("v", Hkv)):
                if self._hooked(f"hook_{kind}_input"):
                    forks[kind] = self._fire(f"hook_{kind}_input", x.unsqueeze(2).expand(B, S, heads, D).contiguous())

        out = {}
        if len(forks) < 3:
            # Unhooked fork points read the residual directly: the fused GEMM equals the per-head
            # projection of an H-fold copy of x, without making the copy.
            qkv = _linear(x, self.qkv_weight, self.qkv_bias)  # [B, S, (H + 2 Hkv) Dh]
            out = {"q": qkv[..., : H * Dh], "k": qkv[..., H * Dh : (H + Hkv) * Dh], "v": qkv[..., (H + Hkv) * Dh :]}
        if forks:
            for kind, per_head_in in forks.items():
                which = "qkv".index(kind)
                W = self._head_block(self.qkv_weight, which)
                b = None if self.qkv_bias is None else self._head_block(self.qkv_bias, which)
                out[kind] = ops.per_head_proj(per_head_in, W, b).flatten(2)
        return out["q"], out["k"], out["v"]

    def _attend_and_project(self, q4, k_all, v_all, mask, causal, alibi=None):
        c = self.cfg
        B, S, H, Dh = q4.shape
        dropout_p = c.attn_dropout if self.training else 0.0
        pattern_point = self._points["hook_pattern"]
        if self._hooked("hook_attn_scores"):
            score_dtype = torch.float32 if c.reorder_and_upcast_attn else q4.dtype
            scores = ops.attn_scores(q4, k_all, scale=c.scale, causal=causal, mask=mask, dtype=score_dtype, alibi=alibi)
            scores = self._fire("hook_attn_scores", scores)
            pattern = ops.attn_softmax(scores, dtype=v_all.dtype)
            if dropout_p:
                pattern = F.dropout(pattern, dropout_p, training=True)
            z = ops.attn_apply(self._fire("hook_pattern", pattern), v_all)
        elif pattern_point.fwd or pattern_point.bwd or dropout_p:
            # Under inference_mode the pattern is made as a normal tensor: inference tensors have no
            # version counter, and the counter is how an in-place edit by a hook is noticed.
            with torch.inference_mode(False):
                z, _, pattern = ops.attention(
                    q4, k_all, v_all, scale=c.scale, causal=causal, mask=mask, return_pattern=True, alibi=alibi
                )
            if dropout_p:
                pattern = F.dropout(pattern, dropout_p, training=True)
            version = pattern._version
            hooked = self._fire("hook_pattern", pattern)
            edited = not _same_view(hooked, pattern) or pattern._version != version
            if edited or dropout_p or pattern_point.bwd:
                # The pattern changed (or its gradient is watched): z must come from it.
                z = ops.attn_apply(hooked, v_all)
        else:
            z, _, _ = ops.attention(q4, k_all, v_all, scale=c.scale, causal=causal, mask=mask, alibi=alibi)

        z = self._fire("hook_z", z.reshape(B, S, H * Dh))
        if c.use_attn_result and self._hooked("hook_result"):
            result = ops.per_head_proj(z.view(B, S, H, Dh), self.W_O)  # [B, S, H, D] before b_O
            out = self._fire("hook_result", result).sum(dim=2)
            if self.out_bias is not None:
                out = out + self.out_bias
        else:
            out = _linear(z, self.out_weight, self.out_bias)
        if self.training and c.resid_dropout:
            out = F.dropout(out, c.resid_dropout, training=True)
        return self._fire("hook_out", out)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"n_heads={c.n_heads}, n_kv_heads={c.n_kv_heads}, d_head={c.d_head}, d_model={c.d_model}, "
            f"layout={c.layout!r}, scale={c.scale:.4g}"
        )


def rotary_tables(positions, rotary_dim: int, base: float = 10000.0, *, interleaved: bool = False,
                  dtype=torch.float32):
    """RoPE's (cos, sin) [B or 1, S, rotary_dim] for integer positions [B or 1, S]: angle = position * base^(-2i/R)
    for pair i, laid out for the rotation style (halves: [f0..f(R/2-1), f0..f(R/2-1)]; interleaved: f0 f0 f1 f1 ..).
    The frequencies are computed as GPT-NeoX and CodeGen compute theirs (float32 powers of the base)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=positions.device).float() / rotary_dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [B or 1, S, R/2]
    angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def alibi_slopes(n_heads: int, device=None) -> torch.Tensor:
    """ALiBi's per-head slopes [H] (Press et al.; the rule Bloom and Falcon use, including head counts that
    are not a power of two), float32 powers computed as Bloom computes them, so the bias matches bit for bit."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = torch.tensor(2.0 ** (-(2.0 ** -(math.log2(closest) - 3))), dtype=torch.float32, device=device)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32, device=device))
    if closest != n_heads:
        extra = torch.tensor(2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32, device=device)
        odd = torch.arange(1, 1 + 2 * min(closest, n_heads - closest), 2, dtype=torch.int32, device=device)
        slopes = torch.cat([slopes, torch.pow(extra, odd)])
    return slopes


def alibi_bias(slopes: torch.Tensor, K: int, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The per-key ALiBi bias [B or 1, H, K] = slope_h * position_k. Positions count only the attended keys
    of a 2-D padding mask [B, K] (as Bloom does: a left-padded row starts at 0), else they are 0 .. K-1."""
    if padding_mask is None:
        positions = torch.arange(K, device=slopes.device, dtype=torch.float32).unsqueeze(0)
    else:
        attend = (padding_mask != 0).to(torch.float32)
        positions = (attend.cumsum(-1) - 1) * attend
    return slopes.view(1, -1, 1) * positions.unsqueeze(1)


def _linear(x, weight_in_out, bias):
    """x [..., in] @ W [in, out] + b as one addmm over the flattened leading dims."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(x2, weight_in_out) if bias is None else torch.addmm(bias, x2, weight_in_out)
    return y.view(*x.shape[:-1], weight_in_out.shape[1])


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _alias_value(conversions: dict, canonical: str):
    for alias, target in HOOK_ALIASES.items():
        if target == canonical and alias in conversions:
            return conversions[alias]
    return None


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor {tuple(obj.shape)} {obj.dtype}"
    return type(obj).__name__
