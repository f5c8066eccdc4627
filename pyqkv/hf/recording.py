"""Hugging Face's `output_attentions` recording (transformers >= 5), as seen from attached layers.

transformers collects attention patterns from forward hooks on its own attention classes; an attached
layer is not one of them, so it appends its pattern to the active collector itself. Looked up in
sys.modules: this module never imports transformers.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _output_capturing():
    """transformers' output-capturing module (transformers >= 5) when transformers is loaded, else None.
    Looked up in sys.modules: this module never imports transformers itself."""
    return sys.modules.get("transformers.utils.output_capturing")


def attention_recorder():
    """The list transformers >= 5 collects `output_attentions` patterns into during this forward, or None.
    HF fills it from forward hooks on its attention classes, which an HFAttention is not, so HFAttention
    appends its pattern itself; the attention-interface tier returns the pattern whenever it is not None
    (HF records the function's second output then)."""
    collector = getattr(_output_capturing(), "_active_collector", None)
    if collector is None:
        collected = None
    elif getattr(collector, "compiling", False):
        # transformers' CompileableContextVar keeps the collector in a plain attribute when its set() ran under
        # compile (a whole compiled model): Dynamo cannot trace ContextVar.get.
        collected = collector.global_var
    elif torch.compiler.is_compiling():
        collected = None  # a compiled region inside an eager forward cannot see what that forward set (as
        # HF's own recording hooks cannot)
    else:
        collected = collector.get()
    recorder = collected.get("attentions") if isinstance(collected, dict) else None
    return recorder if isinstance(recorder, list) else None


def install_hf_recording_hooks(model: nn.Module, target_names) -> None:
    """transformers >= 5 installs its output-recording hooks on the first output_attentions request, on
    the model whose forward records (the nearest PreTrainedModel above the attention modules). Let it do
    so now, while the original modules are in the tree: after detach they record again."""
    install = getattr(_output_capturing(), "maybe_install_capturing_hooks", None)
    if install is None:
        return
    owners = {}
    for name in target_names:
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            owner = model.get_submodule(".".join(parts[:i]))
            if hasattr(owner, "_can_record_outputs") and hasattr(owner, "config"):
                owners[id(owner)] = owner
                break
    for owner in owners.values():
        install(owner)
