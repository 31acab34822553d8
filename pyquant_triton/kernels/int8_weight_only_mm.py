"""Triton kernels of ``int8_weight_only_mm``: y = x @ (w * w_scale[:, None]).T + bias.

w int8 [N, K] (canonical, formats.py; any strides), w_scale float32 [N], x float16 / bfloat16 /
float32 [M, K] (any strides). The weight codes are converted to the activation dtype inside the
K loop (exact: |code| <= 127 fits every float type), multiplied on tensor cores with fp32
accumulation, and the per-channel scale and bias are applied once in the epilogue; so the only
difference from the fp32 reference is the summation order (plus the one rounding to the output
dtype).

Two paths, chosen per (M bucket, N, K) by the autotuner (pyquant_triton/kernels/_autotune.py):

gemv   decode, M <= 16: one program per (row m, BLOCK_N outputs, K split). No tensor cores:
       at M = 1 a [16, K] MMA tile would waste 15/16 of its work, and the op is bound by weight
       bytes anyway. Products and sums in fp32 on CUDA cores; a [BLOCK_N, BLOCK_K] accumulator
       is reduced once after the K loop (one cross-lane reduction per output, not per tile).
       Row m is the fastest grid axis, so the programs of one weight tile run together and
       M > 1 re-reads it from L2, not HBM.
tiled  prefill: MMA tiles with grouped tile order. SWAP_AB computes out^T = W x^T: the
       converted weight tile is then the MMA's A operand, which Hopper's wgmma takes straight
       from registers (no shared-memory round trip for the converted weights), and a small M
       sits in the MMA's narrow N slot (>= 8) instead of padding M to 64.

Both paths split K (SPLIT_K > 1) when the output tiles alone cannot fill the GPU (decode,
small N): each split writes an fp32 partial to a [SPLIT_K, M, N] workspace and one reduction
kernel sums them in a fixed order and runs the epilogue (deterministic, unlike atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _autotune
from ._common import (cdiv, dot_precision, epilogue_store, finish_tile, row_sum, run_linear,
                      splitk_reduce, store_partial, tile_ids)

OP = "int8_weight_only_mm"


@triton.jit
def _tiled_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, M, N, K,
                  stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                  HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr,
                  EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    DT = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Edge tiles wrap around instead of masking M/N: loads stay in bounds and unmasked (so
    # they vectorize), the epilogue masks the store.
    x_rows = x_ptr + (offs_m % M).to(tl.int64) * stride_xm
    w_rows = w_ptr + (offs_n % N).to(tl.int64) * stride_wn
    n_tiles = cdiv(K, BLOCK_K)
    if SWAP_AB:
        acc = tl.full((BLOCK_N, BLOCK_M), 0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.float32)
    for t in range(pid_k, n_tiles, SPLIT_K):
        kk = t * BLOCK_K + offs_k
        if SWAP_AB:
            xp = x_rows[None, :] + kk[:, None] * stride_xk  # x^T tile [BK, BM]
            wp = w_rows[:, None] + kk[None, :] * stride_wk  # w tile [BN, BK]
            if EVEN_K:
                xt = tl.load(xp)
                wt = tl.load(wp)
            else:
                xt = tl.load(xp, mask=kk[:, None] < K, other=0.0)
                wt = tl.load(wp, mask=kk[None, :] < K, other=0)
            acc = tl.dot(wt.to(DT), xt, acc, input_precision=DOT_PREC)
        else:
            xp = x_rows[:, None] + kk[None, :] * stride_xk  # x tile [BM, BK]
            wp = w_rows[None, :] + kk[:, None] * stride_wk  # w^T tile [BK, BN]
            if EVEN_K:
                xt = tl.load(xp)
                wt = tl.load(wp)
            else:
                xt = tl.load(xp, mask=kk[None, :] < K, other=0.0)
                wt = tl.load(wp, mask=kk[:, None] < K, other=0)
            acc = tl.dot(xt, wt.to(DT), acc, input_precision=DOT_PREC)
    finish_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on, ws_ptr, ws_ptr,
                b_ptr, part_ptr, pid_k, False, True, HAS_BIAS, SWAP_AB, SPLIT_K)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, M, N, K,
                 stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    w_rows = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_wn
    n_tiles = cdiv(K, BLOCK_K)
    acc = tl.full((BLOCK_N, BLOCK_K), 0, dtype=tl.float32)
    for t in range(pid_k, n_tiles, SPLIT_K):
        kk = t * BLOCK_K + offs_k
        if EVEN_K:
            xv = tl.load(x_row + kk * stride_xk)
            wv = tl.load(w_rows + kk[None, :] * stride_wk)
        else:
            xv = tl.load(x_row + kk * stride_xk, mask=kk < K, other=0.0)
            wv = tl.load(w_rows + kk[None, :] * stride_wk, mask=kk[None, :] < K, other=0)
        acc += wv.to(tl.float32) * xv.to(tl.float32)[None, :]
    y = row_sum(acc)
    m1 = tl.full((BLOCK_N,), 0, dtype=tl.int32) + m
    if SPLIT_K == 1:
        epilogue_store(y, m1, offs_n, M, N, out_ptr, stride_om, stride_on, ws_ptr, ws_ptr, b_ptr,
                       False, True, HAS_BIAS)
    else:
        store_partial(y, m1, offs_n, M, N, part_ptr, pid_k)


# ------------------------------------------------------------------------------ host side


def launch(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias, out: torch.Tensor,
           config: dict) -> None:
    """Run one config: x2 [M, K], out [M, N] (contiguous), every size > 0."""
    m, k = x2.shape
    n = w.shape[0]
    s = int(config.get("SPLIT_K", 1))
    part = torch.empty((s, m, n), device=x2.device, dtype=torch.float32) if s > 1 else out
    b = bias if bias is not None else out
    common = dict(HAS_BIAS=bias is not None, SPLIT_K=s, num_warps=config["num_warps"],
                  num_stages=config["num_stages"])
    if config["path"] == "gemv":
        bn, bk = config["BLOCK_N"], config["BLOCK_K"]
        _gemv_kernel[(m, triton.cdiv(n, bn), s)](
            x2, w, w_scale, b, out, part, m, n, k, x2.stride(0), x2.stride(1),
            w.stride(0), w.stride(1), out.stride(0), out.stride(1),
            EVEN_K=k % bk == 0, BLOCK_N=bn, BLOCK_K=bk, **common)
    else:
        bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), s)
        _tiled_kernel[grid](
            x2, w, w_scale, b, out, part, m, n, k, x2.stride(0), x2.stride(1),
            w.stride(0), w.stride(1), out.stride(0), out.stride(1),
            SWAP_AB=bool(config.get("SWAP_AB", False)), EVEN_K=k % bk == 0, BLOCK_M=bm,
            BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config.get("GROUP_M", 8),
            DOT_PREC=dot_precision(x2.dtype), **common)
    if s > 1:
        splitk_reduce(part, out, None, w_scale, bias)


def default_config(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> dict:
    """The heuristic config (no tuning): gemv at M = 1 (fp32 activations: up to M = 4),
    swapped MMA tiles up to M = 64 (16 x 32 x 256 with 4 stages up to M = 16: what the tuner
    picked at M = 4 and 16 on all seven shapes of pyquant.bench_cuda on an H200), 128 x 128
    tiles above (fp32: 64 x 64, see ``F32_TILES``)."""
    if m == 1 or (m <= 4 and dtype == torch.float32):
        bn, bk = 16, 256
        return dict(path="gemv", BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=2,
                    SPLIT_K=_autotune.split_k(m * triton.cdiv(n, bn), triton.cdiv(k, bk), sms,
                                              per_sm=4))
    if dtype == torch.float32:
        return _tiled(m, n, k, *F32_TILES[0], sms)
    if m <= 16:
        return _tiled(m, n, k, 16, 32, 256, 4, 4, True, sms)
    if m <= 64:
        bm = max(16, triton.next_power_of_2(m))
        return _tiled(m, n, k, bm, 64, 128, 4, 3, True, sms)
    if k % 16:  # weight rows not 16-byte aligned: no async copies, so big tiles spill registers
        return _tiled(m, n, k, 64, 64, 64, 4, 2, False, sms, split=False)
    return _tiled(m, n, k, 128, 128, 64, 8, 3, False, sms, split=False)


# fp32 activations multiply with input_precision="ieee" (no TF32), which Triton lowers to
# CUDA-core FMA loops: large tiles spill registers there, so fp32 gets small tiles only.
F32_TILES = ((32, 64, 32, 4, 3, True), (64, 64, 32, 4, 3, True), (16, 64, 32, 4, 3, True),
             (64, 32, 32, 4, 3, False))


_tiled = _autotune.tiled_config


def candidates(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> list:
    """The autotuning space for one (M bucket, N, K): ~8-12 configs."""
    mb = _autotune.m_bucket(m)
    out = []
    if mb <= 16:
        for bn, bk in ((16, 256), (16, 512), (32, 256), (32, 512), (64, 256)):
            for s in _autotune.split_choices(m * triton.cdiv(n, bn), triton.cdiv(k, bk), sms):
                out.append(dict(path="gemv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s, num_warps=4,
                                num_stages=2))
    if dtype == torch.float32:
        if mb >= 2:
            out += [_tiled(m, n, k, *t, sms) for t in F32_TILES]
        return out
    bm = max(16, min(mb, 64))
    # Swapped MMA tiles at M = 1 too: the tensor cores take the multiply-adds off the CUDA
    # cores, and loads that feed a tl.dot are software-pipelined (those of gemv are not).
    for bn, bk, w, st in _autotune.SWAP_TILES + (_autotune.DECODE_SWAP_TILES if mb <= 16 else ()):
        out.append(_tiled(m, n, k, bm, bn, bk, w, st, True, sms))
    if mb >= 64:
        for bm, bn, bk, w, st, swap in ((128, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, False),
                                        (64, 128, 64, 4, 4, False), (128, 64, 64, 4, 4, False),
                                        (128, 128, 64, 8, 3, True)):
            # (256, 128, 64, 8 warps, swapped) gave wrong results on an H200 with Triton 3.6.
            out.append(_tiled(m, n, k, bm, bn, bk, w, st, swap, sms, split=False))
        # Few output tiles (small N, M in the hundreds): split K so that every SM has work.
        c = _tiled(m, n, k, 128, 128, 64, 8, 3, False, sms)
        if c["SPLIT_K"] > 1:
            out.append(c)
    return out


def choose(x2, n: int, k: int, run) -> dict:
    m = x2.shape[0]
    sms = _autotune.sm_count(x2.device)
    default = default_config(m, n, k, x2.dtype, sms)
    if x2.device.type != "cuda" or _interpreted():
        return default
    key = _autotune.make_key(OP, x2.dtype, m, n, k)
    return _autotune.tune(x2.device, key, candidates(m, n, k, x2.dtype, sms), run, default)


def _interpreted() -> bool:
    return type(_tiled_kernel).__name__ == "InterpretedFunction"


def int8_weight_only_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias=None,
                        config: dict | None = None) -> torch.Tensor:
    """The op on already-checked arguments (ops.py checks them). ``config`` forces one
    kernel config (tests); None picks the tuned (or heuristic) one."""
    n, k = w.shape
    w_scale = w_scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    return run_linear(x, n, k, bias,
                      lambda x2, out, c: launch(x2, w, w_scale, bias, out, c),
                      lambda x2, run: choose(x2, n, k, run), config)
