"""torch.compile over a Bridge with no hooks: one graph (fullgraph=True fails on any break) around the
native ops, equal to eager. aot_eager keeps the test fast; it runs the fake kernels and the autograd
formulas through AOTAutograd, which is what a graph break or a bad fake would trip."""

import pytest
import torch

import pyqkv
from pyqkv import bench


@pytest.fixture
def layer(device):
    w = bench.LayerWeights.random(d_model=64, n_heads=4, d_head=16, device=device)
    return w.bridge()


def test_compiled_bridge_equals_eager(device, layer):
    x = torch.randn(2, 9, 64, device=device)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
        mask = torch.ones(2, 9, dtype=torch.bool, device=device)
        mask[0, :3] = False
        torch.testing.assert_close(compiled(x, attention_mask=mask), layer(x, attention_mask=mask), rtol=0, atol=0)


def test_compiled_bridge_with_kv_cache(device, layer):
    x = torch.randn(2, 12, 64, device=device)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        cache = pyqkv.KVCache()
        steps = [compiled(x[:, :8], kv_cache=cache)] + [compiled(x[:, t : t + 1], kv_cache=cache) for t in range(8, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), layer(x), rtol=1e-5, atol=1e-6)


def test_compiled_bridge_gradients(device, layer):
    x = torch.randn(2, 9, 64, device=device, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    (g_compiled,) = torch.autograd.grad(compiled(x).square().sum(), x)
    (g_eager,) = torch.autograd.grad(layer(x).square().sum(), x)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-6)
