"""pyqkv: fast hookable fused-QKV attention for interpretability research.

    bridge = pyqkv.hf.bridge_from_module(gpt2_attention)   # or pyqkv.Bridge(weight, bias, ...)
    out, cache = bridge.run_with_cache(x, names_filter=["hook_pattern"])
    with bridge.hooks(fwd_hooks=[("hook_z", lambda z, hook: z.index_fill(2, head, 0))]):
        ablated = bridge(x)
"""

from pyqkv import ops
from pyqkv.bridge import Bridge, BridgeConfig
from pyqkv.cache import KVCache
from pyqkv.hooks import ActivationCache, HookPoint


def __getattr__(name):
    # pyqkv.hf is imported on first use: it is the only module that knows Hugging Face.
    if name == "hf":
        import importlib

        return importlib.import_module("pyqkv.hf")
    raise AttributeError(f"module 'pyqkv' has no attribute {name!r}")


__all__ = ["ActivationCache", "Bridge", "BridgeConfig", "HookPoint", "KVCache", "hf", "ops"]
__version__ = "0.1.0"
