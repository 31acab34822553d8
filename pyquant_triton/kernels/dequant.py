"""Triton kernels that dequantize (or densify, for 2:4) a whole weight to a float matrix in one
pass: the first half of the triton backend's dense path (``pyquant/_triton.py``, ``DENSE_FALLBACK_MIN_M``), where a
large batch runs cuBLAS on the dequantized weight because the MMA tiles that dequantize inside
their K loop reach only about half of cuBLAS's rate.

    int8:  w[n, k] = float32(q[n, k]) * scale[n]
    int4:  w[n, k] = scale[n, g] * (code[n, k] - zero[n, g]),  g = k // group   (formats.py)

Both are computed in fp32, exactly as ``formats.dequantize_*`` does, and rounded once to the
output dtype, so the result is bit-identical to ``formats.dequantize_*(...).to(dtype)``. One
pass reads the quantized bytes once and writes the float matrix once: at 4096 x 11008 that is
about 24 MB read and 90 MB written (bf16), some 25-30 us on an H200, against about 460 us for
the bf16 matmul at M = 4096 that follows it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import nibble_in_place, zero_in_place
from .sparse24_mm import _expand

BLOCK_N = 32
BLOCK_K = 256  # output columns per program (int4: 128 packed bytes per row)


@triton.jit
def _int8_kernel(q_ptr, s_ptr, out_ptr, N, K, stride_qn, stride_qk, stride_on,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    rn = offs_n.to(tl.int64)
    q = tl.load(q_ptr + rn[:, None] * stride_qn + offs_k[None, :] * stride_qk, mask=mask,
                other=0)
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    w = q.to(tl.float32) * s[:, None]
    tl.store(out_ptr + rn[:, None] * stride_on + offs_k[None, :],
             w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int4_kernel(p_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP, stride_pn, stride_pk, stride_sn,
                 stride_sg, stride_zn, stride_zg, stride_on,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    HALF: tl.constexpr = BLOCK_K // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.program_id(1) * HALF + tl.arange(0, HALF)  # packed byte j holds k = 2j, 2j+1
    nmask = offs_n < N
    mask = nmask[:, None] & (offs_h[None, :] < K // 2)
    rn = offs_n.to(tl.int64)
    pk = tl.load(p_ptr + rn[:, None] * stride_pn + offs_h[None, :] * stride_pk, mask=mask,
                 other=0).to(tl.int32)
    # Both nibbles of a byte lie in one group (the group size is even).
    g = (2 * offs_h) // GROUP
    s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :] * stride_sg, mask=mask, other=0.0)
    z = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :] * stride_zg, mask=mask,
                other=0).to(tl.int32)
    # The same fp32 arithmetic as formats.dequantize_int4_groupwise: (code - zero) is exact,
    # then one multiply; written as s * (code - zero) so the rounding matches.
    lo = s * ((pk & 0xF) - z).to(tl.float32)
    hi = s * ((pk >> 4) - z).to(tl.float32)
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # k = 2j + (0: lo, 1: hi)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    omask = nmask[:, None] & (offs_k[None, :] < K)
    tl.store(out_ptr + rn[:, None] * stride_on + offs_k[None, :],
             w.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _int4_words_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP, stride_wn, stride_sn,
                       stride_sg, stride_zn, stride_zg, stride_on,
                       BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """The packed bytes read as int32 words (8 codes, code 8i+j in bits 4j..4j+3), each code
    converted in place (pyquant_triton/kernels/int4_weight_only_mm._gemv32_kernel explains the trick):
    scale and zero are gathered once per word, not per code. (code - zero) * 16^j is exact
    and so is its product with scale * 16^-j, so the fp32 values are those of
    formats.dequantize_int4_groupwise."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    nmask = offs_n < N
    mask = nmask[:, None] & (offs_w[None, :] < K // 8)
    rn = offs_n.to(tl.int64)
    w = tl.load(w_ptr + rn[:, None] * stride_wn + offs_w[None, :], mask=mask, other=0)
    g = (8 * offs_w) // GROUP  # a word lies in one group (the group is a multiple of 8)
    s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :] * stride_sg, mask=mask, other=0.0)
    z = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :] * stride_zg, mask=mask,
                other=0).to(tl.int32)
    w4 = w >> 16
    z0 = zero_in_place(z, 0)
    z1 = zero_in_place(z, 4)
    z2 = zero_in_place(z, 8)
    z3 = zero_in_place(z, 12)
    s1 = s * 0.0625
    s2 = s * 0.00390625
    s3 = s * 0.000244140625
    o0 = (nibble_in_place(w, 0xF) - z0) * s
    o1 = (nibble_in_place(w, 0xF0) - z1) * s1
    o2 = (nibble_in_place(w, 0xF00) - z2) * s2
    o3 = (nibble_in_place(w, 0xF000) - z3) * s3
    o4 = (nibble_in_place(w4, 0xF) - z0) * s
    o5 = (nibble_in_place(w4, 0xF0) - z1) * s1
    o6 = (nibble_in_place(w4, 0xF00) - z2) * s2
    o7 = (nibble_in_place(w4, 0xF000) - z3) * s3
    # [..., a, b, c] = o[4a + 2b + c]: the innermost join is c
    v = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)),
                tl.join(tl.join(o1, o5), tl.join(o3, o7)))
    v = tl.reshape(v, (BLOCK_N, BLOCK_W * 8))
    offs_k = tl.program_id(1) * (BLOCK_W * 8) + tl.arange(0, BLOCK_W * 8)
    omask = nmask[:, None] & (offs_k[None, :] < K)
    tl.store(out_ptr + rn[:, None] * stride_on + offs_k[None, :],
             v.to(out_ptr.dtype.element_ty), mask=omask)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [N, K] x fp32 scale [N] -> ``dtype`` [N, K], contiguous."""
    n, k = q.shape
    out = torch.empty((n, k), device=q.device, dtype=dtype)
    if n and k:
        _int8_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))](
            q, scale, out, n, k, q.stride(0), q.stride(1), out.stride(0),
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
    return out


def dequantize_int4(w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group: int, dtype: torch.dtype, words: bool = True) -> torch.Tensor:
    """Canonical packed int4 [N, K/2] with fp32 scales and uint8 zeros [N, K/G] -> ``dtype``
    [N, K], contiguous. Reads the bytes as int32 words where they allow it (and ``words``),
    else byte by byte."""
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    out = torch.empty((n, k), device=w_packed.device, dtype=dtype)
    if n and k and words:
        from .int4_weight_only_mm import words_unfit

        if words_unfit(w_packed, group) is None:
            w32 = w_packed.view(torch.int32)
            _int4_words_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(k // 8, BLOCK_K // 8))](
                w32, scales, zeros, out, n, k, group, w32.stride(0), scales.stride(0),
                scales.stride(1), zeros.stride(0), zeros.stride(1), out.stride(0),
                BLOCK_N=BLOCK_N, BLOCK_W=BLOCK_K // 8, num_warps=4)
            return out
    if n and k:
        _int4_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))](
            w_packed, scales, zeros, out, n, k, group, w_packed.stride(0), w_packed.stride(1),
            scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1), out.stride(0),
            BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
    return out


@triton.jit
def _dense24_kernel(v_ptr, meta_ptr, s_ptr, out_ptr, N, K, stride_vn, stride_vk, stride_mn,
                    stride_mk, stride_on, HAS_S: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """2:4 kept values (float, or int8 with a float32 scale per row) + positions -> the dense
    weight, zeros at the pruned positions: w = float32(value) * scale, rounded once."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = offs_n < N
    mask = nmask[:, None] & (kk[None, :] < K)
    rn = offs_n.to(tl.int64)
    w = _expand((v_ptr + rn * stride_vn)[:, None], (meta_ptr + rn * stride_mn)[:, None],
                kk[None, :], mask, stride_vk, stride_mk, tl.float32)
    if HAS_S:
        w = w * tl.load(s_ptr + offs_n, mask=nmask, other=0.0)[:, None]
    tl.store(out_ptr + rn[:, None] * stride_on + kk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask)


def densify_24(values: torch.Tensor, meta: torch.Tensor, scale, dtype: torch.dtype
               ) -> torch.Tensor:
    """(values [N, K/2], meta uint8, optional float32 scale [N]) -> ``dtype`` [N, K]: the
    dense path of the 2:4 ops (sparse_formats.decompress_24, times the scale, in one pass)."""
    n, k = values.shape[0], 2 * values.shape[1]
    out = torch.empty((n, k), device=values.device, dtype=dtype)
    if n and k:
        _dense24_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))](
            values, meta, scale.contiguous() if scale is not None else values, out, n, k, values.stride(0),
            values.stride(1), meta.stride(0), meta.stride(1), out.stride(0),
            HAS_S=scale is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
    return out
