"""The two int8 ops, weight-only and dynamic (W8A8), against their references on every CPU
backend and ISA: the contract they share (shapes, dtypes, layouts, threads, edge sizes, opcheck,
argument errors), and at the end weight-only's non-finite inputs on its AMX-BF16 path. The
integer stages of W8A8, bit-exact, are in test_int8_dynamic_mm.py. Kernel error only: the
weights are canonical int8 codes (quantization error is test_formats.py's)."""
from __future__ import annotations

import pytest
import torch

from helpers import (
    ACT_DTYPES,
    LAYOUTS,
    activation,
    aligned_work,
    amx_only_query,
    assert_bf16_of_fp32,
    backend_isa_params,
    check_op,
    int8_bad_cases,
    make_bias,
    native_calls,
    num_threads,
    random_int8_weight,
    reference_op,
    run_op,
)

OPS = ("int8_weight_only_mm", "int8_dynamic_mm")
BACKENDS = backend_isa_params()
SHAPES = [(13, 100), (33, 257), (64, 128)]  # (N, K); 13/33/100/257 are no multiple of 8
MS = [0, 1, 3, 17, 64]
op_param = pytest.mark.parametrize("op", OPS)


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_shapes(op, backend, isa, m, n, k):
    x = activation((m, k), seed=m + k)
    check_op(op, backend, isa, x, random_int8_weight(n, k, seed=n), make_bias(n, "x", x.dtype))


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [None, "x", "fp32"])
def test_dtypes_and_bias(op, backend, isa, dtype, bias):
    n, k = 33, 257
    x = activation((17, k), dtype)
    out = check_op(op, backend, isa, x, random_int8_weight(n, k), make_bias(n, bias, dtype))
    assert out.dtype == dtype


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_3d(op, backend, isa, dtype):
    n, k = 33, 100
    x = activation((2, 5, k), dtype)
    out = check_op(op, backend, isa, x, random_int8_weight(n, k), make_bias(n, "x", dtype))
    assert out.shape == (2, 5, n)


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "contiguous"])
def test_strided_activations(op, backend, isa, layout, dtype):
    n, k = 33, 257
    x = activation((17, k), dtype, layout=layout)
    check_op(op, backend, isa, x, random_int8_weight(n, k), make_bias(n, "fp32", dtype),
             msg=f"x strides {x.stride()}")


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_strided_weights(op, backend, isa):
    """Non-contiguous w, w_scale and bias are legal inputs (the native backend copies them)."""
    n, k = 33, 100
    q, s = random_int8_weight(n, k)
    w_t = q.t().contiguous().t()  # [N, K] with strides (1, N)
    s_strided = torch.stack((s, s), 1)[:, 0]
    b_strided = torch.randn(n, 2)[:, 1]
    assert not (w_t.is_contiguous() or s_strided.is_contiguous() or b_strided.is_contiguous())
    check_op(op, backend, isa, activation((17, k)), (w_t, s_strided), b_strided)


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_threads(op, backend, isa, threads):
    n, k = 130, 1000
    x = activation((64, k), seed=3)
    with num_threads(threads):
        check_op(op, backend, isa, x, random_int8_weight(n, k, seed=3), make_bias(n, "x", x.dtype))


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_empty_n(op, backend, isa):
    check_op(op, backend, isa, activation((3, 8)), random_int8_weight(0, 8), None)


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_k_zero(op, backend, isa):
    """K = 0 (nn.Linear(0, n) is legal): the empty sum, so the output is the bias."""
    b = make_bias(5, "x", torch.float32)
    out = check_op(op, backend, isa, activation((3, 0)), random_int8_weight(5, 0), b)
    assert torch.equal(out, b.expand(3, 5))


@op_param
@pytest.mark.parametrize(
    "shape,bias",
    [((0, 100), None), ((1, 100), None), ((17, 100), "x"), ((2, 3, 100), "fp32")],
    ids=["M0-nobias", "M1-nobias", "M17-bias", "3d-fp32bias"],
)
def test_opcheck(no_backend_env, op, shape, bias):
    q, s = random_int8_weight(13, 100)
    x = activation(shape)
    torch.library.opcheck(getattr(torch.ops.pyquant, op).default,
                          (x, q, s, make_bias(13, bias, x.dtype)))


@op_param
@pytest.mark.parametrize("case", int8_bad_cases(), ids=lambda c: c[0])
def test_bad_inputs(op, case):
    _, x, w, s, b, exc, match = case
    with pytest.raises(exc, match=match):
        getattr(torch.ops.pyquant, op)(x, w, s, b)


# ------------------------------------------ the AMX paths (M >= 9 or 16, K % 32, N % 32 == 0)
# On CPUs with AMX these shapes run on tiles: int8 tiles for W8A8, bf16 tiles for weight-only
# (activations split into up to three exact bf16 terms: bf16 inputs one, fp16 two, fp32 three).
# Every ISA runs them.
AMX_SHAPES = [(16, 32, 32), (17, 64, 96), (40, 96, 256), (100, 32, 544)]


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("m,n,k", AMX_SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_amx_shapes(op, backend, isa, m, n, k, dtype):
    # a dynamic range of 1e-3..1e3 across K, so all three bf16 terms of fp32 are nonzero
    scale = torch.logspace(-3, 3, k)[torch.randperm(k, generator=torch.Generator().manual_seed(k))]
    x = (activation((m, k), seed=m) * scale).to(dtype)
    check_op(op, backend, isa, x, random_int8_weight(n, k, seed=n), make_bias(n, "fp32", dtype))


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_short_k(op, backend, isa, threads):
    """Short K: AMX tasks of 32 activation rows x all N (tile_amx.h), which the int8 GEMM
    takes at 1 and 2 threads for M = 130 (odd tile count, partial tile)."""
    x = activation((130, 384), seed=3)
    with num_threads(threads):
        check_op(op, backend, isa, x, random_int8_weight(96, 384, seed=4),
                 make_bias(96, "fp32", x.dtype))


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_amx_strided_and_3d(op, backend, isa):
    x = activation((3, 12, 2 * 96), seed=5)[..., ::2]
    check_op(op, backend, isa, x, random_int8_weight(64, 96, seed=6), None)


@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_weight_only_amx_bf16_nonfinite_like_fp32(backend, isa):
    """int8 weight-only: Inf and NaN cannot be split into bf16 terms, so such calls take the
    fp32 path, and the non-finite outputs are those of the reference."""
    OP = "int8_weight_only_mm"
    x = activation((20, 64), seed=7)
    x[3, 5] = float("inf")
    x[7, 9] = float("nan")
    x[11, 0] = -float("inf")
    w = random_int8_weight(32, 64, seed=8)
    got = run_op(OP, backend, isa, x, w, None)
    want = reference_op(OP, x, w, None)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    fin = want.isfinite()
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)


def _amx_only():
    return [p for p in BACKENDS if p.values[1] == "avx512_amx"] or [
        pytest.param("cpu", "avx512_amx", marks=pytest.mark.skip(reason="no AMX on this CPU"))]


# int8 weight-only with bf16 rows on the AMX tiles reads them as bf16 and writes bf16 outputs
# (pq_int8_weight_only_mm_bf16): the float path's results on the same values, rounded as torch
# rounds. M = 1 and 15 take the float path; M = 200 at K = 4096 the K-chunked order; an Inf in
# x the float path too.
@pytest.mark.parametrize("backend,isa", _amx_only())
@pytest.mark.parametrize("m,k,n,layout", [(1, 256, 64, "contiguous"), (15, 256, 64, "contiguous"),
                                          (16, 256, 64, "contiguous"), (17, 384, 96, "3d"),
                                          (40, 256, 64, "strided"), (200, 4096, 64, "contiguous"),
                                          (33, 256, 64, "inf")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_weight_only_bf16_outputs_on_amx(backend, isa, m, k, n, layout, with_bias):
    from pyquant import _native

    w = random_int8_weight(n, k)
    x = torch.randn(m, k + 6, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    if layout == "inf":
        x[3, 5] = float("-inf")
    x = {"strided": lambda: x[:, :k], "3d": lambda: x[:, :k].contiguous().view(1, m, k)}.get(
        layout, lambda: x[:, :k].contiguous())()
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    with num_threads(2):
        with native_calls() as calls:
            got = run_op("int8_weight_only_mm", backend, isa, x, w, bias)
        f32 = run_op("int8_weight_only_mm", backend, isa, x.float(), w, bias)
    assert ("int8_weight_only_mm_bf16" in calls) == (m >= 16), calls
    assert_bf16_of_fp32(got, f32, x.shape[:-1] + (n,))


def test_weight_only_bf16_output_call_refusals():
    """The native bf16 call: 0 from its query and PQ_ERR_ISA off AMX and below M = 16;
    PQ_ERR_ARG for a row stride below K or a workspace short by a byte; PQ_NOT_FINITE, the
    output untouched, for x with a NaN."""
    from pyquant import _native

    mod = _native.module()
    amx = amx_only_query(mod.int8_weight_only_bf16_applies, 16, 256, 64)
    m, n, k = 32, 64, 256
    wq, ws = random_int8_weight(n, k)
    x = torch.randn(m, k).to(torch.bfloat16)
    out = torch.full((m, n), 7.0, dtype=torch.bfloat16)
    need = mod.int8_weight_only_workspace_bytes(amx, m, k, n, 2)
    work, base = aligned_work(need)

    def call(isa=amx, ldx=k, nbytes=need, xx=x):
        return mod.int8_weight_only_mm_bf16(isa, xx.data_ptr(), m, k, ldx, wq.data_ptr(), n,
                                            ws.data_ptr(), 0, out.data_ptr(), 2, base, nbytes)
    assert call(isa=amx - 1) == 2 and call(ldx=k - 1) == 1 and call(nbytes=need - 1) == 1
    x_nan = x.clone()
    x_nan[0, 0] = float("nan")
    assert call(xx=x_nan) == 4 and (out == 7.0).all()
    assert call() == 0 and not (out == 7.0).all()


# ------------------------------------------------------------------------ the int32 K limit


@op_param
@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_largest_k_sums_exactly_at_its_bound(op, backend, isa):
    """At K = INT8_MAX_K every int32 sum may reach K x 128 x 127 (-128 weights, x at its row's
    maximum): still exact. One more input and the op refuses, where it used to wrap (K = 139264
    of all-ones rows came out negative)."""
    from pyquant._checks import INT8_MAX_K

    k = INT8_MAX_K
    w = torch.full((3, k), -128, dtype=torch.int8)
    ws = torch.tensor([1.0, 0.5, 2.0 ** -7])
    for m in (1, 4, 64):
        x = -torch.ones(m, k)
        out = run_op(op, backend, isa, x, (w, ws), None)
        want = torch.tensor([128.0 * k, 64.0 * k, 1.0 * k]).expand(m, 3)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=f"K={k + 1} is above {k}, the largest K"):
        run_op(op, backend, isa, torch.ones(1, k + 1), (torch.ones(3, k + 1, dtype=torch.int8),
                                                        ws), None)
