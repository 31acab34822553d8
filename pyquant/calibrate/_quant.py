"""The canonical formats seen from the algorithms: which format a config asks for
(``QuantSpec``), the tensors an algorithm returns (``QuantizedWeight``), and the
round-to-nearest quantizers of one group or one column that GPTQ and AWQ build on.

Every scale and zero point here is computed exactly as ``formats.py`` computes it (the same
functions on the same slices), so a calibrated layer differs from an RTN one only in which codes
it chose and, for AWQ/SmoothQuant, in the weights it was given (scaled by s).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import formats


@dataclass(frozen=True)
class QuantSpec:
    """int8: symmetric per output channel; int4: group-wise along K, asymmetric or symmetric."""

    kind: str  # "int8" | "int4"
    group_size: int = 0
    symmetric: bool = True

    @classmethod
    def from_config(cls, config) -> "QuantSpec":
        scheme = getattr(config, "scheme", "")
        if scheme.startswith("int4"):
            return cls("int4", int(config.group_size), bool(config.symmetric))
        if scheme.startswith("int8"):
            return cls("int8")
        raise ValueError(f"calibration does not know the weight format of scheme {scheme!r}")

    @property
    def qmin(self) -> int:
        return 0 if self.kind == "int4" else -formats.INT8_QMAX

    @property
    def qmax(self) -> int:
        return formats.INT4_CODES - 1 if self.kind == "int4" else formats.INT8_QMAX


@dataclass
class QuantizedWeight:
    """Canonical tensors of one layer (the ``formats.py`` layouts, codes not yet packed).

    int8: codes int8 [N, K], scales float32 [N], zeros None.
    int4: codes uint8 [N, K] in 0..15, scales float32 [N, K // group_size], zeros uint8 (same).
    input_scale: float32 [K] > 0 or None; the layer computes W_q @ (x * input_scale).
    """

    spec: QuantSpec
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor] = None
    input_scale: Optional[torch.Tensor] = None

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """The float weight the layer effectively applies to x (input_scale folded in), of
        output channels ``rows`` (all by default)."""
        codes, scales = self.codes[rows], self.scales[rows]
        if self.spec.kind == "int8":
            w = formats.dequantize_int8_per_channel(codes, scales)
        else:
            n, k = codes.shape
            g = self.spec.group_size
            w = codes.to(torch.float32).reshape(n, k // g, g)
            w.sub_(self.zeros[rows].to(torch.float32)[..., None]).mul_(scales[..., None])
            w = w.reshape(n, k)
        if self.input_scale is not None:
            w.mul_(self.input_scale[None, :])
        return w

    def error_energy(self, w: torch.Tensor, chunk_bytes: int = 16 * 2**20):
        """(sum w^2, sum (w - dequantize())^2) over the float weight ``w``, a few rows at a
        time: no N x K temporary beyond ~chunk_bytes (layers of 11008 x 4096 stay cheap)."""
        n, k = w.shape
        step = max(1, chunk_bytes // (4 * max(k, 1)))
        sig = err = 0.0
        for r in range(0, n, step):
            wr = w[r:r + step].to(torch.float32).reshape(-1)
            d = self.dequantize(slice(r, r + step)).reshape(-1)
            sig += float(torch.dot(wr, wr))
            d.sub_(wr)
            err += float(torch.dot(d, d))
        return sig, err


def rtn(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round to nearest, exactly as ``formats`` does it."""
    if spec.kind == "int8":
        q, s = formats.quantize_int8_per_channel(w)
        return QuantizedWeight(spec, q, s)
    codes, scales, zeros = formats.quantize_int4_groupwise(w, spec.group_size, spec.symmetric)
    return QuantizedWeight(spec, codes, scales, zeros)


def group_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32 [N] of one int4 group w [N, g], or of int8 rows w [N, K]
    (zero 0), computed by ``formats`` from the values of ``w``."""
    if spec.kind == "int8":
        _, s = formats.quantize_int8_per_channel(w)
        return s, torch.zeros_like(s)
    _, s, z = formats.quantize_int4_groupwise(w, w.shape[1], spec.symmetric)
    return s[:, 0], z[:, 0].to(torch.float32)


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec):
    """Codes (float) and dequantized values of one column w [N] with per-row scale/zero."""
    q = torch.round(w / scale).add_(zero).clamp_(spec.qmin, spec.qmax)
    return q, (q - zero) * scale


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN then dequantize: the float weight RTN would apply (for error searches)."""
    if spec.kind == "int8":
        amax = w.abs().amax(dim=1, keepdim=True)
        s = amax / formats.INT8_QMAX
        s = torch.where(s == 0, torch.ones_like(s), s)
        return torch.round(w / s).clamp_(-formats.INT8_QMAX, formats.INT8_QMAX) * s
    n, k = w.shape
    g = spec.group_size
    return fake_quantize_groups(w.reshape(n, k // g, g), spec).reshape(n, k)


def fake_quantize_groups(g: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """int4 RTN + dequantize of groups [..., g] with the arithmetic of
    ``formats.quantize_int4_groupwise`` (same scales and zeros, bit for bit)."""
    if spec.symmetric:
        s = g.abs().amax(dim=-1, keepdim=True) / 7.0
        s = torch.where(s == 0, torch.ones_like(s), s)
        return (torch.round(g / s).clamp_(-8, 7)) * s
    wmin = g.amin(dim=-1, keepdim=True).clamp(max=0)
    wmax = g.amax(dim=-1, keepdim=True).clamp(min=0)
    s = (wmax - wmin) / (formats.INT4_CODES - 1)
    s = torch.where(s == 0, torch.ones_like(s), s)
    z = torch.round(-wmin / s).clamp_(0, formats.INT4_CODES - 1)
    return ((torch.round(g / s) + z).clamp_(0, formats.INT4_CODES - 1) - z) * s


def weight_error(dw: torch.Tensor, x: Optional[torch.Tensor] = None,
                 h: Optional[torch.Tensor] = None) -> float:
    """sum over tokens of ||dw @ x_t||^2: from samples x [T, K] or from H = X^T X [K, K],
    whichever the caller has (the cheaper one: N*K*T versus N*K*K)."""
    if h is not None:
        return float(((dw @ h) * dw).sum())
    return float((x @ dw.T).pow(2).sum())
