"""Triton kernels of the 2:4 sparse ops (layout: pyquant/sparse_formats.py):

    sparse24_mm       kept values float32 / bfloat16 / float16 [N, K/2]
    sparse24_int8_mm  kept values int8 [N, K/2] times a float32 scale [N] per output row

with 2-bit positions meta uint8 [N, ceil(K/8)] and float activations x [M, K] (any strides).
Both read only the compressed weight: K/2 values plus K/8 meta bytes per row, so at decode,
where the op is bound by weight bytes, they move about half (float) or 5/8 (int8) of what the
dense layer moves.

gemv   decode, M <= 16: one program per (row m, BLOCK_N outputs, K split). It walks the kept
       slots, gathers x at each slot's column (4 * (slot // 2) + position) and multiplies in
       fp32 on CUDA cores: no zero is ever multiplied. x is one row, so the gather hits L1.
tiled  prefill: MMA tiles. Each [BLOCK_N, BLOCK_K] weight tile is expanded in registers from
       its compressed values and meta into the dense tile (zeros at pruned columns), converted
       to the activation dtype and multiplied on tensor cores with fp32 accumulation. Triton
       has no sparse-MMA (mma.sp) instruction, so prefill does dense math; what it saves is
       the weight bytes. SWAP_AB as in int8_weight_only_mm.py.

Arithmetic: the expanded weight of a column is the sum of the kept values whose position
points at it, which is what ``sparse_formats.decompress_24`` (the reference) computes for any
meta bytes, canonical or not. Float values are converted to the activation dtype for the MMA
(exact when they are stored in it, which is what ``sparsify_`` does: the layer keeps its
dtype); int8 values convert exactly, and their scale and the bias are applied once in the
epilogue. Split-K and the epilogue are those of pyquant_triton/kernels/_common.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _autotune
from ._common import (cdiv, dot_precision, epilogue_store, finish_tile, row_sum, run_linear,
                      splitk_reduce, store_partial, tile_ids)

OPS = ("sparse24_mm", "sparse24_int8_mm")


@triton.jit
def _expand(v_rows, m_rows, kk, kmask, stride_vk, stride_mk, DT: tl.constexpr):
    """The dense weights at columns ``kk`` of the rows whose values start at ``v_rows`` and
    whose meta bytes start at ``m_rows`` (broadcastable index tensors, any orientation), in
    DT. Group j = k // 4 keeps slots 2j and 2j + 1, whose positions are the low and high
    2 bits of nibble j % 2 of meta byte j // 2."""
    j = kk // 4
    nib = (tl.load(m_rows + (j // 2) * stride_mk, mask=kmask, other=0).to(tl.int32)
           >> ((j % 2) * 4)) & 15
    pos = kk % 4
    v0 = tl.load(v_rows + (2 * j) * stride_vk, mask=kmask, other=0).to(DT)
    v1 = tl.load(v_rows + (2 * j + 1) * stride_vk, mask=kmask, other=0).to(DT)
    return (tl.where((nib & 3) == pos, v0, 0.0).to(DT)
            + tl.where((nib >> 2) == pos, v1, 0.0).to(DT))


@triton.jit
def _tiled_kernel(x_ptr, v_ptr, meta_ptr, cs_ptr, b_ptr, out_ptr, part_ptr, M, N, K,
                  stride_xm, stride_xk, stride_vn, stride_vk, stride_mn, stride_mk,
                  stride_om, stride_on,
                  HAS_CS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                  SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    DT = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Edge tiles wrap around instead of masking M/N (as in int8_weight_only_mm.py).
    x_rows = x_ptr + (offs_m % M).to(tl.int64) * stride_xm
    n_safe = (offs_n % N).to(tl.int64)
    v_rows = v_ptr + n_safe * stride_vn
    m_rows = meta_ptr + n_safe * stride_mn
    n_tiles = cdiv(K, BLOCK_K)
    if SWAP_AB:
        acc = tl.full((BLOCK_N, BLOCK_M), 0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.float32)
    for t in range(pid_k, n_tiles, SPLIT_K):
        kk = t * BLOCK_K + offs_k
        if SWAP_AB:
            xp = x_rows[None, :] + kk[:, None] * stride_xk  # x^T tile [BK, BM]
            if EVEN_K:
                xt = tl.load(xp)
            else:
                xt = tl.load(xp, mask=kk[:, None] < K, other=0.0)
            wt = _expand(v_rows[:, None], m_rows[:, None], kk[None, :], kk[None, :] < K,
                         stride_vk, stride_mk, DT)  # [BN, BK]
            acc = tl.dot(wt, xt, acc, input_precision=DOT_PREC)
        else:
            xp = x_rows[:, None] + kk[None, :] * stride_xk  # x tile [BM, BK]
            if EVEN_K:
                xt = tl.load(xp)
            else:
                xt = tl.load(xp, mask=kk[None, :] < K, other=0.0)
            wt = _expand(v_rows[None, :], m_rows[None, :], kk[:, None], kk[:, None] < K,
                         stride_vk, stride_mk, DT)  # w^T tile [BK, BN]
            acc = tl.dot(xt, wt, acc, input_precision=DOT_PREC)
    finish_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on, cs_ptr, cs_ptr,
                b_ptr, part_ptr, pid_k, False, HAS_CS, HAS_BIAS, SWAP_AB, SPLIT_K)


@triton.jit
def _gemv_kernel(x_ptr, v_ptr, meta_ptr, cs_ptr, b_ptr, out_ptr, part_ptr, M, N, K,
                 stride_xm, stride_xk, stride_vn, stride_vk, stride_mn, stride_mk,
                 stride_om, stride_on,
                 HAS_CS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """BLOCK_S kept slots (2 * BLOCK_S dense columns) per iteration."""
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    n_safe = (offs_n % N).to(tl.int64)[:, None]
    v_rows = v_ptr + n_safe * stride_vn
    m_rows = meta_ptr + n_safe * stride_mn
    S = K // 2
    acc = tl.full((BLOCK_N, BLOCK_S), 0, dtype=tl.float32)
    for t in range(pid_k, cdiv(S, BLOCK_S), SPLIT_K):
        s = (t * BLOCK_S + offs_s)[None, :]
        smask = s < S
        byte = tl.load(m_rows + (s // 4) * stride_mk, mask=smask, other=0).to(tl.int32)
        col = 4 * (s // 2) + ((byte >> ((s % 4) * 2)) & 3)
        xv = tl.load(x_row + col * stride_xk, mask=smask, other=0.0)
        wv = tl.load(v_rows + s * stride_vk, mask=smask, other=0)
        acc += wv.to(tl.float32) * xv.to(tl.float32)
    y = row_sum(acc)
    m1 = tl.full((BLOCK_N,), 0, dtype=tl.int32) + m
    if SPLIT_K == 1:
        epilogue_store(y, m1, offs_n, M, N, out_ptr, stride_om, stride_on, cs_ptr, cs_ptr, b_ptr,
                       False, HAS_CS, HAS_BIAS)
    else:
        store_partial(y, m1, offs_n, M, N, part_ptr, pid_k)


# ------------------------------------------------------------------------------ host side


def launch(x2: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, scale, bias,
           out: torch.Tensor, config: dict) -> None:
    """Run one config: x2 [M, K], out [M, N] (contiguous), every size > 0. ``scale``: the
    per-row float32 scale of int8 values, None for float values."""
    m, k = x2.shape
    n = values.shape[0]
    s = int(config.get("SPLIT_K", 1))
    part = torch.empty((s, m, n), device=x2.device, dtype=torch.float32) if s > 1 else out
    b = bias if bias is not None else out
    cs = scale if scale is not None else out
    args = (x2, values, meta, cs, b, out, part, m, n, k, x2.stride(0), x2.stride(1),
            values.stride(0), values.stride(1), meta.stride(0), meta.stride(1),
            out.stride(0), out.stride(1))
    common = dict(HAS_CS=scale is not None, HAS_BIAS=bias is not None, SPLIT_K=s,
                  num_warps=config["num_warps"], num_stages=config["num_stages"])
    if config["path"] == "gemv":
        bn, bs = config["BLOCK_N"], config["BLOCK_S"]
        _gemv_kernel[(m, triton.cdiv(n, bn), s)](*args, BLOCK_N=bn, BLOCK_S=bs, **common)
    else:
        bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), s)
        _tiled_kernel[grid](*args, SWAP_AB=bool(config.get("SWAP_AB", False)),
                            EVEN_K=k % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                            GROUP_M=config.get("GROUP_M", 8), DOT_PREC=dot_precision(x2.dtype),
                            **common)
    if s > 1:
        splitk_reduce(part, out, None, scale, bias)


_tiled = _autotune.tiled_config


# fp32 activations multiply with input_precision="ieee" on CUDA cores: small tiles only (as in
# int8_weight_only_mm.py).
F32_TILES = ((32, 64, 32, 4, 3, True), (64, 64, 32, 4, 3, True), (16, 64, 32, 4, 3, True))


def default_config(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> dict:
    """The heuristic config (no tuning): gemv for M <= 4, swapped MMA tiles up to M = 64,
    128 x 128 tiles above (fp32: 64 x 64)."""
    if m <= 4:
        bn, bs = 16, 128
        return dict(path="gemv", BLOCK_N=bn, BLOCK_S=bs, num_warps=4, num_stages=2,
                    SPLIT_K=_autotune.split_k(m * triton.cdiv(n, bn), triton.cdiv(k // 2, bs),
                                              sms, per_sm=4))
    if dtype == torch.float32:
        return _tiled(m, n, k, *F32_TILES[0], sms)
    if m <= 64:
        return _tiled(m, n, k, max(16, triton.next_power_of_2(m)), 64, 128, 4, 3, True, sms)
    return _tiled(m, n, k, 128, 128, 64, 8, 3, False, sms, split=False)


def candidates(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> list:
    """The autotuning space for one (M bucket, N, K)."""
    mb = _autotune.m_bucket(m)
    out = []
    if mb <= 16:
        for bn, bs in ((16, 128), (16, 256), (32, 128), (32, 256), (64, 128)):
            for s in _autotune.split_choices(m * triton.cdiv(n, bn), triton.cdiv(k // 2, bs),
                                             sms):
                out.append(dict(path="gemv", BLOCK_N=bn, BLOCK_S=bs, SPLIT_K=s, num_warps=4,
                                num_stages=2))
    if dtype == torch.float32:
        if mb >= 2:
            out += [_tiled(m, n, k, *t, sms) for t in F32_TILES]
        return out
    bm = max(16, min(mb, 64))
    # Swapped MMA tiles at M = 1 too (see int8_weight_only_mm.candidates).
    tiles = ((64, 128, 4, 4), (128, 128, 4, 3), (64, 64, 4, 3))
    for bn, bk, w, st in tiles + (_autotune.DECODE_SWAP_TILES if mb <= 16 else ()):
        out.append(_tiled(m, n, k, bm, bn, bk, w, st, True, sms))
    if mb >= 64:
        for bm, bn, bk, w, st, swap in ((128, 128, 64, 8, 3, False), (64, 128, 64, 4, 4, False),
                                        (128, 64, 64, 4, 4, False), (128, 128, 64, 8, 3, True)):
            out.append(_tiled(m, n, k, bm, bn, bk, w, st, swap, sms, split=False))
    return out


def _interpreted() -> bool:
    return type(_tiled_kernel).__name__ == "InterpretedFunction"


def _run(op, x, values, meta, scale, bias, config):
    n, k = values.shape[0], 2 * values.shape[1]
    meta = meta if meta.stride(-1) == 1 else meta.contiguous()
    scale = None if scale is None else scale.contiguous()
    bias = None if bias is None else bias.contiguous()

    def choose(x2, run):
        m = x2.shape[0]
        sms = _autotune.sm_count(x2.device)
        default = default_config(m, n, k, x2.dtype, sms)
        if x2.device.type != "cuda" or _interpreted():
            return default
        key = _autotune.make_key(op, x2.dtype, m, n, k)
        return _autotune.tune(x2.device, key, candidates(m, n, k, x2.dtype, sms), run, default)

    return run_linear(x, n, k, bias,
                      lambda x2, out, c: launch(x2, values, meta, scale, bias, out, c),
                      choose, config)


def sparse24_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias=None,
                config: dict | None = None) -> torch.Tensor:
    """The op on already-checked arguments (ops.py checks them). ``config`` forces one
    kernel config (tests); None picks the tuned (or heuristic) one."""
    return _run("sparse24_mm", x, values, meta, None, bias, config)


def sparse24_int8_mm(x: torch.Tensor, values_q: torch.Tensor, meta: torch.Tensor,
                     scale: torch.Tensor, bias=None, config: dict | None = None) -> torch.Tensor:
    """As ``sparse24_mm`` with int8 kept values and their float32 scale per output row."""
    return _run("sparse24_int8_mm", x, values_q, meta, scale, bias, config)
