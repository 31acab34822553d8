"""torch.ops.pyquant.sparse_unstructured_mm against its reference and against F.linear with
the dense weight the compressed one was made from; the bitmask + values + row offsets format
round-trips exactly and its consistency checks catch every kind of corruption."""
from __future__ import annotations

import warnings

import pytest
import torch

from helpers import ACT_DTYPES, LAYOUTS, activation, gen, make_bias
from pyquant import sparse_formats as sf
from test_sparse24_mm import backends, check

OP = "sparse_unstructured_mm"
SHAPES = [(13, 100), (33, 257), (64, 128), (5, 3), (1, 9)]  # any K
MS = [0, 1, 3, 17]


def random_sparse(n, k, density=0.5, seed=0, dtype=torch.float32):
    """(dense weight, (bitmask, values, row_offsets)) with rows of different nnz (some empty)."""
    g = gen(seed)
    mask = torch.rand(n, k, generator=g) < density
    if n > 1:
        mask[0] = False  # an empty row
    if n > 2:
        mask[1] = True  # a full row
    w = (torch.randn(n, k, generator=gen(seed + 1)) * mask).to(dtype)
    return w, sf.compress_unstructured(w, mask)


@pytest.mark.parametrize("backend,isa", backends(OP))
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", MS)
def test_shapes(backend, isa, m, n, k):
    w, wargs = random_sparse(n, k, seed=n + k)
    x = activation((m, k), seed=m)
    check(OP, backend, isa, x, wargs, make_bias(n, "x", x.dtype), w)


@pytest.mark.parametrize("backend,isa", backends(OP))
@pytest.mark.parametrize("xdtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("vdtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [None, "fp32"])
def test_dtypes(backend, isa, xdtype, vdtype, bias):
    n, k = 33, 257
    w, wargs = random_sparse(n, k, dtype=vdtype)
    out = check(OP, backend, isa, activation((5, k), xdtype), wargs, make_bias(n, bias, xdtype), w)
    assert out.dtype == xdtype


@pytest.mark.parametrize("backend,isa", backends(OP))
@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "contiguous"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_strided_3d_density(backend, isa, layout, density):
    n, k = 13, 100
    w, wargs = random_sparse(n, k, density)
    check(OP, backend, isa, activation((17, k), layout=layout), wargs, None, w)
    check(OP, backend, isa, activation((2, 5, k), torch.float16), wargs,
          make_bias(n, "x", torch.float16), w)


@pytest.mark.parametrize("backend,isa", backends(OP))
@pytest.mark.parametrize("n,k", SHAPES + [(7, 1000), (3, 2080)])
@pytest.mark.parametrize("m", MS)
def test_bf16_values_and_activations(backend, isa, m, n, k):
    """bf16 values with bf16 activations: on AVX512-BF16 builds the vdpbf16ps loop (x narrowed
    to bf16 once per call), every K tail, and a strided 3-D batch. K = 1000 and 2080 run its
    two-word steps, then a whole word and a partial one (1000), or a last word whose upper
    half lies past K (2080)."""
    w, wargs = random_sparse(n, k, seed=n + k, dtype=torch.bfloat16)
    check(OP, backend, isa, activation((m, k), torch.bfloat16, seed=m), wargs,
          make_bias(n, "x", torch.bfloat16), w)
    check(OP, backend, isa, activation((2, 3, k), torch.bfloat16, layout="col_slice"), wargs,
          None, w)


@pytest.mark.parametrize("backend,isa", backends(OP))
def test_bf16_values_other_activations(backend, isa):
    """The vdpbf16ps loop only takes rows of bf16 values that fit its stack copy: float32 x
    with one value that is not a bf16 value, and 9 bf16 rows of K = 4000 (36000 values), run
    the float32 loop and still match."""
    w, wargs = random_sparse(21, 4000, seed=5, dtype=torch.bfloat16)
    x = activation((3, 4000), torch.bfloat16).float()
    x[1, 77] += 1e-4
    check(OP, backend, isa, x, wargs, None, w)
    check(OP, backend, isa, activation((9, 4000), torch.bfloat16), wargs, None, w)


@pytest.mark.parametrize("shape,bias", [((3, 100), True), ((2, 3, 100), False), ((0, 100), False)])
def test_opcheck(no_backend_env, shape, bias):
    _, wargs = random_sparse(13, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.library.opcheck(torch.ops.pyquant.sparse_unstructured_mm.default,
                              (activation(shape), *wargs, make_bias(13, "x" if bias else None,
                                                                    torch.float32)))


def test_bad_inputs():
    _, (bm, v, off) = random_sparse(13, 100)
    x = activation((3, 100))
    op = torch.ops.pyquant.sparse_unstructured_mm
    with pytest.raises(ValueError, match=r"x has shape \(3, 120\) but the bitmask \(13, 13\) "
                                         r"holds K in \[97, 104\]"):
        op(activation((3, 120)), bm, v, off, None)
    with pytest.raises(ValueError, match=r"row_offsets has shape \(13,\), expected \(14,\)"):
        op(x, bm, v, off[:-1], None)
    with pytest.raises(TypeError, match=r"row_offsets has dtype torch\.int32"):
        op(x, bm, v, off.to(torch.int32), None)
    with pytest.raises(ValueError, match=r"values must be a 1-D float tensor"):
        op(x, bm, v[None], off, None)
    bad = off.clone()
    bad[5] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match=r"inconsistent unstructured sparse weight"):
            op(x, bm, v, bad, None)


@pytest.mark.parametrize("seed", range(40))
def test_format_roundtrip(seed):
    g = gen(2000 + seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    k = int(torch.randint(1, 300, (1,), generator=g))
    density = float(torch.rand(1, generator=g))
    w, (bm, v, off) = random_sparse(n, k, density, seed, ACT_DTYPES[seed % 3])
    assert bm.shape == (n, (k + 7) // 8) and off.shape == (n + 1,) and off.dtype == torch.int64
    assert v.numel() == int((w != 0).sum()) and int(off[-1]) == v.numel()
    assert sf.unstructured_problem(bm, v, off, k) is None
    assert torch.equal(sf.decompress_unstructured(bm, v, off, k), w)
    assert torch.equal(sf.pack_bitmask(sf.unpack_bitmask(bm, k)), bm)


def test_format_problems():
    _, (bm, v, off) = random_sparse(13, 100, 0.5, 3)
    bad = off.clone()
    bad[0] = 1
    assert "row_offsets[0]" in sf.unstructured_problem(bm, v, bad, 100)
    bad = off.clone()
    bad[4] = bad[3] - 1
    assert "decrease" in sf.unstructured_problem(bm, v, bad, 100)
    bad = off.clone()
    bad[4] += 1
    assert "bit(s) set in the bitmask" in sf.unstructured_problem(bm, v, bad, 100)
    assert "there are" in sf.unstructured_problem(bm, v[:-1], off, 100)
    b2 = bm.clone()
    b2[2, -1] |= 0x80  # bit at k = 103 >= K
    assert "beyond K=100" in sf.unstructured_problem(b2, v, off, 100)
