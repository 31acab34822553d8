"""torch.ops.pyquant.sparse24_mm / sparse24_int8_mm / sparse24_int4_mm against their reference
and against an independent oracle: F.linear with the dense weight the compressed one was made
from (the pruned entries exact zeros), built without sparse_formats' gather/scatter. The native backend runs once per CPU ISA
(csrc/cpu/sparse.cpp); an op without a native kernel would show one skip saying so."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import (ACT_DTYPES, LAYOUTS, activation, assert_close_named, gen, isa_params,
                     make_bias, run_op, tol_name, native_available)
import pyquant
from pyquant import formats, ops, reference
from pyquant import sparse_formats as sf

SHAPES = [(13, 100), (33, 260), (64, 128), (7, 4), (1, 36)]  # (N, K): K % 4 == 0, odd N
MS = [0, 1, 3, 17]


def backends(op):
    """reference, plus the native backend once per ISA when it implements ``op`` (one skip
    saying so until it does)."""
    params = [pytest.param("reference", None, id="reference")]
    if op not in ops._REGISTRY["cpu"].impls:
        return params + [pytest.param("cpu", None, id="cpu", marks=pytest.mark.skip(
            reason=f"no native CPU kernel for {op} yet (reference fallback)"))]
    return params + isa_params()


def random_mask24(n, k, seed=0):
    """bool [N, K] keeping 2 random positions of every group of 4."""
    g = gen(seed)
    order = torch.rand(n, k // 4, 4, generator=g).argsort(-1)
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    keep.scatter_(-1, order[..., :2], True)
    return keep.reshape(n, k)


def dense24(n, k, seed=0, dtype=torch.float32):
    """(dense 2:4 weight, values [N, K/2], meta): values = the kept entries in increasing k."""
    mask = random_mask24(n, k, seed)
    w = (torch.randn(n, k, generator=gen(seed + 1)) * mask).to(dtype)
    values = w[mask].reshape(n, k // 2)
    pos = (mask.reshape(n, k // 4, 4).nonzero()[:, 2]).reshape(n, k // 2)
    return w, values, sf.pack_24_meta(pos)


def oracle(x, w_dense, bias):
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w_dense.float(), b).to(x.dtype)


def check(op, backend, isa, x, wargs, bias, w_dense):
    expected = oracle(x, w_dense, bias)
    ref = getattr(reference, op)(x, *wargs, bias)
    assert_close_named(ref, expected, tol_name(op, x.dtype), "reference vs dense oracle")
    out = run_op(op, backend, isa, x, wargs, bias)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w_dense.shape[0])
    assert_close_named(out, ref, tol_name(op, x.dtype), f"{backend} vs reference")
    return out


def int8_args(n, k, seed=0):
    mask = random_mask24(n, k, seed)
    q = torch.randint(-127, 128, (n, k // 2), generator=gen(seed + 2), dtype=torch.int8)
    scale = (torch.rand(n, generator=gen(seed + 3)) + 0.5) / 127
    dense = torch.zeros(n, k)
    dense[mask] = (q.float() * scale[:, None]).flatten()
    pos = mask.reshape(n, k // 4, 4).nonzero()[:, 2].reshape(n, k // 2)
    return (q, sf.pack_24_meta(pos), scale), dense


def int4_args(n, k, group_size, seed=0, big_zero=None):
    """big_zero: a zero point past 15 (legal for the op) for every other row's first group."""
    mask = random_mask24(n, k, seed)
    codes = torch.randint(0, 16, (n, k // 2), generator=gen(seed + 2), dtype=torch.uint8)
    g = k // 2 // group_size
    scales = (torch.rand(n, g, generator=gen(seed + 3)) + 0.5) / 8
    zeros = torch.randint(0, 16, (n, g), generator=gen(seed + 4), dtype=torch.uint8)
    if big_zero is not None:
        zeros[::2, 0] = big_zero
    vals = (codes.float().reshape(n, g, group_size) - zeros.float()[..., None]) \
        * scales[..., None]
    dense = torch.zeros(n, k)
    dense[mask] = vals.flatten()
    pos = mask.reshape(n, k // 4, 4).nonzero()[:, 2].reshape(n, k // 2)
    return (formats.pack_int4(codes), sf.pack_24_meta(pos), scales, zeros, group_size), dense


# --------------------------------------------------------------------------- float 2:4


@pytest.mark.parametrize("backend,isa", backends("sparse24_mm"))
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_sparse24_shapes(backend, isa, m, n, k):
    w, v, meta = dense24(n, k, seed=n + k)
    x = activation((m, k), seed=m)
    check("sparse24_mm", backend, isa, x, (v, meta), make_bias(n, "x", x.dtype), w)


@pytest.mark.parametrize("backend,isa", backends("sparse24_mm"))
@pytest.mark.parametrize("xdtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("vdtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [None, "x", "fp32"])
def test_sparse24_dtypes(backend, isa, xdtype, vdtype, bias):
    n, k = 33, 260
    w, v, meta = dense24(n, k, dtype=vdtype)
    x = activation((5, k), xdtype)
    out = check("sparse24_mm", backend, isa, x, (v, meta), make_bias(n, bias, xdtype), w)
    assert out.dtype == xdtype


@pytest.mark.parametrize("backend,isa", backends("sparse24_mm"))
@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "contiguous"])
def test_sparse24_strided_and_3d(backend, isa, layout):
    n, k = 13, 100
    w, v, meta = dense24(n, k)
    check("sparse24_mm", backend, isa, activation((17, k), layout=layout), (v, meta), None, w)
    check("sparse24_mm", backend, isa, activation((2, 5, k), torch.bfloat16), (v, meta),
          make_bias(n, "fp32", torch.bfloat16), w)
    # non-contiguous weights are legal too
    vt = torch.stack((v, v), 2)[..., 0]
    assert not vt.is_contiguous()
    check("sparse24_mm", backend, isa, activation((3, k)), (vt, meta), None, w)


# --------------------------------------------------------------------------- 2:4 + int8/int4


@pytest.mark.parametrize("backend,isa", backends("sparse24_int8_mm"))
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_sparse24_int8(backend, isa, n, k, dtype):
    wargs, dense = int8_args(n, k, seed=k)
    x = activation((7, k), dtype, seed=n)
    check("sparse24_int8_mm", backend, isa, x, wargs, make_bias(n, "x", dtype), dense)
    check("sparse24_int8_mm", backend, isa, activation((2, 3, k), dtype), wargs, None, dense)


@pytest.mark.parametrize("backend,isa", backends("sparse24_int4_mm"))
@pytest.mark.parametrize("n,k,group", [(13, 100, 10), (33, 256, 32), (64, 512, 128),
                                       (5, 128, 64), (3, 8, 4)])
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
def test_sparse24_int4(backend, isa, n, k, group, dtype):
    wargs, dense = int4_args(n, k, group, seed=k)
    x = activation((7, k), dtype, seed=n)
    check("sparse24_int4_mm", backend, isa, x, wargs, make_bias(n, "fp32", dtype), dense)
    check("sparse24_int4_mm", backend, isa, activation((17, k), dtype, layout="col_slice"),
          wargs, None, dense)


@pytest.mark.parametrize("backend,isa", backends("sparse24_int4_mm"))
@pytest.mark.parametrize("m", [1, 7, 20])
def test_sparse24_int4_zero_points_past_15(backend, isa, m):
    """Zero points past 15 (the quantizers never write them, the op takes any uint8): codes
    minus zero reach -200, which no path may narrow to int8."""
    wargs, dense = int4_args(13, 512, 64, seed=3, big_zero=200)
    check("sparse24_int4_mm", backend, isa, activation((m, 512), seed=m), wargs, None, dense)


# --------------------------------------------------------------------------- opcheck, errors


def _opcheck_cases():
    w, v, meta = dense24(13, 100)
    (q, meta8, s), _ = int8_args(13, 100)
    a4, _ = int4_args(13, 100, 10)
    x = activation((3, 100))
    x3 = activation((2, 3, 100))
    b = make_bias(13, "x", torch.float32)
    return [
        ("sparse24_mm", (x, v, meta, b)), ("sparse24_mm", (x3, v, meta, None)),
        ("sparse24_mm", (activation((0, 100)), v, meta, None)),
        ("sparse24_int8_mm", (x, q, meta8, s, b)), ("sparse24_int8_mm", (x3, q, meta8, s, None)),
        ("sparse24_int4_mm", (x, *a4, b)), ("sparse24_int4_mm", (x3, *a4, None)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(no_backend_env, case):
    op, args = _opcheck_cases()[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reference-fallback notice
        torch.library.opcheck(getattr(torch.ops.pyquant, op).default, args)


def test_bad_inputs():
    w, v, meta = dense24(13, 100)
    x = activation((3, 100))
    op = torch.ops.pyquant.sparse24_mm
    with pytest.raises(ValueError, match=r"x has shape \(3, 99\) but the weight expects K=100"):
        op(activation((3, 99)), v, meta, None)
    with pytest.raises(ValueError, match=r"meta has shape \(13, 12\), expected \(13, 13\)"):
        op(x, v, meta[:, :12], None)
    with pytest.raises(TypeError, match=r"values has dtype torch\.int8"):
        op(x, v.to(torch.int8), meta, None)
    with pytest.raises(ValueError, match=r"K = 2 \* 49 = 98 is not a multiple of 4"):
        op(activation((3, 98)), v[:, :49], meta, None)
    with pytest.raises(TypeError, match=r"meta has dtype torch\.int32"):
        op(x, v, meta.to(torch.int32), None)
    (q, meta8, s), _ = int8_args(13, 100)
    with pytest.raises(ValueError, match=r"scale has shape \(12,\), expected \(13,\)"):
        torch.ops.pyquant.sparse24_int8_mm(x, q, meta8, s[:-1], None)
    a4, _ = int4_args(13, 100, 10)
    with pytest.raises(ValueError, match=r"K/2=50 kept values per row are not a multiple of "
                                         r"group_size=4"):
        torch.ops.pyquant.sparse24_int4_mm(x, *a4[:4], 4, None)
    with pytest.raises(ValueError, match=r"bias has shape \(12,\)"):
        torch.ops.pyquant.sparse24_int4_mm(x, *a4, torch.zeros(12))


# --------------------------------------------------------------------------- format round trips


@pytest.mark.parametrize("seed", range(40))
def test_format_roundtrip_24(seed):
    g = gen(1000 + seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    k = 4 * int(torch.randint(1, 70, (1,), generator=g))
    dtype = ACT_DTYPES[seed % 3]
    w, v, meta = dense24(n, k, seed, dtype)
    assert meta.shape == (n, (k + 7) // 8) and meta.dtype == torch.uint8
    assert sf.sparse24_meta_problem(meta, k) is None
    v2, meta2 = sf.compress_24(w, random_mask24(n, k, seed))
    assert torch.equal(v2, v) and torch.equal(meta2, meta)
    assert torch.equal(sf.decompress_24(v2, meta2), w)
    assert torch.equal(sf.decompress_24(v, meta), w)
    pos = sf.unpack_24_meta(meta, k)
    assert torch.equal(sf.pack_24_meta(pos), meta)
    # compressing without a mask keeps every nonzero of an already 2:4 weight
    v3, meta3 = sf.compress_24(w)
    assert torch.equal(sf.decompress_24(v3, meta3), w)


def test_meta_problems():
    _, _, meta = dense24(3, 100)
    bad = meta.clone()
    bad[0, 0] = 0  # positions (0, 0): not distinct
    assert "not distinct" in sf.sparse24_meta_problem(bad, 100)
    bad = meta.clone()
    bad[1, -1] |= 0x30  # padding bits of the last half byte (K % 8 == 4)
    assert "padding bits" in sf.sparse24_meta_problem(bad, 100)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_weight_without_rows_gives_an_empty_product(backend):
    """N = 0 (no output features): every sparse op gives [M, 0], the reference too, whose
    decompression used to reshape 0 elements to [0, -1]."""
    if backend == "cpu" and not native_available():
        pytest.skip("needs the native module")
    x, meta = torch.randn(3, 8), torch.zeros(0, 1, dtype=torch.uint8)
    calls = {
        "sparse24_mm": (torch.zeros(0, 4), meta),
        "sparse24_int8_mm": (torch.zeros(0, 4, dtype=torch.int8), meta, torch.ones(0)),
        "sparse24_int4_mm": (torch.zeros(0, 2, dtype=torch.uint8), meta, torch.ones(0, 1),
                             torch.zeros(0, 1, dtype=torch.uint8), 4),
        "sparse_unstructured_mm": (torch.zeros(0, 1, dtype=torch.uint8), torch.zeros(0),
                                   torch.zeros(1, dtype=torch.int64)),
    }
    with pyquant.use_backend(backend):
        for op, wargs in calls.items():
            assert getattr(torch.ops.pyquant, op)(x, *wargs, None).shape == (3, 0), op
    assert sf.unpack_24_meta(meta, 8).shape == (0, 4)
    assert sf.unpack_bitmask(torch.zeros(0, 1, dtype=torch.uint8), 8).shape == (0, 8)
