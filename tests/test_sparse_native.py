"""The native sparse kernels (csrc/cpu/sparse.cpp) on every ISA, beyond the op tests: row lengths
that leave every kind of SIMD tail, each int4 path (group sizes the vector step divides and
those it does not), non-canonical 2:4 meta bytes, multi-threaded tiles, and weights or raw
arguments that are inconsistent: a clear error, never a crash or a read out of bounds."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import activation, assert_close_named, gen, isa_params, num_threads, run_op, tol_name
from pyquant import _native, formats, reference
from pyquant import sparse_formats as sf
from test_sparse24_mm import dense24, int4_args, int8_args
from test_sparse_unstructured_mm import random_sparse

pytestmark = pytest.mark.skipif(not _native.available(), reason="native module not loaded")

# K/2 kept values per row: multiples of 16 and 8, and tails of 2..14 after them
KS_24 = [4, 28, 60, 64, 1028, 2056]
MS = [1, 2, 5, 16]


def _check(op, isa, x, wargs, bias=None):
    out = run_op(op, "cpu", isa, x, wargs, bias)
    assert_close_named(out, getattr(reference, op)(x, *wargs, bias), tol_name(op, x.dtype),
                       f"cpu-{isa}")


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("k", KS_24)
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_sparse24_tails(backend, isa, k, vdtype):
    n = 21
    _, v, meta = dense24(n, k, seed=k, dtype=vdtype)
    for m in MS:
        _check("sparse24_mm", isa, activation((m, k), seed=m), (v, meta))
    wargs, _ = int8_args(n, k, seed=k)
    _check("sparse24_int8_mm", isa, activation((3, k), torch.bfloat16), wargs,
           torch.randn(n, generator=gen(1)))


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("k,group", [(1024, 32), (1024, 16), (1024, 8), (1056, 24), (512, 256),
                                     (96, 6)])
def test_sparse24_int4_groups(backend, isa, k, group):
    """G % 16 == 0: the AVX512 lookup step; G % 8 == 0: the AVX2 step; others: the scalar
    loop. All must agree with the reference."""
    wargs, _ = int4_args(19, k, group, seed=group)
    for m in (1, 4, 9):
        _check("sparse24_int4_mm", isa, activation((m, k), seed=m), wargs)


# M = 1 on AMX CPUs (which have VBMI): 2:4 + int8, and 2:4 + int4 with G % 32 == 0, write x in
# 24-bit fixed point (three int8 terms) and gather it with byte permutes (sparse.cpp). Rows go
# two to a register when the row length allows (int8: K/2 % 32 == 0), an odd last row paired
# with itself: N = 21 and 23 leave tiles of 1 and 3 rows.
@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("k", [4, 60, 128, 132, 1028, 4096])
def test_sparse24_int8_decode_path(backend, isa, k):
    wargs, _ = int8_args(23, k, seed=k)
    x = activation((1, k), seed=k)
    x[0, k // 2] = 300.0  # an outlier: the fixed-point step grows with the row's max
    _check("sparse24_int8_mm", isa, x, wargs, torch.randn(23, generator=gen(2)))


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("k,group", [(64, 32), (128, 64), (512, 128), (768, 96), (1280, 160),
                                     (1536, 64), (2048, 256), (4096, 128)])
def test_sparse24_int4_decode_path(backend, isa, k, group):
    wargs, _ = int4_args(21, k, group, seed=k)
    x = activation((1, k), seed=k)
    x[0, 3] = -300.0
    _check("sparse24_int4_mm", isa, x, wargs, torch.randn(21, generator=gen(4)))


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("group", [32, 128, 256])
def test_sparse24_int4_decode_path_extremes(backend, isa, group):
    """The int4 decode path adds the three terms' sums in int32 over up to 128 kept values a row
    (4 a lane a step): codes 15 against zero 0, and 0 against 15, with every x at the row's
    largest magnitude, take those sums to their bound (just under 2^31). Any overflow or a
    term added at the wrong weight would miss the reference by far more than the tolerance."""
    n, k = 6, 4 * group
    (packed, meta, scales, zeros, g), _ = int4_args(n, k, group, seed=5)
    codes = torch.zeros(n, k // 2, dtype=torch.uint8)
    codes[0::2] = 15
    zeros = torch.zeros_like(zeros)
    zeros[1::2] = 15
    wargs = (formats.pack_int4(codes), meta, scales, zeros, g)
    for sign in (1.0, -1.0):
        x = torch.full((1, k), 3.0 * sign)
        _check("sparse24_int4_mm", isa, x, wargs)
        x[0, ::3] = -3.0 * sign  # mixed signs at full magnitude too
        _check("sparse24_int4_mm", isa, x, wargs)


@pytest.mark.parametrize("backend,isa", isa_params())
def test_sparse24_decode_path_workspace(backend, isa):
    """The decode path's scratch comes from the caller (native code does not allocate): its
    size is 0 where the path does not apply; a short, null or misaligned one runs the float
    kernels, with the same answer within the kernel tolerance."""
    C, k, n = _native.module(), 256, 11
    code = _native._parse_isa(isa)
    need = C.sparse24_workspace_bytes(code, 1, k)
    assert need == (3 * 256 if isa in ("avx512_bf16", "avx512_amx") else 0)
    assert C.sparse24_workspace_bytes(code, 2, k) == 0 and C.sparse24_workspace_bytes(code, -1, k) < 0
    (q, meta, scale), _ = int8_args(n, k, seed=6)
    x = activation((1, k), seed=7)
    want = reference.sparse24_int8_mm(x, q, meta, scale, None)
    buf = torch.zeros(need + 128, dtype=torch.uint8)
    for off, nbytes in ((0, need), (0, need - 1), (1, need), (0, 0)):
        out = torch.empty(1, n)
        ptr = buf.data_ptr() + off if nbytes else 0
        st = C.sparse24_int8_mm(code, x.data_ptr(), 1, k, k, q.data_ptr(), meta.data_ptr(), n,
                                scale.data_ptr(), 0, out.data_ptr(), 1, ptr, nbytes)
        assert st == 0
        assert_close_named(out, want, tol_name("sparse24_int8_mm", torch.float32), str(off))


@pytest.mark.parametrize("backend,isa", isa_params())
def test_sparse24_decode_path_fallbacks(backend, isa):
    """x that fixed point cannot hold runs the float kernels: non-finite entries give their
    Inf/NaN pattern (a pruned column's Inf/NaN is skipped, not multiplied by 0 as in the dense
    reference); a row whose max is below 2^-100 keeps its relative accuracy."""
    n, k = 13, 256
    w8, _ = int8_args(n, k, seed=1)
    w4, _ = int4_args(n, k, 64, seed=2)
    for op, wargs in (("sparse24_int8_mm", w8), ("sparse24_int4_mm", w4)):
        for bad in (float("nan"), float("inf")):
            x = activation((1, k), seed=3)
            x[0, 9] = bad
            got = run_op(op, "cpu", isa, x, wargs, None)
            want = run_op(op, "cpu", "portable", x, wargs, None)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
            assert got.isnan().any() or got.isinf().any()
        _check(op, isa, activation((1, k), seed=4) * 1e-33, wargs)


@pytest.mark.parametrize("backend,isa", isa_params())
def test_sparse24_any_meta_bytes(backend, isa):
    """Non-canonical positions (duplicates, unsorted) are read as stored and add up, as the
    reference's scatter_add does."""
    n, k = 17, 200
    meta = torch.randint(0, 256, (n, k // 8), generator=gen(3), dtype=torch.uint8)
    v = torch.randn(n, k // 2, generator=gen(4))
    _check("sparse24_mm", isa, activation((3, k)), (v, meta))


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads(backend, isa, threads):
    n, k = 301, 520
    _, v, meta = dense24(n, k, dtype=torch.bfloat16)
    w, wargs = random_sparse(n, 333, 0.3)
    with num_threads(threads):
        _check("sparse24_mm", isa, activation((7, k)), (v, meta))
        _check("sparse_unstructured_mm", isa, activation((7, 333)), wargs)


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("k", [1, 7, 63, 64, 65, 130, 1000])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_unstructured_tails(backend, isa, k, density):
    _, wargs = random_sparse(11, k, density, seed=k)
    for m in (1, 4, 6):
        _check("sparse_unstructured_mm", isa, activation((m, k), torch.bfloat16, seed=m), wargs)
    # the last row's values end the buffer: runs near the end must not read past it
    w, (bm, vals, off) = random_sparse(5, k, density, seed=k + 1)
    _check("sparse_unstructured_mm", isa, activation((2, k)), (bm, vals.clone(), off))


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("m,k", [(2, 9000), (4, 9000), (7, 9000), (7, 20000)])
def test_unstructured_bf16_rows_of_x_past_the_stack_copy(backend, isa, m, k):
    """bf16 values against bf16 x: the vdpbf16ps loop narrows x once, on the stack up to 32768
    values and on the heap up to 131072 (M = 4 and 7 at K = 9000); past that (M = 7 at
    K = 20000) the float loop runs. All agree with the reference."""
    mask = torch.rand(6, k, generator=gen(k)) < 0.3
    w = (torch.randn(6, k, generator=gen(k + 1)) * mask).to(torch.bfloat16)
    _check("sparse_unstructured_mm", isa, activation((m, k), torch.bfloat16, seed=m),
           sf.compress_unstructured(w, mask))


def _before_guard_page(t: torch.Tensor):
    """A copy of `t` whose last byte is the last one before a page the process may not read
    (PROT_NONE), and the mapping that holds it (keep it alive): a kernel that reads one
    byte past the tensor faults."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    nbytes = t.numel() * t.element_size()
    pages = (nbytes + page - 1) // page + 1
    mm = mmap.mmap(-1, pages * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + (pages - 1) * page, page, 0) == 0  # PROT_NONE
    start = (pages - 1) * page - nbytes
    out = torch.frombuffer(mm, dtype=t.dtype, count=t.numel(), offset=start)
    out.copy_(t.flatten())
    return out.view(t.shape), mm


def _last_row_kept_to(n: int, k: int, kept: int, dtype):
    """An unstructured weight of random rows whose last row keeps columns 0..kept-1: its
    values end the buffer mid-word (kept = 48 of a 64-column word: a loop that loads 16
    values past the word's first 48 without checking reads 16 past the end)."""
    mask = torch.rand(n, k, generator=gen(k)) < 0.5
    mask[-1] = False
    mask[-1, :kept] = True
    w = (torch.randn(n, k, generator=gen(k + 1)) * mask).to(dtype)
    return sf.compress_unstructured(w, mask)


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX mmap/mprotect")
@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("case", ["random 63 0.3", "random 64 1.0", "random 65 0.3",
                                  "random 100 1.0", "random 1000 0.3", "random 1000 1.0",
                                  "last 64 48", "last 128 112", "last 100 90"])
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16], ids=str)
def test_unstructured_buffers_end_before_an_unreadable_page(backend, isa, case, vdtype):
    """The loads of the SIMD loops near the end of the values and of the bitmask are masked
    to them: with the page after the last value (and, separately, after the last mask byte)
    unreadable, every path (bf16 values with bf16 x, the float loop) still gives the
    reference's answer instead of a fault."""
    kind, k, arg = case.split()
    k = int(k)
    if kind == "random":
        _, (bm, vals, off) = random_sparse(6, k, float(arg), seed=k, dtype=vdtype)
    else:
        bm, vals, off = _last_row_kept_to(5, k, int(arg), vdtype)
    guarded_vals, mv = _before_guard_page(vals)
    guarded_bm, mb = _before_guard_page(bm)
    for wargs in ((bm, guarded_vals, off), (guarded_bm, vals, off)):
        for m in (1, 3):
            for xdtype in (torch.bfloat16, torch.float32):
                _check("sparse_unstructured_mm", isa, activation((m, k), xdtype, seed=m), wargs)
    del guarded_vals, guarded_bm, wargs
    mv.close()
    mb.close()


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("bf16_m1", [False, True], ids=["fp32", "bf16-m1"])
@pytest.mark.parametrize("k", [100, 4096])
def test_unstructured_corrupt_weights(backend, isa, bf16_m1, k):
    """Every kind of inconsistency is caught by the kernel and reported with sparse_formats'
    diagnosis: before it reads a row's values where a wrong bitmask could take it past them,
    else from the offset the row's values ended at (row 0 below, whose bitmask claims more
    or fewer values than its offsets hold; K = 4096 also runs the long-row prefetch). bf16-m1:
    bf16 values and one bf16 row of x, the vdpbf16ps path of AVX512-BF16 builds."""
    _, (bm, v, off) = random_sparse(13, k, 0.5, seed=5)
    x = activation((2, k))
    if bf16_m1:
        v, x = v.bfloat16(), activation((1, k), torch.bfloat16)
    cases = []
    bad = off.clone()
    bad[6] += 3  # rows 5 and 6 disagree with their popcounts
    cases.append((bm, v, bad))
    bad = off.clone()
    bad[-1] += 1  # ends past the values
    cases.append((bm, v, bad))
    b2 = bm.clone()
    b2[3, -1] |= 0x80  # K = 100: a bit at k = 103 >= K; K = 4096: one more bit than counted
    if k % 8 == 0 and int(bm[3, -1]) & 0x80:
        b2[3, -1] &= 0x7F
    cases.append((b2, v, off))
    for more in (True, False):  # row 0's bitmask claims more, or fewer, values than it holds
        b3 = bm.clone()
        b3[0, 0] = 0xFF if more else 0
        if int(bm[0, 0]) != int(b3[0, 0]):
            cases.append((b3, v, off))
    for c in cases:
        with pytest.raises(ValueError, match="inconsistent unstructured sparse weight"):
            run_op("sparse_unstructured_mm", "cpu", isa, x, c, None)


def test_raw_bad_arguments():
    """The C API rejects what Python would never pass: null buffers, K % 4, bad group sizes,
    dtype codes, offsets that do not start at 0 or end at nnz (status 1, no crash)."""
    C = _native.module()
    isa = _native.best_isa()
    x = torch.randn(2, 8)
    out = torch.empty(2, 3)
    v = torch.randn(3, 4)
    meta = torch.zeros(3, 1, dtype=torch.uint8)
    p = lambda t: t.data_ptr()  # noqa: E731
    ok = C.sparse24_mm(isa, p(x), 2, 8, 8, p(v), 0, p(meta), 3, 0, p(out), 1)
    assert ok == 0
    assert C.sparse24_mm(isa, p(x), 2, 8, 8, 0, 0, p(meta), 3, 0, p(out), 1) == 1
    assert C.sparse24_mm(isa, p(x), 2, 8, 8, p(v), 7, p(meta), 3, 0, p(out), 1) == 1
    assert C.sparse24_mm(isa, p(x), 2, 6, 8, p(v), 0, p(meta), 3, 0, p(out), 1) == 1
    assert C.sparse24_mm(isa, p(x), 2, 8, 4, p(v), 0, p(meta), 3, 0, p(out), 1) == 1
    assert C.sparse24_mm(9, p(x), 2, 8, 8, p(v), 0, p(meta), 3, 0, p(out), 1) == 2
    q = torch.zeros(3, 4, dtype=torch.int8)
    assert C.sparse24_int8_mm(isa, p(x), 2, 8, 8, p(q), p(meta), 3, 0, 0, p(out), 1) == 1
    packed = torch.zeros(3, 2, dtype=torch.uint8)
    sc = torch.ones(3, 1)
    zp = torch.zeros(3, 1, dtype=torch.uint8)
    assert C.sparse24_int4_mm(isa, p(x), 2, 8, 8, p(packed), p(meta), 3, p(sc), p(zp), 4, 0,
                              p(out), 1) == 0
    for g in (0, 3, 8, -4):
        assert C.sparse24_int4_mm(isa, p(x), 2, 8, 8, p(packed), p(meta), 3, p(sc), p(zp), g, 0,
                                  p(out), 1) == 1
    bm = torch.tensor([[0b11], [0], [0b1]], dtype=torch.uint8)
    vals = torch.randn(3)
    off = torch.tensor([0, 2, 2, 3])
    assert C.sparse_unstructured_mm(isa, p(x), 2, 8, 8, p(bm), p(vals), 0, 3, p(off), 3, 0,
                                    p(out), 1) == 0
    torch.testing.assert_close(out[:, 0], x[:, 0] * vals[0] + x[:, 1] * vals[1])
    for bad in ([1, 3, 3, 4], [0, 2, 2, 4], [0, 2, 3, 3], [0, -1, 2, 3]):
        o = torch.tensor(bad)
        assert C.sparse_unstructured_mm(isa, p(x), 2, 8, 8, p(bm), p(vals), 0, 3, p(o), 3, 0,
                                        p(out), 1) == 1, bad
    assert C.sparse_unstructured_mm(isa, p(x), 2, 8, 8, p(bm), p(vals), 0, 3, 0, 3, 0,
                                    p(out), 1) == 1


# ------------------------------------------------ break-even: dense from the compressed weight


@pytest.fixture
def dense_from_m1(monkeypatch):
    """Every sparse call takes the dense path (decompress + dense GEMM)."""
    ones = {key: 1 for key in _native.SPARSE_DENSE_MIN_M}
    monkeypatch.setattr(_native, "sparse_dense_min_m", lambda: ones)


@pytest.mark.parametrize("vdtype,xdtype,bias", [
    (torch.float32, torch.float32, "fp32"), (torch.bfloat16, torch.bfloat16, None),
    (torch.bfloat16, torch.bfloat16, "bf16"), (torch.bfloat16, torch.float32, "fp32"),
    (torch.float16, torch.float16, None)], ids=str)
def test_dense_path_matches_reference(dense_from_m1, vdtype, xdtype, bias):
    n, k = 37, 132
    _, v, meta = dense24(n, k, seed=3, dtype=vdtype)
    b = None if bias is None else torch.randn(n, generator=gen(2)).to(
        torch.bfloat16 if bias == "bf16" else torch.float32)
    x = activation((2, 9, k), xdtype, seed=4)
    assert _native.sparse_dense_reason("sparse24_mm", 18, "bf16") is not None
    _check("sparse24_mm", None, x, (v, meta), b)
    wargs, _ = int8_args(n, k, seed=5)
    _check("sparse24_int8_mm", None, activation((17, k), seed=6), wargs, b)
    # unstructured (pq_sparse_unstructured_decompress), K not a multiple of 8
    _, (bm, vals, off) = random_sparse(n, k - 1, 0.4, seed=3)
    assert _native.sparse_dense_reason("sparse_unstructured_mm", 2) is not None
    for shape in ((1, k - 1), (2, 9, k - 1)):
        _check("sparse_unstructured_mm", None, activation(shape, xdtype, seed=4),
               (bm, vals.to(vdtype), off), b)


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("k", [100, 128, 300])
def test_unstructured_decompress_is_exact_and_refuses_inconsistent_weights(dense_from_m1,
                                                                           backend, isa, k):
    """Every ISA's decompression, bit for bit: K = 100 and 300 end in a tail after the
    64-column SIMD words (one and four of them; 100 and 300 are not multiples of 8 either), 128
    has none; inconsistent rows are refused."""
    n = 19
    _, (bm, v, off) = random_sparse(n, k, 0.5, seed=8)
    with _native.use_isa(isa):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            got = _native._decompress_unstructured(bm, v.to(dt), off, k)
            assert torch.equal(got, sf.decompress_unstructured(bm, v.to(dt), off, k))
        bad = off.clone()
        bad[4] += 1  # rows 3 and 4 disagree with their popcounts
        assert _native._decompress_unstructured(bm, v, bad, k) is None
        b3 = bm.clone()  # row 1's bitmask claims other values than its offsets hold
        b3[1, 0] = 0 if int(bm[1, 0]) == 0xFF else 0xFF
        assert _native._decompress_unstructured(b3, v, off, k) is None
        if k % 8:
            b2 = bm.clone()
            b2[0, -1] |= 0x80  # a bit at a column >= K
            assert _native._decompress_unstructured(b2, v, off, k) is None
    # the op then runs the kernel, which names the problem
    with pytest.raises(ValueError, match="inconsistent unstructured sparse weight"):
        run_op("sparse_unstructured_mm", "cpu", None, activation((3, k)), (bm, v, bad), None)


@pytest.mark.parametrize("group", [2, 16, 32, 64])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16], ids=str)
def test_int4_dense_path_matches_reference(dense_from_m1, group, xdtype):
    """2:4 + int4 from the break-even on: dense int4 codes (pruned positions = the zero point,
    so they dequantize to 0) through the dense int4 weight-only kernels, group size 2G."""
    n, k = 37, 256
    wargs, _ = int4_args(n, k, group, seed=group)
    b = torch.randn(n, generator=gen(3))
    for m in (1, 17):
        _check("sparse24_int4_mm", None, activation((m, k), xdtype, seed=m), wargs, b)


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("group,k", [(2, 384), (8, 384), (64, 384), (64, 512), (128, 512)])
def test_int4_decompress_is_exact_and_refuses_non_canonical_meta(backend, isa, group, k):
    """Every ISA's decompression: groups of 64 and 128 run the 32-group SIMD steps (three and
    four a row), groups of 2 and 8 the scalar loop."""
    n = 19
    (packed, meta, scales, zeros, g), _ = int4_args(n, k, group, seed=11)
    with _native.use_isa(isa):
        dense = _native._decompress_24_int4(packed, meta, zeros, g)
        want = sf.decompress_24(formats.dequantize_int4_groupwise(packed, scales, zeros, g), meta)
        got = formats.dequantize_int4_groupwise(dense, scales, zeros, 2 * g)
        assert torch.equal(got, want)
        for row, byte in ((5, 1), (18, meta.shape[1] - 1)):
            bad = meta.clone()
            bad[row, byte] = (bad[row, byte] & 0xF0) | 0b0101  # positions (1, 1): a duplicate
            assert _native._decompress_24_int4(packed, bad, zeros, g) is None, (row, byte)


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8],
                         ids=str)
@pytest.mark.parametrize("k", [100, 256, 324])
def test_decompress_is_exact_and_refuses_non_canonical_meta(backend, isa, vdtype, k):
    """Every ISA's decompression, bit for bit: K = 100 and 324 end in a tail of groups after
    the 64-column SIMD steps (one and five of them), K = 256 has none; a duplicate position in
    a SIMD step and in the tail is refused."""
    n = 19
    _, v, meta = dense24(n, k, seed=k, dtype=torch.float32)
    v = (v * 10).round().clamp(-127, 127).to(vdtype)
    with _native.use_isa(isa):
        d = _native._decompress_24(v, meta)
        assert d.dtype == vdtype and torch.equal(d, sf.decompress_24(v.float(), meta).to(vdtype))
        for row, byte in ((3, 0), (11, 5), (18, meta.shape[1] - 1)):
            bad = meta.clone()
            bad[row, byte] = (bad[row, byte] & 0xF0) | 0b0101  # positions (1, 1): a duplicate
            assert _native._decompress_24(v, bad) is None, (row, byte)


def test_dense_path_non_canonical_meta_runs_the_kernel(dense_from_m1):
    n, k = 8, 64
    _, v, meta = dense24(n, k, seed=9)
    meta = meta.clone()
    meta[0, 0] = 0b0000  # positions (0, 0): both kept values add up in column 0
    x = activation((20, k), seed=10)
    _check("sparse24_mm", None, x, (v, meta))


@pytest.mark.parametrize("backend,isa", isa_params())
def test_break_even_table_follows_the_cpu_level(backend, isa):
    """Each CPU level has its own measured break-even (a level without a table of its own takes
    the default one), and the decision follows the level the kernels run with."""
    with _native.use_isa(isa):
        table = _native.sparse_dense_min_m()
        assert table is _native.SPARSE_DENSE_MIN_M_BY_ISA.get(isa, _native.SPARSE_DENSE_MIN_M)
        lim = table[("sparse24_int8_mm", "fp32")]
        assert _native.sparse_dense_reason("sparse24_int8_mm", lim - 1) is None
        assert f"M={lim} >= {lim}" in _native.sparse_dense_reason("sparse24_int8_mm", lim)
    for level in ("avx2", "avx512_vnni", "avx512_bf16", "avx512_amx"):  # tables of their own, every op in them
        own = _native.SPARSE_DENSE_MIN_M_BY_ISA[level]
        assert own.keys() == _native.SPARSE_DENSE_MIN_M.keys() and own != _native.SPARSE_DENSE_MIN_M


# ------------------------------------ 2:4 bf16 above the break-even: bf16 panels, no dense copy


def _panels_here(isa) -> bool:
    return _native.module().sparse_bf16_panels_workspace_bytes(
        _native._parse_isa(isa), 1, 64, 1) >= 0


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("n,k", [(37, 64), (70, 96), (33, 320)])
@pytest.mark.parametrize("layout", ["contiguous", "col_slice", "row_step"])
def test_sparse24_bf16_dense_path_through_panels(dense_from_m1, backend, isa, n, k, layout):
    """bf16 values and activations from the break-even on: each thread decompresses 32 rows at
    a time into bf16 panels (AVX512-BF16 without AMX; other levels decompress the whole weight).
    N not a multiple of 32 (a partial last panel), K % 64 != 0 (a tail after the 64-column
    decompression steps), strided and 3-D x, with and without a bf16 bias: the reference's
    result, and in fp32 the dense product's up to the order of the fp32 sums."""
    w, v, meta = dense24(n, k, seed=n + k, dtype=torch.bfloat16)
    b = torch.randn(n, generator=gen(7)).to(torch.bfloat16)
    for shape in ((1, k), (17, k), (2, 20, k)):
        x = activation(shape, torch.bfloat16, seed=len(shape), layout=layout if len(shape) == 2
                       else "contiguous")
        for bias in (None, b):
            _check("sparse24_mm", isa, x, (v, meta), bias)
    x2 = activation((40, k), torch.bfloat16, seed=9)
    with _native.use_isa(isa):
        got = _native._sparse24_bf16_panels(x2, v, meta, b)
    if not _panels_here(isa):
        assert got is None
        return
    want = torch.nn.functional.linear(x2.float(), w.float(), b.float())
    assert got.dtype == torch.float32 and got.shape == (40, n)
    assert_close_named(got, want, "sparse24_mm/float32", f"cpu-{isa}")


@pytest.mark.parametrize("backend,isa", isa_params())
def test_sparse24_bf16_panels_refuse_what_they_cannot_run(backend, isa):
    """A duplicate position (the op then runs the gather kernel, which adds both values), x
    rows that are not bf16 values, K % 32 != 0, a short or misaligned workspace: each an
    error status, never a wrong product; levels without the panels say PQ_ERR_ISA."""
    from pyquant import _C

    n, k, m = 40, 64, 33
    _, v, meta = dense24(n, k, seed=5, dtype=torch.bfloat16)
    x = activation((m, k), torch.bfloat16, seed=6).float()
    code = _native._parse_isa(isa)
    nwork = _C.sparse_bf16_panels_workspace_bytes(code, m, k, 2)
    out = torch.empty(m, n)
    work = torch.empty(max(nwork, 0) + 128, dtype=torch.uint8)
    wp = work.data_ptr() + (-work.data_ptr() % 64)

    def call(xx=x, mt=meta, kk=k, w=wp, nb=nwork):
        return _C.sparse24_bf16_panels_mm(code, xx.data_ptr(), m, kk, kk, v.data_ptr(),
                                          mt.data_ptr(), n, 0, out.data_ptr(), w, nb, 2)

    if not _panels_here(isa):
        assert nwork == -1 and call() == 2  # PQ_ERR_ISA
        return
    assert call() == 0
    torch.testing.assert_close(out, x @ sf.decompress_24(v.float(), meta).T, rtol=1e-5,
                               atol=1e-5)
    bad = meta.clone()
    bad[7, 3] = (bad[7, 3] & 0xF0) | 0b0101  # positions (1, 1)
    assert call(mt=bad) == 1
    assert call(xx=x + 1e-3) == 1  # not bf16 values: narrowing them would round
    assert _C.sparse_bf16_panels_workspace_bytes(code, m, 48, 2) == -1  # K % 32
    assert call(kk=48) == 1
    assert call(nb=nwork - 1) == 1 and call(w=wp + 8) == 1 and call(w=0) == 1
    with _native.use_isa(isa):  # the op falls back to the gather kernel on the duplicate
        got = _native._sparse24_bf16_panels(x.to(torch.bfloat16), v, bad, None)
    assert got is None


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("n,k,density", [(37, 64, 0.3), (70, 96, 0.5), (33, 320, 0.05)])
def test_unstructured_bf16_dense_path_through_panels(dense_from_m1, backend, isa, n, k,
                                                     density):
    """Unstructured bf16 from the break-even on, through the same per-thread bf16 panels (an
    empty and a full row, N % 32 != 0, strided and 3-D x, bias); an inconsistent row makes the
    panel path step aside and the kernel report it."""
    w, (bm, vals, off) = random_sparse(n, k, density, seed=n, dtype=torch.bfloat16)
    b = torch.randn(n, generator=gen(8)).to(torch.bfloat16)
    for shape, layout in (((1, k), "contiguous"), ((17, k), "col_slice"),
                          ((19, k), "row_step"), ((2, 20, k), "contiguous")):
        x = activation(shape, torch.bfloat16, seed=len(shape), layout=layout)
        for bias in (None, b):
            _check("sparse_unstructured_mm", isa, x, (bm, vals, off), bias)
    x2 = activation((40, k), torch.bfloat16, seed=9)
    with _native.use_isa(isa):
        got = _native._unstructured_bf16_panels(x2, bm, vals, off, b)
        bad_off = off.clone()
        bad_off[3] += 1  # row 2 one value short, row 3 one long
        assert _native._unstructured_bf16_panels(x2, bm, vals, bad_off, b) is None
    if not _panels_here(isa):
        assert got is None
        return
    want = torch.nn.functional.linear(x2.float(), w.float(), b.float())
    assert_close_named(got, want, "sparse_unstructured_mm/float32", f"cpu-{isa}")
