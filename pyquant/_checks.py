"""Argument checks shared by every backend: they run before any kernel, so a bad call is a
clear ValueError/TypeError naming the values, on every device and under every backend."""
from __future__ import annotations

from typing import Optional

import torch

ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_activation(op: str, x, k: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(
            f"{op}: x has dtype {x.dtype}; use one of float32, bfloat16, float16"
        )
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"{op}: x has shape {_shape(x)} but the weight expects K={k} input features "
            f"in the last dimension"
        )


def check_same_device(op: str, x: torch.Tensor, **tensors) -> None:
    if x.is_cpu and all(t is None or t.is_cpu for t in tensors.values()):
        return  # fast path: is_cpu is a flag, .device builds an object per call
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but x is on {x.device}; move them to one device"
            )


def check_tensor(op: str, name: str, t, dtype: torch.dtype, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if _shape(t) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {_shape(t)}, expected {tuple(shape)}")


def check_bias(op: str, bias: Optional[torch.Tensor], n: int) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(f"{op}: bias has dtype {bias.dtype}; expected a float dtype")
    if _shape(bias) != (n,):
        raise ValueError(f"{op}: bias has shape {_shape(bias)}, expected ({n},)")


# The int8 ops sum their products exactly in int32 over the whole row (CPU, Triton and CUDA
# alike): int8 activation codes or the 24-bit fixed-point terms of the weight-only ops (each at
# most 128 in magnitude) times int8 weights (-128 included), so K * 128 * 128 must stay below
# 2^31: K <= 131071. Past it a sum can wrap and the output is silently wrong (K = 139264 of
# all-ones rows came out negative), so a larger K is refused here, before any kernel. The 2:4 +
# int8 ops sum only the K/2 kept values: twice the K. The int4 ops take exact sums per group or
# block and have no such limit.
INT8_MAX_K = (2**31 - 1) // (128 * 128)


def int8_k_reason(k: int, kept: int = 1) -> Optional[str]:
    """Why int8 products over K = ``k`` inputs (``kept`` in ``kept`` of every 2: 2:4 keeps 1,
    so pass 2) cannot be summed exactly by the int8 kernels, or None."""
    limit = INT8_MAX_K * kept
    if k <= limit:
        return None
    return (f"K={k} is above {limit}, the largest K whose int8 products the kernels sum exactly "
            f"in int32 (K x 128 x 128 < 2^31{' over the K/2 kept values' if kept > 1 else ''}); "
            f"split the layer along K into parts whose outputs add, or use Int4WeightOnly / "
            f"Int4Dynamic (exact sums per group)")


def check_int8_k(op: str, k: int, kept: int = 1) -> None:
    why = int8_k_reason(k, kept)
    if why:
        raise ValueError(f"{op}: {why}")


def check_int8_mm(op: str, x, w, w_scale, bias) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"{op}: w must be a 2-D int8 tensor [N, K], got {getattr(w, 'shape', w)!r}")
    n, k = w.shape
    check_tensor(op, "w", w, torch.int8, (n, k))
    check_int8_k(op, k)
    check_activation(op, x, k)
    check_tensor(op, "w_scale", w_scale, torch.float32, (n,))
    check_bias(op, bias, n)
    check_same_device(op, x, w=w, w_scale=w_scale, bias=bias)


def check_int8_panels_mm(op: str, x, panels, w_scale, bias) -> None:
    """An int8 weight in the CPU panel layout (pyquant/panels.py): uint8 [N, K], N % 32 == 0,
    K % 64 == 0."""
    if not isinstance(panels, torch.Tensor) or panels.dim() != 2:
        raise ValueError(f"{op}: panels must be a 2-D uint8 tensor [N, K] (pyquant.panels."
                         f"pack_int8), got {getattr(panels, 'shape', panels)!r}")
    n, k = panels.shape
    check_tensor(op, "panels", panels, torch.uint8, (n, k))
    check_int8_k(op, k)
    if n % 32 or k % 64 or not n:
        raise ValueError(f"{op}: panels [N={n}, K={k}] need N a multiple of 32 and K a "
                         f"multiple of 64 (whole panels); other sizes keep the canonical int8 "
                         f"weight and run {op[:-len('_panels')]}")
    check_activation(op, x, k)
    check_tensor(op, "w_scale", w_scale, torch.float32, (n,))
    check_bias(op, bias, n)
    check_same_device(op, x, panels=panels, w_scale=w_scale, bias=bias)


def check_int4_panels_mm(op: str, x, codes, scales, zeros, group_size, bias) -> None:
    """An int4 weight in the CPU panel layout (pyquant/panels.py): the shapes and dtypes of
    the canonical format, N % 32 == 0, K % 64 == 0, group_size % 32 == 0."""
    check_int4_mm(op, x, codes, scales, zeros, group_size, bias)
    check_int4_dynamic_group(op, group_size)  # whole 32-code steps a group, as W4A8's
    n, k = codes.shape[0], codes.shape[1] * 2
    if n % 32 or k % 64 or not n:
        raise ValueError(f"{op}: panels [N={n}, K={k}] need N a multiple of 32 and K a "
                         f"multiple of 64 (whole panels); other sizes keep the canonical int4 "
                         f"weight and run {op[:-len('_panels')]}")


def check_int4_mm(op: str, x, w_packed, scales, zeros, group_size, bias) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{op}: group_size must be an int, got {group_size!r}")
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"{op}: group_size={group_size} must be a positive even number")
    if not isinstance(w_packed, torch.Tensor) or w_packed.dim() != 2:
        raise ValueError(
            f"{op}: w_packed must be a 2-D uint8 tensor [N, K/2], got "
            f"{getattr(w_packed, 'shape', w_packed)!r}"
        )
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    check_tensor(op, "w_packed", w_packed, torch.uint8, (n, k // 2))
    if k % group_size:
        raise ValueError(
            f"{op}: K={k} is not a multiple of group_size={group_size}; "
            f"use a group size that divides K or pad the layer"
        )
    check_activation(op, x, k)
    check_tensor(op, "scales", scales, torch.float32, (n, k // group_size))
    check_tensor(op, "zeros", zeros, torch.uint8, (n, k // group_size))
    check_bias(op, bias, n)
    check_same_device(op, x, w_packed=w_packed, scales=scales, zeros=zeros, bias=bias)


def check_int4_dynamic_group(op: str, group_size: int) -> None:
    """W4A8 kernels take whole 32-code steps (16 bytes) per group."""
    if group_size % 32:
        raise ValueError(
            f"{op}: group_size={group_size} must be a multiple of 32 (use 32, 64, 128 or 256)"
        )


def check_w4a8_rows_group(op: str, group_size: int) -> None:
    """The W4A8 row kernels step through a group 64 codes (32 bytes) at a time, or take a group
    of 32 in one step (pq.h: pq_int4_dynamic_mm)."""
    check_int4_dynamic_group(op, group_size)
    if group_size != 32 and group_size % 64:
        raise ValueError(
            f"{op}: group_size={group_size} must be 32 or a multiple of 64 (use 32, 64, 128 "
            f"or 256)"
        )


# ------------------------------------------------------- sparse ops (layouts: sparse_formats.py)


def _check_2d(op: str, name: str, t, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{op}: {name} must be a 2-D {what}, got {getattr(t, 'shape', t)!r}")


def _check_meta_24(op: str, meta, n: int, k: int) -> None:
    check_tensor(op, "meta", meta, torch.uint8, (n, (k + 7) // 8))


def check_sparse24_mm(op: str, x, values, meta, bias) -> None:
    _check_2d(op, "values", values, "float tensor [N, K/2] of kept 2:4 weights")
    if values.dtype not in ACT_DTYPES:
        raise TypeError(f"{op}: values has dtype {values.dtype}; use float32, bfloat16 or "
                        "float16")
    n, k = values.shape[0], 2 * values.shape[1]
    if k % 4:
        raise ValueError(f"{op}: values has shape {_shape(values)}: K = 2 * {values.shape[1]} = "
                         f"{k} is not a multiple of 4")
    check_activation(op, x, k)
    _check_meta_24(op, meta, n, k)
    check_bias(op, bias, n)
    check_same_device(op, x, values=values, meta=meta, bias=bias)


def check_sparse24_int8_mm(op: str, x, values_q, meta, scale, bias) -> None:
    _check_2d(op, "values_q", values_q, "int8 tensor [N, K/2]")
    n, k = values_q.shape[0], 2 * values_q.shape[1]
    check_tensor(op, "values_q", values_q, torch.int8, (n, k // 2))
    check_int8_k(op, k, kept=2)
    if k % 4:
        raise ValueError(f"{op}: values_q has shape {_shape(values_q)}: K = {k} is not a "
                         "multiple of 4")
    check_activation(op, x, k)
    _check_meta_24(op, meta, n, k)
    check_tensor(op, "scale", scale, torch.float32, (n,))
    check_bias(op, bias, n)
    check_same_device(op, x, values_q=values_q, meta=meta, scale=scale, bias=bias)


def check_sparse24_int4_mm(op: str, x, packed, meta, scales, zeros, group_size, bias) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{op}: group_size must be an int, got {group_size!r}")
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"{op}: group_size={group_size} must be a positive even number")
    _check_2d(op, "packed", packed, "uint8 tensor [N, K/4] (int4 codes of the kept values)")
    n, k = packed.shape[0], 4 * packed.shape[1]
    check_tensor(op, "packed", packed, torch.uint8, (n, k // 4))
    if (k // 2) % group_size:
        raise ValueError(f"{op}: K/2={k // 2} kept values per row are not a multiple of "
                         f"group_size={group_size}")
    check_activation(op, x, k)
    _check_meta_24(op, meta, n, k)
    g = k // 2 // group_size
    check_tensor(op, "scales", scales, torch.float32, (n, g))
    check_tensor(op, "zeros", zeros, torch.uint8, (n, g))
    check_bias(op, bias, n)
    check_same_device(op, x, packed=packed, meta=meta, scales=scales, zeros=zeros, bias=bias)


def check_sparse24_panels(op: str, values, group_size=None) -> None:
    """A 2:4 + int8 / int4 weight in the CPU 4-row panel layout (pyquant/sparse_panels.py),
    after the canonical op's checks: N % 4 == 0, K % 128 == 0, K <= 32768, int4 G % 32 == 0."""
    from . import sparse_panels

    n = values.shape[0]
    k = sparse_panels.in_features(values, 8 if values.dtype == torch.int8 else 4)
    if not sparse_panels.shape_ok(n, k) or (group_size is not None and group_size % 32):
        raise ValueError(
            f"{op}: panels [N={n}, K={k}]{'' if group_size is None else f', group_size={group_size}'}"
            f" need N a multiple of {sparse_panels.ROWS}, K a multiple of "
            f"{sparse_panels.K_ALIGN} up to {sparse_panels.MAX_K}"
            f"{'' if group_size is None else ' and group_size a multiple of 32'}; other sizes "
            f"keep the canonical weight and run {op[:-len('_panels')]}")


def check_sparse_unstructured_mm(op: str, x, bitmask, values, row_offsets, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{op}: x must be a tensor [..., K], got {getattr(x, 'shape', x)!r}")
    _check_2d(op, "bitmask", bitmask, "uint8 tensor [N, ceil(K/8)]")
    n, k = bitmask.shape[0], x.shape[-1]
    if bitmask.shape[1] != (k + 7) // 8:
        raise ValueError(f"{op}: x has shape {_shape(x)} but the bitmask {_shape(bitmask)} "
                         f"holds K in [{8 * bitmask.shape[1] - 7}, {8 * bitmask.shape[1]}]")
    check_activation(op, x, k)
    check_tensor(op, "bitmask", bitmask, torch.uint8, (n, (k + 7) // 8))
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError(f"{op}: values must be a 1-D float tensor [nnz], got "
                         f"{getattr(values, 'shape', values)!r}")
    if values.dtype not in ACT_DTYPES:
        raise TypeError(f"{op}: values has dtype {values.dtype}; use float32, bfloat16 or "
                        "float16")
    check_tensor(op, "row_offsets", row_offsets, torch.int64, (n + 1,))
    check_bias(op, bias, n)
    check_same_device(op, x, bitmask=bitmask, values=values, row_offsets=row_offsets, bias=bias)
