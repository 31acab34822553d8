"""What only torch.ops.pyquant.int4_weight_only_mm has: its argument errors and the non-finite
inputs of its AMX-BF16 path. The kernels against the reference on every backend and ISA are in
test_int4_ops.py (shared with int4 dynamic)."""
from __future__ import annotations

import pytest
import torch

from helpers import (
    activation,
    backend_isa_params,
    random_int4_weight,
    reference_op,
    run_op,
)

OP = "int4_weight_only_mm"
BACKENDS = backend_isa_params()


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


# The AMX-BF16 path (M >= 16, N % 32 == 0; tests shared with W4A8 in test_int4_ops.py) cannot
# split Inf or NaN into bf16 terms: such calls run the fp32 kernels, with fp32's non-finite
# results.
@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_amx_bf16_nonfinite(backend, isa):
    wargs = random_int4_weight(64, 128, 64, seed=3) + (64,)
    x = activation((20, 128), seed=5)
    x[2, 3], x[9, 100] = float("inf"), float("nan")
    got, want = run_op(OP, backend, isa, x, wargs, None), reference_op(OP, x, wargs, None)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
