"""SmoothQuant (Xiao, Lin, Seznec, Wu, Demouth, Han: "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", ICML 2023).

W8A8 with per-token activation scales fails on a few input channels whose activations are
10-100x larger than the rest: they set every token's scale and flatten the other channels to a
handful of codes. SmoothQuant divides channel j of the activations by
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (eq. 4) and multiplies weight column j by it:
exact in float, and both ranges become quantizable. The layer applies 1/s itself
(``input_scale``) because a generic module tree has no previous op to fold it into.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import SmoothQuantOptions
from ._quant import QuantizedWeight, QuantSpec, rtn

# Channels whose calibration activations were (almost) 0 would get a huge 1/s: then a small
# value there at run time could set the whole token's int8 scale. Their range is floored at
# this fraction of the largest channel's (they cannot set the token scale anyway).
ACT_FLOOR = 1e-3
EPS = 1e-5  # the reference code's clamp of both ranges


def smooth_scales(w: torch.Tensor, act_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] (eq. 4) from weights [N, K] and the per-input-channel max|x| [K]."""
    a = act_max.to(torch.float32)
    a = a.clamp(min=max(EPS, ACT_FLOOR * float(a.max())))
    wmax = w.detach().to(torch.float32).abs().amax(dim=0).clamp(min=EPS)
    return (a.pow(alpha) / wmax.pow(1.0 - alpha)).clamp(min=EPS)


def smoothquant_quantize(w: torch.Tensor, act_max: torch.Tensor, spec: QuantSpec,
                         options: Optional[SmoothQuantOptions] = None,
                         what: str = "layer") -> QuantizedWeight:
    """Quantize ``w`` [N, K] (int8 per channel) after migrating activation range into it:
    returns canonical tensors with ``input_scale`` = 1/s."""
    opts = options or SmoothQuantOptions()
    if act_max.shape != (w.shape[1],):
        raise ValueError(f"SmoothQuant on {what}: activation statistics of shape "
                         f"{tuple(act_max.shape)} do not match weight shape {tuple(w.shape)}")
    if not bool(torch.isfinite(act_max).all()):
        raise ValueError(f"SmoothQuant on {what}: the calibration inputs hold NaN or inf")
    s = smooth_scales(w, act_max.to(w.device), opts.alpha)
    qw = rtn(w.detach().to(torch.float32) * s, spec)
    qw.input_scale = (1.0 / s).to(torch.float32).contiguous()
    return qw
