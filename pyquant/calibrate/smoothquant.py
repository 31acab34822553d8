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

# Channels whose calibration activations stayed below this fraction of the largest channel's
# (0 on every token: the data never exercised them) say nothing about their range. By eq. 4
# they would get a tiny s: their weight columns shrunk to a few codes, or none, and a huge 1/s,
# so that a value there at run time could set the whole token's int8 scale on its own (a
# channel 0 in calibration and active later: relative error 0.15-0.99 where plain int8 gave
# 0.007). They take the median s of the others instead: the treatment of a typical channel.
ACT_FLOOR = 1e-3
EPS = 1e-5  # the reference code's clamp of both ranges


def unexercised(act: torch.Tensor) -> torch.Tensor:
    """bool [K]: the input channels whose calibration statistic (max or mean |x|) stayed below
    ACT_FLOOR of the largest channel's (AWQ shares the rule)."""
    return act <= ACT_FLOOR * float(act.max())


def with_median_where(s: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``s`` with its ``dead`` entries replaced by the median of the others (1 where none is
    left)."""
    if not bool(dead.any()):
        return s
    live = s[~dead]
    return s.masked_fill(dead, float(live.median()) if live.numel() else 1.0)


def smooth_scales(w: torch.Tensor, act_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] (eq. 4) from weights [N, K] and the per-input-channel max|x| [K]; channels the
    calibration data did not exercise (``unexercised``) take the median s of the others."""
    a = act_max.to(torch.float32)
    dead = unexercised(a)
    a = a.clamp(min=EPS)
    wmax = w.detach().to(torch.float32).abs().amax(dim=0).clamp(min=EPS)
    return with_median_where((a.pow(alpha) / wmax.pow(1.0 - alpha)).clamp(min=EPS), dead)


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
