"""What only torch.ops.pyquant.int4_dynamic_mm (W4A8) has: its group-size rule, config checks and
layer round trip. The kernels against the reference on every backend and ISA are in
test_int4_ops.py (shared with int4 weight-only): the activation codes are bit-identical (the same
per-row int8 quantization as int8_dynamic_mm), the per-group integer dot products exact, and
only the fp32 sum over the groups may differ in order (tolerance "int4_dynamic_mm/<dtype>")."""
from __future__ import annotations

import pytest
import torch

import pyquant


@pytest.mark.parametrize("g,match", [(33, r"group_size=33 must be a positive even number"),
                                     (16, r"group_size=16 must be a multiple of 32")])
def test_bad_group(g, match):
    n, k = 13, 96
    p = torch.zeros(n, k // 2, dtype=torch.uint8)
    s = torch.ones(n, k // g if k % g == 0 else 1)
    z = torch.zeros_like(s, dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        torch.ops.pyquant.int4_dynamic_mm(torch.randn(3, k), p, s, z, g, None)


def test_config_validates():
    assert pyquant.Int4Dynamic().group_size == 128
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        pyquant.Int4Dynamic(group_size=48)
    with pytest.raises(TypeError, match="group_size must be an int"):
        pyquant.Int4Dynamic(group_size=True)


@pytest.mark.parametrize("symmetric", [False, True])
def test_layer_quality_and_save_load(tmp_path, symmetric):
    """quantize_ swaps in Int4DynamicLinear; its output tracks the float layer (cosine), and a
    save/load round trip into a fresh float model gives bit-identical outputs."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(256, 96), torch.nn.ReLU(),  # noqa: E731
                                       torch.nn.Linear(96, 64, bias=False))
    model = make()
    x = torch.randn(5, 256)
    ref = model(x)
    cfg = pyquant.Int4Dynamic(group_size=32, symmetric=symmetric)
    pyquant.quantize_(model, cfg)
    assert isinstance(model[0], pyquant.Int4DynamicLinear)
    assert model[0].config == cfg
    y = model(x)
    cos = torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.99
    path = tmp_path / "m.safetensors"
    pyquant.save(model, path)
    fresh = make()
    pyquant.load(fresh, path)
    assert isinstance(fresh[0], pyquant.Int4DynamicLinear) and fresh[0].config == cfg
    assert torch.equal(fresh(x), y)
