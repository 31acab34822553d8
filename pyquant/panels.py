"""The CPU backend's own layout of int8 weights: 32-row panels, packed once at swap time.

The W8A8 kernels of the AVX512 ISAs (csrc/cpu/tile_vnni_panel.h) run with their dword
lanes along N: each step of 4 k multiplies 32 weight rows by one broadcast of 4 x codes.
From the canonical rows they would convert every 32-row panel on every call, a pass over
the weights that does not overlap the products (~1.2 ms a call for 11008 x 4096, as much
as the products of ~10 rows of x). ``Int8DynamicLinear`` therefore keeps its weight in the
panel layout where the native library says that it runs fastest from it
(``panel_layout_applies``), and converts back to the canonical rows for ``state_dict``,
checkpoints, sharding and other devices: the layout never leaves the layer.

Layout (N % 32 == 0, K % 64 == 0), uint8 [N, K] holding the bytes [N/32][K/4][2][16][4]:

    panels[p, j, h, i, c] = w[32 p + 16 h + i, 4 j + c] + 128

so panel p is rows 32 p .. 32 p + 31 of the [N, K] view (slicing whole panels is slicing
rows), and within it the 4 codes of k = 4j .. 4j + 3 of 16 rows are one 64-byte vector:
u8 operands for the u8 x s8 dot product (w >= -127, so w + 128 fits).
"""
from __future__ import annotations

import torch

ROWS = 32  # weight rows a panel
K_ALIGN = 64  # the kernels step K by 64-byte vectors


def shape_ok(n: int, k: int) -> bool:
    """True when an [n, k] int8 weight has a panel layout (whole panels, whole vectors)."""
    return n > 0 and k > 0 and n % ROWS == 0 and k % K_ALIGN == 0


def pack_int8(w: torch.Tensor) -> torch.Tensor:
    """Canonical int8 [N, K] -> the panel layout above, uint8 [N, K]."""
    if w.dtype != torch.int8 or w.dim() != 2 or not shape_ok(*w.shape):
        raise ValueError(f"pack_int8 takes an int8 [N, K] weight with N % {ROWS} == 0 and "
                         f"K % {K_ALIGN} == 0, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    u = w.contiguous().view(torch.uint8) ^ 0x80  # w + 128 (mod 256): the bits of w, top flipped
    return u.reshape(n // ROWS, 2, 16, k // 4, 4).permute(0, 3, 1, 2, 4).contiguous().view(n, k)


def unpack_int8(panels: torch.Tensor) -> torch.Tensor:
    """The panel layout -> canonical int8 [N, K]; the exact inverse of ``pack_int8``."""
    if panels.dtype != torch.uint8 or panels.dim() != 2 or not shape_ok(*panels.shape):
        raise ValueError(f"unpack_int8 takes uint8 panels [N, K] with N % {ROWS} == 0 and "
                         f"K % {K_ALIGN} == 0, got {panels.dtype} {tuple(panels.shape)}")
    n, k = panels.shape
    p = panels.contiguous().view(n // ROWS, k // 4, 2, 16, 4).permute(0, 2, 3, 1, 4)
    return (p.contiguous().view(n, k) ^ 0x80).view(torch.int8)


def panel_layout_applies(n: int, k: int, device) -> bool:
    """True when a W8A8 layer of out_features n, in_features k on ``device`` should keep
    its weight in panels: CPU tensors, the native library loaded, an ISA whose kernels run
    them (AVX512-VNNI, AVX512-BF16; AMX tiles take the canonical rows faster)."""
    from . import _native

    if torch.device(device).type != "cpu" or not shape_ok(n, k) or not _native.available():
        return False
    return bool(_native.module().int8_panel_layout(_native.current_isa(), k, n))
