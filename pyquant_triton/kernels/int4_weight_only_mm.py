"""Triton kernels of ``int4_weight_only_mm``: y = x @ dequant(w_packed, scales, zeros).T + bias.

Canonical format (formats.py), read as stored, no repacking:
    w_packed uint8 [N, K/2]: byte j of row n = code[n, 2j] | code[n, 2j+1] << 4
    scales float32 [N, K/G], zeros uint8 [N, K/G]
    w[n, k] = scales[n, g] * (code[n, k] - zeros[n, g])
Symmetric and asymmetric weights share it (symmetric: zeros == 8), so one kernel serves both.

Dequantization happens inside the K loop, one group-aligned sub-tile at a time: ``code - zero``
is an integer in [-15, 15], exact in every activation dtype, so the MMA (or the CUDA-core FMA
of the gemv path) multiplies exact weights with fp32 accumulation; the group's fp32 scale is
applied to the sub-tile's fp32 partial sum, never rounded into a 16-bit weight. The result thus
differs from the fp32 reference only by summation order. Codes become floats by the
bit trick of ``_common.nibble_to_float`` (one OR instead of an int->float conversion).

A sub-tile (SUB_K values of K) lies inside one group: SUB_K is the largest power of two that
divides the group size, capped by the config's BLOCK_K; N_SUB sub-tiles (static, unrolled) make
one iteration, so the loads of several sub-tiles are in flight together and K per iteration
stays large for small groups (group 32: 4 x 32).

Paths (chosen per (M bucket, N, K, group) by the autotuner):

gemv32 decode, M <= 4, where the packed rows can be read as int32 words (``words_unfit``):
       like gemv, with the codes converted in place inside each word (``_gemv32_kernel``),
       about a third of gemv's integer work per code. It won the tuning at M = 1 on every
       shape of pyquant.bench_cuda on an H200 (1.04-1.23x gemv), and is the untuned default
       there; from M = 2 the swapped MMA tiles win.
gemv   decode, M <= 16 (and any M when the group size has no factor 32: the MMA needs
       SUB_K >= 32). One program per (row m, BLOCK_N outputs, K split); fp32 FMA on CUDA cores.
       The packed tile is [BLOCK_N, SUB_K/2] bytes, contiguous along K per row; x's even and
       odd elements are loaded as two stride-2 vectors that meet the low and high nibbles.
tiled  MMA tiles, two ways to meet the nibble order of the packed bytes:
       SWAP_AB=False  out = x W^T: x's even and odd columns are loaded separately (stride 2)
                      and  acc += dot(x_even, lo - z) + dot(x_odd, hi - z): no data movement
                      between registers, at the price of stride-2 (unvectorized) x loads.
       SWAP_AB=True   out^T = W x^T: the weight sub-tile is rebuilt in K order in registers
                      with tl.join(lo, hi) + reshape (the pair becomes the innermost
                      dimension, a register-local interleave), which makes it the MMA's A
                      operand -- Hopper's wgmma reads A from registers, so the dequantized
                      weights skip shared memory (the sm_90 PTX of this variant has no
                      shared-memory stores for them; SWAP_AB=False has) -- while x^T is
                      loaded contiguous along K (vectorized, pipelined). Small M also sits
                      in the MMA's narrow N slot. On Hopper this is expected to be the faster
                      one; the tuner decides.
Both split K for small grids (fp32 partials, deterministic reduction, see _common.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _autotune
from ._common import (dot_precision, epilogue_store, finish_tile, nibble_in_place,
                      nibble_to_float, row_sum, run_linear, splitk_reduce, store_partial, tile_ids,
                      zero_in_place)

OP = "int4_weight_only_mm"
MIN_TILED_SUB_K = 32  # the MMA's K per sub-tile: x_even/x_odd halves must be >= 16


@triton.jit
def _tiled_kernel(x_ptr, p_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, M, N, K, GROUP,
                  stride_xm, stride_xk, stride_pn, stride_pk, stride_sn, stride_sg,
                  stride_zn, stride_zg, stride_om, stride_on,
                  HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_K: tl.constexpr,
                  N_SUB: tl.constexpr, GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    DT = x_ptr.dtype.element_ty
    HALF: tl.constexpr = SUB_K // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = (offs_n % N).to(tl.int64)
    x_rows = x_ptr + (offs_m % M).to(tl.int64) * stride_xm
    p_rows = p_ptr + rn * stride_pn
    s_rows = s_ptr + rn * stride_sn
    z_rows = z_ptr + rn * stride_zn
    offs_h = tl.arange(0, HALF)
    offs_s = tl.arange(0, SUB_K)
    n_iter = K // (SUB_K * N_SUB)  # the host makes N_SUB divide K // SUB_K: no K masks
    if SWAP_AB:
        acc = tl.full((BLOCK_N, BLOCK_M), 0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=tl.float32)
    for it in range(pid_k, n_iter, SPLIT_K):
        for j in tl.static_range(N_SUB):
            k0 = (it * N_SUB + j) * SUB_K
            g = k0 // GROUP
            sc = tl.load(s_rows + g * stride_sg)
            zf = nibble_to_float(tl.load(z_rows + g * stride_zg), DT)
            if SWAP_AB:
                pk = tl.load(p_rows[:, None] + (k0 // 2 + offs_h)[None, :] * stride_pk)
                wlo = nibble_to_float(pk & 0xF, DT) - zf[:, None]
                whi = nibble_to_float(pk >> 4, DT) - zf[:, None]
                wt = tl.reshape(tl.join(wlo, whi), (BLOCK_N, SUB_K))  # k = 2j + (0: lo, 1: hi)
                xt = tl.load(x_rows[None, :] + (k0 + offs_s)[:, None] * stride_xk)
                part = tl.dot(wt, xt, input_precision=DOT_PREC)
                acc += part * sc[:, None]
            else:
                pk = tl.load(p_rows[None, :] + (k0 // 2 + offs_h)[:, None] * stride_pk)
                wlo = nibble_to_float(pk & 0xF, DT) - zf[None, :]
                whi = nibble_to_float(pk >> 4, DT) - zf[None, :]
                ke = k0 + 2 * offs_h
                xe = tl.load(x_rows[:, None] + ke[None, :] * stride_xk)
                xo = tl.load(x_rows[:, None] + (ke + 1)[None, :] * stride_xk)
                part = tl.dot(xe, wlo, input_precision=DOT_PREC)
                part = tl.dot(xo, whi, part, input_precision=DOT_PREC)
                acc += part * sc[None, :]
    finish_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on, b_ptr, b_ptr,
                b_ptr, part_ptr, pid_k, False, False, HAS_BIAS, SWAP_AB, SPLIT_K)


@triton.jit
def _gemv_program(x_ptr, w_ptr, s_ptr, z_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_zn,
                  BLOCK_N: tl.constexpr, SUB_K: tl.constexpr, N_SUB: tl.constexpr):
    """What a GEMV program (row m, BLOCK_N outputs, K split) works on: (m, its split, its
    outputs, x's row, the weight / scale / zero rows of its outputs, the K iterations). Edge
    outputs wrap around (loads stay in bounds and unmasked; the store masks)."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = (offs_n % N).to(tl.int64)
    return (m, tl.program_id(2), offs_n, x_ptr + m.to(tl.int64) * stride_xm,
            w_ptr + rn * stride_wn, s_ptr + rn * stride_sn, z_ptr + rn * stride_zn,
            K // (SUB_K * N_SUB))


@triton.jit
def _gemv_kernel(x_ptr, p_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, M, N, K, GROUP,
                 stride_xm, stride_xk, stride_pn, stride_pk, stride_sn, stride_sg,
                 stride_zn, stride_zg, stride_om, stride_on,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                 SUB_K: tl.constexpr, N_SUB: tl.constexpr):
    HALF: tl.constexpr = SUB_K // 2
    m, pid_k, offs_n, x_row, p_rows, s_rows, z_rows, n_iter = _gemv_program(
        x_ptr, p_ptr, s_ptr, z_ptr, N, K, stride_xm, stride_pn, stride_sn, stride_zn, BLOCK_N,
        SUB_K, N_SUB)
    p_rows = p_rows[:, None]
    offs_h = tl.arange(0, HALF)
    acc = tl.full((BLOCK_N, HALF), 0, dtype=tl.float32)
    for it in range(pid_k, n_iter, SPLIT_K):
        for j in tl.static_range(N_SUB):
            k0 = (it * N_SUB + j) * SUB_K
            g = k0 // GROUP
            sc = tl.load(s_rows + g * stride_sg)
            zf = nibble_to_float(tl.load(z_rows + g * stride_zg), tl.float32)
            pk = tl.load(p_rows + (k0 // 2 + offs_h)[None, :] * stride_pk)
            ke = k0 + 2 * offs_h
            xe = tl.load(x_row + ke * stride_xk).to(tl.float32)
            xo = tl.load(x_row + (ke + 1) * stride_xk).to(tl.float32)
            wlo = nibble_to_float(pk & 0xF, tl.float32) - zf[:, None]
            whi = nibble_to_float(pk >> 4, tl.float32) - zf[:, None]
            acc += (wlo * xe[None, :] + whi * xo[None, :]) * sc[:, None]
    y = row_sum(acc)
    m1 = tl.full((BLOCK_N,), 0, dtype=tl.int32) + m
    if SPLIT_K == 1:
        epilogue_store(y, m1, offs_n, M, N, out_ptr, stride_om, stride_on, b_ptr, b_ptr, b_ptr,
                       False, False, HAS_BIAS)
    else:
        store_partial(y, m1, offs_n, M, N, part_ptr, pid_k)


@triton.jit
def _gemv32_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, M, N, K, GROUP,
                   stride_xm, stride_xk, stride_wn, stride_sn, stride_sg, stride_zn, stride_zg,
                   stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
                   SUB_K: tl.constexpr, N_SUB: tl.constexpr):
    """Decode GEMV on the packed bytes read as int32 words (8 codes each, code 8i+j in bits
    4j..4j+3). Codes 0-3 of a word are converted in place (``nibble_in_place``), codes 4-7 likewise after
    one shift by 16, against x pre-scaled by 16^-j (exact: powers of two), so a code costs one
    AND-OR, one FADD taking off ``2^23 + zero * 16^j`` (exact for any uint8 zero) and one FFMA,
    and the product is that of (code - zero) * x, rounded once. The byte-wise unpacking of
    ``_gemv_kernel`` costs several times that in integer work, which bounds it, not memory."""
    GW: tl.constexpr = SUB_K // 8  # words per row of a sub-tile
    m, pid_k, offs_n, x_row, w_rows, s_rows, z_rows, n_iter = _gemv_program(
        x_ptr, w_ptr, s_ptr, z_ptr, N, K, stride_xm, stride_wn, stride_sn, stride_zn, BLOCK_N,
        SUB_K, N_SUB)
    w_rows = w_rows[:, None]
    offs_w = tl.arange(0, GW)
    acc = tl.full((BLOCK_N, GW), 0, dtype=tl.float32)
    for it in range(pid_k, n_iter, SPLIT_K):
        for j in tl.static_range(N_SUB):
            k0 = (it * N_SUB + j) * SUB_K
            g = k0 // GROUP
            w = tl.load(w_rows + (k0 // 8 + offs_w)[None, :])
            sc = tl.load(s_rows + g * stride_sg)
            z = tl.load(z_rows + g * stride_zg).to(tl.int32)
            w4 = w >> 16  # codes 4-7 to bits 0-15 (the sign bits above are masked off)
            # 2^23 + zero * 16^j, j = 0..3, as floats: exact for any uint8 zero (< 2^23)
            z0 = zero_in_place(z, 0)[:, None]
            z1 = zero_in_place(z, 4)[:, None]
            z2 = zero_in_place(z, 8)[:, None]
            z3 = zero_in_place(z, 12)[:, None]
            # x of the sub-tile in one contiguous load, then x_j = x[8i + j] by splitting
            # j = 4a + 2b + c off the innermost dimension (c first)
            xv = tl.load(x_row + (k0 + tl.arange(0, SUB_K)) * stride_xk).to(tl.float32)
            xe, xo = tl.split(tl.reshape(xv, (GW, 2, 2, 2)))  # c = 0, 1: [GW, 2(a), 2(b)]
            xe0, xe1 = tl.split(xe)  # b = 0, 1: [GW, 2(a)]
            xo0, xo1 = tl.split(xo)
            x0, x4 = tl.split(xe0)  # j = 0, 4
            x2, x6 = tl.split(xe1)  # j = 2, 6
            x1, x5 = tl.split(xo0)  # j = 1, 5
            x3, x7 = tl.split(xo1)  # j = 3, 7
            x0 = x0[None, :]
            x4 = x4[None, :]
            x1 = (x1 * 0.0625)[None, :]
            x5 = (x5 * 0.0625)[None, :]
            x2 = (x2 * 0.00390625)[None, :]
            x6 = (x6 * 0.00390625)[None, :]
            x3 = (x3 * 0.000244140625)[None, :]
            x7 = (x7 * 0.000244140625)[None, :]
            t = (nibble_in_place(w, 0xF) - z0) * x0
            t += (nibble_in_place(w, 0xF0) - z1) * x1
            t += (nibble_in_place(w, 0xF00) - z2) * x2
            t += (nibble_in_place(w, 0xF000) - z3) * x3
            t += (nibble_in_place(w4, 0xF) - z0) * x4
            t += (nibble_in_place(w4, 0xF0) - z1) * x5
            t += (nibble_in_place(w4, 0xF00) - z2) * x6
            t += (nibble_in_place(w4, 0xF000) - z3) * x7
            acc += t * sc[:, None]
    y = row_sum(acc)
    m1 = tl.full((BLOCK_N,), 0, dtype=tl.int32) + m
    if SPLIT_K == 1:
        epilogue_store(y, m1, offs_n, M, N, out_ptr, stride_om, stride_on, b_ptr, b_ptr, b_ptr,
                       False, False, HAS_BIAS)
    else:
        store_partial(y, m1, offs_n, M, N, part_ptr, pid_k)


# ------------------------------------------------------------------------------ host side


def sub_tiles(block_k: int, k: int, group: int) -> tuple[int, int]:
    """(SUB_K, N_SUB) for a config's BLOCK_K: SUB_K = the largest power of two dividing the
    group (<= BLOCK_K), N_SUB the largest count <= BLOCK_K / SUB_K that divides K / SUB_K, so
    the kernels need no K masks (K is a multiple of the group)."""
    sub = min(block_k, group & -group)
    total = k // sub
    n_sub = max(1, block_k // sub)
    while total % n_sub:
        n_sub -= 1
    return sub, n_sub


def words_unfit(w_packed: torch.Tensor, group: int, sub: int = 8) -> str | None:
    """Why the packed bytes cannot be read as int32 words by ``_gemv32_kernel`` (None: they
    can): rows contiguous, 4-byte aligned, K a multiple of 8 and sub-tiles of >= 8 codes."""
    if sub % 8 or group % 8:
        return f"needs groups and sub-tiles of a multiple of 8 codes (group_size={group})"
    if w_packed.shape[1] % 4 or w_packed.stride(1) != 1 or w_packed.stride(0) % 4 \
            or w_packed.data_ptr() % 4:
        return "needs contiguous, 4-byte aligned rows of a multiple of 8 codes"
    return None


def tiled_ok(group: int, block_k: int = 1 << 30) -> bool:
    return min(block_k, group & -group) >= MIN_TILED_SUB_K


def launch(x2, w_packed, scales, zeros, group: int, bias, out, config: dict) -> None:
    m, k = x2.shape
    n = w_packed.shape[0]
    s = int(config.get("SPLIT_K", 1))
    sub, n_sub = sub_tiles(config["BLOCK_K"], k, group)
    part = torch.empty((s, m, n), device=x2.device, dtype=torch.float32) if s > 1 else out
    b = bias if bias is not None else out
    args = (x2, w_packed, scales, zeros, b, out, part, m, n, k, group,
            x2.stride(0), x2.stride(1), w_packed.stride(0), w_packed.stride(1),
            scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
            out.stride(0), out.stride(1))
    common = dict(HAS_BIAS=bias is not None, SPLIT_K=s, SUB_K=sub, N_SUB=n_sub,
                  num_warps=config["num_warps"], num_stages=config["num_stages"])
    if config["path"] == "gemv":
        bn = config["BLOCK_N"]
        _gemv_kernel[(m, triton.cdiv(n, bn), s)](*args, BLOCK_N=bn, **common)
    elif config["path"] == "gemv32":
        why = words_unfit(w_packed, group, sub)
        if why:
            raise ValueError(f"int4_weight_only_mm: the gemv32 path {why}; use the gemv path")
        w32 = w_packed.view(torch.int32)
        bn = config["BLOCK_N"]
        _gemv32_kernel[(m, triton.cdiv(n, bn), s)](
            x2, w32, scales, zeros, b, out, part, m, n, k, group, x2.stride(0), x2.stride(1),
            w32.stride(0), scales.stride(0), scales.stride(1), zeros.stride(0),
            zeros.stride(1), out.stride(0), out.stride(1), BLOCK_N=bn, **common)
    else:
        if sub < MIN_TILED_SUB_K:
            raise ValueError(
                f"int4_weight_only_mm: the tiled (tensor-core) path needs sub-tiles of >= "
                f"{MIN_TILED_SUB_K} K values inside one group; group_size={group} with "
                f"BLOCK_K={config['BLOCK_K']} gives {sub}. Use the gemv path or a group size "
                f"divisible by 32"
            )
        bm, bn = config["BLOCK_M"], config["BLOCK_N"]
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), s)
        _tiled_kernel[grid](*args, SWAP_AB=bool(config.get("SWAP_AB", False)), BLOCK_M=bm,
                            BLOCK_N=bn, GROUP_M=config.get("GROUP_M", 8),
                            DOT_PREC=dot_precision(x2.dtype), **common)
    if s > 1:
        splitk_reduce(part, out, None, None, bias)


def _gemv(m, n, k, group, bn, bk, sms, split=None) -> dict:
    sub, n_sub = sub_tiles(bk, k, group)
    if split is None:
        split = _autotune.split_k(m * triton.cdiv(n, bn), k // (sub * n_sub), sms, per_sm=4)
    return dict(path="gemv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=2)


def _tiled(m, n, k, group, bm, bn, bk, w, st, swap, sms, split=True) -> dict:
    sub, n_sub = sub_tiles(bk, k, group)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    s = _autotune.split_k(tiles, k // (sub * n_sub), sms) if split else 1
    return dict(path="tiled", SWAP_AB=swap, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                SPLIT_K=s, num_warps=w, num_stages=st)


def default_config(m: int, n: int, k: int, group: int, dtype: torch.dtype, sms: int,
                   words: bool = False) -> dict:
    """The heuristic config (no tuning), from what the tuner picked on an H200 (Triton 3.6,
    the seven shapes of pyquant.bench_cuda): at M = 1 gemv32 where the weight can be read as
    words (``words``), else gemv; from M = 2, swapped MMA tiles 16-64 x 64 x 128 with 4 stages
    (they won every shape at M = 4 and 16); fp32 activations and group sizes the MMA path
    cannot take stay on the gemv paths up to M = 4."""
    if m == 1 and words and group % 8 == 0 and dtype != torch.float32:
        return _gemv32(m, n, k, group, 64, 256, sms, None)
    if (m <= 4 and dtype == torch.float32) or m == 1 or not tiled_ok(group):
        return _gemv(m, n, k, group, 32, 256, sms)
    if dtype == torch.float32:
        return _tiled(m, n, k, group, *F32_TILES[0], sms)
    if m <= 64:
        bm = max(16, triton.next_power_of_2(m))
        return _tiled(m, n, k, group, bm, 64, 128, 4, 4, True, sms)
    return _tiled(m, n, k, group, 128, 128, 64, 8, 3, True, sms, split=False)


# fp32 activations multiply with input_precision="ieee" (no TF32): CUDA-core FMA loops, where
# large tiles spill registers; fp32 gets small tiles only.
F32_TILES = ((32, 64, 32, 4, 3, True), (64, 64, 32, 4, 3, True), (16, 64, 32, 4, 3, True),
             (64, 32, 32, 4, 3, False))


def _gemv32(m, n, k, group, bn, bk, sms, split) -> dict:
    return dict(_gemv(m, n, k, group, bn, bk, sms, split=split), path="gemv32")


def candidates(m: int, n: int, k: int, group: int, dtype: torch.dtype, sms: int,
               words: bool = True) -> list:
    """The autotuning space; ``words``: the packed weight can be read as int32 words (see
    ``words_unfit``), which the gemv32 path needs."""
    mb = _autotune.m_bucket(m)
    out = []
    if mb <= 4 and words and group % 8 == 0:
        for bn, bk in ((32, 256), (64, 128), (64, 256), (128, 128), (128, 256)):
            sub, n_sub = sub_tiles(bk, k, group)
            for s in _autotune.split_choices(m * triton.cdiv(n, bn), k // (sub * n_sub), sms):
                out.append(_gemv32(m, n, k, group, bn, bk, sms, s))
    if mb <= 16 or not tiled_ok(group):
        for bn, bk in ((16, 256), (32, 256), (32, 512), (32, 1024), (64, 512)):
            sub, n_sub = sub_tiles(bk, k, group)
            for s in _autotune.split_choices(m * triton.cdiv(n, bn), k // (sub * n_sub), sms):
                out.append(_gemv(m, n, k, group, bn, bk, sms, split=s))
    if not tiled_ok(group):
        return out
    if dtype == torch.float32:
        if mb >= 2:
            out += [_tiled(m, n, k, group, *t, sms) for t in F32_TILES]
    else:
        bm = max(16, min(mb, 64))
        tiles = ((64, 128, 4, 4), (128, 128, 8, 3), (64, 256, 4, 3))
        for bn, bk, w, st in tiles + (_autotune.DECODE_SWAP_TILES if mb <= 16 else ()):
            out.append(_tiled(m, n, k, group, bm, bn, bk, w, st, True, sms))
        if mb >= 64:
            for bm, bn, bk, w, st, swap in ((128, 128, 64, 8, 3, True), (64, 128, 64, 4, 4, True),
                                            (128, 64, 128, 4, 3, True), (64, 256, 64, 8, 3, True),
                                            (128, 128, 64, 8, 3, False),
                                            (64, 128, 64, 4, 4, False)):
                out.append(_tiled(m, n, k, group, bm, bn, bk, w, st, swap, sms, split=False))
            # Few output tiles (small N, M in the hundreds): split K so that every SM has work.
            c = _tiled(m, n, k, group, 128, 64, 128, 4, 3, True, sms)
            if c["SPLIT_K"] > 1:
                out.append(c)
    return [c for c in out if c["path"] != "tiled" or tiled_ok(group, c["BLOCK_K"])]


def _interpreted() -> bool:
    return type(_tiled_kernel).__name__ == "InterpretedFunction"


def choose(x2, n: int, k: int, group: int, run, words: bool = True) -> dict:
    m = x2.shape[0]
    sms = _autotune.sm_count(x2.device)
    default = default_config(m, n, k, group, x2.dtype, sms, words=words)
    if x2.device.type != "cuda" or _interpreted():
        return default
    # A weight whose bytes cannot be read as words gets its own key: a cached gemv32 config
    # of the same shape must not reach it.
    key = _autotune.make_key(OP, x2.dtype, m, n, k, g=group, **({} if words else {"bytes": 1}))
    return _autotune.tune(x2.device, key,
                          candidates(m, n, k, group, x2.dtype, sms, words=words), run, default)


def int4_weight_only_mm(x: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor, group_size: int, bias=None,
                        config: dict | None = None) -> torch.Tensor:
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    bias = None if bias is None else bias.contiguous()
    return run_linear(
        x, n, k, bias,
        lambda x2, out, c: launch(x2, w_packed, scales, zeros, group_size, bias, out, c),
        lambda x2, run: choose(x2, n, k, group_size, run,
                               words=words_unfit(w_packed, group_size) is None), config)
