"""ActivationCache (pyqkv/activation_cache.py) and pyqkv.utils.get_act_name, as TransformerLens users use them
on attention: short keys and negative layers, get_act_name's table, stack_activation, remove_batch_dim,
to(), per-head outputs (stack_head_results, compute_head_results) against the attached model's own
attention output and a by-hand einsum, and the NotImplementedError of what pyqkv does not wrap.

Models: tiny random GPT-2 and Llama (GQA, rotary) from configs, float64, attached with pyqkv.hf.attach; the
attn_implementation="pyqkv" tier for its missing output projection. No downloads.

Notation: B batch, S positions, H query heads, Hkv key/value heads, Dh head dim, D model dim, L layers.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from test_bridge import plain_bridge, randx
from torch.testing import assert_close

import pyqkv
import pyqkv.activation_cache
import pyqkv.hooks
import pyqkv.utils
from pyqkv import ActivationCache, get_act_name

transformers = pytest.importorskip("transformers")
import pyqkv.hf  # noqa: E402  (registers attn_implementation="pyqkv")

L, H, HKV, D, DH, B, S = 2, 4, 2, 32, 8, 2, 5


def gpt2_model():
    cfg = transformers.GPT2Config(
        n_layer=L, n_embd=D, n_head=H, vocab_size=100, n_positions=32, attn_pdrop=0.0, resid_pdrop=0.0,
        embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def llama_model(attn_implementation="eager"):
    cfg = transformers.LlamaConfig(
        num_hidden_layers=L, hidden_size=D, num_attention_heads=H, num_key_value_heads=HKV, intermediate_size=64,
        vocab_size=100, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    return model.double().eval()


def hf_output_weights(model) -> list:
    """Each layer's W_O [H, Dh, D] read from the Hugging Face modules (before attaching): an oracle that
    does not go through pyqkv's head_output_weights."""
    if isinstance(model, transformers.GPT2LMHeadModel):  # Conv1D c_proj: weight [H*Dh, D]
        return [blk.attn.c_proj.weight.detach().clone().view(H, DH, D) for blk in model.transformer.h]
    return [layer.self_attn.o_proj.weight.detach().t().clone().view(H, DH, D) for layer in model.model.layers]


def lone_bridge():
    """(a Bridge alone, float64, its split weights: W_O [H, Dh, D], b_O [D], ...)."""
    bridge, _, split = plain_bridge("cpu", dtype=torch.float64)
    return bridge, split


def ids(batch=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 100, (batch, S), generator=g)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def run(request):
    """(hook handle, full cache of a batch of B, W_O per layer read from HF, family name)."""
    model = gpt2_model() if request.param == "gpt2" else llama_model()
    W_O = hf_output_weights(model)
    h = pyqkv.hf.attach(model)
    with torch.no_grad():
        _, cache = h.run_with_cache(ids())
    return h, cache, W_O, request.param


def fresh(cache: ActivationCache) -> ActivationCache:
    """A copy a test may change (the module-scoped cache stays as the forward made it)."""
    return ActivationCache(dict(cache), model=cache.model, has_batch_dim=cache.has_batch_dim)


# ----------------------------------------------------------------------------------------------------
# get_act_name


# TransformerLens's get_act_name (transformer_lens/utilities/components_utils.py) on these inputs, written
# out by hand; where pyqkv differs it says so.
GET_ACT_NAME = [
    (("pattern", 0), "blocks.0.attn.hook_pattern"),
    (("pattern", 0, "attn"), "blocks.0.attn.hook_pattern"),
    (("attn", 3), "blocks.3.attn.hook_pattern"),
    (("attn_scores", 1), "blocks.1.attn.hook_attn_scores"),
    (("attn_logits", 1), "blocks.1.attn.hook_attn_scores"),
    (("q", 0), "blocks.0.attn.hook_q"),
    (("query", 0), "blocks.0.attn.hook_q"),
    (("k", 6, "a"), "blocks.6.attn.hook_k"),
    (("key", 2), "blocks.2.attn.hook_k"),
    (("v", 2), "blocks.2.attn.hook_v"),
    (("value", 2), "blocks.2.attn.hook_v"),
    (("z", 3), "blocks.3.attn.hook_z"),
    (("z", 3, "mlp"), "blocks.3.attn.hook_z"),  # attention names ignore layer_type
    (("rot_q", 1), "blocks.1.attn.hook_rot_q"),
    (("rot_k", 1), "blocks.1.attn.hook_rot_k"),
    (("result", 0), "blocks.0.attn.hook_result"),
    (("z", "4"), "blocks.4.attn.hook_z"),  # a layer given as a string
    (("k6",), "blocks.6.attn.hook_k"),  # the compact form
    (("pattern11",), "blocks.11.attn.hook_pattern"),
    (("z",), "attn.hook_z"),  # no layer: no "blocks." prefix
    (("resid_pre", 2), "blocks.2.hook_resid_pre"),
    (("resid_mid", 2), "blocks.2.hook_resid_mid"),
    (("resid_post", 0), "blocks.0.hook_resid_post"),
    (("resid_pre", 2, "b"), "blocks.2.hook_resid_pre"),
    (("resid_pre", 2, "block"), "blocks.2.hook_resid_pre"),
    (("attn_out", 1), "blocks.1.hook_attn_out"),
    (("mlp_out", 1), "blocks.1.hook_mlp_out"),
    (("resid_post",), "hook_resid_post"),
    (("blocks.0.attn.hook_z",), "blocks.0.attn.hook_z"),  # a full name passes through
    (("hook_z",), "hook_z"),
    # pyqkv: the split inputs and attn_in are points of the attention (TransformerLens: blocks.{l}.hook_<x>)
    (("attn_in", 0), "blocks.0.attn.hook_attn_in"),
    (("q_input", 1), "blocks.1.attn.hook_q_input"),
    (("k_input", 1), "blocks.1.attn.hook_k_input"),
    (("v_input", 1), "blocks.1.attn.hook_v_input"),
]


@pytest.mark.parametrize("args,expected", GET_ACT_NAME, ids=[" ".join(map(str, a)) for a, _ in GET_ACT_NAME])
def test_get_act_name(args, expected):
    assert get_act_name(*args) == expected


def test_get_act_name_is_exported_as_in_transformer_lens():
    assert pyqkv.utils.get_act_name is get_act_name
    assert pyqkv.get_act_name is get_act_name
    assert pyqkv.hooks.ActivationCache is pyqkv.activation_cache.ActivationCache is ActivationCache


def test_get_act_name_errors():
    with pytest.raises(ValueError, match=r"unknown activation name 'pre'.*pattern.*resid_pre"):
        get_act_name("pre", 0)  # TransformerLens's MLP name: pyqkv has no MLP points
    with pytest.raises(ValueError, match=r"layer: expected a block index >= 0, got -1"):
        get_act_name("z", -1)
    with pytest.raises(ValueError, match=r"'blocks.0.attn.hook_z' is a full hook name.*layer=1"):
        get_act_name("blocks.0.attn.hook_z", 1)
    with pytest.raises(TypeError, match=r"name: expected a str.*got int"):
        get_act_name(3, 0)
    with pytest.raises(TypeError, match=r"layer: expected a block index \(an int\), got float"):
        get_act_name("z", 1.0)


# ----------------------------------------------------------------------------------------------------
# Keys


def test_run_with_cache_returns_a_cache_with_its_model(run):
    h, cache, _, _ = run
    assert type(cache) is ActivationCache and isinstance(cache, dict)
    assert cache.model is h and cache.has_batch_dim and cache.n_layers == L
    b, _ = lone_bridge()
    _, lone = b.run_with_cache(randx("cpu", dtype=torch.float64))
    assert lone.model is b and lone.n_layers == 1


def test_short_keys_are_the_full_keys(run):
    h, cache, _, family = run
    names = ["q", "k", "v", "z", "pattern", "attn_scores"] + (["rot_q", "rot_k"] if family == "llama" else [])
    for layer in range(L):
        for name in names:
            full = f"blocks.{layer}.attn.hook_{name}"
            assert cache[name, layer] is cache[full], (name, layer)
            assert cache[name, layer, "attn"] is cache[full], (name, layer)
            assert cache[name, layer - L] is cache[full], (name, layer - L)  # negative: from the end
        assert cache["attn", layer] is cache[f"blocks.{layer}.attn.hook_pattern"]
        # TransformerLens's attn_out: blocks.{l}.hook_attn_out, the same values as the attention's own hook_out
        assert cache["attn_out", layer] is cache[f"blocks.{layer}.hook_attn_out"]
        assert torch.equal(cache["attn_out", layer], cache[f"blocks.{layer}.attn.hook_out"])
        for name in ("resid_pre", "resid_post"):
            assert cache[name, layer] is cache[f"blocks.{layer}.hook_{name}"], (name, layer)
    assert cache["z", -1] is cache[f"blocks.{L - 1}.attn.hook_z"]
    assert cache[("pattern", 0)] is cache["pattern0"] is cache["blocks.0.attn.hook_pattern"]


def test_residual_keys_added_by_hand(run):
    _, cache, _, _ = run
    c = fresh(cache)
    resid = torch.randn(B, S, D)
    c["blocks.1.hook_resid_pre"] = resid
    assert c["resid_pre", 1] is resid and c["resid_pre", -1] is resid
    attn_out = torch.randn(B, S, D)
    c["blocks.0.hook_attn_out"] = attn_out  # TransformerLens's own name wins over pyqkv's
    assert c["attn_out", 0] is attn_out


def test_negative_layers_count_the_model_layers_not_the_cached_ones(run):
    h, _, _, _ = run
    with torch.no_grad():
        _, cache = h.run_with_cache(ids(), names_filter="blocks.0.attn.hook_z")
    assert cache["z", -L] is cache["blocks.0.attn.hook_z"]
    with pytest.raises(KeyError, match=rf"'blocks.{L - 1}.attn.hook_z' is not in the cache"):
        cache["z", -1]
    with pytest.raises(KeyError, match=rf"layer -{L + 1} is out of range for {L} layers"):
        cache["z", -L - 1]


def test_missing_and_bad_keys(run):
    _, cache, _, _ = run
    with pytest.raises(KeyError, match=r"'blocks.1.hook_resid_mid' is not in the cache.*cached: blocks.\{0-1\}"):
        cache["resid_mid", 1]  # pyqkv has no resid_mid (it does not split the block at its MLP)
    with pytest.raises(KeyError, match=r"hook_pattern"):  # the listing names the cached points
        cache["resid_mid", 1]
    with pytest.raises(KeyError, match=r"unknown activation name 'nope'"):
        cache["nope", 0]
    with pytest.raises(KeyError, match=r"'blocks.7.attn.hook_z' is not in the cache"):
        cache["blocks.7.attn.hook_z"]
    with pytest.raises(KeyError, match=r"the cache is empty"):
        ActivationCache()["z", 0]
    with pytest.raises(TypeError, match=r"key: expected a hook name \(str\) or a tuple.*length 4"):
        cache["z", 0, "attn", 1]
    with pytest.raises(TypeError, match=r"key: expected .* got int"):
        cache[3]


def test_a_lone_bridge_cache_answers_layer_zero():
    b, _ = lone_bridge()
    _, cache = b.run_with_cache(randx("cpu", dtype=torch.float64))
    assert cache["z", 0] is cache["hook_z"] and cache["z", -1] is cache["hook_z"] and cache["z"] is cache["hook_z"]
    assert cache["attn_out", 0] is cache["hook_out"]
    with pytest.raises(KeyError, match=r"layer 1 is out of range for 1 layers"):
        cache["z", 1]


# ----------------------------------------------------------------------------------------------------
# stack_activation, remove_batch_dim, to, apply_slice_to_batch_dim


def test_stack_activation(run):
    _, cache, _, _ = run
    stacked = cache.stack_activation("pattern")
    assert stacked.shape == (L, B, H, S, S)
    for layer in range(L):
        assert torch.equal(stacked[layer], cache[f"blocks.{layer}.attn.hook_pattern"])
    first = cache.stack_activation("z", layer=1)
    assert first.shape == (1, B, S, H, DH) and torch.equal(first[0], cache["blocks.0.attn.hook_z"])
    assert torch.equal(cache.stack_activation("k", None, "attn"), torch.stack([cache["k", i] for i in range(L)]))
    with pytest.raises(ValueError, match=r"layer: 0 stacks no layer"):
        cache.stack_activation("z", 0)
    with pytest.raises(ValueError, match=rf"layer: expected an int in \[0, {L}\].*got 3"):
        cache.stack_activation("z", 3)
    assert torch.equal(cache.stack_activation("resid_pre"), torch.stack([cache["resid_pre", i] for i in range(L)]))
    with pytest.raises(KeyError, match=r"'blocks.0.hook_resid_mid' is not in the cache"):
        cache.stack_activation("resid_mid")


def test_remove_batch_dim(run):
    h, _, _, _ = run
    with torch.no_grad():
        _, one = h.run_with_cache(ids(batch=1), names_filter=["blocks.0.attn.hook_z", "blocks.0.attn.o.hook_in"])
    before = {name: t.clone() for name, t in one.items()}
    assert one.remove_batch_dim() is one and one.has_batch_dim is False
    for name, t in one.items():
        assert torch.equal(t, before[name][0]), name
    assert one["blocks.0.attn.o.hook_in"] is one["blocks.0.attn.hook_z"]  # an alias stays the same tensor
    with pytest.warns(UserWarning, match=r"already removed"):
        assert one.remove_batch_dim() is one
    assert one["z", 0].shape == (S, H, DH)  # unchanged by the second call


def test_remove_batch_dim_needs_batch_size_one(run):
    _, cache, _, _ = run
    c = fresh(cache)
    with pytest.raises(ValueError, match=rf"remove_batch_dim: expected a batch size of 1.*hook_\w+ \({B}, "):
        c.remove_batch_dim()
    assert c.has_batch_dim and c["z", 0].shape == (B, S, H, DH)  # left as it was


def test_to_moves_every_tensor_and_returns_self(run):
    _, cache, _, _ = run
    c = fresh(cache)
    assert c.to("meta") is c
    assert {t.device.type for t in c.values()} == {"meta"} and set(c) == set(cache)
    same = fresh(cache).to(torch.device("cpu"))  # a torch.device too; where they are already: unchanged
    assert {t.device.type for t in same.values()} == {"cpu"}
    assert all(torch.equal(same[n], cache[n]) for n in cache)


def test_to_move_model(device):
    model = gpt2_model().to(device)
    h = pyqkv.hf.attach(model)
    with torch.no_grad():
        _, cache = h.run_with_cache(ids().to(device), names_filter="blocks.0.attn.hook_z")
    cache.to("meta", move_model=True)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.W_O.device.type for b in h.bridges} == {"meta"}
    with pytest.raises(ValueError, match=r"move_model: this cache has no model"):
        ActivationCache({"hook_z": torch.zeros(1)}).to("cpu", move_model=True)


def test_apply_slice_to_batch_dim(run):
    _, cache, _, _ = run
    row = cache.apply_slice_to_batch_dim(1)
    assert row.has_batch_dim is False and row.model is cache.model
    assert torch.equal(row["z", 0], cache["z", 0][1])
    kept = cache.apply_slice_to_batch_dim([1, 0])
    assert kept.has_batch_dim and torch.equal(kept["pattern", 1], cache["pattern", 1][[1, 0]])
    with pytest.raises(TypeError, match=r"batch_slice: expected .* got str"):
        cache.apply_slice_to_batch_dim("0")


def test_toggle_autodiff_sets_global_grad_mode():
    cache = ActivationCache()
    try:
        with pytest.warns(UserWarning, match=r"set autodiff to False"):
            cache.toggle_autodiff(False)
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)


def test_pickling_keeps_the_tensors_and_drops_the_model(run):
    """torch.save(cache) works whatever the model handle (the interface tier's holds a weak reference, which
    does not pickle); copy.copy keeps the model."""
    _, cache, _, _ = run
    one = cache.apply_slice_to_batch_dim(0)
    buffer = io.BytesIO()
    torch.save(one, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert type(loaded) is ActivationCache and loaded.model is None and loaded.has_batch_dim is False
    assert set(loaded) == set(one) and all(torch.equal(loaded[n], one[n]) for n in one)
    copied = copy.copy(one)
    assert copied.model is cache.model and copied.has_batch_dim is False and copied["z", 0] is one["z", 0]


def test_repr_is_short(run):
    _, cache, _, _ = run
    text = repr(cache)
    assert text.startswith("ActivationCache(")
    assert f"blocks.{{0-1}}.attn.hook_pattern: {(B, H, S, S)}" in text
    assert "blocks.0.attn.hook_pattern" not in text  # the layers are folded into one entry
    one = ActivationCache({"hook_z": torch.zeros(1, 2)})
    assert repr(one) == "ActivationCache(hook_z: (1, 2))"


# ----------------------------------------------------------------------------------------------------
# Per-head outputs


def test_stack_head_results_sum_is_the_attention_output(run):
    """Each layer's heads summed, plus b_O, are that layer's attention output hook_out [B, S, D]; each head
    equals z @ W_O by hand (W_O read from the Hugging Face module, not through pyqkv)."""
    h, cache, W_O, _ = run
    stack, labels = cache.stack_head_results(return_labels=True)
    assert stack.shape == (L * H, B, S, D)
    assert labels == [f"L{layer}H{head}" for layer in range(L) for head in range(H)]
    for layer in range(L):
        heads = stack[layer * H : (layer + 1) * H]
        out = heads.sum(dim=0) + h.bridges[layer].b_O.detach()
        assert_close(out, cache[f"blocks.{layer}.attn.hook_out"], msg=f"layer {layer}: heads + b_O vs hook_out")
        by_hand = torch.einsum("bshd,hdm->hbsm", cache[f"blocks.{layer}.attn.hook_z"], W_O[layer])
        assert_close(heads, by_hand, msg=f"layer {layer}: heads vs einsum")
    assert torch.equal(cache.stack_head_results(), stack)


def test_stack_head_results_layer_and_pos_slice(run):
    _, cache, _, _ = run
    full = cache.stack_head_results()
    first, labels = cache.stack_head_results(1, return_labels=True)
    assert torch.equal(first, full[:H]) and labels == [f"L0H{i}" for i in range(H)]
    empty, labels = cache.stack_head_results(0, return_labels=True)
    assert empty.shape == (0, B, S, D) and labels == []
    assert_close(cache.stack_head_results(pos_slice=-1), full[:, :, -1])  # an int removes the S dimension
    assert_close(cache.stack_head_results(pos_slice=(1, 3)), full[:, :, 1:3])  # TransformerLens's tuple
    assert_close(cache.stack_head_results(pos_slice=slice(0, None, 2)), full[:, :, 0::2])
    assert_close(cache.stack_head_results(pos_slice=[4, 0]), full[:, :, [4, 0]])
    assert_close(cache.stack_head_results(pos_slice=torch.tensor([2])), full[:, :, [2]])
    with pytest.raises(TypeError, match=r"pos_slice: expected None, an int, .* got str"):
        cache.stack_head_results(pos_slice="last")
    with pytest.raises(ValueError, match=rf"layer: expected an int in \[0, {L}\].*got 5"):
        cache.stack_head_results(5)


def test_stack_head_results_without_batch_dim(run):
    h, cache, _, _ = run
    with torch.no_grad():
        _, one = h.run_with_cache(ids(batch=1), names_filter=lambda n: n.endswith("hook_z"))
    batched = one.stack_head_results()
    one.remove_batch_dim()
    assert_close(one.stack_head_results(), batched[:, 0])
    assert_close(one.stack_head_results(pos_slice=0), batched[:, 0, 0])


def test_stack_head_results_remainder_from_hidden_states():
    """incl_remainder: resid_post of the last included layer minus the heads, TransformerLens's definition.
    With resid_post from GPT-2's output_hidden_states, the remainder of layer 0 is resid_pre + b_O + the MLP
    output (what is left of resid_post once the heads are taken out); the cached blocks.0.hook_resid_post is
    the same tensor."""
    model = gpt2_model()
    h = pyqkv.hf.attach(model)
    mlp_out = {}
    handle = model.transformer.h[0].mlp.register_forward_hook(lambda m, a, out: mlp_out.setdefault(0, out))
    try:
        with torch.no_grad():
            out, cache = h.run_with_cache(
                ids(), output_hidden_states=True, return_type="output", names_filter=lambda n: ".attn." in n
            )
            _, resid = h.run_with_cache(ids(), names_filter="blocks.0.hook_resid_post")
    finally:
        handle.remove()
    resid_pre, resid_post = out.hidden_states[0], out.hidden_states[1]  # the last one is after ln_f
    assert_close(resid["resid_post", 0], resid_post)
    with pytest.raises(KeyError, match=r"needs the residual stream 'blocks.0.hook_resid_post'"):
        cache.stack_head_results(1, incl_remainder=True)
    cache["blocks.0.hook_resid_post"] = resid_post
    stack, labels = cache.stack_head_results(1, incl_remainder=True, return_labels=True)
    assert stack.shape == (H + 1, B, S, D)
    assert labels == [f"L0H{i}" for i in range(H)] + ["remainder"]
    assert_close(stack[-1], resid_pre + h.bridges[0].b_O.detach() + mlp_out[0])
    sliced = cache.stack_head_results(1, incl_remainder=True, pos_slice=-1)
    assert_close(sliced, stack[:, :, -1])
    cache["blocks.0.hook_resid_pre"] = resid_pre  # before block 0 the remainder is the whole resid_pre
    nothing, labels = cache.stack_head_results(0, incl_remainder=True, return_labels=True)
    assert labels == ["remainder"] and torch.equal(nothing[0], resid_pre)


def test_stack_head_results_reads_a_cached_hook_result():
    """With use_attn_result the model's own per-head outputs are cached: stack_head_results uses them (an
    edit there shows), and they agree with z @ W_O."""
    h = pyqkv.hf.attach(gpt2_model(), use_attn_result=True)
    with torch.no_grad():
        _, cache = h.run_with_cache(ids())
    assert cache["result", 0].shape == (B, S, H, D)
    from_results = cache.stack_head_results()
    assert_close(from_results, torch.cat([cache["result", i].movedim(-2, 0) for i in range(L)]))
    from_z = ActivationCache({n: t for n, t in cache.items() if n.endswith("hook_z")}, model=h)
    assert_close(from_z.stack_head_results(), from_results)
    cache["blocks.1.attn.hook_result"] = torch.zeros_like(cache["result", 1])
    assert torch.equal(cache.stack_head_results()[H:], torch.zeros(H, B, S, D, dtype=torch.float64))


def test_compute_head_results(run):
    _, cache, W_O, _ = run
    c = fresh(cache)
    c.compute_head_results()
    for layer in range(L):
        by_hand = torch.einsum("bshd,hdm->bshm", c["z", layer], W_O[layer])
        assert_close(c[f"blocks.{layer}.attn.hook_result"], by_hand)
    with pytest.warns(UserWarning, match=r"already cached"):
        c.compute_head_results()


def test_stack_head_results_needs_hook_z(run):
    h, _, _, _ = run
    with torch.no_grad():
        _, cache = h.run_with_cache(ids(), names_filter=lambda n: n.endswith("hook_pattern"))
    with pytest.raises(KeyError, match=r"the cache has no 'blocks.0.attn.hook_z': run_with_cache must cache"):
        cache.stack_head_results()


def test_stack_head_results_apply_ln_is_not_implemented(run):
    _, cache, _, _ = run
    with pytest.raises(NotImplementedError, match=r"apply_ln=True\): needs the model's final LayerNorm"):
        cache.stack_head_results(apply_ln=True)


def test_stack_head_results_without_a_model():
    cache = ActivationCache({"blocks.0.attn.hook_z": torch.zeros(B, S, H, DH)})
    with pytest.raises(NotImplementedError, match=r"needs the output projection W_O of layer 0.*has no model"):
        cache.stack_head_results()


def test_stack_head_results_checks_the_z_shape(run):
    h, cache, _, _ = run
    c = ActivationCache({f"blocks.{i}.attn.hook_z": torch.zeros(B, S, H + 1, DH) for i in range(L)}, model=h)
    with pytest.raises(ValueError, match=rf"hook_z has shape \({B}, {S}, {H + 1}, {DH}\), expected \[B, S, H, Dh\]"):
        c.stack_head_results()


def test_a_lone_bridge_stacks_its_heads():
    b, split = lone_bridge()
    with torch.no_grad():
        _, cache = b.run_with_cache(randx("cpu", dtype=torch.float64))
    stack, labels = cache.stack_head_results(return_labels=True)
    assert labels == [f"L0H{i}" for i in range(b.cfg.n_heads)]
    assert_close(stack, torch.einsum("bshd,hdm->hbsm", cache["hook_z"], split["W_O"]))
    assert_close(stack.sum(0) + split["b_O"], cache["hook_out"])
    with pytest.raises(ValueError, match=r"layer: a lone Bridge is one layer, expected 0"):
        b.head_output_weights(1)


def test_interface_tier_has_no_output_projection():
    """The attn_implementation="pyqkv" tier caches hook_z (short keys work) but holds no W_O."""
    model = llama_model(attn_implementation="pyqkv")
    h = pyqkv.hf.hooks_for(model)
    with torch.no_grad():
        _, cache = h.run_with_cache(ids())
    assert cache.model is h and cache["z", -1] is cache[f"blocks.{L - 1}.attn.hook_z"]
    message = r"attn_implementation='pyqkv' tier does not hold the attention output projection.*pyqkv.hf.attach"
    with pytest.raises(NotImplementedError, match=message):
        cache.stack_head_results()
    with pytest.raises(NotImplementedError, match=message):
        copy.copy(cache).compute_head_results()
    buffer = io.BytesIO()
    torch.save(cache, buffer)  # the handle holds a weak reference to the model: pickling leaves it out
    assert torch.load(io.BytesIO(buffer.getvalue()), weights_only=False).keys() == cache.keys()


# ----------------------------------------------------------------------------------------------------
# What pyqkv does not wrap

UNSUPPORTED = [
    ("accumulated_resid", (), r"resid_mid \(between attention and MLP\) and the final LayerNorm"),
    ("decompose_resid", (), r"the embeddings \(hook_embed, hook_pos_embed\) and the MLP outputs"),
    ("logit_attrs", (torch.zeros(1, D), 0), r"the unembedding \(W_U\) and the final LayerNorm"),
    ("apply_ln_to_stack", (torch.zeros(1, D),), r"the LayerNorms and their scales"),
    ("get_neuron_results", (0,), r"the MLP neurons"),
    ("stack_neuron_results", (0,), r"the MLP neurons"),
    ("get_full_resid_decomposition", (), r"the embeddings, the MLP neurons"),
]


@pytest.mark.parametrize("method,args,missing", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_model_dependent_methods_raise_naming_what_is_missing(run, method, args, missing):
    _, cache, _, _ = run
    with pytest.raises(
        NotImplementedError, match=rf"ActivationCache.{method}: needs {missing}.*pyqkv hooks attention .* only"
    ):
        getattr(cache, method)(*args)


def test_every_transformer_lens_cache_method_exists():
    """TransformerLens's public ActivationCache methods (transformer_lens/ActivationCache.py): calling one
    never ends in AttributeError."""
    tl_methods = [
        "remove_batch_dim", "to", "toggle_autodiff", "keys", "values", "items", "apply_slice_to_batch_dim",
        "accumulated_resid", "logit_attrs", "decompose_resid", "compute_head_results", "stack_head_results",
        "stack_activation", "get_neuron_results", "stack_neuron_results", "apply_ln_to_stack",
        "get_full_resid_decomposition",
    ]  # fmt: skip
    missing = [m for m in tl_methods if not callable(getattr(ActivationCache, m, None))]
    assert missing == []
