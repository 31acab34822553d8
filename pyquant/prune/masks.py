"""Masks from scores, and the two score-only pruning methods: magnitude and Wanda.

Everything here takes float weights (and statistics) and returns a bool keep-mask of the
weight's shape [N, K] (True = kept); nothing calls a kernel.

Patterns
    unstructured ``sparsity=s``: every output row n prunes exactly floor(K * s) weights (the
        per-output comparison group of Wanda, Sun et al. 2024, sec. 3; it beats a per-layer
        threshold for LLMs and gives every row the same count, which the compressed format
        uses: sparse_formats.unstructured_kept).
    N:M ``nm=(n, m)``: every group of m consecutive input columns of every row keeps n
        (2:4, 4:8). K must be a multiple of m.
Ties: the same input always gives the same mask (unstructured keeps the lower column).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..sparse_formats import top_n_of_m, unstructured_kept


def check_pattern(k: int, sparsity: Optional[float], nm: Optional[tuple]) -> None:
    if nm is not None:
        n, m = nm
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise ValueError(f"nm={nm!r} must be (n, m) ints with 0 < n < m, e.g. (2, 4)")
        if k % m:
            raise ValueError(f"an {n}:{m} pattern needs K a multiple of {m}, got K={k}")
    else:
        if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) \
                or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity={sparsity!r} must be a number in [0, 1)")


def _stable_order(scores: torch.Tensor, descending: bool) -> torch.Tensor:
    s = torch.nan_to_num(scores.to(torch.float32), nan=float("inf"))
    return torch.sort(s, dim=-1, descending=descending, stable=True).indices


def mask_from_scores(scores: torch.Tensor, sparsity: Optional[float] = 0.5,
                     nm: Optional[tuple] = None) -> torch.Tensor:
    """Keep-mask bool [N, K]: the highest scores of each row (unstructured, per-row ratio) or of
    each group of m columns (N:M)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [N, K], got shape {tuple(scores.shape)}")
    nrow, k = scores.shape
    check_pattern(k, sparsity, nm)
    if nm is not None:
        return top_n_of_m(scores, nm[0], nm[1]).reshape(nrow, k)
    pruned = k - unstructured_kept(k, sparsity)
    keep = torch.ones(nrow, k, dtype=torch.bool, device=scores.device)
    if pruned:
        # ascending and stable: the lowest scores go first, and of equal ones the *higher*
        # column (flip, so the lower one is kept first, as for N:M)
        order = _stable_order(scores.flip(-1), descending=False)[:, :pruned]
        keep.scatter_(1, k - 1 - order, False)
    return keep


def magnitude_mask(w: torch.Tensor, sparsity: Optional[float] = 0.5,
                   nm: Optional[tuple] = None) -> torch.Tensor:
    """Keep the largest |w| (per row, or per group of m)."""
    return mask_from_scores(w.detach().abs().to(torch.float32), sparsity, nm)


def wanda_scores(w: torch.Tensor, act_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda's importance |W_ij| * ||X_j||_2 (Sun et al. 2024, eq. 1): ``act_sq_sum`` [K] is
    the sum over calibration tokens of x_j^2 (any positive common factor gives the same mask)."""
    k = w.shape[1]
    if act_sq_sum.shape != (k,):
        raise ValueError(f"act_sq_sum must have shape ({k},), got {tuple(act_sq_sum.shape)}")
    norm = act_sq_sum.detach().to(torch.float32).clamp_min(0).sqrt()
    return w.detach().abs().to(torch.float32) * norm[None, :]


def wanda_mask(w: torch.Tensor, act_sq_sum: torch.Tensor, sparsity: Optional[float] = 0.5,
               nm: Optional[tuple] = None) -> torch.Tensor:
    return mask_from_scores(wanda_scores(w, act_sq_sum), sparsity, nm)
