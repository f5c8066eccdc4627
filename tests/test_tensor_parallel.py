"""Tensor parallelism (transformers' tp_plan="auto") on the CPU: two processes under torchrun with the gloo
backend, each attaching pyqkv to its shard of a tiny model saved to a temp dir (tests/tp_worker.py), against
the same model on one process: logits, a head ablation written with global head indices
(pyqkv.zero_heads), the cache gathered over ranks (run_with_cache(gather=True)), and greedy generation.
The reference is pyqkv attached on one process, run in float32 and in float64 (tolerance.hf_reference): the
hook points' values exist only there, and pyqkv on one process is compared with HF itself in the other files.

Families: Llama (q/k/v colwise: each rank computes its own heads), GPT-NeoX (its interleaved fused projection
sharded per head), Phi-3 (a gathered plan: every rank computes every head)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from tolerance import assert_close, differs, hf_reference

import pyqkv

transformers = pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ["blocks.1.attn.hook_z", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_k", "blocks.1.attn.hook_q"]
SMALL = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=128,
    max_position_embeddings=64,
    vocab_size=100,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=2), (2, 1)),
    "neox": (transformers.GPTNeoXConfig, dict(), (2, 2)),
    "phi3": (transformers.Phi3Config, dict(num_key_value_heads=2, original_max_position_embeddings=64), (4, 2)),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(ids):
    """fn(model, dtype) for hf_reference: what tp_worker.py computes, by pyqkv attached on one process
    (detached again, so that hf_reference copies a plain HF model)."""

    def run(model, dtype):
        h = pyqkv.hf.attach(model)
        try:
            return {
                "logits": model(ids).logits,
                "ablated": h.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", pyqkv.zero_heads([1, 2]))]),
                "cache": dict(h.run_with_cache(ids, names_filter=NAMES)[1]),
                "tokens": model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0),
            }
        finally:
            pyqkv.hf.detach(model)

    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{family: (single-process results as tolerance.Refs, rank-0 results)}: one torchrun for all families."""
    singles, dirs = {}, []
    for name, (cls, extra, _) in CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cls(**SMALL, **extra)).eval()
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        ids = torch.randint(3, 100, (2, 9))
        torch.save(ids, d / "ids.pt")
        with torch.no_grad():
            singles[name] = hf_reference(model, one_process(ids))
        dirs.append(str(d))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        os.path.join(HERE, "tp_worker.py"),
        *dirs,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, f"torchrun failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return {name: (singles[name], torch.load(os.path.join(d, "tp.pt"))) for name, d in zip(CONFIGS, dirs)}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_tensor_parallel_equals_one_process(runs, family):
    single, tp = runs[family]
    H_local, Hkv_local = CONFIGS[family][2]
    for rank, layers in enumerate(tp["heads"]):  # each rank's Bridges: local head counts and global indices
        for n_heads, n_kv_heads, heads in layers:
            assert (n_heads, n_kv_heads) == (H_local, Hkv_local)
            assert heads == (list(range(4)) if H_local == 4 else list(range(rank * H_local, (rank + 1) * H_local)))
    assert_close(tp["logits"], single["logits"], f"{family}: tensor-parallel logits vs one process")
    assert_close(tp["ablated"], single["ablated"], f"{family}: heads 1, 2 zeroed, tensor-parallel vs one process")
    assert differs(single["logits"].lo, single["ablated"]), "the ablation changed nothing"
    for name in NAMES:
        assert tp["cache"][name].shape == single["cache"][name].shape, name
        assert_close(tp["cache"][name], single["cache"][name], f"{family}: {name} gathered over ranks vs one process")
    assert tp["tokens"].tolist() == single["tokens"].lo.tolist()
