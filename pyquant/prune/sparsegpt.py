"""SparseGPT (Frantar & Alistarh, 2023): prune with second-order weight updates.

For a layer with inputs X (H = X^T X, up to a factor), removing weight w_q and updating the
remaining ones optimally (Optimal Brain Surgeon) costs w_q^2 / [H^-1]_qq and changes the row by
-w_q / [H^-1]_qq * H^-1_{:,q}. SparseGPT processes the columns left to right in blocks of
``block_size``: at the start of each block (of each group of m columns for N:M) it chooses the
mask by that cost, then walks the block's columns one by one, zeroing the pruned weights and
spreading each column's error onto the columns not yet processed through the Cholesky factor
of H^-1 (the same lazy-batch update as GPTQ; Algorithm 1 of the paper).

Mask selection: N:M keeps the n highest-cost weights of every group of m columns,
chosen when the walk reaches the group; unstructured prunes, in every row, the lowest-cost
floor(c1 * s) - floor(c0 * s) weights of the block [c0, c1), so each output row ends with exactly
floor(K * s) pruned weights, the per-row ratio that Wanda and the compressed format use.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..sparse_formats import unstructured_kept
from .masks import check_pattern


def _inverse_hessian_factor(h: torch.Tensor, damp: float, what: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (float32), retrying with more
    dampening when H is numerically indefinite."""
    k = h.shape[0]
    mean = float(torch.diag(h).mean()) if k else 1.0
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    for attempt in range(6):
        lam = damp * (10 ** attempt) * (mean if mean > 0 else 1.0)
        hd = h + lam * eye
        l, info = torch.linalg.cholesky_ex(hd.to(torch.float64))
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u.to(torch.float32)
    raise ValueError(f"sparsegpt on {what}: the Hessian of its inputs is not positive definite "
                     f"even with dampening {lam:.3g}; use more calibration data")


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: Optional[float] = 0.5,
                    nm: Optional[tuple] = None, block_size: int = 128, damp: float = 0.01,
                    what: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``w`` [N, K] given the input Hessian ``h`` [K, K] (X^T X over calibration tokens;
    any positive factor). Returns (updated weight float32 [N, K] with the pruned entries 0,
    keep-mask bool [N, K])."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got {tuple(w.shape)}")
    nrow, k = w.shape
    check_pattern(k, sparsity, nm)
    if h.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}], got {tuple(h.shape)}")
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"block_size={block_size!r} must be an int >= 1")
    if nm is not None and block_size % nm[1]:
        block_size = max(nm[1], block_size - block_size % nm[1])
    W = w.detach().to(torch.float32).clone()
    H = h.detach().to(torch.float32).clone()
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"sparsegpt on {what}: the Hessian holds NaN or inf")
    # An input that was 0 on every calibration token has a zero row and column in H: give it a
    # unit diagonal, so that it gets no error from the other columns and gives none, and its
    # weights compete by their magnitude alone (cheap to prune on this data, but not zeroed:
    # the reference code's W[:, dead] = 0 turned a layer whose calibration inputs were all 0
    # into zeros, and the report, measured on those inputs, called it perfect).
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    hinv = _inverse_hessian_factor(H, damp, what)
    del H
    keep = torch.zeros(nrow, k, dtype=torch.bool, device=W.device)
    for c0 in range(0, k, block_size):
        c1 = min(c0 + block_size, k)
        count = c1 - c0
        w1 = W[:, c0:c1].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[c0:c1, c0:c1]
        d = torch.diag(hinv1)
        keep1 = torch.ones(nrow, count, dtype=torch.bool, device=W.device)
        if nm is None:
            # exact per-row count: floor(c1 * s) - floor(c0 * s) in this block
            p = (c1 - unstructured_kept(c1, sparsity)) - (c0 - unstructured_kept(c0, sparsity))
            if p:
                cost = w1.pow(2) / d[None, :].pow(2)
                order = torch.sort(cost, dim=1, stable=True).indices[:, :p]
                keep1.scatter_(1, order, False)
        n_keep, m = nm if nm is not None else (0, 0)
        for i in range(count):
            if nm is not None and i % m == 0:
                cost = w1[:, i:i + m].pow(2) / d[i:i + m][None, :].pow(2)
                # keep the n highest costs (lower column first on ties)
                order = torch.sort(cost, dim=1, descending=True, stable=True).indices
                g = torch.zeros(nrow, m, dtype=torch.bool, device=W.device)
                g.scatter_(1, order[:, :n_keep], True)
                keep1[:, i:i + m] = g
            col = w1[:, i]
            q = col * keep1[:, i]
            q1[:, i] = q
            e = (col - q).div_(hinv1[i, i])
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1.0)  # OBS update of the columns to come
            err1[:, i] = e
        W[:, c0:c1] = q1
        keep[:, c0:c1] = keep1
        W[:, c1:] -= err1 @ hinv[c0:c1, c1:]
    W[~keep] = 0
    return W, keep
