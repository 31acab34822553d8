"""What only torch.ops.pyquant.int4_weight_only_mm has: its argument errors and the non-finite
inputs of its AMX-BF16 path. The kernels against the reference on every backend and ISA are in
test_int4_ops.py (shared with int4 dynamic)."""
from __future__ import annotations

import pytest
import torch

from helpers import (
    ACT_DTYPES,
    activation,
    backend_isa_params,
    check_op,
    isa_params,
    make_bias,
    random_int4_weight,
    reference_op,
    run_op,
)
from pyquant import _native, formats

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


# The decode-size path of the native kernel (pq.h): with G % 64 == 0, at M == 1 (and M <= 4 when
# K % 128 == 0 and G == 64 or G % 128 == 0) on AVX512-VNNI, plus 5 <= M <= 15 on AMX and M >= 5
# on the AVX512 ISAs without AMX (K % 64 == 0, G % 32 == 0: the W4A8 panel GEMM), each row of
# x is written in 24-bit fixed point (three int8 terms, |error| <= s = max|x_row| / 8323072 per
# entry) and runs exact int8 x int4 sums. AVX2 has that M <= 4 GEMV only (GEMV_ISAS).
FIXED_ISAS = [p for p in isa_params() if p.values[1] in ("avx512_vnni", "avx512_bf16", "avx512_amx")]
GEMV_ISAS = FIXED_ISAS + [p for p in isa_params() if p.values[1] == "avx2"]


def _fixed_path_runs(isa: str, m: int, k: int, n: int, g: int) -> bool:
    return bool(_native.module().int4_weight_only_fixed_point(_native._parse_isa(isa), m, k, g))


@pytest.mark.parametrize("backend,isa", GEMV_ISAS)
@pytest.mark.parametrize("m", [1, 2, 5, 8, 15, 16])
@pytest.mark.parametrize("g", [64, 128, 256])
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_fixed_point_path(backend, isa, m, g, dtype):
    n, k = 37, 3 * g
    amx_range = isa == "avx512_amx" and 5 <= m <= 15
    gemv = m <= 4 and k % 128 == 0  # the fixed-point GEMV (G here is 64, 128 or 256)
    panel = isa not in ("avx512_amx", "avx2") and m >= 5  # the W4A8 panel GEMM (K % 64 == 0)
    w4a8 = isa != "avx2" and m == 1  # the W4A8 kernel on the three term rows
    assert _fixed_path_runs(isa, m, k, n, g) == (w4a8 or gemv or amx_range or panel)
    assert not _fixed_path_runs(isa, m, 3 * 32, n, 32)  # G = 32: the float path
    x = activation((m, k), dtype, seed=m + g)
    x[0, 5] = 300.0  # an outlier entry: the row's scale grows with it
    check_op(OP, backend, isa, x, random_int4_weight(n, k, g, seed=g) + (g,),
             make_bias(n, "x", dtype))


# Without AMX, the fixed-point rows run the W4A8 panel GEMM in slices of at most 128 rows of x
# (the scratch holds one slice): M = 130 ends in a slice of 2 rows, which takes the GEMV-shaped
# W4A8 kernel (6 term rows, K % 128 != 0) and its fp32 term outputs, M = 261 in one of 5 (the
# panel again). K % 64 != 0 keeps the float path.
@pytest.mark.parametrize("backend,isa", FIXED_ISAS)
@pytest.mark.parametrize("m,n,k,g", [(130, 37, 2112, 64), (261, 45, 2048, 128), (130, 700, 64, 64)])
def test_fixed_point_slices(backend, isa, m, n, k, g):
    assert _fixed_path_runs(isa, m, k, n, g) == (isa != "avx512_amx")
    assert not _fixed_path_runs(isa, m, 1952, n, 32)  # K % 64 == 32
    if isa != "avx512_amx":  # the scratch covers the last slice's term outputs too
        need = _native.module().int4_weight_only_workspace_bytes(_native._parse_isa(isa), m, k, n, g, 2)
        assert need >= 3 * (m % 128) * n * 4
    x = activation((m, k), seed=m)
    x[m - 1, 3] = 250.0  # the last slice's rows have their own scales
    check_op(OP, backend, isa, x, random_int4_weight(n, k, g, seed=m) + (g,),
             make_bias(n, "x", torch.float32))


# At M <= 4 with K % 128 == 0 and G == 64 or G % 128 == 0, the fixed-point rows run a GEMV of
# their own (tile_int4_fx24.h): 128-code blocks, the three terms in one int32 accumulator, a
# scale vector of two halves for G = 64, zero points 16 groups a vector (18 groups here), each x
# row with its own scale. G = 192 straddles blocks: M = 1 runs the W4A8 kernel, M = 2, 4 the
# float GEMV.
@pytest.mark.parametrize("backend,isa", GEMV_ISAS)
@pytest.mark.parametrize("n,k,g", [(37, 256, 64), (5, 128, 64), (61, 640, 128), (19, 512, 256),
                                   (9, 1152, 64), (23, 384, 192)])
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 4])
def test_fixed_point_gemv_blocks(backend, isa, n, k, g, m, dtype):
    assert _fixed_path_runs(isa, m, k, n, g) == (g != 192 or (m == 1 and isa != "avx2"))
    x = activation((m, k), dtype, seed=n + k + m)
    x[0, 7] = -300.0  # rows of different scales
    x[-1] *= 1e-3
    p, s, z = random_int4_weight(n, k, g, seed=k + g)
    z[n // 2] = 15  # zero points at both ends of the code range
    z[n // 3] = 0
    check_op(OP, backend, isa, x, (p, s, z, g), make_bias(n, "x", dtype))


@pytest.mark.parametrize("backend,isa", GEMV_ISAS)
@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("m", [1, 4])
def test_fixed_point_gemv_zero_points_are_exact(backend, isa, g, m):
    """Activations far from zero mean (as after a ReLU) make sum X * code much larger than
    sum X * (code - zero). The GEMV takes zero * sum X off each lane in int32 before the
    convert, so the result keeps fp32's rounding of itself; taken off in fp32 after the sum
    over groups, it left 1.1-1.4e-5 of max|y| here (x = randn + 10, K = 4096)."""
    n, k = 64, 4096
    p, s, z = random_int4_weight(n, k, g, seed=3)
    x = activation((m, k), seed=4) + 10.0
    assert _fixed_path_runs(isa, m, k, n, g)
    got = run_op(OP, backend, isa, x, (p, s, z, g), None).double()
    exact = x.double() @ formats.dequantize_int4_groupwise(p, s, z, g).double().T
    assert ((got - exact).abs().max() / exact.abs().max()).item() < 1e-6


@pytest.mark.parametrize("backend,isa", GEMV_ISAS)
@pytest.mark.parametrize("g", [128, 256])
@pytest.mark.parametrize("code,zero", [(15, 0), (0, 15)])
@pytest.mark.parametrize("m", [1, 2])
def test_fixed_point_gemv_lanes_at_their_bound(backend, isa, g, code, zero, m):
    """Every x at the row's largest magnitude (X = -8323072) and |code - zero| = 15 everywhere
    put each int32 lane at its bound: the AVX2 GEMV at G % 128 == 0 adds a block's two halves in
    int16 and sums 16 codes a lane, 16 * 8323072 * 15 < 2^31. A lane of more codes (two blocks)
    would wrap, and so would int16 sums of the hi term past 32767."""
    n, k = 24, 1024
    p = torch.full((n, k // 2), code | code << 4, dtype=torch.uint8)
    z = torch.full((n, k // g), zero, dtype=torch.uint8)
    s = torch.linspace(0.5, 2.0, n * (k // g), dtype=torch.float32).reshape(n, k // g)
    x = torch.full((m, k), -3.0)
    x[-1] *= 1e-3  # another row scale
    assert _fixed_path_runs(isa, m, k, n, g)
    got = run_op(OP, backend, isa, x, (p, s, z, g), None).double()
    exact = x.double() @ formats.dequantize_int4_groupwise(p, s, z, g).double().T
    assert ((got - exact).abs() / exact.abs()).max().item() < 1e-6


@pytest.mark.parametrize("backend,isa", GEMV_ISAS)
def test_fixed_point_error_bound(backend, isa):
    """The documented bound, on a row whose entries span 7 decades (the small ones keep only a
    few bits): |out - exact| <= s * sum_k |w[n,k]| plus fp32 rounding of the sums."""
    n, k, g = 29, 1024, 128
    p, s, z = random_int4_weight(n, k, g, seed=7)
    x = activation((1, k), seed=8) * 1e-3
    x[0, 100] = 1e4
    got = run_op(OP, backend, isa, x, (p, s, z, g), None).double()
    w = formats.dequantize_int4_groupwise(p, s, z, g).double()
    exact = x.double() @ w.T
    step = x.abs().max().item() / 8323072
    bound = step * w.abs().sum(1) + 1e-6 * (x.double().abs() @ w.abs().T)
    assert _fixed_path_runs(isa, 1, k, n, g)
    assert ((got - exact).abs() <= bound).all(), ((got - exact).abs() / bound).max()


@pytest.mark.parametrize("backend,isa", GEMV_ISAS)
def test_fixed_point_fallbacks(backend, isa):
    """Rows that fixed point cannot hold run the float path: non-finite ones (with the float
    path's Inf/NaN results) and ones whose max is below 2^-100 (s would be subnormal)."""
    n, k, g = 13, 256, 64
    wargs = random_int4_weight(n, k, g, seed=4) + (g,)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = activation((1, k), seed=6)
        x[0, 17] = bad
        got, want = run_op(OP, backend, isa, x, wargs, None), reference_op(OP, x, wargs, None)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    tiny = activation((1, k), seed=9) * 1e-33
    check_op(OP, backend, isa, tiny, wargs, None)
