"""AWQ (Lin, Tang, Tang, Yang, Dang, Gan, Han: "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", MLSys 2024).

A few input channels carry much larger activations than the rest; their weights matter more.
Scaling weight column j by s_j > 1 before quantizing (and the activation by 1/s_j, exact in
float) shrinks that column's relative rounding error. The paper's search (section 3.3):
s = mean|x|^alpha, alpha from a grid in [0, 1), picked by the smallest output error
||W X - Q(W diag(s)) diag(1/s) X|| on calibration data. alpha = 0 is RTN itself, so the chosen
scale is never worse than RTN on that data.

Folding 1/s into the previous op (a LayerNorm, another Linear) needs to know the model; a
generic module tree does not always have one, so the layer multiplies x by ``input_scale`` =
1/s itself (one elementwise multiply, float32 [K]).

Then, as the reference implementation's auto-clip does, each (output channel, group) range is
shrunk by the factor in [0.5, 1] that minimizes that group's share of the output error (int4).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import AWQOptions
from ._quant import QuantizedWeight, QuantSpec, fake_quantize, fake_quantize_groups, rtn
from .smoothquant import unexercised, with_median_where

CLIP_GRID = 20  # shrink factors 1, 0.975, ..., 0.525 (the reference code's n_grid/max_shrink)
CLIP_MAX_SHRINK = 0.5
CLIP_TOKENS = 512  # tokens the clip search uses (the reference code's n_sample_token)
CHUNK_BYTES = 32 * 2**20  # bound on the searches' temporaries


def _scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    # Normalized so that max(s) * min(s) = 1: the weights' overall range stays put and only
    # the balance between channels moves (as the reference code does). A channel that the
    # calibration data did not exercise (smoothquant.unexercised) takes the median s of the
    # others: with its own (floored at 1e-4) its weights shrank to nothing in their group and
    # its 1/s became huge, which the search could not see (its error on that data is 0), so
    # a channel active after calibration lost its weights (relative error up to 0.99).
    s = with_median_where(act_mean.pow(alpha).clamp(min=1e-4), unexercised(act_mean))
    return s / (s.max() * s.min()).sqrt()


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x


def _row_step(n_cols: int, tokens: int) -> int:
    """Rows per chunk so that no temporary exceeds ~CHUNK_BYTES (the error of a layer is a
    sum over its output channels, so the searches run a few rows at a time)."""
    return max(1, CHUNK_BYTES // (4 * max(n_cols, tokens, 1)))


def awq_quantize(w: torch.Tensor, x: torch.Tensor, act_mean: torch.Tensor, spec: QuantSpec,
                 options: Optional[AWQOptions] = None, what: str = "layer") -> QuantizedWeight:
    """Quantize ``w`` [N, K] with AWQ from calibration inputs ``x`` [T, K] (a sample of the
    layer's input rows, float32) and ``act_mean`` [K] = mean |x| over all calibration tokens.
    Returns canonical tensors with ``input_scale`` = 1/s."""
    opts = options or AWQOptions()
    W = w.detach().to(torch.float32)  # read only: may be the model's own weight
    x = x.to(device=W.device, dtype=torch.float32)
    act_mean = act_mean.to(device=W.device, dtype=torch.float32)
    if x.dim() != 2 or x.shape[1] != W.shape[1] or x.shape[0] == 0:
        raise ValueError(f"AWQ on {what}: calibration inputs of shape {tuple(x.shape)} do not "
                         f"match weight shape {tuple(W.shape)}")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(act_mean).all())):
        raise ValueError(f"AWQ on {what}: the calibration inputs hold NaN or inf")
    n, k = W.shape
    # sum_t ||dW x_t||^2 = tr(dW H dW^T), H = X^T X: cheaper than X when tokens > K.
    h = _gram(x) if x.shape[0] > k else None
    step = _row_step(k, 0 if h is not None else x.shape[0])

    def out_err(s: torch.Tensor, inv: torch.Tensor) -> float:
        total = 0.0
        for r in range(0, n, step):
            wr = W[r:r + step]
            dw = wr - fake_quantize(wr * s, spec) * inv
            if h is not None:
                total += float(((dw @ h) * dw).sum())
            else:
                total += float((x @ dw.T).pow(2).sum())
        return total

    best, best_s = None, None
    for i in range(opts.grid_size):
        s = _scales(act_mean, i / opts.grid_size) if i else torch.ones_like(act_mean)
        err = out_err(s, (1.0 / s).to(torch.float32))
        if best is None or err < best:
            best, best_s = err, s
    del h
    ws = W * best_s
    if opts.clip and spec.kind == "int4":
        ws = _clip(ws, x * (1.0 / best_s), spec)
    qw = rtn(ws, spec)
    qw.input_scale = (1.0 / best_s).to(torch.float32).contiguous()
    return qw


def _clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Shrink each (row, group) range of ``w`` (already scaled; x is its input) by the factor
    that minimizes that group's output error sum_t (dw_g . x_t,g)^2 = dw_g H_g dw_g^T with the
    group's own Gram matrix H_g: block-diagonal, O(N K g) per factor instead of O(N K T).
    Modifies and returns ``w`` (a temporary of the caller)."""
    n, k = w.shape
    g = spec.group_size
    if x.shape[0] > CLIP_TOKENS:  # evenly spaced rows: deterministic, covers every batch
        idx = torch.linspace(0, x.shape[0] - 1, CLIP_TOKENS, device=x.device).round().long()
        x = x[idx]
    xg = x.reshape(x.shape[0], k // g, g).transpose(0, 1)  # [G, T, g]
    hg = xg.transpose(1, 2) @ xg  # [G, g, g]
    step = _row_step(4 * k, 0)  # ~4 temporaries of the chunk alive at once
    for r in range(0, n, step):
        wg = w[r:r + step].reshape(-1, k // g, g)
        if spec.symmetric:
            lo = None
            hi = wg.abs().amax(dim=-1, keepdim=True)
        else:
            lo = wg.amin(dim=-1, keepdim=True)
            hi = wg.amax(dim=-1, keepdim=True)
        best_err = best_w = None
        for i in range(CLIP_GRID):
            ratio = 1.0 - CLIP_MAX_SHRINK * i / CLIP_GRID
            cw = torch.minimum(wg, hi * ratio)
            cw = torch.maximum(cw, (-hi if lo is None else lo) * ratio)
            dw = wg - fake_quantize_groups(cw, spec)  # [rows, G, g]
            err = torch.einsum("ngi,gij,ngj->ng", dw, hg, dw)
            if best_err is None:
                best_err, best_w = err, cw
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_w = torch.where(better[..., None], cw, best_w)
        w[r:r + step] = best_w.reshape(-1, k)
    return w
