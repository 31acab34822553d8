"""The two int4 ops, weight-only and dynamic (W4A8), against their references on every CPU
backend and ISA: the contract they share (shapes, dtypes, layouts, threads, edge sizes,
opcheck). What only one of them has is in test_int4_weight_only_mm.py / test_int4_dynamic_mm.py.
Kernel error only: random canonical codes, scales and zero points (quantization error is
test_formats.py's)."""
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
from pyquant import formats

OPS = ("int4_weight_only_mm", "int4_dynamic_mm")
BACKENDS = backend_isa_params()
MS = [0, 1, 3, 17, 64]
op_param = pytest.mark.parametrize("op", OPS)


def weights(n, k, g, seed=0):
    return (*random_int4_weight(n, k, g, seed), g)


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("group", INT4_GROUP_SIZES)
@pytest.mark.parametrize("n", [13, 33])
@pytest.mark.parametrize("groups", [1, 3])
def test_group_sizes(op, backend, isa, group, n, groups):
    k = group * groups
    x = activation((17, k), seed=k)
    check_op(op, backend, isa, x, weights(n, k, group, seed=n), make_bias(n, "x", x.dtype))


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k,group", [(13, 192, 64), (33, 384, 128), (7, 96, 32)])
def test_m(op, backend, isa, m, n, k, group):
    x = activation((m, k), seed=m)
    check_op(op, backend, isa, x, weights(n, k, group), make_bias(n, "x", x.dtype))


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [None, "x", "fp32"])
def test_dtypes_and_bias(op, backend, isa, dtype, bias):
    n, k, g = 33, 96, 32
    x = activation((17, k), dtype)
    out = check_op(op, backend, isa, x, weights(n, k, g), make_bias(n, bias, dtype))
    assert out.dtype == dtype


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_3d(op, backend, isa, dtype):
    n, k, g = 33, 128, 64
    x = activation((2, 5, k), dtype)
    out = check_op(op, backend, isa, x, weights(n, k, g), make_bias(n, "x", dtype))
    assert out.shape == (2, 5, n)


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "contiguous"])
def test_strided_activations(op, backend, isa, layout, dtype):
    n, k, g = 33, 192, 64
    x = activation((17, k), dtype, layout=layout)
    check_op(op, backend, isa, x, weights(n, k, g), make_bias(n, "fp32", dtype),
             msg=f"x strides {x.stride()}")


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_strided_weights(op, backend, isa):
    """Non-contiguous packed codes, scales and zeros are legal inputs (copied by the wrapper)."""
    n, k, g = 13, 128, 32
    packed, scales, zeros = random_int4_weight(n, k, g)
    p_t = packed.t().contiguous().t()
    s_t = scales.t().contiguous().t()
    z_t = zeros.t().contiguous().t()
    assert not (p_t.is_contiguous() or s_t.is_contiguous() or z_t.is_contiguous())
    check_op(op, backend, isa, activation((5, k)), (p_t, s_t, z_t, g),
             make_bias(n, "x", torch.float32))


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_threads(op, backend, isa, threads):
    n, k, g = 130, 1024, 128
    x = activation((64, k), seed=3)
    with num_threads(threads):
        check_op(op, backend, isa, x, weights(n, k, g, seed=3), make_bias(n, "x", x.dtype))


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("zero", [0, 8, 15])
@pytest.mark.parametrize("k,g", [(64, 32), (256, 256)])
def test_extreme_codes(op, backend, isa, zero, k, g):
    """Codes 0 and 15 with zero points 0, 8, 15 and activations of +-1 (for W4A8: codes +-127):
    both nibbles at their extremes, the largest per-group products."""
    n = 13
    codes = torch.where((torch.arange(n * k) % 3 == 0).reshape(n, k), 15, 0).to(torch.uint8)
    zeros = torch.full((n, k // g), zero, dtype=torch.uint8)
    scales = torch.rand(n, k // g) + 0.5
    x = torch.where(torch.arange(3 * k).reshape(3, k) % 2 == 0, 1.0, -1.0)
    check_op(op, backend, isa, x, (formats.pack_int4(codes), scales, zeros, g), None)


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_empty_n(op, backend, isa):
    check_op(op, backend, isa, activation((3, 64)), weights(0, 64, 32), None)


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_k_zero(op, backend, isa):
    """K = 0 (nn.Linear(0, n) is legal): the empty sum, so the output is the bias."""
    b = make_bias(5, "x", torch.float32)
    out = check_op(op, backend, isa, activation((3, 0)), weights(5, 0, 32), b)
    assert torch.equal(out, b.expand(3, 5))


@op_param
@pytest.mark.parametrize(
    "shape,bias,group",
    [((0, 128), None, 32), ((1, 128), None, 64), ((17, 128), "x", 128), ((2, 3, 256), "fp32", 256)],
    ids=["M0-nobias-g32", "M1-nobias-g64", "M17-bias-g128", "3d-fp32bias-g256"],
)
def test_opcheck(no_backend_env, op, shape, bias, group):
    x = activation(shape)
    packed, scales, zeros = random_int4_weight(13, shape[-1], group)
    torch.library.opcheck(getattr(torch.ops.pyquant, op).default,
                          (x, packed, scales, zeros, group, make_bias(13, bias, x.dtype)))


# ------------------------------------- the AMX paths (M >= 9 or 16, N % 32 == 0, G % 32 or 64)
# On CPUs with AMX these run on tiles: bf16 tiles for weight-only (activations split into up
# to three exact bf16 terms), int8 tiles for W4A8; each group's sum is scaled once (see
# csrc/cpu/tile_amx_grouped.h). Every ISA runs them.
AMX_CASES = [(16, 32, 64, 32), (16, 32, 64, 64), (17, 64, 192, 64), (40, 96, 256, 128),
             (100, 32, 512, 256)]


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("m,n,k,group", AMX_CASES)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_amx_shapes(op, backend, isa, m, n, k, group, dtype):
    # a dynamic range of 1e-3..1e3 across K, so all three bf16 terms of fp32 are nonzero
    g = torch.Generator().manual_seed(k)
    scale = torch.logspace(-3, 3, k)[torch.randperm(k, generator=g)]
    x = (activation((m, k), seed=m) * scale).to(dtype)
    check_op(op, backend, isa, x, weights(n, k, group, seed=n), make_bias(n, "fp32", dtype))


# Past 1.5 MiB of packed activations the AMX strip GEMM blocks K in chunks of whole groups
# (1 KiB of a weight row) over 256 x 256 tasks (csrc/cpu/kernels.h): W4A8 at M = 410, K = 4160
# (65 groups of 64: chunks of 16, 16, 16, 16, 1) and weight-only with fp32 activations (three
# bf16 terms) at M = 70, K = 4224 (33 groups of 128: chunks of 4); N = 288 makes a second,
# partial task column, M = 410 and 70 a partial last tile.
AMX_CHUNKED = [("int4_dynamic_mm", 410, 288, 4160, 64),
               ("int4_weight_only_mm", 70, 288, 4224, 128)]
# When all rows' packed activations fit in L2 (W4A8 at K = 1024, weight-only with bf16
# activations at K = 512: one term), a task takes every activation row if there are at least
# two weight strips of 32 rows per thread (N = 160, or N = 96 at one thread), else at most
# 512 rows (kAmxGroupedMc: N = 96 at two threads), and M = 530 makes a second, partial row
# block that converts the strips again. fp32 activations (three terms) pass L2 and take the
# chunked, 512-row path.
# Rows of at most 512 bytes (W4A8 at K = 384, weight-only with bf16 activations at K = 256)
# take the short-row order: each thread converts its share of the 3 strips (2 and 1 at two
# threads) and sweeps all rows over them; M = 130 ends in a partial tile of an odd count.
AMX_ROW_BLOCKS = [("int4_dynamic_mm", 530, 96, 1024, 64),
                  ("int4_dynamic_mm", 530, 160, 1024, 64),
                  ("int4_weight_only_mm", 530, 96, 512, 128),
                  ("int4_weight_only_mm", 530, 160, 512, 128),
                  ("int4_dynamic_mm", 130, 96, 384, 64),
                  ("int4_weight_only_mm", 130, 96, 256, 64)]


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("op,m,n,k,group", AMX_CHUNKED, ids=[c[0] for c in AMX_CHUNKED])
def test_amx_k_chunks(op, backend, isa, m, n, k, group):
    x = activation((m, k), seed=m)
    check_op(op, backend, isa, x, weights(n, k, group, seed=n), make_bias(n, "fp32", x.dtype))


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("op,m,n,k,group", AMX_ROW_BLOCKS,
                         ids=[f"{c[0]}-n{c[2]}" for c in AMX_ROW_BLOCKS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_row_blocks(op, backend, isa, m, n, k, group, dtype, threads):
    x = activation((m, k), seed=m).to(dtype)
    with num_threads(threads):
        check_op(op, backend, isa, x, weights(n, k, group, seed=n), make_bias(n, "fp32", dtype))


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_amx_strided_3d(op, backend, isa):
    x = activation((3, 12, 256), seed=4)[..., ::2]
    check_op(op, backend, isa, x, weights(64, 128, 64, seed=3), None)


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("m", [1, 3, 7, 20])
def test_zero_points_past_15(op, backend, isa, m):
    """The ops take any uint8 zero point, though the quantizers write 0..15: a group whose zero
    point is 200 (codes minus zero down to -200) must not take a path that assumes a nibble.
    M = 1 and 7 reach the fixed-point decode paths, M = 20 and N = 32 the AMX ones, which
    convert codes per group."""
    n, k, g = 32, 256, 64
    packed, scales, zeros = random_int4_weight(n, k, g, seed=5)
    zeros[::2, 1] = 200
    check_op(op, backend, isa, activation((m, k), seed=m), (packed, scales, zeros, g), None)


_SHORT_TEAM_SCRIPT = r"""
import torch
from pyquant import formats, ops, reference
torch.set_num_threads(4)
g = torch.Generator().manual_seed(0)
bad = []
for op, k in (("int4_dynamic_mm", 384), ("int4_weight_only_mm", 256)):
    n, group = 96, 64
    c, s, z = formats.quantize_int4_groupwise(torch.randn(n, k, generator=g), group)
    wargs = (formats.pack_int4(c), s, z, group)
    x = torch.randn(130, k, generator=g)
    got = getattr(ops, op)(x, *wargs, None)
    want = getattr(reference, op)(x, *wargs, None)
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3):
        bad.append(op)
print("bad", bad)
"""


def test_amx_short_rows_with_fewer_omp_threads_than_asked():
    """OpenMP may start fewer threads than a kernel asks for (OMP_THREAD_LIMIT, nested
    regions): the short-row AMX order, which splits the weight strips into per-thread shares,
    must still compute every share (it left a third of the columns unwritten)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_THREAD_LIMIT": "2", "PYQUANT_QUIET": "1"}
    r = subprocess.run([sys.executable, "-c", _SHORT_TEAM_SCRIPT], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "bad []", r.stdout


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("m", [8, 12, 70])
@pytest.mark.parametrize("n,k,group", [(7, 2112, 64), (13, 1280, 128), (37, 1024, 32)])
def test_dequantized_tiles(backend, isa, m, n, k, group):
    """int4 weight-only from M = 8 on AVX2 (12 on AVX512) dequantizes 6 (AVX2) or 4 weight
    rows at a time in chunks of 1024 codes: N leaves a partial row tile, K a partial chunk
    (2112 = 2 x 1024 + 64), M = 70 two activation blocks."""
    x = activation((m, k), seed=m + n)
    check_op("int4_weight_only_mm", backend, isa, x, weights(n, k, group, seed=k),
             make_bias(n, "fp32", x.dtype))
