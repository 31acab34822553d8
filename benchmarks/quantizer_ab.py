"""The per-row int8 quantizer of two builds in one process: pq_quantize_rows_int8 alone.

int8 and int4 dynamic quantize every row of x on every call (its max |x|, then round(x / s)
into int8 codes); this times that step alone, build A against build B, calls alternated in
one process (benchmarks/ab_inprocess.py loads the builds), on the activation sizes of real
layers. Each line gives the medians of A and B and the ratio A / B (> 1: B faster), then the
checks that both builds wrote the same codes and scales.

    cp pyquant/_C*.so /tmp/a.so     # build A; then change, rebuild, and
    cp pyquant/_C*.so /tmp/b.so     # build B
    python benchmarks/quantizer_ab.py /tmp/a.so /tmp/b.so [--sizes 2560x384,1024x4096]

Measured with it: the quotient from a reciprocal and two FMAs (csrc/cpu/tile_int8.h,
div_by_reciprocal) against vdivps.
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import sys
import time

import torch

DEFAULT_SIZES = "2560x384,2560x1536,128x4096,1024x4096,128x11008"


def _ab_module():
    path = pathlib.Path(__file__).resolve().parent / "ab_inprocess.py"
    spec = importlib.util.spec_from_file_location("ab_inprocess", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    from pyquant import _native

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="build A: a copy of pyquant/_C*.so")
    ap.add_argument("b", help="build B")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated M x K of x")
    ap.add_argument("--calls", type=int, default=20, help="calls a timing")
    ap.add_argument("--rounds", type=int, default=15, help="timings of each build a size")
    ap.add_argument("--threads", type=int, default=None, help="default: pyquant's")
    a = ap.parse_args(argv)
    if not _native.available():
        print(f"pyquant's native module is not loaded ({_native.load_error()})", file=sys.stderr)
        return 2
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in a.sizes.split(",") if s]
    except ValueError:
        ap.error(f"--sizes {a.sizes!r}: want M x K pairs such as 2560x384")
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        ap.error(f"--sizes {a.sizes!r}: want M x K pairs of positive sizes")
    if a.calls < 1 or a.rounds < 1:
        ap.error("--calls and --rounds must be >= 1")
    ab = _ab_module()
    builds = {"A": ab.load_build(a.a, "a"), "B": ab.load_build(a.b, "b")}
    isa = _native.current_isa()
    threads = a.threads or _native._threads()
    g = torch.Generator().manual_seed(0)
    print(f"pq_quantize_rows_int8, {threads} thread(s), ISA {_native.ISA_NAMES[isa]}; "
          f"medians of {a.rounds} timings of {a.calls} calls")
    same = True
    for m, k in sizes:
        # per-row magnitudes, as a layer's activations have
        x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
        out = {t: (torch.empty(m, k, dtype=torch.int8), torch.empty(m)) for t in builds}

        def call(t):
            q, s = out[t]
            st = builds[t].quantize_rows_int8(isa, x.data_ptr(), m, k, k, q.data_ptr(),
                                              s.data_ptr(), threads)
            if st:
                raise RuntimeError(f"build {t}: pq_quantize_rows_int8 returned {st}")

        times = {t: [] for t in builds}
        for t in builds:  # warm both
            call(t)
        for r in range(a.rounds):
            for t in ("A", "B") if r % 2 == 0 else ("B", "A"):
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    call(t)
                times[t].append((time.perf_counter() - t0) / a.calls * 1e6)
        ma, mb = statistics.median(times["A"]), statistics.median(times["B"])
        equal = (torch.equal(out["A"][0], out["B"][0])
                 and torch.equal(out["A"][1], out["B"][1]))
        same &= equal
        print(f"  {m:6d} x {k:<6d} A {ma:9.1f} us  B {mb:9.1f} us  A/B {ma / mb:5.2f}x  "
              f"{m * k / mb / 1e3:6.2f} Gvalues/s (B)"
              + ("" if equal else "  codes or scales differ"))
    print("both builds wrote the same codes and scales" if same
          else "the builds' codes or scales differ")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
