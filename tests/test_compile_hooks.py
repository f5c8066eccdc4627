"""Hooks under torch.compile(fullgraph=True) on whole Hugging Face models: attached GPT-2, Llama, Gemma 2 and
Qwen3, and the attention-interface tier. fullgraph=True raises on any graph break, so a passing test is a
zero-break trace; a counting backend proves that the same hooks on new inputs reuse the graph and that a
change of hooks recompiles once. Results equal the eager model with the same hooks (which the HF tests
tie to Hugging Face). A hook Dynamo cannot trace falls back to eager through `compile` on the handle,
with one warning naming it.

Dynamo's "eager" backend: the graph Dynamo captured, run without lowering, so these tests check tracing
and guards in seconds; inductor's code generation is exercised by bench/compile_hooks.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_hf_families import FAMILIES

import pyqkv
from pyqkv import bench

transformers = pytest.importorskip("transformers")

BY_ID = {f.id: f for f in FAMILIES}
ATTACHED = ["gpt2", "llama3", "gemma2", "qwen3"]
L = 2  # layers of every test model


class CountingBackend:
    """A Dynamo backend that runs the captured graph as is and counts compilations."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


def _ids(seed, B=2, S=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (B, S), generator=g)


def _hooked(tier, fam_id):
    """(model, handle) for a family on a tier: "attach" (Bridges) or "interface" (attn_implementation)."""
    fam = BY_ID[fam_id]
    if tier == "attach":
        model = fam.make("cpu")
        return model, pyqkv.hf.attach(model)
    model = fam.make("cpu", impl="sdpa")
    return model, pyqkv.hf.enable(model)


CASES = [("attach", f) for f in ATTACHED] + [("interface", "llama3"), ("interface", "qwen3")]
# The interface tier sees Q after RoPE (and qk-norm) only: its query point is hook_rot_q.
CACHED = {"attach": ["hook_q", "hook_z", "hook_pattern"], "interface": ["hook_rot_q", "hook_z", "hook_pattern"]}


@pytest.mark.parametrize("tier,fam_id", CASES)
def test_run_with_cache_compiles_once_and_equals_eager(tier, fam_id):
    model, h = _hooked(tier, fam_id)
    names = [f"blocks.{layer}.attn.{p}" for layer in range(L) for p in CACHED[tier]]
    with torch.no_grad():
        eager = [h.run_with_cache(_ids(s), names_filter=names, use_cache=False) for s in (1, 2)]
        backend = CountingBackend()
        h.compile(fullgraph=True, backend=backend)
        compiled = [h.run_with_cache(_ids(s), names_filter=names, use_cache=False) for s in (1, 2)]
    assert backend.compiles == 1, "the same hooks on new inputs recompiled"
    for (out_e, cache_e), (out_c, cache_c) in zip(eager, compiled):
        assert sorted(cache_c.keys()) == sorted(names)
        torch.testing.assert_close(out_c, out_e)  # the logits (return_type="logits")
        for name in names:
            torch.testing.assert_close(cache_c[name], cache_e[name], msg=name)
    assert not torch.equal(compiled[0][1][names[0]], compiled[1][1][names[0]]), "a stale cache entry"


def _zero_head(head):
    def zero(z, hook):
        z[:, :, head] = 0

    return zero


def _rescale_last_row(pattern, hook):
    return pattern * torch.linspace(0.5, 1.5, pattern.shape[-1])


@pytest.mark.parametrize("tier,fam_id", CASES)
def test_editing_hooks_compile_and_equal_eager(tier, fam_id):
    """Zero a head at hook_z, rescale pattern rows, patch hook_z with a stored clean run (the classic
    activation-patching step), scale the residual stream at hook_resid_pre (a torch module hook, registered
    while the point is hooked): one graph per hook set, equal to eager with the same hooks."""
    model, h = _hooked(tier, fam_id)
    clean, corrupt = _ids(1), _ids(2)
    with torch.no_grad():
        _, clean_cache = h.run_with_cache(clean, names_filter="blocks.1.attn.hook_z", use_cache=False)

    def patch(z, hook):
        z[:, :, 1] = clean_cache["blocks.1.attn.hook_z"][:, :, 1]

    hook_sets = {
        "zero head": [("blocks.0.attn.hook_z", _zero_head(2))],
        "rescale pattern": [("blocks.1.attn.hook_pattern", _rescale_last_row)],
        "patch z": [("blocks.1.attn.hook_z", patch)],
        "halve resid_pre": [("blocks.1.hook_resid_pre", lambda resid, hook: resid * 0.5)],
    }
    with torch.no_grad():
        plain = model(corrupt, use_cache=False).logits
        eager = {k: h.run_with_hooks(corrupt, fwd_hooks=v, use_cache=False) for k, v in hook_sets.items()}
        backend = CountingBackend()
        h.compile(fullgraph=True, backend=backend)
        for round_ in range(2):  # the second round reuses the three graphs
            for key, hooks in hook_sets.items():
                out = h.run_with_hooks(corrupt, fwd_hooks=hooks, use_cache=False)
                torch.testing.assert_close(out, eager[key], msg=key)
                assert not torch.allclose(out, plain), f"{key}: the hook had no effect"
            assert backend.compiles == len(hook_sets), f"round {round_}: {backend.compiles} compilations"
        torch.testing.assert_close(model(corrupt, use_cache=False).logits, plain)  # hooks gone: no hook fires


def test_compiled_generate_with_a_hook_on_every_step():
    """Cached greedy generation through the compiled model with an ablation firing on every step equals
    eager generation with the same hook."""
    model, h = _hooked("attach", "llama3")
    ids = _ids(3, B=2, S=6)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    calls = []

    def ablate(z, hook):
        calls.append(z.shape[1])
        z[:, :, 0] = 0

    with torch.no_grad():
        with h.hooks(fwd_hooks=[("blocks.1.attn.hook_z", ablate)]):
            eager = model.generate(ids, **kw)
        plain = model.generate(ids, **kw)
        h.compile(fullgraph=True, backend="eager")
        with h.hooks(fwd_hooks=[("blocks.1.attn.hook_z", ablate)]):
            calls.clear()
            out = model.generate(ids, **kw)
    assert calls == [6, 1, 1, 1, 1], "the hook did not fire once on every step"
    assert out.sequences.tolist() == eager.sequences.tolist()
    for step, (a, b, p) in enumerate(zip(out.logits, eager.logits, plain.logits)):
        torch.testing.assert_close(a, b, msg=f"step {step}")
        assert not torch.allclose(a, p), f"step {step}: the ablation had no effect"


def _print_hook(z, hook):
    print("z norm", hook.name)


def test_untraceable_hook_falls_back_to_eager_with_one_warning(capsys):
    model, h = _hooked("attach", "gpt2")
    ids = _ids(4)
    with torch.no_grad():
        with h.hooks(fwd_hooks=[("blocks.0.attn.hook_z", _print_hook), ("blocks.1.attn.hook_z", _zero_head(1))]):
            eager = model(ids, use_cache=False).logits
        h.compile(fullgraph=True, backend="eager")
        with h.hooks(fwd_hooks=[("blocks.0.attn.hook_z", _print_hook), ("blocks.1.attn.hook_z", _zero_head(1))]):
            with pytest.warns(UserWarning, match=r"blocks\.0\.attn\.hook_z.*_print_hook.*eagerly") as record:
                first = model(ids, use_cache=False).logits
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # warned once: the second call says nothing
                second = model(ids, use_cache=False).logits
        assert len([w for w in record if "eagerly" in str(w.message)]) == 1
        torch.testing.assert_close(first, eager)
        torch.testing.assert_close(second, eager)
        assert capsys.readouterr().out.count("z norm blocks.0.attn.hook_z") >= 2, "the hook did not run"
        # Once it is removed the compiled graph is used again (a traceable hook set compiles).
        backend = CountingBackend()
        torch._dynamo.reset()
        h.compile(fullgraph=True, backend=backend)
        with h.hooks(fwd_hooks=[("blocks.1.attn.hook_z", _zero_head(1))]):
            model(ids, use_cache=False)
        assert backend.compiles == 1


def test_a_graph_break_outside_hooks_still_raises():
    """The fallback is for hooks only: a break elsewhere (here a model-level forward pre-hook that prints)
    is the caller's and propagates."""
    model, h = _hooked("attach", "gpt2")
    handle = model.transformer.register_forward_pre_hook(lambda m, args: print("pre"))
    try:
        h.compile(fullgraph=True, backend="eager")
        with pytest.raises(torch._dynamo.exc.Unsupported):
            model(_ids(5), use_cache=False)
    finally:
        handle.remove()


def test_compiled_bridge_with_hooks_recompiles_only_on_hook_change():
    torch.manual_seed(0)
    bridge = bench.LayerWeights.random(d_model=64, n_heads=4, d_head=16, device="cpu").bridge()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        bridge.add_hook("hook_z", _zero_head(0))
        eager = bridge(x)
        backend = CountingBackend()
        bridge.compile(fullgraph=True, backend=backend)
        torch.testing.assert_close(bridge(x), eager)
        bridge(torch.randn(2, 5, 64))
        assert backend.compiles == 1
        bridge.reset_hooks()
        bridge(x)
        assert backend.compiles == 2


@pytest.mark.parametrize("tier,fam_id", [("attach", "llama3"), ("attach", "gemma2"), ("interface", "qwen3")])
def test_compiled_static_cache_generate_with_a_hook_on_every_step(tier, fam_id):
    """generate with a StaticCache (what Hugging Face compiles by itself on a GPU) through the compiled model
    with a hook_z ablation on every step: fixed shapes, so one graph for the prefill and one for every decode
    step; tokens and logits equal eager generation with the same hook (Gemma 2: sliding and full layers)."""
    model, h = _hooked(tier, fam_id)
    ids = _ids(6, B=2, S=6)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    kw.update(return_dict_in_generate=True, output_logits=True)
    # A pure hook: one that appended to a Python list would be guarded on the list's length by Dynamo and
    # recompile on every call. The ablation's effect on every step's logits shows it fired on each.
    hooks = [("blocks.0.attn.hook_z", _zero_head(1))]
    with torch.no_grad():
        with h.hooks(fwd_hooks=hooks):
            eager = model.generate(ids, **kw)
        plain = model.generate(ids, **kw)
        backend = CountingBackend()
        h.compile(fullgraph=True, backend=backend)
        with h.hooks(fwd_hooks=hooks):
            out = model.generate(ids, **kw)
    assert backend.compiles == 2, f"{backend.compiles} compilations for a prefill and four same-shape steps"
    assert out.sequences.tolist() == eager.sequences.tolist()
    for step, (a, b, p) in enumerate(zip(out.logits, eager.logits, plain.logits)):
        torch.testing.assert_close(a, b, msg=f"step {step}")
        assert not torch.allclose(a, p), f"step {step}: the ablation had no effect"


@pytest.mark.parametrize("tier,fam_id", [("attach", "llama3"), ("interface", "llama3")])
def test_compiled_output_attentions_equal_eager(tier, fam_id):
    """Hugging Face's output_attentions under a compiled model: its collector is read from the plain attribute
    transformers keeps while compiling (Dynamo cannot trace ContextVar.get), so the patterns are recorded."""
    model, h = _hooked(tier, fam_id)
    ids = _ids(7)
    with torch.no_grad():
        eager = model(ids, use_cache=False, output_attentions=True).attentions
        h.compile(fullgraph=True, backend="eager")
        compiled = model(ids, use_cache=False, output_attentions=True).attentions
    assert len(compiled) == len(eager) == L
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
