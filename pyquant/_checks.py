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


def check_int8_mm(op: str, x, w, w_scale, bias) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"{op}: w must be a 2-D int8 tensor [N, K], got {getattr(w, 'shape', w)!r}")
    n, k = w.shape
    check_tensor(op, "w", w, torch.int8, (n, k))
    check_activation(op, x, k)
    check_tensor(op, "w_scale", w_scale, torch.float32, (n,))
    check_bias(op, bias, n)
    check_same_device(op, x, w=w, w_scale=w_scale, bias=bias)


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
