"""The native int8 cores on given activation codes (_native.int8_codes_mm / int4_codes_mm),
which row-parallel shards use after quantizing their slice of x with the whole row's scale:
on every ISA they equal the full ops on the same codes, and bad input is a clear error."""
from __future__ import annotations

import pytest
import torch

from helpers import activation, isa_params, make_bias, random_int4_weight, random_int8_weight
from pyquant import _native, formats, reference

ISAS = isa_params()
pytestmark = pytest.mark.skipif(not _native.available(), reason="native module not built")


@pytest.mark.parametrize("backend,isa", ISAS)
@pytest.mark.parametrize("m,n,k", [(1, 13, 128), (3, 33, 256), (17, 64, 128), (64, 96, 256),
                                   (0, 8, 128)])
def test_codes_mm_equals_the_ops(backend, isa, m, n, k):
    x = activation((m, k), seed=m + n)
    b = make_bias(n, "x", torch.float32)
    xq, xs = formats.quantize_rows_int8(x)
    w8, s8 = random_int8_weight(n, k, seed=n)
    w4 = random_int4_weight(n, k, 64, seed=n)
    with _native.use_isa(isa):
        y8 = _native.int8_codes_mm(xq, xs, w8, s8, b)
        y4 = _native.int4_codes_mm(xq, xs, *w4, 64, b)
        # the same codes through the full ops (which quantize x to exactly xq, xs)
        assert torch.equal(y8, _native.int8_dynamic_mm(x, w8, s8, b))
        assert torch.equal(y4, _native.int4_dynamic_mm(x, *w4, 64, b))
    torch.testing.assert_close(y8, reference.int8_dynamic_mm(x, w8, s8, b), rtol=1e-6,
                               atol=1e-5)


def test_codes_mm_given_row_scale_is_a_slice_of_the_whole():
    """Two halves of K quantized with the whole row's amax: the shard products add up to the
    unsharded one up to fp32 summation order -- the row-parallel contract."""
    m, n, k = 5, 24, 256
    x = activation((m, k), seed=3)
    w8, s8 = random_int8_weight(n, k, seed=4)
    amax = x.abs().amax(dim=1)
    parts = []
    for h in (slice(0, k // 2), slice(k // 2, k)):
        xq, xs = formats.quantize_rows_int8(x[:, h], amax=amax)
        parts.append(_native.int8_codes_mm(xq, xs, w8[:, h].contiguous(), s8))
    torch.testing.assert_close(parts[0] + parts[1], _native.int8_dynamic_mm(x, w8, s8),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bad,match", [
    (lambda xq, xs: (xq.float(), xs), "xq"),
    (lambda xq, xs: (xq, xs.double()), "x_scale must be a float32"),
    (lambda xq, xs: (xq, xs[:-1]), "x_scale must be a float32"),
    (lambda xq, xs: (xq, 1.0), "x_scale must be a float32"),
    (lambda xq, xs: (xq[:, :-2], xs), "K|features|columns"),
])
def test_codes_mm_bad_input(bad, match):
    x = activation((3, 128), seed=1)
    xq, xs = bad(*formats.quantize_rows_int8(x))
    w8, s8 = random_int8_weight(8, 128, seed=2)
    with pytest.raises((ValueError, TypeError), match=match):
        _native.int8_codes_mm(xq, xs, w8, s8)
    with pytest.raises((ValueError, TypeError), match=match):
        _native.int4_codes_mm(xq, xs, *random_int4_weight(8, 128, 64, seed=2), 64)


@pytest.mark.parametrize("backend,isa", ISAS)
@pytest.mark.parametrize("k", [0, 1, 15, 16, 17, 100, 257])
def test_quantize_rows_with_given_amax_bit_exact(backend, isa, k):
    """A shard's slice of each row quantized with the whole row's max: bit-identical to
    formats.quantize_rows_int8(x, amax=) on every ISA, including zero rows and maxima larger
    than the slice's own."""
    m = 6
    x = activation((m, k), seed=k)
    amax = torch.rand(m) * 4 + (x.abs().amax(dim=1) if k else 0)
    amax[1] = 0.0  # all-zero row of the whole: scale 1
    if k:
        x[1] = 0.0
    want_q, want_s = formats.quantize_rows_int8(x, amax=amax)
    with _native.use_isa(isa):
        q, s = _native.quantize_rows_int8(x, amax=amax)
        q0, s0 = _native.quantize_rows_int8(x)  # computed amax: the op's own path
    assert torch.equal(s, want_s) and torch.equal(q, want_q)
    assert torch.equal(s0, formats.quantize_rows_int8(x)[1])
    with pytest.raises(ValueError, match="amax must be"):
        _native.quantize_rows_int8(x, amax=amax[:-1])
