"""Pieces shared by the Triton kernels of pyquant: tile scheduling, the fused epilogue, the
split-K reduction and the int4 nibble -> float conversion.

Everything here is plain Triton 3.x (no TMA descriptors, no warp specialization, no features
newer than Triton 3.0) so one source runs on every GPU Triton supports and under
TRITON_INTERPRET=1 on the CPU (the tests).

Epilogue arithmetic (every op, every path) is that of ``pyquant.reference``:

    y = float32(acc) * (row_scale[m] * col_scale[n]) + float32(bias[n]),   rounded once to out

with the product of the two scales formed first, as the reference does, so the int8 dynamic
path is exact up to FMA contraction of the last multiply-add.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# The kernels call Triton builtins and the helpers here, never the @jit helpers of Triton's
# standard library (tl.cdiv, tl.zeros, tl.sum, tl.max, ...): those are compiled or interpreted
# according to TRITON_INTERPRET at the time *Triton* was imported, so the interpreted copy of
# these kernels (the CPU tests) could not call them in a process that imported Triton for the
# GPU first.


@triton.jit
def cdiv(a, b):
    return (a + b - 1) // b


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


# The combine functions of tl.sum / tl.max themselves (plain a + b, maximum(a, b)): the
# interpreter recognizes them by identity and reduces with numpy instead of calling the combine
# function element by element, and it never calls them, so their compiled/interpreted mode does
# not matter. Own copies where a Triton version lacks them.
_SUM = getattr(tl.standard, "_sum_combine", None) or _add
_MAX = getattr(tl.standard, "_elementwise_max", None) or _max


@triton.jit
def row_sum(x):
    """Sum over axis 1 (the reduction of tl.sum)."""
    return tl.reduce(x, 1, _SUM)


@triton.jit
def vec_max_nan(v):
    """max(v) of a 1-D float vector, NaN if any element is NaN (like torch.amax)."""
    n_nan = tl.reduce((v != v).to(tl.int32), 0, _SUM)
    return tl.where(n_nan > 0, float("nan"), tl.reduce(v, 0, _MAX))


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("super-row") tile order: GROUP_M row tiles sweep the column tiles together, so
    the weight tiles they share stay in L2 instead of being re-read from HBM per row tile."""
    num_pid_m = cdiv(M, BLOCK_M)
    num_pid_n = cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def epilogue_store(acc, m2, n2, M, N, out_ptr, stride_om, stride_on,
                   rs_ptr, cs_ptr, b_ptr,
                   HAS_RS: tl.constexpr, HAS_CS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store y = acc * (rs[m] * cs[n]) + bias[n] to out[m, n] in out's dtype.

    ``m2``/``n2`` are index tensors broadcastable to ``acc``'s shape ([BM, 1] x [1, BN], or
    transposed for the swapped-operand tiles, or two 1-D tensors for the split-K reduction), so
    one epilogue serves every tile orientation."""
    mmask = m2 < M
    nmask = n2 < N
    y = acc.to(tl.float32)
    if HAS_RS:
        rs = tl.load(rs_ptr + m2, mask=mmask, other=0.0)
        if HAS_CS:
            cs = tl.load(cs_ptr + n2, mask=nmask, other=0.0)
            y = y * (rs * cs)
        else:
            y = y * rs
    elif HAS_CS:
        cs = tl.load(cs_ptr + n2, mask=nmask, other=0.0)
        y = y * cs
    if HAS_BIAS:
        b = tl.load(b_ptr + n2, mask=nmask, other=0.0).to(tl.float32)
        y = y + b
    ptrs = out_ptr + m2.to(tl.int64) * stride_om + n2.to(tl.int64) * stride_on
    tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mmask & nmask)


@triton.jit
def store_partial(acc, m2, n2, M, N, part_ptr, pid_k):
    """Split-K: program ``pid_k`` stores its raw partial sum (int32 or fp32) to
    part[pid_k, m, n] of a contiguous [SPLIT_K, M, N] workspace."""
    base = part_ptr + pid_k.to(tl.int64) * M * N
    ptrs = base + m2.to(tl.int64) * N + n2
    tl.store(ptrs, acc, mask=(m2 < M) & (n2 < N))


@triton.jit
def finish_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on, rs_ptr, cs_ptr, b_ptr,
                part_ptr, pid_k, HAS_RS: tl.constexpr, HAS_CS: tl.constexpr,
                HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr, SPLIT_K: tl.constexpr):
    """The end of every tiled kernel: acc [BLOCK_M, BLOCK_N] (or [BLOCK_N, BLOCK_M] when
    SWAP_AB) goes through the epilogue to out, or, with SPLIT_K > 1, to the split's partial."""
    if SWAP_AB:
        m2 = offs_m[None, :]
        n2 = offs_n[:, None]
    else:
        m2 = offs_m[:, None]
        n2 = offs_n[None, :]
    if SPLIT_K == 1:
        epilogue_store(acc, m2, n2, M, N, out_ptr, stride_om, stride_on, rs_ptr, cs_ptr, b_ptr,
                       HAS_RS, HAS_CS, HAS_BIAS)
    else:
        store_partial(acc, m2, n2, M, N, part_ptr, pid_k)


@triton.jit
def splitk_reduce_kernel(part_ptr, out_ptr, rs_ptr, cs_ptr, b_ptr, M, N, stride_om, stride_on,
                         SPLIT_K: tl.constexpr, HAS_RS: tl.constexpr, HAS_CS: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """Sum the SPLIT_K partials in a fixed order (deterministic, unlike atomics; int32 partials
    of the int8 paths sum exactly) and run the epilogue once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.load(part_ptr + offs, mask=mask, other=0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0)
    m = offs // N
    n = offs % N
    # Out-of-range lanes get m = M so that both the loads and the store are masked.
    m = tl.where(mask, m, M)
    epilogue_store(acc, m, n, M, N, out_ptr, stride_om, stride_on, rs_ptr, cs_ptr, b_ptr,
                   HAS_RS, HAS_CS, HAS_BIAS)


def splitk_reduce(part: torch.Tensor, out: torch.Tensor, row_scale, col_scale, bias) -> None:
    """Host side of ``splitk_reduce_kernel``: part [S, M, N] -> out [M, N]."""
    s, m, n = part.shape
    block = 1024
    dummy = out  # never read when the matching HAS_* flag is off
    splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
        part, out,
        row_scale if row_scale is not None else dummy,
        col_scale if col_scale is not None else dummy,
        bias if bias is not None else dummy,
        m, n, out.stride(0), out.stride(1),
        SPLIT_K=s, HAS_RS=row_scale is not None, HAS_CS=col_scale is not None,
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
    )


@triton.jit
def nibble_to_float(c, DT: tl.constexpr):
    """int4 codes 0..15 (any integer tensor) -> ``MAGIC + c`` in float type DT, exactly.

    Writing the code into the low mantissa bits of a power of two and reinterpreting the bits
    replaces an int->float conversion (a quarter-rate instruction on NVIDIA GPUs, which would
    bound the decode kernels before memory does) by one OR. Callers subtract the same
    ``MAGIC + zero`` (see ``nibble_to_float`` of the zero point), so MAGIC cancels exactly:

        fp16: 0x6400 = 1024.0, ulp 1 up to 2048     bf16: 0x4300 = 128.0, ulp 1 up to 256
        fp32: 0x4B000000 = 2^23, ulp 1 up to 2^24
    """
    if DT == tl.float16:
        return (c.to(tl.int16) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    elif DT == tl.bfloat16:
        return (c.to(tl.int16) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return (c.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def nibble_in_place(w, MASK: tl.constexpr):
    """The code under MASK (0xF << 4j, j <= 3) of each int32 word, left in place, as the fp32
    ``2^23 + code * 16^j`` (exact): one AND-OR, no shift, no conversion. Paired with
    ``zero_in_place(zero, 4j)``: their difference is (code - zero) * 16^j, exact."""
    return ((w & MASK) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def zero_in_place(z, SHIFT: tl.constexpr):
    """``2^23 + zero * 2^SHIFT`` as fp32, for int32 zero points (exact for any uint8 zero
    with SHIFT <= 12: below 2^23)."""
    return ((z << SHIFT) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def round_half_even(v):
    """rint for |v| < 2^22 in fp32: adding 1.5 * 2^23 pushes the fraction out of the mantissa
    with the FPU's round-to-nearest-even, subtracting it back is exact. Used instead of
    libdevice.rint because the interpreter (the CPU tests) has no libdevice; the GPU tests
    check that the codes stay bit-identical to torch.round."""
    return (v + 12582912.0) - 12582912.0


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 activations must not silently become TF32 (10-bit mantissa) on tensor cores: the
    fp32 tolerance of the tests (1e-5) is that of true fp32 products. 16-bit inputs ignore it."""
    return "ieee"


def run_linear(x: torch.Tensor, n: int, k: int, bias, launch, choose, config) -> torch.Tensor:
    """The host side all three ops share: x [..., K] -> out [..., N] in x's dtype. Empty M or N
    launch nothing; K = 0 is the bias alone (the empty sum); otherwise ``launch(x2, out, cfg)``
    runs with ``config`` when given (the tests force configs) or with ``choose(x2, run)``'s, the
    tuned or heuristic one, where ``run(cfg)`` launches and returns ``out`` for the tuner."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m and n:
        if k == 0:
            out.copy_(bias.to(torch.float32).expand(m, n) if bias is not None else
                      torch.zeros((), device=x.device))
        else:
            def run(c):
                launch(x2, out, c)
                return out

            run(config if config is not None else choose(x2, run))
    return out.reshape(*lead, n)
