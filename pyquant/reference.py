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


def int4_weight_only_mm(x, w_packed, scales, zeros, group_size: int, bias=None):
    w = formats.dequantize_int4_groupwise(w_packed, scales, zeros, group_size)
    return _linear_f32(x, w, bias)
