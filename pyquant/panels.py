"""The CPU backend's own layout of int8 and int4 weights: 32-row panels, packed once at swap
time.

The int8 dot-product kernels of the AVX512 ISAs (csrc/cpu/tile_vnni_panel.h) run with their
dword lanes along N: each step of 4 k multiplies 32 weight rows by one broadcast of 4 x codes.
From the canonical rows they would convert every 32-row panel on every call, a pass over
the weights that does not overlap the products (~1.2 ms a call for 11008 x 4096, as much
as the products of ~10 rows of x). The int8 and int4 layers (pyquant/nn.py, _PanelLayout)
therefore keep their weights in the panel layout where the native library says that it runs
fastest from it (``panel_layout_applies``, ``int4_panel_layout_applies``), and convert back
to the canonical formats for ``state_dict``, checkpoints, sharding and other devices: the
layout never leaves the layer. The ``*_panels`` ops (ops.py) take it.

Layout (N % 32 == 0, K % 64 == 0), uint8 [N, K] holding the bytes [N/32][K/4][2][16][4]:

    panels[p, j, h, i, c] = w[32 p + 16 h + i, 4 j + c] + 128

so panel p is rows 32 p .. 32 p + 31 of the [N, K] view (slicing whole panels is slicing
rows), and within it the 4 codes of k = 4j .. 4j + 3 of 16 rows are one 64-byte vector:
u8 operands for the u8 x s8 dot product (w >= -127, so w + 128 fits).

The int4 layers keep their weight the same way (N % 32 == 0, K % 64 == 0, group size
G % 32 == 0), in the bytes of the canonical format: codes uint8 [N, K/2] holding
[N/32][K/8][2][16][4] bytes, and the scales (float32) and zero points (uint8) [N, K/G]
holding [N/32][K/G][32]:

    codes[p, j, h, i, c] = code[n, 8 j + c] | code[n, 8 j + 4 + c] << 4,  n = 32 p + 16 h + i
    scales[p, g, r] = scales[32 p + r, g]      (zeros likewise)

One 64-byte load then holds 8 k of 16 rows, its low nibbles k = 8j .. 8j + 3 and its high
ones 8j + 4 .. 8j + 7, and a group's 32 scales are two vectors.

On AMX CPUs the int4 layers keep panels too. Weight-only
(``int4_weight_only_panel_layout_applies``): decode runs the panels' GEMV, and from M = 16
the AMX-BF16 tiles convert each 32-row strip from its panel (csrc/cpu/tile_amx_bf16.h) into
the same bytes as from the rows (0.8-0.9x as fast at M = 16, even from M = 128). W4A8
(``int4_panel_layout_applies``): decode runs the panels' VNNI GEMV, and from M = 9 the int8
tiles convert each strip from its panel (amx_int4dyn_convert_panels,
csrc/cpu/tile_amx_int4dyn.h), faster than from the rows: 1.02-1.21x at M = 1, 1.23-1.77x at
M = 8-32, 1.06-1.13x from M = 128 (benchmarks/panel_layout_ab.py, Llama-2-7B shapes). The
int8 layers keep rows, which their int8 tiles load as they are.
"""
from __future__ import annotations

import torch

ROWS = 32  # weight rows a panel
K_ALIGN = 64  # the kernels step K by 64-byte vectors


def shape_ok(n: int, k: int) -> bool:
    """True when an [n, k] int8 weight has a panel layout (whole panels, whole vectors)."""
    return n > 0 and k > 0 and n % ROWS == 0 and k % K_ALIGN == 0


def _check_int8(what: str, t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if t.dtype != dtype or t.dim() != 2 or not shape_ok(*t.shape):
        raise ValueError(f"{what} takes {name} [N, K] with N % {ROWS} == 0 and K % {K_ALIGN} "
                         f"== 0, got {t.dtype} {tuple(t.shape)}")


def pack_int8(w: torch.Tensor) -> torch.Tensor:
    """Canonical int8 [N, K] -> the panel layout above, uint8 [N, K]."""
    _check_int8("pack_int8", w, torch.int8, "an int8 weight")
    n, k = w.shape
    w = w.contiguous()
    out = _native_pack(8, w, n, k)
    if out is not None:
        return out
    u = w.view(torch.uint8) ^ 0x80  # w + 128 (mod 256): the bits of w, top flipped
    return u.reshape(n // ROWS, 2, 16, k // 4, 4).permute(0, 3, 1, 2, 4).contiguous().view(n, k)


def _native_pack(bits: int, w: torch.Tensor, n: int, k: int, unpack: bool = False):
    """The native packer, or with ``unpack`` unpacker (pq_pack_panels), where this ISA has it
    and the sizes suit it (int4: K % 128 == 0), else None: the same bytes (tests compare
    both), and quicker when a model is quantized, loaded or saved (11008 x 4096 on a Zen 4:
    packing int8 14 ms and int4 9 ms, against 44 and 82 ms for the PyTorch reshuffle;
    unpacking 12 and 7 ms, against 38 and 118 ms)."""
    from . import _native

    # a tensor subclass (FakeTensor, FunctionalTensor: torch.compile tracing the autograd
    # formula) has no data to hand over: the PyTorch reshuffle traces
    if (type(w) is not torch.Tensor or not _native.available() or w.device.type != "cpu"
            or not _use_native
            or not _native.has_panel_kernels(_native.current_isa())
            or (bits == 4 and k % 128) or (unpack and w.data_ptr() % 64)):
        return None
    dtype = torch.int8 if bits == 8 and unpack else torch.uint8
    out = torch.empty((n, k * bits // 8), dtype=dtype)
    st = _native.module().pack_panels(_native.current_isa(), bits, int(unpack), w.data_ptr(), n,
                                      k, out.data_ptr(), _native._threads())
    return None if st else out


_use_native = True  # tests turn it off to compare the PyTorch packers with the native ones


def unpack_int8(panels: torch.Tensor) -> torch.Tensor:
    """The panel layout -> canonical int8 [N, K]; the exact inverse of ``pack_int8``."""
    _check_int8("unpack_int8", panels, torch.uint8, "uint8 panels")
    n, k = panels.shape
    panels = panels.contiguous()
    out = _native_pack(8, panels, n, k, unpack=True)
    if out is not None:
        return out
    p = panels.view(n // ROWS, k // 4, 2, 16, 4).permute(0, 2, 3, 1, 4)
    return (p.contiguous().view(n, k) ^ 0x80).view(torch.int8)


def _check_int4(what, codes, scales, zeros, group_size):
    n, half = codes.shape if codes.dim() == 2 else (0, 0)
    ok = (codes.dtype == torch.uint8 and codes.dim() == 2 and isinstance(group_size, int)
          and group_size > 0 and group_size % 32 == 0 and shape_ok(n, 2 * half)
          and (2 * half) % group_size == 0
          and scales.shape == (n, 2 * half // group_size) and scales.dtype == torch.float32
          and zeros.shape == scales.shape and zeros.dtype == torch.uint8)
    if not ok:
        raise ValueError(
            f"{what} takes codes uint8 [N, K/2], scales float32 and zeros uint8 [N, K/G] with "
            f"N % {ROWS} == 0, K % {K_ALIGN} == 0 and G % 32 == 0, got codes {codes.dtype} "
            f"{tuple(codes.shape)}, scales {scales.dtype} {tuple(scales.shape)}, zeros "
            f"{zeros.dtype} {tuple(zeros.shape)}, group_size={group_size!r}")


def _groups_to_panels(t: torch.Tensor) -> torch.Tensor:
    n, ng = t.shape
    return t.reshape(n // ROWS, ROWS, ng).transpose(1, 2).contiguous().view(n, ng)


def _groups_from_panels(t: torch.Tensor) -> torch.Tensor:
    n, ng = t.shape
    return t.contiguous().view(n // ROWS, ng, ROWS).transpose(1, 2).reshape(n, ng)


def pack_int4(w_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> tuple:
    """Canonical int4 (formats.pack_int4's bytes, scales, zeros) -> the panel layout above:
    (codes uint8 [N, K/2], scales float32 [N, K/G], zeros uint8 [N, K/G])."""
    from . import formats

    _check_int4("pack_int4", w_packed, scales, zeros, group_size)
    n, k = w_packed.shape[0], 2 * w_packed.shape[1]
    w_packed = w_packed.contiguous()
    codes = _native_pack(4, w_packed, n, k)
    if codes is None:
        c = formats.unpack_int4(w_packed).reshape(n // ROWS, 2, 16, k // 8, 2, 4)
        c = c.permute(0, 3, 1, 2, 5, 4)  # (p, j, h, i, c, low/high)
        codes = (c[..., 0] | (c[..., 1] << 4)).contiguous().view(n, k // 2)
    return codes, _groups_to_panels(scales), _groups_to_panels(zeros)


def unpack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> tuple:
    """The int4 panel layout -> canonical (w_packed, scales, zeros); the exact inverse."""
    from . import formats

    _check_int4("unpack_int4", codes, scales, zeros, group_size)
    n, k = codes.shape[0], 2 * codes.shape[1]
    codes = codes.contiguous()
    w_packed = _native_pack(4, codes, n, k, unpack=True)
    if w_packed is None:
        b = codes.view(n // ROWS, k // 8, 2, 16, 4)
        c = torch.stack((b & 0x0F, b >> 4), dim=-1)  # (p, j, h, i, c, low/high)
        w_packed = formats.pack_int4(c.permute(0, 2, 3, 1, 5, 4).reshape(n, k))
    return w_packed, _groups_from_panels(scales), _groups_from_panels(zeros)


def panel_layout_applies(n: int, k: int, device) -> bool:
    """True when a W8A8 layer of out_features n, in_features k on ``device`` should keep
    its weight in panels: CPU tensors, the native library loaded, an ISA whose kernels run
    them (AVX512-VNNI, AVX512-BF16; AMX tiles take the canonical rows faster)."""
    from . import _native

    if torch.device(device).type != "cpu" or not shape_ok(n, k) or not _native.available():
        return False
    return bool(_native.module().int8_panel_layout(_native.current_isa(), k, n))


def int4_panel_layout_applies(n: int, k: int, group_size: int, device) -> bool:
    """As panel_layout_applies, for a W4A8 layer of group size ``group_size``: on AMX CPUs too
    (pq.h, pq_int4_panel_layout)."""
    from . import _native

    if torch.device(device).type != "cpu" or not shape_ok(n, k) or not _native.available():
        return False
    return bool(_native.module().int4_panel_layout(_native.current_isa(), k, n, group_size))


def int4_weight_only_panel_layout_applies(n: int, k: int, group_size: int, device) -> bool:
    """As int4_panel_layout_applies, for an int4 weight-only layer: on AMX CPUs too, whose
    prefill converts its tile strips from the panels as it would from the rows (pq.h,
    pq_int4_weight_only_panel_layout)."""
    from . import _native

    if torch.device(device).type != "cpu" or not shape_ok(n, k) or not _native.available():
        return False
    return bool(_native.module().int4_weight_only_panel_layout(_native.current_isa(), k, n,
                                                               group_size))
