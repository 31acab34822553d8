"""Builds and runs a loop microbenchmark (benchmarks/*_loop.cpp) against the kernels' headers
as they are in csrc/cpu, with the flags of the AVX512-BF16 build: shared by
sparse24_panel_loop.py and unstructured_loop.py."""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
FLAGS = ["-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
         "-mavx512vnni", "-mavx512bf16", "-mavx512vbmi", "-mavx512vbmi2", "-mavx512bitalg",
         "-mbmi2", "-mfma"]  # PQ_AVX512BF16_FLAGS of CMakeLists.txt


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def cpu_runs_it() -> bool:
    """True when this CPU has what the AVX512-BF16 build needs (Linux: /proc/cpuinfo)."""
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    need = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi",
            "avx512_vbmi2", "avx512_bitalg", "bmi2")
    return all(f in flags for f in need)


def main(stem: str, doc: str, default_reps: int, argv=None) -> int:
    """Compiles benchmarks/<stem>.cpp and prints what it prints (its arguments: reps, passes and,
    where given, K)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--reps", type=int, default=default_reps, help="calls a timed pass")
    ap.add_argument("--passes", type=int, default=25, help="timed passes (the best is kept)")
    ap.add_argument("--k", type=int, default=None,
                    help="the weight's columns, where the loop takes them (a multiple of 128)")
    args = ap.parse_args(argv)
    cxx = compiler()
    if cxx is None:
        print("no C++ compiler (set CXX)", file=sys.stderr)
        return 2
    if not cpu_runs_it():
        print("this CPU lacks the AVX512-BF16 build's instructions (VBMI, VBMI2, BITALG, BF16, "
              "BMI2): nothing to measure", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        exe = pathlib.Path(tmp) / stem
        subprocess.run([cxx, *FLAGS, "-I", str(HERE.parent / "csrc" / "cpu"),
                        str(HERE / f"{stem}.cpp"), "-o", str(exe)], check=True)
        extra = [] if args.k is None else [str(args.k)]
        out = subprocess.run([str(exe), str(args.reps), str(args.passes), *extra], check=True,
                             capture_output=True, text=True).stdout
    print(out, end="")
    return 0
