"""Hugging Face glue, the only part of pyqkv that knows Hugging Face (importing it does not import
transformers; modules are recognized by class name).

- `attach(model)` / `detach(model)`: every supported attention module becomes a Bridge behind that
  module's calling convention (pyqkv.hf.attached), with the model-level hooks `blocks.{i}.attn.hook_*`.
- `bridge_from_module(module)`: one Bridge equal to one supported attention module.
- `families`: one reader per supported family (SUPPORTED lists their module classes).
- `register()` / `hooks_for(model)` / `enable(model)` (pyqkv.hf.interface): attn_implementation="pyqkv" for
  every model whose attention calls transformers' AttentionInterface, with the hook points that tier sees.

Importing pyqkv.hf registers "pyqkv" with transformers when transformers is installed (so
`from_pretrained(..., attn_implementation="pyqkv")` works); `import pyqkv` alone never imports it.
"""

from pyqkv.hf.attached import AttachedModel, HFAttention, attach, bridge_from_module, detach
from pyqkv.hf.families import FAMILIES, SUPPORTED, LayerSpec, family_of, layer_spec
from pyqkv.hf.interface import InterfaceHooks, enable, hooks_for, register

try:
    register()
except ImportError:  # transformers is not installed: there is nothing to register with
    pass

__all__ = [
    "AttachedModel",
    "FAMILIES",
    "HFAttention",
    "InterfaceHooks",
    "LayerSpec",
    "SUPPORTED",
    "attach",
    "bridge_from_module",
    "detach",
    "enable",
    "family_of",
    "hooks_for",
    "layer_spec",
    "register",
]
