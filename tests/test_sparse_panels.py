"""The CPU 4-row panel layout of 2:4 + int8 and 2:4 + int4 weights (pyquant/sparse_panels.py)
and the ops that multiply it, torch.ops.pyquant.sparse24_int8_mm_panels / sparse24_int4_mm_panels:
the layout's formula entry by entry, exact round trips (native and PyTorch packers alike),
the ops against the canonical ops on every backend and ISA (bit for bit where they run the
same loops), odd sizes, strided and 3-D inputs, every activation dtype, bad input, and the
layers that keep their weight in panels without letting the layout out of the layer."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pyquant
from helpers import (ACT_DTYPES, activation, assert_close_named, backend_isa_params, gen,
                     make_bias, num_threads, on_backend, run_op, tol_name)
from pyquant import _native, reference, sparse_panels
from pyquant import sparse_formats as sf

BACKENDS = backend_isa_params()
HERE = _native.available() and sparse_panels.layout_applies(4, 128, "cpu")
needs_panels = pytest.mark.skipif(
    not HERE, reason="this CPU's kernels keep 2:4 int8/int4 weights in rows (no AVX512 panels)")


def _weight(n, k, bits, g=64, seed=0):
    """(canonical values, meta, wargs of the canonical op without them) of a random 2:4 weight."""
    w = torch.randn(n, k, generator=gen(seed))
    values, meta = sf.compress_24(w)
    if bits == 8:
        q, s = sf.quantize_24_int8(values)
        return q, meta, (s,)
    p, sc, z = sf.quantize_24_int4(values, g)
    return p, meta, (sc, z, g)


def _panel_kernels(isa):
    return sparse_panels.has_kernels(_native.ISA_NAMES.index(isa))


def _fx_path(op, backend, isa, m, k):
    """True when the panels op runs its fixed-point kernels at M = m (below its dense break-even
    and within the rows its workspace takes)."""
    if backend != "cpu" or not _panel_kernels(isa) or m < 1:
        return False
    with _native.use_isa(isa):
        return (_native.sparse_dense_reason(op, m) is None and _native.module()
                .sparse24_panels_workspace_bytes(_native.current_isa(), m, k) > 0)


def _op(bits):
    return "sparse24_int8_mm" if bits == 8 else "sparse24_int4_mm"


@pytest.fixture(params=[True, False], ids=["native_packer", "torch_packer"])
def packer(request, monkeypatch):
    if request.param and not HERE:
        pytest.skip("no native packer on this CPU")
    monkeypatch.setattr(sparse_panels, "_use_native", request.param)
    return request.param


# --------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("bits", [8, 4])
def test_layout_formula(bits, packer):
    """The docstring's formula, entry by entry: values, codes and meta of every quad."""
    n, k = 8, 256
    v, meta, _ = _weight(n, k, bits)
    pv, pm = sparse_panels.pack(v, meta, bits)
    assert pv.dtype == v.dtype and pv.shape == v.shape and pm.shape == meta.shape
    if bits == 8:
        kept = v.to(torch.int64)
    else:  # canonical codes: kept 2b in the low nibble of byte b, 2b + 1 in the high one
        kept = torch.stack((v & 15, v >> 4), dim=-1).reshape(n, k // 2).to(torch.int64)
    flat_v = pv.view(torch.uint8).reshape(n // 4, -1).to(torch.int64)
    flat_m = pm.reshape(n // 4, -1)
    pos = sf.unpack_24_meta(meta, k)  # position of each kept value, row by row
    for q in range(n // 4):
        for s in range(k // 64):
            for p in range(2):
                for lane in range(64):
                    r, kk = (lane // 8) % 2, 8 * (lane // 16) + lane % 8
                    row = 4 * q + 2 * p + r
                    if bits == 8:
                        want = int(kept[row, 32 * s + kk]) & 0xFF
                        assert int(flat_v[q, 128 * s + 64 * p + lane]) == want
                    elif s % 2 == 0:
                        d = s // 2
                        want = int(kept[row, 64 * d + kk]) | int(kept[row, 64 * d + 32 + kk]) << 4
                        assert int(flat_v[q, 128 * d + 64 * p + lane]) == want
            for p in range(2):
                for r in range(2):
                    for i in range(8):
                        byte = int(flat_m[q, 32 * s + 16 * p + 8 * r + i])
                        for lane in range(4):
                            want = int(pos[4 * q + 2 * p + r, 32 * s + 8 * lane + i])
                            assert (byte >> (2 * lane)) & 3 == want


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n,k", [(4, 128), (12, 384), (20, 1024), (8, 32768)])
def test_round_trip_exact(bits, n, k, packer):
    v, meta, _ = _weight(n, k, bits, seed=n + k)
    pv, pm = sparse_panels.pack(v, meta, bits)
    rv, rm = sparse_panels.unpack(pv, pm, bits)
    assert torch.equal(rv, v) and torch.equal(rm, meta)
    if n > 4:  # whole quads are whole rows: slicing them slices the weight
        sv, sm = sparse_panels.unpack(pv[4:8], pm[4:8], bits)
        assert torch.equal(sv, v[4:8]) and torch.equal(sm, meta[4:8])


@needs_panels
@pytest.mark.parametrize("isa", ["avx512_vnni", "avx512_bf16", "avx512_amx"])
@pytest.mark.parametrize("bits", [8, 4])
def test_native_and_torch_packers_agree(bits, isa, monkeypatch):
    """Every level's native packer (each its own build of the qword moves) gives the PyTorch
    packer's bytes, and unpacks them back."""
    if not _panel_kernels(isa):
        pytest.skip(f"{isa}: not on this CPU or not built")
    v, meta, _ = _weight(12, 640, bits, seed=3)
    with _native.use_isa(isa):
        native = sparse_panels.pack(v, meta, bits)
        back = sparse_panels.unpack(*native, bits)
    monkeypatch.setattr(sparse_panels, "_use_native", False)
    torch_ = sparse_panels.pack(v, meta, bits)
    assert all(torch.equal(a, b) for a, b in zip(native, torch_))
    assert torch.equal(back[0], v) and torch.equal(back[1], meta)


@pytest.mark.parametrize("n,k,bits,dtype", [
    (6, 128, 8, torch.int8), (4, 192, 8, torch.int8), (4, 128, 8, torch.uint8),
    (4, 65536, 8, torch.int8), (0, 128, 8, torch.int8), (4, 192, 4, torch.uint8)])
def test_pack_rejects_what_has_no_layout(n, k, bits, dtype):
    per = 2 if bits == 8 else 4
    v = torch.zeros(n, k // per, dtype=dtype)
    meta = torch.zeros(n, k // 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="N % 4 == 0, K % 128 == 0 and K <= 32768"):
        sparse_panels.pack(v, meta, bits)
    assert not (sparse_panels.shape_ok(n, k) and dtype == (torch.int8 if bits == 8 else torch.uint8))


def test_layout_applies_only_where_it_can():
    assert not sparse_panels.layout_applies(6, 128, "cpu")
    assert not sparse_panels.layout_applies(4, 128, "cpu", group_size=16)
    assert not sparse_panels.layout_applies(4, 128, "meta")
    assert sparse_panels.layout_applies(4, 128, "cpu", group_size=32) == HERE


# ------------------------------------------------------------------------------ the ops


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [0, 1, 2, 3, 5, 8, 16, 17, 32, 33, 48])
@pytest.mark.parametrize("n,k,g", [(4, 128, 32), (12, 384, 64), (20, 256, 128), (8, 384, 192)])
def test_op_against_the_canonical_op(backend, isa, bits, m, n, k, g):
    """Within the canonical op's tolerance of the reference; bit for bit the canonical op's
    result where the same arithmetic runs: the unpacked canonical op (no panel kernels on the
    ISA), the dense path, and int8's fixed point at M = 1 (exact int32 sums both) on the levels
    whose canonical op has it (VBMI: AVX512-BF16, AMX). The panels' fixed-point path sums
    int4's groups in another fp32 order, and at M > 1 it is fixed-point arithmetic where the
    canonical op runs the float loop. The AVX512-VNNI level runs the panel kernels of the
    AVX512-BF16 one (no VBMI in them): bit for bit its results where both run them. On 1 and 2
    threads, with and without bias."""
    v, meta, rest = _weight(n, k, bits, g, seed=m)
    pv, pm = sparse_panels.pack(v, meta, bits)
    x = activation((m, k), seed=m)
    fx = _fx_path(_op(bits) + "_panels", backend, isa, m, k)
    canonical_fx = isa in ("avx512_bf16", "avx512_amx")
    # without the panels' fixed point, both ops run the canonical arithmetic where they take
    # the same route: both dense from the weight, or both the canonical kernels
    same_route = True
    if backend == "cpu":
        with _native.use_isa(isa):
            same_route = ((_native.sparse_dense_reason(_op(bits), m) is None)
                          == (_native.sparse_dense_reason(_op(bits) + "_panels", m) is None))
    twin = ("avx512_bf16" if isa == "avx512_vnni" and fx and _panel_kernels("avx512_bf16")
            and _fx_path(_op(bits) + "_panels", backend, "avx512_bf16", m, k) else None)
    for bias in (None, make_bias(n, "fp32", torch.float32)):
        expected = getattr(reference, _op(bits))(x, v, meta, *rest, bias)
        for t in (1, 2):
            with num_threads(t):
                got = run_op(_op(bits) + "_panels", backend, isa, x, (pv, pm, *rest), bias)
                rows = run_op(_op(bits), backend, isa, x, (v, meta, *rest), bias)
                same = twin and run_op(_op(bits) + "_panels", backend, twin, x, (pv, pm, *rest), bias)
            assert_close_named(got, expected, tol_name(_op(bits), x.dtype), f"m={m} t={t}")
            if (not fx and same_route) or (bits == 8 and m == 1 and canonical_fx):
                assert torch.equal(got, rows), (m, t, bias is None)
            if twin:
                assert torch.equal(got, same), (m, t, bias is None)


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("g", [64, 128])
def test_int4_decode_of_long_rows(backend, isa, g):
    """int4's M = 1 quad loop on long rows (K = 5632: x's three term rows past 16 KiB, 5.5 KiB
    of codes a quad, so its L1 hints run within a quad and its L2 hints into the next one and
    past the panel's end): within the op's tolerance of the reference, and the same bits on 1
    and 2 threads."""
    k = 5632
    v, meta, rest = _weight(8, k, 4, g, seed=g)
    pv, pm = sparse_panels.pack(v, meta, 4)
    x = activation((1, k), seed=k)
    expected = reference.sparse24_int4_mm(x, v, meta, *rest, None)
    outs = []
    for t in (1, 2):
        with num_threads(t):
            outs.append(run_op("sparse24_int4_mm_panels", backend, isa, x, (pv, pm, *rest), None))
        assert_close_named(outs[-1], expected, tol_name("sparse24_int4_mm", x.dtype), f"t={t}")
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["col_slice", "transposed", "row_step", "3d", "decode"])
def test_op_layouts_and_dtypes(backend, isa, bits, dtype, layout):
    n, k = 8, 256
    v, meta, rest = _weight(n, k, bits)
    pv, pm = sparse_panels.pack(v, meta, bits)
    x = (activation((2, 3, k), dtype) if layout == "3d" else
         activation((1, 1, k), dtype) if layout == "decode" else
         activation((17, k), dtype, layout=layout))
    b = make_bias(n, "x", dtype)
    got = run_op(_op(bits) + "_panels", backend, isa, x, (pv, pm, *rest), b)
    assert got.dtype == dtype and got.shape == (*x.shape[:-1], n)
    expected = getattr(reference, _op(bits))(x, v, meta, *rest, b)
    assert_close_named(got, expected, tol_name(_op(bits), dtype), layout)


@pytest.mark.parametrize("backend,isa", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_int4_op_zero_points_past_a_nibble_and_x_fixed_point_cannot_hold(backend, isa):
    """Zero points above 15 (the fixed-point path subtracts them in int8) and rows of x with an
    Inf take the float loop on each quad's rows: the canonical op's result, bit for bit."""
    n, k, g = 8, 256, 64
    p, meta, (sc, z, _) = _weight(n, k, 4, g)
    z = z.clone()
    z[3, 1] = 200
    pv, pm = sparse_panels.pack(p, meta, 4)
    for x in (activation((1, k)), activation((1, k)).index_fill_(1, torch.tensor([5]),
                                                                   float("inf"))):
        got = run_op("sparse24_int4_mm_panels", backend, isa, x, (pv, pm, sc, z, g), None)
        rows = run_op("sparse24_int4_mm", backend, isa, x, (p, meta, sc, z, g), None)
        assert torch.equal(got, rows)


@pytest.mark.parametrize("backend,isa", [p for p in BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 3, 6])
def test_op_x_fixed_point_cannot_hold_takes_the_float_loop(backend, isa, bits, m, monkeypatch):
    """A row of x with an Inf (fixed point cannot hold it): every row takes the float loop on
    each quad's rows, the canonical op's result bit for bit (Inf and NaN where it has them).
    Both ops run their sparse kernels at every m here: a level whose break-even for one of
    them lies at or below m would compare the float loop with the dense path."""
    never = {key: 1 << 30 for key in _native.SPARSE_DENSE_MIN_M}
    monkeypatch.setattr(_native, "sparse_dense_min_m", lambda: never)
    n, k = 12, 256
    v, meta, rest = _weight(n, k, bits)
    pv, pm = sparse_panels.pack(v, meta, bits)
    x = activation((m, k), seed=m)
    x[m - 1, 7] = float("inf")
    got = run_op(_op(bits) + "_panels", backend, isa, x, (pv, pm, *rest), None)
    rows = run_op(_op(bits), backend, isa, x, (v, meta, *rest), None)
    assert torch.equal(got.nan_to_num(), rows.nan_to_num())
    assert torch.equal(got.isnan(), rows.isnan())


@pytest.mark.parametrize("backend,isa", [p for p in BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
def test_op_runs_fixed_point_below_the_break_even(backend, isa, bits, m):
    """The panels' fixed-point kernels really run at these M: x = 1 at one column and 1e-9
    elsewhere, which 24-bit fixed point (steps of max|x| / 8323072) writes as exact zeros, so a
    row that pruned that column gives exactly 0 there, where the float loop gives ~1e-9 w."""
    if not _fx_path(_op(bits) + "_panels", backend, isa, m, 256):
        pytest.skip(f"{isa}: no fixed-point panel path at M = {m}")
    n, k = 16, 256
    v, meta, rest = _weight(n, k, bits, g=32)
    pv, pm = sparse_panels.pack(v, meta, bits)
    x = torch.full((m, k), 1e-9)
    x[:, 1] = 1.0
    pruned = reference.dense_weight(_op(bits), k, v, meta, *rest)[:, 1] == 0
    assert pruned.any()
    got = run_op(_op(bits) + "_panels", backend, isa, x, (pv, pm, *rest), None)
    assert torch.equal(got[:, pruned], torch.zeros(m, int(pruned.sum())))
    expected = getattr(reference, _op(bits))(x, v, meta, *rest, None)
    assert (expected[:, pruned] != 0).any()  # what the float arithmetic gives there


@pytest.mark.parametrize("backend,isa", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [1, 3, 48])
def test_op_duplicate_positions_add_up(backend, isa, bits, m):
    """Meta with a group's two positions equal (any meta bytes are safe, pq.h): the products add
    up as in the reference; at M = 48 the dense path cannot write such a weight, and the call
    runs the canonical op instead (its sparse kernel): bit for bit."""
    n, k = 8, 256
    v, meta, rest = _weight(n, k, bits, g=32)
    meta = meta.clone()
    meta[2, 3] = 0x00  # groups 6 and 7 of row 2: positions (0, 0)
    pv, pm = sparse_panels.pack(v, meta, bits)
    x = activation((m, k), seed=m)
    got = run_op(_op(bits) + "_panels", backend, isa, x, (pv, pm, *rest), None)
    expected = getattr(reference, _op(bits))(x, v, meta, *rest, None)
    assert_close_named(got, expected, tol_name(_op(bits), x.dtype), f"m={m}")
    if m == 48:
        assert torch.equal(got, run_op(_op(bits), backend, isa, x, (v, meta, *rest), None))


@pytest.mark.parametrize("bad,match", [
    (lambda v, m, s: (v[:2], m[:2], s[:2]), "multiple of 4"),
    (lambda v, m, s: (v[:, :32].contiguous(), m[:, :8].contiguous(), s), "multiple of 128"),
    (lambda v, m, s: (v.view(torch.uint8), m, s), "int8"),
    (lambda v, m, s: (v, m[:, :4], s), "meta"),
    (lambda v, m, s: (v, m, s[:3]), "scale"),
])
def test_int8_op_bad_input_is_a_clear_error(bad, match):
    v, meta, (s,) = _weight(8, 256, 8)
    pv, pm = sparse_panels.pack(v, meta, 8)
    args = bad(pv, pm, s)
    k = 2 * args[0].shape[1]
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.pyquant.sparse24_int8_mm_panels(activation((2, k)), *args, None)


def test_int4_op_bad_group_size_and_k_name_the_sizes():
    p, meta, (sc, z, g) = _weight(8, 256, 4, 64)
    pv, pm = sparse_panels.pack(p, meta, 4)
    p16, _, (sc16, z16, _) = _weight(8, 256, 4, 16)
    with pytest.raises(ValueError, match="group_size a multiple of 32"):
        torch.ops.pyquant.sparse24_int4_mm_panels(activation((2, 256)), pv, pm, sc16, z16, 16,
                                                  None)
    with pytest.raises(ValueError, match="256"):
        torch.ops.pyquant.sparse24_int4_mm_panels(activation((2, 512)), pv, pm, sc, z, g, None)


# ---------------------------------------------------------------------------- the layers

CONFIGS = [pytest.param(pyquant.Sparse24Int8WeightOnly(), id="int8"),
           pytest.param(pyquant.Sparse24Int4WeightOnly(group_size=32), id="int4")]


def _model(seed=0, n=192, k=256):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, n), nn.GELU(), nn.Linear(n, 42))


def _sparse_model(config, seed=0):
    m = _model(seed)
    pyquant.sparsify_(m, config)
    return m


def _rows_twin(model):
    twin = copy.deepcopy(model)
    for mod in twin.modules():
        if hasattr(mod, "_to_rows"):
            mod._to_rows()
    return twin


def _values_name(layer):
    return "weight_values" if isinstance(layer, pyquant.Sparse24Int8Linear) else "weight_packed"


@needs_panels
@pytest.mark.parametrize("config", CONFIGS)
def test_layer_keeps_panels_only_where_they_apply(config):
    m = _sparse_model(config)
    a, b = m[0], m[2]
    assert a.weight_layout == "panels"
    assert b.weight_layout == "rows"  # K = 192: not whole step pairs (and N = 42)
    twin = _rows_twin(m)
    assert twin[0].weight_layout == "rows"
    name = _values_name(a)
    assert torch.equal(a.canonical(name), getattr(twin[0], name))
    assert torch.equal(a.canonical("weight_meta"), twin[0].weight_meta)
    for shape in ((1, 256), (5, 256), (2, 3, 256), (40, 256)):
        x = activation(shape)
        assert_close_named(m(x), twin(x), tol_name(_op(8), x.dtype), str(shape))
    assert torch.equal(a.dense_weight(), twin[0].dense_weight())


@needs_panels
@pytest.mark.parametrize("config", CONFIGS)
def test_layer_state_dict_and_checkpoint_hold_rows(config, tmp_path):
    m = _sparse_model(config)
    name = _values_name(m[0])
    sd = m.state_dict()
    assert torch.equal(sd[f"0.{name}"], m[0].canonical(name))
    assert torch.equal(sd["0.weight_meta"], m[0].canonical("weight_meta"))
    assert m[0].weight_layout == "panels"  # state_dict did not change the layer
    x = activation((4, 256))
    y = m(x)
    path = tmp_path / "m.safetensors"
    pyquant.save(m, path)
    loaded = pyquant.load(_model(seed=1), path)
    assert loaded[0].weight_layout == "panels"
    assert torch.equal(loaded(x), y)


@needs_panels
@pytest.mark.parametrize("config", CONFIGS)
def test_layer_moves_shards_compiles_and_backprops(config):
    m = _sparse_model(config)
    x = activation((3, 256))
    y = m(x)
    assert torch.equal(copy.deepcopy(m)(x), y)
    with on_backend("reference"):
        assert_close_named(m(x), y, tol_name(_op(8), x.dtype), "reference backend")
    assert torch.equal(torch.compile(m[0], fullgraph=True)(x), m[0](x))
    xg = x.clone().requires_grad_(True)
    m(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    _rows_twin(m)(xr).sum().backward()  # its first layer's float loop: GELU' of another rounding
    assert_close_named(xg.grad, xr.grad, tol_name(_op(8), x.dtype), "grad")
    layer = m[0]
    name = _values_name(layer)
    w = layer.canonical(name).clone()
    for rank in range(2):
        a = layer.shard(0, rank, 2)
        assert a.weight_layout == "panels"
        assert torch.equal(a.canonical(name), w[96 * rank:96 * rank + 96])
        assert torch.equal(a(x), layer(x)[:, 96 * rank:96 * rank + 96])
    m.to("meta")  # leaves the CPU: canonical rows go through the move
    assert m[0].weight_layout == "rows"


@needs_panels
def test_layer_on_an_isa_without_panels():
    """A layer packed here and run on a forced ISA without the panel kernels (AVX2, portable)
    unpacks for the call: the canonical result, bit for bit. On AVX512-VNNI (the panel kernels
    without VBMI) it runs them: AVX512-BF16's result, bit for bit."""
    assert _panel_kernels("avx512_vnni") == _native.module().isa_available(
        _native.ISA_NAMES.index("avx512_vnni"))
    for config in (pyquant.Sparse24Int8WeightOnly(), pyquant.Sparse24Int4WeightOnly(group_size=32)):
        m = _sparse_model(config)
        x = activation((5, 256))
        twin = _rows_twin(m)
        for isa in ("avx2", "portable"):
            assert not _panel_kernels(isa)
            if _native.module().isa_available(_native.ISA_NAMES.index(isa)):
                with _native.use_isa(isa):
                    assert torch.equal(m(x), twin(x)), isa
        if _panel_kernels("avx512_vnni") and _panel_kernels("avx512_bf16"):
            with _native.use_isa("avx512_vnni"):
                y = m(x)
            with _native.use_isa("avx512_bf16"):
                assert torch.equal(y, m(x))
