"""Hugging Face glue, the only part of pyqkv that knows Hugging Face (importing it does not import
transformers; modules are recognized by class name).

- `attach(model)` / `detach(model)`: every supported attention module becomes a Bridge behind that
  module's calling convention (pyqkv.hf.attached), with the model-level hooks `blocks.{i}.attn.hook_*`.
- `bridge_from_module(module)`: one Bridge equal to one supported attention module.
- `families`: one reader per supported family (SUPPORTED lists their module classes).
"""

from pyqkv.hf.attached import AttachedModel, HFAttention, attach, bridge_from_module, detach
from pyqkv.hf.families import FAMILIES, SUPPORTED, LayerSpec, family_of, layer_spec

__all__ = [
    "AttachedModel",
    "FAMILIES",
    "HFAttention",
    "LayerSpec",
    "SUPPORTED",
    "attach",
    "bridge_from_module",
    "detach",
    "family_of",
    "layer_spec",
]
