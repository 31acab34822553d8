"""The unstructured GEMM (pq_sparse_unstructured_gemm: only the kept products, AVX512 builds)
against the reference, through the C API and through torch.ops.pyquant.sparse_unstructured_mm,
which takes it for float32 activations at prefill sizes on weights at most half kept."""
from __future__ import annotations

import pytest
import torch

from helpers import activation, assert_close_named, gen, isa_params, on_backend, tol_name
from pyquant import _native, reference
from pyquant import sparse_formats as sf

OP = "sparse_unstructured_mm"


def sparse(n, k, kept=0.3, seed=0, dtype=torch.float32):
    """(bitmask, values, row_offsets) with rows of different counts, one empty and one full."""
    mask = torch.rand(n, k, generator=gen(seed)) < kept
    mask[0] = False
    if n > 2:
        mask[1] = True
    w = (torch.randn(n, k, generator=gen(seed + 1)) * mask).to(dtype)
    return sf.compress_unstructured(w, mask)


def has_gemm(isa: str) -> bool:
    return _native.module().sparse_unstructured_gemm_workspace_bytes(
        _native.ISA_NAMES.index(isa), 1, 1, 1) >= 0


def gemm(isa: str, x, wargs, bias=None, threads=2, work_bytes=None, misalign=0):
    """The C API on float32 x [M, K] (any row stride); (status, out)."""
    bm, v, off = wargs
    m, k = x.shape
    n = bm.shape[0]
    i = _native.ISA_NAMES.index(isa)
    C = _native.module()
    need = C.sparse_unstructured_gemm_workspace_bytes(i, m, k, threads)
    work = torch.empty(max(need, 0) + 128, dtype=torch.uint8)
    base = work.data_ptr() + (-work.data_ptr() % 64) + misalign
    out = torch.full((m, n), float("nan"))
    b = bias.data_ptr() if bias is not None else 0
    st = C.sparse_unstructured_gemm(i, x.data_ptr(), m, k, x.stride(0), bm.data_ptr(),
                                    v.data_ptr(), _native._value_dtype(v), v.numel(),
                                    off.data_ptr(), n, b, out.data_ptr(), base,
                                    need if work_bytes is None else work_bytes, threads)
    return st, out


def expected(x, wargs, bias=None):
    return reference.sparse_unstructured_mm(x, *wargs, bias)


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("m,n,k", [(1, 5, 7), (3, 17, 64), (17, 33, 129), (130, 300, 200),
                                   (257, 40, 65), (128, 16, 1000), (14, 3, 1)])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_c_api_matches_reference(backend, isa, m, n, k, vdtype):
    """Odd M (block tails of 1..128 rows), N past a multiple of 16, K past 8 and 64, every
    stored float type; rows of x with a stride past K."""
    if not has_gemm(isa):
        pytest.skip(f"no unstructured GEMM on {isa}")
    wargs = sparse(n, k, seed=m + n + k, dtype=vdtype)
    x = activation((m, k + 3), seed=m)[:, :k]
    bias = torch.randn(n, generator=gen(9))
    for b in (None, bias):
        st, out = gemm(isa, x, wargs, b)
        assert st == 0
        assert_close_named(out, expected(x, wargs, b), tol_name(OP, torch.float32), f"cpu-{isa}")


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_give_the_same_result(backend, isa, threads):
    """Each output is summed in k order by one thread: any thread count, the same bits."""
    if not has_gemm(isa):
        pytest.skip(f"no unstructured GEMM on {isa}")
    wargs = sparse(600, 300, seed=4)
    x = activation((150, 300), seed=5)
    st1, one = gemm(isa, x, wargs, threads=1)
    st, out = gemm(isa, x, wargs, threads=threads)
    assert st == st1 == 0 and torch.equal(out, one)


@pytest.mark.parametrize("backend,isa", isa_params())
def test_c_api_refuses_what_it_cannot_take(backend, isa):
    """No GEMM on the ISA: workspace -1 and PQ_ERR_ISA. Otherwise a workspace too small or
    misaligned is PQ_ERR_ARG; x with an Inf or NaN is PQ_NOT_FINITE with out untouched; an
    inconsistent weight PQ_ERR_ARG."""
    wargs = sparse(20, 70, seed=1)
    x = activation((16, 70))
    if not has_gemm(isa):
        assert gemm(isa, x, wargs)[0] == 2
        return
    need = _native.module().sparse_unstructured_gemm_workspace_bytes(
        _native.ISA_NAMES.index(isa), 16, 70, 2)
    assert gemm(isa, x, wargs, work_bytes=need - 1)[0] == 1
    assert gemm(isa, x, wargs, misalign=8)[0] == 1
    for bad in (float("inf"), float("-inf"), float("nan")):
        xb = x.clone()
        xb[7, 69] = bad
        st, out = gemm(isa, xb, wargs)
        assert st == _native._NOT_FINITE and out.isnan().all()
    bm, v, off = wargs
    off2 = off.clone()
    off2[5] += 1
    assert gemm(isa, x, (bm, v, off2))[0] == 1
    bm2 = bm.clone()
    bm2[3, -1] |= 0x80  # a bit at k = 71 >= K
    assert gemm(isa, x, (bm2, v, off))[0] == 1


def _count_gemm(monkeypatch) -> list:
    calls = []
    real = _native._unstructured_gemm

    def counted(*a):
        st = real(*a)
        calls.append(st)
        return st
    monkeypatch.setattr(_native, "_unstructured_gemm", counted)
    return calls


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("xdtype,layout", [(torch.float32, "contiguous"),
                                           (torch.float32, "col_slice"),
                                           (torch.float32, "row_step"),
                                           (torch.float16, "contiguous"),
                                           (torch.bfloat16, "contiguous")], ids=str)
def test_op_takes_the_gemm_at_prefill_sizes(monkeypatch, backend, isa, xdtype, layout):
    """float32 (and fp16, and bf16 x with float32 values) activations, 2-D and 3-D, strided:
    the op runs the GEMM from its break-even on and matches the reference."""
    calls = _count_gemm(monkeypatch)
    n, k = 70, 130
    wargs = sparse(n, k, kept=0.3, seed=2)
    bias = torch.randn(n, generator=gen(3)).to(xdtype)
    with on_backend("cpu", isa):
        lim = _native.unstructured_gemm_from_m(wargs[1].numel() / (n * k))
        assert (lim is not None) == has_gemm(isa)
        for shape in ((40, k), (3, 13, k), (lim - 1 if lim else 5, k)):
            x = activation(shape, xdtype, seed=len(shape), layout=layout if len(shape) == 2
                           else "contiguous")
            before = len(calls)
            out = torch.ops.pyquant.sparse_unstructured_mm(x, *wargs, bias)
            assert_close_named(out, expected(x, wargs, bias), tol_name(OP, xdtype), f"cpu-{isa}")
            rows = x.numel() // k
            assert len(calls) - before == (1 if lim is not None and rows >= lim else 0), shape


@pytest.mark.parametrize("backend,isa", isa_params())
def test_op_with_inf_or_nan_in_x_runs_the_other_path(monkeypatch, backend, isa):
    """The GEMM forms no product with a pruned weight, where the reference's dense product
    gives 0 * Inf = NaN: such x runs the other paths, NaN where the reference has it."""
    calls = _count_gemm(monkeypatch)
    wargs = sparse(33, 100, seed=6)
    x = activation((64, 100), seed=7)
    x[5, 0] = float("inf")  # column 0 is pruned in most rows
    x[9, 50] = float("nan")
    with on_backend("cpu", isa):
        out = torch.ops.pyquant.sparse_unstructured_mm(x, *wargs, None)
    ref = expected(x, wargs)
    assert ref[5].isnan().any()
    assert_close_named(out, ref, tol_name(OP, torch.float32), f"cpu-{isa}")
    assert calls == ([_native._NOT_FINITE] if has_gemm(isa) else [])


@pytest.mark.parametrize("backend,isa", isa_params())
def test_op_reports_an_inconsistent_weight_at_prefill_sizes(backend, isa):
    bm, v, off = sparse(13, 100, seed=8)
    off = off.clone()
    off[6] += 2
    with on_backend("cpu", isa), pytest.raises(ValueError,
                                                match="inconsistent unstructured sparse weight"):
        torch.ops.pyquant.sparse_unstructured_mm(activation((64, 100)), bm, v, off, None)


def test_break_even_follows_the_kept_share():
    if _native.unstructured_gemm_from_m(0.3) is None:
        pytest.skip("no unstructured GEMM on this CPU level")
    assert _native.unstructured_gemm_from_m(0.3) == _native.UNSTRUCTURED_GEMM_MIN_M
    assert _native.unstructured_gemm_from_m(0.5) == 22
    assert _native.unstructured_gemm_from_m(0.51) is None
    wargs = sparse(40, 64, kept=0.3)
    assert _native._unstructured_gemm_applies(14, "fp32", *wargs)
    assert not _native._unstructured_gemm_applies(13, "fp32", *wargs)
    assert not _native._unstructured_gemm_applies(1000, "bf16", *wargs)  # bf16 on bf16: dense
    dense = sparse(40, 64, kept=0.8)
    assert not _native._unstructured_gemm_applies(1000, "fp32", *dense)


def test_bound_layer_call_takes_the_gemm(monkeypatch):
    """ops.LayerCall's prepared call keeps the row kernel for decode and hands prefill sizes
    to the op (and so to the GEMM)."""
    if _native.unstructured_gemm_from_m(0.3) is None:
        pytest.skip("no unstructured GEMM on this CPU level")
    calls = _count_gemm(monkeypatch)
    wargs = sparse(50, 96, seed=10)
    bound = _native._run_sparse_unstructured_mm.bind(*wargs)
    assert bound is not None
    for m, n_calls in ((1, 0), (13, 0), (14, 1), (200, 2)):
        x = activation((m, 96), seed=m)
        assert_close_named(bound(x), expected(x, wargs), tol_name(OP, torch.float32))
        assert len(calls) == n_calls, m
