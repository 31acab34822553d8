"""The sparse GEMMs (pq_sparse_unstructured_gemm and pq_sparse24_gemm: only the kept products,
AVX512 builds) against the reference, through the C API and through the ops, which take them
for float32 activations at prefill sizes (unstructured: on weights at most half kept)."""
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


def exact(n, k, kept_per_row, seed=0):
    """(bitmask, values, row_offsets) keeping exactly kept_per_row columns of every row (the
    share the break-even reads, with no sampling margin)."""
    scores = torch.rand(n, k, generator=gen(seed))
    mask = torch.zeros(n, k, dtype=torch.bool).scatter_(
        1, scores.topk(kept_per_row, dim=1).indices, True)
    return sf.compress_unstructured(torch.randn(n, k, generator=gen(seed + 1)) * mask, mask)


def has_gemm(isa: str) -> bool:
    return _native.module().sparse_gemm_workspace_bytes(
        _native.ISA_NAMES.index(isa), 1, 1, 1) >= 0


def call_c(fn: str, isa: str, x, n: int, *wargs, bias=None, threads=2, work_bytes=None,
           misalign=0):
    """_C.<fn>(isa, x, M, K, ldx, *wargs, N, bias, out, work, work_bytes, threads) on float32
    x [M, K] (any row stride), with a workspace of the size it asks for (or work_bytes), at
    64 bytes + misalign; (status, out)."""
    m, k = x.shape
    i = _native.ISA_NAMES.index(isa)
    C = _native.module()
    query = "sparse24_gemm_workspace_bytes" if fn == "sparse24_gemm" else \
        "sparse_gemm_workspace_bytes"
    need = getattr(C, query)(i, m, k, threads)
    work = torch.empty(max(need, 0) + 128, dtype=torch.uint8)
    out = torch.full((m, n), float("nan"))
    st = getattr(C, fn)(i, x.data_ptr(), m, k, x.stride(0), *wargs, n,
                        bias.data_ptr() if bias is not None else 0, out.data_ptr(),
                        work.data_ptr() + (-work.data_ptr() % 64) + misalign,
                        need if work_bytes is None else work_bytes, threads)
    return st, out


def gemm(isa: str, x, wargs, bias=None, **kw):
    bm, v, off = wargs
    return call_c("sparse_unstructured_gemm", isa, x, bm.shape[0], bm.data_ptr(), v.data_ptr(),
                  _native._value_dtype(v), v.numel(), off.data_ptr(), bias=bias, **kw)


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
    """Each output is summed by one thread in an order the shapes fix: any thread count, the
    same bits."""
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
    need = _native.module().sparse_gemm_workspace_bytes(
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
    wargs = exact(40, 60, 18)  # 30% kept (the share counts K = 60, not the bitmask's 64)
    assert _native._unstructured_gemm_applies(14, "fp32", 60, *wargs)
    assert not _native._unstructured_gemm_applies(13, "fp32", 60, *wargs)
    assert not _native._unstructured_gemm_applies(1000, "bf16", 60, *wargs)  # bf16 on bf16
    half = exact(40, 60, 30)
    assert not _native._unstructured_gemm_applies(21, "fp32", 60, *half)
    assert _native._unstructured_gemm_applies(22, "fp32", 60, *half)
    dense = exact(40, 60, 31)  # past half kept: never
    assert not _native._unstructured_gemm_applies(1000, "fp32", 60, *dense)


def test_bound_layer_call_takes_the_gemm(monkeypatch):
    """ops.LayerCall's prepared call keeps the row kernel for decode and hands prefill sizes
    to the op (and so to the GEMM)."""
    if _native.unstructured_gemm_from_m(0.3) is None:
        pytest.skip("no unstructured GEMM on this CPU level")
    calls = _count_gemm(monkeypatch)
    wargs = exact(50, 96, 29)  # 30% kept: the GEMM from M = 14
    bound = _native._run_sparse_unstructured_mm.bind(*wargs)
    assert bound is not None
    for m, n_calls in ((1, 0), (13, 0), (14, 1), (200, 2)):
        x = activation((m, 96), seed=m)
        assert_close_named(bound(x), expected(x, wargs), tol_name(OP, torch.float32))
        assert len(calls) == n_calls, m


# ----------------------------------------------------------------------------------- 2:4


def gemm24(isa: str, x, v, meta, bias=None):
    return call_c("sparse24_gemm", isa, x, v.shape[0], v.data_ptr(), _native._value_dtype(v),
                  meta.data_ptr(), bias=bias)


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("m,n,k", [(1, 5, 4), (3, 17, 68), (17, 33, 132), (130, 300, 200),
                                   (257, 40, 64), (44, 7, 1000), (5, 19, 2052), (1000, 33, 68)])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_24_c_api_matches_reference(backend, isa, m, n, k, vdtype):
    """K past 64 by 4..60 columns (the last chunk's values and meta) and past a 512-column chunk
    by one group (2052), every stored float type, M in tiles of 12 with tails and in blocks
    split evenly (1000 rows), N past a panel of 16 and a task of 256 rows, rows of x with a
    stride past K, with and without bias."""
    if not has_gemm(isa):
        assert gemm24(isa, activation((2, 8)), *sf.compress_24(torch.randn(3, 8)))[0] == 2
        return
    v, meta = sf.compress_24(torch.randn(n, k, generator=gen(m + k)).to(vdtype))
    x = activation((m, k + 4), seed=m)[:, :k]
    for b in (None, torch.randn(n, generator=gen(1))):
        st, out = gemm24(isa, x, v, meta, b)
        assert st == 0
        assert_close_named(out, reference.sparse24_mm(x, v, meta, b), tol_name("sparse24_mm",
                                                                                torch.float32))


@pytest.mark.parametrize("backend,isa", isa_params())
def test_24_meta_that_is_not_canonical_adds_up(backend, isa):
    """Any meta bytes: repeated positions in a group add up, as the reference's scatter_add and
    the row kernels have them."""
    if not has_gemm(isa):
        pytest.skip(f"no sparse GEMM on {isa}")
    n, k = 20, 136
    v = torch.randn(n, k // 2, generator=gen(2))
    meta = torch.randint(0, 256, (n, k // 8), generator=gen(3), dtype=torch.uint8)
    x = activation((50, k), seed=4)
    st, out = gemm24(isa, x, v, meta)
    assert st == 0
    assert_close_named(out, reference.sparse24_mm(x, v, meta, None),
                       tol_name("sparse24_mm", torch.float32))
    xb = x.clone()
    xb[3, 7] = float("nan")
    assert gemm24(isa, xb, v, meta)[0] == _native._NOT_FINITE


@pytest.mark.parametrize("backend,isa", isa_params())
def test_24_workspace_is_its_own(backend, isa):
    """The 2:4 GEMM asks for its own workspace: 512 KiB a thread whatever M and K (-1 where it
    does not exist); one byte short or misaligned is PQ_ERR_ARG."""
    C, i = _native.module(), _native.ISA_NAMES.index(isa)
    need = C.sparse24_gemm_workspace_bytes(i, 100, 64, 2)
    if not has_gemm(isa):
        assert need == -1
        return
    assert need == 2 * 512 * 1024 == C.sparse24_gemm_workspace_bytes(i, 5000, 11008, 2)
    v, meta = sf.compress_24(torch.randn(20, 64, generator=gen(1)))
    x = activation((30, 64))
    wargs = (v.data_ptr(), _native._value_dtype(v), meta.data_ptr())
    assert call_c("sparse24_gemm", isa, x, 20, *wargs, work_bytes=need - 1)[0] == 1
    assert call_c("sparse24_gemm", isa, x, 20, *wargs, misalign=8)[0] == 1
    assert call_c("sparse24_gemm", isa, x, 20, *wargs)[0] == 0


@pytest.mark.parametrize("backend,isa", isa_params())
def test_24_same_bits_at_every_m_and_thread_count(backend, isa):
    """Each output of the 2:4 GEMM is one fused multiply-add chain in k order: a row of x gives
    the same bits alone, among other rows, and on any number of threads (1, 2 and 3 threads
    split these 1000 x 300 outputs into 2 x 4, 2 x 7 and 2 x 10 tasks)."""
    if not has_gemm(isa):
        pytest.skip(f"no 2:4 GEMM on {isa}")
    v, meta = sf.compress_24(torch.randn(300, 1032, generator=gen(3)))
    b = torch.randn(300, generator=gen(4))
    x = activation((1000, 1040), seed=6)[:, :1032]
    st, full = gemm24(isa, x, v, meta, b)
    assert st == 0
    for threads in (1, 3):
        st, out = call_c("sparse24_gemm", isa, x, 300, v.data_ptr(), _native._value_dtype(v),
                         meta.data_ptr(), bias=b, threads=threads)
        assert st == 0 and torch.equal(out, full), threads
    for lo, hi in ((0, 1), (100, 113), (999, 1000)):
        st, part = gemm24(isa, x[lo:hi], v, meta, b)
        assert st == 0 and torch.equal(part, full[lo:hi]), (lo, hi)


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16], ids=str)
def test_24_op_takes_the_gemm_from_its_break_even(monkeypatch, backend, isa, xdtype):
    """float32 (or fp16) activations, 2-D and 3-D: the GEMM from SPARSE24_GEMM_MIN_M on, past
    the dense break-even too; bf16 on bf16 values never (that pair runs bf16 dot products). Inf
    in x runs the row kernel, as before the GEMM (which, like the GEMM, gathers the kept columns
    only: no 0 * Inf there, where the reference's dense product has NaN), and from the dense
    break-even on the dense path (NaN as the reference)."""
    calls = []
    real = _native._sparse24_gemm
    monkeypatch.setattr(_native, "_sparse24_gemm",
                        lambda *a: calls.append(real(*a)) or calls[-1])
    n, k = 40, 136
    v, meta = sf.compress_24(torch.randn(n, k, generator=gen(5)))
    lim = _native.SPARSE24_GEMM_MIN_M
    with on_backend("cpu", isa):
        dense_from = _native.sparse_dense_min_m()[("sparse24_mm", "fp32")]
        for shape in ((lim - 1, k), (lim, k), (3, 30, k), (dense_from, k)):
            x = activation(shape, xdtype, seed=len(shape))
            before = len(calls)
            out = torch.ops.pyquant.sparse24_mm(x, v, meta, None)
            assert_close_named(out, reference.sparse24_mm(x, v, meta, None),
                               tol_name("sparse24_mm", xdtype))
            rows = x.numel() // k
            want = has_gemm(isa) and lim <= rows
            assert len(calls) - before == int(want), shape
        x = activation((64, k), torch.bfloat16)
        before = len(calls)
        torch.ops.pyquant.sparse24_mm(x, v.bfloat16(), meta, None)
        assert len(calls) == before
        x = activation((64, k), seed=9)
        x[2, 0] = float("inf")
        before = len(calls)
        out = torch.ops.pyquant.sparse24_mm(x, v, meta, None)
        rows = torch.empty(64, n)
        assert _native.module().sparse24_mm(_native.ISA_NAMES.index(isa), x.data_ptr(), 64, k, k,
                                            v.data_ptr(), 0, meta.data_ptr(), n, 0,
                                            rows.data_ptr(), 2) == 0
        assert torch.equal(out, rows) and out[2].isinf().any()
        assert calls[before:] == ([_native._NOT_FINITE] if has_gemm(isa) else [])
        x = activation((dense_from, k), seed=10)
        x[3, 0] = float("inf")
        before = len(calls)
        out = torch.ops.pyquant.sparse24_mm(x, v, meta, None)
        ref = reference.sparse24_mm(x, v, meta, None)
        assert out[3].isnan().any() and torch.equal(out[3].isnan(), ref[3].isnan())
        assert_close_named(out[4:], ref[4:], tol_name("sparse24_mm", xdtype))
        assert calls[before:] == ([_native._NOT_FINITE] if has_gemm(isa) else [])


def test_24_bound_layer_call_takes_the_gemm(monkeypatch):
    if not _native._has_sparse_gemm():
        pytest.skip("no sparse GEMM on this CPU level")
    calls = []
    real = _native._sparse24_gemm
    monkeypatch.setattr(_native, "_sparse24_gemm",
                        lambda *a: calls.append(real(*a)) or calls[-1])
    v, meta = sf.compress_24(torch.randn(30, 64, generator=gen(6)))
    bound = _native._run_sparse24_mm.bind(v, meta)
    assert bound is not None
    lim = _native.SPARSE24_GEMM_MIN_M
    dense_from = _native.sparse_dense_min_m()[("sparse24_mm", "fp32")]
    for m, n_calls in ((1, 0), (lim - 1, 0), (lim, 1), (dense_from, 2)):
        x = activation((m, 64), seed=m)
        assert_close_named(bound(x), reference.sparse24_mm(x, v, meta, None),
                           tol_name("sparse24_mm", torch.float32))
        assert len(calls) == n_calls, m


def test_long_prompts_run_in_slabs(monkeypatch):
    """x past SPARSE_GEMM_MAX_ROWS rows runs in slabs (a workspace of one slab's size, not the
    whole x's): the same result, and an Inf in a later slab still sends the call to the other
    path."""
    if not _native._has_sparse_gemm():
        pytest.skip("no sparse GEMM on this CPU level")
    monkeypatch.setattr(_native, "SPARSE_GEMM_MAX_ROWS", 16)
    sizes = []
    real = _native.module()
    monkeypatch.setattr(_native, "module", lambda: _Spy(sizes, real))
    wargs = sparse(40, 96, seed=11)
    v, meta = sf.compress_24(torch.randn(40, 96, generator=gen(12)))
    x = activation((2, 25, 96), seed=13)
    for op, w, ref in (("sparse_unstructured_mm", wargs, expected(x, wargs)),
                       ("sparse24_mm", (v, meta), reference.sparse24_mm(x, v, meta, None))):
        sizes.clear()
        out = getattr(torch.ops.pyquant, op)(x, *w, None)
        assert_close_named(out, ref, tol_name(op, torch.float32))
        assert sizes and all(m == 16 for m in sizes), sizes
    xb = x.clone()
    xb[1, 20, 0] = float("inf")  # row 45: the third slab of four
    assert_close_named(torch.ops.pyquant.sparse_unstructured_mm(xb, *wargs, None),
                       expected(xb, wargs), tol_name(OP, torch.float32))


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_copies_of_x_in_scratch(monkeypatch, xdtype):
    """Rows of x that are not float32 are converted into a scratch buffer (_rows_f32) from
    _SCRATCH_MIN_BYTES on: the same results as fresh copies, slab after slab of a sparse GEMM
    (an Inf in a later slab sends the call to the other path, which converts again) and in the
    weight-only ops, and nothing returned is the buffer."""
    from pyquant import formats

    monkeypatch.setattr(_native, "SPARSE_GEMM_MAX_ROWS", 16)
    wargs = sparse(40, 96, seed=11)
    v, meta = sf.compress_24(torch.randn(40, 96, generator=gen(12)))
    c, s, z = formats.quantize_int4_groupwise(torch.randn(48, 256, generator=gen(14)), 64,
                                              symmetric=False)
    x = activation((2, 25, 96), seed=13).to(xdtype)
    xb = x.clone()
    xb[1, 20, 0] = float("inf")  # row 45: the third slab of four
    x4 = activation((40, 256), seed=15).to(xdtype)
    calls = (("sparse_unstructured_mm", x, (*wargs, None)), ("sparse24_mm", x, (v, meta, None)),
             ("sparse24_mm", xb, (v, meta, None)),
             ("int4_weight_only_mm", x4, (formats.pack_int4(c), s, z, 64, None)))
    outs = {}
    for min_bytes in (1 << 62, 0):
        monkeypatch.setattr(_native, "_SCRATCH_MIN_BYTES", min_bytes)
        outs[min_bytes] = [getattr(torch.ops.pyquant, op)(xx, *w) for op, xx, w in calls]
    kept = _native._SCRATCH.__dict__.get("rows_f32")
    assert kept is not None  # the scratch path ran
    for (op, _, _), fresh, scratch in zip(calls, outs[1 << 62], outs[0]):
        assert torch.equal(fresh.isnan(), scratch.isnan()), op
        assert torch.equal(fresh.nan_to_num(), scratch.nan_to_num()), op
        assert scratch.untyped_storage().data_ptr() != kept.untyped_storage().data_ptr()


class _Spy:
    """The native module, recording the M of each sparse GEMM workspace query."""

    def __init__(self, sizes, real):
        self._sizes, self._mod = sizes, real

    def sparse_gemm_workspace_bytes(self, isa, m, k, nt):
        self._sizes.append(m)
        return self._mod.sparse_gemm_workspace_bytes(isa, m, k, nt)

    def sparse24_gemm_workspace_bytes(self, isa, m, k, nt):
        self._sizes.append(m)
        return self._mod.sparse24_gemm_workspace_bytes(isa, m, k, nt)

    def __getattr__(self, name):
        return getattr(self._mod, name)
