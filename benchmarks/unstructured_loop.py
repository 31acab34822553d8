"""Cycles of the unstructured kernels' loops (bf16 and float decode, decompression), and the
Zen 4 behaviour they are built around: a vpexpandw load waits on its destination register.

Compiles benchmarks/unstructured_loop.cpp with the flags of the AVX512-BF16 build (the
kernels' headers as they are in csrc/cpu) and runs it, one thread: cycles a vpexpandw into one
register against four, cycles per 64 columns of a row for each loop with 16 rows of K = 4096
(30% kept) in cache, and the bf16 and fp32 decode loops over a 4096 x 4096 weight streamed from
memory.
A kernel change shows here without the memory system's noise; `pyquant bench` shows what it
does for a whole call.

    python benchmarks/unstructured_loop.py [--reps 200] [--passes 25]

Needs a C++ compiler (CXX or g++) and a CPU with AVX512-VBMI, VBMI2, BITALG, BF16 and BMI2.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _loop_build  # noqa: E402
from _loop_build import compiler, cpu_runs_it  # noqa: E402,F401  (for the tests)


def main(argv=None) -> int:
    return _loop_build.main("unstructured_loop", __doc__, 200, argv)


if __name__ == "__main__":
    raise SystemExit(main())
