"""The rotary op (RoPE) against the oracle (pyqkv.reference.rotary) and against Hugging Face's own
apply_rotary_pos_emb (GPT-NeoX: rotate-half, partial rotary; CodeGen: rotate-every-two), with opcheck,
float64 gradcheck (x, cos and sin) and a torch.compile(fullgraph=True) trace.

Notation: B batch, S positions, n heads, Dh head dim, R rotated features (even, R <= Dh).
"""

from __future__ import annotations

import dataclasses

import op_cases
import pytest
import torch
from conftest import DTYPES
from tolerance import assert_close_by_rule

from pyqkv import ops
from pyqkv import reference as ref

f64 = torch.float64


def rand(*shape, dtype=torch.float32, device="cpu"):
    """Standard normal values drawn on the CPU (identical on every device), then moved."""
    return torch.randn(*shape).to(device=device, dtype=dtype)


def head_views(B, S, n, Dh, *, dtype, device):
    """q and k [B, S, n, Dh] as the Bridge sees them: non-contiguous views of one fused projection.
    q comes from a blocked layout [all Q | all K | all V] (head stride Dh), k from an interleaved one
    (GPT-NeoX: per head [Q_h, K_h, V_h], head stride 3 Dh)."""
    fused = rand(B, S, 3 * n * Dh, dtype=dtype, device=device)
    q = fused[..., : n * Dh].unflatten(-1, (n, Dh))
    k = fused.unflatten(-1, (n, 3 * Dh))[..., Dh : 2 * Dh]
    assert not (q.is_contiguous() or k.is_contiguous())
    return q, k


def tables(kind, B, S, R, *, dtype, device):
    """Random cos and sin tables of the given kind. Random (not cos/sin of positions) so that a feature
    read from its partner's table entry shows up: real tables repeat each frequency twice and would hide it.
      b1         [1, S, R] in x's dtype (broadcast over the batch)
      per_batch  [B, S, R] in x's dtype
      fp32       [B, S, R] float32 whatever x's dtype (how Hugging Face computes them)
      2d         [S, R] float32 (the wrapper takes [S, R] as [1, S, R])
      strided    [B, S, R] float64, a non-contiguous view (every other feature of transposed storage)
    """
    if kind == "b1":
        return rand(1, S, R, dtype=dtype, device=device), rand(1, S, R, dtype=dtype, device=device)
    if kind == "per_batch":
        return rand(B, S, R, dtype=dtype, device=device), rand(B, S, R, dtype=dtype, device=device)
    if kind == "fp32":
        return rand(B, S, R, device=device), rand(B, S, R, device=device)
    if kind == "2d":
        return rand(S, R, device=device), rand(S, R, device=device)
    if kind == "strided":
        c, s = (rand(2 * R, S, B, dtype=f64, device=device).permute(2, 1, 0)[..., ::2] for _ in range(2))
        assert not c.is_contiguous() and c.shape == (B, S, R)
        return c, s
    raise AssertionError(kind)


def run_rotary(x, cos, sin, interleaved):
    """The op through its Python wrapper, called as op_cases calls a runner."""
    return ops.rotary(x, cos, sin, interleaved=interleaved)


ROTARY_CASES = op_cases.rotary_cases()
ROTARY_PARAMS = [pytest.param(c, d, id=f"{c.name}-{str(d)[6:]}") for c in ROTARY_CASES for d in c.dtypes]


def test_rotary_case_table_holds_each_case_once():
    names = [c.name for c in ROTARY_CASES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    keys = [dataclasses.replace(c, name="") for c in ROTARY_CASES]
    assert len(keys) == len(set(keys)), "two rows of the rotary table are the same case"


@pytest.mark.parametrize("case,dtype", ROTARY_PARAMS)
def test_rotary_matches_reference(case, dtype, device):
    """The one case table (tests/op_cases.py), which the GPU smoke test runs too: the rotated features by
    the tolerance rule, the rest exactly x's; a new contiguous tensor; x untouched."""
    ok, msg = op_cases.check_rotary_case(case, dtype, device, run_rotary)
    assert ok, msg


def test_rotary_takes_2d_tables_as_1_S_R(device):
    """The wrapper's [S, R] tables (the raw op takes 3-D ones) are [1, S, R]: the same result, bit for bit."""
    B, S, n, Dh, R = 3, 89, 1, 64, 32
    x, _ = head_views(B, S, n, Dh, dtype=torch.float32, device=device)
    cos, sin = tables("2d", B, S, R, dtype=torch.float32, device=device)
    for interleaved in (False, True):
        assert torch.equal(
            ops.rotary(x, cos, sin, interleaved=interleaved),
            ops.rotary(x, cos[None], sin[None], interleaved=interleaved),
        )


def test_rotary_empty(device):
    for shape in ((0, 3, 2, 8), (2, 0, 2, 8), (2, 3, 0, 8)):
        x = rand(*shape, device=device)
        cos, sin = rand(1, shape[1], 4, device=device), rand(1, shape[1], 4, device=device)
        out = ops.rotary(x, cos, sin)
        assert out.shape == shape and out.dtype == x.dtype


def test_rotary_is_a_rotation(device):
    """With real tables (cos/sin of angles) each rotated pair keeps its norm, and position 0 (angle 0)
    is the identity."""
    B, S, n, Dh = 2, 17, 4, 64
    x, _ = head_views(B, S, n, Dh, dtype=f64, device=device)
    # float64 angles (hf_tables computes them in float32, where cos^2 + sin^2 = 1 only to float32 rounding)
    angle = torch.arange(S, dtype=f64)[:, None] * 10000.0 ** (-torch.arange(0, Dh, 2, dtype=f64) / Dh)
    angle = torch.cat((angle, angle), -1).expand(B, S, Dh).to(device)
    cos, sin = angle.cos(), angle.sin()
    out = ops.rotary(x, cos, sin)
    h = Dh // 2
    norms = x[..., :h] ** 2 + x[..., h:] ** 2  # float64: the rule's ref_lo is ref_hi, its bound the atol
    assert_close_by_rule(out[..., :h] ** 2 + out[..., h:] ** 2, norms, norms, what="rotated pairs' norms")
    assert torch.equal(out[:, 0], x[:, 0]), "position 0 (cos 1, sin 0) must be the identity"


# --------------------------------------------------------------------------------------------------
# Hugging Face's own functions


def hf_tables(position_ids, R, *, interleaved, dtype, device, base=10000.0):
    """cos, sin [B, S, R] as Hugging Face's rotary embeddings make them (float32, then cast to the
    activations' dtype): frequencies base^(-2i/R); rotate-half tables repeat them as [f, f],
    rotate-every-two (CodeGen) as [f0, f0, f1, f1, ...]."""
    inv_freq = 1.0 / (base ** (torch.arange(0, R, 2, dtype=torch.int64).float() / R))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, S, R/2]
    emb = torch.repeat_interleave(freqs, 2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def assert_matches_hf(ours, hf, hi, *, what):
    """float32/float64: bit-identical to Hugging Face (same products, same sums). Half types: HF rounds
    after every step, the op once, so the tolerance rule with HF as the low-precision reference."""
    if ours.dtype in (torch.float32, torch.float64):
        assert torch.equal(ours, hf), f"{what}: max |ours - HF| = {(ours - hf).abs().max().item():.3e}"
    else:
        assert_close_by_rule(ours, hi, hf, what=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r_kind", ["full", "partial"])
def test_rotary_equals_gpt_neox_apply_rotary_pos_emb(r_kind, dtype, device):
    """GPT-NeoX / Pythia (partial rotary: rotary_pct), Llama, Phi-3, Falcon: rotate-half."""
    modeling = pytest.importorskip("transformers.models.gpt_neox.modeling_gpt_neox")
    B, S, n, Dh = 2, 17, 4, 64
    R = op_cases.ROTARY_WIDTHS[r_kind](Dh)
    q, k = head_views(B, S, n, Dh, dtype=dtype, device=device)
    position_ids = torch.arange(S).view(1, S) + torch.tensor([[0], [5]])  # a second row that starts later
    cos, sin = hf_tables(position_ids, R, interleaved=False, dtype=dtype, device=device)
    # HF's heads-first layout [B, n, S, Dh]; its tables broadcast over heads with unsqueeze_dim=1.
    q_hf, k_hf = modeling.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=1)
    for name, x, hf in (("q", q, q_hf.transpose(1, 2)), ("k", k, k_hf.transpose(1, 2))):
        ours = ops.rotary(x, cos, sin)
        assert_matches_hf(ours, hf, ref.rotary(x, cos, sin), what=f"gpt_neox {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r_kind", ["full", "partial"])
def test_rotary_equals_codegen_apply_rotary_pos_emb(r_kind, dtype, device):
    """CodeGen / GPT-J: rotate-every-two on the first rotary_dim features; HF passes half-width tables
    and repeat_interleaves them itself, the op takes them full width."""
    modeling = pytest.importorskip("transformers.models.codegen.modeling_codegen")
    B, S, n, Dh = 2, 17, 4, 64
    R = op_cases.ROTARY_WIDTHS[r_kind](Dh)
    q, _ = head_views(B, S, n, Dh, dtype=dtype, device=device)
    position_ids = torch.arange(S).view(1, S) + torch.tensor([[0], [3]])
    cos_full, sin_full = hf_tables(position_ids, R, interleaved=True, dtype=dtype, device=device)
    cos_half, sin_half = cos_full[..., ::2], sin_full[..., ::2]  # CodeGen's sincos tables [B, S, R/2]
    rot = modeling.apply_rotary_pos_emb(q[..., :R], sin_half, cos_half)  # note HF's (sin, cos) order
    hf = torch.cat((rot, q[..., R:]), dim=-1)
    ours = ops.rotary(q, cos_full, sin_full, interleaved=True)
    assert_matches_hf(ours, hf, ref.rotary(q, cos_full, sin_full, interleaved=True), what="codegen")


# --------------------------------------------------------------------------------------------------
# opcheck, gradcheck, torch.compile


STYLES = {"rotate_half": False, "every_two": True}


def _req(t):
    return t.detach().requires_grad_(True)


def opcheck_cases(device):
    B, S, n, Dh = 2, 5, 3, 8
    x, _ = head_views(B, S, n, Dh, dtype=f64, device=device)
    xh, _ = head_views(B, S, n, Dh, dtype=torch.bfloat16, device=device)

    def grad_tables(*shape):
        return _req(rand(*shape, dtype=f64, device=device)), _req(rand(*shape, dtype=f64, device=device))

    return {
        "f64-rotate_half-full-grad": (_req(x), *grad_tables(B, S, Dh), False),
        "f64-every_two-partial-b1-grad": (_req(x), *grad_tables(1, S, 4), True),
        "bf16-x-fp32-tables": (xh, rand(1, S, 6, device=device), rand(1, S, 6, device=device), False),
        "f32-strided-tables": (x.float(), *tables("strided", B, S, 4, dtype=f64, device=device), True),
    }


@pytest.mark.parametrize("case_id", list(opcheck_cases("cpu")))
def test_rotary_opcheck(case_id, device):
    torch.library.opcheck(torch.ops.pyqkv.rotary.default, opcheck_cases(device)[case_id])


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("table", ["b1", "per_batch"])
@pytest.mark.parametrize("R", [6, 4, 2])
def test_rotary_gradcheck(R, table, style, device):
    """Full Jacobian in float64 with respect to x (a strided view), cos and sin: partial and full R, a
    table broadcast over the batch (its gradient sums over the batch) and a per-batch one."""
    B, S, n, Dh = 2, 3, 2, 6
    x = _req(rand(B, n, S, Dh, dtype=f64, device=device))
    cos, sin = (_req(t) for t in tables(table, B, S, R, dtype=f64, device=device))
    fn = lambda x, c, s: ops.rotary(x.transpose(1, 2), c, s, interleaved=STYLES[style])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, cos, sin))


def test_rotary_gradcheck_2d_tables(device):
    """[S, R] tables through the wrapper: their gradient comes back [S, R]."""
    B, S, n, Dh, R = 2, 3, 2, 4, 4
    x = _req(rand(B, S, n, Dh, dtype=f64, device=device))
    cos, sin = _req(rand(S, R, dtype=f64, device=device)), _req(rand(S, R, dtype=f64, device=device))
    assert torch.autograd.gradcheck(lambda x, c, s: ops.rotary(x, c, s), (x, cos, sin))


def test_rotary_gradient_matches_reference(device):
    """bfloat16 x with float32 tables: the op's gradients equal autograd through the reference by the rule
    (ref_hi: through the reference in float64; ref_lo: through the reference computing in bfloat16)."""
    B, S, n, Dh, R = 2, 17, 4, 64, 32
    x = rand(B, S, n, Dh, dtype=torch.bfloat16, device=device)
    cos, sin = rand(1, S, R, device=device), rand(1, S, R, device=device)
    g = rand(B, S, n, Dh, dtype=torch.bfloat16, device=device)
    for interleaved in (False, True):
        ins = [_req(t) for t in (x, cos, sin)]
        got = torch.autograd.grad(ops.rotary(*ins, interleaved=interleaved), ins, g)
        ins64 = [_req(t.double()) for t in (x, cos, sin)]
        hi = torch.autograd.grad(ref.rotary(*ins64, interleaved=interleaved), ins64, g.double())
        ins_lo = [_req(t) for t in (x, cos, sin)]
        lo = torch.autograd.grad(ref.rotary(*ins_lo, interleaved=interleaved, compute_dtype=torch.bfloat16), ins_lo, g)
        for name, a, h, lw in zip(("x", "cos", "sin"), got, hi, lo):
            assert a.dtype == {"x": torch.bfloat16}.get(name, torch.float32) and a.shape == h.shape
            assert_close_by_rule(a, h, lw, what=f"d{name} (interleaved={interleaved})")


def test_rotary_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    B, S, n, Dh, R = 2, 9, 4, 16, 8
    fused = _req(rand(B, S, 3 * n * Dh, device=device))
    cos, sin = hf_tables(torch.arange(S).view(1, S), R, interleaved=False, dtype=torch.float32, device=device)

    def rope(fused, cos, sin):
        q = fused[..., : n * Dh].unflatten(-1, (n, Dh))
        k = fused[..., n * Dh : 2 * n * Dh].unflatten(-1, (n, Dh))
        return ops.rotary(q, cos, sin), ops.rotary(k, cos[0], sin[0], interleaved=True)

    graph_ops = []

    def recording_backend(gm, example_inputs):
        graph_ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(rope, backend=recording_backend, fullgraph=True)
    got, want = compiled(fused, cos, sin), rope(fused, cos, sin)
    for a, b in zip(got, want):
        assert torch.equal(a, b), "aot_eager runs the same kernel: bit for bit"
    assert any("pyqkv.rotary" in t for t in graph_ops), f"pyqkv.rotary is not in the traced graph: {graph_ops}"
    (g_c,) = torch.autograd.grad(sum(t.square().sum() for t in got), fused)
    (g_e,) = torch.autograd.grad(sum(t.square().sum() for t in want), fused)
    assert torch.equal(g_c, g_e), "compiled and eager backward differ"
