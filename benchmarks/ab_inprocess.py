"""A/B of two builds of the native library in one process, through the ops the layers run.

Loads build A and build B (copies of pyquant/_C*.so) as two modules of one process and times
the `pyquant bench` impls named by --impls with each, call by call: before every call the
Python side of pyquant is pointed at that call's build (pyquant._native._module), so both
builds run the same Python path, the same threads and the same weights' layout. The calls of
A, B and a few baselines (fp32 F.linear, int4pack, the read probe: other traffic between two
calls, as in `pyquant bench`) are interleaved in a fresh random order every round
(bench._time_interleaved; at decode sizes in runs of calls of one kind, as the bench times
them), each on its own rotating weight copies. Every run prints, per
impl and shape, the medians of A and B and their ratio; then the ratios of all runs.

    cp pyquant/_C*.so /tmp/a.so     # build A; then change, rebuild, and
    cp pyquant/_C*.so /tmp/b.so     # build B
    python benchmarks/ab_inprocess.py /tmp/a.so /tmp/b.so --impls "int4_weight_only_mm[g128]"

Why: benchmarks/ab_builds.py runs each build in its own worker process, and on a 2-core VM
the two workers' placement alone moved a build against itself by up to 1.2x. Here a build
against a copy of itself read medians of 0.997-1.036 over four runs (single runs 0.92-1.21:
the machine, not the tool; check it with a.so a.so first, and take several runs). Run both
orders and take the geometric mean of the two: in some pairs build B came out 2-5% ahead
whichever build it was (the runs also alternate which build's weight copies are made first).
Measured with it: the W4A8 panel decode's two-level prefetch (csrc/cpu/tile_vnni_panel.h)
against the one before it, int4 weight-only at M = 1, four sets at different times:
1.00-1.06x on 4096x4096, 0.99-1.11x on 11008x4096 and 1.00-1.10x on 4096x11008. Both builds
must read the same weight layouts (the packers of the build pyquant imports made them): for
kernel experiments, not for format changes.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile

import torch


def load_build(path: str, tag: str):
    """The extension module in `path`, loaded beside pyquant._C under a name of its own (a
    copy of the file under `tag`, so that the dynamic loader maps a second library)."""
    here = tempfile.mkdtemp(prefix=f"pq_ab_{tag}_")
    copy = os.path.join(here, "_C" + os.path.splitext(path)[1])
    shutil.copyfile(path, copy)
    spec = importlib.util.spec_from_file_location(f"pq_ab_{tag}._C", copy)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    finally:  # mapped by now: the file can go (where the system lets it)
        shutil.rmtree(here, ignore_errors=True)
    if hasattr(mod, "init"):
        mod.init()
    return mod


def main(argv=None) -> int:
    from pyquant import _native, bench, bench_sparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="build A: a copy of pyquant/_C*.so")
    ap.add_argument("b", help="build B")
    ap.add_argument("--impls", default="int4_weight_only_mm[g128]",
                    help="comma-separated substrings of the pyquant impls of `pyquant bench`")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008",
                    help="comma-separated N x K")
    ap.add_argument("--m", type=int, default=1, help="rows of x")
    ap.add_argument("--iters", type=int, default=80, help="rounds a run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rotate-mb", type=int, default=None,
                    help="each timed impl's weight copies together (MB; default: as "
                         "`pyquant bench`, bench.default_rotate_bytes)")
    a = ap.parse_args(argv)
    if not _native.available():
        print(f"pyquant's native module is not loaded ({_native.load_error()})", file=sys.stderr)
        return 2
    builds = {"A": load_build(a.a, "a"), "B": load_build(a.b, "b")}
    keys = [s.strip() for s in a.impls.split(",") if s.strip()]
    impls = [i for i in bench.pyquant_impls() + bench_sparse.sparse_impls()
             if any(k in i.name for k in keys)]
    if not impls:
        ap.error(f"--impls {a.impls!r} matches no pyquant impl")
    others = [i for i in bench.probe_impls() + bench.baseline_impls()
              if i.name in ("read[probe]", "F.linear[fp32]",
                            "torch._weight_int4pack_mm_for_cpu[g128]")]
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",") if s]
    default = _native._load()
    # as `pyquant bench` times decode sizes: runs of calls of one kind, the first not counted
    burst = bench.DECODE_BURST if a.m <= bench.DECODE_MAX_M else 1
    rotate = (a.rotate_mb << 20) if a.rotate_mb else bench.default_rotate_bytes()

    def on(build, run):
        def f(s, x):
            _native._module = build
            try:
                return run(s, x)
            finally:
                _native._module = default
        return f

    ratios = {}
    g = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode():
            for r in range(a.runs):
                for n, k in shapes:
                    w = torch.randn(n, k, generator=g) * 0.02
                    x = torch.randn(a.m, k, generator=g)
                    entries, names = [], []
                    for im in impls:
                        s0 = im.make(w)
                        copies = bench._copies(im.nbytes(s0), rotate, 1, burst)
                        # which build's copies come first alternates from run to run
                        for tag in ("A", "B") if r % 2 == 0 else ("B", "A"):
                            build = builds[tag]
                            entries.append((on(build, im.run),
                                            [bench._clone_state(s0) for _ in range(copies)],
                                            im.take(x)))
                            names.append((im.name, tag))
                    for o in others:
                        entries.append((o.run, [o.make(w)], o.take(x)))
                    times = bench._time_interleaved(entries, x, iters=a.iters, seed=r,
                                                    burst=burst)
                    by = dict(zip(names, times))
                    for im in impls:
                        ta, tb = by[(im.name, "A")], by[(im.name, "B")]
                        ratios.setdefault((im.name, n, k), []).append(ta / tb)
                        print(f"run {r + 1} {n:>5}x{k:<6} {im.name:<40} A {ta * 1e3:8.3f} ms  "
                              f"B {tb * 1e3:8.3f} ms  A/B {ta / tb:.3f}", flush=True)
    finally:
        _native._module = default
    print(f"A/B (> 1: B faster) over {a.runs} runs, M = {a.m}, {torch.get_num_threads()} threads:")
    for (name, n, k), v in ratios.items():
        print(f"  {n:>5}x{k:<6} {name:<40} median {statistics.median(v):.3f}  "
              f"({', '.join(f'{t:.3f}' for t in v)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
