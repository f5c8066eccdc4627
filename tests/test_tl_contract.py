"""The TransformerLens user's contract (issue 20 items 1, 3, 4): run_with_cache / run_with_hooks with
TransformerLens's keywords (return_type, loss_per_token, remove_batch_dim, incl_bwd, names_filter, device),
TransformerLens keywords pyqkv does not implement refused by name, the residual-stream points
blocks.{i}.hook_resid_pre / hook_attn_out / hook_resid_post on both tiers (against Hugging Face's own
hidden states and against the same edit made by hand with a torch hook on HF's modules), and nothing silent
(a detached handle, enable on an attached model, attach on a model only the interface tier serves, the
interface tier's table from pyqkv/points.py).

Models: tiny random GPT-2, Llama (GQA), GPT-NeoX (parallel residual) and GPT-J (parallel residual) from
configs, float64, no downloads. Notation: B batch, S positions, H heads, D model dim, L layers, V vocab.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import pyqkv
import pyqkv.hooks
import pyqkv.points

transformers = pytest.importorskip("transformers")
import pyqkv.hf  # noqa: E402  (registers attn_implementation="pyqkv")
import pyqkv.hf.interface as hf_interface  # noqa: E402

L, H, D, V, B, S = 3, 4, 32, 100, 2, 6


def build(family: str, attn_implementation: str = "eager"):
    """A tiny random float64 causal LM of `family`, in eval mode."""
    common = dict(vocab_size=V, bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=L, n_embd=D, n_head=H, n_positions=32, **common)
    elif family == "llama":
        cfg = transformers.LlamaConfig(
            num_hidden_layers=L, hidden_size=D, num_attention_heads=H, num_key_value_heads=2, intermediate_size=64,
            max_position_embeddings=32, **common,
        )  # fmt: skip
    elif family == "neox":  # use_parallel_residual (the default): attention and MLP read the same input
        cfg = transformers.GPTNeoXConfig(
            num_hidden_layers=L, hidden_size=D, num_attention_heads=H, intermediate_size=64,
            max_position_embeddings=32, rotary_pct=0.5, **common,
        )  # fmt: skip
    elif family == "gptj":  # parallel residual, rotate-every-two RoPE
        cfg = transformers.GPTJConfig(n_layer=L, n_embd=D, n_head=H, rotary_dim=4, n_positions=32, **common)
    else:
        raise ValueError(family)
    for name in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout"):
        if hasattr(cfg, name):
            setattr(cfg, name, 0.0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    return model.double().eval()


# Where each family keeps its decoder blocks, each block's attention module, and the final norm HF applies
# to the last hidden state.
PATHS = {
    "gpt2": ("transformer.h", "attn", "transformer.ln_f"),
    "llama": ("model.layers", "self_attn", "model.norm"),
    "neox": ("gpt_neox.layers", "attention", "gpt_neox.final_layer_norm"),
    "gptj": ("transformer.h", "attn", "transformer.ln_f"),
}
FAMILIES = list(PATHS)


def blocks_of(model, family):
    return list(model.get_submodule(PATHS[family][0]))


def ids(batch=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (batch, S), generator=g)


def tl_loss(logits, tokens, attention_mask=None, per_token=False):
    """TransformerLens's lm_cross_entropy_loss, written out with F.cross_entropy: logits at t predict t + 1."""
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # [B, S-1]
    if attention_mask is None:
        return losses if per_token else losses.mean()
    counted = (attention_mask[:, :-1] * attention_mask[:, 1:]).to(losses.dtype)
    return losses * counted if per_token else (losses * counted).sum() / counted.sum()


def tier(family: str, kind: str):
    """(hook handle, the model under it, an untouched eager copy as the reference)."""
    if kind == "attach":
        model = build(family)
        reference = copy.deepcopy(model)
        return pyqkv.hf.attach(model), model, reference
    model = build(family, attn_implementation="pyqkv")
    reference = build(family)
    return pyqkv.hf.hooks_for(model), model, reference


# ----------------------------------------------------------------------------------------------------
# return_type, loss_per_token


@pytest.mark.parametrize("kind", ["attach", "interface"])
def test_return_types(kind):
    h, model, _ = tier("llama", kind)
    x = ids()
    am = torch.ones(B, S, dtype=torch.long)
    am[0, :2] = 0  # left padding in row 0
    with torch.no_grad():
        expected = model(x, attention_mask=am).logits
        logits, cache = h.run_with_cache(x, attention_mask=am, names_filter="blocks.0.attn.hook_z")
        assert isinstance(logits, torch.Tensor) and torch.equal(logits, expected)  # TransformerLens's default
        assert logits[:, -1].shape == (B, V)
        assert torch.equal(h.run_with_hooks(x, attention_mask=am), expected)
        loss = h.run_with_hooks(x, return_type="loss")
        assert loss.dim() == 0
        unmasked = model(x).logits
        assert_close(loss, tl_loss(unmasked, x))
        # with an attention mask, as TransformerLens: a prediction counts when both tokens are attended
        masked_loss = h.run_with_hooks(x, attention_mask=am, return_type="loss")
        assert_close(masked_loss, tl_loss(expected, x, am))
        per_token = h.run_with_hooks(x, attention_mask=am, return_type="loss", loss_per_token=True)
        assert per_token.shape == (B, S - 1)
        assert_close(per_token, tl_loss(expected, x, am, per_token=True))
        both, _ = h.run_with_cache(x, attention_mask=am, return_type="both", names_filter="blocks.0.attn.hook_z")
        assert torch.equal(both[0], expected) and torch.equal(both[1], masked_loss)
        nothing, cache = h.run_with_cache(x, return_type=None, names_filter="blocks.0.attn.hook_z")
        assert nothing is None and "blocks.0.attn.hook_z" in cache
        output = h.run_with_hooks(x, return_type="output")
        assert isinstance(output, transformers.modeling_outputs.CausalLMOutputWithPast)
        assert torch.equal(output.logits, unmasked)
        # loss from input_ids= as well as from the first argument
        assert_close(h.run_with_hooks(input_ids=x, return_type="loss"), loss)
    with pytest.raises(ValueError, match=r"return_type: expected one of 'logits', 'loss', 'both', None, 'output'"):
        h.run_with_hooks(x, return_type="logit")
    with pytest.raises(ValueError, match=r"loss_per_token=True: only with return_type 'loss' or 'both'"):
        h.run_with_cache(x, loss_per_token=True)
    with pytest.raises(ValueError, match=r"the loss is computed from the token ids.*expected input_ids \[B, S\]"):
        h.run_with_hooks(inputs_embeds=torch.randn(B, S, D, dtype=torch.float64), return_type="loss")


def test_a_model_without_logits_says_so():
    """A base model (no LM head): "logits" and "loss" raise naming what to pass instead; "output" works."""
    cfg = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=H, vocab_size=V, n_positions=32)
    torch.manual_seed(0)
    h = pyqkv.hf.attach(transformers.GPT2Model(cfg).double().eval())
    with pytest.raises(ValueError, match=r"return_type='logits': GPT2Model returned BaseModelOutputWith.*no logits"):
        h.run_with_cache(ids())
    with pytest.raises(ValueError, match=r"return_type='loss'.*pass return_type='output'"):
        h.run_with_hooks(ids(), return_type="loss")
    out, cache = h.run_with_cache(ids(), return_type="output", names_filter="blocks.0.hook_resid_post")
    assert out.last_hidden_state.shape == (B, S, D) and cache["resid_post", 0].shape == (B, S, D)


def test_bridge_return_types():
    """A lone Bridge returns its attention output [B, S, D]; it has no logits or loss to return."""
    h = pyqkv.hf.attach(build("gpt2"))
    bridge = h.bridges[0]
    x = torch.randn(1, S, D, dtype=torch.float64)
    with torch.no_grad():
        out, cache = bridge.run_with_cache(x, names_filter="hook_z", remove_batch_dim=True)
        assert torch.equal(out, bridge(x)) and cache["hook_z"].shape == (S, H, D // H)
        assert bridge.run_with_hooks(x, return_type=None) is None
    with pytest.raises(ValueError, match=r"return_type='logits': a Bridge is one attention layer"):
        bridge.run_with_cache(x, return_type="logits")
    with pytest.raises(ValueError, match=r"incl_bwd=True: .*must be a scalar: pass return_type='loss'"):
        bridge.run_with_cache(x, incl_bwd=True)


# ----------------------------------------------------------------------------------------------------
# remove_batch_dim, incl_bwd, device, names_filter


def test_remove_batch_dim():
    h, _, _ = tier("gpt2", "attach")
    with torch.no_grad():
        _, full = h.run_with_cache(ids(batch=1))
        logits, one = h.run_with_cache(ids(batch=1), remove_batch_dim=True)
    assert logits.shape == (1, S, V)  # the output keeps its batch dimension, as in TransformerLens
    assert not one.has_batch_dim and set(one) == set(full)
    for name, tensor in full.items():
        assert torch.equal(one[name], tensor[0]), name
    assert one["pattern", 0].shape == (H, S, S) and one["resid_pre", 1].shape == (S, D)
    with pytest.raises(ValueError, match=r"remove_batch_dim=True: blocks.0.hook_resid_pre has shape \(2, 6, 32\)"):
        h.run_with_cache(ids(batch=2), remove_batch_dim=True)


@pytest.mark.parametrize("kind", ["attach", "interface"])
def test_incl_bwd_caches_the_gradients_of_the_loss(kind):
    """incl_bwd: run_with_cache calls backward on the loss (as TransformerLens) and caches `<name>_grad`;
    the gradient of block 1's input equals the one HF's own model gives for TransformerLens's loss."""
    h, model, reference = tier("gpt2", kind)
    x = ids()
    names = ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"]
    loss, cache = h.run_with_cache(x, return_type="loss", incl_bwd=True, names_filter=names)
    assert set(cache) == set(names) | {n + "_grad" for n in names}
    assert cache["blocks.1.attn.hook_z_grad"].shape == cache["blocks.1.attn.hook_z"].shape == (B, S, H, D // H)

    seen = {}

    def keep_input(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden.retain_grad()
        seen["resid_pre"] = hidden

    handle = blocks_of(reference, "gpt2")[1].register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        ref_loss = tl_loss(reference(x).logits, x)
        ref_loss.backward()
    finally:
        handle.remove()
    assert_close(loss.detach(), ref_loss.detach())
    assert_close(cache["blocks.1.hook_resid_pre_grad"], seen["resid_pre"].grad)
    assert_close(cache["blocks.1.hook_resid_pre"], seen["resid_pre"].detach())
    with pytest.raises(ValueError, match=r"incl_bwd=True: .*pass return_type='loss' \(got return_type='logits'\)"):
        h.run_with_cache(x, incl_bwd=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"incl_bwd=True: the loss does not require grad"):
        h.run_with_cache(x, return_type="loss", incl_bwd=True)
    assert not any(p.active for p in h.hook_points().values())


def test_device_moves_the_cached_tensors():
    h, _, _ = tier("gpt2", "attach")
    with torch.no_grad():
        logits, cache = h.run_with_cache(ids(), device="meta", names_filter="blocks.0.attn.hook_pattern")
    assert logits.device.type == "cpu" and cache["pattern", 0].device.type == "meta"


def test_names_filter_in_every_form():
    h, _, _ = tier("gpt2", "attach")
    with torch.no_grad():
        forms = {
            "str": h.run_with_cache(ids(), names_filter="blocks.1.hook_resid_post")[1],
            "list": h.run_with_cache(ids(), names_filter=["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"])[1],
            "glob": h.run_with_cache(ids(), names_filter="blocks.*.hook_resid_*")[1],
            "predicate": h.run_with_cache(ids(), names_filter=lambda n: n.endswith("hook_attn_out"))[1],
            "None": h.run_with_cache(ids())[1],
        }
    assert set(forms["str"]) == {"blocks.1.hook_resid_post"}
    assert set(forms["list"]) == {"blocks.1.hook_resid_post", "blocks.0.attn.hook_z"}
    assert set(forms["glob"]) == {f"blocks.{i}.hook_resid_{w}" for i in range(L) for w in ("pre", "post")}
    assert set(forms["predicate"]) == {f"blocks.{i}.hook_attn_out" for i in range(L)}
    assert set(forms["None"]) >= set(forms["glob"]) | set(forms["predicate"]) | {"blocks.2.attn.hook_pattern"}
    with pytest.warns(UserWarning, match=r"selects no hook point"):
        h.run_with_cache(ids(), names_filter="blocks.*.hook_mlp_out")


# ----------------------------------------------------------------------------------------------------
# TransformerLens keywords pyqkv does not implement


# TransformerLens's keywords (HookedTransformer.forward, HookedRootModule.run_with_cache / run_with_hooks)
# that pyqkv does not implement, read from TransformerLens's signatures.
TL_UNIMPLEMENTED = [
    "prepend_bos", "padding_side", "tokens", "start_at_layer", "stop_at_layer", "shortformer_pos_embed",
    "past_kv_cache", "pos_slice", "clear_contexts", "return_cache_object", "reset_hooks_end",
]  # fmt: skip


def test_the_refused_keywords_are_one_list():
    assert set(pyqkv.hooks.TL_NOT_IMPLEMENTED) == set(TL_UNIMPLEMENTED)


@pytest.mark.parametrize("keyword", TL_UNIMPLEMENTED)
@pytest.mark.parametrize("kind", ["attach", "interface"])
def test_transformer_lens_keywords_are_refused_by_name(keyword, kind):
    """Never passed on: Hugging Face models take **kwargs and would drop them without a word."""
    h, model, _ = tier("gpt2", kind)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    value = True
    message = rf"{keyword} is a TransformerLens keyword that pyqkv does not implement"
    with pytest.raises(TypeError, match=rf"run_with_cache: {message}"):
        h.run_with_cache(ids(), **{keyword: value})
    if keyword != "reset_hooks_end":  # run_with_hooks's own keyword (it removes only the hooks it added)
        with pytest.raises(TypeError, match=rf"run_with_hooks: {message}"):
            h.run_with_hooks(ids(), **{keyword: value})
    with pytest.raises(TypeError, match=rf"\(\.\.\.\): {message}"):
        h(ids(), **{keyword: value})
    assert not calls and not any(p.active for p in h.hook_points().values())


def test_calling_the_handle_refuses_run_with_cache_keywords():
    h, _, _ = tier("gpt2", "attach")
    for keyword in ("return_type", "remove_batch_dim", "incl_bwd", "names_filter"):
        with pytest.raises(TypeError, match=rf"{keyword} is a keyword of run_with_cache / run_with_hooks"):
            h(ids(), **{keyword: "loss"})


# ----------------------------------------------------------------------------------------------------
# The residual-stream points


def hf_activations(reference, family, x):
    """(hidden_states, each block's attention output) of HF's own model, the attention output read with a
    torch forward hook on HF's attention module."""
    attn_out = {}

    def keep(i):
        def hook(module, args, out):  # returns None: reads only
            attn_out[i] = out[0] if isinstance(out, tuple) else out

        return hook

    handles = [
        getattr(block, PATHS[family][1]).register_forward_hook(keep(i))
        for i, block in enumerate(blocks_of(reference, family))
    ]
    try:
        with torch.no_grad():
            hidden = reference(x, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    return hidden, attn_out


CASES = [(f, "attach") for f in FAMILIES] + [("llama", "interface"), ("gpt2", "interface"), ("neox", "interface")]


@pytest.mark.parametrize("family,kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_residual_points_are_hf_hidden_states(family, kind):
    h, model, reference = tier(family, kind)
    x = ids()
    hidden, attn_out = hf_activations(reference, family, x)
    with torch.no_grad():
        _, cache = h.run_with_cache(
            x, names_filter=lambda n: n.split(".")[-1].startswith(("hook_resid", "hook_attn_out"))
        )
    assert len(hidden) == L + 1
    for i in range(L):
        assert cache["resid_pre", i].shape == (B, S, D)
        assert_close(cache["resid_pre", i], hidden[i], msg=f"{family} {kind}: resid_pre {i} vs hidden_states[{i}]")
        assert_close(cache["attn_out", i], attn_out[i], msg=f"{family} {kind}: attn_out {i} vs HF's attention")
        if i < L - 1:
            assert_close(cache["resid_post", i], hidden[i + 1], msg=f"{family} {kind}: resid_post {i}")
    # HF applies the final norm to the last hidden state: resid_post of the last block is before it
    final_norm = reference.get_submodule(PATHS[family][2])
    with torch.no_grad():
        assert_close(final_norm(cache["resid_post", L - 1]), hidden[L], msg=f"{family} {kind}: final resid_post")
    assert_close(cache.stack_activation("resid_pre"), torch.stack(hidden[:L]))


def by_hand_on_hf(reference, x, module, edit, pre: bool):
    """HF's logits with `edit` applied by a plain torch hook on one of its modules: to the block's input
    (a forward pre-hook, pre=True) or to the module's output (a forward hook; first element of a tuple)."""
    if pre:

        def hook(m, args, kwargs):
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    else:

        def hook(m, args, out):
            return (edit(out[0]), *out[1:]) if isinstance(out, tuple) else edit(out)

        handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return reference(x).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("family,kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_residual_points_are_editable(family, kind):
    """Replacing resid_pre of block 2, editing resid_post of block 0 in place, and zeroing attn_out of block 1
    each equal the same edit made with a torch hook on HF's own module."""
    h, _, reference = tier(family, kind)
    x = ids()
    blocks = blocks_of(reference, family)
    delta = torch.randn(B, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = h.run_with_hooks(x)
        replaced = h.run_with_hooks(x, fwd_hooks=[("blocks.2.hook_resid_pre", lambda t, hook: t + delta)])

        def halve(t, hook):
            t.mul_(0.5)  # in place: returns None

        halved = h.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_post", halve)])
        zeroed = h.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_attn_out", lambda t, hook: torch.zeros_like(t))])
    expected = by_hand_on_hf(reference, x, blocks[2], lambda t: t + delta, pre=True)
    assert (replaced - plain).abs().max() > 1e-3, "the edit changed nothing"
    assert_close(replaced, expected, msg=f"{family} {kind}: resid_pre of block 2 replaced")
    assert_close(halved, by_hand_on_hf(reference, x, blocks[0], lambda t: t * 0.5, pre=False))
    attention = getattr(blocks[1], PATHS[family][1])
    assert_close(zeroed, by_hand_on_hf(reference, x, attention, torch.zeros_like, pre=False))


def torch_hooks(model) -> dict:
    """Every module's registered torch forward hooks and pre-hooks (ids), to compare before and after."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}


@pytest.mark.parametrize("kind", ["attach", "interface"])
def test_residual_points_register_torch_hooks_only_while_hooked(kind):
    h, model, _ = tier("llama", kind)
    with torch.no_grad():
        model(ids(), output_hidden_states=True)  # lets HF install its own recorders first
    before = torch_hooks(model)
    block = model.model.layers[1]
    handles = h.add_hook("blocks.1.hook_resid_pre", lambda t, hook: None)
    handles += h.add_hook("blocks.1.hook_resid_post", lambda t, hook: None)
    handles += h.add_hook("blocks.1.hook_attn_out", lambda t, hook: None)
    assert len(block._forward_pre_hooks) == len(before["model.layers.1"][1]) + 1
    assert len(block._forward_hooks) == len(before["model.layers.1"][0]) + 1
    handles[0].remove()
    assert tuple(block._forward_pre_hooks) == before["model.layers.1"][1]  # its last hook gone: no torch hook
    h.reset_hooks()
    assert torch_hooks(model) == before
    with torch.no_grad():
        h.run_with_cache(ids())  # caches every point, residual ones included
    assert torch_hooks(model) == before
    # a model with nothing hooked has no pyqkv torch hook anywhere (HF's own recorders aside)
    if kind == "attach":
        fresh = build("llama")
        assert all(not hooks and not pre for hooks, pre in torch_hooks(fresh).values())
        pyqkv.hf.attach(fresh)
        assert all(not pre for _, pre in torch_hooks(fresh).values())


# ----------------------------------------------------------------------------------------------------
# Nothing silent


def test_a_detached_handle_raises():
    model = build("gpt2")
    h = pyqkv.hf.attach(model)
    h.add_hook("blocks.1.hook_resid_pre", lambda t, hook: None, is_permanent=True)
    pyqkv.hf.detach(model)
    # detach took every hook off, permanent ones too: no torch hook of pyqkv stays on HF's blocks
    assert all(not pre for _, pre in torch_hooks(model).values())
    detached = r"was detached \(pyqkv.hf.detach\(model\)\)"
    with pytest.raises(RuntimeError, match=detached):
        h.run_with_cache(ids())
    with pytest.raises(RuntimeError, match=detached):
        h.add_hook("blocks.0.attn.hook_z", lambda t, hook: None)
    with pytest.raises(RuntimeError, match=detached):
        with h.hooks(fwd_hooks=[("blocks.0.attn.hook_z", lambda t, hook: None)]):
            pass
    with pytest.raises(RuntimeError, match=detached):
        h.run_with_hooks(ids())
    with pytest.raises(RuntimeError, match=detached):
        h(ids())
    assert "detached" in repr(h)
    h.reset_hooks()  # cleaning up a detached handle is harmless


def test_enable_on_an_attached_model_says_it_is_attached():
    model = build("llama")
    pyqkv.hf.attach(model)
    with pytest.raises(ValueError, match=r"already attached with pyqkv.hf.attach.*pyqkv.hf.detach\(model\) first"):
        pyqkv.hf.enable(model)
    assert model.config._attn_implementation == "eager"  # untouched


def test_attach_names_enable_for_a_model_of_the_interface_tier():
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=D, num_attention_heads=H, intermediate_size=64, vocab_size=V
    )
    bert = transformers.BertModel(cfg).eval()
    with pytest.raises(TypeError, match=r"no supported attention module.*BertSelfAttention.*pyqkv.hf.enable\(model\)"):
        pyqkv.hf.attach(bert)


def test_interface_table_is_derived_from_points():
    seen = {p.name for p in pyqkv.points.POINTS if p.interface == pyqkv.points.SEEN}
    assert set(hf_interface.POINTS) == seen == {
        "hook_rot_q", "hook_rot_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z",
    }  # fmt: skip
    assert set(hf_interface.POINTS) | set(hf_interface._NOT_VISIBLE) == set(pyqkv.points.HOOK_NAMES)
    h, _, _ = tier("llama", "interface")
    for name in ("hook_q_normed", "hook_k_normed", "hook_q", "hook_result"):
        with pytest.raises(ValueError, match=rf"blocks.0.attn.{name}: .*attn_implementation='pyqkv'.*attach"):
            h.add_hook(f"blocks.0.attn.{name}", lambda t, hook: None)
    with pytest.raises(KeyError) as raised:
        h.add_hook("blocks.0.attn.hook_qq", lambda t, hook: None)
    message = str(raised.value)
    assert "did you mean" not in message or "hook_q'" not in message  # never suggests a refused point
    assert "hook_rot_q" in message and "hook_resid_pre" in message
    assert "attn.hook_q," not in message and "attn.hook_result" not in message
