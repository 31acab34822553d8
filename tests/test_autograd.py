"""Gradients through the quantized and sparse layers (pyquant.ops: the autograd formula of
every op). The weights are frozen codes; dL/dx = dL/dy @ W with the dense weight the layer
multiplies (the dynamic ops pass the activations' rounding straight through), dL/dbias =
the sum of dL/dy. W is probed here from the layer's own outputs on the unit vectors, not
from the formula's helper, so the test does not check the code with itself."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pyquant
from helpers import LAYER_CONFIGS, one_layer

def _probe_weight(layer, k):
    """W [N, K] from the layer's outputs on the unit vectors e_k (exact codes for the
    dynamic ops too: a row of one 1 quantizes to 127 with scale 1/127)."""
    with torch.no_grad():
        eye = torch.eye(k)
        bias = layer.bias if layer.bias is not None else 0
        return (layer(eye) - bias).T.contiguous()


@pytest.mark.parametrize("shape", [(5,), (2, 3), (1,)], ids=["2d", "3d", "m1"])
@pytest.mark.parametrize("config", LAYER_CONFIGS)
def test_grad_of_x_and_bias(config, shape):
    k = 128
    layer = one_layer(config, k)
    w = _probe_weight(layer, k)
    layer.bias.requires_grad_(True)
    x = torch.randn(*shape, k, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(g)
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, g.reshape(-1, g.shape[-1]).sum(0))


@pytest.mark.parametrize("config", LAYER_CONFIGS[:4])
def test_grad_in_bf16_and_through_a_model(config):
    """A bf16 model: the gradient comes back in bf16; and a trainable float layer in front
    of a quantized one learns (its weight gets a gradient, an optimizer step changes it)."""
    k = 128
    layer = one_layer(config, k)
    w = _probe_weight(layer, k)
    x = torch.randn(4, k).bfloat16().requires_grad_(True)
    g = torch.randn(4, layer.out_features).bfloat16()
    layer.bfloat16()(x).backward(g)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), g.float() @ w, rtol=2e-2, atol=2e-2)

    front = nn.Linear(16, k)
    model = nn.Sequential(front, nn.ReLU(), one_layer(config, k))
    opt = torch.optim.SGD(front.parameters(), lr=0.1)
    before = front.weight.detach().clone()
    model(torch.randn(8, 16)).square().mean().backward()
    assert front.weight.grad is not None and front.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(front.weight, before)


@pytest.mark.parametrize("config", LAYER_CONFIGS)
def test_grad_by_blocks_of_rows(config, monkeypatch):
    """Every op dequantizes (and decompresses) W for the backward a block of output rows at a
    time (to bound its memory; the unstructured values cut at their row offsets): with blocks
    of 8 rows over 24 (and a last partial block over 20), the gradient is the same as from the
    whole W."""
    from pyquant import ops

    k = 128
    for n in (24, 20):
        layer = one_layer(config, k, n)
        w = _probe_weight(layer, k)
        x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
        g = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(5))
        monkeypatch.setattr(ops, "_GRAD_ROWS", 8)
        layer(x).backward(g)
        torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", LAYER_CONFIGS)
def test_compiled_backward_in_one_graph(config):
    """torch.compile(fullgraph=True) traces every op's backward too: the unstructured one
    decompressed its weight with value-reading checks, a graph break that fullgraph refused."""
    layer = one_layer(config)
    x = torch.randn(3, 128, requires_grad=True)
    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True, backend="aot_eager")(x).sum().backward()
    xe = x.detach().clone().requires_grad_(True)
    layer(xe).sum().backward()
    assert torch.equal(x.grad, xe.grad)
