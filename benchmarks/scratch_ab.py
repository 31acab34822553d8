"""Prefill-size calls of the CPU ops with their scratch kept as now (pyquant._native:
_SCRATCH_MAX_BYTES, PYQUANT_SCRATCH_MB) against the old 8 MiB cap, under which every
workspace past 8 MiB and every float32 copy of bf16 x was allocated per call. The two settings
alternate call by call in a seeded random order, each after one untimed call that fills its
buffers; median ms of each and the speed of now over then.

    python benchmarks/scratch_ab.py
    python benchmarks/scratch_ab.py --ops int4_weight_only --ms 1024 --rounds 9

Why: a fresh buffer past 32 MiB comes from the kernel on each call and its first touch faults
every page in (40 MiB: ~12 ms to allocate and fill where a kept one took ~1.1 ms, 2-core Xeon),
which at M = 1024 is a sizeable part of a layer's call. Below 32 MiB glibc may reuse what a
previous call freed, so smaller sizes can come out even.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

from pyquant import _native, ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_call_ab import _weights, ops_arg  # noqa: E402  (the layers' weights, as that script makes them)

OPS = ("int4_weight_only", "int8_dynamic")
OLD_CAP = 8 << 20


def _setting(now: bool, cap: int, min_bytes: int) -> None:
    _native._SCRATCH_MAX_BYTES = cap if now else OLD_CAP
    _native._SCRATCH_MIN_BYTES = min_bytes if now else 1 << 62
    _native._SCRATCH.__dict__.clear()  # the other setting's buffers go


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)}")
    ap.add_argument("--shapes", default="4096x4096,4096x11008", help="comma-separated N x K")
    ap.add_argument("--ms", default="128,1024", help="comma-separated rows of x")
    ap.add_argument("--rounds", type=int, default=6, help="timed calls of each setting")
    a = ap.parse_args(argv)
    ops_ = ops_arg(ap, a.ops, OPS)
    cap, min_bytes = _native._SCRATCH_MAX_BYTES, _native._SCRATCH_MIN_BYTES
    rng = random.Random(0)
    torch.manual_seed(0)
    print(f"scratch kept up to {cap >> 20} MiB against {OLD_CAP >> 20} MiB, "
          f"{torch.get_num_threads()} threads, median ms of {a.rounds} calls each")
    try:
        with torch.inference_mode():
            for op in ops_:
                for shape in a.shapes.split(","):
                    n, k = (int(v) for v in shape.lower().split("x"))
                    name, args = _weights(op, n, k)
                    for m in (int(v) for v in a.ms.split(",")):
                        for dt in (torch.float32, torch.bfloat16):
                            x = torch.randn(m, k).to(dt)
                            times = {False: [], True: []}
                            for _ in range(a.rounds):
                                order = [False, True]
                                rng.shuffle(order)
                                for now in order:
                                    _setting(now, cap, min_bytes)
                                    ops.call(name, x, *args)
                                    t0 = time.perf_counter()
                                    ops.call(name, x, *args)
                                    times[now].append(time.perf_counter() - t0)
                            then, now = (statistics.median(times[s]) for s in (False, True))
                            print(f"  {name:28s} {n}x{k} M={m:5d} {str(dt)[6:]:8s} "
                                  f"then {then * 1e3:8.2f}  now {now * 1e3:8.2f}  "
                                  f"{then / now:.2f}x")
    finally:
        _setting(True, cap, min_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
