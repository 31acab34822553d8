"""Large CPU weights on transparent huge pages (Linux).

Why: at decode sizes a layer streams its whole weight from memory once per call, and a core
keeps only so many misses in flight. With 4 KiB pages a stream's prefetching starts over at
every page and each page costs a TLB walk. On a 2-core Granite Rapids VM the read probe (eight
streams a thread, 1 GB) read 13.9 GB/s on one core and 28.7 on two from 4 KiB pages, 15.5 and
30.8 from 2 MiB ones; the int4 weight-only panel kernel at M = 1, 4096 x 4096, ran 1.06-1.12x
as fast from huge pages, the 2:4 + int8 one 1.10x and 2:4 bf16 1.20x (in one process, weights
rotated past the cache: python benchmarks/decode_call_ab.py [--op ...] --probe).

Linux gives an anonymous private mapping huge pages when it is marked with madvise(MADV_HUGEPAGE)
before its pages are touched, where /sys/kernel/mm/transparent_hugepage/enabled is "always" or
"madvise" (with "never" nothing changes). torch's allocator does not ask for them (unless
THP_MEM_ALLOC_ENABLE=1 is set before torch allocates anything), so the layers copy each weight
buffer of at least 2 MiB into such a mapping once, when they are swapped in or loaded
(place_module). The copy is an ordinary CPU tensor (torch.frombuffer keeps the mapping alive), so
saving, .to() and the ops see nothing different. PYQUANT_HUGEPAGES=0 turns it off; anything that
fails leaves the tensor where it was.
"""
from __future__ import annotations

import mmap
import os
import sys

import torch

HUGE_PAGE = 2 << 20
# Buffers below one huge page gain nothing (they could not fill one) and would cost a mapping each.
MIN_BYTES = HUGE_PAGE
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or "" where there
    is none (not Linux, or no THP support)."""
    try:
        with open(_THP) as f:
            s = f.read()
    except OSError:
        return ""
    return s[s.index("[") + 1:s.index("]")] if "[" in s else ""


def enabled() -> bool:
    """Whether place() moves buffers: Linux with THP on, mmap.MADV_HUGEPAGE known to Python, and
    PYQUANT_HUGEPAGES not set to 0."""
    if os.environ.get("PYQUANT_HUGEPAGES", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
            and thp_mode() in ("always", "madvise"))


def empty(shape, dtype: torch.dtype) -> torch.Tensor | None:
    """An uninitialized contiguous CPU tensor starting on a 2 MiB boundary of a mapping marked for
    huge pages, or None where that cannot be had."""
    numel = 1
    for s in shape:
        numel *= int(s)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    if not whole:
        return None
    try:
        # private: a shared anonymous mapping is shmem, which the "enabled" mode does not cover
        mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        raw = torch.frombuffer(mm, dtype=torch.uint8)
        off = -raw.data_ptr() % HUGE_PAGE  # the untouched bytes before it are never backed
        # only the whole huge pages: a tail on one would back up to 2 MiB that the tensor does
        # not use (a quantized 1.6 GB Llama grew its peak memory by ~0.03x the model that way)
        mm.madvise(mmap.MADV_HUGEPAGE, off, whole)
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return raw[off:off + nbytes].view(dtype).view(tuple(int(s) for s in shape))


def wanted(t: torch.Tensor) -> bool:
    """Whether place(t) would move t: a contiguous CPU tensor of MIN_BYTES or more, not already
    on a huge-page boundary, with placement enabled."""
    return (isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta
            and t.is_contiguous() and t.numel() * t.element_size() >= MIN_BYTES
            and t.data_ptr() % HUGE_PAGE != 0 and not t.requires_grad and enabled())


def place(t: torch.Tensor) -> torch.Tensor:
    """t copied onto huge pages where wanted(t), else t itself."""
    if not wanted(t):
        return t
    # a normal tensor even under inference_mode, as a buffer made at swap time would be
    with torch.inference_mode(False), torch.no_grad():
        out = empty(t.shape, t.dtype)
        return t if out is None else out.copy_(t)


def place_module(m: torch.nn.Module) -> torch.nn.Module:
    """Moves m's own buffers (not its children's) that place() wants onto huge pages; returns m.
    The memory they leave is handed back to the system (_trim)."""
    moved = False
    for name, b in list(m._buffers.items()):
        if b is not None and wanted(b):
            p = place(b)
            moved |= p is not b
            m._buffers[name] = p
    if moved:
        del b, p
        _trim()
    return m


_libc = None


def _trim() -> None:
    """malloc_trim(0) where the C library is glibc. Why: the buffers place() copied were
    torch allocations of a few MiB, which glibc serves from its heap once its mmap threshold has
    risen (it does as large blocks are freed), and a freed block inside the heap stays counted
    in the process's memory. GPTQ on a 1.6 GB Llama (8 layers of 2048, tests/test_calibrate.py)
    peaked at 1.47x the model's size over the start without it, 1.32x with it, and 1.38x with
    no placement at all (the trim hands back the calibration's freed blocks too)."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc(0)


def on_huge_pages(t: torch.Tensor) -> bool:
    """Whether the kernel backs t's first byte with a huge page now (Linux: /proc/self/smaps);
    for tests and `pyquant info`, not for hot paths."""
    addr = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) > 0
    except OSError:
        return False
    return False
