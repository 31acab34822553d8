"""The native ops on the CPU panel layout of the weights (pyquant/panels.py): argument checks,
scratch and the call into pyquant._C, as in _native.py, whose helpers they use.

On an ISA without the panel kernels (AVX2, portable, or a lower one forced), and for rows of x
that 24-bit fixed point cannot hold (Inf, NaN, a max below 2^-100: the weight-only kernels
return PQ_NOT_FIXED_POINT), the canonical tensors, unpacked for that call, run the canonical
kernels: the same results as a layer kept in rows, at the cost of the unpacking."""
from __future__ import annotations

import torch

from . import _checks, panels
from ._native import (
    _NOT_FIXED_POINT, _bias_f32, _check_codes, _finish, _flat, _int4_codes_mm,
    _int8_codes_mm, _out, _ptr, _raise, _require_cpu, _rows_f32, _run_codes, _run_dynamic,
    _run_int4_weight_only_mm, _run_int8_weight_only_mm, _threads, _work, current_isa,
    has_panel_kernels, module)


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


def _run_weight_only(op: str, x, n: int, k: int, rows, call):
    """A weight-only op on panels: call(isa, x rows address, M, ldx, out, threads) runs the
    native kernel and returns its status; rows() runs the canonical tensors instead, on an
    ISA without the panel kernels or for rows that fixed point cannot hold."""
    isa = current_isa()
    if not has_panel_kernels(isa):
        return rows()
    lead, x2 = _flat(x, n)
    m = x2.shape[0]
    out = _out(m, n, x.dtype)
    if m:
        xf = _rows_f32(x2)
        st = call(isa, _ptr(xf), m, xf.stride(0), out, _threads())
        if st == _NOT_FIXED_POINT:
            return rows()
        if st:
            _raise(op, st, M=m, N=n, K=k)
    return _finish(out, x, lead, n)


def _run_int8_weight_only_mm_panels(x, p, w_scale, bias=None):
    n, k = p.shape

    def call(isa, px, m, ldx, out, nt):
        # every tensor whose address crosses over is held in a name until the call returns
        pa, ws, b = _aligned(p), w_scale.contiguous(), _bias_f32(bias)
        nwork = module().int8_weight_only_panels_workspace_bytes(isa, m, k, nt)
        work = _work("int8wo", nwork)
        return module().int8_weight_only_mm_panels(isa, px, m, k, ldx, _ptr(pa), n, _ptr(ws),
                                                   _ptr(b), _ptr(out), nt, _ptr(work), nwork)

    def rows():
        return _run_int8_weight_only_mm(x, panels.unpack_int8(p), w_scale, bias)

    return _run_weight_only("int8_weight_only_mm_panels", x, n, k, rows, call)


def int8_weight_only_mm_panels(x, p, w_scale, bias=None):
    _checks.check_int8_panels_mm("int8_weight_only_mm_panels", x, p, w_scale, bias)
    _require_cpu("int8_weight_only_mm_panels", x)
    return _run_int8_weight_only_mm_panels(x, p, w_scale, bias)


def _run_int8_dynamic_mm_panels(x, p, w_scale, bias=None):
    return _run_dynamic(x, *p.shape, _int8_panels_codes_mm, p, w_scale, bias)


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
    nwork = module().int4_panels_workspace_bytes(m, k, group_size)
    work = _work("int4dyn", max(nwork, 64))
    st = module().int4_dynamic_mm_panels(isa, pxq, pxs, m, k, _ptr(codes), n, _ptr(scales),
                                         _ptr(zp), group_size, _ptr(b), _ptr(out), _threads(),
                                         _ptr(work), nwork)
    if st:
        _raise("int4_dynamic_mm_panels", st, M=m, N=n, K=k, group_size=group_size)


def _run_int4_weight_only_mm_panels(x, codes, scales, zeros, group_size, bias=None):
    n, k = codes.shape[0], codes.shape[1] * 2

    def call(isa, px, m, ldx, out, nt):
        # every tensor whose address crosses over is held in a name until the call returns
        pc, sc, zp, b = _aligned(codes), _aligned(scales), zeros.contiguous(), _bias_f32(bias)
        nwork = module().int4_weight_only_panels_workspace_bytes(isa, m, k, group_size, nt)
        work = _work("int4wo", nwork)
        return module().int4_weight_only_mm_panels(isa, px, m, k, ldx, _ptr(pc), n, _ptr(sc),
                                                   _ptr(zp), group_size, _ptr(b), _ptr(out), nt,
                                                   _ptr(work), nwork)

    def rows():
        return _run_int4_weight_only_mm(x, *panels.unpack_int4(codes, scales, zeros, group_size),
                                        group_size, bias)

    return _run_weight_only("int4_weight_only_mm_panels", x, n, k, rows, call)


def int4_weight_only_mm_panels(x, codes, scales, zeros, group_size, bias=None):
    _checks.check_int4_panels_mm("int4_weight_only_mm_panels", x, codes, scales, zeros,
                                 group_size, bias)
    _require_cpu("int4_weight_only_mm_panels", x)
    return _run_int4_weight_only_mm_panels(x, codes, scales, zeros, group_size, bias)


def _run_int4_dynamic_mm_panels(x, codes, scales, zeros, group_size, bias=None):
    return _run_dynamic(x, codes.shape[0], codes.shape[1] * 2, _int4_panels_codes_mm, codes,
                        scales, zeros, group_size, bias)


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
