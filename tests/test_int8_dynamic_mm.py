"""torch.ops.pyquant.int8_dynamic_mm (W8A8) on every CPU backend and ISA against
pyquant.reference.int8_dynamic_mm, and its two integer stages bit-exactly on every ISA:
per-row activation quantization (== formats.quantize_rows_int8) and int32 accumulation
(== int64 matmul)."""
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
    gen,
    isa_params,
    make_bias,
    native_calls,
    num_threads,
    random_int8_weight,
    reference_op,
    run_op,
)
from pyquant import _native, formats

OP = "int8_dynamic_mm"
BACKENDS = backend_isa_params()
ISAS = isa_params()


# --------------------------------------------- the op vs the reference (rest: test_int8_ops.py)


@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_special_rows(backend, isa):
    """All-zero rows (scale 1, output = bias), a row of +-max codes, tiny and huge rows."""
    n, k = 13, 100
    x = activation((6, k))
    x[0] = 0
    x[1] = torch.where(torch.arange(k) % 2 == 0, 3.0, -3.0)
    x[2] *= 1e-30
    x[3] *= 1e30
    b = make_bias(n, "x", torch.float32)
    out = check_op(OP, backend, isa, x, random_int8_weight(n, k), b)
    assert torch.equal(out[0], b)


@pytest.mark.parametrize("op", ["int8_dynamic_mm", "int4_dynamic_mm"])
@pytest.mark.parametrize("m", [1, 6, 40])
@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_non_finite_rows_give_nan_rows(backend, isa, m, op):
    """A row of x holding a NaN or an Inf quantizes to scale NaN: every output of that row is
    NaN (float arithmetic would give NaN or Inf there, never the finite numbers a dropped NaN
    made before), on every backend, ISA and path (M = 40: AMX tiles); the other rows match
    the reference."""
    n, k = 64, 128
    x = activation((m, k))
    bad = [0, m - 1] if m > 1 else [0]
    x[0, 3] = float("nan")
    if m > 1:
        x[m - 1, k - 1] = float("inf")
    if op == "int8_dynamic_mm":
        wargs = random_int8_weight(n, k)  # (w, w_scale)
    else:
        c, sc, zp = formats.quantize_int4_groupwise(torch.randn(n, k, generator=gen(2)), 64)
        wargs = (formats.pack_int4(c), sc, zp, 64)
    out = run_op(op, backend, isa, x, wargs, None)
    want = reference_op(op, x, wargs, None)
    for r in range(m):
        if r in bad:
            assert out[r].isnan().all(), f"row {r}: {out[r][:4]}"
        else:
            assert torch.isfinite(out[r]).all()
            torch.testing.assert_close(out[r], want[r], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------ integer stages, bit-exact per ISA


def _exact_gemm(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (xq.to(torch.int64) @ w.to(torch.int64).T).to(torch.int32)


@pytest.mark.parametrize("backend,isa", ISAS)
@pytest.mark.parametrize(
    "m,n,k",
    [(1, 1, 1), (3, 13, 100), (17, 33, 257), (64, 64, 128), (5, 7, 4099), (0, 5, 8),
     (3, 0, 8), (3, 5, 0), (33, 17, 64)],
)
def test_int8_gemm_s32_exact(backend, isa, m, n, k):
    g = gen(m * 1000 + n * 10 + k)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    with _native.use_isa(isa):
        acc = _native.int8_gemm_s32(xq, w)
    assert acc.dtype == torch.int32
    assert torch.equal(acc, _exact_gemm(xq, w))


@pytest.mark.parametrize("backend,isa", ISAS)
@pytest.mark.parametrize("m,n,k", [(130, 96, 384), (300, 64, 192)])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_gemm_s32_exact_short_k(backend, isa, m, n, k, threads):
    """AMX with short K takes tasks of 32 activation rows x all N (tile_amx.h) while each of
    the threads gets two such tasks (here at 1 and 2 threads); odd tile counts, partial tile."""
    g = gen(m + n + k)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    with _native.use_isa(isa), num_threads(threads):
        acc = _native.int8_gemm_s32(xq, w)
    assert torch.equal(acc, _exact_gemm(xq, w))


@pytest.mark.parametrize("backend,isa", ISAS)
@pytest.mark.parametrize("pattern", ["max_pos", "max_neg", "alternating", "x_neg_w_pos",
                                     "w_min", "x_min", "both_min"])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_gemm_s32_extremes(backend, isa, pattern, threads):
    """|code| = 127 or 128 everywhere: the largest sums (128*128*4099 ~ 6.7e7) and the pairs
    that saturate int16 in u8 x s8 multiply-add units (AVX2 vpmaddubsw) if a kernel is
    careless."""
    m, n, k = 9, 19, 4099
    ones_x = torch.ones(m, k, dtype=torch.int8)
    ones_w = torch.ones(n, k, dtype=torch.int8)
    sign = torch.where(torch.arange(k) % 2 == 0, 1, -1).to(torch.int8)
    xq, w = {
        "max_pos": (127 * ones_x, 127 * ones_w),
        "max_neg": (-127 * ones_x, -127 * ones_w),
        "alternating": (127 * sign.expand(m, k).contiguous(), -127 * sign.expand(n, k).contiguous()),
        "x_neg_w_pos": (-127 * ones_x, 127 * ones_w),
        # -128, which int8 checkpoints of other tools hold: negated in int8 it stays -128 (the
        # AVX2 kernel once flipped the sign of such products)
        "w_min": (-127 * ones_x, -128 * ones_w),
        "x_min": (-128 * ones_x, -127 * ones_w),
        "both_min": (-128 * ones_x, -128 * ones_w),
    }[pattern]
    with _native.use_isa(isa), num_threads(threads):
        acc = _native.int8_gemm_s32(xq, w)
    assert torch.equal(acc, _exact_gemm(xq, w))


def _quant_rows_cases():
    g = gen(7)
    cases = {}
    cases["gaussian_17x257"] = torch.randn(17, 257, generator=g)
    z = torch.randn(5, 33, generator=g)
    z[1] = 0
    z[3] = 0
    cases["zero_rows"] = z
    cases["all_zero"] = torch.zeros(4, 16)
    cases["large"] = torch.randn(4, 40, generator=g) * torch.tensor([[1e30], [3e37], [1e38], [1.0]])
    cases["max_float"] = torch.tensor([[3.0e38, -3.0e38, 1.0e38, 0.0, 1.5e38] * 3])
    cases["tiny"] = torch.randn(3, 20, generator=g) * 1e-30
    # Exact ties: amax = 127 * 2^e makes s = 2^e exact, so x = (j + 0.5) * s lands exactly on
    # .5: round half to even must give 0, 2, 2, 4, ... (not away from zero).
    ties = []
    for e in (0, -3, 4):
        s = 2.0 ** e
        j = torch.arange(-126, 126, dtype=torch.float32)
        ties.append(torch.cat((torch.tensor([127 * s]), (j + 0.5) * s)))
    cases["ties_half_even"] = torch.stack(ties)
    # Near ties with an inexact scale: x = fl((j + 0.5) * s) sits within an ulp of .5, where
    # x * (1/s) and x / s round differently; the format says true division.
    rows = []
    for amax in torch.rand(8, generator=g) * 10 + 0.1:
        s = amax / 127
        j = torch.arange(0, 126, dtype=torch.float32)
        near = (j + 0.5) * s
        rows.append(torch.cat((amax[None], near, -near, torch.nextafter(near, near * 2))))
    cases["near_ties"] = torch.stack(rows)
    # K not a multiple of any vector width, and K = 1
    for k in (1, 7, 15, 31, 65):
        cases[f"k{k}"] = torch.randn(3, k, generator=g)
    cases["m0"] = torch.zeros(0, 9)
    # rows holding a NaN or an Inf (first lane, tail lane, alone): scale NaN and codes 0
    nf = torch.randn(6, 37, generator=g)
    nf[0, 0], nf[1, 36], nf[2, 5], nf[3, 20] = float("nan"), float("nan"), float("inf"), -float("inf")
    nf[4, 16] = float("nan")
    cases["non_finite"] = nf
    return cases


QUANT_ROWS_CASES = _quant_rows_cases()


@pytest.mark.parametrize("backend,isa", ISAS)
@pytest.mark.parametrize("case", sorted(QUANT_ROWS_CASES))
def test_quantize_rows_int8_exact(backend, isa, case):
    x = QUANT_ROWS_CASES[case]
    want_q, want_s = formats.quantize_rows_int8(x)
    with _native.use_isa(isa):
        q, s = _native.quantize_rows_int8(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(s.isnan(), want_s.isnan()), "NaN scales differ"
    assert torch.equal(s.nan_to_num(), want_s.nan_to_num()), f"scales differ: {(s - want_s).abs().max()}"
    diff = (q.to(torch.int32) - want_q.to(torch.int32)).abs()
    assert torch.equal(q, want_q), (
        f"{int((diff > 0).sum())} codes differ, e.g. at {tuple((diff > 0).nonzero()[0].tolist())}"
        if diff.numel() and diff.any() else "")
    if x.numel():
        assert int(q.min()) >= -127


@pytest.mark.parametrize("backend,isa", ISAS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_quantize_rows_int8_layouts(backend, isa, layout, dtype):
    x = activation((17, 100), dtype, layout=layout)
    want_q, want_s = formats.quantize_rows_int8(x)
    with _native.use_isa(isa):
        q, s = _native.quantize_rows_int8(x)
    assert torch.equal(s, want_s)
    assert torch.equal(q, want_q)


@pytest.mark.parametrize("backend,isa", ISAS)
def test_quantize_rows_int8_subnormal(backend, isa):
    """amax subnormal: amax / 127 underflows to 0 for the smallest ones, and the format then
    uses scale 1 (formats.quantize_rows_int8 tests s == 0, the C header says amax == 0)."""
    tiny = torch.finfo(torch.float32).smallest_normal
    x = torch.tensor([[tiny * 0.5, -tiny * 0.25, 0.0], [1e-45, 0.0, -1e-45], [1e-43, 5e-44, 0.0]])
    want_q, want_s = formats.quantize_rows_int8(x)
    with _native.use_isa(isa):
        q, s = _native.quantize_rows_int8(x)
    assert torch.equal(s, want_s), f"{s.tolist()} != {want_s.tolist()}"
    assert torch.equal(q, want_q), f"{q.tolist()} != {want_q.tolist()}"


@pytest.mark.parametrize("backend,isa", ISAS)
def test_quantize_rows_int8_near_ties_stress(backend, isa):
    """x / s within a few ulps of a half-integer, over many inexact scales and both signs,
    where x * (1 / s) rounds differently from the true division: the codes must still be
    torch.round(x / s) bit for bit (a multiply by 1/s fails this test). The scales span
    2^-110 .. 2^100: the kernels divide by a reciprocal and correct the quotient (Markstein)
    where s >= 2^-100, and divide below it, so both sides of that bound are here."""
    g = gen(11)
    rows = []
    spread = torch.cat([torch.linspace(-110, 100, 40), torch.full((8,), -100.0)])
    wide = 127 * torch.exp2(spread) * (1 + (torch.rand(48, generator=g) - 0.5) * 1e-3)
    for amax in torch.cat([torch.rand(64, generator=g) * 100 + 1e-3, wide]):
        s = amax / 127
        j = torch.arange(-127, 127, dtype=torch.float32)
        near = (j + 0.5) * s
        up, down = near.clone(), near.clone()
        cols = [amax[None], near]
        for _ in range(3):  # one to three ulps either side
            up, down = torch.nextafter(up, up + s), torch.nextafter(down, down - s)
            cols += [up, down]
        rows.append(torch.cat(cols).clamp(-amax, amax))
    x = torch.stack(rows)
    x = x[:, torch.randperm(x.shape[1], generator=g)]
    want_q, want_s = formats.quantize_rows_int8(x)
    with _native.use_isa(isa):
        q, s = _native.quantize_rows_int8(x)
    assert torch.equal(s, want_s)
    assert torch.equal(q, want_q), f"{int((q != want_q).sum())} codes differ"


# bf16 rows are quantized from bf16 (pq_quantize_rows_int8_bf16), not from a float32 copy:
# the results must be those of the float32 path, rounded to bf16
@pytest.mark.parametrize("backend,isa", ISAS)
@pytest.mark.parametrize("op", ["int8_dynamic_mm", "int4_dynamic_mm"])
@pytest.mark.parametrize("m,layout", [(1, "contiguous"), (3, "strided"), (17, "3d"),
                                      (130, "contiguous"), (64, "strided")])
def test_bf16_rows_are_the_fp32_path(backend, isa, op, m, layout):
    n, k = 40, 192
    g = gen(m * 13 + len(layout))
    w = torch.randn(n, k, generator=g) * 0.05
    if op == "int8_dynamic_mm":
        wargs = formats.quantize_int8_per_channel(w)
    else:
        c, s, z = formats.quantize_int4_groupwise(w, 64, symmetric=False)
        wargs = (formats.pack_int4(c), s, z, 64)
    x = torch.randn(m, k + 5, generator=g).to(torch.bfloat16)
    x[m // 2, 3] = float("nan") if m > 1 else x[0, 3]
    if layout == "strided":
        x = x[:, :k]  # row stride k + 5
    elif layout == "3d":
        x = x[:, :k].contiguous().view(1, m, k)
    else:
        x = x[:, :k].contiguous()
    bias = make_bias(n, "fp32", torch.bfloat16, seed=m)
    with num_threads(2):
        with native_calls() as calls:
            got = run_op(op, backend, isa, x, wargs, bias)
        want = run_op(op, backend, isa, x.float(), wargs, bias).to(torch.bfloat16)
    assert "quantize_rows_int8_bf16" in calls, calls
    assert got.dtype == torch.bfloat16 and got.shape == x.shape[:-1] + (n,)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def _amx_params():
    return [p for p in ISAS if p.values[1] == "avx512_amx"] or [
        pytest.param("cpu", "avx512_amx", marks=pytest.mark.skip(reason="no AMX on this CPU"))]


# bf16 x on the AMX tiles writes bf16 outputs itself (pq_int8_dynamic_mm_bf16): each the float
# path's result rounded as torch rounds it. M = 9 is the first on the tiles; M = 200 at K = 8192
# keeps int32 sums between two K chunks in its scratch (kernels.h); N % 32 == 0 throughout.
@pytest.mark.parametrize("backend,isa", _amx_params())
@pytest.mark.parametrize("m,k,n,layout", [(9, 128, 32, "contiguous"), (8, 128, 32, "contiguous"),
                                          (17, 192, 64, "3d"), (130, 256, 96, "strided"),
                                          (200, 8192, 96, "contiguous")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_outputs_on_amx_are_the_fp32_path_rounded(backend, isa, m, k, n, layout, with_bias):
    g = gen(m + k + n)
    q, s = formats.quantize_int8_per_channel(torch.randn(n, k, generator=g) * 0.05)
    s[: n // 4] *= 1e-37  # outputs in the subnormal range, which bf16 keeps
    x = torch.randn(m, k + 3, generator=g).to(torch.bfloat16)
    x[m // 2, 1] = float("nan")
    x = {"contiguous": lambda: x[:, :k].contiguous(), "strided": lambda: x[:, :k],
         "3d": lambda: x[:, :k].contiguous().view(1, m, k)}[layout]()
    bias = make_bias(n, "fp32", torch.bfloat16, seed=m) if with_bias else None
    with num_threads(2):
        with native_calls() as calls:
            got = run_op(OP, backend, isa, x, (q, s), bias)
        f32 = run_op(OP, backend, isa, x.float(), (q, s), bias)
    assert ("int8_dynamic_mm_bf16" in calls) == (m >= 9), calls
    # NaN rows: NaN (torch's own conversion, which M = 8 takes, may keep other NaN bits)
    assert assert_bf16_of_fp32(got, f32, x.shape[:-1] + (n,)).any()
    assert (got.view(torch.int16) != 0).sum() > got.numel() // 2
    if bias is None:
        assert (f32[..., : n // 4].abs() < torch.finfo(torch.float32).tiny).any()  # subnormal


def test_bf16_output_call_refusals():
    """The native bf16-output call: -1 from the query (and PQ_ERR_ISA) off AMX or at sizes the
    tiles do not take; PQ_ERR_ARG for a workspace short by a byte or not 64-byte aligned."""
    mod = _native.module()
    amx = amx_only_query(lambda isa, m, *s: mod.int8_dynamic_mm_bf16_workspace_bytes(isa, m, *s, 2),
                         9, 128, 32)
    for bad in ((8, 128, 32), (64, 100, 32), (64, 128, 40)):
        assert mod.int8_dynamic_mm_bf16_workspace_bytes(amx, *bad, 2) == -1
    m, k, n = 200, 8192, 32
    need = mod.int8_dynamic_mm_bf16_workspace_bytes(amx, m, k, n, 2)
    assert need == 208 * k + m * n * 4  # the packed activations, then the chunks' int32 sums
    assert mod.int8_dynamic_mm_bf16_workspace_bytes(amx, 64, 4096, n, 2) == 64 * 4096
    xq = torch.zeros(m, k, dtype=torch.int8)
    xs, w, ws = torch.ones(m), torch.zeros(n, k, dtype=torch.int8), torch.ones(n)
    out = torch.zeros(m, n, dtype=torch.bfloat16)
    work, base = aligned_work(need + 64)
    args = (amx, xq.data_ptr(), xs.data_ptr(), m, k, w.data_ptr(), n, ws.data_ptr(), 0,
            out.data_ptr(), 2)
    assert mod.int8_dynamic_mm_bf16(*args, base, need - 1) == 1
    assert mod.int8_dynamic_mm_bf16(*args, base + 32, need) == 1
    assert mod.int8_dynamic_mm_bf16(*args, base, need) == 0
    assert mod.int8_dynamic_mm_bf16(0, *args[1:], base, need) == 2  # portable: ERR_ISA


@pytest.mark.parametrize("backend,isa", _amx_params())
def test_bf16_outputs_on_amx_round_ties_to_even(backend, isa):
    """Outputs 257 and 259 lie halfway between bf16 neighbours: 256 and 260 (to even), as
    torch rounds; 258 stays. x rows of amax 127 have scale 1, so the outputs are exact sums."""
    m, k, n = 9, 128, 32
    x = torch.zeros(m, k)
    x[:, :2] = 127.0
    x[:, 2] = torch.tensor([3.0, 5.0, 4.0] * 3)
    w = torch.zeros(n, k, dtype=torch.int8)
    w[:, :3] = 1
    got = run_op(OP, backend, isa, x.to(torch.bfloat16), (w, torch.ones(n)), None)
    assert got[:3, 0].tolist() == [256.0, 260.0, 258.0]
    assert torch.equal(got, x.sum(1, keepdim=True).expand(m, n).to(torch.bfloat16))


def test_bf16_calls_stay_inside_their_workspace():
    """The bf16 quantizer and the bf16-output GEMM (with its K chunks' int32 sums) given
    exactly the bytes their queries ask for, followed by guard bytes: the guard stays as it
    was, and the results are right."""
    mod = _native.module()
    isa = _native.current_isa()
    m, k, n, nt = 200, 8192, 96, 2
    g = gen(5)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    xq, xs = torch.empty(m, k, dtype=torch.int8), torch.empty(m)

    def guarded(need):
        buf = torch.full((need + 64 + 4096,), 0xAB, dtype=torch.uint8)
        off = -buf.data_ptr() % 64
        return buf, off

    need = mod.quantize_rows_int8_bf16_workspace_bytes(m, k, nt)
    buf, off = guarded(need)
    assert mod.quantize_rows_int8_bf16(isa, x.data_ptr(), m, k, k, xq.data_ptr(), xs.data_ptr(),
                                       nt, buf.data_ptr() + off, need) == 0
    assert (buf[off + need:] == 0xAB).all()
    q_ref, s_ref = formats.quantize_rows_int8(x.float())
    assert torch.equal(xq, q_ref) and torch.equal(xs, s_ref)
    need = mod.int8_dynamic_mm_bf16_workspace_bytes(isa, m, k, n, nt)
    if need < 0:
        pytest.skip("no bf16-output GEMM on this ISA")
    w, ws = random_int8_weight(n, k)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    buf, off = guarded(need)
    assert mod.int8_dynamic_mm_bf16(isa, xq.data_ptr(), xs.data_ptr(), m, k, w.data_ptr(), n,
                                    ws.data_ptr(), 0, out.data_ptr(), nt, buf.data_ptr() + off,
                                    need) == 0
    assert (buf[off + need:] == 0xAB).all()
    want = (xs[:, None] * ws[None, :] * (xq.double() @ w.double().T)).float()
    torch.testing.assert_close(out.float(), want.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-3)
