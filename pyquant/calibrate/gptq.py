"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh: "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023).

For a layer y = W x, minimize sum_t ||(W - Q) x_t||^2 = tr((W - Q) H (W - Q)^T) with
H = 2 X^T X. Columns are quantized one at a time; after column i is rounded, its error
e = (w_i - q_i) / [H^-1]_ii is pushed onto the columns not yet quantized,
W[:, i:] -= e [H^-1]_i,i:  (the OBS update, eq. 3 of the paper, with the inverse taken from
the upper Cholesky factor of H^-1 so that it never has to be recomputed: section 4, step 3).
Updates inside a block of ``block_size`` columns are applied at once, the rest lazily with one
matrix product per block (step 2).

Group-wise int4: a group's scale and zero point are computed from the group's weights as they
are when its first column is reached, i.e. after the updates of every earlier column. With
``act_order`` (columns in order of decreasing H diagonal, the most active inputs first) the
groups are no longer reached in order, so their scales are fixed up front from the original
weights ("static groups"): the checkpoint keeps its contiguous groups and every backend runs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import GPTQOptions
from ._quant import QuantizedWeight, QuantSpec, group_params, quantize_column


@dataclass
class HessianFactor:
    """What GPTQ needs from a layer's Hessian, computed once and shared by every layer that
    sees the same inputs (Llama's q/k/v projections, gate/up)."""

    u: torch.Tensor  # upper Cholesky factor of H^-1 [K, K] (rows/columns in ``perm`` order)
    perm: Optional[torch.Tensor]  # act_order: column order (decreasing H diagonal), else None
    dead: Optional[torch.Tensor]  # bool [K]: inputs that were always 0, else None


def factor_hessian(h, options: Optional[GPTQOptions] = None,
                   what: str = "layer") -> HessianFactor:
    """Damp and factor H = 2 X^T X / tokens [K, K] (float32). ``h`` is consumed: pass it as a
    one-element list holding the only reference and it is freed as soon as it has been
    factored (CPython keeps call arguments alive until the call returns), so that at most two
    K x K matrices are ever alive.

    U is the upper Cholesky factor of H^-1 (H^-1 = U^T U), found without forming H^-1: with J
    the exchange matrix, chol(J H J) = L gives H = R R^T with R = J L J upper triangular, so
    H^-1 = R^-T R^-1 and U = R^-1 (upper, positive diagonal: the unique factor). One Cholesky
    and one in-place triangular solve (torch.cholesky_inverse is ~30x slower on CPU).
    Damping: damp_percent * mean(diag H) on the diagonal; if H is still not positive definite
    (rank-deficient from few calibration tokens, or round-off), 10x more, up to 4 more times."""
    opts = options or GPTQOptions()
    if isinstance(h, list):
        h = h.pop()
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"GPTQ on {what}: the Hessian must be square, got {tuple(h.shape)}")
    # min and max propagate NaN: no K x K boolean temporary
    if not (math.isfinite(float(h.amax())) and math.isfinite(float(h.amin()))):
        raise ValueError(f"GPTQ on {what}: the calibration inputs hold NaN or inf")
    h = h.to(torch.float32)
    # An input that was 0 on every calibration token (or whose squares underflowed) carries no
    # information: its Hessian row is made harmless, so no error flows to or from its column,
    # and its weights are rounded to nearest. The paper's reference code sets them to 0
    # instead, which is right only if the input stays 0 after calibration: an input that the
    # calibration data never exercised (or all-zero calibration data, which zeroed every
    # weight) came out with its weights gone. The calibrated report's note names them
    # (sequential.py), since the layer's error on that data cannot show them.
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
    else:
        dead = None
    perm = None
    if opts.act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        h = h[perm]  # two steps: never three K x K matrices alive at once
        h = h[:, perm]
    mean_diag = float(h.diagonal().mean())
    hf = h.flip(0, 1)
    del h
    damp, added = opts.damp_percent * mean_diag, 0.0
    for _ in range(5):
        hf.diagonal().add_(damp - added)
        added = damp
        lower, bad = torch.linalg.cholesky_ex(hf)
        if int(bad) == 0:
            del hf
            r = lower.flip(0, 1)
            del lower
            u = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
            torch.linalg.solve_triangular(r, u, upper=True, out=u)
            del r
            if not bool(torch.isfinite(u.diagonal()).all()):
                raise ValueError(f"GPTQ on {what}: the inverse Hessian is not finite; give more "
                                 "(or more varied) calibration data, or raise damp_percent")
            return HessianFactor(u, perm, dead)
        del lower
        damp *= 10
    raise ValueError(
        f"GPTQ on {what}: the Hessian of the calibration inputs is not positive definite even "
        f"with damping {added:.3g} ({added / max(mean_diag, 1e-30):.3g} of its mean "
        "diagonal); give more (or more varied) calibration data, or raise damp_percent"
    )


def _columns(W1, Qt, Err1, U1, i1, perm_list, g, static, spec, scales, zeros, state):
    """Quantize the columns of one block (the rows of W1, a view updated in place), pushing
    each one's error onto the block's later columns (eq. 3); errors go to Err1 for the lazy
    update. ``state`` carries the current group's scale/zero from block to block."""
    scale, zero = state["scale"], state["zero"]
    for i in range(W1.shape[0]):
        col = i1 + i
        orig = perm_list[col] if perm_list is not None else col
        grp = orig // g
        if not static and orig % g == 0:
            s, z = group_params(W1[i:i + g].T, spec)
            scales[:, grp], zeros[:, grp] = s, z
            scale, zero = s, z
        elif static:
            scale, zero = scales[:, grp], zeros[:, grp]
        wcol = W1[i]
        q, dq = quantize_column(wcol, scale, zero, spec)
        Qt[col] = q
        err = (wcol - dq).div_(U1[i, i])
        # a rank-1 update as a K=1 GEMM (BLAS): addr_'s elementwise loop is much slower
        W1[i:].addmm_(U1[i, i:, None], err[None, :], alpha=-1.0)
        Err1[i] = err
    state["scale"], state["zero"] = scale, zero


def gptq_quantize(w: torch.Tensor, h, spec: QuantSpec, options: Optional[GPTQOptions] = None,
                  what: str = "layer") -> QuantizedWeight:
    """Quantize ``w`` [N, K] with GPTQ. ``h``: the Hessian 2 X^T X / tokens [K, K] float32
    (consumed, see ``factor_hessian``; a one-element list hands over the only reference) or a
    ``HessianFactor`` already computed for these inputs. Returns canonical tensors in
    ``spec``'s format; ``what`` names the layer in errors."""
    opts = options or GPTQOptions()
    k = w.shape[1]
    if isinstance(h, HessianFactor):
        factor = h
    else:
        if isinstance(h, torch.Tensor):
            h = [h]
        if tuple(h[0].shape) != (k, k):
            raise ValueError(f"GPTQ on {what}: Hessian shape {tuple(h[0].shape)} does not match "
                             f"weight shape {tuple(w.shape)}")
        factor = factor_hessian(h, opts, what)
    if tuple(factor.u.shape) != (k, k) or (opts.act_order != (factor.perm is not None)):
        raise ValueError(f"GPTQ on {what}: the Hessian factor does not fit weight "
                         f"{tuple(w.shape)} with act_order={opts.act_order}")
    U, perm = factor.u, factor.perm
    # Rows of Wt are the columns of W (in processing order): every update below touches
    # contiguous memory. The only N x K float32 copy; codes are stored as bytes.
    Wt = w.detach().to(device=U.device, dtype=torch.float32).T.clone(
        memory_format=torch.contiguous_format)  # always a copy: never write into the model
    n = Wt.shape[1]

    int4 = spec.kind == "int4"
    g = spec.group_size if int4 else k
    n_groups = k // g
    scales = torch.empty(n, n_groups, dtype=torch.float32, device=Wt.device)
    zeros = torch.empty(n, n_groups, dtype=torch.float32, device=Wt.device)
    static = not int4 or opts.act_order
    if static:  # int8 rows, or int4 groups fixed before any update (act_order)
        for j in range(n_groups):
            scales[:, j], zeros[:, j] = group_params(Wt[j * g:(j + 1) * g].T, spec)
    if perm is not None:
        Wt = Wt[perm]
    Qt = torch.empty(Wt.shape, dtype=torch.uint8 if int4 else torch.int8, device=Wt.device)
    # Keep a group inside one block so that its scale is computed from updated weights.
    bs = opts.block_size
    if int4 and not opts.act_order:
        bs = g * max(1, bs // g)
    perm_list = perm.tolist() if perm is not None else None
    threads = torch.get_num_threads()
    # The column loop is thousands of tiny ops (<= block_size x N each): one CPU thread runs
    # them about as fast as two and cannot stall at a thread barrier when the cores are busy
    # with other processes (measured 2.6x slower with 2 threads on a loaded 2-core box).
    # The lazy update, one big GEMM per block, gets every thread back.
    one_thread = Wt.device.type == "cpu" and threads > 1
    state = {"scale": None, "zero": None}
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        Err1 = torch.empty(i2 - i1, n, dtype=torch.float32, device=Wt.device)
        if one_thread:
            torch.set_num_threads(1)
        try:
            _columns(Wt[i1:i2], Qt, Err1, U[i1:i2, i1:i2], i1, perm_list, g, static, spec,
                     scales, zeros, state)
        finally:
            if one_thread:
                torch.set_num_threads(threads)
        if i2 < k:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)
        del Err1
    del Wt
    if perm is not None:
        codes = torch.empty_like(Qt)
        codes[perm] = Qt
        Qt = codes
    Q = Qt.T.contiguous()
    if int4:
        return QuantizedWeight(spec, Q, scales.contiguous(), zeros.to(torch.uint8).contiguous())
    return QuantizedWeight(spec, Q, scales[:, 0].contiguous())
