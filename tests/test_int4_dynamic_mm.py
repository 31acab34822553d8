"""torch.ops.pyquant.int4_dynamic_mm (W4A8) on every CPU backend and ISA against
pyquant.reference.int4_dynamic_mm: the activation codes are bit-identical (the same per-row int8
quantization as int8_dynamic_mm), the per-group integer dot products exact, and only the fp32
sum over the groups may differ in order (tolerance "int4_dynamic_mm/<dtype>")."""
from __future__ import annotations

import pytest
import torch

from helpers import (
    ACT_DTYPES,
    INT4_GROUP_SIZES,
    LAYOUTS,
    activation,
    backend_isa_params,
    check_op,
    make_bias,
    num_threads,
    random_int4_weight,
)
import pyquant
from pyquant import formats

OP = "int4_dynamic_mm"
BACKENDS = backend_isa_params()
MS = [0, 1, 3, 17, 64]


def weights(n, k, g, seed=0):
    return (*random_int4_weight(n, k, g, seed), g)


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("group", INT4_GROUP_SIZES)
@pytest.mark.parametrize("n", [13, 33])
@pytest.mark.parametrize("groups", [1, 3])
def test_group_sizes(backend, isa, group, n, groups):
    k = group * groups
    x = activation((17, k), seed=k)
    check_op(OP, backend, isa, x, weights(n, k, group, seed=n), make_bias(n, "x", x.dtype))


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k,group", [(13, 192, 64), (33, 384, 128), (7, 96, 32)])
def test_m(backend, isa, m, n, k, group):
    x = activation((m, k), seed=m)
    check_op(OP, backend, isa, x, weights(n, k, group), make_bias(n, "x", x.dtype))


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [None, "x", "fp32"])
def test_dtypes_and_bias(backend, isa, dtype, bias):
    n, k, g = 33, 96, 32
    x = activation((17, k), dtype)
    out = check_op(OP, backend, isa, x, weights(n, k, g), make_bias(n, bias, dtype))
    assert out.dtype == dtype


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_3d(backend, isa, dtype):
    n, k, g = 33, 128, 64
    x = activation((2, 5, k), dtype)
    out = check_op(OP, backend, isa, x, weights(n, k, g), make_bias(n, "x", dtype))
    assert out.shape == (2, 5, n)


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "contiguous"])
def test_strided_activations(backend, isa, layout, dtype):
    n, k, g = 33, 192, 64
    x = activation((17, k), dtype, layout=layout)
    check_op(OP, backend, isa, x, weights(n, k, g), make_bias(n, "fp32", dtype),
             msg=f"x strides {x.stride()}")


@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_strided_weights(backend, isa):
    n, k, g = 13, 128, 32
    packed, scales, zeros = random_int4_weight(n, k, g)
    p_t = packed.t().contiguous().t()
    s_t = scales.t().contiguous().t()
    z_t = zeros.t().contiguous().t()
    assert not (p_t.is_contiguous() or s_t.is_contiguous() or z_t.is_contiguous())
    check_op(OP, backend, isa, activation((5, k)), (p_t, s_t, z_t, g), make_bias(n, "x", torch.float32))


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_threads(backend, isa, threads):
    n, k, g = 130, 1024, 128
    x = activation((64, k), seed=3)
    with num_threads(threads):
        check_op(OP, backend, isa, x, weights(n, k, g, seed=3), make_bias(n, "x", x.dtype))


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("zero", [0, 8, 15])
def test_extreme_codes(backend, isa, zero):
    """Codes 0 and 15 with zero points 0, 8, 15 and activations at +-127 (rows with one
    large value quantize to the extremes): the largest per-group products."""
    n, k, g = 13, 256, 256
    codes = torch.where((torch.arange(n * k) % 3 == 0).reshape(n, k), 15, 0).to(torch.uint8)
    zeros = torch.full((n, k // g), zero, dtype=torch.uint8)
    scales = torch.rand(n, k // g) + 0.5
    x = torch.where(torch.arange(3 * k).reshape(3, k) % 2 == 0, 1.0, -1.0)
    check_op(OP, backend, isa, x, (formats.pack_int4(codes), scales, zeros, g), None)


@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_empty_n(backend, isa):
    check_op(OP, backend, isa, activation((3, 64)), weights(0, 64, 32), None)


@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_k_zero(backend, isa):
    b = make_bias(5, "x", torch.float32)
    out = check_op(OP, backend, isa, activation((3, 0)), weights(5, 0, 32), b)
    assert torch.equal(out, b.expand(3, 5))


@pytest.mark.parametrize(
    "shape,bias,group",
    [((0, 128), None, 32), ((1, 128), None, 64), ((17, 128), "x", 128), ((2, 3, 256), "fp32", 256)],
    ids=["M0-nobias-g32", "M1-nobias-g64", "M17-bias-g128", "3d-fp32bias-g256"],
)
def test_opcheck(no_backend_env, shape, bias, group):
    x = activation(shape)
    packed, scales, zeros = random_int4_weight(13, shape[-1], group)
    torch.library.opcheck(torch.ops.pyquant.int4_dynamic_mm.default,
                          (x, packed, scales, zeros, group, make_bias(13, bias, x.dtype)))


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


# -------------------------------------- the AMX int8 path (M >= 9, G % 64 == 0, N % 32 == 0)
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("m,n,k,group", [(9, 32, 64, 64), (17, 64, 384, 64),
                                         (40, 96, 256, 128), (100, 32, 512, 256)])
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_amx_shapes(backend, isa, m, n, k, group, dtype):
    x = activation((m, k), dtype, seed=m)
    check_op(OP, backend, isa, x, weights(n, k, group, seed=n), make_bias(n, "fp32", dtype))


@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_amx_strided_3d(backend, isa):
    x = activation((3, 12, 256), seed=4)[..., ::2]
    check_op(OP, backend, isa, x, weights(64, 128, 64, seed=3), None)
