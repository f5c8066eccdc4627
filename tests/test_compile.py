"""torch.compile over a Bridge with no hooks: one graph (fullgraph=True fails on any break) around the
native ops, equal to eager. aot_eager keeps the test fast; it runs the fake kernels and the autograd
formulas through AOTAutograd, which is what a graph break or a bad fake would trip. It runs the same
kernels as eager, so a compiled call equals the same eager call bit for bit; a compiled decode is
compared with the float64 oracle by the tolerance rule."""

import pytest
import torch
from test_bridge_oracle import Oracle
from tolerance import assert_close

import pyqkv
from pyqkv import bench


@pytest.fixture
def weights(device):
    return bench.LayerWeights.random(d_model=64, n_heads=4, d_head=16, device=device)


@pytest.fixture
def layer(weights):
    return weights.bridge()


def test_compiled_bridge_equals_eager(device, layer):
    x = torch.randn(2, 9, 64, device=device)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))
        mask = torch.ones(2, 9, dtype=torch.bool, device=device)
        mask[0, :3] = False
        assert torch.equal(compiled(x, attention_mask=mask), layer(x, attention_mask=mask))


def test_compiled_bridge_with_kv_cache(device, weights, layer):
    x = torch.randn(2, 12, 64, device=device)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    oracle = Oracle(weights.W_qkv, weights.b_qkv, weights.W_out, weights.b_out, n_heads=4, d_head=16)
    with torch.no_grad():
        cache = pyqkv.KVCache()
        steps = [compiled(x[:, :8], kv_cache=cache)] + [compiled(x[:, t : t + 1], kv_cache=cache) for t in range(8, 12)]
    assert_close(torch.cat(steps, dim=1), oracle(x), "compiled prefill + decode")


def test_compiled_bridge_gradients(device, layer):
    x = torch.randn(2, 9, 64, device=device, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    (g_compiled,) = torch.autograd.grad(compiled(x).square().sum(), x)
    (g_eager,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert torch.equal(g_compiled, g_eager)
