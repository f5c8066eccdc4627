"""One rank of tests/test_tensor_parallel.py, run under torchrun (gloo on the CPU): for each model
directory given, load the model with transformers' tp_plan="auto", attach pyqkv, and (rank 0) save what the
test compares with the single-process model. Not a test module itself."""

import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import pyqkv

NAMES = ["blocks.1.attn.hook_z", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_k", "blocks.1.attn.hook_q"]


def main(dirs):
    for d in dirs:
        model = AutoModelForCausalLM.from_pretrained(d, tp_plan="auto").eval()
        ids = torch.load(os.path.join(d, "ids.pt"))
        with torch.no_grad():
            h = pyqkv.hf.attach(model)
            local = [(b.cfg.n_heads, b.cfg.n_kv_heads, list(b.hook_points()["hook_z"].heads)) for b in h.bridges]
            logits = model(ids).logits
            ablated = h.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", pyqkv.zero_heads([1, 2]))])
            _, cache = h.run_with_cache(ids, names_filter=NAMES, gather=True)
            tokens = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        heads = [None] * dist.get_world_size()
        dist.all_gather_object(heads, local)
        if dist.get_rank() == 0:
            torch.save(
                {"logits": logits, "ablated": ablated, "cache": dict(cache), "tokens": tokens, "heads": heads},
                os.path.join(d, "tp.pt"),
            )
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
