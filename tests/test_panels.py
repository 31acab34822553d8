"""The CPU panel layout of int8 weights (pyquant/panels.py) and the op that multiplies it,
torch.ops.pyquant.int8_dynamic_mm_panels: the layout's formula, exact round trips, the op
bit for bit against int8_dynamic_mm on the canonical rows on every backend and ISA, and the
W8A8 layer that keeps its weight in panels without letting the layout out of the layer."""
from __future__ import annotations

import copy

import pytest
import torch

import pyquant
from torch import nn
from helpers import (
    ACT_DTYPES,
    activation,
    aligned_work,
    amx_only_query,
    assert_bf16_of_fp32,
    backend_isa_params,
    make_bias,
    native_calls,
    num_threads,
    on_backend,
    random_int8_weight,
    run_op,
)
from pyquant import _native, panels, reference
from pyquant.nn import Int8DynamicLinear

BACKENDS = backend_isa_params()
PANELS_HERE = _native.available() and panels.panel_layout_applies(32, 64, "cpu")
needs_panels = pytest.mark.skipif(
    not PANELS_HERE, reason="this CPU's kernels keep int8 weights in rows (no AVX512 panels)")


def test_layout_formula():
    """panels[p, j, h, i, c] = w[32p + 16h + i, 4j + c] + 128, entry by entry."""
    n, k = 64, 128
    w, _ = random_int8_weight(n, k)
    got = panels.pack_int8(w).reshape(-1)
    assert got.dtype == torch.uint8 and got.numel() == n * k
    expected = torch.empty(n * k, dtype=torch.int64)
    pos = 0
    for p in range(n // 32):
        for j in range(k // 4):
            for h in range(2):
                for i in range(16):
                    for c in range(4):
                        expected[pos] = int(w[32 * p + 16 * h + i, 4 * j + c]) + 128
                        pos += 1
    assert torch.equal(got.to(torch.int64), expected)


@pytest.mark.parametrize("n,k", [(32, 64), (96, 192), (64, 1024)])
def test_round_trip_exact(n, k):
    w, _ = random_int8_weight(n, k, seed=n + k)
    w[0, :2] = torch.tensor([-127, 127], dtype=torch.int8)
    p = panels.pack_int8(w)
    assert torch.equal(panels.unpack_int8(p), w)
    # whole panels are whole rows of the [N, K] view: slicing them slices the weight
    assert torch.equal(panels.unpack_int8(p[32:64]) if n > 32 else panels.unpack_int8(p),
                       w[32:64] if n > 32 else w)


@pytest.mark.parametrize("shape,dtype", [((40, 64), torch.int8), ((32, 96), torch.int8),
                                         ((32, 64), torch.uint8), ((0, 64), torch.int8)])
def test_pack_rejects_what_has_no_layout(shape, dtype):
    with pytest.raises(ValueError, match="N % 32 == 0 and K % 64 == 0"):
        panels.pack_int8(torch.zeros(shape, dtype=dtype))
    assert not panels.shape_ok(*shape) or dtype != torch.int8


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("m", [0, 1, 3, 5, 6, 7, 17, 40])
@pytest.mark.parametrize("n,k", [(32, 64), (96, 192)])
def test_op_equals_int8_dynamic_mm_on_rows(backend, isa, m, n, k):
    """Bit for bit the canonical op's result (exact int32 sums, the same epilogue), with and
    without bias, on 1 and 2 threads; ISAs without panel kernels run the unpacked rows."""
    w, s = random_int8_weight(n, k, seed=m)
    p = panels.pack_int8(w)
    x = activation((m, k), seed=m) * 2
    for bias in (None, make_bias(n, "fp32", torch.float32)):
        expected = reference.int8_dynamic_mm(x, w, s, bias)
        for t in (1, 2):
            with num_threads(t):
                got = run_op("int8_dynamic_mm_panels", backend, isa, x, (p, s), bias)
            assert torch.equal(got, expected), (m, n, k, t, bias is None)


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["col_slice", "transposed", "row_step", "3d"])
def test_op_layouts_and_dtypes(backend, isa, dtype, layout):
    n, k = 64, 128
    w, s = random_int8_weight(n, k)
    p = panels.pack_int8(w)
    x = (activation((2, 3, k), dtype) if layout == "3d" else activation((17, k), dtype,
                                                                         layout=layout))
    b = make_bias(n, "x", dtype)
    got = run_op("int8_dynamic_mm_panels", backend, isa, x, (p, s), b)
    expected = run_op("int8_dynamic_mm", backend, isa, x, (w, s), b)
    assert got.dtype == dtype and got.shape == (*x.shape[:-1], n)
    assert torch.equal(got, expected)


def test_op_misaligned_panels_still_right():
    """A panels tensor whose data does not start on a 64-byte boundary (a view into a larger
    buffer) is copied to an aligned one for the kernel's aligned loads."""
    n, k = 32, 64
    w, s = random_int8_weight(n, k)
    raw = torch.empty(n * k + 1, dtype=torch.uint8)
    p = raw[1:].view(n, k)
    p.copy_(panels.pack_int8(w))
    x = activation((3, k))
    assert torch.equal(pyquant.ops.int8_dynamic_mm_panels(x, p, s, None),
                       reference.int8_dynamic_mm(x, w, s, None))


@pytest.mark.parametrize("bad,match", [
    (lambda p, s: (p.view(torch.int8), s), "uint8"),
    (lambda p, s: (p[:, :32].contiguous(), s), "multiple of 64"),
    (lambda p, s: (torch.zeros(40, 64, dtype=torch.uint8), s), "multiple of 32"),
    (lambda p, s: (p, s[:16]), "w_scale"),
    (lambda p, s: (p[0], s), "2-D"),
])
def test_op_bad_input_is_a_clear_error(bad, match):
    w, s = random_int8_weight(32, 64)
    p = panels.pack_int8(w)
    args = bad(p, s)
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.pyquant.int8_dynamic_mm_panels(activation((2, 64)), *args, None)


def test_op_wrong_k_names_the_sizes():
    w, s = random_int8_weight(32, 64)
    with pytest.raises(ValueError, match="64"):
        torch.ops.pyquant.int8_dynamic_mm_panels(activation((2, 128)), panels.pack_int8(w), s,
                                                 None)


# ------------------------------------------------------------------------------- the layer


def _model(seed=0, n=96, k=128):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(k, n), torch.nn.GELU(), torch.nn.Linear(n, 40))


def _rows_twin(model):
    """The same quantized model with every int8 layer kept in canonical rows."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, pyquant.Int8WeightOnlyLinear):  # and Int8DynamicLinear
            m._to_rows()
    return twin


@needs_panels
def test_layer_keeps_panels_only_where_they_apply():
    model = _model()
    pyquant.quantize_(model, pyquant.Int8Dynamic())
    a, b = model[0], model[2]
    assert a.weight_layout == "panels" and a.weight.dtype == torch.uint8
    assert b.weight_layout == "rows" and b.weight.dtype == torch.int8  # N = 40: no whole panels
    w, s = pyquant.formats.quantize_int8_per_channel(_model()[0].weight)
    assert torch.equal(a.canonical("weight"), w) and torch.equal(a.weight_scale, s)
    x = activation((5, 128))
    assert torch.equal(model(x), _rows_twin(model)(x))


@needs_panels
def test_layer_state_dict_and_checkpoint_hold_rows(tmp_path):
    m = _model()
    pyquant.quantize_(m, pyquant.Int8Dynamic())
    sd = m.state_dict()
    assert sd["0.weight"].dtype == torch.int8
    assert torch.equal(sd["0.weight"], m[0].canonical("weight"))
    assert m[0].weight_layout == "panels"  # state_dict did not change the layer
    x = activation((4, 128))
    y = m(x)
    path = tmp_path / "m.safetensors"
    pyquant.save(m, path)
    loaded = pyquant.load(_model(seed=1), path)
    assert loaded[0].weight_layout == "panels"
    assert torch.equal(loaded(x), y)
    twin = _model(seed=2)
    pyquant.quantize_(twin, pyquant.Int8Dynamic())
    twin.load_state_dict(sd)
    assert twin[0].weight_layout == "panels" and torch.equal(twin(x), y)


@needs_panels
def test_layer_moves_and_copies():
    m = _model()
    pyquant.quantize_(m, pyquant.Int8Dynamic())
    x = activation((3, 128))
    y = m(x)
    assert torch.equal(copy.deepcopy(m)(x), y)
    m.to("meta")  # leaves the CPU: canonical rows go through the move
    assert m[0].weight_layout == "rows" and m[0].weight.dtype == torch.int8
    m2 = _model()
    pyquant.quantize_(m2, pyquant.Int8Dynamic())
    m2.bfloat16()  # integer buffers stay as they are; the layer stays in panels
    assert m2[0].weight_layout == "panels"
    xb = x.to(torch.bfloat16)
    assert torch.equal(m2(xb), _rows_twin(m2)(xb))


@needs_panels
@pytest.mark.parametrize("dim", [0, 1])
def test_layer_shard_equals_shard_of_rows(dim):
    m = _model(n=128)
    pyquant.quantize_(m, pyquant.Int8Dynamic())
    layer = m[0]
    w = layer.canonical("weight").clone()
    for rank in range(2):
        a = layer.shard(dim, rank, 2)
        assert torch.equal(a.canonical("weight"), w.narrow(dim, 64 * rank, 64))
        assert a.weight_layout == "panels"  # 64 x 128 or 128 x 64: whole panels
        x = activation((3, a.in_features))
        assert torch.equal(a(x), reference.int8_dynamic_mm(x, a.canonical("weight"), a.weight_scale,
                                                           a.bias))
    assert layer.weight_layout == "panels" and torch.equal(layer.canonical("weight"), w)


@needs_panels
def test_layer_compile_autograd_and_reference_backend():
    m = _model()
    pyquant.quantize_(m, pyquant.Int8Dynamic())
    x = activation((6, 128))
    y = m(x)
    assert torch.equal(torch.compile(m[0], fullgraph=True)(x), m[0](x))
    with on_backend("reference"):
        assert torch.equal(m(x), y)
    xg = x.clone().requires_grad_(True)
    m(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    _rows_twin(m)(xr).sum().backward()
    assert torch.equal(xg.grad, xr.grad)


@needs_panels
@pytest.mark.parametrize("config", [pyquant.Int8WeightOnly(), pyquant.Int4WeightOnly(
    group_size=128)], ids=["int8", "int4"])
def test_compiled_backward_through_a_panel_layer(config):
    """torch.compile traces the ops' autograd formula, which unpacks the panels with fake
    tensors: the PyTorch reshuffle then, not the native unpacker (no data to hand it)."""
    m = nn.Sequential(nn.Linear(256, 64))
    pyquant.quantize_(m, config)
    assert m[0].weight_layout == "panels"
    x = activation((3, 256)).requires_grad_(True)
    torch.compile(m, fullgraph=True, backend="aot_eager")(x).sum().backward()
    xe = x.detach().clone().requires_grad_(True)
    m(xe).sum().backward()
    assert torch.equal(x.grad, xe.grad)


@needs_panels
def test_layer_on_an_isa_without_panels():
    """A layer packed here and then run on the AVX2 or portable kernels (forced) unpacks for
    the call: the same result."""
    m = _model()
    pyquant.quantize_(m, pyquant.Int8Dynamic())
    x = activation((5, 128))
    y = m(x)
    for isa in ("avx2", "portable"):
        if _native.module().isa_available(_native.ISA_NAMES.index(isa)):
            with _native.use_isa(isa):
                assert torch.equal(m(x), y)


# ------------------------------------------------------------------------- int4 (W4A8) panels

needs_int4_panels = pytest.mark.skipif(
    not (_native.available() and panels.int4_panel_layout_applies(32, 64, 32, "cpu")),
    reason="this CPU's kernels keep int4 weights in rows (no AVX512 panels)")


def _int4_weight(n, k, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // g, generator=gen) / 8 + 1e-3
    zeros = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8)
    return pyquant.formats.pack_int4(codes), scales, zeros, codes


def test_int4_layout_formula():
    """codes[p, j, h, i, c] = code[n, 8j + c] | code[n, 8j + 4 + c] << 4 (n = 32p + 16h + i);
    scales and zeros [p, g, r] = row 32p + r's group g: entry by entry."""
    n, k, g = 64, 128, 32
    wp, sc, zp, codes = _int4_weight(n, k, g)
    pc, ps, pz = panels.pack_int4(wp, sc, zp, g)
    assert pc.shape == wp.shape and ps.shape == sc.shape and pz.shape == zp.shape
    b = pc.view(n // 32, k // 8, 2, 16, 4)
    for p in range(n // 32):
        for j in range(k // 8):
            for h in range(2):
                for i in range(16):
                    r = 32 * p + 16 * h + i
                    for c in range(4):
                        assert int(b[p, j, h, i, c]) == (int(codes[r, 8 * j + c])
                                                         | int(codes[r, 8 * j + 4 + c]) << 4)
    s3, z3 = ps.view(n // 32, k // g, 32), pz.view(n // 32, k // g, 32)
    for p in range(n // 32):
        for gi in range(k // g):
            assert torch.equal(s3[p, gi], sc[32 * p:32 * p + 32, gi])
            assert torch.equal(z3[p, gi], zp[32 * p:32 * p + 32, gi])


@pytest.mark.parametrize("n,k,g", [(32, 64, 32), (96, 256, 64), (64, 512, 256)])
def test_int4_round_trip_exact(n, k, g):
    wp, sc, zp, _ = _int4_weight(n, k, g, seed=k)
    back = panels.unpack_int4(*panels.pack_int4(wp, sc, zp, g), g)
    assert all(torch.equal(a, b) for a, b in zip(back, (wp, sc, zp)))


def test_int4_pack_rejects_what_has_no_layout():
    wp, sc, zp, _ = _int4_weight(40, 64, 32)
    with pytest.raises(ValueError, match="N % 32 == 0"):
        panels.pack_int4(wp, sc, zp, 32)
    wp, sc, zp, _ = _int4_weight(32, 64, 32)
    with pytest.raises(ValueError, match="G % 32 == 0"):
        panels.pack_int4(wp, torch.rand(32, 4), torch.zeros(32, 4, dtype=torch.uint8), 16)


def _int4_tol(got, expected):
    # the W4A8 tolerance of its op tests (fp32 sums over groups in another order)
    from helpers import assert_close_named
    assert_close_named(got, expected, "int4_dynamic_mm/float32")


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("m", [0, 1, 3, 7, 8, 17, 40])
@pytest.mark.parametrize("n,k,g", [(32, 64, 32), (96, 256, 64)])
def test_int4_op_against_the_reference(backend, isa, m, n, k, g):
    """Against the reference on the canonical tensors; from M = 8 (the per-call panel GEMM)
    also bit for bit int4_dynamic_mm's result on the same backend."""
    wp, sc, zp, _ = _int4_weight(n, k, g, seed=m)
    pw = panels.pack_int4(wp, sc, zp, g)
    x = activation((m, k), seed=m)
    for bias in (None, make_bias(n, "fp32", torch.float32)):
        expected = reference.int4_dynamic_mm(x, wp, sc, zp, g, bias)
        for t in (1, 2):
            with num_threads(t):
                got = run_op("int4_dynamic_mm_panels", backend, isa, x, (*pw, g), bias)
                rows = run_op("int4_dynamic_mm", backend, isa, x, (wp, sc, zp, g), bias)
            _int4_tol(got, expected)
            if m >= 8 or backend == "reference":
                assert torch.equal(got, rows), (m, t)


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["col_slice", "transposed", "3d"])
def test_int4_op_layouts_and_dtypes(backend, isa, dtype, layout):
    n, k, g = 64, 128, 64
    wp, sc, zp, _ = _int4_weight(n, k, g)
    pw = panels.pack_int4(wp, sc, zp, g)
    x = (activation((2, 3, k), dtype) if layout == "3d"
         else activation((9, k), dtype, layout=layout))
    b = make_bias(n, "x", dtype)
    got = run_op("int4_dynamic_mm_panels", backend, isa, x, (*pw, g), b)
    assert got.dtype == dtype and got.shape == (*x.shape[:-1], n)
    from helpers import assert_close_named
    assert_close_named(got, reference.int4_dynamic_mm(x, wp, sc, zp, g, b),
                       f"int4_dynamic_mm/{str(dtype).split('.')[-1]}")


def test_int4_op_bad_input_is_a_clear_error():
    wp, sc, zp, _ = _int4_weight(32, 128, 32)
    pw = panels.pack_int4(wp, sc, zp, 32)
    x = activation((2, 128))
    with pytest.raises(ValueError, match="multiple of 32"):
        torch.ops.pyquant.int4_dynamic_mm_panels(x, *pw[:1], torch.rand(32, 8),
                                                 torch.zeros(32, 8, dtype=torch.uint8), 16, None)
    w40 = _int4_weight(40, 128, 32)[:3]
    with pytest.raises(ValueError, match="whole panels"):
        torch.ops.pyquant.int4_dynamic_mm_panels(x, *w40, 32, None)
    with pytest.raises(ValueError, match="scales"):
        torch.ops.pyquant.int4_dynamic_mm_panels(x, pw[0], pw[1][:, :2], pw[2], 32, None)


@needs_int4_panels
def test_int4_layer_keeps_panels_and_gives_rows_back(tmp_path):
    m = _model(n=128)
    cfg = pyquant.Int4Dynamic(group_size=64)
    pyquant.quantize_(m, cfg)
    a, b = m[0], m[2]
    assert a.weight_layout == "panels" and b.weight_layout == "rows"  # N = 40
    ref = _model(n=128)
    c, s, z = pyquant.formats.quantize_int4_groupwise(ref[0].weight, 64, False)
    sd = m.state_dict()
    assert torch.equal(sd["0.weight_packed"], pyquant.formats.pack_int4(c))
    assert torch.equal(sd["0.weight_scales"], s) and torch.equal(sd["0.weight_zeros"], z)
    assert torch.equal(a.canonical("weight_scales"), s)
    x = activation((9, 128))
    y = m(x)
    assert torch.equal(y, _rows_twin_int4(m)(x))  # M >= 8: the same panel arithmetic
    path = tmp_path / "m4.safetensors"
    pyquant.save(m, path)
    loaded = pyquant.load(_model(seed=3, n=128), path)
    assert loaded[0].weight_layout == "panels" and torch.equal(loaded(x), y)
    with on_backend("reference"):  # the reference sums the groups in its own order
        _int4_tol(m(x), y)
    assert torch.equal(torch.compile(m[0], fullgraph=True)(x), m[0](x))
    for dim in (0, 1):
        whole = [a.canonical(n) for n in a._PANEL_BUFFERS]
        for rank in range(2):
            sh = a.shard(dim, rank, 2)
            for n, w in zip(a._PANEL_BUFFERS, whole):
                step = w.shape[dim] // 2
                assert torch.equal(sh.canonical(n), w.narrow(dim, rank * step, step)), (dim, n)
    m.to("meta")
    assert a.weight_layout == "rows"


def _rows_twin_int4(model):
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, pyquant.Int4WeightOnlyLinear):  # and Int4DynamicLinear
            m._to_rows()
    return twin


# ----------------------------------------------------------- int4 weight-only on the same panels


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("m", [0, 1, 2, 3, 5, 17, 40])
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_int4_weight_only_op_against_the_reference(backend, isa, m, dtype):
    """Every M (fixed point; bf16 activations from M = 16 on the AVX512-BF16 ISA: one bf16
    term), 1 and 2 threads, with and without bias, against the reference on the canonical
    tensors with the op's own tolerance."""
    n, k, g = 96, 256, 64
    wp, sc, zp, _ = _int4_weight(n, k, g, seed=m)
    pw = panels.pack_int4(wp, sc, zp, g)
    x = activation((m, k), dtype, seed=m)
    from helpers import assert_close_named, tol_name
    for bias in (None, make_bias(n, "x", dtype)):
        expected = reference.int4_weight_only_mm(x, wp, sc, zp, g, bias)
        for t in (1, 2):
            with num_threads(t):
                got = run_op("int4_weight_only_mm_panels", backend, isa, x, (*pw, g), bias)
            assert got.dtype == dtype and got.shape == (m, n)
            assert_close_named(got, expected, tol_name("int4_weight_only_mm", dtype), f"M={m}")


@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_int4_weight_only_op_bf16_rows_equal_the_canonical_kernels(backend, isa):
    """bf16 activations at M >= 16 run one exact bf16 term on both layouts: the same bits."""
    n, k, g = 64, 256, 128
    wp, sc, zp, _ = _int4_weight(n, k, g)
    x = activation((20, k), torch.bfloat16)
    got = run_op("int4_weight_only_mm_panels", backend, isa, x,
                 (*panels.pack_int4(wp, sc, zp, g), g), None)
    assert torch.equal(got, run_op("int4_weight_only_mm", backend, isa, x, (wp, sc, zp, g), None))


def _amx_isa():
    return [p for p in BACKENDS if p.values[1] == "avx512_amx"] or [
        pytest.param("cpu", "avx512_amx", marks=pytest.mark.skip(reason="no AMX on this CPU"))]


# bf16 rows on the AMX tiles go in and come out as bf16 (pq_int4_weight_only_mm_panels_bf16):
# the float path's results on the same values, rounded as torch rounds. M = 16 is the first
# on the tiles (15 the float path); M = 200 at K = 4096 takes the K-chunked order; an Inf in
# x sends the call to the float path, which propagates it.
@pytest.mark.parametrize("backend,isa", _amx_isa())
@pytest.mark.parametrize("m,k,layout", [(15, 256, "contiguous"), (16, 256, "contiguous"),
                                        (17, 384, "3d"), (40, 256, "strided"),
                                        (200, 4096, "contiguous"), (33, 256, "inf")])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int4_weight_only_bf16_outputs_on_amx(backend, isa, m, k, layout, with_bias):
    n, g = 64, 128
    wp, sc, zp, _ = _int4_weight(n, k, g, seed=m)
    pw = panels.pack_int4(wp, sc, zp, g)
    x = activation((m, k + 6), torch.bfloat16, seed=m)
    if layout == "inf":
        x[3, 5] = float("inf")
    x = {"strided": lambda: x[:, :k], "3d": lambda: x[:, :k].contiguous().view(1, m, k)}.get(
        layout, lambda: x[:, :k].contiguous())()
    bias = make_bias(n, "x", torch.bfloat16) if with_bias else None
    with num_threads(2):
        with native_calls() as calls:
            got = run_op("int4_weight_only_mm_panels", backend, isa, x, (*pw, g), bias)
        f32 = run_op("int4_weight_only_mm_panels", backend, isa, x.float(), (*pw, g), bias)
    assert ("int4_weight_only_mm_panels_bf16" in calls) == (m >= 16), calls
    nan = assert_bf16_of_fp32(got, f32, x.shape[:-1] + (n,))
    assert nan.any() == (layout == "inf")


def test_int4_weight_only_bf16_output_call_refusals():
    """The native bf16 call: 0 from its query and PQ_ERR_ISA off AMX and below M = 16;
    PQ_ERR_ARG for a row stride below K or a workspace short by a byte; PQ_NOT_FINITE, the
    output untouched, for x with an Inf."""
    mod = _native.module()
    amx = amx_only_query(mod.int4_weight_only_panels_bf16_applies, 16, 256, 64, 128)
    m, n, k, g = 32, 64, 256, 128
    wp, sc, zp, _ = _int4_weight(n, k, g)
    pc, ps, pz = panels.pack_int4(wp, sc, zp, g)
    x = activation((m, k), torch.bfloat16)
    out = torch.full((m, n), 7.0, dtype=torch.bfloat16)
    need = mod.int4_weight_only_panels_workspace_bytes(amx, m, k, g, 2)
    work, base = aligned_work(need)

    def call(isa=amx, ldx=k, nbytes=need, xx=x):
        return mod.int4_weight_only_mm_panels_bf16(isa, xx.data_ptr(), m, k, ldx, pc.data_ptr(), n,
                                                   ps.data_ptr(), pz.data_ptr(), g, 0,
                                                   out.data_ptr(), 2, base, nbytes)
    assert call(isa=amx - 1) == 2 and call(ldx=k - 1) == 1 and call(nbytes=need - 1) == 1
    x_inf = x.clone()
    x_inf[m - 1, k - 1] = float("-inf")
    assert call(xx=x_inf) == 4 and (out == 7.0).all()
    assert call() == 0 and not (out == 7.0).all()


def _weight_only_args(op: str, n: int, k: int):
    """(panel weight args, canonical weight args) of an int4 (G = 32) or int8 weight."""
    if op.startswith("int4"):
        wp, sc, zp, _ = _int4_weight(n, k, 32)
        return (*panels.pack_int4(wp, sc, zp, 32), 32), (wp, sc, zp, 32)
    w, s = random_int8_weight(n, k)
    return (panels.pack_int8(w), s), (w, s)


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("op", ["int4_weight_only_mm", "int8_weight_only_mm"])
def test_weight_only_op_rows_fixed_point_cannot_hold(backend, isa, m, op):
    """A NaN or Inf in x (fixed point cannot hold it) runs the canonical tensors: NaN/Inf
    where float arithmetic puts them, the other rows as the reference."""
    packed, rows = _weight_only_args(op, 32, 128)
    x = activation((m, 128))
    x[0, 5] = float("nan")
    x[-1, 7] = float("inf") if m > 1 else float("nan")
    got = run_op(op + "_panels", backend, isa, x, packed, None)
    expected = run_op(op, backend, isa, x, rows, None)
    assert torch.equal(got.isnan(), expected.isnan()) and got[0].isnan().all()
    if m > 2:
        from helpers import assert_close_named
        assert_close_named(got[1:-1], getattr(reference, op)(x[1:-1], *rows),
                           f"{op}/float32")


needs_int4wo_panels = pytest.mark.skipif(
    not (_native.available() and
         panels.int4_weight_only_panel_layout_applies(32, 64, 32, "cpu")),
    reason="this CPU's kernels keep int4 weight-only weights in rows")
needs_amx = pytest.mark.skipif(
    not (_native.available() and
         _native.ISA_NAMES[_native.current_isa()] == "avx512_amx"),
    reason="needs the avx512_amx level")


@needs_amx
def test_amx_int4_layers_keep_panels():
    """On AMX the int4 weight-only and W4A8 layers keep panels: decode runs the panels'
    GEMVs, prefill the AMX tiles converting each strip from its panel (bf16 tiles for
    weight-only, int8 tiles for W4A8). The int8 layers keep rows."""
    a = _model(n=128)
    pyquant.quantize_(a, pyquant.Int4WeightOnly(group_size=64))
    b = _model(n=128)
    pyquant.quantize_(b, pyquant.Int4Dynamic(group_size=64))
    c = _model(n=128)
    pyquant.quantize_(c, pyquant.Int8Dynamic())
    assert a[0].weight_layout == "panels" and b[0].weight_layout == "panels"
    assert c[0].weight_layout == "rows"


def _w4a8_panels_raw(isa, xq, xs, pw, n, k, g, work_bytes):
    """pq_int4_dynamic_mm_panels with a workspace of work_bytes (fp32 out)."""
    out = torch.full((xq.shape[0], n), float("nan"))
    work = torch.zeros(work_bytes + 64, dtype=torch.uint8)
    base = work.data_ptr() + (-work.data_ptr()) % 64
    st = _native.module().int4_dynamic_mm_panels(
        isa, xq.data_ptr(), xs.data_ptr(), xq.shape[0], k, pw[0].data_ptr(), n,
        pw[1].data_ptr(), pw[2].data_ptr(), g, 0, out.data_ptr(), 2, base, work_bytes)
    assert st == 0
    return out


@needs_amx
@pytest.mark.parametrize("n,k,g", [(64, 128, 64), (96, 384, 128), (32, 512, 256),
                                   (160, 640, 64)])
def test_amx_w4a8_from_panels_equals_rows(n, k, g):
    """From the AMX tiles' first M the W4A8 tiles convert each weight strip from its panel
    (amx_int4dyn_convert_panels): the same int8 strip as from the rows, so the results equal
    the rows' bit for bit; and equal those of the panels' VNNI kernels, which run when the
    workspace holds only their part (pq_int4_panels_workspace_bytes), so the tiles really
    ran where the whole workspace was given. Zero points past 15, which the tiles refuse:
    each layout then takes its VNNI kernel (the rows' generic one sums in another order, so
    against the rows within the op's tolerance), and the two panel calls agree."""
    from helpers import assert_close_named
    amx = _native.ISA_NAMES.index("avx512_amx")
    mod = _native.module()
    for big_zero in (False, True):
        wp, sc, zp, _ = _int4_weight(n, k, g, seed=n)
        if big_zero:
            zp = zp.clone()
            zp[1, 0] = 20
        pw = panels.pack_int4(wp, sc, zp, g)
        for m in (9, 16, 17, 40, 100):
            x = activation((m, k), seed=m)
            want = pyquant.ops.call("int4_dynamic_mm", x, wp, sc, zp, g, None)
            got = pyquant.ops.call("int4_dynamic_mm_panels", x, *pw, g, None)
            if big_zero:
                assert_close_named(got, want, "int4_dynamic_mm/float32")
            else:
                assert torch.equal(got, want), m
            xq, xs = _native.quantize_rows_int8(x)
            whole = mod.int4_dynamic_panels_workspace_bytes(amx, m, k, g, 2)
            part = mod.int4_panels_workspace_bytes(m, k, g)
            assert whole > part  # the tiles' scratch is there to run them
            tiles = _w4a8_panels_raw(amx, xq, xs, pw, n, k, g, whole)
            vnni = _w4a8_panels_raw(amx, xq, xs, pw, n, k, g, part)
            assert torch.equal(tiles, vnni), (m, big_zero)
    wp, sc, zp, _ = _int4_weight(n, k, g, seed=n)  # zero points <= 15: the tiles run
    pw = panels.pack_int4(wp, sc, zp, g)
    for x in (activation((20, 2 * k), seed=5)[:, ::2], activation((2, 9, k), seed=6),
              activation((17, k), torch.bfloat16, seed=7)):
        want = pyquant.ops.call("int4_dynamic_mm", x, wp, sc, zp, g, None)
        got = pyquant.ops.call("int4_dynamic_mm_panels", x, *pw, g, None)
        assert torch.equal(got, want), tuple(x.shape)


@needs_amx
def test_amx_w4a8_panels_workspace_query():
    """pq_int4_dynamic_panels_workspace_bytes: the panels' VNNI part below the tiles' first M
    and on other ISAs, the tiles' scratch from it on AMX, -1 for sizes that overflow."""
    mod = _native.module()
    amx = _native.ISA_NAMES.index("avx512_amx")
    bf16 = _native.ISA_NAMES.index("avx512_bf16")
    part = mod.int4_panels_workspace_bytes
    assert mod.int4_dynamic_panels_workspace_bytes(amx, 1, 256, 64, 2) == part(1, 256, 64)
    assert mod.int4_dynamic_panels_workspace_bytes(bf16, 64, 256, 64, 2) == part(64, 256, 64)
    assert mod.int4_dynamic_panels_workspace_bytes(amx, 64, 256, 64, 2) > part(64, 256, 64)
    assert mod.int4_dynamic_panels_workspace_bytes(amx, 64, 256, 64, 2) > \
        mod.int4_dynamic_panels_workspace_bytes(amx, 64, 256, 64, 1)
    assert mod.int4_dynamic_panels_workspace_bytes(amx, 1 << 40, 1 << 30, 64, 2) == -1
    assert mod.int4_dynamic_panels_workspace_bytes(amx, 16, 100, 64, 2) == -1  # K % g


@needs_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k,g", [(64, 128, 32), (96, 384, 128), (32, 512, 256),
                                   (160, 640, 64)])
def test_amx_int4_weight_only_from_panels_equals_rows(n, k, g, dtype):
    """From M = 16 the AMX tiles convert each weight strip from its panel
    (amx_bf16_convert_u4_panels): the same strip as from the rows, so the same results bit
    for bit, zero points past 15 (which the op takes) included; strided and 3-D x, and x with
    Inf (which the tiles refuse: both layouts then take their fp32 paths) too."""
    wp, sc, zp, _ = _int4_weight(n, k, g, seed=n)
    zp = zp.clone()
    zp[::3] = torch.randint(16, 256, zp[::3].shape, generator=torch.Generator().manual_seed(2),
                            dtype=torch.uint8)
    pc, ps, pz = panels.pack_int4(wp, sc, zp, g)
    xs = [activation((m, k), dtype, seed=m) for m in (16, 17, 40, 100)]
    xs.append(activation((20, 2 * k), dtype, seed=5)[:, ::2])
    xs.append(activation((2, 9, k), dtype, seed=6))
    xi = activation((16, k), dtype, seed=7)
    xi[3, 5] = float("inf")
    xs.append(xi)
    for x in xs:
        want = pyquant.ops.call("int4_weight_only_mm", x, wp, sc, zp, g, None)
        got = pyquant.ops.call("int4_weight_only_mm_panels", x, pc, ps, pz, g, None)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda e: f"{tuple(x.shape)}: {e}")


@needs_int4wo_panels
def test_int4_weight_only_layer_keeps_panels():
    m = _model(n=128)
    pyquant.quantize_(m, pyquant.Int4WeightOnly(group_size=64))
    assert m[0].weight_layout == "panels" and m[2].weight_layout == "rows"
    x = activation((5, 128))
    y = m(x)
    twin = _rows_twin_int4(m)
    from helpers import assert_close_named
    assert_close_named(y, twin(x), "int4_weight_only_mm/float32")
    c, s, z = pyquant.formats.quantize_int4_groupwise(_model(n=128)[0].weight, 64, False)
    assert torch.equal(m.state_dict()["0.weight_packed"], pyquant.formats.pack_int4(c))
    xb = activation((16, 128), torch.bfloat16)
    assert torch.equal(m[0](xb), twin[0](xb))


# ----------------------------------------------------------- int8 weight-only on the W8A8 panels


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("m", [0, 1, 2, 3, 5, 17, 30])
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_int8_weight_only_op_against_the_reference(backend, isa, m, dtype):
    """Every M (fixed point; bf16 activations from M = 24 on the AVX512-BF16 ISA: one bf16
    term), 1 and 2 threads, with and without bias, against the reference on the canonical
    weight with the op's own tolerance; M = 1 bit for bit the canonical op's."""
    n, k = 96, 192
    w, s = random_int8_weight(n, k, seed=m)
    p = panels.pack_int8(w)
    x = activation((m, k), dtype, seed=m)
    from helpers import assert_close_named, tol_name
    for bias in (None, make_bias(n, "x", dtype)):
        expected = reference.int8_weight_only_mm(x, w, s, bias)
        for t in (1, 2):
            with num_threads(t):
                got = run_op("int8_weight_only_mm_panels", backend, isa, x, (p, s), bias)
                rows = run_op("int8_weight_only_mm", backend, isa, x, (w, s), bias)
            assert got.dtype == dtype and got.shape == (m, n)
            assert_close_named(got, expected, tol_name("int8_weight_only_mm", dtype), f"M={m}")
            if m == 1 or backend == "reference":
                assert torch.equal(got, rows), (m, t)


@pytest.mark.parametrize("backend,isa", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_int8_weight_only_op_rows_equal_their_m1_results(backend, isa):
    """Each row's result is the one it gets alone at M = 1, bit for bit (the native kernels'
    fixed point; the reference's F.linear makes no such promise)."""
    n, k = 64, 128
    w, s = random_int8_weight(n, k)
    p = panels.pack_int8(w)
    x = activation((13, k)) * 3
    whole = run_op("int8_weight_only_mm_panels", backend, isa, x, (p, s), None)
    for i in (0, 6, 12):
        one = run_op("int8_weight_only_mm_panels", backend, isa, x[i:i + 1], (p, s), None)
        assert torch.equal(whole[i:i + 1], one), i


@pytest.mark.parametrize("backend,isa", BACKENDS)
def test_int8_weight_only_op_bf16_rows_equal_the_canonical_kernels(backend, isa):
    """bf16 activations at M >= 24 run one exact bf16 term on both layouts: the same bits. On
    the AMX level the rows run on AMX-BF16 tiles instead, whose fp32 sums come in another
    order (a bf16 ulp of the smallest outputs apart): the named tolerance there."""
    n, k = 64, 256
    w, s = random_int8_weight(n, k)
    x = activation((30, k), torch.bfloat16)
    got = run_op("int8_weight_only_mm_panels", backend, isa, x, (panels.pack_int8(w), s), None)
    rows = run_op("int8_weight_only_mm", backend, isa, x, (w, s), None)
    if isa == "avx512_amx":
        from helpers import assert_close_named
        assert_close_named(got, rows, "int8_weight_only_mm/bfloat16")
    else:
        assert torch.equal(got, rows)


@needs_panels
def test_int8_weight_only_layer_keeps_panels(tmp_path):
    m = _model()
    pyquant.quantize_(m, pyquant.Int8WeightOnly())
    assert m[0].weight_layout == "panels" and m[2].weight_layout == "rows"
    w, s = pyquant.formats.quantize_int8_per_channel(_model()[0].weight)
    assert torch.equal(m.state_dict()["0.weight"], w)
    x = activation((5, 128))
    y = m(x)
    from helpers import assert_close_named
    assert_close_named(y, _rows_twin(m)(x), "int8_weight_only_mm/float32")
    pyquant.save(m, tmp_path / "w8.safetensors")
    loaded = pyquant.load(_model(seed=4), tmp_path / "w8.safetensors")
    assert loaded[0].weight_layout == "panels" and torch.equal(loaded(x), y)


@pytest.mark.parametrize("n,k", [(32, 64), (32, 128), (96, 384), (64, 1152)])
def test_native_packers_equal_the_pytorch_ones(n, k, monkeypatch):
    """pq_pack_panels (used where the ISA has it) writes the bytes of the PyTorch packers,
    whose layout test_layout_formula checks entry by entry, and unpacks them back as the
    PyTorch unpackers do; int4 at K % 128 == 64 runs in PyTorch."""
    w, _ = random_int8_weight(n, k, seed=k)
    wp, sc, zp, _ = _int4_weight(n, k, 32, seed=k)
    native8, native4 = panels.pack_int8(w), panels.pack_int4(wp, sc, zp, 32)
    monkeypatch.setattr(panels, "_use_native", False)
    assert torch.equal(native8, panels.pack_int8(w))
    assert all(torch.equal(a, b) for a, b in zip(native4, panels.pack_int4(wp, sc, zp, 32)))
    # and the native unpackers (used by state_dict) against the PyTorch ones
    torch_rows8 = panels.unpack_int8(native8)
    torch_rows4 = panels.unpack_int4(*native4, 32)
    monkeypatch.setattr(panels, "_use_native", True)
    assert torch.equal(panels.unpack_int8(native8), torch_rows8) and torch.equal(torch_rows8, w)
    rows4 = panels.unpack_int4(*native4, 32)
    assert all(torch.equal(a, b) and torch.equal(b, c)
               for a, b, c in zip(rows4, torch_rows4, (wp, sc, zp)))


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512_vnni", "avx512_bf16"])
def test_pack_on_every_isa(isa):
    """A forced ISA without the native packer packs in PyTorch: the same bytes."""
    if not (_native.available() and _native.module().isa_available(_native.ISA_NAMES.index(isa))):
        pytest.skip(f"ISA {isa} not available here")
    w, _ = random_int8_weight(64, 256)
    expected = panels.pack_int8(w)
    with _native.use_isa(isa):
        assert torch.equal(panels.pack_int8(w), expected)


@needs_int4_panels
@pytest.mark.parametrize("m", [1, 4, 16])
def test_w4a8_zero_points_are_exact_per_group(m):
    """Activations far from zero mean make sum x * code much larger than sum x (code - zero):
    the panel kernels form the latter in int32 per group, so the result stays at fp32's
    rounding of the result (taking zero * sum x off in fp32 left ~3e-5 of max|y| here). The
    row layout's GEMV-shaped kernel (M < 8) still does that (README: numerics at the edges);
    from M = 8 it runs the panel GEMM."""
    from pyquant import formats

    n, k, g = 64, 4096, 128
    gen_ = torch.Generator().manual_seed(0)
    codes, scales, zeros = formats.quantize_int4_groupwise(torch.randn(n, k, generator=gen_), g,
                                                           symmetric=False)
    wp = formats.pack_int4(codes)
    x = torch.randn(m, k, generator=gen_) + 10.0
    xq, xs = formats.quantize_rows_int8(x)
    c = formats.unpack_int4(wp).double().reshape(n, k // g, g) - zeros.double()[..., None]
    acc = torch.einsum("mgk,ngk->mng", xq.double().reshape(m, k // g, g), c)
    exact = (acc * scales.double()).sum(-1) * xs.double()[:, None]

    def err(y):
        return ((y.double() - exact).abs().max() / exact.abs().max()).item()

    assert err(torch.ops.pyquant.int4_dynamic_mm_panels(
        x, *panels.pack_int4(wp, scales, zeros, g), g, None)) < 1e-6
    if m >= 8:
        assert err(torch.ops.pyquant.int4_dynamic_mm(x, wp, scales, zeros, g, None)) < 1e-6
