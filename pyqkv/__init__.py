"""pyqkv: fast hookable fused-QKV attention for interpretability research."""

from pyqkv import ops

__all__ = ["ops"]
__version__ = "0.1.0"
