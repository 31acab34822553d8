"""torch.ops.pyquant.int4_weight_only_mm on every CPU backend and ISA against
pyquant.reference.int4_weight_only_mm (kernel error only: random canonical codes, scales and
zero points; quantization error is test_formats.py's)."""
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
    reference_op,
    run_op,
)
from pyquant import formats

OP = "int4_weight_only_mm"
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
@pytest.mark.parametrize("n,k,group", [(13, 192, 64), (33, 384, 128)])
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
    """Codes 0 and 15 with zero points 0, 8, 15: both nibbles at their extremes."""
    n, k, g = 13, 64, 32
    codes = torch.where((torch.arange(n * k) % 3 == 0).reshape(n, k), 15, 0).to(torch.uint8)
    zeros = torch.full((n, k // g), zero, dtype=torch.uint8)
    scales = torch.rand(n, k // g) + 0.5
    check_op(OP, backend, isa, activation((3, k)), (formats.pack_int4(codes), scales, zeros, g), None)


@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_empty_n(backend, isa):
    check_op(OP, backend, isa, activation((3, 64)), weights(0, 64, 32), None)


@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_k_zero(backend, isa):
    """K = 0 (nn.Linear(0, n) is legal): the empty sum, so the output is the bias."""
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
    torch.library.opcheck(torch.ops.pyquant.int4_weight_only_mm.default,
                          (x, packed, scales, zeros, group, make_bias(13, bias, x.dtype)))


def _bad_cases():
    n, k, g = 13, 128, 32
    x = torch.randn(3, k)
    p, s, z = random_int4_weight(n, k, g)
    b = torch.randn(n)
    meta = torch.device("meta")
    ok = dict(x=x, p=p, s=s, z=z, g=g, b=b)

    def case(name, exc, match, **changes):
        return pytest.param({**ok, **changes}, exc, match, id=name)

    return [
        case("x_int32", TypeError, r"x has dtype torch\.int32", x=x.to(torch.int32)),
        case("x_float64", TypeError, r"x has dtype torch\.float64", x=x.double()),
        case("w_int8", TypeError, r"w_packed has dtype torch\.int8, expected torch\.uint8",
             p=p.view(torch.int8)),
        case("w_1d", ValueError, r"w_packed must be a 2-D uint8 tensor", p=p.flatten()),
        case("k_mismatch", ValueError, r"x has shape \(3, 127\) but the weight expects K=128",
             x=torch.randn(3, k - 1)),
        case("k_unpacked_x", ValueError, r"x has shape \(3, 64\) but the weight expects K=128",
             x=torch.randn(3, k // 2)),
        case("group_not_dividing_k", ValueError, r"K=96 is not a multiple of group_size=64",
             x=torch.randn(3, 96), p=p[:, :48], s=s[:, :1], z=z[:, :1], g=64),
        case("group_odd", ValueError, r"group_size=33 must be a positive even number", g=33),
        case("group_zero", ValueError, r"group_size=0 must be a positive even number", g=0),
        case("group_negative", ValueError, r"group_size=-32 must be a positive even number", g=-32),
        # torch's op schema turns a Python bool into the int 1 before pyquant sees it; it is
        # still rejected (1 is odd). The config (test_quantize_api) rejects bools by type.
        case("group_bool", ValueError, r"group_size=1 must be a positive even number", g=True),
        case("scales_shape", ValueError, r"scales has shape \(13, 2\), expected \(13, 4\)",
             s=s[:, :2]),
        case("scales_dtype", TypeError, r"scales has dtype torch\.bfloat16, expected torch\.float32",
             s=s.bfloat16()),
        case("zeros_shape", ValueError, r"zeros has shape \(12, 4\), expected \(13, 4\)", z=z[:-1]),
        case("zeros_dtype", TypeError, r"zeros has dtype torch\.int32, expected torch\.uint8",
             z=z.to(torch.int32)),
        case("bias_shape", ValueError, r"bias has shape \(14,\), expected \(13,\)",
             b=torch.randn(14)),
        case("bias_int", TypeError, r"bias has dtype torch\.int32", b=b.to(torch.int32)),
        case("w_meta", ValueError, r"w_packed is on meta but x is on cpu", p=p.to(meta)),
        case("scales_meta", ValueError, r"scales is on meta but x is on cpu", s=s.to(meta)),
        case("zeros_meta", ValueError, r"zeros is on meta but x is on cpu", z=z.to(meta)),
        case("bias_meta", ValueError, r"bias is on meta but x is on cpu", b=b.to(meta)),
    ]


@pytest.mark.parametrize("args,exc,match", _bad_cases())
def test_bad_inputs(args, exc, match):
    a = args
    with pytest.raises(exc, match=match):
        torch.ops.pyquant.int4_weight_only_mm(a["x"], a["p"], a["s"], a["z"], a["g"], a["b"])


# ------------------------------------------- the AMX-BF16 path (M >= 16, K % 32, N % 32 == 0)
# On CPUs with AMX these shapes run on bf16 tiles: codes minus zero points are exact in bf16,
# the activations are split into up to three bf16 terms, and each group's fp32 sum is scaled
# once (see csrc/cpu/tile_amx_bf16.h).
AMX_CASES = [(16, 32, 64, 32), (17, 64, 192, 64), (40, 96, 256, 128), (100, 32, 512, 256)]


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("m,n,k,group", AMX_CASES)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_amx_bf16_shapes(backend, isa, m, n, k, group, dtype):
    g = torch.Generator().manual_seed(k)
    scale = torch.logspace(-3, 3, k)[torch.randperm(k, generator=g)]
    x = (activation((m, k), seed=m) * scale).to(dtype)
    check_op(OP, backend, isa, x, random_int4_weight(n, k, group, seed=n) + (group,),
             make_bias(n, "fp32", dtype))


@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_amx_bf16_strided_3d_nonfinite(backend, isa):
    wargs = random_int4_weight(64, 128, 64, seed=3) + (64,)
    x = activation((3, 12, 256), seed=4)[..., ::2]
    check_op(OP, backend, isa, x, wargs, None)
    x = activation((20, 128), seed=5)
    x[2, 3], x[9, 100] = float("inf"), float("nan")
    got, want = run_op(OP, backend, isa, x, wargs, None), reference_op(OP, x, wargs, None)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
