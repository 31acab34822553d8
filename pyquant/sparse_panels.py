"""The CPU backend's own layout of 2:4 + int8 and 2:4 + int4 weights: 4-row panels, packed once
at swap time (the sparse counterpart of ``pyquant.panels``).

The decode kernels of these layers (csrc/cpu/tile_sparse24_fx_panel.h: every AVX512 level,
AVX512-VNNI, AVX512-BF16 and AMX) multiply two weight rows a register: 64 byte lanes
hold 32 kept values of each, the x bytes under them gathered by one in-lane shuffle per term
from the positions in the meta. From the canonical rows they first put the two rows' values
into one register and their meta into another (a masked broadcast each), and an int4 code
byte holds two neighbours that a variable shift splits; each of the 4 rows of a tile is also
two streams (values, meta). In a panel one load gives a pair's 64 lanes, one 16-byte
broadcast and one shift its meta (each lane's position sits in the byte lane it needs, at
bits 2l of 128-bit lane l), and an int4 byte the same lane of two consecutive steps: 9
vector uops per 64 kept values where the rows take 11 (int8), 11.5 where they take 14
(int4), and a 4-row tile is one stream of values and one of meta. The panel kernels also
run the int8 dot products at every M below the dense break-even (up to 32 rows of x), where
the canonical rows do at M = 1 only, and the dense path decompresses straight from the
panels. Measured on a 2-core Zen 4 against the same ops on the canonical rows (4096 x 4096
and 11008 x 4096, in one process), with the first form of the meta bytes (the canonical
ones reordered, gathered per lane by a byte permute) and the generic loops at M = 1: M = 1
one thread 1.06-1.14x; two threads int4 1.04-1.24x, int8 0.95-1.02x (its two threads stream
at the memory's speed either way); M = 2-16 int4 1.00-1.24x, int8 0.92-1.18x. The decode
loops alone have since gone from 5.6 to 4.5 cycles per 64 columns of a row (int4, group 128)
and from 4.9-5.7 to 3.4 (int8): benchmarks/sparse24_panel_loop.py. On AVX512 without VBMI
(Cascade Lake; the AVX512-VNNI level) the canonical rows have no fixed-point kernels at all, and
the panels are what keeps these layers ahead of dense: at M = 1, two threads, 2:4 + int4 ran
0.52-0.59x pyquant's dense int4 on the rows and 1.22-1.33x on the panels, 2:4 + int8 1.13-1.23x
dense int8 on the rows and 1.15-1.47x on the panels (a 2-core Zen 5 forced to that level,
`PYQUANT_CPU_ISA=avx512_vnni pyquant bench --ms 1`, Llama-2-7B shapes).

The layers (Sparse24Int8Linear, Sparse24Int4Linear) keep their values and meta in panels where
``layout_applies``, and give the canonical formats back for ``state_dict``, checkpoints,
sharding and other devices, as the dense panels do (nn._PanelLayout). The ``*_mm_panels`` ops
(ops.py) take them. Scales and zero points stay canonical.

Layout (N % 4 == 0, K % 128 == 0): quad q is rows 4q .. 4q + 3, pair p its rows 4q + 2p and
4q + 2p + 1. A step s is 32 kept values of each row (columns 64s .. 64s + 63). Lane L of a
pair's 64-byte vector holds pair row r = (L // 8) % 2 and kept value k = 8 (L // 16) + L % 8
of the step, so the rows alternate by 8-byte word:

    int8  values [N, K/2]: values[4q:4q+4].flatten()[128 s + 64 p + L] = value 32 s + k of
          row 4q + 2p + r
    int4  codes [N, K/4]:  codes[4q:4q+4].flatten()[128 d + 64 p + L] = code 64 d + k (low
          nibble) | code 64 d + 32 + k (high nibble) of that row: the same lane of steps
          2d and 2d + 1
    meta  [N, K/8]:        bits 2l, 2l + 1 (l < 4) of meta[4q:4q+4].flatten()[32 s + 16 p +
          8 r + i] (i < 8) = the position of kept value 32 s + 8 l + i of row 4q + 2p + r:
          byte lane 8 r + i of each 128-bit lane l of a pair's 16 bytes a step, so that one
          shift by 2l puts a lane's own position in its low bits

so a quad's panel holds the same bits as its four canonical rows, reordered, and slicing
whole quads is slicing rows.
"""
from __future__ import annotations

import torch

from . import sparse_formats as sf

ROWS = 4  # weight rows a panel
K_ALIGN = 128  # whole pairs of 32-value steps (an int4 byte holds two steps)
MAX_K = 32768  # the kernels' stack copy of a quad's rows (pq.h)

_use_native = True  # tests turn it off to compare the PyTorch packers with the native ones


def in_features(values: torch.Tensor, bits: int) -> int:
    """K of a 2:4 weight from its values: int8 [N, K/2] (bits 8) or int4 codes [N, K/4] (bits 4),
    canonical or in panels (the same shapes)."""
    return values.shape[1] * (2 if bits == 8 else 4)


def shape_ok(n: int, k: int) -> bool:
    """True when an [n, k] 2:4 weight has a panel layout (whole quads, whole step pairs)."""
    return n > 0 and 0 < k <= MAX_K and n % ROWS == 0 and k % K_ALIGN == 0


_HAS_KERNELS: dict = {}


def has_kernels(isa: int) -> bool:
    """True when ISA ``isa``'s native library has the 2:4 panel kernels (its sparse table has
    them: the AVX512 levels)."""
    from . import _native

    if isa not in _HAS_KERNELS:
        # N = 0 packs nothing: the status says only whether the ISA has the packer
        _HAS_KERNELS[isa] = _native.available() and _native.module().pack_sparse24_panels(
            isa, 8, 0, 0, 0, 0, K_ALIGN, 0, 0, 1) == 0
    return _HAS_KERNELS[isa]


def layout_applies(n: int, k: int, device, group_size: int | None = None) -> bool:
    """True when a 2:4 + int8 layer (group_size None) or + int4 layer of group size
    ``group_size`` with out_features n, in_features k on ``device`` should keep its values and
    meta in panels: CPU tensors, the native library loaded, an ISA with the panel kernels,
    whole quads and step pairs, and int4 groups of whole steps (G % 32 == 0)."""
    from . import _native

    if (torch.device(device).type != "cpu" or not shape_ok(n, k)
            or (group_size is not None and group_size % 32)):
        return False
    return _native.available() and has_kernels(_native.current_isa())


def _check(what: str, values: torch.Tensor, meta: torch.Tensor, bits: int) -> tuple:
    n = values.shape[0] if values.dim() == 2 else -1
    per = 2 if bits == 8 else 4  # columns of K a byte of values
    k = in_features(values, bits) if values.dim() == 2 else -1
    dtype = torch.int8 if bits == 8 else torch.uint8
    if (bits not in (4, 8) or values.dtype != dtype or not shape_ok(n, k)
            or meta.dtype != torch.uint8 or tuple(meta.shape) != (n, k // 8)):
        raise ValueError(
            f"{what} takes 2:4 {'int8 values' if bits == 8 else 'int4 codes'} "
            f"{dtype} [N, K/{per}] and meta uint8 [N, K/8] with N % {ROWS} == 0, "
            f"K % {K_ALIGN} == 0 and K <= {MAX_K}, got {values.dtype} "
            f"{tuple(values.shape)} and meta {meta.dtype} {tuple(meta.shape)}")
    return n, k


def _native_pack(bits: int, unpack: bool, values: torch.Tensor, meta: torch.Tensor, n: int,
                 k: int):
    """(values, meta) the other way round by pq_pack_sparse24_panels, or None where it does
    not run (no native library, an ISA without the kernels, a tensor subclass being traced)."""
    from . import _native

    if (not _use_native or type(values) is not torch.Tensor or type(meta) is not torch.Tensor
            or values.device.type != "cpu" or not _native.available()):
        return None
    isa = _native.current_isa()
    if not has_kernels(isa):
        return None
    v, m = values.contiguous(), meta.contiguous()
    ov, om = torch.empty_like(v), torch.empty_like(m)
    rows, panel = ((ov, om), (v, m)) if unpack else ((v, m), (ov, om))
    st = _native.module().pack_sparse24_panels(
        isa, bits, int(unpack), rows[0].data_ptr(), rows[1].data_ptr(), n, k,
        panel[0].data_ptr(), panel[1].data_ptr(), _native._threads())
    return None if st else (ov, om)


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., B] -> [..., B, 2]: (low, high) nibble of each byte."""
    return torch.stack((codes & 0x0F, codes >> 4), dim=-1)


_LANE_SHIFTS = (0, 2, 4, 6)  # a panel meta byte's bits of 128-bit lane l: 2l, 2l + 1


def _pack_meta(meta: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Canonical meta [N, K/8] -> its panel bytes (the docstring's formula)."""
    q, s = n // ROWS, k // 64
    # kept value 32 s + 8 l + i of row 2 p + r: (quad, pair, row, step, l, i)
    pos = sf.unpack_24_meta(meta, k).to(torch.uint8).reshape(q, 2, 2, s, 4, 8)
    pos = pos.permute(0, 3, 1, 2, 5, 4)  # (quad, step, pair, row, i, l)
    out = torch.zeros(pos.shape[:-1], dtype=torch.uint8, device=meta.device)
    for lane, shift in enumerate(_LANE_SHIFTS):
        out |= pos[..., lane] << shift
    return out.contiguous().view(n, k // 8)


def _unpack_meta(pm: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Panel meta bytes -> the canonical meta [N, K/8]; the inverse of _pack_meta."""
    q, s = n // ROWS, k // 64
    b = pm.reshape(q, s, 2, 2, 8)  # (quad, step, pair, row, i)
    pos = torch.stack([(b >> shift) & 3 for shift in _LANE_SHIFTS], dim=-1)  # ..., l
    pos = pos.permute(0, 2, 3, 1, 5, 4).reshape(n, k // 2)  # (quad, pair, row, step, l, i)
    return sf.pack_24_meta(pos)


def pack(values: torch.Tensor, meta: torch.Tensor, bits: int) -> tuple:
    """Canonical 2:4 + int8 (bits 8: values int8 [N, K/2]) or + int4 (bits 4: codes uint8
    [N, K/4]) and meta [N, K/8] -> their panels (same dtypes and shapes)."""
    n, k = _check("sparse_panels.pack", values, meta, bits)
    out = _native_pack(bits, False, values, meta, n, k)
    if out is not None:
        return out
    q, s = n // ROWS, k // 64
    if bits == 8:  # (quad, pair, row, step, k // 8, k % 8) -> (quad, step, pair, k // 8, row, k % 8)
        v = values.reshape(q, 2, 2, s, 4, 8).permute(0, 3, 1, 4, 2, 5)
        pv = v.contiguous().view(n, k // 2)
    else:  # kept value 64 d + 32 h + k: (quad, pair, row, d, h, k // 8, k % 8)
        c = _nibbles(values).reshape(q, 2, 2, s // 2, 2, 4, 8)
        c = c.permute(0, 3, 1, 5, 2, 6, 4)  # (quad, d, pair, k // 8, row, k % 8, h)
        pv = (c[..., 0] | (c[..., 1] << 4)).contiguous().view(n, k // 4)
    return pv, _pack_meta(meta, n, k)


def unpack(values: torch.Tensor, meta: torch.Tensor, bits: int) -> tuple:
    """The panels of ``pack`` -> the canonical (values, meta); its exact inverse."""
    n, k = _check("sparse_panels.unpack", values, meta, bits)
    out = _native_pack(bits, True, values, meta, n, k)
    if out is not None:
        return out
    q, s = n // ROWS, k // 64
    if bits == 8:
        v = values.reshape(q, s, 2, 4, 2, 8).permute(0, 2, 4, 1, 3, 5)
        rv = v.contiguous().view(n, k // 2)
    else:
        c = _nibbles(values).reshape(q, s // 2, 2, 4, 2, 8, 2)  # (quad, d, pair, k//8, row, k%8, h)
        c = c.permute(0, 2, 4, 1, 6, 3, 5).reshape(n, k // 2)  # kept order along the row
        c = c.view(n, k // 4, 2)
        rv = (c[..., 0] | (c[..., 1] << 4)).contiguous()
    return rv, _unpack_meta(meta, n, k)
