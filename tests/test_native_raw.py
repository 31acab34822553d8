"""Direct tests of the compiled module pyquant._C (the C API of csrc/pq.h).

Buffers are torch tensors passed by address (data_ptr(), 0 for None). Every
ISA this CPU supports is tested, so the portable, AVX2 and AVX512-VNNI builds
of the kernels are all checked against the same references.
"""

import math
import os
import threading

import pytest
import torch

try:
    from pyquant import _C
except ImportError as exc:  # not built: skip, unless the build is required
    if os.environ.get("PYQUANT_REQUIRE_NATIVE"):
        raise
    pytest.skip(f"pyquant._C is not built: {exc}", allow_module_level=True)

OK, ERR_ARG, ERR_ISA = 0, 1, 2
ISAS = [i for i in range(_C.ISA_AVX512_AMX + 1) if _C.isa_available(i)]
ISA_IDS = [_C.isa_name(i) for i in ISAS]
MS = [0, 1, 3, 17, 64]
THREADS = [1, 2]


def ptr(t):
    return 0 if t is None else t.data_ptr()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_i8(shape, g, lo=-127, hi=127):
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int8)


def strided_x(M, K, ldx, g):
    """fp32 [M, K] view with row stride ldx; the padding holds NaN so that a
    kernel reading past K would poison its result."""
    full = torch.full((M, ldx), float("nan"))
    full[:, :K] = torch.randn(M, K, generator=g)
    return full, full[:, :K]


def assert_close(out, ref, mag, K):
    """fp32 accumulation against a float64 reference: error bound proportional
    to sqrt(K) times the sum of |terms| (mag); a dropped or doubled term is far
    larger than this for the K used here."""
    tol = 2e-6 * math.sqrt(K + 1) * mag + 1e-6 * ref.abs() + 1e-30
    err = (out.double() - ref).abs()
    assert torch.all(err <= tol), f"max err {err.max().item()} tol {tol.min().item()}"


def test_module_info():
    assert isinstance(_C.__version__, str) and _C.__version__
    assert (_C.ISA_PORTABLE, _C.ISA_AVX2, _C.ISA_AVX512_VNNI, _C.ISA_AVX512_BF16,
            _C.ISA_AVX512_AMX) == (0, 1, 2, 3, 4)
    assert [_C.isa_name(i) for i in range(5)] == ["portable", "avx2", "avx512_vnni", "avx512_bf16",
                                                  "avx512_amx"]
    assert _C.isa_name(7) == "unknown"
    assert "portable" in _C.compiled_isas()
    assert _C.isa_available(_C.ISA_PORTABLE) == 1
    assert _C.isa_available(5) == 0 and _C.isa_available(-1) == 0  # past the last level
    assert _C.best_isa() == max(ISAS)


# ---------------------------------------------------------------- int8 gemm
GEMM_NK = [(13, 100), (8, 64), (33, 257), (5, 1), (70, 129)]


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
@pytest.mark.parametrize("M", MS + [150])
@pytest.mark.parametrize("N,K", GEMM_NK)
@pytest.mark.parametrize("n_threads", THREADS)
def test_int8_gemm_s32(isa, M, N, K, n_threads):
    g = gen(M * 1000 + N * 7 + K)
    xq, w = rand_i8((M, K), g), rand_i8((N, K), g)
    acc = torch.full((M, N), 12345, dtype=torch.int32)
    st = _C.int8_gemm_s32(isa, ptr(xq), M, K, ptr(w), N, ptr(acc), n_threads)
    assert st == OK
    assert torch.equal(acc.long(), xq.long() @ w.long().T)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_int8_gemm_s32_extremes(isa):
    """Largest magnitudes: every product is +-127^2 (no int16 saturation on
    AVX2), long K so the int32 sums are large."""
    M, N, K = 5, 9, 4099
    g = gen(1)
    xq = (rand_i8((M, K), g, 0, 1) * 2 - 1) * 127
    w = (rand_i8((N, K), g, 0, 1) * 2 - 1) * 127
    w[0] = 127
    xq[0] = 127
    w[1] = -127
    acc = torch.empty((M, N), dtype=torch.int32)
    assert _C.int8_gemm_s32(isa, ptr(xq), M, K, ptr(w), N, ptr(acc), 2) == OK
    assert torch.equal(acc.long(), xq.long() @ w.long().T)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_int8_gemm_s32_minus_128(isa):
    """-128 is outside the documented range: must not crash; exact on the
    portable and VNNI paths, only defined on AVX2."""
    M, N, K = 3, 6, 200
    g = gen(2)
    xq, w = rand_i8((M, K), g, -128, 127), rand_i8((N, K), g, -128, 127)
    xq[0, :10] = -128
    w[0, :10] = -128
    acc = torch.empty((M, N), dtype=torch.int32)
    assert _C.int8_gemm_s32(isa, ptr(xq), M, K, ptr(w), N, ptr(acc), 1) == OK
    if isa != _C.ISA_AVX2:
        assert torch.equal(acc.long(), xq.long() @ w.long().T)


# ---------------------------------------------------------------- quantize
def quantize_ref(x):
    s = x.abs().amax(dim=1) / 127
    s = torch.where(s == 0, torch.ones_like(s), s)  # amax == 0 or amax / 127 underflows
    return torch.round(x / s[:, None]).clamp(-127, 127).to(torch.int8), s


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K,ldx", [(100, 100), (100, 131), (64, 64), (1, 3), (4096, 4100), (17, 17)])
@pytest.mark.parametrize("n_threads", THREADS)
def test_quantize_rows_int8(isa, M, K, ldx, n_threads):
    g = gen(M * 31 + K + ldx)
    full, x = strided_x(M, K, ldx, g)
    x.mul_(torch.rand(M, 1, generator=g) * 10)  # per-row magnitudes
    if M > 2:
        x[1] = 0.0  # zero row: scale 1
        x[2, : min(K, 8)] = -0.0
    xq = torch.full((M, K), 99, dtype=torch.int8)
    xs = torch.full((M,), -1.0)
    assert _C.quantize_rows_int8(isa, ptr(full), M, K, ldx, ptr(xq), ptr(xs), n_threads) == OK
    q_ref, s_ref = quantize_ref(x)
    assert torch.equal(xs, s_ref)
    assert torch.equal(xq, q_ref)


def _quantize_bf16_rows(isa, full, M, K, ldx, n_threads, work_bytes=None, offset=0):
    """pq_quantize_rows_int8_bf16 on bf16 rows `full` (row stride ldx): (status, codes,
    scales); work_bytes: the workspace handed over (default: what the query asks for)."""
    need = _C.quantize_rows_int8_bf16_workspace_bytes(M, K, n_threads)
    nbytes = need if work_bytes is None else work_bytes
    work = torch.zeros(max(nbytes, 0) + 64, dtype=torch.uint8)
    xq = torch.full((M, K), 99, dtype=torch.int8)
    xs = torch.full((M,), -1.0)
    st = _C.quantize_rows_int8_bf16(isa, ptr(full), M, K, ldx, ptr(xq), ptr(xs), n_threads,
                                    ptr(work) + offset if nbytes else 0, nbytes)
    return st, xq, xs


# K = 4100 and 9000: several rows a thread's block, and one; K = 20000: one row past the
# block size (16384 fp32 values)
@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
@pytest.mark.parametrize("M", MS + [130])
@pytest.mark.parametrize("K,ldx", [(100, 100), (100, 131), (1, 3), (4100, 4100), (9000, 9001),
                                   (20000, 20000), (17, 17)])
@pytest.mark.parametrize("n_threads", THREADS + [3])
def test_quantize_rows_int8_bf16_is_the_fp32_path(isa, M, K, ldx, n_threads):
    """bf16 rows quantize to the codes and scales of their fp32 values, bit for bit, on
    every ISA, row stride and thread count; the padding past K (NaN) is never read."""
    if M * K > 1_000_000 and (M, n_threads) != (130, 2):
        pytest.skip("large sizes once")
    g = gen(M * 37 + K + ldx + n_threads)
    full = torch.full((M, ldx), float("nan")).to(torch.bfloat16)
    x = full[:, :K]
    x.copy_(torch.randn(M, K, generator=g) * (torch.rand(M, 1, generator=g) * 10))
    if M > 2:
        x[1] = 0.0
        x[2, : min(K, 8)] = -0.0
    st, xq, xs = _quantize_bf16_rows(isa, full, M, K, ldx, n_threads)
    assert st == OK
    q_ref, s_ref = quantize_ref(x.float())
    assert torch.equal(xs, s_ref)
    assert torch.equal(xq, q_ref)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_quantize_rows_int8_bf16_non_finite_rows(isa):
    """A bf16 row with an Inf or NaN gets scale NaN and codes 0, as an fp32 one does."""
    x = torch.randn(5, 300).to(torch.bfloat16)
    x[0, 5] = float("nan")
    x[2, 299] = float("inf")
    x[3, :] = float("-inf")
    st, xq, xs = _quantize_bf16_rows(isa, x, 5, 300, 300, 2)
    assert st == OK
    assert torch.isnan(xs[[0, 2, 3]]).all() and not torch.isnan(xs[[1, 4]]).any()
    assert (xq[[0, 2, 3]] == 0).all()
    q_ref, s_ref = quantize_ref(x[[1, 4]].float())
    assert torch.equal(xq[[1, 4]], q_ref) and torch.equal(xs[[1, 4]], s_ref)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_quantize_rows_int8_bf16_refusals(isa):
    """A workspace short by one byte or misaligned, a row stride below K and bad sizes are
    refused (PQ_ERR_ARG) without writing; the query sizes what the call asks for."""
    M, K = 40, 1000
    x = torch.randn(M, K).to(torch.bfloat16)
    need = _C.quantize_rows_int8_bf16_workspace_bytes(M, K, 2)
    assert need == 2 * K * 4  # two threads, one row of 1000 fp32 values each
    assert _C.quantize_rows_int8_bf16_workspace_bytes(M, K, 1) == K * 4
    assert _C.quantize_rows_int8_bf16_workspace_bytes(3, K, 8) == 3 * K * 4  # 3 rows, 3 threads
    # every thread gets rows: 64 rows of 4096 on 64 threads, a row each (4 a block would leave
    # 48 threads idle)
    assert _C.quantize_rows_int8_bf16_workspace_bytes(64, 4096, 64) == 64 * 4096 * 4
    assert _C.quantize_rows_int8_bf16_workspace_bytes(0, K, 2) == 0
    assert _C.quantize_rows_int8_bf16_workspace_bytes(-1, K, 2) == -1
    for work_bytes, offset in ((need - 1, 0), (need, 2)):
        st, xq, xs = _quantize_bf16_rows(isa, x, M, K, K, 2, work_bytes, offset)
        assert st == ERR_ARG
        assert (xq == 99).all() and (xs == -1.0).all()
    assert _quantize_bf16_rows(isa, x, M, K, K - 1, 2)[0] == ERR_ARG
    assert _quantize_bf16_rows(isa, x, 0, K, K, 2)[0] == OK


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_quantize_rows_int8_ties(isa):
    """amax = 127 gives s = 1 exactly, so x + 0.5 hits every rounding tie:
    round half to even, like torch.round."""
    halves = torch.arange(-60, 60, dtype=torch.float32) + 0.5
    x = torch.cat([torch.tensor([127.0]), halves, -halves[:19]])[None].repeat(3, 1).contiguous()
    M, K = x.shape
    xq = torch.empty((M, K), dtype=torch.int8)
    xs = torch.empty(M)
    assert _C.quantize_rows_int8(isa, ptr(x), M, K, K, ptr(xq), ptr(xs), 2) == OK
    q_ref, s_ref = quantize_ref(x)
    assert torch.equal(xs, s_ref) and xs[0].item() == 1.0
    assert torch.equal(xq, q_ref)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_quantize_rows_int8_subnormal(isa):
    """Subnormal rows: amax / 127 is subnormal, or underflows to 0 (then s = 1)."""
    tiny = torch.finfo(torch.float32).smallest_normal
    rows = [[tiny * 0.5, -tiny * 0.25, 0.0], [1e-45, 0.0, -1e-45], [1e-43, 5e-44, 0.0], [0.0, -0.0, 0.0]]
    x = torch.tensor([r * 7 for r in rows])  # K = 21: vector body and tail
    M, K = x.shape
    xq = torch.empty((M, K), dtype=torch.int8)
    xs = torch.empty(M)
    assert _C.quantize_rows_int8(isa, ptr(x), M, K, K, ptr(xq), ptr(xs), 1) == OK
    q_ref, s_ref = quantize_ref(x)
    assert s_ref[1].item() == 1.0 and s_ref[3].item() == 1.0
    assert torch.equal(xs, s_ref)
    assert torch.equal(xq, q_ref)


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_quantize_rows_int8_nan_does_not_crash(isa):
    x = torch.randn(3, 40)
    x[0, 5] = float("nan")
    x[1, :] = float("nan")
    x[2, 39] = float("inf")
    xq = torch.empty((3, 40), dtype=torch.int8)
    xs = torch.empty(3)
    assert _C.quantize_rows_int8(isa, ptr(x), 3, 40, 40, ptr(xq), ptr(xs), 1) == OK


# ---------------------------------------------------------------- int8 dynamic
@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
@pytest.mark.parametrize("M", MS + [150])
@pytest.mark.parametrize("N,K", GEMM_NK)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("n_threads", THREADS)
def test_int8_dynamic_mm(isa, M, N, K, has_bias, n_threads):
    """The epilogue order is specified, so the result is bit-exact:
    (float)acc * (x_scale[m] * w_scale[n]) + bias[n] in float32."""
    g = gen(M * 17 + N * 3 + K)
    xq, w = rand_i8((M, K), g), rand_i8((N, K), g)
    xs = torch.rand(M, generator=g) * 0.1 + 1e-3
    ws = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g) if has_bias else None
    out = torch.full((M, N), float("nan"))
    st = _C.int8_dynamic_mm(isa, ptr(xq), ptr(xs), M, K, ptr(w), N, ptr(ws), ptr(bias), ptr(out), n_threads)
    assert st == OK
    ref = (xq.long() @ w.long().T).float() * (xs[:, None] * ws[None, :])
    if bias is not None:
        ref = ref + bias
    assert torch.equal(out, ref)


# ---------------------------------------------------------------- int8 weight-only
@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("N,K,ldx", [(13, 100, 100), (13, 100, 107), (8, 64, 64), (33, 257, 300), (70, 31, 31)])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("n_threads", THREADS)
def test_int8_weight_only_mm(isa, M, N, K, ldx, has_bias, n_threads):
    g = gen(M * 13 + N * 5 + K + ldx)
    full, x = strided_x(M, K, ldx, g)
    w = rand_i8((N, K), g)
    ws = torch.rand(N, generator=g) * 0.02 + 1e-3
    bias = torch.randn(N, generator=g) if has_bias else None
    out = torch.full((M, N), float("nan"))
    st = _C.int8_weight_only_mm(isa, ptr(full), M, K, ldx, ptr(w), N, ptr(ws), ptr(bias), ptr(out), n_threads)
    assert st == OK
    wd = w.double() * ws.double()[:, None]
    ref = x.double() @ wd.T + (0 if bias is None else bias.double())
    assert_close(out, ref, x.double().abs() @ wd.abs().T, K)


# ---------------------------------------------------------------- int4 weight-only
def pack_int4(codes):
    """[N, K] codes 0..15 -> [N, K/2] bytes, even k in the low nibble."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


INT4_SHAPES = [(13, 64, 32), (33, 256, 64), (7, 96, 32), (4, 256, 128), (9, 512, 256), (5, 100, 50), (6, 20, 2)]


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("N,K,G", INT4_SHAPES)
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("n_threads", THREADS)
def test_int4_weight_only_mm(isa, M, N, K, G, has_bias, strided, n_threads):
    g = gen(M * 11 + N * 3 + K + G)
    ldx = K + 9 if strided else K
    full, x = strided_x(M, K, ldx, g)
    codes = torch.randint(0, 16, (N, K), generator=g)
    zeros = torch.randint(0, 16, (N, K // G), generator=g).to(torch.uint8)
    scales = torch.rand(N, K // G, generator=g) * 0.1 + 1e-3
    bias = torch.randn(N, generator=g) if has_bias else None
    wp = pack_int4(codes)
    out = torch.full((M, N), float("nan"))
    st = _C.int4_weight_only_mm(
        isa, ptr(full), M, K, ldx, ptr(wp), N, ptr(scales), ptr(zeros), G, ptr(bias), ptr(out), n_threads
    )
    assert st == OK
    wd = scales.double().repeat_interleave(G, 1) * (codes - zeros.long().repeat_interleave(G, 1)).double()
    ref = x.double() @ wd.T + (0 if bias is None else bias.double())
    assert_close(out, ref, x.double().abs() @ wd.abs().T, K)


# ---------------------------------------------------------------- edge cases
@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_k_zero_writes_bias(isa):
    M, N = 3, 5
    bias = torch.randn(N)
    x = torch.empty(M, 0)
    for has_bias in (False, True):
        b = bias if has_bias else None
        expect = (bias if has_bias else torch.zeros(N)).expand(M, N)
        out = torch.full((M, N), float("nan"))
        assert _C.int8_weight_only_mm(isa, 0, M, 0, 0, 0, N, ptr(torch.ones(N)), ptr(b), ptr(out), 1) == OK
        assert torch.equal(out, expect)
        out.fill_(float("nan"))
        st = _C.int4_weight_only_mm(isa, ptr(x), M, 0, 0, 0, N, 0, 0, 32, ptr(b), ptr(out), 1)
        assert st == OK and torch.equal(out, expect)
        out.fill_(float("nan"))
        st = _C.int8_dynamic_mm(isa, 0, ptr(torch.ones(M)), M, 0, 0, N, ptr(torch.ones(N)), ptr(b), ptr(out), 1)
        assert st == OK and torch.equal(out, expect)
    acc = torch.full((M, N), 7, dtype=torch.int32)
    assert _C.int8_gemm_s32(isa, 0, M, 0, 0, N, ptr(acc), 1) == OK
    assert torch.equal(acc, torch.zeros(M, N, dtype=torch.int32))
    xs = torch.zeros(M)
    assert _C.quantize_rows_int8(isa, 0, M, 0, 0, 0, ptr(xs), 1) == OK
    assert torch.equal(xs, torch.ones(M))


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_empty_outputs_untouched(isa):
    K = 16
    x, w = torch.randn(2, K), rand_i8((4, K), gen(3))
    out = torch.full((2, 4), float("nan"))
    ws = torch.ones(4)
    assert _C.int8_weight_only_mm(isa, ptr(x), 0, K, K, ptr(w), 4, ptr(ws), 0, ptr(out), 1) == OK
    assert _C.int8_weight_only_mm(isa, ptr(x), 2, K, K, ptr(w), 0, ptr(ws), 0, ptr(out), 1) == OK
    assert torch.isnan(out).all()


@pytest.mark.parametrize("n_threads", [0, -1, 3, 64])
def test_any_thread_count(n_threads):
    M, N, K = 3, 21, 70
    g = gen(4)
    x, w, ws = torch.randn(M, K, generator=g), rand_i8((N, K), g), torch.rand(N, generator=g)
    outs = []
    for nt in (1, n_threads):
        out = torch.empty(M, N)
        assert _C.int8_weight_only_mm(_C.best_isa(), ptr(x), M, K, K, ptr(w), N, ptr(ws), 0, ptr(out), nt) == OK
        outs.append(out)
    assert torch.equal(outs[0], outs[1])  # partitioning over N does not change per-output sums


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_bad_arguments(isa):
    M, N, K, G = 2, 4, 64, 32
    x, xq, w = torch.randn(M, K), rand_i8((M, K), gen(5)), rand_i8((N, K), gen(6))
    wp = torch.zeros(N, K // 2, dtype=torch.uint8)
    sc, zp = torch.ones(N, K // G), torch.zeros(N, K // G, dtype=torch.uint8)
    ws, xs, out = torch.ones(N), torch.ones(M), torch.empty(M, N)
    acc = torch.empty(M, N, dtype=torch.int32)
    X, XQ, W, WP, SC, ZP, WS, XS, OUT, ACC = map(ptr, (x, xq, w, wp, sc, zp, ws, xs, out, acc))

    def wo8(M=M, K=K, ldx=K, x=X, w=W, ws=WS, out=OUT, N=N):
        return _C.int8_weight_only_mm(isa, x, M, K, ldx, w, N, ws, 0, out, 1)

    def wo4(M=M, K=K, ldx=K, G=G, x=X, wp=WP, sc=SC, zp=ZP, out=OUT, N=N):
        return _C.int4_weight_only_mm(isa, x, M, K, ldx, wp, N, sc, zp, G, 0, out, 1)

    def dyn(M=M, K=K, xq=XQ, xs=XS, w=W, ws=WS, out=OUT, N=N):
        return _C.int8_dynamic_mm(isa, xq, xs, M, K, w, N, ws, 0, out, 1)

    def gemm(M=M, K=K, xq=XQ, w=W, acc=ACC, N=N):
        return _C.int8_gemm_s32(isa, xq, M, K, w, N, acc, 1)

    def quant(M=M, K=K, ldx=K, x=X, q=XQ, s=XS):
        return _C.quantize_rows_int8(isa, x, M, K, ldx, q, s, 1)

    for f in (wo8, wo4, dyn, gemm, quant):
        assert f() == OK
        assert f(M=-1) == ERR_ARG
        assert f(K=-2) == ERR_ARG
    for f in (wo8, wo4, dyn, gemm):
        assert f(N=-1) == ERR_ARG
    for f in (wo8, wo4, quant):
        assert f(ldx=K - 1) == ERR_ARG
        assert f(x=0) == ERR_ARG
    assert wo8(w=0) == ERR_ARG and wo8(ws=0) == ERR_ARG and wo8(out=0) == ERR_ARG
    assert wo4(wp=0) == ERR_ARG and wo4(sc=0) == ERR_ARG and wo4(zp=0) == ERR_ARG and wo4(out=0) == ERR_ARG
    assert wo4(G=48) == ERR_ARG  # K % G != 0
    assert wo4(G=33, K=66, ldx=66) == ERR_ARG  # odd group
    assert wo4(G=0) == ERR_ARG and wo4(G=-32) == ERR_ARG
    assert dyn(xq=0) == ERR_ARG and dyn(xs=0) == ERR_ARG and dyn(w=0) == ERR_ARG
    assert dyn(ws=0) == ERR_ARG and dyn(out=0) == ERR_ARG
    assert gemm(xq=0) == ERR_ARG and gemm(w=0) == ERR_ARG and gemm(acc=0) == ERR_ARG
    assert quant(q=0) == ERR_ARG and quant(s=0) == ERR_ARG
    assert wo8(M=2**62, ldx=2**40) == ERR_ARG  # size products overflow int64


def test_unsupported_isa():
    x, w, ws, out = torch.randn(1, 8), torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), torch.empty(1, 2)
    top = _C.ISA_AVX512_AMX
    for isa in [-1, top + 1, 100] + [i for i in range(top + 1) if not _C.isa_available(i)]:
        assert _C.int8_weight_only_mm(isa, ptr(x), 1, 8, 8, ptr(w), 2, ptr(ws), 0, ptr(out), 1) == ERR_ISA
        assert _C.quantize_rows_int8(isa, 0, 0, 0, 0, 0, 0, 1) == ERR_ISA
        assert _C.int8_gemm_s32(isa, 0, 0, 0, 0, 0, 0, 1) == ERR_ISA
        assert _C.int8_dynamic_mm(isa, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1) == ERR_ISA
        assert _C.int4_weight_only_mm(isa, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0, 1) == ERR_ISA


def test_concurrent_python_threads():
    """Kernels release the GIL and keep no state: concurrent calls from Python
    threads, each with its own OpenMP team, give the sequential results."""
    M, N, K = 4, 300, 512
    g = gen(7)
    x, w, ws = torch.randn(M, K, generator=g), rand_i8((N, K), g), torch.rand(N, generator=g)
    isa = _C.best_isa()
    ref = torch.empty(M, N)
    assert _C.int8_weight_only_mm(isa, ptr(x), M, K, K, ptr(w), N, ptr(ws), 0, ptr(ref), 2) == OK
    outs = [torch.empty(M, N) for _ in range(4)]
    status = []

    def run(out):
        for _ in range(20):
            status.append(_C.int8_weight_only_mm(isa, ptr(x), M, K, K, ptr(w), N, ptr(ws), 0, ptr(out), 2))

    threads = [threading.Thread(target=run, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert status == [OK] * 80
    for o in outs:
        assert torch.equal(o, ref)


def test_cuda_module_without_gpu_requirement():
    """pyquant._C_cuda (built only when nvcc was found) must import and answer
    without a GPU or driver: device_count() is 0 then, never an error."""
    try:
        from pyquant import _C_cuda
    except ImportError:
        pytest.skip("pyquant._C_cuda was not built (no CUDA compiler or PYQUANT_CUDA=OFF)")
    assert _C_cuda.cuda_runtime_version() > 0
    n = _C_cuda.device_count()
    assert isinstance(n, int) and n >= 0


# ---------------------------------------------------------------- AMX tiles and W4A8
AMX = _C.ISA_AVX512_AMX
needs_amx = pytest.mark.skipif(not _C.isa_available(AMX), reason="no AMX on this CPU/OS")


def int8_work(isa, M, K, N, n_threads=2):
    nb = _C.int8_workspace_bytes(isa, M, K, N, n_threads)
    return torch.empty(max(nb, 1), dtype=torch.uint8), nb


def w8a8_panel_bytes(M, K, n_threads):
    """The panel GEMM's scratch (csrc/cpu/kernels.h): x row sums, then 32 K bytes a thread;
    0 where it does not run (M < 16, K % 64 != 0)."""
    if M < 16 or K % 64:
        return 0
    return -(-M * 4 // 64) * 64 + n_threads * 32 * K


@needs_amx
@pytest.mark.parametrize("M", [9, 16, 17, 33, 64, 150, 272, 300, 400, 410])
@pytest.mark.parametrize("N,K", [(32, 64), (96, 256), (64, 4096), (288, 4160)])
@pytest.mark.parametrize("n_threads", THREADS)
def test_amx_int8_gemm_s32_exact(M, N, K, n_threads):
    """The tile path (activations repacked into the caller's scratch, M tails zero-padded) is
    exact for every int8 input, -128 included. Packed activations over 1.5 MiB (M 400 / 410
    at K = 4160) run in K chunks of 4096 (64 + 1 tiles) whose partial sums wait in the
    output (tile_amx.h), with a second M / N cache block (M > 256, N 288), a lone last tile
    (400 = 25 tiles) and a partial one (410), which never chunk; M 272 / 300 there fit L2
    and take one strip a task over all their rows."""
    g = gen(M * 7 + N + K)
    xq, w = rand_i8((M, K), g, lo=-128), rand_i8((N, K), g, lo=-128)
    work, nb = int8_work(AMX, M, K, N, n_threads)
    assert nb == max(-(-M // 16) * 16 * K, w8a8_panel_bytes(M, K, n_threads))
    acc = torch.full((M, N), 7, dtype=torch.int32)
    assert _C.int8_gemm_s32(AMX, ptr(xq), M, K, ptr(w), N, ptr(acc), n_threads, ptr(work), nb) == OK
    assert torch.equal(acc, (xq.long() @ w.long().T).int())


@needs_amx
@pytest.mark.parametrize("M,N,K", [(33, 64, 128), (150, 96, 256), (300, 288, 4160),
                                   (410, 288, 4160)])
@pytest.mark.parametrize("has_bias", [False, True])
def test_amx_int8_dynamic_bit_exact(M, N, K, has_bias):
    g = gen(M + N + K)
    xq, w = rand_i8((M, K), g), rand_i8((N, K), g)
    xs = torch.rand(M, generator=g) * 0.1 + 1e-3
    ws = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g) if has_bias else None
    work, nb = int8_work(AMX, M, K, N)
    out = torch.full((M, N), float("nan"))
    assert _C.int8_dynamic_mm(AMX, ptr(xq), ptr(xs), M, K, ptr(w), N, ptr(ws), ptr(bias), ptr(out),
                              2, ptr(work), nb) == OK
    ref = (xq.long() @ w.long().T).float() * (xs[:, None] * ws[None, :])
    if bias is not None:
        ref = ref + bias
    assert torch.equal(out, ref)


def _amx_wo_call(op, x, work, nb, n_threads):
    """int8 / int4 (G = 64) weight-only on AMX with all-ones weights, scratch as given."""
    M, K = x.shape
    N = 32
    out = torch.empty(M, N)
    if op == "int8":
        w, ws = torch.ones(N, K, dtype=torch.int8), torch.ones(N)
        st = _C.int8_weight_only_mm(AMX, ptr(x), M, K, K, ptr(w), N, ptr(ws), 0, ptr(out),
                                    n_threads, work, nb)
    else:
        G = 64
        wp = torch.full((N, K // 2), 0x11, dtype=torch.uint8)  # codes 1, zero point 0
        sc, zp = torch.ones(N, K // G), torch.zeros(N, K // G, dtype=torch.uint8)
        st = _C.int4_weight_only_mm(AMX, ptr(x), M, K, K, ptr(wp), N, ptr(sc), ptr(zp), G, 0,
                                    ptr(out), n_threads, work, nb)
    assert st == OK
    return out


@needs_amx
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("M,N", [(40, 256), (150, 256), (150, 64), (33, 96)])
def test_amx_int8_gemm_task_shapes(M, N, n_threads):
    """The AMX int8 GEMM's tasks: one weight strip x all activation rows where there are two
    strips a thread or more (N = 256), 64 rows a task where there are fewer (N = 64, 96 on
    two threads), odd M on both: exact int32 sums either way. K = 640: past the short rows'
    order (kAmxRowsFirstMaxK), and the activations fit L2 (no K chunks)."""
    K = 640
    g = gen(M + N + n_threads)
    xq, w = rand_i8((M, K), g), rand_i8((N, K), g)
    work, nb = int8_work(AMX, M, K, N, n_threads)
    acc = torch.full((M, N), 12345, dtype=torch.int32)
    assert _C.int8_gemm_s32(AMX, ptr(xq), M, K, ptr(w), N, ptr(acc), n_threads, ptr(work),
                            nb) == OK
    assert torch.equal(acc.long(), xq.long() @ w.long().T)


@needs_amx
@pytest.mark.parametrize("op", ["int8", "int4"])
@pytest.mark.parametrize("n_threads", THREADS)
def test_amx_bf16_paths_run_on_the_callers_scratch(op, n_threads):
    """The AMX-BF16 weight-only paths take all their scratch from the caller (native code
    allocates nothing): given the workspace they run -- seen by their one documented
    difference, bf16 tiles read subnormal terms as zero -- and without it, or with one byte
    less, or misaligned, the fp32 path runs and keeps the subnormals."""
    M, K = 40, 256
    x = torch.full((M, K), 1e-39)  # a subnormal float32: its bf16 term is subnormal too
    if op == "int8":
        nb = _C.int8_weight_only_workspace_bytes(AMX, M, K, 32, n_threads)
    else:
        nb = _C.int4_weight_only_workspace_bytes(AMX, M, K, 32, 64, n_threads)
        assert not _C.int4_weight_only_fixed_point(AMX, M, K, 64)
    # three bf16 terms of the packed activations, then per thread a strip, its scales and
    # the fp32 sums of a 512 x 256 task (kernels.h)
    a64 = lambda n: -(-n // 64) * 64  # noqa: E731
    # (int8's scale is per row, but its strips run as groups of 256 k here: kernels.h)
    # (a strip's rows are padded by 64 bytes: kernels.h, kAmxStripPad)
    strip = a64(32 * (2 * K + 64)) + a64(128 * (K // (256 if op == "int8" else 64))) + (1 << 19)
    assert nb == 3 * 48 * K * 2 + n_threads * strip
    buf = torch.zeros(nb + 64, dtype=torch.uint8)
    assert torch.all(_amx_wo_call(op, x, ptr(buf), nb, n_threads) == 0)  # the tiles ran
    fp32 = torch.full((M, 32), K * 1e-39)
    for p, n in [(0, 0), (ptr(buf), nb - 1), (ptr(buf) + 4, nb)]:
        torch.testing.assert_close(_amx_wo_call(op, x, p, n, n_threads), fp32, rtol=1e-5,
                                   atol=0)
    assert _C.int8_weight_only_workspace_bytes(AMX, 15, K, 32, 1) == 0  # M < 16
    assert _C.int8_weight_only_workspace_bytes(AMX, M, K, 33, 1) == 0  # N % 32


@needs_amx
@pytest.mark.parametrize("n_threads", THREADS)
def test_amx_int8_weight_only_fixed_point(n_threads):
    """int8 weight-only at prefill on AMX: activations that are bf16 values take the bf16
    tiles (one exact term: products exact), all others the int8 tiles with x in 24-bit fixed
    point, whose documented error per entry is at most s = max|x_row| / 8323072. A row of one
    large entry and many small ones shows which ran: the fixed-point error is there, within
    its bound; with bf16 values it is not."""
    M, N, K = 20, 32, 256
    s = 1000.0 / 8323072
    x = torch.full((M, K), 0.4 * s)  # rounds to 0 in fixed point: error 0.4 s each, one sign
    x[:, 0] = 1000.0
    w, ws = torch.ones(N, K, dtype=torch.int8), torch.ones(N)
    nb = _C.int8_weight_only_workspace_bytes(AMX, M, K, N, n_threads)
    buf = torch.zeros(nb + 64, dtype=torch.uint8)
    for xv, fixed in ((x, True), (x.bfloat16().float(), False)):
        out = torch.empty(M, N)
        assert _C.int8_weight_only_mm(AMX, ptr(xv), M, K, K, ptr(w), N, ptr(ws), 0, ptr(out),
                                      n_threads, ptr(buf), nb) == OK
        exact = xv.double().sum(1, keepdim=True).expand(M, N)
        err = (out.double() - exact).abs().max().item()
        if fixed:
            assert 1e-3 < err <= K * s * 1.01, err
        else:
            assert err < 3e-4, err  # a few ulp of 1000 (6.1e-5): fp32 summation only


@needs_amx
@pytest.mark.parametrize("K", [96, 4096, 4128])
def test_amx_bf16_int8_weight_only_chunks_k(K):
    """int8 weight-only with bf16-valued activations on the AMX-BF16 tiles runs K in
    unscaled groups of 512, .., 32 k (the largest dividing K), their fp32 sum then times the
    row scale, plus the bias. At 200 rows of K = 4096 the packed activations pass 1.5 MiB
    and K is cut in chunks across tasks (tile_amx_grouped.h): the result stays the exact
    products summed in fp32, the row scale applied once."""
    g = gen(K)
    M, N = 200, 64
    x = torch.randn(M, K, generator=g).bfloat16().float()
    w = rand_i8((N, K), g)
    ws = torch.rand(N, generator=g) * 0.01 + 1e-3
    b = torch.randn(N, generator=g)
    nb = _C.int8_weight_only_workspace_bytes(AMX, M, K, N, 2)
    buf = torch.zeros(nb + 64, dtype=torch.uint8)
    out = torch.empty(M, N)
    assert _C.int8_weight_only_mm(AMX, ptr(x), M, K, K, ptr(w), N, ptr(ws), ptr(b), ptr(out),
                                  2, (ptr(buf) + 63) // 64 * 64, nb) == OK
    dot = x.double() @ w.double().T  # exact: every product and sum fits a double
    want = dot * ws.double() + b.double()
    # fp32 sums of K exact products: a few ulp of the largest partial sum, then two roundings
    bound = 1e-6 * (x.double().abs() @ w.double().abs().T) * ws.double() + 1e-6 * want.abs()
    assert ((out.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("isa", [_C.ISA_AVX512_VNNI, _C.ISA_AVX512_BF16, AMX])
@pytest.mark.parametrize("n_threads", THREADS)
def test_int8_weight_only_decode_fixed_point(isa, n_threads):
    """int8 weight-only at M = 1 on the AVX512 ISAs, given its workspace: x in 24-bit fixed
    point (bf16 values too), the terms through the exact VNNI GEMV. The row of the AMX test
    above shows it: the fixed-point error is there, within its bound (K s); without the
    workspace, or with a NaN, the fp32 path runs (no such error; NaN out)."""
    if not _C.isa_available(isa):
        pytest.skip("ISA not available on this CPU/OS")
    N, K = 40, 1000  # no multiple of 64 or 32: any K and N
    s = 1000.0 / 8323072
    x = torch.full((1, K), 0.4 * s)
    x[0, 0] = 1000.0
    w, ws = torch.ones(N, K, dtype=torch.int8), torch.ones(N)
    assert _C.int8_weight_only_fixed_point(isa, 1, K, N)
    assert not _C.int8_weight_only_fixed_point(_C.ISA_AVX2, 1, K, N)
    nb = _C.int8_weight_only_workspace_bytes(isa, 1, K, N, n_threads)
    a64 = lambda n: -(-n // 64) * 64  # noqa: E731
    assert nb == a64(3 * K) + 64 + a64(3 * N * 4)
    buf = torch.zeros(nb + 64, dtype=torch.uint8)
    wa = (ptr(buf) + 63) // 64 * 64

    def run(xv, work, nbytes):
        out = torch.empty(1, N)
        assert _C.int8_weight_only_mm(isa, ptr(xv), 1, K, K, ptr(w), N, ptr(ws), 0, ptr(out),
                                      n_threads, work, nbytes) == OK
        return out

    fx_err = K * 0.4 * s  # every small entry rounds to 0: 0.4 s each, one sign (0.048)
    for xv in (x, x.bfloat16().float()):
        exact = xv.double().sum().item()
        err = (run(xv, wa, nb).double() - exact).abs().max().item()
        assert 0.5 * fx_err < err <= K * s * 1.01, err
        # fp32 path: only the rounding of the sums (~13 adds of ulp(1000) / 2 here)
        assert (run(xv, 0, 0).double() - exact).abs().max().item() < 0.1 * fx_err
    xn = x.clone()
    xn[0, 5] = float("nan")
    assert run(xn, wa, nb).isnan().all()


@pytest.mark.parametrize("isa", [_C.ISA_AVX512_VNNI, _C.ISA_AVX512_BF16])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("M,N,K", [(12, 32, 64), (17, 45, 192), (33, 61, 384), (350, 37, 4096)])
def test_int8_weight_only_fixed_point_panels(isa, n_threads, M, N, K):
    """int8 weight-only from M = 12 without AMX, given its workspace, for activations that are
    not bf16 values (csrc/cpu/tile_vnni_panel.h): the three fixed-point term rows of each x row
    on the W8A8 panels, summed in registers in the order of the M = 1 path, so every row equals
    that row alone at M = 1, bit for bit. N and M tails (45, 61 columns; 17, 33 rows), int8
    extremes, rows of very different scales, bias, slices of the scratch (M = 350 at K = 4096:
    170 rows a slice). Without the workspace, misaligned, or with a NaN the float path runs."""
    if not _C.isa_available(isa):
        pytest.skip("ISA not available on this CPU/OS")
    g = gen(M + N + K)
    x = torch.randn(M, K, generator=g)
    x[0, 1], x[M - 1] = 300.0, x[M - 1] * 1e-3
    w = rand_i8((N, K), g)
    w[0, :2], w[N - 1, :2] = -128, 127
    ws = torch.rand(N, generator=g) * 0.01 + 1e-3
    b = torch.randn(N, generator=g)
    assert _C.int8_weight_only_fixed_point(isa, M, K, N)
    assert not _C.int8_weight_only_fixed_point(isa, 11, K, N)
    assert not _C.int8_weight_only_fixed_point(isa, M, K + 32, N)  # K % 64 != 0
    nb = _C.int8_weight_only_workspace_bytes(isa, M, K, N, n_threads)
    buf = torch.zeros(nb + 128, dtype=torch.uint8)
    wa = (ptr(buf) + 63) // 64 * 64

    def run(xv, work, nbytes, m=M):
        out = torch.full((m, N), float("nan"))
        assert _C.int8_weight_only_mm(isa, ptr(xv), m, K, K, ptr(w), N, ptr(ws), ptr(b),
                                      ptr(out), n_threads, work, nbytes) == OK
        return out

    got = run(x, wa, nb)
    w1 = _C.int8_weight_only_workspace_bytes(isa, 1, K, N, n_threads)
    buf1 = torch.zeros(w1 + 64, dtype=torch.uint8)
    rows = torch.cat([run(x[i:i + 1].clone(), (ptr(buf1) + 63) // 64 * 64, w1, 1) for i in range(M)])
    assert torch.equal(got, rows)
    want = x.double() @ (w.double() * ws.double()[:, None]).T + b.double()
    # the fixed-point bound per row (K steps of max|x_row| / 8323072) plus fp32 summation
    step = x.abs().amax(1, keepdim=True).double() / 8323072
    mag = x.double().abs() @ (w.double().abs() * ws.double()[:, None]).T
    bound = step * (w.double().abs() * ws.double()[:, None]).sum(1) + 1e-6 * mag + 1e-6 * b.double().abs()
    assert ((got.double() - want).abs() <= bound).all()
    for work, nbytes in ((0, 0), (wa + 1, nb)):  # the float path: the same values within fp32
        assert ((run(x, work, nbytes).double() - want).abs() <= bound).all()
    xn = x.clone()
    xn[M // 2, 3] = float("nan")
    out = run(xn, wa, nb)
    assert out[M // 2].isnan().all() and not out[: M // 2].isnan().any()


def test_int8_weight_only_fixed_point_slices():
    """Rows past one slice of the fixed-point scratch (kernels.h: 336 rows at K = 64,
    N = 8192) run slice by slice; each matches the reference (any ISA runs the shape)."""
    from helpers import assert_close_named, tol_name
    from pyquant import _native, reference

    M, N, K = 700, 8192, 64
    g = gen(3)
    x = torch.randn(M, K, generator=g)
    w = rand_i8((N, K), g)
    ws = torch.rand(N, generator=g) * 0.01 + 1e-3
    b = torch.randn(N, generator=g)
    out = _native.int8_weight_only_mm(x, w, ws, b)
    assert_close_named(out, reference.int8_weight_only_mm(x, w, ws, b),
                       tol_name("int8_weight_only_mm", torch.float32))


@needs_amx
@pytest.mark.parametrize("n_threads", THREADS)
def test_amx_int4_dynamic_scratch(n_threads):
    """W4A8's workspace covers the AMX path (packed codes + a strip per thread) or the VNNI
    one, whichever is larger; with only the VNNI part, or misaligned, the VNNI kernel runs.
    Every call matches the float64 reference to fp32 summation over the K/G groups."""
    M, N, K, G = 40, 64, 512, 64
    g = gen(11)
    xq = rand_i8((M, K), g)
    xs = torch.rand(M, generator=g) + 0.5
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    wp = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    sc = torch.rand(N, K // G, generator=g) + 0.5
    zp = torch.randint(0, 16, (N, K // G), generator=g, dtype=torch.uint8)
    base = M * (K // G) * 4 + M * K
    # (a strip's rows are padded by 64 bytes: kernels.h, kAmxStripPad)
    amx = 48 * K + n_threads * (32 * (K + 64) + 128 * (K // G) + (1 << 19))
    panel = lambda m: m * (K // G) * 4 + n_threads * (32 * K + 2 * 128 * (K // G))  # noqa: E731
    nb = _C.int4_dynamic_workspace_bytes(AMX, M, K, G, n_threads)
    assert nb == max(base, amx, panel(M))
    assert _C.int4_dynamic_workspace_bytes(_C.ISA_AVX512_VNNI, M, K, G, n_threads) == max(
        base, panel(M))  # the panel GEMM of the non-AMX builds (test_w4a8_panel)
    assert _C.int4_dynamic_workspace_bytes(AMX, 8, K, G, n_threads) == max(
        8 * (K // G) * 4 + 8 * K, panel(8))
    buf = torch.zeros(nb + 64, dtype=torch.uint8)
    outs = []
    for p, n in [(ptr(buf), nb), (ptr(buf), base), (ptr(buf) + 4, nb)]:
        out = torch.empty(M, N)
        assert _C.int4_dynamic_mm(AMX, ptr(xq), ptr(xs), M, K, ptr(wp), N, ptr(sc), ptr(zp), G,
                                  0, ptr(out), p, n, n_threads) == OK
        outs.append(out)
    acc = ((xq.double()[:, None, :] * (codes.double() - zp.double().repeat_interleave(G, 1)))
           .reshape(M, N, K // G, G).sum(-1))
    ref = xs.double()[:, None] * (acc * sc.double()).sum(-1)
    scale = xs.double()[:, None] * (acc.abs() * sc.double()).sum(-1)  # sum of |terms|
    for out in outs:
        assert ((out.double() - ref).abs() <= 1e-5 * scale + 1e-30).all()
    assert _C.int4_dynamic_mm(AMX, ptr(xq), ptr(xs), M, K, ptr(wp), N, ptr(sc), ptr(zp), G, 0,
                              ptr(outs[0]), ptr(buf), base - 1, n_threads) == ERR_ARG


@needs_amx
def test_amx_falls_back_without_scratch():
    """Too little scratch (or none) selects the VNNI path: same exact result, no error."""
    M, N, K = 40, 64, 256
    g = gen(5)
    xq, w = rand_i8((M, K), g), rand_i8((N, K), g)
    work, nb = int8_work(AMX, M, K, N)
    amx = -(-M // 16) * 16 * K
    assert nb == max(amx, w8a8_panel_bytes(M, K, 2))
    ref = (xq.long() @ w.long().T).int()
    # none, or less than either path needs: the GEMV-shaped kernel
    for p, n in [(0, 0), (ptr(work), min(amx, w8a8_panel_bytes(M, K, 2)) - 1)]:
        acc = torch.empty((M, N), dtype=torch.int32)
        assert _C.int8_gemm_s32(AMX, ptr(xq), M, K, ptr(w), N, ptr(acc), 2, p, n) == OK
        assert torch.equal(acc, ref)
    # N % 32 != 0: no tiles, the panels only
    assert _C.int8_workspace_bytes(AMX, M, K, N + 1, 2) == w8a8_panel_bytes(M, K, 2)
    assert _C.int8_workspace_bytes(_C.ISA_PORTABLE, M, K, N, 2) == 0


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_int4_dynamic_bad_arguments(isa):
    M, N, K, G = 3, 4, 64, 32
    xq = torch.zeros(M, K, dtype=torch.int8)
    xs, wp = torch.ones(M), torch.zeros(N, K // 2, dtype=torch.uint8)
    sc, zp = torch.ones(N, K // G), torch.zeros(N, K // G, dtype=torch.uint8)
    out = torch.empty(M, N)
    nb = _C.int4_dynamic_workspace_bytes(isa, M, K, G, 1)
    work = torch.empty(nb + 8, dtype=torch.uint8)

    def call(G=G, work_p=ptr(work), nbytes=nb, K=K):
        return _C.int4_dynamic_mm(isa, ptr(xq), ptr(xs), M, K, ptr(wp), N, ptr(sc), ptr(zp), G, 0,
                                  ptr(out), work_p, nbytes, 1)

    assert call() == OK
    assert call(G=16) == ERR_ARG  # not a multiple of 32
    assert call(G=0) == ERR_ARG
    assert call(K=48) == ERR_ARG  # K % G
    assert call(nbytes=nb - 1) == ERR_ARG
    assert call(work_p=0) == ERR_ARG
    assert call(work_p=ptr(work) + 1) == ERR_ARG  # misaligned


@pytest.mark.parametrize("isa", ISAS, ids=ISA_IDS)
def test_int4_dynamic_groups_of_96_are_refused(isa):
    """The row kernels step 64 codes at a time through a group (or take a group of 32 whole):
    a group of 96 is refused with whole, correctly sized buffers, where 64 and 192 run."""
    M, N, K = 3, 4, 192

    def call(G):
        xq, xs = torch.zeros(M, K, dtype=torch.int8), torch.ones(M)
        wp = torch.zeros(N, K // 2, dtype=torch.uint8)
        sc, zp = torch.ones(N, K // G), torch.zeros(N, K // G, dtype=torch.uint8)
        out = torch.empty(M, N)
        nb = _C.int4_dynamic_workspace_bytes(isa, M, K, G, 1)
        work = torch.empty(nb, dtype=torch.uint8)
        return _C.int4_dynamic_mm(isa, ptr(xq), ptr(xs), M, K, ptr(wp), N, ptr(sc), ptr(zp), G, 0,
                                  ptr(out), ptr(work), nb, 1)

    assert call(64) == OK and call(192) == OK
    assert call(96) == ERR_ARG


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 1000, 4097])
@pytest.mark.parametrize("threads", [1, 2])
def test_stream_read_folds_every_word(n, threads):
    """The bandwidth probe reads every byte: its XOR fold equals Python's, for sizes that are
    no multiple of a cache line or of the thread split."""
    import functools
    import operator

    from pyquant import _native

    g = torch.Generator().manual_seed(n)
    t = torch.randint(-2**62, 2**62, (n,), dtype=torch.int64, generator=g)
    want = functools.reduce(operator.xor, [v & (2**64 - 1) for v in t.tolist()], 0)
    assert _native.stream_read(t, n_threads=threads) == want
    st, _ = _C.stream_read(0, 8, 1)  # null data with bytes to read
    assert st == ERR_ARG
    if n > 1:
        with pytest.raises(ValueError, match="contiguous CPU tensor"):
            _native.stream_read(t[::2])


def _w4a8_case(M, N, K, G, seed, extreme=False):
    g = gen(seed)
    if extreme:  # the largest group sums: codes 15, zero points 0, activations -128
        xq = torch.full((M, K), -128, dtype=torch.int8)
        codes = torch.full((N, K), 15, dtype=torch.uint8)
        zp = torch.zeros(N, K // G, dtype=torch.uint8)
    else:
        xq = rand_i8((M, K), g, -128, 127)
        codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
        zp = torch.randint(0, 16, (N, K // G), generator=g, dtype=torch.uint8)
    xs = torch.rand(M, generator=g) + 0.5
    wp = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    sc = torch.rand(N, K // G, generator=g) + 0.5
    acc = ((xq.double()[:, None, :] * (codes.double() - zp.double().repeat_interleave(G, 1)))
           .reshape(M, N, K // G, G).sum(-1))
    ref = xs.double()[:, None] * (acc * sc.double()).sum(-1)
    # fp32 sums of the two parts the kernels add, x . codes and zero x sum(x), in any order
    # (the GEMV-shaped kernel adds 16 lanes of partial sums at the end): |products| summed
    xc = (xq.double().abs()[:, None, :] * codes.double()).reshape(M, N, K // G, G).sum(-1)
    zterm = xq.double().reshape(M, 1, K // G, G).sum(-1) * zp.double()[None]
    scale = xs.double()[:, None] * ((xc.abs() + zterm.abs()) * sc.double()).sum(-1)
    return (xq, xs, wp, sc, zp), ref, scale


@pytest.mark.parametrize("isa", [_C.ISA_AVX512_VNNI, _C.ISA_AVX512_BF16])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("M,N,K,G,extreme", [(23, 45, 192, 64, False), (8, 32, 128, 32, False),
                                             (61, 70, 320, 320, False), (17, 33, 256, 128, True)])
def test_w4a8_panel(isa, n_threads, M, N, K, G, extreme):
    """W4A8 from M = 8 on the AVX512 ISAs without AMX tiles (csrc/cpu/tile_vnni_panel.h):
    32-row weight panels in VNNI order, x rows in tiles of up to 6. Its workspace adds the
    panels (one a thread) to the group sums; with the base part only, or misaligned, the
    GEMV-shaped kernel runs. N and M tails, one group a row (G = K), the int32 extremes."""
    if not _C.isa_available(isa):
        pytest.skip("ISA not available on this CPU/OS")
    (xq, xs, wp, sc, zp), ref, scale = _w4a8_case(M, N, K, G, seed=M + N, extreme=extreme)
    ng = K // G
    base = M * ng * 4 + M * K
    panel = -(-M * ng * 4 // 64) * 64 + n_threads * (32 * K + 2 * (-(-128 * ng // 64) * 64))
    nb = _C.int4_dynamic_workspace_bytes(isa, M, K, G, n_threads)
    assert nb == max(base, panel)
    assert _C.int4_dynamic_workspace_bytes(isa, 7, K, G, n_threads) == 7 * ng * 4 + 7 * K
    assert _C.int4_dynamic_workspace_bytes(isa, M, K + 32, 32, n_threads) == \
        M * (K + 32) // 32 * 4 + M * (K + 32)  # K % 64 != 0: no panel
    buf = torch.zeros(nb + 64, dtype=torch.uint8)
    for p, n in [(ptr(buf), nb), (ptr(buf), base), (ptr(buf) + 4, nb)]:
        out = torch.full((M, N), float("nan"))
        assert _C.int4_dynamic_mm(isa, ptr(xq), ptr(xs), M, K, ptr(wp), N, ptr(sc), ptr(zp), G,
                                  0, ptr(out), p, n, n_threads) == OK
        assert ((out.double() - ref).abs() <= 1e-5 * scale + 1e-30).all(), (p - ptr(buf), n)


@pytest.mark.parametrize("isa", [_C.ISA_AVX512_VNNI, _C.ISA_AVX512_BF16])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("M,N,K", [(16, 32, 64), (23, 45, 192), (61, 70, 320), (17, 33, 4160)])
def test_w8a8_panel(isa, n_threads, M, N, K):
    """W8A8 from M = 16 on the AVX512 ISAs without AMX tiles (csrc/cpu/tile_vnni_panel.h): s8
    weights as u8 (w + 128) in 32-row panels, x rows in tiles of up to 6, then - 128 sum x.
    The int32 sums are exact for every int8 input (-128 included) and int8_dynamic_mm's
    epilogue is bit-identical to the GEMV-shaped kernel's, which runs without the panel
    scratch (none, short or misaligned). N and M tails; K = 4160, 65 blocks of 64."""
    if not _C.isa_available(isa):
        pytest.skip("ISA not available on this CPU/OS")
    g = gen(M * 3 + N + K)
    xq, w = rand_i8((M, K), g, lo=-128), rand_i8((N, K), g, lo=-128)
    xs = torch.rand(M, generator=g) * 0.1 + 1e-3
    ws = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g)
    work, nb = int8_work(isa, M, K, N, n_threads)
    assert nb == w8a8_panel_bytes(M, K, n_threads)
    assert _C.int8_workspace_bytes(isa, 15, K, N, n_threads) == 0  # below M = 16
    assert _C.int8_workspace_bytes(isa, M, K + 32, N, n_threads) == 0  # K % 64 != 0
    want = (xq.long() @ w.long().T).int()
    ref = want.float() * (xs[:, None] * ws[None, :]) + bias
    buf = torch.zeros(nb + 64, dtype=torch.uint8)
    for p, n in [(ptr(buf), nb), (0, 0), (ptr(buf), nb - 1), (ptr(buf) + 4, nb)]:
        acc = torch.full((M, N), 7, dtype=torch.int32)
        assert _C.int8_gemm_s32(isa, ptr(xq), M, K, ptr(w), N, ptr(acc), n_threads, p, n) == OK
        assert torch.equal(acc, want), (p, n)
        out = torch.full((M, N), float("nan"))
        assert _C.int8_dynamic_mm(isa, ptr(xq), ptr(xs), M, K, ptr(w), N, ptr(ws), ptr(bias),
                                  ptr(out), n_threads, p, n) == OK
        assert torch.equal(out, ref), (p, n)


@pytest.mark.parametrize("isa", [_C.ISA_AVX512_VNNI, _C.ISA_AVX512_BF16])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("M,N,K,G", [(5, 32, 64, 32), (17, 45, 192, 64), (130, 61, 384, 128)])
def test_int4_weight_only_fixed_point_panels(isa, n_threads, M, N, K, G):
    """int4 weight-only from M = 5 without AMX, given its workspace: each x row in 24-bit
    fixed point, the three term rows of T x rows in one W4A8 panel tile, summed in registers
    (csrc/cpu/tile_vnni_panel.h). Here x = X * 2^-20 with integer X up to 8323072 (one entry
    each row), so the terms hold X exactly and every error left is fp32 summation: a term
    dropped or taken from the wrong row, even the lowest (2^-16 of X), is past the bound. N and M tails,
    slices (M = 130: 128 + 2 rows, the last on the GEMV-shaped kernel), zero points 0 and 15."""
    if not _C.isa_available(isa):
        pytest.skip("ISA not available on this CPU/OS")
    g = gen(M + N + K + G)
    X = torch.randint(-8323072, 8323073, (M, K), generator=g, dtype=torch.int64)
    X[:, 0] = 8323072
    x = (X.double() * 2.0 ** -20).float()
    assert torch.equal(x.double() * 2.0 ** 20, X.double())
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    wp = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    sc = torch.rand(N, K // G, generator=g) + 0.5
    zp = torch.randint(0, 16, (N, K // G), generator=g, dtype=torch.uint8)
    zp[0], zp[-1] = 0, 15
    bias = torch.randn(N, generator=g)
    assert _C.int4_weight_only_fixed_point(isa, M, K, G)
    nb = _C.int4_weight_only_workspace_bytes(isa, M, K, N, G, n_threads)
    buf = torch.zeros(nb + 64, dtype=torch.uint8)
    out = torch.full((M, N), float("nan"))
    assert _C.int4_weight_only_mm(isa, ptr(x), M, K, K, ptr(wp), N, ptr(sc), ptr(zp), G,
                                  ptr(bias), ptr(out), n_threads, (ptr(buf) + 63) // 64 * 64, nb) == OK
    wf = (codes.double() - zp.double().repeat_interleave(G, 1)) * sc.double().repeat_interleave(G, 1)
    want = x.double() @ wf.T + bias.double()
    bound = 1e-6 * (x.double().abs() @ wf.abs().T) + 1e-6 * bias.double().abs()
    assert ((out.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("M,N,K,G", [(16, 32, 64, 32), (23, 45, 192, 64), (61, 70, 320, 320),
                                     (17, 33, 4096, 128)])
def test_int4_weight_only_bf16_panel(n_threads, M, N, K, G):
    """int4 weight-only on the AVX512-BF16 level from M = 16 with activations that are bf16
    values (csrc/cpu/tile_bf16_panel.h): weights as bf16 code - zero in 32-row panels, one
    vdpbf16ps a pair of k; the products are exact and summed in fp32 (subnormals flushed).
    Its workspace covers the x rows as bf16 and a panel a thread; fp32 activations that are
    not bf16 values, or no workspace, take the other paths: the same values within fp32
    summation. Zero points 0 and 15, N and M tails, one group a row (G = K)."""
    isa = _C.ISA_AVX512_BF16
    if not _C.isa_available(isa):
        pytest.skip("ISA not available on this CPU/OS")
    g = gen(M + N + K)
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    wp = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    sc = torch.rand(N, K // G, generator=g) + 0.5
    zp = torch.randint(0, 16, (N, K // G), generator=g, dtype=torch.uint8)
    zp[0], zp[-1] = 0, 15
    x = (torch.randn(M, K, generator=g) * 3).bfloat16().float()
    bias = torch.randn(N, generator=g)
    nb = _C.int4_weight_only_workspace_bytes(isa, M, K, N, G, n_threads)
    panel = M * K * 2 + n_threads * (64 * K + -(-128 * (K // G) // 64) * 64)
    assert nb >= panel
    # M < 16, and K % 64 != 0 keeps the fixed-point panels out too
    assert _C.int4_weight_only_workspace_bytes(isa, 15, 96, N, 32, n_threads) == 0
    wf = (codes.double() - zp.double().repeat_interleave(G, 1)) * sc.double().repeat_interleave(G, 1)
    ref = x.double() @ wf.T + bias.double()
    bound = 1e-6 * (x.double().abs() @ wf.abs().T) + 1e-6 * bias.double().abs()
    buf = torch.zeros(nb + 64, dtype=torch.uint8)
    for xx, p, n in [(x, ptr(buf), nb), (x, 0, 0), (x + 1e-3, ptr(buf), nb)]:
        out = torch.full((M, N), float("nan"))
        assert _C.int4_weight_only_mm(isa, ptr(xx), M, K, K, ptr(wp), N, ptr(sc), ptr(zp), G,
                                      ptr(bias), ptr(out), n_threads, p, n) == OK
        want = ref if xx is x else (xx.double() @ wf.T + bias.double())
        tol = bound if xx is x else 1e-5 * (xx.double().abs() @ wf.abs().T) + 1e-5
        assert ((out.double() - want).abs() <= tol).all(), (p, n)


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("M,N,K", [(16, 32, 32), (23, 45, 192), (61, 70, 4128)])
def test_int8_weight_only_bf16_panel(n_threads, M, N, K):
    """int8 weight-only on the AVX512-BF16 level from M = 16 with activations that are bf16
    values: the weights as bf16 (exact: -128..127) in 32-row panels, vdpbf16ps, then
    * w_scale + bias. -128 and 127 included; fp32 activations that are not bf16 values, or
    no workspace, take the float path: the same values within fp32 summation."""
    isa = _C.ISA_AVX512_BF16
    if not _C.isa_available(isa):
        pytest.skip("ISA not available on this CPU/OS")
    g = gen(M * 5 + N + K)
    w = rand_i8((N, K), g, lo=-128)
    w[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
    ws = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g)
    x = (torch.randn(M, K, generator=g) * 3).bfloat16().float()
    nb = _C.int8_weight_only_workspace_bytes(isa, M, K, N, n_threads)
    # x as bf16, then a panel a thread: 32 rows of 2 K bytes and one group of 32 scales
    assert nb == -(-M * K * 2 // 64) * 64 + n_threads * (64 * K + 128)
    assert _C.int8_weight_only_workspace_bytes(isa, 11, K, N, n_threads) == 0  # M < 12 (and < 16)
    wf = w.double() * ws.double()[:, None]
    buf = torch.zeros(nb + 64, dtype=torch.uint8)
    for xx, p, n in [(x, ptr(buf), nb), (x, 0, 0), (x + 1e-3, ptr(buf), nb)]:
        out = torch.full((M, N), float("nan"))
        assert _C.int8_weight_only_mm(isa, ptr(xx), M, K, K, ptr(w), N, ptr(ws), ptr(bias),
                                      ptr(out), n_threads, p, n) == OK
        want = xx.double() @ wf.T + bias.double()
        tol = 1e-6 * (xx.double().abs() @ wf.abs().T) + 1e-6 * bias.double().abs()
        assert ((out.double() - want).abs() <= tol).all(), (p, n)


def test_probe_peak_counts_the_operations_it_times():
    """The instruction-peak probe: its ops/s times the wall time of the call is the work its
    loop does (12 chains of 512-bit VPDPBUSD, 64 multiply-adds each, on an AVX512-VNNI CPU),
    so a miscounted loop shows; bad arguments are rejected."""
    import time

    from pyquant import _native

    assert _C.probe_peak(7, 10, 1) == (ERR_ARG, 0.0)  # no such unit
    assert _C.probe_peak(_C.PEAK_INT8, 0, 1)[0] == ERR_ARG
    assert _C.probe_peak(_C.PEAK_INT8, 10, 0)[0] == ERR_ARG
    with pytest.raises(ValueError, match="unit 'int4' is not one of fp32, bf16, int8"):
        _native.probe_peak("int4")
    from helpers import cpu_flags

    if not {"avx512_vnni", "avx512bw"} <= cpu_flags():
        pytest.skip("the op count below is the AVX512-VNNI loop's")
    iters = 20_000_000
    t0 = time.perf_counter()
    rate = _native.probe_peak("int8", n_threads=1, iters=iters)
    wall = time.perf_counter() - t0
    inside = 2 * 12 * 64 * iters / rate  # seconds the probe says its loop took
    assert 0.8 * wall <= inside <= wall, (inside, wall)
