"""The native ops on the CPU panel layout of the weights (pyquant/panels.py): argument checks,
scratch and the call into pyquant._C, as in _native.py, whose helpers they use.

On an ISA without the panel kernels (AVX2, portable, or a lower one forced), and for rows of x
that 24-bit fixed point cannot hold (Inf, NaN, a max below 2^-100: the weight-only kernels
return PQ_NOT_FIXED_POINT), the canonical tensors, unpacked for that call, run the canonical
kernels: the same results as a layer kept in rows, at the cost of the unpacking."""
from __future__ import annotations

import torch

from . import _checks, panels, sparse_panels
from ._native import (
    _NOT_FINITE, _NOT_FIXED_POINT, _bias_f32, _bound_result, _bound_rows, _check_codes, _finish,
    _flat, _int4_codes_mm, _int4_dynamic_bf16_out, _int8_codes_mm, _out, _prepared_call, _ptr,
    _quantized_call, _raise, _require_cpu, _rows_f32, _run_codes, _run_dynamic, _run_int4_weight_only_mm,
    _run_int8_weight_only_mm, _run_sparse24_int4_mm, _run_sparse24_int8_mm, _scratch, _threads,
    _work, _workspace_sizes, current_isa, has_panel_kernels, int8_weight_only_mm, module,
    sparse_dense_reason)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy of it whose data starts on a 64-byte boundary (the kernels'
    aligned loads of panels and scales)."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    raw = torch.empty(t.numel() * t.element_size() + 64, dtype=torch.uint8)
    off = -raw.data_ptr() % 64
    return raw[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)


# ----------------------------------------------------------------------------------- int8


def _int8_panels_codes_mm(isa, pxq, pxs, m, k, p, w_scale, bias, out):
    """_int8_codes_mm on panels p: the same result, bit for bit."""
    if not has_panel_kernels(isa):
        return _int8_codes_mm(isa, pxq, pxs, m, k, panels.unpack_int8(p), w_scale, bias, out)
    n = p.shape[0]
    p, ws, b = _aligned(p), w_scale.contiguous(), _bias_f32(bias)
    nwork = module().int8_panels_workspace_bytes(m)
    work = _work("xsum", nwork)
    st = module().int8_dynamic_mm_panels(isa, pxq, pxs, m, k, _ptr(p), n, _ptr(ws), _ptr(b),
                                         _ptr(out), _threads(), _ptr(work), nwork)
    if st:
        _raise("int8_dynamic_mm_panels", st, M=m, N=n, K=k)


def _run_weight_only(op: str, x, n: int, k: int, rows, call, bf16=None):
    """A weight-only op on panels: call(isa, x rows address, M, ldx, out, threads) runs the
    native kernel and returns its status; rows(x) runs the canonical tensors instead, on an
    ISA without the panel kernels or for rows that fixed point cannot hold. bf16(isa, x rows
    address, M, ldx, out, threads), where given, runs bf16 rows into a bf16 output where the
    ISA and sizes have that path (_bf16_out_rows)."""
    isa = current_isa()
    if not has_panel_kernels(isa):
        return rows(x)
    lead, x2 = _flat(x, n)
    m = x2.shape[0]
    if bf16 is not None and x.dtype is torch.bfloat16:
        y = _bf16_out_rows(isa, x2, m, n, k, bf16, op)
        if y is not None:
            return y.reshape(*lead, n) if len(lead) != 1 else y
    out = _out(m, n, x.dtype)
    if m:
        xf = _rows_f32(x2)
        st = call(isa, _ptr(xf), m, xf.stride(0), out, _threads())
        if st == _NOT_FIXED_POINT:
            return rows(x)
        if st:
            _raise(op, st, M=m, N=n, K=k)
    return _finish(out, x, lead, n)


def _bf16_out_rows(isa, x2, m: int, n: int, k: int, bf16, op: str = ""):
    """bf16 rows x2 [M, K] (unit element stride) through bf16(isa, address, M, ldx, out,
    threads) into a new bf16 [M, N], or None where that call does not run them (-1: not on
    this ISA or at these sizes; PQ_NOT_FINITE: an Inf or NaN in x), for the float path to
    take; any other status raises."""
    if not m or x2.stride(-1) != 1 or (m > 1 and x2.stride(0) < k):
        return None
    out = torch.empty((m, n), dtype=torch.bfloat16)
    st = bf16(isa, x2.data_ptr(), m, max(x2.stride(0), k), out, _threads())
    if st in (-1, _NOT_FINITE):
        return None
    if st:
        _raise(op, st, M=m, N=n, K=k)
    return out


def _weight_only_binder(op: str, prepare, rows):
    """run(x, *w), the op, with run.bind(*w). prepare(*w) -> (n, k, call, copied, bf16) holds
    the weight tensors as the kernel takes them (copied: some of them are aligned or float32
    copies) and gives the calls of _run_weight_only (bf16: None where the op has no
    bf16-output call); rows(x, *w) runs the canonical tensors.
    bind(*w) is that call prepared once, for weights that stay the same (ops.LayerCall, which
    checks that they do), or None where it would hold a copy, which a write in place to the
    weights would leave stale. Why: at decode a call's Python runs from caches that the
    weight stream has just flushed, so each step skipped counts: int4 weight-only, 4096 x
    4096, M = 1, on a 2-core Xeon, through a LayerCall 1.06-1.10x as fast as through ops.call
    (benchmarks/decode_call_ab.py)."""
    def run(x, *w):
        n, k, call, _, bf16 = prepare(*w)
        return _run_weight_only(op, x, n, k, lambda x: rows(x, *w), call, bf16)

    def bind(*w):
        n, k, call, copied, bf16 = prepare(*w)
        if copied:
            return None

        def rows_x(x):
            return rows(x, *w)

        def bound(x):
            # contiguous float32 or bfloat16 rows of x (2-D or more), the decode call of a
            # model, to the kernel; a status other than 0 (rows fixed point cannot hold) or any
            # other x (bf16 rows past _BF16_BOUND_MAX_M too) takes the general path, with its
            # bf16-output call
            m, xf, out, y = _bound_rows(x, n, k)
            if m:
                isa = current_isa()
                if has_panel_kernels(isa) and call(isa, xf.data_ptr(), m, k, out, _threads()) == 0:
                    return _bound_result(out, y)
            return _run_weight_only(op, x, n, k, rows_x, call, bf16)
        return bound

    run.bind = bind
    return run


def _int8_weight_only_prepare(p, w_scale, bias=None):
    n, k = p.shape
    # every tensor whose address crosses over is held by the call until it returns
    pa, ws, b = _aligned(p), w_scale.contiguous(), _bias_f32(bias)
    ptrs = (_ptr(pa), _ptr(ws), _ptr(b))
    mod = module()
    nwork = _workspace_sizes(mod.int8_weight_only_panels_workspace_bytes, k)

    def call(isa, px, m, ldx, out, nt, _hold=(pa, ws, b)):
        size = nwork(isa, m, nt)
        work = _work("int8wo", size)
        return mod.int8_weight_only_mm_panels(isa, px, m, k, ldx, ptrs[0], n, ptrs[1], ptrs[2],
                                              _ptr(out), nt, _ptr(work), size)
    return n, k, call, not (pa is p and ws is w_scale and b is bias), None


_run_int8_weight_only_mm_panels = _weight_only_binder(
    "int8_weight_only_mm_panels", _int8_weight_only_prepare,
    lambda x, p, w_scale, bias=None: _run_int8_weight_only_mm(x, panels.unpack_int8(p), w_scale,
                                                              bias))


def int8_weight_only_mm_panels(x, p, w_scale, bias=None):
    _checks.check_int8_panels_mm("int8_weight_only_mm_panels", x, p, w_scale, bias)
    _require_cpu("int8_weight_only_mm_panels", x)
    return _run_int8_weight_only_mm_panels(x, p, w_scale, bias)


def _run_int8_dynamic_mm_panels(x, p, w_scale, bias=None):
    return _run_dynamic(x, *p.shape, _int8_panels_codes_mm, p, w_scale, bias)


def _bind_int8_dynamic_mm_panels(p, w_scale, bias=None):
    """_run_int8_dynamic_mm_panels prepared once for weights that stay the same (ops.LayerCall),
    as _native._bind_int8_dynamic_mm: contiguous float32 or bfloat16 rows (_bound_rows) are
    quantized and multiplied with no other step on an ISA with the panel kernels; anything
    else (and a status other than 0) takes the op's general path. None where the weights would
    need a copy (or realignment). Int8DynamicLinear keeps panels on the AVX512-VNNI and -BF16
    ISAs, so its decode there comes here: 512 x 512 at M = 1, 20 -> 15-16 us a call through a
    LayerCall (benchmarks/decode_call_ab.py --op int8_dynamic --shape 512x512, with
    PYQUANT_CPU_ISA=avx512_bf16 on a 2-core Xeon)."""
    ws, b = w_scale.contiguous(), _bias_f32(bias)
    if not (_aligned(p) is p and ws is w_scale and b is bias):
        return None
    n, k = p.shape
    ptrs, mod = (_ptr(p), _ptr(ws), _ptr(b)), module()
    return _prepared_call(
        n, k,
        _quantized_call(k, "xsum", lambda isa, m, nt: mod.int8_panels_workspace_bytes(m),
                        lambda isa, pxq, pxs, m, out, nt, work, nwork: mod.int8_dynamic_mm_panels(
                            isa, pxq, pxs, m, k, ptrs[0], n, ptrs[1], ptrs[2], _ptr(out), nt,
                            _ptr(work), nwork)),
        lambda x: _run_int8_dynamic_mm_panels(x, p, w_scale, bias),
        lambda isa, m, y: has_panel_kernels(isa))


_run_int8_dynamic_mm_panels.bind = _bind_int8_dynamic_mm_panels


def int8_dynamic_mm_panels(x, p, w_scale, bias=None):
    _checks.check_int8_panels_mm("int8_dynamic_mm_panels", x, p, w_scale, bias)
    _require_cpu("int8_dynamic_mm_panels", x)
    return _run_int8_dynamic_mm_panels(x, p, w_scale, bias)


def int8_codes_mm_panels(xq, x_scale, p, w_scale, bias=None):
    """int8_codes_mm (given activation codes, a row-parallel shard's) on panels p."""
    _checks.check_int8_panels_mm("int8_codes_mm_panels",
                                 _check_codes("int8_codes_mm_panels", xq, x_scale), p, w_scale,
                                 bias)
    return _run_codes(xq, x_scale, p.shape[0], _int8_panels_codes_mm, p, w_scale, bias)


# ----------------------------------------------------------------------------------- int4


def _int4_panels_codes_mm(isa, pxq, pxs, m, k, codes, scales, zeros, group_size, bias, out):
    """_int4_codes_mm on panels: from M = 8 the same result, bit for bit (pq.h)."""
    if not has_panel_kernels(isa):
        return _int4_codes_mm(isa, pxq, pxs, m, k,
                              *panels.unpack_int4(codes, scales, zeros, group_size), group_size,
                              bias, out)
    n = codes.shape[0]
    codes, scales, zp, b = _aligned(codes), _aligned(scales), zeros.contiguous(), _bias_f32(bias)
    # on AMX with the int8 tiles' scratch: prefill runs them from the panels
    nt = _threads()  # the workspace is sized for the call's thread count
    nwork = module().int4_dynamic_panels_workspace_bytes(isa, m, k, group_size, nt)
    if nwork < 0:
        _raise("int4_dynamic_mm_panels", -1, M=m, N=n, K=k, group_size=group_size)
    work = _work("int4dyn", max(nwork, 64))
    st = module().int4_dynamic_mm_panels(isa, pxq, pxs, m, k, _ptr(codes), n, _ptr(scales),
                                         _ptr(zp), group_size, _ptr(b), _ptr(out), nt,
                                         _ptr(work), nwork)
    if st:
        _raise("int4_dynamic_mm_panels", st, M=m, N=n, K=k, group_size=group_size)


def _int4_weight_only_prepare(codes, scales, zeros, group_size, bias=None):
    n, k = codes.shape[0], codes.shape[1] * 2
    pc, sc, zp, b = _aligned(codes), _aligned(scales), zeros.contiguous(), _bias_f32(bias)
    ptrs = (_ptr(pc), _ptr(sc), _ptr(zp), _ptr(b))
    mod = module()
    nwork = _workspace_sizes(mod.int4_weight_only_panels_workspace_bytes, k, group_size)

    def call(isa, px, m, ldx, out, nt, _hold=(pc, sc, zp, b)):
        size = nwork(isa, m, nt)
        work = _work("int4wo", size)
        return mod.int4_weight_only_mm_panels(isa, px, m, k, ldx, ptrs[0], n, ptrs[1], ptrs[2],
                                              group_size, ptrs[3], _ptr(out), nt, _ptr(work),
                                              size)

    def bf16(isa, px, m, ldx, out, nt, _hold=(pc, sc, zp, b)):
        # AMX: bf16 x as one exact term, bf16 out (pq_int4_weight_only_mm_panels_bf16)
        if not mod.int4_weight_only_panels_bf16_applies(isa, m, k, n, group_size):
            return -1
        size = nwork(isa, m, nt)
        work = _work("int4wo", size)
        return mod.int4_weight_only_mm_panels_bf16(isa, px, m, k, ldx, ptrs[0], n, ptrs[1],
                                                   ptrs[2], group_size, ptrs[3], _ptr(out), nt,
                                                   _ptr(work), size)
    return n, k, call, not (pc is codes and sc is scales and zp is zeros and b is bias), bf16


_run_int4_weight_only_mm_panels = _weight_only_binder(
    "int4_weight_only_mm_panels", _int4_weight_only_prepare,
    lambda x, codes, scales, zeros, group_size, bias=None: _run_int4_weight_only_mm(
        x, *panels.unpack_int4(codes, scales, zeros, group_size), group_size, bias))


def int4_weight_only_mm_panels(x, codes, scales, zeros, group_size, bias=None):
    _checks.check_int4_panels_mm("int4_weight_only_mm_panels", x, codes, scales, zeros,
                                 group_size, bias)
    _require_cpu("int4_weight_only_mm_panels", x)
    return _run_int4_weight_only_mm_panels(x, codes, scales, zeros, group_size, bias)


def _run_int4_dynamic_mm_panels(x, codes, scales, zeros, group_size, bias=None):
    if x.dtype is torch.bfloat16:  # AMX: bf16 out from the tiles, as the rows' op
        y = _int4_dynamic_bf16_out(x, _aligned(codes), _aligned(scales), zeros, group_size,
                                   bias, panels=True)
        if y is not None:
            return y
    return _run_dynamic(x, codes.shape[0], codes.shape[1] * 2, _int4_panels_codes_mm, codes,
                        scales, zeros, group_size, bias)


def _bind_int4_dynamic_mm_panels(codes, scales, zeros, group_size, bias=None):
    """_run_int4_dynamic_mm_panels prepared once for weights that stay the same (ops.LayerCall),
    as _native._bind_int8_dynamic_mm: contiguous float32 rows, and bf16 rows where the AMX
    tiles' bf16 output does not take them, are quantized and multiplied with no other step on
    an ISA with the panel kernels; anything else (and a status other than 0) takes the op's
    general path. None where the weights would need a copy (or realignment)."""
    n, k = codes.shape[0], codes.shape[1] * 2
    pc, sc, zp, b = _aligned(codes), _aligned(scales), zeros.contiguous(), _bias_f32(bias)
    if not (pc is codes and sc is scales and zp is zeros and b is bias):
        return None
    ptrs, mod = (_ptr(pc), _ptr(sc), _ptr(zp), _ptr(b)), module()
    sizes = _workspace_sizes(mod.int4_dynamic_panels_workspace_bytes, k, group_size)
    return _prepared_call(
        n, k,
        _quantized_call(k, "int4dyn", sizes,
                        lambda isa, pxq, pxs, m, out, nt, work, nwork: mod.int4_dynamic_mm_panels(
                            isa, pxq, pxs, m, k, ptrs[0], n, ptrs[1], ptrs[2], group_size,
                            ptrs[3], _ptr(out), nt, _ptr(work), nwork)),
        lambda x: _run_int4_dynamic_mm_panels(x, codes, scales, zeros, group_size, bias),
        # bf16 rows that the AMX tiles' bf16 output takes go the general way, to it
        lambda isa, m, y: has_panel_kernels(isa) and (
            y is None or not mod.int4_dynamic_bf16_applies(isa, m, k, n, group_size)))


_run_int4_dynamic_mm_panels.bind = _bind_int4_dynamic_mm_panels


def int4_dynamic_mm_panels(x, codes, scales, zeros, group_size, bias=None):
    _checks.check_int4_panels_mm("int4_dynamic_mm_panels", x, codes, scales, zeros, group_size,
                                 bias)
    _require_cpu("int4_dynamic_mm_panels", x)
    return _run_int4_dynamic_mm_panels(x, codes, scales, zeros, group_size, bias)


def int4_codes_mm_panels(xq, x_scale, codes, scales, zeros, group_size, bias=None):
    """int4_codes_mm (given activation codes, a row-parallel shard's) on panels."""
    _checks.check_int4_panels_mm("int4_codes_mm_panels",
                                 _check_codes("int4_codes_mm_panels", xq, x_scale), codes,
                                 scales, zeros, group_size, bias)
    return _run_codes(xq, x_scale, codes.shape[0], _int4_panels_codes_mm, codes, scales, zeros,
                      group_size, bias)


# ------------------------------------------------------------------- 2:4 + int8 / int4


def _sparse24_rows(values: torch.Tensor, meta: torch.Tensor, bits: int) -> tuple:
    """The canonical (values, meta) of 4-row panels, in per-thread scratch where the native
    unpacker runs (they live for one call), else new tensors (sparse_panels.unpack)."""
    isa = current_isa()
    if not sparse_panels.has_kernels(isa):
        return sparse_panels.unpack(values, meta, bits)
    n, nb = values.shape[0], values.numel()
    k = sparse_panels.in_features(values, bits)
    v, m = values.contiguous(), meta.contiguous()
    rv = _work(("sparse24_rows", bits), nb, cap=False)[:nb].view(v.dtype).view(v.shape)
    rm = _work("sparse24_rows_meta", m.numel(), cap=False)[:m.numel()].view(m.shape)
    st = module().pack_sparse24_panels(isa, bits, 1, _ptr(rv), _ptr(rm), n, k, _ptr(v), _ptr(m),
                                       _threads())
    if st:
        _raise("pack_sparse24_panels", st, N=n, K=k)
    return rv, rm


def _sparse24_dense(values: torch.Tensor, meta: torch.Tensor, bits: int, zeros=None,
                    group_size: int = 0):
    """The dense weight of 4-row panels (pq_sparse24_panels_decompress), in scratch: int8 [N, K]
    (bits 8) or dense int4 codes [N, K/2] (bits 4), or None where it cannot be written (a
    group's positions not increasing, an int4 zero point past 15)."""
    n = values.shape[0]
    k = sparse_panels.in_features(values, bits)
    v, m = values.contiguous(), meta.contiguous()
    z = None if zeros is None else zeros.contiguous()
    out = (_scratch(torch.int8, n, k) if bits == 8 else _scratch(torch.uint8, n, k // 2))
    st = module().sparse24_panels_decompress(current_isa(), bits, _ptr(v), _ptr(m), n, k,
                                             _ptr(z), group_size, _ptr(out), _threads())
    return None if st else out


def _run_sparse24_panels(op: str, x, values, meta, bits: int, rows, call, dense):
    """A 2:4 panels op. Below the op's dense break-even on an ISA with the panel kernels,
    call(isa, x rows, M, out, work, work bytes) runs the native kernel and returns its status;
    from it, dense() runs the dense path on the weight decompressed from the panels (None:
    it cannot be); otherwise rows(values, meta) runs the canonical op on the unpacked weight."""
    n = values.shape[0]
    k = sparse_panels.in_features(values, bits)
    lead, x2 = _flat(x, n)
    m = x2.shape[0]
    isa = current_isa()
    if sparse_panels.has_kernels(isa):
        if m and n and sparse_dense_reason(op, m):
            y = dense()
            if y is not None:
                return y
        else:
            out = _out(m, n, x.dtype)
            if m and n:
                xf = _rows_f32(x2)
                nwork = module().sparse24_panels_workspace_bytes(isa, m, k)
                work = _work("sparse_fx", max(nwork, 64))
                st = call(isa, xf, m, out, work, nwork)
                if st:
                    _raise(op, st, M=m, N=n, K=k)
            return _finish(out, x, lead, n)
    return rows(*_sparse24_rows(values, meta, bits))


def _sparse24_binder(op: str, prepare, run):
    """run(x, *w), the op, with run.bind(*w) as in _weight_only_binder: prepare(*w) -> (n, k,
    native, copied), native(isa, x rows address, M, ldx, out, threads, work, work bytes)
    the kernel's call on the weights as prepared. The bound call sends contiguous fp32 or bf16
    rows (_bound_rows) below the op's dense break-even straight to it, anything else to run."""
    def bind(*w):
        n, k, native, copied = prepare(*w)
        if copied:
            return None
        sizes = _workspace_sizes(lambda isa, m, nt: module().sparse24_panels_workspace_bytes(
            isa, m, k))

        def bound(x):
            m, xf, out, y = _bound_rows(x, n, k)
            if m:
                isa = current_isa()
                if sparse_panels.has_kernels(isa) and not sparse_dense_reason(op, m):
                    nt = _threads()
                    nwork = sizes(isa, m, nt)
                    work = _work("sparse_fx", max(nwork, 64))
                    if native(isa, xf.data_ptr(), m, k, out, nt, work, nwork) == 0:
                        return _bound_result(out, y)
            return run(x, *w)
        return bound

    run.bind = bind
    return run


def _sparse24_int8_prepare(values_q, meta, scale, bias=None):
    n, k = values_q.shape[0], values_q.shape[1] * 2
    # every tensor whose address crosses over is held by the call until it returns
    v, mt, s, b = values_q.contiguous(), meta.contiguous(), scale.contiguous(), _bias_f32(bias)
    ptrs = (_ptr(v), _ptr(mt), _ptr(s), _ptr(b))

    def native(isa, px, m, ldx, out, nt, work, nwork, _hold=(v, mt, s, b)):
        return module().sparse24_int8_panels_mm(isa, px, m, k, ldx, ptrs[0], ptrs[1], n,
                                                ptrs[2], ptrs[3], _ptr(out), nt, _ptr(work),
                                                nwork)
    return n, k, native, not (v is values_q and mt is meta and s is scale and b is bias)


def _run_sparse24_int8_mm_panels(x, values_q, meta, scale, bias=None):
    native = _sparse24_int8_prepare(values_q, meta, scale, bias)[2]

    def call(isa, xf, m, out, work, nwork):
        return native(isa, _ptr(xf), m, xf.stride(0), out, _threads(), work, nwork)

    def dense():
        wq = _sparse24_dense(values_q, meta, 8)
        return None if wq is None else int8_weight_only_mm(x, wq, scale, bias)

    return _run_sparse24_panels(
        "sparse24_int8_mm_panels", x, values_q, meta, 8,
        lambda v, mt: _run_sparse24_int8_mm(x, v, mt, scale, bias), call, dense)


_sparse24_binder("sparse24_int8_mm_panels", _sparse24_int8_prepare, _run_sparse24_int8_mm_panels)


def sparse24_int8_mm_panels(x, values_q, meta, scale, bias=None):
    _checks.check_sparse24_int8_mm("sparse24_int8_mm_panels", x, values_q, meta, scale, bias)
    _checks.check_sparse24_panels("sparse24_int8_mm_panels", values_q)
    _require_cpu("sparse24_int8_mm_panels", x)
    return _run_sparse24_int8_mm_panels(x, values_q, meta, scale, bias)


def _sparse24_int4_prepare(packed, meta, scales, zeros, group_size, bias=None):
    n, k = packed.shape[0], packed.shape[1] * 4
    p, mt, b = packed.contiguous(), meta.contiguous(), _bias_f32(bias)
    sc, zp = scales.contiguous(), zeros.contiguous()
    ptrs = (_ptr(p), _ptr(mt), _ptr(sc), _ptr(zp), _ptr(b))

    def native(isa, px, m, ldx, out, nt, work, nwork, _hold=(p, mt, sc, zp, b)):
        return module().sparse24_int4_panels_mm(isa, px, m, k, ldx, ptrs[0], ptrs[1], n,
                                                ptrs[2], ptrs[3], group_size, ptrs[4],
                                                _ptr(out), nt, _ptr(work), nwork)
    return n, k, native, not (p is packed and mt is meta and sc is scales and zp is zeros
                              and b is bias)


def _run_sparse24_int4_mm_panels(x, packed, meta, scales, zeros, group_size, bias=None):
    native = _sparse24_int4_prepare(packed, meta, scales, zeros, group_size, bias)[2]

    def call(isa, xf, m, out, work, nwork):
        return native(isa, _ptr(xf), m, xf.stride(0), out, _threads(), work, nwork)

    def dense():  # dense int4 codes: the int4 weight-only kernels, group size 2G over K
        w = _sparse24_dense(packed, meta, 4, zeros, group_size)
        return None if w is None else _run_int4_weight_only_mm(
            x, w, scales.contiguous(), zeros.contiguous(), 2 * group_size, bias)

    return _run_sparse24_panels(
        "sparse24_int4_mm_panels", x, packed, meta, 4,
        lambda p, mt: _run_sparse24_int4_mm(x, p, mt, scales, zeros, group_size, bias), call,
        dense)


_sparse24_binder("sparse24_int4_mm_panels", _sparse24_int4_prepare, _run_sparse24_int4_mm_panels)


def sparse24_int4_mm_panels(x, packed, meta, scales, zeros, group_size, bias=None):
    _checks.check_sparse24_int4_mm("sparse24_int4_mm_panels", x, packed, meta, scales, zeros,
                                   group_size, bias)
    _checks.check_sparse24_panels("sparse24_int4_mm_panels", packed, group_size)
    _require_cpu("sparse24_int4_mm_panels", x)
    return _run_sparse24_int4_mm_panels(x, packed, meta, scales, zeros, group_size, bias)
