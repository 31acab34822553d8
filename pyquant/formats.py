"""Canonical quantized formats: how float weights become integer codes, and how codes are packed.

These are the formats that checkpoints store and that every backend accepts. A backend may
repack them into a layout of its own at swap time, but only that backend's pack function and
kernel know such a layout.

int8, per output channel, symmetric (``Int8WeightOnly``, ``Int8Dynamic``)
    q      int8    [N, K]  in [-127, 127]  (-128 is never produced: it keeps |q| symmetric and
                                             lets u8 x s8 dot-product units run without
                                             saturating)
    scale  float32 [N]     w[n, k] ~= scale[n] * q[n, k]

int4, group-wise along K (``Int4WeightOnly``)
    packed float32-free, two codes a byte:
    packed uint8   [N, K // 2]   byte j of row n = code[n, 2j] | code[n, 2j + 1] << 4
    scales float32 [N, K // group_size]
    zeros  uint8   [N, K // group_size]  in [0, 15]
    w[n, k] ~= scales[n, k // group_size] * (code[n, k] - zeros[n, k // group_size])
    Symmetric quantization is the special case zeros == 8 (codes 0..15 map to -8..7).

int8 per-token activations (``Int8Dynamic``)
    xq int8 [M, K], s float32 [M]: s = max|x[m]| / 127 (1 for an all-zero row),
    xq = clamp(round_half_even(x / s), -127, 127).
"""
from __future__ import annotations

import torch

INT8_QMAX = 127
INT4_CODES = 16


def _as_float_weight(w: torch.Tensor, what: str = "weight") -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{what} must be 2-D [N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{what} must be a float tensor, got dtype {w.dtype}")
    return w.detach().to(torch.float32)


def quantize_int8_per_channel(
    w: torch.Tensor, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (q int8 [N, K], scale float32 [N]).

    amax: max |w| of each whole row [N], when ``w`` holds only some of the row's columns (a
    row-parallel shard, pyquant.distributed): the shard then gets the whole row's scale and
    exactly the codes that quantizing the whole row gives."""
    w = _as_float_weight(w)
    if amax is None:
        amax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    else:
        amax = amax.detach().to(device=w.device, dtype=torch.float32).reshape(w.shape[0])
    scale = amax / INT8_QMAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / scale[:, None]).clamp_(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale.to(torch.float32)[:, None]


def quantize_rows_int8(
    x: torch.Tensor, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) symmetric int8 of a 2-D float tensor: (xq int8 [M, K], s float32 [M]).

    The float operations (fp32 amax / 127, true division, round half to even) are the ones the
    native kernels perform, so both give bit-identical codes. ``amax`` [M]: max |x| of each
    whole row when ``x`` holds only a slice of it (row-parallel, pyquant.distributed).
    """
    x = x.to(torch.float32)
    if amax is None:
        amax = x.abs().amax(dim=1) if x.shape[1] else x.new_zeros(x.shape[0])
    else:
        amax = amax.detach().to(device=x.device, dtype=torch.float32).reshape(x.shape[0])
    # A tensor divisor, not the Python scalar: PyTorch's CUDA division by a CPU scalar multiplies
    # by its reciprocal, which rounds differently from amax / 127 for some amax (seen on an H200:
    # a few codes off by one against the CPU and the kernels, which divide correctly rounded).
    s = amax / torch.full_like(amax, INT8_QMAX)
    s = torch.where(s == 0, torch.ones_like(s), s)
    # A row holding an Inf or NaN (or given a non-finite max): scale NaN and codes 0, so
    # that its outputs are NaN, whatever the int8 cast would make of NaN codes.
    bad = ~(torch.isfinite(x).all(dim=1) & torch.isfinite(s))
    s = torch.where(bad, torch.full_like(s, float("nan")), s)
    xq = torch.round(x / s[:, None]).clamp_(-INT8_QMAX, INT8_QMAX)
    xq = torch.where(bad[:, None], torch.zeros_like(xq), xq).to(torch.int8)
    return xq, s


def quantize_int4_groupwise(
    w: torch.Tensor, group_size: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest int4: returns (codes uint8 [N, K] in 0..15, scales float32 [N, G],
    zeros uint8 [N, G]). K must be a multiple of group_size."""
    w = _as_float_weight(w)
    n, k = w.shape
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size={group_size} must be a positive even number")
    if k % group_size:
        raise ValueError(
            f"K={k} is not a multiple of group_size={group_size}; "
            f"use a group size that divides {k} or pad the layer"
        )
    g = w.reshape(n, k // group_size, group_size)
    if symmetric:
        amax = g.abs().amax(dim=2)
        scales = amax / 7.0
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        zeros = torch.full_like(scales, 8.0)
        codes = torch.round(g / scales[..., None]).clamp_(-8, 7) + 8
    else:
        # The zero point is an integer code, so the range must contain 0 for 0 to sit on a
        # code; a group in [10, 11] would otherwise be clamped to zero=0 and lose its offset.
        wmin = g.amin(dim=2).clamp(max=0)
        wmax = g.amax(dim=2).clamp(min=0)
        scales = (wmax - wmin) / (INT4_CODES - 1)
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        zeros = torch.round(-wmin / scales).clamp_(0, INT4_CODES - 1)
        codes = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp_(0, INT4_CODES - 1)
    return (
        codes.reshape(n, k).to(torch.uint8).contiguous(),
        scales.contiguous(),
        zeros.to(torch.uint8).contiguous(),
    )


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] uint8 codes in 0..15 -> [N, K // 2] uint8; low nibble holds the even k."""
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"int4 codes must be [N, K] with K even, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] uint8 -> [N, K] uint8 codes (inverse of pack_int4)."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(
            f"packed int4 must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=2).reshape(packed.shape[0], packed.shape[1] * 2)


def dequantize_int4_groupwise(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    codes = unpack_int4(packed).to(torch.float32)
    n, k = codes.shape
    g = codes.reshape(n, k // group_size, group_size)
    w = (g - zeros.to(torch.float32)[..., None]) * scales.to(torch.float32)[..., None]
    return w.reshape(n, k)
