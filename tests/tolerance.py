"""The one tolerance rule every numerical comparison with a reference uses (DESIGN.md, Testing).

FlashAttention's rule: a kernel may be at most twice as wrong as plain PyTorch in the same dtype,

    max |actual - ref_hi|  <=  2 * max |ref_lo - ref_hi|  +  atol(dtype)

where ref_hi is the reference run in float64 (the truth for these inputs) and ref_lo is the same
reference run in the dtype under test (`compute_dtype=dtype` for pyqkv.reference; the Oracle of
tests/test_bridge_oracle.py for a whole Bridge; the Hugging Face model itself for a model). It is applied
in max-norm over the whole tensor (not element by element): per element, ref_lo can be right by luck where
a correct kernel rounds the other way, while over a tensor the worst errors of two correct computations
are of the same size. So half precision needs no hand-tuned constants, and float32/float64 get a bound
near their own rounding.

atol only keeps the bound off zero when ref_lo happens to be exact (e.g. a tensor that is a copy of an
input): in float32 it is about 80 units in the last place of a value near 1, in the half types about a
hundredth of one. In float64 ref_lo is ref_hi, so atol is the whole bound there.

Three ways in, one rule:
    rule_check(actual, hi, lo, what)         -> (worst error, bound, failure message or None); for scripts
                                                that report every case instead of stopping at the first
    assert_close_by_rule(actual, hi, lo, what)  the same as an assertion
    assert_close(actual, Ref(hi, lo), what)     the same with the pair held in one value: an Oracle run, a
                                                Hugging Face run (hf_reference), or any hand-written
                                                formula run in both dtypes (by_hand(fn, dtype))
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-4,
    torch.float16: 1e-4,
}


def rule_check(actual, ref_hi, ref_lo, *, what: str = "output") -> tuple[float, float, str | None]:
    """(max |actual - ref_hi|, the rule's bound, None if the rule holds else a message naming the worst
    element). Non-finite entries of ref_hi (e.g. lse = -inf on a row with no visible key) must be matched
    exactly; a NaN in `actual` always fails; an empty tensor passes."""
    if not (actual.shape == ref_hi.shape == ref_lo.shape):
        return (
            float("nan"),
            float("nan"),
            (
                f"{what}: shapes differ: actual {tuple(actual.shape)}, reference {tuple(ref_hi.shape)}, "
                f"low-precision reference {tuple(ref_lo.shape)}"
            ),
        )
    atol = ATOL.get(actual.dtype, 1e-4)
    a, hi, lo = (t.detach().double().cpu() for t in (actual, ref_hi, ref_lo))
    if torch.isnan(a).any():
        return float("nan"), float("nan"), f"{what}: {int(torch.isnan(a).sum())} NaN entries"
    finite = torch.isfinite(hi)
    if not finite.all():
        bad = (a != hi) & ~finite
        if bad.any():
            return (
                float("inf"),
                float("nan"),
                (
                    f"{what}: {int(bad.sum())} entries where the reference is ±inf differ, first at "
                    f"{tuple(bad.nonzero()[0].tolist())}: got {a[bad][0].item()}, expected {hi[bad][0].item()}"
                ),
            )
        a, hi, lo = a[finite], hi[finite], lo[finite]
    if a.numel() == 0:
        return 0.0, atol, None
    err = (a - hi).abs()
    # ref_lo may overflow where ref_hi does not (e.g. a float32 mask value in bfloat16): such entries do
    # not set the bound.
    lo_err = (lo - hi).abs().nan_to_num(0.0, posinf=0.0)
    bound = 2 * lo_err.max().item() + atol
    worst = int(err.argmax())
    if err.max().item() <= bound:
        return err.max().item(), bound, None
    return (
        err.max().item(),
        bound,
        (
            f"{what}: max |actual - ref_fp64| = {err.max().item():.3e} > bound {bound:.3e} "
            f"(2 * max |ref_in_dtype - ref_fp64| = {2 * lo_err.max().item():.3e} + atol {atol:.0e}); "
            f"worst flat index {worst}: got {a.flatten()[worst].item()}, expected {hi.flatten()[worst].item()}"
        ),
    )


def assert_close_by_rule(actual, ref_hi, ref_lo, *, what: str = "output") -> None:
    """Assert `actual` satisfies the rule against (ref_hi, ref_lo); the message names the worst element."""
    _, _, failure = rule_check(actual, ref_hi, ref_lo, what=what)
    assert failure is None, failure


@dataclass(frozen=True)
class Ref:
    """A reference value for the rule: hi, the computation in float64; lo, the same computation in the
    dtype under test. Indexing indexes both (`ref[:, 4:]`, `ref[keep]`); map(fn) applies fn to both."""

    hi: torch.Tensor
    lo: torch.Tensor

    def __getitem__(self, index) -> Ref:
        return Ref(self.hi[index], self.lo[index])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Ref:
        return Ref(fn(self.hi), fn(self.lo))

    @property
    def shape(self) -> torch.Size:
        return self.hi.shape


def assert_close(actual, expected: Ref, what: str = "output") -> None:
    """The rule for `actual` against a Ref (an Oracle result, hf_reference, by_hand(fn, dtype))."""
    assert isinstance(expected, Ref), f"{what}: expected a tolerance.Ref (hi, lo), got {type(expected).__name__}"
    assert_close_by_rule(actual, expected.hi, expected.lo, what=what)


def by_hand(fn: Callable[[torch.dtype], torch.Tensor], dtype: torch.dtype) -> Ref:
    """A hand-written expectation under the rule: fn(compute_dtype) run in float64 and in `dtype`.

    expected = by_hand(lambda dt: z.to(dt).flatten(2) @ W_O.to(dt) + b_O.to(dt), out.dtype)
    """
    return Ref(fn(torch.float64), fn(dtype))


def differs(actual, expected: Ref) -> bool:
    """True when `actual` fails the rule against `expected`: for "this edit had an effect" checks."""
    return rule_check(actual, expected.hi, expected.lo)[2] is not None


def dtype_of(module: torch.nn.Module) -> torch.dtype:
    """The floating-point dtype of a module's parameters."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def hf_reference(model: torch.nn.Module, fn: Callable[[torch.nn.Module, torch.dtype], object]):
    """A Hugging Face model (or module) as the reference under the rule: lo = fn(model, its dtype), the
    model as it is (float32); hi = fn(copy, torch.float64) on a float64 deep copy. fn casts its float
    inputs to the dtype it is given (token ids need nothing):

        expected = hf_reference(model, lambda m, dt: m(ids, attention_mask=am).logits)
        expected = hf_reference(attn, lambda m, dt: m(x.to(dt), attention_mask=mask(dt))[0])

    fn may return a tensor (-> a Ref) or a tuple, list or dict of them (-> the same structure of Refs), so
    that one float64 run serves every comparison of a test:

        logits, pattern = hf_reference(model, lambda m, dt: (m(ids).logits, m(ids, output_attentions=True).attentions[0]))

    Call it before pyqkv.hf.attach (a deep copy of an attached model would copy the Bridges), or after
    pyqkv.hf.detach; hooks registered on the model (a forward pre-hook zeroing a head) are copied with it, so
    they must work in any dtype. Under torch.no_grad when the test does not need gradients; the copy is
    dropped afterwards.
    """
    lo = fn(model, dtype_of(model))
    twin = copy.deepcopy(model).to(torch.float64)
    if getattr(getattr(twin, "config", None), "_experts_implementation", None) not in (None, "eager"):
        # torch's grouped_mm (HF's default MoE experts) has no float64 kernel; "eager" loops over the
        # experts with plain matmuls: the same math
        twin.set_experts_implementation("eager")
    with float64_softmax():
        hi = fn(twin, torch.float64)
    return _refs(hi, lo)


@contextlib.contextmanager
def float64_softmax():
    """Inside (hf_reference's float64 run): a softmax asked for float32 of a float64 tensor is taken in
    float64, and a row with no finite score (every key -inf) gets equal weights instead of NaN.

    Hugging Face's eager attention takes softmax(scores, dtype=torch.float32), or softmax(scores.float())
    (MPT), an upcast for the half types but a downcast in the float64 twin: its finfo(float64).min mask
    entries become -inf there, a fully masked row (a left-padded query) NaN, and the next layer spreads that
    NaN to every row through the padded keys' values (weight 0 * NaN). In the model's own dtype such a row
    holds finfo.min everywhere and gets about equal weights: so does the twin's (it is a padded position,
    which no test compares). The float32 request is dropped so that the twin's pattern is float64-accurate;
    where HF casts to float32 by itself (.float(), the RMSNorm variance, the RoPE tables) the twin stays
    float32 there, so ref_hi is exact only up to float32 rounding at those steps, and the rule's bound stays
    float32's size."""
    originals = F.softmax, torch.softmax, torch.Tensor.softmax

    def keep(t, dtype):
        return None if dtype == torch.float32 and t.dtype == torch.float64 else dtype

    def patched(original, dtype_at):
        def softmax(input, *args, **kwargs):
            if "dtype" in kwargs:
                kwargs["dtype"] = keep(input, kwargs["dtype"])
            elif len(args) > dtype_at:
                args = (*args[:dtype_at], keep(input, args[dtype_at]), *args[dtype_at + 1 :])
            dim = kwargs.get("dim", args[0] if args else None)
            if input.is_floating_point() and isinstance(dim, int):
                dead = torch.isneginf(input).all(dim, keepdim=True)
                if dead.any():
                    input = input.masked_fill(dead, 0.0)
            return original(input, *args, **kwargs)

        return softmax

    # dtype's position after the input: F.softmax(input, dim, _stacklevel, dtype), torch.softmax(input, dim, dtype)
    F.softmax, torch.softmax, torch.Tensor.softmax = (
        patched(originals[0], 2),
        patched(originals[1], 1),
        patched(originals[2], 1),
    )
    try:
        yield
    finally:
        F.softmax, torch.softmax, torch.Tensor.softmax = originals


def _refs(hi, lo):
    """hi and lo, two results of the same structure (tensors in tuples, lists, dicts), as one of Refs."""
    if isinstance(hi, torch.Tensor):
        return Ref(hi, lo)
    if isinstance(hi, dict):
        return {k: _refs(hi[k], lo[k]) for k in hi}
    if isinstance(hi, (tuple, list)):
        assert len(hi) == len(lo), f"the float64 run returned {len(hi)} values, the other {len(lo)}"
        return type(hi)(_refs(h, low) for h, low in zip(hi, lo))
    raise TypeError(f"hf_reference: fn returned {type(hi).__name__}, expected tensors (in tuples, lists or dicts)")
