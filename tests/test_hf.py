"""Hugging Face glue (pyqkv.hf): attach / detach on GPT-2 models built from small random configs (no
downloads), compared with the unattached HF model itself: logits, padded batches, cached greedy
generation, model-level hooks, cache keyword names, output_attentions, and that `import pyqkv` does not
import transformers."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from test_bridge_oracle import causal_additive_mask, gpt2_config, no_hooks_left
from tolerance import assert_close, differs, hf_reference

import pyqkv

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, GPT2LMHeadModel, GPT2Model  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention  # noqa: E402

IMPLS = ["eager", "sdpa"]


def make_model(device, cls=GPT2LMHeadModel, impl="eager", seed=0, **overrides):
    cfg = gpt2_config(initializer_range=0.2, **overrides)
    cfg._attn_implementation = impl
    torch.manual_seed(seed)
    return cls(cfg).to(device).eval()


def inputs(device, B=2, S=9, left_pad=(0, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (B, S), generator=g).to(device)
    am = torch.ones(B, S, dtype=torch.long, device=device)
    for b, n in enumerate(left_pad[:B]):
        am[b, :n] = 0
        ids[b, :n] = 0
    return ids, am


def bridges_of(model):
    return [m for m in model.modules() if isinstance(m, pyqkv.Bridge)]


def ablate_head_pre_hook(head, Dh=16):
    """HF-side oracle for a hook_z head ablation: zero the head's slice of c_proj's input (in the input's
    dtype: the hook is copied with the model into hf_reference's float64 twin)."""

    def pre(module, args):
        (z,) = args
        z = z.clone()
        z[..., head * Dh : (head + 1) * Dh] = 0
        return (z,)

    return pre


# ----------------------------------------------------------------------------------------------------
# attach / detach


@pytest.mark.parametrize("cls", [GPT2Model, GPT2LMHeadModel])
def test_attach_replaces_every_attention(device, cls):
    model = make_model(device, cls, n_layer=3)
    originals = [m for m in model.modules() if isinstance(m, GPT2Attention)]
    assert len(originals) == 3
    n_params = len(list(model.parameters()))
    h = pyqkv.hf.attach(model)
    assert not any(isinstance(m, GPT2Attention) for m in model.modules())
    found = bridges_of(model)
    assert len(found) == 3 and [id(b) for b in found] == [id(b) for b in h.bridges]
    # The Bridges hold the originals' own Parameters (no copy): the model has the same parameters as before.
    assert all(b.qkv_weight is o.c_attn.weight and b.out_weight is o.c_proj.weight for b, o in zip(found, originals))
    assert len(list(model.parameters())) == n_params
    with pytest.raises(ValueError, match="already attached"):
        pyqkv.hf.attach(model)
    pyqkv.hf.detach(model)
    assert [m for m in model.modules() if isinstance(m, GPT2Attention)] == originals
    assert not bridges_of(model)


def test_attach_leaves_cross_attention_to_hf(device):
    """GPT-2 with add_cross_attention: the self-attention modules become Bridges, the cross-attention
    ones stay Hugging Face's, and the logits still equal HF's."""
    model = make_model(device, add_cross_attention=True)
    ids, _ = inputs(device)
    enc = torch.randn(2, 4, 64, device=device)
    with torch.no_grad():
        want = hf_reference(model, lambda m, dt: m(ids, encoder_hidden_states=enc.to(dt)).logits)
    h = pyqkv.hf.attach(model)
    assert len(h.bridges) == 2 and len(bridges_of(model)) == 2
    assert all(type(blk.crossattention).__name__ == "GPT2Attention" for blk in model.transformer.h)
    with torch.no_grad():
        got = model(ids, encoder_hidden_states=enc).logits
    assert_close(got, want, "logits with cross-attention vs HF")


def test_attach_rejects_models_without_gpt2_attention(device):
    with pytest.raises(TypeError, match="GPT2Attention"):
        pyqkv.hf.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("cls", [GPT2LMHeadModel, GPT2Model])
def test_model_outputs_equal_hf(device, impl, padded, cls):
    model = make_model(device, cls, impl=impl)
    ids, am = inputs(device, left_pad=(0, 3) if padded else (0, 0))
    key = "logits" if cls is GPT2LMHeadModel else "last_hidden_state"
    with torch.no_grad():
        ref = hf_reference(model, lambda m, dt: m(ids, attention_mask=am)[key])
    h = pyqkv.hf.attach(model)
    with torch.no_grad():
        out = model(ids, attention_mask=am)
    assert not torch.isnan(out[key]).any(), "NaN in the attached model's output"
    keep = am.bool()
    assert_close(out[key][keep], ref[keep], f"{key} at non-padded positions vs HF {impl}")
    assert len(h.bridges) == 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padded", [False, True])
def test_cached_greedy_generation_identical(device, impl, padded):
    model = make_model(device, impl=impl)
    ids, am = inputs(device, left_pad=(0, 3) if padded else (0, 0))
    kw = dict(attention_mask=am, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        ref_nocache = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(ref, ref_nocache)
    pyqkv.hf.attach(model)
    with torch.no_grad():
        out = model.generate(ids, **kw)
        out_nocache = model.generate(ids, use_cache=False, **kw)
    assert out.tolist() == ref.tolist()
    assert out_nocache.tolist() == ref.tolist()


def test_beam_search_identical(device):
    """Beam search reorders HF's cache between steps: the attached layers must follow."""
    model = make_model(device)
    ids, am = inputs(device, left_pad=(0, 2))
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False, num_beams=3, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        pyqkv.hf.attach(model)
        out = model.generate(ids, **kw)
    assert out.tolist() == ref.tolist()


def test_continue_from_cache_filled_by_hf(device):
    """A DynamicCache prefilled by the original modules is picked up by the attached ones."""
    model = make_model(device)
    ids, _ = inputs(device, left_pad=(0, 0))
    nxt = torch.full((2, 1), 7, device=device)

    def hf(m, dt):
        """HF continuing its own cache at positions 6..8, and HF on the whole sequence at the last one."""
        own = DynamicCache()
        m(ids[:, :6], past_key_values=own, use_cache=True)
        return m(ids[:, 6:], past_key_values=own, use_cache=True).logits, m(torch.cat([ids, nxt], 1)).logits[:, -1:]

    with torch.no_grad():
        ref, full = hf_reference(model, hf)
        cache = DynamicCache()
        model(ids[:, :6], past_key_values=cache, use_cache=True)
        pyqkv.hf.attach(model)
        out = model(ids[:, 6:], past_key_values=cache, use_cache=True).logits
        assert cache.get_seq_length() == 9
        pyqkv.hf.detach(model)  # and back: HF continues from the cache the Bridges filled
        ref2 = model(nxt, past_key_values=cache, use_cache=True).logits
    assert_close(out, ref, "HF's cache continued by the attached model vs HF continuing it")
    assert_close(ref2, full, "HF continuing from the Bridges' cache vs HF on the whole sequence")


def test_generation_output_attentions(device):
    model = make_model(device)
    ids, am = inputs(device, left_pad=(0, 0))
    kw = dict(
        attention_mask=am,
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=0,
        output_attentions=True,
        return_dict_in_generate=True,
    )

    def hf(m, dt):
        got = m.generate(ids, **kw)
        return got.sequences, [list(step) for step in got.attentions]

    with torch.no_grad():
        sequences, ref = hf_reference(model, hf)
        pyqkv.hf.attach(model)
        out = model.generate(ids, **kw)
    assert out.sequences.tolist() == sequences.lo.tolist()
    assert [len(a) for a in out.attentions] == [len(a) for a in ref] == [2, 2, 2]
    for step, (step_out, step_ref) in enumerate(zip(out.attentions, ref)):
        for layer, (a, r) in enumerate(zip(step_out, step_ref)):
            assert_close(a, r, f"step {step} layer {layer} attentions vs HF's generate")


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_generation(device, padded):
    """A StaticCache: the Bridge attends over Hugging Face's own fixed-length buffers (written by HF's
    update) with HF's mask over them, as HF's eager attention does; greedy tokens and logits equal HF's."""
    model = make_model(device)
    ids, am = inputs(device, left_pad=(0, 3) if padded else (0, 0))
    kw = dict(attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    kw.update(return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        pyqkv.hf.attach(model)
        out = model.generate(ids, **kw)
    assert out.sequences.tolist() == ref.sequences.tolist()
    for step, (a, r) in enumerate(zip(out.logits, ref.logits)):
        torch.testing.assert_close(a, r, msg=f"step {step}")


def test_static_cache_step_that_fails_leaves_the_position_counter(device):
    """A failure after the keys went into a StaticCache layer (here a hook raising) steps HF's position counter
    back, so the failed call leaves the cache's length as it was."""
    from transformers import StaticCache

    model = make_model(device)
    ids, _ = inputs(device, left_pad=(0, 0))
    cache = StaticCache(config=model.config, max_cache_len=16)
    h = pyqkv.hf.attach(model)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        before = [layer.cumulative_length.clone() for layer in cache.layers]

        def fail(z, hook):
            raise RuntimeError("hook failed")

        with pytest.raises(RuntimeError, match="hook failed"), h.hooks(fwd_hooks=[("blocks.0.attn.hook_z", fail)]):
            model(ids[:, :1], past_key_values=cache)
    assert [layer.cumulative_length.item() for layer in cache.layers] == [t.item() for t in before]


def test_deepcopy_of_attached_model(device):
    model = make_model(device)
    ids, am = inputs(device)
    h = pyqkv.hf.attach(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        a = model(ids, attention_mask=am).logits
        b = clone(ids, attention_mask=am).logits
        assert torch.equal(a, b)
        h.bridges[0].out_weight.mul_(2)
        assert torch.equal(clone(ids, attention_mask=am).logits, b), "the copy shares weights with the original"


def test_generation_with_ablation_hook_matches_hf(device):
    """A head ablated through model-level hooks during cached generation equals HF with the same head
    zeroed by hand (a pre-hook on c_proj)."""
    model = make_model(device)
    ids, am = inputs(device, left_pad=(0, 2))
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    handle = model.transformer.h[1].attn.c_proj.register_forward_pre_hook(ablate_head_pre_hook(2))
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        ref_logits = hf_reference(model, lambda m, dt: m(ids, attention_mask=am).logits)
    handle.remove()
    h = pyqkv.hf.attach(model)

    def ablate(z, hook):
        z[:, :, 2] = 0

    with torch.no_grad(), h.hooks(fwd_hooks=[("blocks.1.attn.hook_z", ablate)]):
        out = model.generate(ids, **kw)
        logits = model(ids, attention_mask=am).logits
    assert no_hooks_left(h)
    keep = am.bool()
    assert_close(logits[keep], ref_logits[keep], "head 2 zeroed at hook_z vs HF with c_proj's head-2 input zeroed")
    assert out.tolist() == ref.tolist()
    with torch.no_grad():
        plain = model(ids, attention_mask=am).logits
    assert differs(plain[keep], ref_logits[keep]), "ablation had no effect"


def test_detach_restores_original_outputs(device):
    model = make_model(device)
    ids, am = inputs(device)
    with torch.no_grad():
        before = model(ids, attention_mask=am).logits
    originals = [blk.attn for blk in model.transformer.h]
    h = pyqkv.hf.attach(model)
    with torch.no_grad():
        model(ids, attention_mask=am)
        pyqkv.hf.detach(model)
        after = model(ids, attention_mask=am).logits
    assert [blk.attn for blk in model.transformer.h] == originals
    assert torch.equal(after, before)
    # weight edits made through the Bridge are carried back
    h = pyqkv.hf.attach(model)
    with torch.no_grad():
        h.bridges[0].out_weight.mul_(2.0)
        h.bridges[1].qkv_bias.add_(0.3)
        edited = model(ids, attention_mask=am).logits
        pyqkv.hf.detach(model)
        # HF with the weights written back (its float32 run is `restored`)
        restored = hf_reference(model, lambda m, dt: m(ids, attention_mask=am).logits)
    keep = am.bool()
    assert differs(before[keep], restored[keep]), "the edit had no effect"
    assert_close(edited[keep], restored[keep], "edited attached model vs HF with the weights written back on detach")


def test_detach_follows_dtype_and_mode_changes_made_while_attached(device):
    """model.to(...) / model.eval() while attached reach the Bridges; detach must restore originals that
    match (they sit outside the Module tree while attached)."""
    model = make_model(device, attn_pdrop=0.5, resid_pdrop=0.5).train()
    ids, am = inputs(device)
    pyqkv.hf.attach(model)
    model.to(torch.float64).eval()
    with torch.no_grad():
        attached = model(ids, attention_mask=am).logits
        pyqkv.hf.detach(model)
        attn = [blk.attn for blk in model.transformer.h]
        assert all(not a.training for a in attn), "a restored module is still in train() mode"
        assert all(p.dtype == torch.float64 and p.device == ids.device for a in attn for p in a.parameters())
        restored = hf_reference(model, lambda m, dt: m(ids, attention_mask=am).logits)  # float64: lo is hi
    keep = am.bool()
    assert_close(attached[keep], restored[keep], "attached float64 model vs HF restored after .to(float64).eval()")


# ----------------------------------------------------------------------------------------------------
# Model-level hooks


def test_model_level_run_with_cache(device):
    model = make_model(device)
    ids, am = inputs(device, left_pad=(0, 0))

    def hf(m, dt):
        ref = m(ids, output_attentions=True)
        return ref.logits, list(ref.attentions)

    with torch.no_grad():
        ref_logits, ref_attentions = hf_reference(model, hf)
    h = pyqkv.hf.attach(model)
    names = [
        "blocks.0.attn.hook_pattern",
        "blocks.1.attn.hook_pattern",
        "blocks.1.attn.hook_k",
        "blocks.0.attn.q.hook_out",
    ]
    out, cache = h.run_with_cache(ids, names_filter=names)
    assert set(cache) == set(names) | {"blocks.0.attn.hook_q"}
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, 4, 9, 9)
    assert cache["blocks.1.attn.hook_k"].shape == (2, 9, 4, 16)
    assert cache["blocks.0.attn.q.hook_out"].shape == (2, 9, 4, 16)
    for i in (0, 1):
        assert_close(
            cache[f"blocks.{i}.attn.hook_pattern"], ref_attentions[i], f"layer {i} hook_pattern vs HF's attentions"
        )
    assert_close(out, ref_logits, "logits of run_with_cache vs HF")
    assert no_hooks_left(h)
    _, cache = h.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_z"))
    assert set(cache) == {"blocks.0.attn.hook_z", "blocks.1.attn.hook_z"}
    _, everything = h.run_with_cache(ids)
    assert "blocks.1.attn.hook_out" in everything and "blocks.1.attn.hook_result" not in everything
    _, globbed = h.run_with_cache(ids, names_filter="blocks.*.attn.hook_pattern")
    assert set(globbed) == {"blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"}
    assert no_hooks_left(h)


def test_model_level_add_hook_names_and_errors(device):
    model = make_model(device)
    ids, _ = inputs(device)
    h = pyqkv.hf.attach(model)
    seen = []
    h.add_hook("blocks.1.attn.hook_pattern", lambda t, hook: seen.append((hook.name, tuple(t.shape))))
    h.add_hook("blocks.0.attn.o.hook_in", lambda t, hook: seen.append((hook.name, tuple(t.shape))))
    with torch.no_grad():
        model(ids)
    assert seen == [("blocks.0.attn.hook_z", (2, 9, 4, 16)), ("blocks.1.attn.hook_pattern", (2, 4, 9, 9))]
    h.reset_hooks()
    assert no_hooks_left(h)
    with pytest.raises(
        KeyError,
        match=r"unknown hook point 'blocks\.9\.attn\.hook_pattern'.*Valid names: blocks\.\{0-1\}\.attn\.<point> with <point> one of .*hook_pattern",
    ):
        h.add_hook("blocks.9.attn.hook_pattern", lambda t, hook: None)
    with pytest.raises(
        ValueError, match=r"^blocks\.0\.attn\.hook_result: this hook point does not fire: set use_attn_result first"
    ):
        h.add_hook("blocks.0.attn.hook_result", lambda t, hook: None)
    # a flag set later on one Bridge opens its gated point
    h.bridges[0].cfg.use_attn_result = True
    assert len(h.add_hook("blocks.0.attn.hook_result", lambda t, hook: None)) == 1
    h.reset_hooks()


def test_model_level_hooks_context_leaves_nothing(device):
    model = make_model(device)
    ids, am = inputs(device)
    h = pyqkv.hf.attach(model)
    with pytest.raises(RuntimeError, match="inside"):
        with h.hooks(
            fwd_hooks=[("blocks.0.attn.hook_z", lambda t, hook: None)],
            bwd_hooks=[("blocks.1.attn.hook_q", lambda g, hook: None)],
        ):
            model(ids, attention_mask=am)
            raise RuntimeError("inside")
    assert no_hooks_left(h)
    assert all(no_hooks_left(b) for b in h.bridges)


def test_attach_with_flags(device):
    model = make_model(device)
    ids, am = inputs(device)
    with torch.no_grad():
        ref = hf_reference(model, lambda m, dt: m(ids, attention_mask=am).logits)
    h = pyqkv.hf.attach(model, use_split_qkv_input=True, use_attn_result=True)
    assert all(b.cfg.use_split_qkv_input and b.cfg.use_attn_result for b in h.bridges)
    out, cache = h.run_with_cache(ids, attention_mask=am)
    assert cache["blocks.0.attn.hook_result"].shape == (2, 9, 4, 64)
    assert cache["blocks.1.attn.hook_k_input"].shape == (2, 9, 4, 64)
    keep = am.bool()
    assert_close(out[keep], ref[keep], "logits with all points hooked vs HF")


def test_bridge_level_cache_inside_attached_model(device):
    """A Bridge used on its own after attach keeps answering in its own names (aliases included)."""
    model = make_model(device)
    h = pyqkv.hf.attach(model)
    b = h.bridges[0]
    x = torch.randn(2, 5, 64, device=device)
    _, cache = b.run_with_cache(x, names_filter=["q.hook_out", "hook_pattern"])
    assert "q.hook_out" in cache and "hook_pattern" in cache, sorted(cache)


def test_model_level_backward_hook(device):
    model = make_model(device)
    ids, _ = inputs(device)
    h = pyqkv.hf.attach(model)
    grads = []
    with h.hooks(bwd_hooks=[("blocks.0.attn.hook_pattern", lambda g, hook: grads.append(g.shape))]):
        model(ids).logits.sum().backward()
    assert grads == [torch.Size([2, 4, 9, 9])]
    assert all(b.qkv_weight.grad is not None for b in h.bridges)


# ----------------------------------------------------------------------------------------------------
# An attached layer called directly: cache keyword names, output_attentions


@pytest.mark.parametrize("kwarg", ["past_key_values", "layer_past", "cache", "pyqkv"])
def test_layer_accepts_cache_under_every_name(device, kwarg):
    model = make_model(device)
    orig = model.transformer.h[1].attn
    x = torch.randn(2, 8, 64, device=device)
    steps = [(0, 5), (5, 6), (6, 8)]

    def hf(m, dt):
        """HF's own layer over the steps: each step's output, then its cache's keys and values."""
        cache = DynamicCache()
        outs = [
            m(
                x[:, a:b].to(dt).contiguous(),  # HF's Conv1D needs a viewable input
                past_key_values=cache,
                attention_mask=causal_additive_mask(b - a, b, dtype=dt, device=device),
            )[0]
            for a, b in steps
        ]
        return outs, cache.layers[1].keys, cache.layers[1].values

    with torch.no_grad():
        ref, ref_keys, ref_values = hf_reference(orig, hf)
    pyqkv.hf.attach(model)
    layer = model.transformer.h[1].attn
    assert layer.layer_idx == 1
    if kwarg == "pyqkv":
        ours, kw = pyqkv.KVCache(), "past_key_values"
    else:
        ours, kw = DynamicCache(), kwarg
    with torch.no_grad():
        for (a, b), expected in zip(steps, ref):
            mask = causal_additive_mask(b - a, b, device=device)
            out = layer(x[:, a:b].contiguous(), attention_mask=mask, **{kw: ours})[0]
            assert_close(out, expected, f"output with the cache under {kwarg}, positions {a}:{b} vs HF's layer")
    if kwarg == "pyqkv":
        assert ours.length == 8
    else:
        assert ours.get_seq_length(1) == 8, "the HF cache must see every position"
        assert_close(ours.layers[1].keys, ref_keys, "cached keys in HF layout vs HF's cache")
        assert_close(ours.layers[1].values, ref_values, "cached values vs HF's cache")


def test_layer_output_attentions(device):
    model = make_model(device)
    orig = model.transformer.h[0].attn
    x = torch.randn(2, 6, 64, device=device)
    with torch.no_grad():
        ref_out, ref_pat = hf_reference(
            orig, lambda m, dt: list(m(x.to(dt), attention_mask=causal_additive_mask(6, dtype=dt, device=device)))
        )
    pyqkv.hf.attach(model)
    layer = model.transformer.h[0].attn
    mask = causal_additive_mask(6, device=device)
    with torch.no_grad():
        out, pat = layer(x, attention_mask=mask, output_attentions=True)
        _, none = layer(x, attention_mask=mask)
    assert none is None
    assert pat.shape == (2, 4, 6, 6)
    assert_close(pat, ref_pat, "layer's returned pattern vs HF's")
    assert_close(out, ref_out, "layer output vs HF's")
    assert no_hooks_left(layer.bridge)


@pytest.mark.parametrize("asked_before_attach", [True, False])
def test_model_output_attentions(device, asked_before_attach):
    """model(..., output_attentions=True).attentions: one pattern per layer, as HF returns them, while
    attached and again after detach (whenever HF installed its recording hooks)."""
    model = make_model(device)
    ids, _ = inputs(device, left_pad=(0, 0))
    with torch.no_grad():
        # on a copy: asking the model itself would install HF's recording hooks before attach in both cases
        ref = hf_reference(copy.deepcopy(model), lambda m, dt: list(m(ids, output_attentions=True).attentions))
        if asked_before_attach:
            model(ids, output_attentions=True)
        h = pyqkv.hf.attach(model)
        got = model(ids, output_attentions=True).attentions
        plain = model(ids).attentions if hasattr(model(ids), "attentions") else None
        pyqkv.hf.detach(model)
        after = model(ids, output_attentions=True).attentions
    assert got is not None and len(got) == len(ref) == 2, f"attached model returned {len(got or ())} attentions"
    assert not plain, "attentions recorded although not asked for"
    for i in range(2):
        assert_close(got[i], ref[i], f"attentions[{i}] of the attached model vs HF's")
    assert after is not None and len(after) == 2, f"after detach: {len(after or ())} attentions"
    assert no_hooks_left(h)


def test_output_attentions_do_not_go_through_user_hooks_or_rules(device):
    """HF's attentions come from the Bridge's own return value: a user's conversion rule on hook_pattern
    changes what hooks see, never the [B, H, S, K] HF returns; a hook that edits the pattern is what the
    layer used, so HF returns the edited pattern."""
    model = make_model(device)
    ids, _ = inputs(device, left_pad=(0, 0))
    with torch.no_grad():
        ref = hf_reference(copy.deepcopy(model), lambda m, dt: list(m(ids, output_attentions=True).attentions))
        h = pyqkv.hf.attach(model, hook_conversions={"hook_pattern": "b h s k -> b s h k"})
        seen = []
        with h.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: seen.append(tuple(t.shape)))]):
            got = model(ids, output_attentions=True).attentions
        with h.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda t, hook: t.mul_(0.5))]):
            halved = model(ids, output_attentions=True).attentions
    B, S = ids.shape
    assert seen == [(B, S, 4, S)], f"the user's rule was not applied to what the hook sees: {seen}"
    for i in range(2):
        assert got[i].shape == ref[i].shape == (B, 4, S, S), f"attentions[{i}]: {tuple(got[i].shape)}"
        assert_close(got[i], ref[i], f"attentions[{i}] vs HF's")
    assert_close(halved[1], ref[1].map(lambda p: p * 0.5), "attentions[1] halved by a hook vs half of HF's")
    assert no_hooks_left(h)


def test_hooks_see_layer_and_ctx_in_a_model(device):
    """TransformerLens's HookPoint API inside a model: a hook written `fn(t, *, hook)` is called with
    hook=point; point.layer() is the block index; point.ctx persists across calls until reset_hooks."""
    model = make_model(device)
    ids, _ = inputs(device)
    h = pyqkv.hf.attach(model)
    layers = []

    def count(t, *, hook):
        layers.append(hook.layer())
        hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1

    with torch.no_grad(), h.hooks(fwd_hooks=[(lambda name: name.endswith("attn.hook_z"), count)]):
        model(ids)
        model(ids)
    assert layers == [0, 1, 0, 1]
    assert h.hook_points()["blocks.1.attn.hook_z"].ctx == {"calls": 2}
    h.reset_hooks()
    assert h.hook_points()["blocks.1.attn.hook_z"].ctx == {}


def test_handle_keeps_an_inline_model_alive(device):
    """`h = attach(build_model())`: the handle is the only reference to the model, which must live."""
    import gc

    h = pyqkv.hf.attach(make_model(device))
    gc.collect()
    ids, _ = inputs(device)
    with torch.no_grad():
        out, cache = h.run_with_cache(ids, names_filter=["blocks.0.attn.hook_pattern"])
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, 4, ids.shape[1], ids.shape[1])


# ----------------------------------------------------------------------------------------------------
# transformers stays optional


def test_import_pyqkv_does_not_import_transformers():
    code = "import pyqkv, sys; b = pyqkv.Bridge; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    # pyqkv.hf registers attn_implementation="pyqkv" with transformers, so it imports it (when installed).
    code = (
        "import pyqkv.hf; from transformers import AttentionInterface; "
        "assert 'pyqkv' in AttentionInterface._global_mapping, 'pyqkv.hf did not register pyqkv'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
