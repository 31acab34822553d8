"""What only torch.ops.pyquant.int4_dynamic_mm (W4A8) has: its group-size rule, config checks and
layer round trip. The kernels against the reference on every backend and ISA are in
test_int4_ops.py (shared with int4 weight-only): the activation codes are bit-identical (the same
per-row int8 quantization as int8_dynamic_mm), the per-group integer dot products exact, and
only the fp32 sum over the groups may differ in order (tolerance "int4_dynamic_mm/<dtype>")."""
from __future__ import annotations

import pytest
import torch

import pyquant
from helpers import backend_isa_params, check_op


@pytest.mark.parametrize("g,match", [(33, r"group_size=33 must be a positive even number"),
                                     (16, r"group_size=16 must be a multiple of 32"),
                                     (96, r"group_size=96 must be 32 or a multiple of 64")])
def test_bad_group(g, match):
    n, k = 13, 96
    p = torch.zeros(n, k // 2, dtype=torch.uint8)
    s = torch.ones(n, k // g if k % g == 0 else 1)
    z = torch.zeros_like(s, dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        torch.ops.pyquant.int4_dynamic_mm(torch.randn(3, k), p, s, z, g, None)


def test_config_validates():
    assert pyquant.Int4Dynamic().group_size == 128
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        pyquant.Int4Dynamic(group_size=48)
    with pytest.raises(TypeError, match="group_size must be an int"):
        pyquant.Int4Dynamic(group_size=True)


@pytest.mark.parametrize("symmetric", [False, True])
def test_layer_quality_and_save_load(tmp_path, symmetric):
    """quantize_ swaps in Int4DynamicLinear; its output tracks the float layer (cosine), and a
    save/load round trip into a fresh float model gives bit-identical outputs."""
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(256, 96), torch.nn.ReLU(),  # noqa: E731
                                       torch.nn.Linear(96, 64, bias=False))
    model = make()
    x = torch.randn(5, 256)
    ref = model(x)
    cfg = pyquant.Int4Dynamic(group_size=32, symmetric=symmetric)
    pyquant.quantize_(model, cfg)
    assert isinstance(model[0], pyquant.Int4DynamicLinear)
    assert model[0].config == cfg
    y = model(x)
    cos = torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0).item()
    assert cos > 0.99
    path = tmp_path / "m.safetensors"
    pyquant.save(model, path)
    fresh = make()
    pyquant.load(fresh, path)
    assert isinstance(fresh[0], pyquant.Int4DynamicLinear) and fresh[0].config == cfg
    assert torch.equal(fresh(x), y)


# bf16 x on the AMX tiles writes bf16 outputs itself (pq_int4_dynamic_mm_bf16): the float
# path's results rounded as torch rounds. M = 8 and group 32 take the float path, and so do
# zero points above 15 (the tiles take code - zero as int8).
@pytest.mark.parametrize("m,k,n,g,layout", [(8, 256, 64, 64, "contiguous"),
                                            (9, 256, 64, 64, "contiguous"),
                                            (17, 384, 96, 128, "3d"),
                                            (130, 256, 64, 128, "strided"),
                                            (40, 256, 64, 32, "contiguous"),
                                            (40, 256, 64, 64, "zero 20"),
                                            (200, 4096, 64, 128, "contiguous")])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("weights", ["rows", "panels"])
def test_bf16_outputs_on_amx_are_the_fp32_path_rounded(m, k, n, g, layout, with_bias, weights):
    """The rows' call (pq_int4_dynamic_mm_bf16) and the panels' (..._panels_bf16, each strip
    converted from its panel): the fp32 path rounded, and the panels' the rows' bit for bit."""
    from helpers import assert_bf16_of_fp32, available_isas, native_calls, num_threads, run_op
    from pyquant import _native, formats, panels

    if not _native.available() or "avx512_amx" not in available_isas():
        pytest.skip("no AMX on this CPU")
    gen = torch.Generator().manual_seed(m + k)
    c, s, z = formats.quantize_int4_groupwise(torch.randn(n, k, generator=gen) * 0.05, g,
                                              symmetric=False)
    if layout == "zero 20":
        z[5, 1] = 20
    wargs = (formats.pack_int4(c), s, z, g)
    x = torch.randn(m, k + 5, generator=gen).to(torch.bfloat16)
    x[m // 2, 2] = float("nan")
    x = {"strided": lambda: x[:, :k], "3d": lambda: x[:, :k].contiguous().view(1, m, k)}.get(
        layout, lambda: x[:, :k].contiguous())()
    bias = torch.randn(n, generator=gen) if with_bias else None
    op, call = "int4_dynamic_mm", "int4_dynamic_mm_bf16"
    if weights == "panels":
        op, call = "int4_dynamic_mm_panels", "int4_dynamic_mm_panels_bf16"
        wargs = (*panels.pack_int4(*wargs), g)
    with num_threads(2):
        with native_calls() as calls:
            got = run_op(op, "cpu", "avx512_amx", x, wargs, bias)
        f32 = run_op(op, "cpu", "avx512_amx", x.float(), wargs, bias)
        if weights == "panels":
            rows = run_op("int4_dynamic_mm", "cpu", "avx512_amx", x,
                          (*panels.unpack_int4(*wargs), g), bias)
            assert torch.equal(got.view(torch.int16), rows.view(torch.int16))
    # the tiles from M = 9, at whole 64-byte groups, all zero points <= 15 (else declined)
    assert (call in calls) == (m >= 9 and g % 64 == 0), calls
    assert assert_bf16_of_fp32(got, f32, x.shape[:-1] + (n,)).any()


def test_bf16_output_call_refusals():
    """The native call: 0 from its query off AMX, below M = 9 and at group 32; PQ_ERR_ARG for a
    workspace short by a byte; PQ_NOT_FIXED_POINT, the output untouched, for a zero point above
    15."""
    from pyquant import _native, formats

    if not _native.available():
        pytest.skip("native module not loaded")
    from helpers import aligned_work, amx_only_query

    mod = _native.module()
    amx = amx_only_query(mod.int4_dynamic_bf16_applies, 9, 256, 64, 64)
    assert mod.int4_dynamic_bf16_applies(amx, 9, 256, 64, 32) == 0
    m, k, n, g = 16, 256, 64, 64
    c, s, z = formats.quantize_int4_groupwise(torch.randn(n, k), g, symmetric=False)
    p = formats.pack_int4(c)
    xq, xs = torch.ones(m, k, dtype=torch.int8), torch.ones(m)
    out = torch.full((m, n), 7.0, dtype=torch.bfloat16)
    need = mod.int4_dynamic_workspace_bytes(amx, m, k, g, 2)
    work, base = aligned_work(need)

    def call(zeros=z, nbytes=need):
        return mod.int4_dynamic_mm_bf16(amx, xq.data_ptr(), xs.data_ptr(), m, k, p.data_ptr(), n,
                                        s.data_ptr(), zeros.data_ptr(), g, 0, out.data_ptr(), 2,
                                        base, nbytes)
    assert call(nbytes=need - 1) == 1
    z_big = z.clone()
    z_big[0, 0] = 16
    assert call(zeros=z_big) == 3 and (out == 7.0).all()
    assert call() == 0 and not (out == 7.0).all()
    # the panels' call: the same refusals, and codes or scales off a 64-byte boundary
    from pyquant import panels
    from pyquant._native_panels import _aligned
    pc, ps, pz = panels.pack_int4(p, s, z, g)
    pc, ps = _aligned(pc), _aligned(ps)
    caddr, saddr = pc.data_ptr(), ps.data_ptr()

    def pcall(codes=caddr, scales=saddr, nbytes=need):
        out.fill_(7.0)
        return mod.int4_dynamic_mm_panels_bf16(amx, xq.data_ptr(), xs.data_ptr(), m, k, codes, n,
                                               scales, pz.data_ptr(), g, 0, out.data_ptr(), 2,
                                               base, nbytes)
    assert pcall(nbytes=need - 1) == 1 and (out == 7.0).all()
    assert pcall(codes=caddr + 1) == 1 and pcall(scales=saddr + 4) == 1
    assert mod.int4_dynamic_mm_panels_bf16(0, xq.data_ptr(), xs.data_ptr(), m, k, caddr, n,
                                           saddr, pz.data_ptr(), g, 0, out.data_ptr(), 2, base,
                                           need) == 2
    assert pcall() == 0
    from_panels = out.clone()
    assert call() == 0 and torch.equal(out.view(torch.int16), from_panels.view(torch.int16))


@pytest.mark.parametrize("backend,isa", backend_isa_params())
@pytest.mark.parametrize("k,g", [(256, 256), (1024, 512), (384, 192), (64, 32)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_largest_group_sums(backend, isa, k, g, sign):
    """Every code 15, zero point 0, every activation code +-127: the largest per-group sums
    (g * 15 * 127). The AVX2 kernel adds up to four 64-code steps in int16 lanes before it
    widens them, so a group of 512 takes two widenings; a missed one overflows."""
    n = 5
    codes = torch.full((n, k), 15, dtype=torch.uint8)
    scales, zeros = torch.ones(n, k // g), torch.zeros(n, k // g, dtype=torch.uint8)
    x = torch.full((3, k), sign)
    check_op("int4_dynamic_mm", backend, isa, x,
             (pyquant.formats.pack_int4(codes), scales, zeros, g), None)
