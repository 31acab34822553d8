"""Triton kernels of ``int8_dynamic_mm`` (W8A8): x is quantized per row (token) to int8 at run
time, multiplied with the int8 weight in exact int32 arithmetic, and scaled in the epilogue:

    s[m] = max|x[m]| / 127 (1 for an all-zero row),  xq = clamp(rint(x / s), -127, 127)
    y[m, n] = float32(sum_k xq[m, k] * w[n, k]) * (s[m] * w_scale[n]) + bias[n]

The codes are bit-identical to ``formats.quantize_rows_int8`` (fp32 amax, correctly rounded
division via ``tl.div_rn`` -- Triton's ``/`` is the approximate ``div.full.f32`` -- and round
half to even), so the result equals ``reference.int8_dynamic_mm`` up to FMA contraction of
the epilogue. The int32 accumulator is exact for K <= 133143 (K * 127 * 127 < 2**31).

Paths (chosen per (M bucket, N, K) by the autotuner):

gemv   decode, M <= 16: one kernel, quantization fused. Each program recomputes its row's
       amax (K values of one row, L2-resident) rather than paying a separate quantization
       launch, which at M = 1 costs more than the whole matmul. Integer products and sums on
       CUDA cores (IMAD), reduced once after the K loop.
tiled  prefill: a quantization kernel (one program per row, two passes over the row) writes
       xq int8 [M, K] and s float32 [M], then int8 x int8 -> int32 tensor-core MMA
       (``tl.dot`` on int8 operands; mma.sync s8 on Ampere, wgmma s8 on Hopper -- both need
       the K-contiguous operands that W [N, K] and xq [M, K] are). SWAP_AB computes out^T for
       small M so that M sits in the MMA's narrow N slot.

Both split K when the output tiles alone cannot fill the GPU: int32 partials go to a
[SPLIT_K, M, N] workspace and one reduction kernel sums them exactly, in a fixed order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _autotune
from ._common import (cdiv, finish_tile, round_half_even, row_sum, run_linear,
                      splitk_reduce, store_partial, tile_ids, vec_max_nan)

OP = "int8_dynamic_mm"
K_MAX = 133143  # K * 127 * 127 < 2**31: the int32 accumulator cannot overflow


@triton.jit
def _row_scale(x_row, stride_xk, K, BLOCK_K: tl.constexpr):
    """s = max|x_row| / 127 (1 for a zero row), NaN-propagating like torch.amax."""
    offs = tl.arange(0, BLOCK_K)
    amax = tl.full((BLOCK_K,), 0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs
        v = tl.load(x_row + kk * stride_xk, mask=kk < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
    s = tl.div_rn(vec_max_nan(amax), 127.0)
    return tl.where(s == 0.0, 1.0, s)


@triton.jit
def _quantize(v, s):
    q = round_half_even(tl.div_rn(v.to(tl.float32), s))
    return tl.minimum(tl.maximum(q, -127.0), 127.0)


@triton.jit
def _quant_rows_kernel(x_ptr, xq_ptr, xs_ptr, K, stride_xm, stride_xk,
                       BLOCK_K: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + m * stride_xm
    s = _row_scale(x_row, stride_xk, K, BLOCK_K)
    tl.store(xs_ptr + m, s)
    offs = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs
        v = tl.load(x_row + kk * stride_xk, mask=kk < K, other=0.0)
        tl.store(xq_ptr + m * K + kk, _quantize(v, s).to(tl.int8), mask=kk < K)


@triton.jit
def _tiled_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, M, N, K,
                  stride_wn, stride_wk, stride_om, stride_on,
                  HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr,
                  EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = xq_ptr + (offs_m % M).to(tl.int64) * K  # xq is ours: contiguous [M, K]
    w_rows = w_ptr + (offs_n % N).to(tl.int64) * stride_wn
    n_tiles = cdiv(K, BLOCK_K)
    if SWAP_AB:
        acc = tl.full((BLOCK_N, BLOCK_M), 0, dtype=tl.int32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.int32)
    for t in range(pid_k, n_tiles, SPLIT_K):
        kk = t * BLOCK_K + offs_k
        if SWAP_AB:
            xp = x_rows[None, :] + kk[:, None]
            wp = w_rows[:, None] + kk[None, :] * stride_wk
            if EVEN_K:
                xt = tl.load(xp)
                wt = tl.load(wp)
            else:
                xt = tl.load(xp, mask=kk[:, None] < K, other=0)
                wt = tl.load(wp, mask=kk[None, :] < K, other=0)
            acc = tl.dot(wt, xt, acc, out_dtype=tl.int32)
        else:
            xp = x_rows[:, None] + kk[None, :]
            wp = w_rows[None, :] + kk[:, None] * stride_wk
            if EVEN_K:
                xt = tl.load(xp)
                wt = tl.load(wp)
            else:
                xt = tl.load(xp, mask=kk[None, :] < K, other=0)
                wt = tl.load(wp, mask=kk[:, None] < K, other=0)
            acc = tl.dot(xt, wt, acc, out_dtype=tl.int32)
    finish_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on, xs_ptr, ws_ptr,
                b_ptr, part_ptr, pid_k, True, True, HAS_BIAS, SWAP_AB, SPLIT_K)


@triton.jit
def _gemv_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, M, N, K,
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
    # The scale needs the whole row, whatever part of K this split covers.
    s = _row_scale(x_row, stride_xk, K, BLOCK_K)
    n_tiles = cdiv(K, BLOCK_K)
    acc = tl.full((BLOCK_N, BLOCK_K), 0, dtype=tl.int32)
    for t in range(pid_k, n_tiles, SPLIT_K):
        kk = t * BLOCK_K + offs_k
        if EVEN_K:
            xv = tl.load(x_row + kk * stride_xk)
            wv = tl.load(w_rows + kk[None, :] * stride_wk)
        else:
            xv = tl.load(x_row + kk * stride_xk, mask=kk < K, other=0.0)
            wv = tl.load(w_rows + kk[None, :] * stride_wk, mask=kk[None, :] < K, other=0)
        acc += wv.to(tl.int32) * _quantize(xv, s).to(tl.int32)[None, :]
    y = row_sum(acc)
    m1 = tl.full((BLOCK_N,), 0, dtype=tl.int32) + m
    if SPLIT_K == 1:
        nmask = offs_n < N
        ws = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
        yf = y.to(tl.float32) * (s * ws)
        if HAS_BIAS:
            yf = yf + tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + m.to(tl.int64) * stride_om + offs_n * stride_on,
                 yf.to(out_ptr.dtype.element_ty), mask=nmask)
    else:
        # Every program of row m computed the same s; one of them publishes it for the
        # reduction's epilogue.
        tl.store(xs_ptr + m, s, mask=(pid_n == 0) & (pid_k == 0))
        store_partial(y, m1, offs_n, M, N, part_ptr, pid_k)


# ------------------------------------------------------------------------------ host side


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 quantization on the GPU (or the interpreter): (xq int8 [M, K], s [M])."""
    m, k = x2.shape
    xq = torch.empty((m, k), device=x2.device, dtype=torch.int8)
    xs = torch.empty((m,), device=x2.device, dtype=torch.float32)
    if m:
        bk = min(2048, triton.next_power_of_2(max(k, 16)))
        _quant_rows_kernel[(m,)](x2, xq, xs, k, x2.stride(0), x2.stride(1), BLOCK_K=bk,
                                 num_warps=4 if bk >= 512 else 1)
    return xq, xs


def launch(x2, w, w_scale, bias, out, config: dict) -> None:
    m, k = x2.shape
    n = w.shape[0]
    s = int(config.get("SPLIT_K", 1))
    part = torch.empty((s, m, n), device=x2.device, dtype=torch.int32) if s > 1 else out
    b = bias if bias is not None else out
    common = dict(HAS_BIAS=bias is not None, SPLIT_K=s, num_warps=config["num_warps"],
                  num_stages=config["num_stages"])
    if config["path"] == "gemv":
        bn, bk = config["BLOCK_N"], config["BLOCK_K"]
        xs = torch.empty((m,), device=x2.device, dtype=torch.float32) if s > 1 else w_scale
        _gemv_kernel[(m, triton.cdiv(n, bn), s)](
            x2, xs, w, w_scale, b, out, part, m, n, k, x2.stride(0), x2.stride(1),
            w.stride(0), w.stride(1), out.stride(0), out.stride(1),
            EVEN_K=k % bk == 0, BLOCK_N=bn, BLOCK_K=bk, **common)
    else:
        xq, xs = quantize_rows(x2)
        bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), s)
        _tiled_kernel[grid](
            xq, xs, w, w_scale, b, out, part, m, n, k, w.stride(0), w.stride(1),
            out.stride(0), out.stride(1), SWAP_AB=bool(config.get("SWAP_AB", False)),
            EVEN_K=k % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            GROUP_M=config.get("GROUP_M", 8), **common)
    if s > 1:
        splitk_reduce(part, out, xs, w_scale, bias)


def default_config(m: int, n: int, k: int, sms: int) -> dict:
    if m <= 4:
        bn, bk = 16, 256
        return dict(path="gemv", BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=2,
                    SPLIT_K=_autotune.split_k(m * triton.cdiv(n, bn), triton.cdiv(k, bk), sms,
                                              per_sm=4))
    if m <= 64:
        bm = max(16, triton.next_power_of_2(m))
        bn, bk = 64, 128
        return dict(path="tiled", SWAP_AB=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                    num_warps=4, num_stages=4,
                    SPLIT_K=_autotune.split_k(triton.cdiv(n, bn), triton.cdiv(k, bk), sms))
    if k % 16:  # weight rows not 16-byte aligned: no async copies, so big tiles spill registers
        return dict(path="tiled", SWAP_AB=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8,
                    SPLIT_K=1, num_warps=4, num_stages=2)
    return dict(path="tiled", SWAP_AB=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8,
                SPLIT_K=1, num_warps=8, num_stages=3)


def candidates(m: int, n: int, k: int, sms: int) -> list:
    mb = _autotune.m_bucket(m)
    out = []
    if mb <= 16:
        for bn, bk in ((16, 256), (16, 512), (32, 256), (32, 512), (64, 256)):
            for s in _autotune.split_choices(m * triton.cdiv(n, bn), triton.cdiv(k, bk), sms):
                out.append(dict(path="gemv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s, num_warps=4,
                                num_stages=2))
    bm = max(16, min(mb, 64))
    # Swapped MMA tiles at M = 1 too (see int8_weight_only_mm.candidates).
    for bn, bk, w, st in _autotune.SWAP_TILES + (_autotune.DECODE_SWAP_TILES if mb <= 16 else ()):
        s = _autotune.split_k(triton.cdiv(m, bm) * triton.cdiv(n, bn), triton.cdiv(k, bk), sms)
        out.append(dict(path="tiled", SWAP_AB=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                        GROUP_M=8, SPLIT_K=s, num_warps=w, num_stages=st))
    if mb >= 64:
        for bm, bn, bk, w, st in ((128, 128, 128, 8, 3), (128, 256, 128, 8, 3),
                                  (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
                                  (256, 128, 128, 8, 3), (128, 128, 64, 8, 4)):
            out.append(dict(path="tiled", SWAP_AB=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                            GROUP_M=8, SPLIT_K=1, num_warps=w, num_stages=st))
        # Few output tiles (small N, M in the hundreds): split K so that every SM has work.
        for bm, bn, bk, w, st in ((128, 128, 128, 8, 3), (64, 128, 128, 4, 4)):
            s = _autotune.split_k(triton.cdiv(m, bm) * triton.cdiv(n, bn), triton.cdiv(k, bk),
                                  sms)
            if s > 1:
                out.append(dict(path="tiled", SWAP_AB=False, BLOCK_M=bm, BLOCK_N=bn,
                                BLOCK_K=bk, GROUP_M=8, SPLIT_K=s, num_warps=w, num_stages=st))
    return out


def _interpreted() -> bool:
    return type(_tiled_kernel).__name__ == "InterpretedFunction"


def choose(x2, n: int, k: int, run) -> dict:
    m = x2.shape[0]
    sms = _autotune.sm_count(x2.device)
    default = default_config(m, n, k, sms)
    if x2.device.type != "cuda" or _interpreted():
        return default
    key = _autotune.make_key(OP, x2.dtype, m, n, k)
    return _autotune.tune(x2.device, key, candidates(m, n, k, sms), run, default)


def int8_dynamic_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias=None,
                    config: dict | None = None) -> torch.Tensor:
    n, k = w.shape
    if k > K_MAX:
        raise ValueError(
            f"int8_dynamic_mm (triton): K={k} > {K_MAX} could overflow the int32 accumulator "
            f"(K * 127 * 127 >= 2**31); split the layer along K or use the reference backend"
        )
    w_scale = w_scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    return run_linear(x, n, k, bias,
                      lambda x2, out, c: launch(x2, w, w_scale, bias, out, c),
                      lambda x2, run: choose(x2, n, k, run), config)
