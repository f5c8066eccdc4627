"""The registry of supported Hugging Face attention families: module class name -> reader (pyqkv.hf.fused
for fused-QKV families, pyqkv.hf.separate for separate Q, K, V projections). Modules are matched by class
name along the MRO, so transformers is never imported here; a class whose bare name is too common to
match on (GPT-1's `Attention`) is registered as `module.ClassName` instead.
"""

from __future__ import annotations

from typing import Optional

from pyqkv.hf import fused, separate
from pyqkv.hf.spec import LayerSpec, UnsupportedModule

FAMILIES = {**fused.READERS, **separate.READERS}
SUPPORTED = tuple(FAMILIES)


def family_of(module) -> Optional[str]:
    for cls in type(module).__mro__:
        if cls.__name__ in FAMILIES:
            return cls.__name__
        qualified = f"{cls.__module__}.{cls.__name__}"
        if qualified in FAMILIES:
            return qualified
    return None


def layer_spec(module) -> LayerSpec:
    """The LayerSpec of a supported Hugging Face attention module; TypeError naming the supported ones else."""
    family = family_of(module)
    if family is None:
        raise TypeError(f"module: expected one of {', '.join(SUPPORTED)}, got {type(module).__name__}")
    try:
        return FAMILIES[family](module)
    except UnsupportedModule as e:
        raise UnsupportedModule(f"{e} (supported: {', '.join(SUPPORTED)})") from None
