"""TransformerLens-style analysis code, run unchanged against pyqkv (issue 20 item 5).

The analysis functions below are written as TransformerLens's tutorials write them (`cache["pattern", l]`,
`cache.stack_head_results(...)`, `utils.get_act_name`, hooks that read `hook.layer()` and edit in place); they
take any model handle with TransformerLens's hook API, so the very same functions run on pyqkv's handles
(pyqkv.hf.attach; pyqkv.hf.enable, the interface tier, where the analysis needs no W_O) and, where it is
installed, on TransformerLens's own TransformerBridge (`utils` is its `utilities` since TransformerLens 4.0,
pyqkv's `pyqkv.utils`). Each number is compared with
the same computation done by hand on the plain Hugging Face model (torch forward hooks on its modules,
output_attentions), which knows nothing of pyqkv:

1. induction-head scores (the diagonal stripe at offset 1 - n of a repeated random sequence of n tokens);
2. direct logit attribution per head (each head's z slice times its W_O rows, through the final norm's scale,
   onto a logit-difference direction);
3. activation patching of every head's hook_z and of hook_resid_pre at every (layer, position), from a clean
   run into a corrupted one (logit-difference grids);
4. the same numbers from TransformerLens's bridge over the same GPT-2 and Llama (skipped when
   build/bench-peers, which `make bench-model` installs and `make test` does not, is absent).

Models: tiny random GPT-2 and Llama (GQA) in float64, with sharp attention (initializer_range 0.2) and
non-trivial norm weights and biases, so a wrong layer, head, position or scale changes the numbers by far more
than the tolerance. Notation: B batch, S positions, L layers, H heads, Dh head dim, D model dim, V vocab.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from tolerance import float64_softmax
from torch.testing import assert_close

import pyqkv
import pyqkv.utils

transformers = pytest.importorskip("transformers")
einops = pytest.importorskip("einops")
import pyqkv.hf  # noqa: E402

L, H, D, V = 3, 4, 64, 100
DH = D // H
B, S = 2, 8
SEQ_LEN = 8  # the random half of the induction sequence: [BOS] + r + r, S = 1 + 2 * SEQ_LEN
# float64 on both sides: only rounding separates them. Hugging Face's eager attention takes its softmax in
# float32 even in a float64 model (Llama's does), so every Hugging Face run here is inside float64_softmax().
EXACT = dict(rtol=0, atol=1e-10)

# family -> (decoder blocks, each block's attention module, its output projection, the final norm,
#            whether the output projection is a Conv1D ([in, out]) rather than an nn.Linear ([out, in]))
FAMILIES = {
    "gpt2": ("transformer.h", "attn", "c_proj", "transformer.ln_f", True),
    "llama": ("model.layers", "self_attn", "o_proj", "model.norm", False),
}


def build(family: str):
    """A tiny random float64 causal LM (eager attention: HF's output_attentions is the oracle), in eval mode."""
    common = dict(vocab_size=V, bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.2)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=L, n_embd=D, n_head=H, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **common
        )
    else:
        cfg = transformers.LlamaConfig(
            num_hidden_layers=L, hidden_size=D, num_attention_heads=H, num_key_value_heads=2, intermediate_size=128,
            max_position_embeddings=64, **common,
        )  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # Norm weights of 1 and biases of 0 would hide a forgotten norm weight or bias; make them matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model.double().eval()


def hooked(family: str, tier: str = "attach"):
    """(the model, pyqkv's handle on it, an untouched Hugging Face copy of the same model). tier: "attach"
    (pyqkv's Bridges replace the attention modules) or "enable" (attn_implementation="pyqkv": Hugging Face
    keeps its modules and calls pyqkv for attention; no W_O, so no stack_head_results there). The model is
    returned for the caller to hold: the interface tier's handle holds it only weakly."""
    model = build(family)
    reference = copy.deepcopy(model)
    return model, (pyqkv.hf.attach if tier == "attach" else pyqkv.hf.enable)(model), reference


def random_tokens(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, shape, generator=g)


def repeated_tokens(seq_len=SEQ_LEN, batch=B, seed=3):
    """TransformerLens's induction sequence: BOS, then seq_len random tokens, then the same tokens again."""
    half = random_tokens((batch, seq_len), seed)
    return torch.cat([torch.zeros(batch, 1, dtype=torch.long), half, half], dim=1)


def patching_inputs():
    """(clean, corrupted, answers): corrupted differs from clean at position 2 only; answers [B, 2] holds each
    prompt's (correct, wrong) token, read at the last position."""
    clean = random_tokens((B, S), seed=5)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 37) % (V - 1) + 1
    return clean, corrupted, random_tokens((B, 2), seed=6)


def parts(model, family):
    blocks, attn, o_proj, final_norm, conv1d = FAMILIES[family]
    layers = list(model.get_submodule(blocks))
    return layers, [getattr(getattr(b, attn), o_proj) for b in layers], model.get_submodule(final_norm), conv1d


def head_rows(o_proj, conv1d: bool, head: int) -> torch.Tensor:
    """The output projection's rows that head `head`'s z slice multiplies: [Dh, D]."""
    rows = slice(head * DH, (head + 1) * DH)
    return o_proj.weight[rows, :] if conv1d else o_proj.weight[:, rows].T


# ---------------------------------------------------------------------------------------------------------
# The analysis, as TransformerLens's tutorials write it. `model` is anything with TransformerLens's hook API
# (pyqkv's AttachedModel, TransformerLens's TransformerBridge); `utils` is that library's utils module.
# ---------------------------------------------------------------------------------------------------------
def induction_scores_from_cache(model, rep_tokens, seq_len, n_layers, n_heads):
    """[n_layers, n_heads]: the mean attention from each token of the second copy to the token after its
    first occurrence."""
    _, cache = model.run_with_cache(rep_tokens, names_filter=lambda name: name.endswith("pattern"))
    scores = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for layer in range(n_layers):
        attention_pattern = cache["pattern", layer]  # [B, H, S, S]
        stripe = attention_pattern.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1)
        scores[layer] = einops.reduce(stripe, "batch head_index position -> head_index", "mean")
    return scores


def induction_scores_from_hooks(model, rep_tokens, seq_len, n_layers, n_heads):
    """The same score from a hook on every pattern, written into a store indexed by hook.layer()."""
    store = torch.zeros(n_layers, n_heads, dtype=torch.float64)

    def induction_score_hook(pattern, hook):
        induction_stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len)
        store[hook.layer(), :] = einops.reduce(induction_stripe, "batch head_index position -> head_index", "mean")

    model.run_with_hooks(
        rep_tokens, return_type=None, fwd_hooks=[(lambda name: name.endswith("pattern"), induction_score_hook)]
    )
    return store


def logits_to_ave_logit_diff(logits, answer_tokens):
    """The mean over the batch of logit(correct) - logit(wrong) at the last position."""
    final_logits = logits[:, -1, :]
    answer_logits = final_logits.gather(dim=-1, index=answer_tokens)
    return (answer_logits[:, 0] - answer_logits[:, 1]).mean()


def per_head_logit_attribution(model, tokens, logit_diff_directions, apply_final_ln):
    """Direct logit attribution: each head's output at the last position, scaled by the final norm, onto the
    logit-difference direction, averaged over the batch. Returns (attribution [L*H], labels, logits, cache).

    apply_final_ln(cache, stack, pos_slice): TransformerLens's cache.apply_ln_to_stack where the library has it."""
    logits, cache = model.run_with_cache(tokens)
    per_head_residual, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    scaled_residual_stack = apply_final_ln(cache, per_head_residual, -1)
    per_head_logit_diffs = einops.einsum(
        scaled_residual_stack, logit_diff_directions, "component batch d_model, batch d_model -> component"
    )
    return per_head_logit_diffs / tokens.shape[0], labels, logits, cache


def head_z_patching(model, utils, clean_tokens, corrupted_tokens, answer_tokens, n_layers, n_heads):
    """[n_layers, n_heads]: the normalized logit difference after patching one head's z from the clean run
    (0: as corrupted, 1: as clean)."""
    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    corrupted_logits = model.run_with_hooks(corrupted_tokens, return_type="logits")
    clean_diff = logits_to_ave_logit_diff(clean_logits, answer_tokens)
    corrupted_diff = logits_to_ave_logit_diff(corrupted_logits, answer_tokens)

    def patch_head_vector(corrupted_head_vector, hook, head_index):
        corrupted_head_vector[:, :, head_index, :] = clean_cache["z", hook.layer()][:, :, head_index, :]
        return corrupted_head_vector

    grid = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for layer in range(n_layers):
        for head_index in range(n_heads):
            hook_fn = partial(patch_head_vector, head_index=head_index)
            patched_logits = model.run_with_hooks(
                corrupted_tokens, fwd_hooks=[(utils.get_act_name("z", layer, "attn"), hook_fn)], return_type="logits"
            )
            patched_diff = logits_to_ave_logit_diff(patched_logits, answer_tokens)
            grid[layer, head_index] = (patched_diff - corrupted_diff) / (clean_diff - corrupted_diff)
    return grid


def resid_pre_patching(model, utils, clean_tokens, corrupted_tokens, answer_tokens, n_layers):
    """[n_layers, S]: the normalized logit difference after patching the residual stream entering a block at
    one position from the clean run."""
    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    corrupted_logits = model.run_with_hooks(corrupted_tokens, return_type="logits")
    clean_diff = logits_to_ave_logit_diff(clean_logits, answer_tokens)
    corrupted_diff = logits_to_ave_logit_diff(corrupted_logits, answer_tokens)

    def patch_residual_component(corrupted_residual_component, hook, pos):
        corrupted_residual_component[:, pos, :] = clean_cache[hook.name][:, pos, :]
        return corrupted_residual_component

    grid = torch.zeros(n_layers, clean_tokens.shape[1], dtype=torch.float64)
    for layer in range(n_layers):
        for position in range(clean_tokens.shape[1]):
            hook_fn = partial(patch_residual_component, pos=position)
            patched_logits = model.run_with_hooks(
                corrupted_tokens, fwd_hooks=[(utils.get_act_name("resid_pre", layer), hook_fn)], return_type="logits"
            )
            patched_diff = logits_to_ave_logit_diff(patched_logits, answer_tokens)
            grid[layer, position] = (patched_diff - corrupted_diff) / (clean_diff - corrupted_diff)
    return grid


# ---------------------------------------------------------------------------------------------------------
# The same, by hand on the plain Hugging Face model.
# ---------------------------------------------------------------------------------------------------------
def final_norm_scale(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The scale the final norm divides x [..., D] by, [..., 1] (TransformerLens's ln_final.hook_scale):
    sqrt(var + eps) for a LayerNorm (which also centres), sqrt(mean(x^2) + eps) for an RMSNorm."""
    if isinstance(norm, torch.nn.LayerNorm):
        return (x.var(dim=-1, keepdim=True, unbiased=False) + norm.eps).sqrt()
    return (x.pow(2).mean(dim=-1, keepdim=True) + norm.variance_epsilon).sqrt()


def apply_final_ln_by_hand(norm: torch.nn.Module):
    """pyqkv's ActivationCache has no apply_ln_to_stack (it does not wrap the final norm): TransformerLens's
    definition by hand, the scale from the cached residual stream that enters the final norm (the last
    block's resid_post), the stack centred first for a LayerNorm."""

    def apply(cache, residual_stack, pos_slice):
        final_resid = cache["resid_post", -1][:, pos_slice]  # [B, D]
        if isinstance(norm, torch.nn.LayerNorm):
            residual_stack = residual_stack - residual_stack.mean(dim=-1, keepdim=True)
        return residual_stack / final_norm_scale(norm, final_resid)

    return apply


def unembedding_directions(model, answer_tokens):
    """[B, D]: the unembedding direction of logit(correct) - logit(wrong) (TransformerLens's
    tokens_to_residual_directions, differenced)."""
    W_U = model.get_output_embeddings().weight.T  # [D, V]
    return (W_U[:, answer_tokens[:, 0]] - W_U[:, answer_tokens[:, 1]]).T.detach()


def logit_diff_directions(model, family, answer_tokens):
    """[B, D]: the direction of logit(correct) - logit(wrong) in the scaled residual stream, through the final
    norm's weight (Hugging Face's weights are not folded, as TransformerLens's processed ones are)."""
    _, _, norm, _ = parts(model, family)
    return unembedding_directions(model, answer_tokens) * norm.weight.detach()


def hf_induction_scores(model, rep_tokens, seq_len):
    attentions = model(rep_tokens, output_attentions=True).attentions  # L x [B, H, S, S]
    return torch.stack([a.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1).mean(dim=(0, -1)) for a in attentions])


def hf_per_head_logit_attribution(model, family, tokens, directions):
    """[L*H]: each head's z slice at the last position times its output-projection rows, centred (LayerNorm)
    and divided by the final norm's scale of this run, onto the directions, averaged over the batch. The
    heads' z are read by forward pre-hooks on the output projections, the final norm's input by one on it."""
    layers, o_projs, norm, conv1d = parts(model, family)
    seen = {}
    handles = [p.register_forward_pre_hook(partial(_keep_input, seen, i)) for i, p in enumerate(o_projs)]
    handles.append(norm.register_forward_pre_hook(partial(_keep_input, seen, "final")))
    try:
        model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    x = seen["final"][:, -1]  # [B, D]
    # The scale formula is the norm's own: check it against the module before trusting it.
    normed = (x - x.mean(-1, keepdim=True) if isinstance(norm, torch.nn.LayerNorm) else x) / final_norm_scale(norm, x)
    assert_close(normed * norm.weight + getattr(norm, "bias", 0), norm(x), rtol=1e-6, atol=1e-6)
    out = []
    for layer in range(len(layers)):
        z = seen[layer][:, -1]  # [B, H*Dh]
        for head in range(H):
            contribution = z[:, head * DH : (head + 1) * DH] @ head_rows(o_projs[layer], conv1d, head)  # [B, D]
            if isinstance(norm, torch.nn.LayerNorm):
                contribution = contribution - contribution.mean(-1, keepdim=True)
            out.append(((contribution / final_norm_scale(norm, x)) * directions).sum(-1).mean())
    return torch.stack(out).detach()


def _keep_input(store, key, module, args):
    store[key] = args[0].detach()


def _hidden_states(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden_states(args, kwargs, new):
    return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})


def hf_logit_diff(model, tokens, answer_tokens, pre_hooks=()):
    """logits_to_ave_logit_diff of a Hugging Face run with (module, pre_hook, with_kwargs) hooks in place."""
    handles = [m.register_forward_pre_hook(fn, with_kwargs=kw) for m, fn, kw in pre_hooks]
    try:
        return logits_to_ave_logit_diff(model(tokens).logits, answer_tokens).detach()
    finally:
        for handle in handles:
            handle.remove()


def hf_head_z_patching(model, family, clean, corrupted, answer_tokens):
    """head_z_patching by hand: the clean run's input to each output projection (z, heads concatenated) is
    kept; a patched run's pre-hook on layer l's output projection writes head h's Dh columns back."""
    layers, o_projs, _, _ = parts(model, family)
    clean_z = {}
    keep = [(p, partial(_keep_input, clean_z, i), False) for i, p in enumerate(o_projs)]
    clean_diff = hf_logit_diff(model, clean, answer_tokens, keep)
    corrupted_diff = hf_logit_diff(model, corrupted, answer_tokens)

    def patch(layer, head, module, args):
        z = args[0].clone()
        columns = slice(head * DH, (head + 1) * DH)
        z[..., columns] = clean_z[layer][..., columns]
        return (z, *args[1:])

    grid = torch.zeros(len(layers), H, dtype=torch.float64)
    for layer, o_proj in enumerate(o_projs):
        for head in range(H):
            patched = hf_logit_diff(model, corrupted, answer_tokens, [(o_proj, partial(patch, layer, head), False)])
            grid[layer, head] = (patched - corrupted_diff) / (clean_diff - corrupted_diff)
    return grid


def hf_resid_pre_patching(model, family, clean, corrupted, answer_tokens):
    """resid_pre_patching by hand: forward pre-hooks on the decoder blocks keep, then patch, their input."""
    layers, _, _, _ = parts(model, family)
    clean_resid = {}

    def keep(layer, module, args, kwargs):
        clean_resid[layer] = _hidden_states(args, kwargs).detach()

    def patch(layer, pos, module, args, kwargs):
        x = _hidden_states(args, kwargs).clone()
        x[:, pos] = clean_resid[layer][:, pos]
        return _replace_hidden_states(args, kwargs, x)

    clean_diff = hf_logit_diff(model, clean, answer_tokens, [(b, partial(keep, i), True) for i, b in enumerate(layers)])
    corrupted_diff = hf_logit_diff(model, corrupted, answer_tokens)
    grid = torch.zeros(len(layers), clean.shape[1], dtype=torch.float64)
    for layer, block in enumerate(layers):
        for pos in range(clean.shape[1]):
            patched = hf_logit_diff(model, corrupted, answer_tokens, [(block, partial(patch, layer, pos), True)])
            grid[layer, pos] = (patched - corrupted_diff) / (clean_diff - corrupted_diff)
    return grid


def assert_discriminates(values: torch.Tensor, what: str) -> None:
    """The numbers compared vary across heads / layers / positions by far more than the tolerance, so a wrong
    index on either side cannot pass unseen."""
    assert values.std() > 1e-3, f"{what}: nearly constant ({values}); the comparison would not see a wrong index"


# ---------------------------------------------------------------------------------------------------------
# pyqkv against Hugging Face by hand
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", ["attach", "enable"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_induction_scores_equal_hf_output_attentions(family, tier):
    _model, h, reference = hooked(family, tier)
    rep = repeated_tokens()
    with torch.no_grad(), float64_softmax():
        expected = hf_induction_scores(reference, rep, SEQ_LEN)
        from_cache = induction_scores_from_cache(h, rep, SEQ_LEN, L, H)
        from_hooks = induction_scores_from_hooks(h, rep, SEQ_LEN, L, H)
    assert_discriminates(expected, "induction scores")
    assert_close(from_cache, expected, **EXACT)
    assert_close(from_hooks, expected, **EXACT)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_direct_logit_attribution_per_head_equals_hf(family):
    _model, h, reference = hooked(family)
    tokens = random_tokens((B, S), seed=7)
    answers = random_tokens((B, 2), seed=8)
    directions = logit_diff_directions(reference, family, answers)
    _, _, norm, _ = parts(reference, family)
    with torch.no_grad(), float64_softmax():
        expected = hf_per_head_logit_attribution(reference, family, tokens, directions)
        attribution, labels, logits, cache = per_head_logit_attribution(
            h, tokens, directions, apply_final_ln_by_hand(norm)
        )
    assert labels == [f"L{layer}H{head}" for layer in range(L) for head in range(H)]
    assert_discriminates(expected, "per-head logit attribution")
    assert_close(attribution, expected, **EXACT)

    # The decomposition is complete: every head plus the remainder (resid_post - the heads: embeddings, MLPs,
    # biases) through the final norm is the logit difference, less the final norm's bias term.
    stack = cache.stack_head_results(layer=-1, pos_slice=-1, incl_remainder=True)
    scaled = apply_final_ln_by_hand(norm)(cache, stack, -1)
    total = einops.einsum(scaled, directions, "component batch d_model, batch d_model -> batch")
    bias = getattr(norm, "bias", None)
    bias_term = (unembedding_directions(reference, answers) * bias).sum(-1) if bias is not None else 0.0
    final = logits[:, -1]
    actual = final.gather(-1, answers)[:, 0] - final.gather(-1, answers)[:, 1]
    # Llama's RMSNorm computes in float32 whatever the model's dtype; GPT-2's LayerNorm in float64.
    tolerance = dict(rtol=1e-5, atol=1e-5) if family == "llama" else EXACT
    assert_close(total + bias_term, actual, **tolerance)


@pytest.mark.parametrize("tier", ["attach", "enable"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_head_z_patching_grid_equals_hf(family, tier):
    _model, h, reference = hooked(family, tier)
    clean, corrupted, answers = patching_inputs()
    with torch.no_grad(), float64_softmax():
        expected = hf_head_z_patching(reference, family, clean, corrupted, answers)
        grid = head_z_patching(h, pyqkv.utils, clean, corrupted, answers, L, H)
    assert_discriminates(expected, "hook_z patching")
    assert_close(grid, expected, **EXACT)


@pytest.mark.parametrize("tier", ["attach", "enable"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_resid_pre_patching_grid_equals_hf(family, tier):
    _model, h, reference = hooked(family, tier)
    clean, corrupted, answers = patching_inputs()
    with torch.no_grad(), float64_softmax():
        expected = hf_resid_pre_patching(reference, family, clean, corrupted, answers)
        grid = resid_pre_patching(h, pyqkv.utils, clean, corrupted, answers, L)
    assert_discriminates(expected, "hook_resid_pre patching")
    # Entering block 0 the runs differ only at the corrupted position 2: patching it restores the clean
    # run, patching any other position changes nothing.
    assert_close(expected[0], torch.eye(S, dtype=torch.float64)[2], **EXACT)
    assert_close(grid, expected, **EXACT)


def test_final_ln_refusals_give_the_scaling_the_attribution_needs():
    """pyqkv has no apply_ln_to_stack (it does not wrap the final norm). Its refusals must say how to scale a
    stack as TransformerLens does (what apply_final_ln_by_hand does, equal to TransformerLens's above): by
    the scale of the whole residual stream entering the norm, not by running the norm on each component,
    which normalizes every head by its own statistics and adds the norm's bias to each of them."""
    _model, h, _ = hooked("gpt2")
    _, cache = h.run_with_cache(random_tokens((B, S), seed=7))
    stack = cache.stack_head_results(layer=-1, pos_slice=-1)
    recipe = (
        r"cache\['resid_post', -1\].*sqrt\(var \+ eps\).*LayerNorm.*sqrt\(mean\(x\*\*2\) \+ eps\).*RMSNorm"
        r".*\(stack - stack.mean\(-1, keepdim=True\)\) / scale.*weight"
    )
    with pytest.raises(NotImplementedError, match=r"stack_head_results\(apply_ln=True\).*" + recipe):
        cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)
    with pytest.raises(NotImplementedError, match=r"ActivationCache.apply_ln_to_stack: .*" + recipe):
        cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)


# ---------------------------------------------------------------------------------------------------------
# pyqkv against TransformerLens's own bridge, on the same numbers
# ---------------------------------------------------------------------------------------------------------
# Where `make bench-model` installs TransformerLens (requirements/bench-peers.txt, with --no-deps); `make test`
# does not install it, so on a fresh clone or in CI this part skips.
BENCH_PEERS = Path(__file__).resolve().parents[1] / "build" / "bench-peers"


@pytest.fixture(scope="module")
def transformer_lens():
    """TransformerLens's (TransformerBridge, utils) from build/bench-peers; skips when it is not installed.
    The folder is on sys.path for this module's tests only (after the venv's own packages, so it cannot
    shadow them)."""
    if not (BENCH_PEERS / "transformer_lens").is_dir():
        pytest.skip(
            f"TransformerLens is not installed in {BENCH_PEERS} (`make bench-model` installs it there; `make test` "
            f"does not)"
        )
    sys.path.append(str(BENCH_PEERS))
    try:
        from transformer_lens import utilities as tl_utils  # "utils" until TransformerLens 4.0
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as e:
        sys.path.remove(str(BENCH_PEERS))
        pytest.skip(f"TransformerLens in {BENCH_PEERS} does not import: {e}")
    yield TransformerBridge, tl_utils
    sys.path.remove(str(BENCH_PEERS))


def boot_transformer_lens(TransformerBridge, model):
    """TransformerLens's bridge over a copy of `model`, booted as pyqkv/bench_model.py boots it (a saved
    config and a word-level tokenizer it never uses here: the analysis passes token ids)."""
    from pyqkv.bench_model import _tiny_tokenizer

    directory = tempfile.mkdtemp(prefix="pyqkv-test-tl-")
    tokenizer = _tiny_tokenizer(directory, V)
    model.config.save_pretrained(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(directory, hf_model=copy.deepcopy(model), tokenizer=tokenizer)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformer_lens_bridge_gives_the_same_numbers(transformer_lens, family):
    """The same analysis functions on TransformerLens's bridge and on pyqkv: the same numbers. The bridge runs
    Hugging Face's own eager attention (a float32 softmax in Llama's), so its runs are inside
    float64_softmax(), as the Hugging Face oracle's above."""
    TransformerBridge, tl_utils = transformer_lens
    model = build(family)
    tl = boot_transformer_lens(TransformerBridge, model)
    unattached = copy.deepcopy(model)  # for the unembedding and the final norm, apart from what attach rewires
    _, _, norm, _ = parts(unattached, family)
    h = pyqkv.hf.attach(model)
    rep = repeated_tokens()
    tokens, answers = random_tokens((B, S), seed=7), random_tokens((B, 2), seed=8)
    directions = logit_diff_directions(unattached, family, answers)
    clean, corrupted, patch_answers = patching_inputs()

    with torch.no_grad(), float64_softmax():
        tl_logits = tl(rep)
        tl_scores = induction_scores_from_cache(tl, rep, SEQ_LEN, L, H)
        tl_scores_from_hooks = induction_scores_from_hooks(tl, rep, SEQ_LEN, L, H)
        # TransformerLens scales by its cached ln_final.hook_scale
        tl_attribution, tl_labels, _, tl_cache = per_head_logit_attribution(
            tl, tokens, directions, lambda cache, stack, pos: cache.apply_ln_to_stack(stack, layer=-1, pos_slice=pos)
        )
        tl_heads = tl_cache.stack_head_results(layer=-1, pos_slice=-1)
        # each library's own get_act_name names the points
        tl_z_grid = head_z_patching(tl, tl_utils, clean, corrupted, patch_answers, L, H)
        tl_resid_grid = resid_pre_patching(tl, tl_utils, clean, corrupted, patch_answers, L)
    with torch.no_grad():
        logits = h.run_with_hooks(rep)
        scores = induction_scores_from_cache(h, rep, SEQ_LEN, L, H)
        scores_from_hooks = induction_scores_from_hooks(h, rep, SEQ_LEN, L, H)
        # pyqkv's user scales by the same scale, computed from the cached resid_post (no apply_ln_to_stack)
        attribution, labels, _, cache = per_head_logit_attribution(h, tokens, directions, apply_final_ln_by_hand(norm))
        heads = cache.stack_head_results(layer=-1, pos_slice=-1)
        z_grid = head_z_patching(h, pyqkv.utils, clean, corrupted, patch_answers, L, H)
        resid_grid = resid_pre_patching(h, pyqkv.utils, clean, corrupted, patch_answers, L)

    # The bridge computes the same model: it is the peer, not an approximation of it.
    assert_close(logits, tl_logits, **EXACT)
    for value, what in [
        (tl_scores, "induction scores"), (tl_attribution, "per-head logit attribution"),
        (tl_z_grid, "hook_z patching"), (tl_resid_grid, "hook_resid_pre patching"),
    ]:  # fmt: skip
        assert_discriminates(value, f"TransformerLens's {what}")
    assert_close(tl_scores_from_hooks, tl_scores, **EXACT)
    assert_close(scores, tl_scores, **EXACT)
    assert_close(scores_from_hooks, tl_scores, **EXACT)
    assert labels == tl_labels
    assert_close(heads, tl_heads, **EXACT)
    assert_close(attribution, tl_attribution, **EXACT)
    assert_close(z_grid, tl_z_grid, **EXACT)
    assert_close(resid_grid, tl_resid_grid, **EXACT)
