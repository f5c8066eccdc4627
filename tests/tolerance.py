"""The one tolerance rule every numerical comparison with the reference uses (DESIGN.md, Testing).

FlashAttention's rule: a kernel may be at most twice as wrong as plain PyTorch in the same dtype,

    max |kernel - ref_hi|  <=  2 * max |ref_lo - ref_hi|  +  atol(dtype)

where ref_hi is pyqkv.reference run in float64 (the truth for these inputs) and ref_lo is the same
reference run in the inputs' own dtype (`compute_dtype=dtype`). It is applied in max-norm over the whole
tensor (not element by element): per element, ref_lo can be right by luck where a correct kernel rounds
the other way, while over a tensor the worst errors of two correct computations are of the same size.
So half precision needs no hand-tuned constants, and float32/float64 get a bound near their own rounding.

atol only keeps the bound off zero when ref_lo happens to be exact: it is far below one unit in the last
place of a value near 1 in every dtype, so it cannot hide a real error.
"""

from __future__ import annotations

import torch

ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-4,
    torch.float16: 1e-4,
}


def assert_close_by_rule(actual, ref_hi, ref_lo, *, what: str = "output", atol: float | None = None) -> None:
    """Assert `actual` satisfies the rule above against (ref_hi, ref_lo); report the worst element.

    Non-finite entries of ref_hi (e.g. lse = -inf on a row with no visible key) must be matched exactly;
    a NaN in `actual` always fails.
    """
    assert actual.shape == ref_hi.shape == ref_lo.shape, (
        f"{what}: shapes differ: actual {tuple(actual.shape)}, reference {tuple(ref_hi.shape)}, "
        f"low-precision reference {tuple(ref_lo.shape)}"
    )
    if atol is None:
        atol = ATOL.get(actual.dtype, 1e-4)
    a, hi, lo = (t.detach().double().cpu() for t in (actual, ref_hi, ref_lo))
    assert not torch.isnan(a).any(), f"{what}: {int(torch.isnan(a).sum())} NaN entries"
    finite = torch.isfinite(hi)
    if not finite.all():
        bad = (a != hi) & ~finite
        assert not bad.any(), (
            f"{what}: {int(bad.sum())} entries where the reference is ±inf differ, first at "
            f"{tuple(bad.nonzero()[0].tolist())}: got {a[bad][0].item()}, expected {hi[bad][0].item()}"
        )
        a, hi, lo = a[finite], hi[finite], lo[finite]
        if a.numel() == 0:
            return
    err = (a - hi).abs()
    # ref_lo may overflow where ref_hi does not (e.g. a float32 mask value in bfloat16): such entries do
    # not set the bound.
    lo_err = (lo - hi).abs().nan_to_num(0.0, posinf=0.0)
    bound = 2 * lo_err.max().item() + atol
    worst = int(err.argmax())
    assert err.max().item() <= bound, (
        f"{what}: max |actual - ref_fp64| = {err.max().item():.3e} > bound {bound:.3e} "
        f"(2 * max |ref_in_dtype - ref_fp64| = {2 * lo_err.max().item():.3e} + atol {atol:.0e}); "
        f"worst flat index {worst}: got {a.flatten()[worst].item()}, expected {hi.flatten()[worst].item()}"
    )
