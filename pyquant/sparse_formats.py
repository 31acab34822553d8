"""Canonical compressed sparse formats: 2:4 and unstructured (bitmask + values).

These are the layouts that checkpoints store and that every backend accepts; the shape
formulas below are the single definition of each layout (DESIGN.md: documented once, next to
the pack function). Masks are bool [N, K] with True = kept.

2:4 along K (``Sparse24``; K a multiple of 4)
    values  float  [N, K // 2]         the two kept weights of each group of 4, in increasing k
    meta    uint8  [N, ceil(K / 8)]    2-bit position (0..3) of each kept value in its group:
                                       kept value j of row n sits at column 4 * (j // 2) + pos_j,
                                       pos_j = (meta[n, j // 4] >> (2 * (j % 4))) & 3
                                       (four 2-bit indices a byte, lowest bits first; the
                                       unused high bits of the last byte, when K % 8 == 4, are 0).
    Canonical: pos_{2g} < pos_{2g+1} (the two positions of a group are distinct and sorted);
    a 2-bit index can never be out of range, so a checkpoint needs no range check beyond that.
    The kept values may be 0 (a group with fewer than two nonzeros keeps a zero).

2:4 + int8 (``Sparse24Int8WeightOnly``): values int8 [N, K // 2] in [-127, 127] with a float32
    scale [N] per output row (the ``formats`` int8 per-channel format of the kept values), meta
    as above.

2:4 + int4 (``Sparse24Int4WeightOnly``): the kept values [N, K // 2] in the ``formats`` int4
    group-wise format along the compressed axis: packed uint8 [N, K // 4], scales float32
    [N, K // 2 // G], zeros uint8 [N, K // 2 // G]; meta as above. (K // 2) % G == 0.

Unstructured (``Unstructured``)
    bitmask     uint8  [N, ceil(K / 8)]   bit (k % 8) of byte k // 8 (LSB first) is set when
                                          w[n, k] is kept; bits at k >= K are 0
    values      float  [nnz]              the kept weights, row-major (row n, increasing k)
    row_offsets int64  [N + 1]            row n's values are values[row_offsets[n]:
                                          row_offsets[n + 1]]; row_offsets[0] = 0,
                                          row_offsets[N] = nnz, and
                                          row_offsets[n + 1] - row_offsets[n] = popcount(row n)
    The op accepts any nnz. Layers made by ``Unstructured(sparsity=s)`` keep exactly
    ``unstructured_kept(K, s)`` weights in every row (the per-row ratio Wanda uses), so a
    layer's nnz = N * unstructured_kept(K, s) is known from its config and checkpoints have
    fixed shapes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import formats


# ----------------------------------------------------------------------------- masks


def nm_mask_ok(mask: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive columns of every row keeps exactly ``n``."""
    if mask.dim() != 2 or mask.shape[1] % m:
        return False
    return bool((mask.reshape(mask.shape[0], -1, m).sum(-1) == n).all())


def unstructured_kept(k: int, sparsity: float) -> int:
    """Weights kept per row of K at ``sparsity``: K - floor(K * sparsity) (Wanda prunes
    floor(K * s) per output row). The 1e-9 keeps 0.3 * 100 at 30, not 29."""
    return k - int(math.floor(k * sparsity + 1e-9))


# ----------------------------------------------------------------------------- 2:4


def sparse24_meta_cols(k: int) -> int:
    """Bytes of 2-bit positions per row: K/2 indices of 2 bits = K bits = ceil(K / 8) bytes."""
    return (k + 7) // 8


def _check_24_k(k: int) -> None:
    if k % 4:
        raise ValueError(f"2:4 sparsity needs K a multiple of 4, got K={k}; pad the layer to "
                         f"K={k + (-k % 4)}")


def select_24(w: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Positions [N, K/2] (int64, each in 0..3, sorted in each group) of the two kept weights
    of every group of 4. With ``mask`` (bool [N, K], exactly 2 True per group) they are its
    True positions; without, the two largest |w| (ties: the lower k)."""
    n, k = w.shape
    _check_24_k(k)
    if mask is not None:
        if mask.shape != w.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool {tuple(w.shape)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        if not nm_mask_ok(mask, 2, 4):
            raise ValueError("mask does not keep exactly 2 of every 4 consecutive weights")
        keep = mask.reshape(n, k // 4, 4)
    else:
        keep = top_n_of_m(w.detach().abs(), 2, 4)
    # the first and the last kept position of each group (argmax returns the first maximum)
    kk = keep.to(torch.uint8)
    pos = torch.stack((kk.argmax(-1), 3 - kk.flip(-1).argmax(-1)), -1)
    return pos.reshape(n, k // 2)


def top_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """bool [N, K/m, m]: the n highest scores of each group of m consecutive columns (NaN
    counts as highest). Of equal scores topk picks deterministically for a given input but in
    no documented order; every choice among equal scores is equally good."""
    rows, k = scores.shape
    s = scores.reshape(rows, k // m, m)
    if s.is_floating_point():
        s = torch.nan_to_num(s, nan=math.inf)
    keep = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    return keep.scatter_(-1, torch.topk(s, n, dim=-1).indices, True)


def pack_24_meta(pos: torch.Tensor) -> torch.Tensor:
    """positions int [N, K/2] in 0..3 -> meta uint8 [N, ceil(K/8)] (layout in the module doc)."""
    n, h = pos.shape
    k = 2 * h
    cols = sparse24_meta_cols(k)
    p = torch.zeros(n, cols * 4, dtype=torch.uint8, device=pos.device)
    p[:, :h] = pos.to(torch.uint8)
    p = p.reshape(n, cols, 4)
    return (p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)).contiguous()


def unpack_24_meta(meta: torch.Tensor, k: int) -> torch.Tensor:
    """meta uint8 [N, ceil(K/8)] -> positions int64 [N, K/2] (inverse of pack_24_meta)."""
    n = meta.shape[0]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=meta.device)
    p = (meta[..., None] >> shifts) & 3
    return p.reshape(n, 4 * meta.shape[1])[:, : k // 2].to(torch.int64)  # N = 0 too


def compress_24(w: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """Dense [N, K] -> (values [N, K/2] in w's dtype, meta uint8 [N, ceil(K/8)]).

    Without ``mask`` the two largest |w| of each group are kept (magnitude 2:4), which keeps
    every nonzero of a weight that already is 2:4 sparse."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    pos = select_24(w, mask)
    cols = pos + 4 * torch.arange(k // 4, device=w.device).repeat_interleave(2)[None, :]
    values = torch.gather(w.detach(), 1, cols)
    return values.contiguous(), pack_24_meta(pos)


def sparse24_columns(meta: torch.Tensor, k: int) -> torch.Tensor:
    """Column index [N, K/2] (int64) of every kept value."""
    pos = unpack_24_meta(meta, k)
    return pos + 4 * torch.arange(k // 4, device=meta.device).repeat_interleave(2)[None, :]


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values [N, K/2], meta) -> dense [N, K] in values' dtype (zeros elsewhere). Duplicate
    positions (not canonical) add up, so the result is defined for any meta bytes."""
    n, h = values.shape
    k = 2 * h
    dense = torch.zeros(n, k, dtype=values.dtype, device=values.device)
    return dense.scatter_add_(1, sparse24_columns(meta, k), values)


def sparse24_meta_problem(meta: torch.Tensor, k: int) -> Optional[str]:
    """None when ``meta`` is canonical for K (sorted distinct positions, zero padding bits),
    else what is wrong (for checkpoint validation)."""
    pos = unpack_24_meta(meta, k).reshape(meta.shape[0], -1, 2)
    bad = int((pos[..., 0] >= pos[..., 1]).sum())
    if bad:
        return (f"{bad} group(s) of 4 whose two 2-bit positions are not distinct and "
                "increasing")
    if k % 8 == 4 and meta.numel():
        hi = int((meta[:, -1] >> 4).count_nonzero())
        if hi:
            return f"{hi} row(s) with nonzero padding bits in the last meta byte"
    return None


# ----------------------------------------------------------------------------- unstructured


def bitmask_cols(k: int) -> int:
    return (k + 7) // 8


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [N, K] -> uint8 [N, ceil(K/8)], bit k % 8 of byte k // 8 (LSB first)."""
    n, k = mask.shape
    cols = bitmask_cols(k)
    m = torch.zeros(n, cols * 8, dtype=torch.uint8, device=mask.device)
    m[:, :k] = mask.to(torch.uint8)
    m = m.reshape(n, cols, 8)
    weights = (1 << torch.arange(8, device=mask.device)).to(torch.uint8)
    return (m * weights).sum(-1, dtype=torch.int32).to(torch.uint8).contiguous()


def unpack_bitmask(bitmask: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K/8)] -> bool [N, K] (inverse of pack_bitmask)."""
    n = bitmask.shape[0]
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (bitmask[..., None] >> shifts) & 1
    return bits.reshape(n, 8 * bitmask.shape[1])[:, :k].bool()  # N = 0 too


def compress_unstructured(w: torch.Tensor, mask: torch.Tensor):
    """Dense [N, K] and keep-mask bool [N, K] -> (bitmask uint8 [N, ceil(K/8)], values [nnz]
    in w's dtype, row_offsets int64 [N + 1])."""
    if w.dim() != 2 or mask.shape != w.shape or mask.dtype != torch.bool:
        raise ValueError(f"need a 2-D weight and a bool mask of its shape, got weight "
                         f"{tuple(w.shape)} and mask {mask.dtype} {tuple(mask.shape)}")
    counts = mask.sum(1)
    offsets = torch.zeros(w.shape[0] + 1, dtype=torch.int64, device=w.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return pack_bitmask(mask), w.detach()[mask].contiguous(), offsets


def decompress_unstructured(bitmask: torch.Tensor, values: torch.Tensor,
                            row_offsets: torch.Tensor, k: int) -> torch.Tensor:
    """-> dense [N, K] in values' dtype. Raises ValueError when the tensors are inconsistent
    (``unstructured_problem``)."""
    mask = unpack_bitmask(bitmask, k)
    dense = torch.zeros(bitmask.shape[0], k, dtype=values.dtype, device=values.device)
    if torch.compiler.is_compiling():
        # traced (a compiled backward decompresses the weight): the checks below read values
        # (a graph break, which fullgraph=True refuses), and the layer checked its tensors
        # when it was built or loaded; masked_scatter has no data-dependent output shape
        return dense.masked_scatter(mask, values)
    counts = mask.sum(1)
    off = row_offsets.to(torch.int64)
    consistent = (values.dim() == 1 and off.shape == (bitmask.shape[0] + 1,)
                  and int(off[0]) == 0 and torch.equal(off[1:] - off[:-1], counts)
                  and int(off[-1]) == values.numel()
                  and (k % 8 == 0 or bitmask.shape[0] == 0
                       or not bool((bitmask[:, -1] >> (k % 8)).any())))
    if not consistent:
        why = unstructured_problem(bitmask, values, row_offsets, k) or "inconsistent shapes"
        raise ValueError(f"inconsistent unstructured sparse weight: {why}")
    dense[mask] = values
    return dense


def unstructured_problem(bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                         k: int) -> Optional[str]:
    """None when the three tensors are a consistent unstructured weight of K columns, else
    what is wrong: offsets start at 0, never decrease, step by each row's popcount and end at
    the number of values; no bit is set at k >= K."""
    n = bitmask.shape[0]
    if row_offsets.shape != (n + 1,) or values.dim() != 1:
        return (f"row_offsets {tuple(row_offsets.shape)} must be ({n + 1},) and values 1-D, "
                f"got values {tuple(values.shape)}")
    if n and k % 8:
        extra = int((bitmask[:, -1] >> (k % 8)).count_nonzero())
        if extra:
            return f"{extra} row(s) have bits set beyond K={k}"
    off = row_offsets.to(torch.int64)
    if int(off[0]) != 0:
        return f"row_offsets[0] = {int(off[0])}, expected 0"
    steps = off[1:] - off[:-1]
    if bool((steps < 0).any()):
        r = int((steps < 0).nonzero()[0])
        return f"row_offsets decrease at row {r} ({int(off[r])} -> {int(off[r + 1])})"
    counts = unpack_bitmask(bitmask, k).sum(1)
    if not torch.equal(steps, counts.to(torch.int64)):
        r = int((steps != counts).nonzero()[0])
        return (f"row {r} has {int(counts[r])} bit(s) set in the bitmask but row_offsets give "
                f"it {int(steps[r])} value(s)")
    if int(off[-1]) != values.numel():
        return f"row_offsets[-1] = {int(off[-1])} but there are {values.numel()} values"
    return None


# ----------------------------------------------------------------------------- 2:4 + int


def quantize_24_int8(values: torch.Tensor):
    """Kept values [N, K/2] -> (int8 [N, K/2], scale float32 [N]) (formats int8 per channel)."""
    return formats.quantize_int8_per_channel(values)


def quantize_24_int4(values: torch.Tensor, group_size: int, symmetric: bool = False):
    """Kept values [N, K/2] -> (packed uint8 [N, K/4], scales [N, K/2/G], zeros [N, K/2/G])."""
    codes, scales, zeros = formats.quantize_int4_groupwise(values, group_size, symmetric)
    return formats.pack_int4(codes), scales, zeros
