"""pyqkv: fast hookable fused-QKV attention for interpretability research.

bridge = pyqkv.hf.bridge_from_module(gpt2_attention)   # or pyqkv.Bridge(weight, bias, ...)
out, cache = bridge.run_with_cache(x, names_filter=["hook_pattern"])
with bridge.hooks(fwd_hooks=[("hook_z", lambda z, hook: z.index_fill(2, head, 0))]):
    ablated = bridge(x)
"""

try:
    from pyqkv import ops
except ImportError as e:  # a source tree without its built extension: say what is wrong and what to do
    if "_C" not in str(e):
        raise
    import glob as _glob
    import os as _os

    _here = _os.path.dirname(__file__)
    _built = _glob.glob(_os.path.join(_here, "_C*.so")) + _glob.glob(_os.path.join(_here, "_C*.pyd"))
    _why = f"{_built[0]} does not load ({e})" if _built else f"it is not built (no _C*.so in {_here})"
    raise ImportError(
        f"pyqkv's native extension pyqkv._C is missing: {_why}. Build it with `make build`, or with "
        "`pip install --no-build-isolation -e .` in an environment that has torch 2.11-2.15."
    ) from None
from pyqkv import utils
from pyqkv.activation_cache import ActivationCache
from pyqkv.bridge import Bridge, BridgeConfig
from pyqkv.cache import KVCache
from pyqkv.hooks import HookPoint, zero_heads
from pyqkv.utils import get_act_name


def __getattr__(name):
    # pyqkv.hf is imported on first use: it is the only module that knows Hugging Face.
    if name == "hf":
        import importlib

        return importlib.import_module("pyqkv.hf")
    raise AttributeError(f"module 'pyqkv' has no attribute {name!r}")


__all__ = [
    "ActivationCache",
    "Bridge",
    "BridgeConfig",
    "HookPoint",
    "KVCache",
    "get_act_name",
    "hf",
    "ops",
    "utils",
    "zero_heads",
]
__version__ = "0.1.0"
