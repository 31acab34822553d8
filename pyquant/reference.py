"""Pure-PyTorch reference of every op: the oracle of the tests and the last fallback.

Each function computes in float32 (integers exactly, in float64) from the canonical formats in
``formats.py`` and returns the activation dtype. The native kernels implement the same
arithmetic; tests compare them against these functions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import formats
from . import panels as _panels
from . import sparse_panels as _sparse_panels


def _linear_f32(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    b = None if bias is None else bias.to(torch.float32)
    return F.linear(x.to(torch.float32), w, b).to(x.dtype)


def int8_weight_only_mm(x, w_q, w_scale, bias=None):
    return _linear_f32(x, formats.dequantize_int8_per_channel(w_q, w_scale), bias)


def int8_dynamic_mm(x, w_q, w_scale, bias=None):
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), x.shape[-1])
    xq, xs = formats.quantize_rows_int8(x2)
    # float64 holds every int32 partial sum exactly (|sum| < 2^53 for K < 5e11).
    acc = (xq.to(torch.float64) @ w_q.to(torch.float64).T).to(torch.float32)
    out = acc * (xs[:, None] * w_scale.to(torch.float32)[None, :])
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype).reshape(*lead, w_q.shape[0])


def int8_weight_only_mm_panels(x, panels, w_scale, bias=None):
    """int8_weight_only_mm on a weight in the CPU panel layout (pyquant/panels.py)."""
    return int8_weight_only_mm(x, _panels.unpack_int8(panels), w_scale, bias)


def int8_dynamic_mm_panels(x, panels, w_scale, bias=None):
    """int8_dynamic_mm on a weight in the CPU panel layout (pyquant/panels.py)."""
    return int8_dynamic_mm(x, _panels.unpack_int8(panels), w_scale, bias)


def int4_weight_only_mm(x, w_packed, scales, zeros, group_size: int, bias=None):
    w = formats.dequantize_int4_groupwise(w_packed, scales, zeros, group_size)
    return _linear_f32(x, w, bias)


def int4_dynamic_mm(x, w_packed, scales, zeros, group_size: int, bias=None):
    """W4A8: per-row int8 activations; per group g the integer dot product
    acc[m, n, g] = sum_k xq[m, k] * (code[n, k] - zeros[n, g]) is exact (float64), then
    out = x_scale[m] * sum_g scales[n, g] * acc[m, n, g] + bias[n] in float32."""
    lead = x.shape[:-1]
    k = x.shape[-1]
    n = w_packed.shape[0]
    x2 = x.reshape(lead.numel(), k)
    xq, xs = formats.quantize_rows_int8(x2)
    ng = k // group_size
    codes = formats.unpack_int4(w_packed).to(torch.float64).reshape(n, ng, group_size)
    wq = codes - zeros.to(torch.float64)[..., None]
    acc = torch.einsum("mgk,ngk->mng", xq.to(torch.float64).reshape(x2.shape[0], ng, group_size),
                       wq)
    out = (acc.to(torch.float32) * scales.to(torch.float32)[None]).sum(-1) * xs[:, None]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype).reshape(*lead, n)


def int4_weight_only_mm_panels(x, codes, scales, zeros, group_size: int, bias=None):
    """int4_weight_only_mm on a weight in the CPU panel layout (pyquant/panels.py)."""
    return int4_weight_only_mm(x, *_panels.unpack_int4(codes, scales, zeros, group_size),
                               group_size, bias)


def int4_dynamic_mm_panels(x, codes, scales, zeros, group_size: int, bias=None):
    """int4_dynamic_mm on a weight in the CPU panel layout (pyquant/panels.py)."""
    return int4_dynamic_mm(x, *_panels.unpack_int4(codes, scales, zeros, group_size),
                           group_size, bias)


# ------------------------------------------------------- sparse ops (layouts: sparse_formats.py)
# The weight is decompressed to dense float32 (exactly: every kept value lands at its column,
# zeros elsewhere) and multiplied as the dense ops above.
from . import sparse_formats as _sf  # noqa: E402


def sparse24_mm(x, values, meta, bias=None):
    return _linear_f32(x, dense_weight("sparse24_mm", x.shape[-1], values, meta), bias)


def sparse_unstructured_mm(x, bitmask, values, row_offsets, bias=None):
    w = dense_weight("sparse_unstructured_mm", x.shape[-1], bitmask, values, row_offsets)
    return _linear_f32(x, w, bias)


def sparse24_int8_mm(x, values_q, meta, scale, bias=None):
    return _linear_f32(x, dense_weight("sparse24_int8_mm", x.shape[-1], values_q, meta, scale),
                       bias)


def sparse24_int4_mm(x, packed, meta, scales, zeros, group_size: int, bias=None):
    w = dense_weight("sparse24_int4_mm", x.shape[-1], packed, meta, scales, zeros, group_size)
    return _linear_f32(x, w, bias)


def sparse24_int8_mm_panels(x, values_q, meta, scale, bias=None):
    """sparse24_int8_mm on values and meta in the CPU 4-row panels (pyquant/sparse_panels.py)."""
    return sparse24_int8_mm(x, *_sparse_panels.unpack(values_q, meta, 8), scale, bias)


def sparse24_int4_mm_panels(x, packed, meta, scales, zeros, group_size: int, bias=None):
    """sparse24_int4_mm on codes and meta in the CPU 4-row panels (pyquant/sparse_panels.py)."""
    return sparse24_int4_mm(x, *_sparse_panels.unpack(packed, meta, 4), scales, zeros,
                            group_size, bias)


def dense_weight(op: str, k: int, *wargs) -> torch.Tensor:
    """The dense float32 W [N, K] that ``op`` multiplies x by (``wargs``: the op's arguments
    between x and bias; ``k``: x's last dimension). For the dynamic ops it is the weight the
    quantized activations meet: their backward passes the activation rounding straight
    through, as quantization-aware training does."""
    if op in ("int8_weight_only_mm", "int8_dynamic_mm"):
        return formats.dequantize_int8_per_channel(*wargs)
    if op in ("int8_weight_only_mm_panels", "int8_dynamic_mm_panels"):
        panels, w_scale = wargs
        return formats.dequantize_int8_per_channel(_panels.unpack_int8(panels), w_scale)
    if op in ("int4_weight_only_mm", "int4_dynamic_mm"):
        return formats.dequantize_int4_groupwise(*wargs)
    if op in ("int4_weight_only_mm_panels", "int4_dynamic_mm_panels"):
        codes, scales, zeros, group_size = wargs
        return formats.dequantize_int4_groupwise(
            *_panels.unpack_int4(codes, scales, zeros, group_size), group_size)
    if op == "sparse24_int8_mm_panels":
        values_q, meta, scale = wargs
        return dense_weight("sparse24_int8_mm", k, *_sparse_panels.unpack(values_q, meta, 8),
                            scale)
    if op == "sparse24_int4_mm_panels":
        packed, meta, *rest = wargs
        return dense_weight("sparse24_int4_mm", k, *_sparse_panels.unpack(packed, meta, 4), *rest)
    if op == "sparse24_mm":
        values, meta = wargs
        return _sf.decompress_24(values.to(torch.float32), meta)
    if op == "sparse_unstructured_mm":
        bitmask, values, row_offsets = wargs
        return _sf.decompress_unstructured(bitmask, values.to(torch.float32), row_offsets, k)
    if op == "sparse24_int8_mm":
        values_q, meta, scale = wargs
        return _sf.decompress_24(formats.dequantize_int8_per_channel(values_q, scale), meta)
    if op == "sparse24_int4_mm":
        packed, meta, scales, zeros, group_size = wargs
        v = formats.dequantize_int4_groupwise(packed, scales, zeros, group_size)
        return _sf.decompress_24(v, meta)
    raise ValueError(f"unknown op {op!r}")
