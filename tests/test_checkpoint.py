"""Checkpoints and training while a Hugging Face model is attached (issue 21, items 1 and 2), on every
supported family built from a small random config (nothing is downloaded):

- state_dict() of an attached model has the un-attached model's keys, in its order, with its shapes and
  values (GPT-2's Conv1D [D, 3 D], a separate q_proj [H Dh, D], GPT-NeoX's interleaved query_key_value),
  never the Bridge's own names, and no two entries share storage unless they did before attach (tied
  embeddings): safetensors refuses aliases;
- save_pretrained while attached, with weights edited through the Bridge's views, reloads with
  from_pretrained (into an un-attached model) equal to the attached model;
- load_state_dict into an attached model takes Hugging Face's keys, strict and not, and reports missing,
  unexpected and mis-shaped keys as the un-attached model does;
- detach leaves no checkpoint hook behind;
- training: an optimizer built after attach trains the fused weights (named_parameters() holds everything
  a loop needs); one built before attach, holding the Q/K/V Parameters attach replaced, raises on step
  naming them instead of silently training nothing (and one built while attached, after detach).
"""

from __future__ import annotations

import pytest
import torch
from test_hf_families import FAMILIES, IDS, left_padded
from tolerance import assert_close, differs, hf_reference

import pyqkv

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

BY_ID = {f.id: f for f in FAMILIES}
# One family per way attach holds a layer's weights: blocked Conv1D shared (gpt2), separate projections
# packed into views (llama3), with biases and a per-head norm the Bridge holds under its own name (qwen3
# has norms, qwen2 biases), repacked interleaved with a bias (neox), grouped (falcon), codegen, StableLM's
# per-head LayerNorms behind the Bridge's HeadsSecond wrapper, GPT-NeoX-Japanese's dense_bias.
LAYOUTS = [
    "gpt2",
    "llama3",
    "qwen2-bias-window",
    "qwen3",
    "neox",
    "falcon-new-arch",
    "codegen",
    "stablelm-per-head-ln",
    "neox-japanese",
]


def _storage_groups(sd) -> set:
    """The sets of keys whose tensors share one storage (more than one key each)."""
    groups = {}
    for k, v in sd.items():
        groups.setdefault((v.device, v.untyped_storage().data_ptr()), []).append(k)
    return {frozenset(keys) for keys in groups.values() if len(keys) > 1}


def _logits(model, ids):
    return model(ids).logits


# ----------------------------------------------------------------------------------------------------
# state_dict / save_pretrained / from_pretrained


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_state_dict_speaks_hugging_face_keys_and_shapes(device, fam):
    model = fam.make(device)
    before = model.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    groups_before = _storage_groups(model.state_dict())
    pyqkv.hf.attach(model)
    after = model.state_dict()
    assert list(after) == list(before), f"{fam.id}: keys while attached differ from the un-attached model's"
    for k, v in after.items():
        assert v.shape == before[k].shape and v.dtype == before[k].dtype, f"{fam.id}: {k}"
        assert torch.equal(v, before[k]), f"{fam.id}: {k} holds other values while attached"
        assert not v.requires_grad and v.is_contiguous(), f"{fam.id}: {k} is not a detached contiguous tensor"
    assert _storage_groups(after) == groups_before, f"{fam.id}: entries share storage that did not before attach"
    # keep_vars: the same keys, and a Parameter the model holds comes back as that Parameter
    kept = model.state_dict(keep_vars=True)
    assert list(kept) == list(before)
    held = {id(p) for p in model.parameters()}
    assert any(id(v) in held for v in kept.values())


@pytest.mark.parametrize("fam", [BY_ID[i] for i in LAYOUTS + ["phi3", "opt", "bloom"]], ids=lambda f: f.id)
def test_save_pretrained_while_attached_reloads_equal(device, fam, tmp_path):
    """Weights edited through the Bridge's views (a head of W_O zeroed, a head of W_Q scaled, a K bias
    moved) are what save_pretrained writes: from_pretrained gives an un-attached model with the attached
    model's logits."""
    model = fam.make(device)
    ids, _ = left_padded(device, pads=(0, 0, 0))
    with torch.no_grad():
        original = hf_reference(model, lambda m, dt: _logits(m, ids))
        h = pyqkv.hf.attach(model)
        h.bridges[0].W_O[1].zero_()
        h.bridges[1].W_Q[2].mul_(1.5)
        h.bridges[1].b_K.add_(0.1) if h.bridges[1].qkv_bias is not None else h.bridges[1].W_K[0].add_(0.05)
        edited = _logits(model, ids)
    assert differs(edited, original), f"{fam.id}: the edits had no effect"
    model.save_pretrained(tmp_path)
    if fam.build is None:
        reloaded = type(model).from_pretrained(tmp_path, attn_implementation="eager").to(device).eval()
    else:  # a model the family has no class for: its own builder, then the saved file
        reloaded = fam.make(device, seed=1)
        reloaded.load_state_dict(safetensors_torch.load_file(tmp_path / "model.safetensors"), strict=False)
    with torch.no_grad():
        expected = hf_reference(reloaded, lambda m, dt: _logits(m, ids))
    assert_close(edited, expected, f"{fam.id}: attached, edited model vs from_pretrained of what it saved")
    # and the attached model itself is untouched by saving
    with torch.no_grad():
        assert torch.equal(_logits(model, ids), edited)


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_load_state_dict_into_an_attached_model(device, fam):
    """Another model's Hugging Face state dict, loaded strictly into an attached model, gives that model's
    logits; the attached model's state_dict then equals the dict loaded."""
    source = fam.make(device, seed=1)
    sd = source.state_dict()
    model = fam.make(device, seed=0)
    pyqkv.hf.attach(model)
    result = model.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    ids, _ = left_padded(device, pads=(0, 0, 0))
    with torch.no_grad():
        expected = hf_reference(source, lambda m, dt: _logits(m, ids))
        got = _logits(model, ids)
    assert_close(got, expected, f"{fam.id}: attached model after load_state_dict vs the source model")
    back = model.state_dict()
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd), f"{fam.id}: state_dict after load differs from the dict loaded"


FUSED_OR_K = ("k_proj.weight", "query_key_value.weight", "c_attn.weight", "qkv_proj.weight")


def _damaged(sd):
    """The state dict without layer 0's K (or fused QKV) projection weight and its first norm or bias
    entry, and with two keys the model does not have inside that attention module (one of them pyqkv's
    internal name, which is no key of the model either)."""
    attn = next(k for k in sd if ".0." in k and k.endswith(FUSED_OR_K))
    prefix = attn.rsplit(".", 2)[0] + "."
    drop = [attn] + [k for k in sd if k.startswith(prefix) and ("norm" in k or k.endswith("bias")) and k != attn][:1]
    damaged = {k: v for k, v in sd.items() if k not in drop}
    damaged[prefix + "not_a_weight"] = torch.zeros(3)
    damaged[prefix + "bridge.qkv_weight"] = torch.zeros(3)
    return damaged, drop, prefix


@pytest.mark.parametrize("fam_id", LAYOUTS)
def test_load_state_dict_reports_keys_as_the_unattached_model_does(device, fam_id):
    fam = BY_ID[fam_id]
    sd = fam.make(device, seed=1).state_dict()
    damaged, dropped, prefix = _damaged(sd)
    plain = fam.make(device, seed=0)
    expected = plain.load_state_dict(damaged, strict=False)
    model = fam.make(device, seed=0)
    pyqkv.hf.attach(model)
    got = model.load_state_dict(damaged, strict=False)
    assert sorted(got.missing_keys) == sorted(expected.missing_keys) == sorted(dropped)
    assert sorted(got.unexpected_keys) == sorted(expected.unexpected_keys)
    # what was given was loaded, what was missing kept its value: the model now equals `plain`
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(damaged)
    message = str(err.value)
    assert all(k in message for k in dropped) and prefix + "not_a_weight" in message
    # a mis-shaped projection: torch's message, naming the Hugging Face key
    wrong = dict(sd)
    wrong[dropped[0]] = sd[dropped[0]][:, :-1] if sd[dropped[0]].dim() == 2 else sd[dropped[0]][:-1]
    with pytest.raises(RuntimeError, match=f"size mismatch for {dropped[0]}"):
        model.load_state_dict(wrong)


def test_checkpoint_of_a_layer_that_calls_its_projections(device):
    """A layer whose projections are wrapped (a LoRA-style adapter) is called, not held: its state_dict
    entries are the wrapper's own, under the module's names."""
    from test_placement import LoraLinear

    model = BY_ID["llama3"].make(device)
    for layer in model.model.layers:
        layer.self_attn.q_proj = LoraLinear(layer.self_attn.q_proj)
    before = model.state_dict()
    pyqkv.hf.attach(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    other = {k: v + 1 for k, v in before.items()}
    model.load_state_dict(other)
    assert all(torch.equal(v, other[k]) for k, v in model.state_dict().items())


def test_state_only_the_original_module_holds_is_saved_and_loaded(device):
    """A persistent buffer of the attention module itself (here a user's, registered before attach) stays on
    the original, outside the attached tree: it is saved under its key and loaded into the original."""
    model = BY_ID["llama3"].make(device)
    attn = model.model.layers[0].self_attn
    attn.register_buffer("calibration", torch.arange(3.0, device=device))
    key = "model.layers.0.self_attn.calibration"
    before = list(model.state_dict())
    pyqkv.hf.attach(model)
    sd = model.state_dict()
    assert list(sd) == before and torch.equal(sd[key], torch.arange(3.0))
    sd[key] = torch.full((3,), 7.0)
    model.load_state_dict(sd)
    with pytest.raises(RuntimeError, match=f"size mismatch for {key}"):
        model.load_state_dict({**sd, key: torch.zeros(4)})
    pyqkv.hf.detach(model)
    assert model.model.layers[0].self_attn is attn and torch.equal(attn.calibration, torch.full((3,), 7.0))


def _hook_counts(model):
    return [
        (len(m._state_dict_hooks), len(m._load_state_dict_pre_hooks), len(m._load_state_dict_post_hooks))
        for m in model.modules()
    ]


@pytest.mark.parametrize("fam_id", ["gpt2", "llama3", "neox"])
def test_detach_leaves_no_checkpoint_hooks(device, fam_id):
    fam = BY_ID[fam_id]
    model = fam.make(device)
    originals = fam.attentions(model)
    counts = _hook_counts(model)
    keys = list(model.state_dict())
    pyqkv.hf.attach(model)
    attached = [m for m in model.modules() if isinstance(m, pyqkv.hf.HFAttention)]
    assert all(m._state_dict_hooks and m._load_state_dict_pre_hooks for m in attached)
    pyqkv.hf.detach(model)
    assert fam.attentions(model) == originals
    assert _hook_counts(model) == counts
    assert all(not m._state_dict_hooks and not m._load_state_dict_pre_hooks for m in attached)
    assert list(model.state_dict()) == keys


# ----------------------------------------------------------------------------------------------------
# training


def _loss(model, ids):
    logits = model(ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("fam_id", ["gpt2", "llama3", "neox"])
def test_optimizer_built_after_attach_trains_the_fused_weights(device, fam_id):
    model = BY_ID[fam_id].make(device)
    ids, _ = left_padded(device, pads=(0, 0, 0))
    h = pyqkv.hf.attach(model)
    names = dict(model.named_parameters())
    assert all(any(p is b.qkv_weight for p in names.values()) for b in h.bridges)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    fused = [b.qkv_weight.detach().clone() for b in h.bridges]
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = _loss(model, ids)
        loss.backward()
        # every Parameter the model computes with is in named_parameters(), and gets its gradient there
        assert all(p.grad is not None for p in names.values() if p.requires_grad), [
            n for n, p in names.items() if p.grad is None
        ]
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{fam_id}: loss did not fall: {losses}"
    assert all(not torch.equal(b.qkv_weight, f) for b, f in zip(h.bridges, fused))


@pytest.mark.parametrize(
    "fam_id, retired",
    [
        ("llama3", "model.layers.0.self_attn.q_proj.weight"),
        ("neox", "gpt_neox.layers.0.attention.query_key_value.weight"),
    ],
)
def test_optimizer_built_before_attach_raises_on_step(device, fam_id, retired):
    """attach replaces these layers' Q/K/V Parameters by one fused Parameter: an optimizer still holding
    the old ones would train nothing for them, silently. Its step raises, naming them."""
    model = BY_ID[fam_id].make(device)
    ids, _ = left_padded(device, pads=(0, 0, 0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pyqkv.hf.attach(model)
    _loss(model, ids).backward()
    with pytest.raises(RuntimeError, match=r"built before pyqkv\.hf\.attach") as err:
        optimizer.step()
    assert retired in str(err.value)
    # an optimizer built now trains
    torch.optim.SGD(model.parameters(), lr=0.05).step()


@pytest.mark.parametrize("fam_id", ["llama3", "neox"])
def test_optimizer_built_before_attach_works_again_after_detach(device, fam_id):
    """detach gives the module back the very Parameters attach took (holding the Bridge's weights, edits
    included), so an optimizer built before attach, and its state, carry on."""
    fam = BY_ID[fam_id]
    model = fam.make(device)
    ids, _ = left_padded(device, pads=(0, 0, 0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _loss(model, ids).backward()
    optimizer.step()
    held = {id(p) for p in model.parameters()}
    h = pyqkv.hf.attach(model)
    with torch.no_grad():
        h.bridges[0].W_Q[0].mul_(0.5)
        edited = _logits(model, ids)
    pyqkv.hf.detach(model)
    assert {id(p) for p in model.parameters()} == held
    with torch.no_grad():
        assert_close(edited, hf_reference(model, lambda m, dt: _logits(m, ids)), f"{fam_id}: the edit came back")
    optimizer.zero_grad()
    _loss(model, ids).backward()
    weights = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert all(not torch.equal(p, w) for p, w in zip(model.parameters(), weights) if p.grad is not None)


def test_optimizer_built_before_attach_keeps_working_where_attach_shares_the_parameters(device):
    """GPT-2's blocked Conv1D weights are the Bridge's own Parameters: nothing is replaced, nothing raises."""
    model = BY_ID["gpt2"].make(device)
    ids, _ = left_padded(device, pads=(0, 0, 0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    h = pyqkv.hf.attach(model)
    before = h.bridges[0].qkv_weight.detach().clone()
    _loss(model, ids).backward()
    optimizer.step()
    assert not torch.equal(h.bridges[0].qkv_weight, before)


def test_optimizer_built_while_attached_raises_after_detach(device):
    """Detach gives the separate projections back their own weights: the fused Parameter an optimizer built
    while attached holds leaves the model, and its step says so."""
    model = BY_ID["llama3"].make(device)
    ids, _ = left_padded(device, pads=(0, 0, 0))
    pyqkv.hf.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pyqkv.hf.detach(model)
    _loss(model, ids).backward()
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.bridge\.qkv_weight"):
        optimizer.step()
    after = torch.optim.SGD(model.parameters(), lr=0.05)
    q = model.model.layers[0].self_attn.q_proj.weight
    before = q.detach().clone()
    after.step()
    assert not torch.equal(q, before)
