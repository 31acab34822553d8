"""Every op takes x whatever the strides torch gives a one-row view: a [K, 1] column
transposed is [1, K] with row stride 1, contiguous by torch's rules (a size-1 dimension's
stride does not count). The kernels never step by a single row's stride but refuse a row
stride below K, so the ops hand them one of K; the product equals the reference on every
instruction set."""
from __future__ import annotations

import pytest
import torch

from helpers import check_op, gen, isa_params, random_int4_weight, random_int8_weight
from pyquant import sparse_formats as sf

N, K = 24, 128


def _wargs(op):
    g = gen(3)
    if op in ("int8_weight_only_mm", "int8_dynamic_mm"):
        return random_int8_weight(N, K)
    if op in ("int4_weight_only_mm", "int4_dynamic_mm"):
        return (*random_int4_weight(N, K, 32), 32)
    w = torch.randn(N, K, generator=g)
    if op == "sparse_unstructured_mm":
        keep = w.abs() >= w.abs().median(dim=1, keepdim=True).values
        return sf.compress_unstructured(w, keep)
    values, meta = sf.compress_24(w)
    if op == "sparse24_mm":
        return values, meta
    if op == "sparse24_int8_mm":
        q, s = sf.quantize_24_int8(values)
        return q, meta, s
    p, s, z = sf.quantize_24_int4(values, 32)
    return p, meta, s, z, 32


OPS = ("int8_weight_only_mm", "int8_dynamic_mm", "int4_weight_only_mm", "int4_dynamic_mm",
       "sparse24_mm", "sparse_unstructured_mm", "sparse24_int8_mm", "sparse24_int4_mm")


@pytest.mark.parametrize("backend,isa", isa_params())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_x_with_row_stride_one(op, backend, isa, dtype):
    x = torch.randn(K, 1, generator=gen(1)).to(dtype).t()  # [1, K], strides (1, 1)
    assert x.stride() == (1, 1) and x.is_contiguous()
    check_op(op, backend, isa, x, _wargs(op), None, f"{op} one row, strides {x.stride()}")
    x3 = torch.randn(2, K, 1, generator=gen(2)).to(dtype).transpose(1, 2)  # [2, 1, K]
    check_op(op, backend, isa, x3, _wargs(op), None, f"{op} 3-D, strides {x3.stride()}")
