"""Shared helpers for the Bridge / hooks / Hugging Face tests (no tests here).

The oracle is a hand-written attention layer built from the ORIGINAL fused weights with
pyqkv.reference.split_qkv and pyqkv.reference.attention / attn_scores. It never looks at a Bridge, so a
Bridge compared with it cannot agree with itself by construction. It runs twice, in float64 and in the
Bridge's dtype, so that every comparison uses the one tolerance rule of tests/tolerance.py (ref_hi, ref_lo).
Every intermediate is returned in hook format under its hook name, and `edits` lets a test change one of
them the way a hook would.
"""

from __future__ import annotations

import torch
from tolerance import Ref

from pyqkv import reference

D, H, DH = 64, 4, 16  # the small default shape of these tests


def gpt2_config(**overrides):
    from transformers import GPT2Config

    kw = dict(
        n_embd=D,
        n_head=H,
        n_layer=2,
        vocab_size=100,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    kw.update(overrides)
    return GPT2Config(**kw)


def gpt2_attention(device="cpu", *, layer_idx=0, attn_implementation="eager", std=0.2, seed=1, **overrides):
    """A standalone GPT2Attention with random weights large enough that the pattern is far from uniform."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    cfg = gpt2_config(**overrides)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    module = GPT2Attention(cfg, layer_idx=layer_idx)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module.to(device).eval()


def causal_additive_mask(S, K=None, *, dtype=torch.float32, device="cpu"):
    """HF's 4-D causal mask [1, 1, S, K], bottom-right aligned: 0 visible, dtype min hidden."""
    K = S if K is None else K
    i = torch.arange(S, device=device).view(S, 1)
    j = torch.arange(K, device=device).view(1, K)
    m = torch.zeros(S, K, dtype=dtype, device=device).masked_fill(j > (K - S) + i, torch.finfo(dtype).min)
    return m.view(1, 1, S, K)


def padding_to_additive(pad, S, *, causal=True, dtype=torch.float32):
    """[B, K] 0/1 padding mask -> HF-style 4-D additive mask [B, 1, S, K] (causal included when asked)."""
    B, K = pad.shape
    vis = (pad != 0).view(B, 1, 1, K).expand(B, 1, S, K)
    if causal:
        i = torch.arange(S, device=pad.device).view(S, 1)
        j = torch.arange(K, device=pad.device).view(1, K)
        vis = vis & (j <= (K - S) + i)
    return torch.zeros(vis.shape, dtype=dtype, device=pad.device).masked_fill(~vis, torch.finfo(dtype).min)


class Oracle:
    """Attention from the original fused weights, with every intermediate in hook format, in float64 and
    in the dtype under test (`dtype`: the Bridge's, by default the dtype of the weights given).

    run(x, ...) returns {hook name: tolerance.Ref}: hi computed in float64, lo the same computation in
    `dtype` (the float64 weights cast), so that tolerance.assert_close(actual, oracle.run(x)[name], what)
    applies the one rule of tests/tolerance.py to a Bridge as to a kernel. oracle(x, ...) is the Ref of
    hook_out. run_in(dtype, x, ...) is one computation's plain tensors (differentiable, for gradients)."""

    def __init__(
        self,
        weight,
        bias,
        out_weight,
        out_bias,
        *,
        n_heads,
        n_kv_heads=None,
        d_head,
        layout="blocked",
        conv1d=True,
        scale=None,
        dtype=None,
    ):
        self.dtype = weight.dtype if dtype is None else dtype
        self.H = n_heads
        self.Hkv = n_heads if n_kv_heads is None else n_kv_heads
        self.Dh = d_head
        self.scale = d_head**-0.5 if scale is None else scale
        w = weight.detach().double()
        b = None if bias is None else bias.detach().double()
        W_Q, W_K, W_V, b_Q, b_K, b_V = reference.split_qkv(
            w, b, n_heads=n_heads, n_kv_heads=self.Hkv, d_head=d_head, layout=layout, conv1d=conv1d
        )
        zeros = lambda n: torch.zeros(n, d_head, dtype=torch.float64, device=w.device)  # noqa: E731
        self.W_Q, self.W_K, self.W_V = W_Q, W_K, W_V
        self.b_Q = zeros(self.H) if b_Q is None else b_Q
        self.b_K = zeros(self.Hkv) if b_K is None else b_K
        self.b_V = zeros(self.Hkv) if b_V is None else b_V
        ow = out_weight.detach().double()
        ow = ow if conv1d else ow.t()  # [H*Dh, D]
        self.D = ow.shape[1]
        self.W_O = ow.reshape(n_heads, d_head, self.D)
        self.b_O = (
            torch.zeros(self.D, dtype=torch.float64, device=w.device)
            if out_bias is None
            else out_bias.detach().double()
        )

    @classmethod
    def from_gpt2(cls, module):
        """GPT-2's scale rule written out by hand (not taken from the Bridge)."""
        Dh = module.head_dim
        scale = Dh**-0.5 if module.scale_attn_weights else 1.0
        if module.scale_attn_by_inverse_layer_idx:
            scale /= module.layer_idx + 1
        return cls(
            module.c_attn.weight,
            module.c_attn.bias,
            module.c_proj.weight,
            module.c_proj.bias,
            n_heads=module.num_heads,
            d_head=Dh,
            layout="blocked",
            conv1d=True,
            scale=scale,
        )

    def run(self, x, **kw) -> dict[str, Ref]:
        """{hook name: Ref(float64, self.dtype)}; the arguments are those of run_in. A Ref among them (e.g.
        past=(exp["hook_k"], exp["hook_v"]) from an earlier run) gives each computation its own side."""
        hi = self.run_in(torch.float64, x, **{k: _side(v, "hi") for k, v in kw.items()})
        lo = self.run_in(self.dtype, x, **{k: _side(v, "lo") for k, v in kw.items()})
        return {name: Ref(hi[name], lo[name]) for name in hi}

    def __call__(self, x, **kw) -> Ref:
        return self.run(x, **kw)["hook_out"]

    def run_in(self, dtype, x, *, mask=None, causal=True, past=None, edits=None, rotary=None, alibi=None):
        """Returns {hook name: tensor in hook format}, every step computed in `dtype` (the weights, x, past,
        rotary tables and biases cast to it; the mask's visibility is read from the mask as given).
        past: (k, v) [B, P, Hkv, Dh] of earlier calls. mask: as the Bridge takes it (4-D bool masks are
        turned into additive ones here). edits: {hook name: fn(tensor) -> tensor} applied where the Bridge's
        hook would fire (fn gets this computation's dtype). rotary: (cos, sin, interleaved), cos/sin
        [B or 1, S, R]: RoPE on Q and K after their hooks. alibi: a per-key bias [B or 1, H, K] added to the
        scaled scores."""
        edits = edits or {}
        ed = lambda name, t: edits[name](t) if name in edits else t  # noqa: E731
        cast = lambda t: t.to(dtype)  # noqa: E731
        W_Q, W_K, W_V, b_Q, b_K, b_V, W_O, b_O = map(
            cast, (self.W_Q, self.W_K, self.W_V, self.b_Q, self.b_K, self.b_V, self.W_O, self.b_O)
        )
        acts = {}
        x = ed("hook_in", cast(x))
        acts["hook_in"] = x
        q = ed("hook_q", torch.einsum("bsd,hde->bshe", x, W_Q) + b_Q)
        k = ed("hook_k", torch.einsum("bsd,hde->bshe", x, W_K) + b_K)
        v = ed("hook_v", torch.einsum("bsd,hde->bshe", x, W_V) + b_V)
        acts.update(hook_q=q, hook_k=k, hook_v=v)
        if rotary is not None:
            cos, sin, interleaved = rotary
            q = ed("hook_rot_q", rope(q, cos, sin, interleaved))
            k = ed("hook_rot_k", rope(k, cos, sin, interleaved))
            acts.update(hook_rot_q=q, hook_rot_k=k)
        if alibi is not None:
            B, S, K = x.shape[0], x.shape[1], (0 if past is None else past[0].shape[1]) + x.shape[1]
            bias = cast(alibi)[:, :, None, :].expand(B, self.H, S, K)
            vis = reference.visible_keys(B, self.H, S, K, causal=causal, mask=mask, device=x.device)
            if mask is not None and mask.dim() == 4 and mask.is_floating_point():
                bias = bias + cast(mask)
            mask, causal = bias.masked_fill(~vis, torch.finfo(dtype).min), False
        if past is not None:
            k_all, v_all = torch.cat([cast(past[0]), k], 1), torch.cat([cast(past[1]), v], 1)
        else:
            k_all, v_all = k, v
        acts["k_all"], acts["v_all"] = k_all, v_all
        if mask is not None and mask.dim() == 4 and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
                ~mask, torch.finfo(torch.float32).min
            )
        scores = reference.attn_scores(q, k_all, scale=self.scale, causal=causal, mask=mask, compute_dtype=dtype)
        acts["hook_attn_scores"] = scores
        if "hook_attn_scores" in edits:
            scores = edits["hook_attn_scores"](scores)
            pattern = softmax_zero_rows(scores)
        else:
            _, _, pattern = reference.attention(
                q, k_all, v_all, scale=self.scale, causal=causal, mask=mask, return_pattern=True, compute_dtype=dtype
            )
        pattern = ed("hook_pattern", pattern)
        acts["hook_pattern"] = pattern
        z = ed("hook_z", apply_pattern(pattern, v_all))
        acts["hook_z"] = z
        result = ed("hook_result", torch.einsum("bshe,hed->bshd", z, W_O))
        acts["hook_result"] = result
        acts["hook_out"] = ed("hook_out", result.sum(2) + b_O)
        return acts


def _side(value, which):
    """value with every Ref in it (also inside a tuple) replaced by its hi or lo tensor."""
    if isinstance(value, Ref):
        return getattr(value, which)
    if isinstance(value, tuple):
        return tuple(_side(v, which) for v in value)
    return value


def rope(x, cos, sin, interleaved):
    """RoPE on the first R = cos.shape[-1] features of x [B, S, n, Dh], written out (in x's dtype):
    rotate-half pairs feature i with i + R/2; interleaved pairs 2i with 2i + 1."""
    R = cos.shape[-1]
    c, s = cos.to(x.dtype)[:, :, None, :], sin.to(x.dtype)[:, :, None, :]
    xr = x[..., :R]
    if interleaved:
        partner = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
    else:
        partner = torch.cat((-xr[..., R // 2 :], xr[..., : R // 2]), dim=-1)
    return torch.cat((xr * c + partner * s, x[..., R:]), dim=-1)


def softmax_zero_rows(scores):
    """Softmax over the last dim where entries at or below half the dtype's minimum are hidden; a row with
    nothing visible is all zeros."""
    hidden = scores <= torch.finfo(scores.dtype).min / 2
    s = scores.masked_fill(hidden, float("-inf"))
    p = torch.softmax(s, -1)
    return p.nan_to_num(0.0)


def apply_pattern(pattern, v):
    """z [B, S, H, Dh] = pattern [B, H, S, K] · v [B, K, Hkv, Dh] with GQA by repetition (plain torch)."""
    H, Hkv = pattern.shape[1], v.shape[2]
    ve = v.to(pattern.dtype).repeat_interleave(H // Hkv, dim=2)
    return torch.einsum("bhsk,bkhd->bshd", pattern, ve)


def no_hooks_left(model) -> bool:
    return all(not p.fwd and not p.bwd for p in model.hook_points().values())
