"""Process settings that CPU inference wants and that are not the kernels' business.

``keep_freed_memory()``: glibc's malloc gives large freed blocks back to the operating system
(blocks from 128 KiB up by default, and the heap's free top past its trim threshold). A model
encoding a batch allocates and frees activations of several MB per layer (MiniLM at batch 64:
up to 15 MB), so every layer takes them back through page faults, and the kernel zeroes each
page again. Raising the trim threshold and the mmap threshold keeps those blocks in the heap
for the next layer. This is what swapping in jemalloc or tcmalloc does, which PyTorch's CPU
performance guide recommends; here it takes no preload.

Measured on a 2-core VM (all-MiniLM-L6-v2, 256 sentences, batch 64, medians of 5; speedup
over fp32 in the same process, two pairs of processes without / with, alternating): int8
dynamic 1.96-2.09x / 2.39-2.94x, int4 dynamic g64 1.56-1.81x / 1.92-2.53x. The fp32 baseline
gains too, less: the quantized models spend a larger share outside their matmuls.
The setting is process-wide and stays; ``pyquant demo`` applies it to the baseline and to the
quantized models alike and says so (``--no-malloc-tuning`` to measure without).

``keep_freed_memory(large_blocks=True)`` keeps blocks above 32 MB too, the most glibc's mmap
threshold can be raised to: it turns malloc's mmap off (M_MMAP_MAX = 0), so every block comes
from the heap and stays there when freed. Prefill at Llama sizes makes such blocks: an
11008-column float32 output at M = 1024 is 45 MB, mmapped and faulted in on every call.
int8 dynamic, 11008 x 4096 at M = 1024 (2-core VM, medians of 15 calls, two processes each):
34.3-35.3 ms a call as glibc sets it, 36.8 with keep_freed_memory(), 23.6-26.4 with
large_blocks. ``pyquant bench`` applies it (``--no-malloc-tuning`` to measure without). The
cost: memory freed inside the heap is reused but not returned before it reaches the heap's
top, so a process that frees large blocks out of order can hold more.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
_MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_memory(trim_threshold: int = 1 << 30, large_blocks: bool = False) -> bool:
    """Keep freed blocks of up to 32 MB (of any size with ``large_blocks``), and up to
    ``trim_threshold`` bytes of free heap top, in the process instead of returning them to
    the OS (see the module docstring). Returns True when applied, False where the C library
    is not glibc (musl, macOS, Windows: nothing is changed there)."""
    if isinstance(trim_threshold, bool) or not isinstance(trim_threshold, int) \
            or trim_threshold < 0:
        raise ValueError(f"keep_freed_memory: trim_threshold must be an int >= 0, "
                         f"got {trim_threshold!r}")
    if not isinstance(large_blocks, bool):
        raise ValueError(f"keep_freed_memory: large_blocks must be True or False, "
                         f"got {large_blocks!r}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = min(trim_threshold, 2**31 - 1)
    # mallopt returns 1 on success, 0 on error
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and
              mallopt(_M_TRIM_THRESHOLD, trim))
    return ok and (not large_blocks or bool(mallopt(_M_MMAP_MAX, 0)))
