"""Where the weights live: accelerate's CPU and disk offload (weights on the meta device between forwards),
a device map that places whole blocks, and projections wrapped by other libraries (a LoRA-style adapter),
on tiny models built from random configs (nothing downloaded), against the same model without pyqkv.

Offloaded or wrapped projections are called, not copied (pyqkv/hf/placement.py): logits, hooks, a head
ablation with pyqkv.zero_heads and greedy generation equal HF's; the Bridge holds no weight of its own;
the weight views and the flags that need the weights are refused with a message saying why."""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_close, hf_reference

import pyqkv

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

SMALL = dict(vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {  # family: (config, blocks path, output projection attribute, Dh)
    "gpt2": (
        lambda: transformers.GPT2Config(n_embd=64, n_head=4, n_layer=3, n_positions=64, **SMALL),
        "transformer.h",
        "attn",
        "c_proj",
    ),
    "llama": (
        lambda: transformers.LlamaConfig(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=3,
            intermediate_size=128,
            max_position_embeddings=64,
            **SMALL,
        ),
        "model.layers",
        "self_attn",
        "o_proj",
    ),
    "neox": (
        lambda: transformers.GPTNeoXConfig(
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=3,
            intermediate_size=128,
            max_position_embeddings=64,
            **SMALL,
        ),
        "gpt_neox.layers",
        "attention",
        "dense",
    ),
}
DH = 16


def build(family):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family][0]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


def ids():
    return torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def hf_with_head_zeroed(model, family, layer, head):
    """HF's logits with the head's slice of the output projection's input zeroed (a pre-hook, removed after)."""
    _, blocks, attn, out = CONFIGS[family]
    proj = getattr(getattr(model.get_submodule(blocks)[layer], attn), out)

    def pre(module, args):
        z = args[0].clone()
        z[..., head * DH : (head + 1) * DH] = 0
        return (z,)

    handle = proj.register_forward_pre_hook(pre)
    try:
        return model(ids()).logits
    finally:
        handle.remove()


def offload(kind):
    def apply(model, tmp_path):
        if kind == "cpu":
            accelerate.cpu_offload(model, execution_device="cpu")
        else:
            accelerate.disk_offload(model, str(tmp_path), execution_device="cpu")
        return model

    return apply


@pytest.mark.parametrize("kind", ["cpu", "disk"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_offloaded_model(family, kind, tmp_path):
    ref_model = build(family)
    with torch.no_grad():
        ref, ref_ablated = hf_reference(
            ref_model, lambda m, dt: (m(ids()).logits, hf_with_head_zeroed(m, family, 1, 2))
        )
        ref_tokens = ref_model.generate(ids(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    model = offload(kind)(build(family), tmp_path)
    h = pyqkv.hf.attach(model)
    assert all(b.projections and "offloaded" in b.projections for b in h.bridges)
    # Memory stays bounded: the Bridges hold no weight of their own, only the model's (meta) placeholders.
    assert all(p.device.type == "meta" for b in h.bridges for p in b.parameters())
    with torch.no_grad():
        out = model(ids()).logits
        _, cache = h.run_with_cache(ids(), names_filter=["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z"])
        ablated = h.run_with_hooks(ids(), fwd_hooks=[("blocks.1.attn.hook_z", pyqkv.zero_heads([2]))])
        tokens = model.generate(ids(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert_close(out, ref, f"{family} offloaded to {kind}: logits vs HF")
    assert_close(
        ablated, ref_ablated, f"{family} offloaded to {kind}: head 2 zeroed by zero_heads vs HF with it zeroed"
    )
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, 4, 9, 9)
    assert tokens.tolist() == ref_tokens.tolist()
    with pytest.raises(RuntimeError, match=r"^W_Q: this Bridge calls its projection modules \(weights offloaded"):
        _ = h.bridges[0].W_Q
    with pytest.raises(
        ValueError, match=r"hook_result: this hook point does not fire: use_attn_result needs the projection weights"
    ):
        h.add_hook("blocks.0.attn.hook_result", lambda t, hook: None)
    pyqkv.hf.detach(model)
    with torch.no_grad():
        assert_close(model(ids()).logits, ref, f"{family} offloaded to {kind}: logits after detach vs HF")


def test_block_device_map_shares_weights(tmp_path):
    """A device map placing whole blocks (here all on the CPU, with hooks as accelerate adds them for a
    multi-device map) keeps the share path: the Bridges hold the modules' own Parameters."""
    model = build("llama")
    with torch.no_grad():
        ref = hf_reference(model, lambda m, dt: m(ids()).logits)
    blocks = {f"model.layers.{i}": "cpu" for i in range(3)}
    device_map = {
        "model.embed_tokens": "cpu",
        **blocks,
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    accelerate.dispatch_model(model, device_map=device_map, force_hooks=True)
    h = pyqkv.hf.attach(model)
    assert all(b.projections is None for b in h.bridges)
    with torch.no_grad():
        assert_close(model(ids()).logits, ref, "logits under a block device map vs HF")
    assert h.bridges[0].W_Q.shape == (4, 64, 16)


class LoraLinear(torch.nn.Module):
    """A LoRA-style adapter around a Linear, as PEFT wraps projections: base(x) + B(A(x))."""

    def __init__(self, base, rank=2):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.5)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_wrapped_projection_is_called():
    model = build("llama")
    for layer in model.model.layers:
        layer.self_attn.q_proj = LoraLinear(layer.self_attn.q_proj)
        layer.self_attn.v_proj = LoraLinear(layer.self_attn.v_proj)
    adapter = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        ref = hf_reference(model, lambda m, dt: m(ids()).logits)
    h = pyqkv.hf.attach(model)
    assert all("LoraLinear projection" in b.projections for b in h.bridges)
    with torch.no_grad():
        assert_close(model(ids()).logits, ref, "logits with LoRA-wrapped q/v projections vs HF")
    out = model(ids()).logits
    out.square().mean().backward()  # gradients reach the adapter through the Bridge
    assert adapter.lora_A.weight.grad is not None and adapter.lora_A.weight.grad.abs().sum() > 0
    pyqkv.hf.detach(model)


class Int8Param(torch.nn.Parameter):
    """A stand-in for a quantized library's weight type (bitsandbytes' Int8Params is a Parameter subclass)."""


class QuantizedLinear(torch.nn.Linear):
    """A Linear subclass whose weight is not a plain Parameter: its forward is the library's, not x @ W.T."""

    def __init__(self, linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight = Int8Param(linear.weight.detach().clone())
        if linear.bias is not None:
            self.bias = torch.nn.Parameter(linear.bias.detach().clone())


class PlainSubclassLinear(torch.nn.Linear):
    """Falcon's FalconLinear in kind: a Linear subclass with its own forward computing x @ W.T + b."""

    def forward(self, x):
        return x @ self.weight.T + (0 if self.bias is None else self.bias)


@pytest.mark.parametrize("cls, held", [(QuantizedLinear, False), (PlainSubclassLinear, True)])
def test_linear_subclass_is_held_only_when_its_weight_is_a_plain_parameter(cls, held):
    model = build("llama")
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(layer.self_attn, name)
            new = (
                cls(old.in_features, old.out_features, bias=old.bias is not None)
                if cls is PlainSubclassLinear
                else cls(old)
            )
            if cls is PlainSubclassLinear:
                new.load_state_dict(old.state_dict())
            setattr(layer.self_attn, name, new)
    with torch.no_grad():
        ref = hf_reference(model, lambda m, dt: m(ids()).logits)
    h = pyqkv.hf.attach(model)
    b = h.bridges[0]
    if held:
        assert b.projections is None
        assert b.W_Q.shape == (4, 64, DH)
    else:
        assert b.projections is not None and f"{cls.__name__} projection" in b.projections
        with pytest.raises(RuntimeError, match=r"^W_Q: this Bridge calls its projection modules"):
            _ = b.W_Q
    with torch.no_grad():
        assert_close(model(ids()).logits, ref, f"logits with {cls.__name__} projections vs HF")
    pyqkv.hf.detach(model)


def test_zero_heads_on_one_process():
    model = build("gpt2")
    h = pyqkv.hf.attach(model)
    point = h.hook_points()["blocks.0.attn.hook_z"]
    assert point.heads == range(4) and point.n_heads_total == 4 and point.head_dim == 2
    z = torch.ones(2, 3, 4, 16)
    pyqkv.zero_heads([1, 3])(z, hook=point)
    assert z[:, :, [1, 3]].abs().sum() == 0 and z[:, :, [0, 2]].eq(1).all()
    with pytest.raises(ValueError, match=r"expected head indices in \[0, 4\), got \[7\]"):
        pyqkv.zero_heads([7])(z, hook=point)
    with pytest.raises(ValueError, match="has none"):
        pyqkv.zero_heads([0])(torch.ones(2, 3, 64), hook=h.hook_points()["blocks.0.attn.hook_out"])
    with torch.no_grad():  # gather=True on one process: every point already holds every head
        _, plain = h.run_with_cache(ids(), names_filter=["blocks.0.attn.hook_z"])
        _, gathered = h.run_with_cache(ids(), names_filter=["blocks.0.attn.hook_z"], gather=True)
    assert torch.equal(plain["blocks.0.attn.hook_z"], gathered["blocks.0.attn.hook_z"])


def test_device_map_split_between_cuda_and_cpu():
    """On a GPU machine: blocks 0-1 on the GPU, block 2 and the head on the CPU (accelerate moves the
    activations between them). Each Bridge computes on its block's device; logits, a cached pattern and
    generate equal the unattached model's. Skipped without a GPU."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine (torch.cuda.is_available() is False)")
    ref_model = build("llama")
    with torch.no_grad():
        ref = hf_reference(ref_model, lambda m, dt: m(ids()).logits)  # on the CPU
        ref_tokens = ref_model.generate(ids(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    model = build("llama")
    device_map = {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": 0,
        "model.layers.2": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": 0,
        "lm_head": "cpu",
    }
    accelerate.dispatch_model(model, device_map=device_map)
    h = pyqkv.hf.attach(model)
    assert [b.qkv_weight.device.type for b in h.bridges] == ["cuda", "cuda", "cpu"]
    with torch.no_grad():
        out, cache = h.run_with_cache(ids().cuda(), names_filter=lambda n: n.endswith("hook_pattern"))
        tokens = model.generate(ids().cuda(), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert_close(out.cpu(), ref, "logits split between CUDA and the CPU vs HF on the CPU")
    assert cache["blocks.0.attn.hook_pattern"].device.type == "cuda"
    assert cache["blocks.2.attn.hook_pattern"].device.type == "cpu"
    assert tokens.cpu().tolist() == ref_tokens.tolist()
