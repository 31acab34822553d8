"""Cycles of the 2:4 + int8 / int4 panel kernels' inner loops, and of their instruction mix.

Compiles benchmarks/sparse24_panel_loop.cpp with the flags of the AVX512-BF16 build (the
kernels' headers as they are in csrc/cpu) and runs it: one quad in L1, one thread, cycles per
64 columns of a weight row and row of x, against the decode step's instruction mix from
registers, the most the loop could do on this core. A kernel change shows here without the
memory system's noise; `pyquant bench` shows what it does for a whole call. In between, the
decode loops over a 4096 x 4096 weight streamed from memory (one thread, copies rotated
through 256 MB): cycles above the L1 ones are loads waiting on memory (the int4 loop's L1
prefetch came from there).

    python benchmarks/sparse24_panel_loop.py [--reps 2000] [--passes 25] [--k 11008]

Needs a C++ compiler (CXX or g++) and a CPU with AVX512-VBMI, VBMI2, BITALG, BF16 and BMI2.
"""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _loop_build  # noqa: E402
from _loop_build import compiler, cpu_runs_it  # noqa: E402,F401  (for the tests)


def main(argv=None) -> int:
    return _loop_build.main("sparse24_panel_loop", __doc__, 2000, argv)


if __name__ == "__main__":
    raise SystemExit(main())
