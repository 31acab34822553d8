"""How much one call's time depends on the call made just before it.

Times one impl of `pyquant bench` (M = 1, its weights rotated through copies as the bench
rotates them) right after each of several other calls: itself on another copy, other impls,
the native read probe over 2 and 64 MB, a torch reduction over 64 MB, and an idle gap of the
main thread (sleeping, or spinning in Python). Each round makes every (predecessor, timed
call) pair once, in a shuffled order; the medians are printed.

    python benchmarks/call_order.py [--impl pyquant.int4_weight_only_mm[g128]] [--n 4096]
                                    [--k 4096] [--rounds 60]

Why it exists: on a 2-core Zen 4 VM, pyquant's int4 weight-only at 4096 x 4096 took 0.367 ms
after another int4 call and 0.472 ms after fp32 F.linear (1.29x), 0.485 after a 64 MB read;
with a fixed order of impls in a round, each impl of `pyquant bench` always followed the same
one and carried its bias, so the bench now shuffles every round (bench._time_interleaved).
After 2 ms with the main thread asleep or busy in Python, 1.15-1.17x: the worker threads had
gone to sleep, and the next parallel call paid for waking them.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def main(argv=None) -> int:
    from pyquant import _native, bench, bench_sparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impl", default="pyquant.int4_weight_only_mm[g128]",
                    help="the timed impl (a name of `pyquant bench`)")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--copies", type=int, default=8, help="weight copies of the timed impl")
    a = ap.parse_args(argv)
    impls = {i.name: i for i in bench.baseline_impls() + bench.pyquant_impls()
             + bench_sparse.sparse_impls()}
    if a.impl not in impls:
        ap.error(f"--impl {a.impl!r}: one of {', '.join(sorted(impls))}")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(a.n, a.k, generator=g) * 0.02
    x = torch.randn(1, a.k, generator=g)
    target = impls[a.impl]
    xt = target.take(x)  # x as the target's call takes it (a bf16 row's: bf16)
    s0 = target.make(w)
    copies = [bench._clone_state(s0) for _ in range(a.copies)]
    turn = [0]

    def timed_copy():
        turn[0] += 1
        return copies[turn[0] % len(copies)]

    def impl_call(name):
        im = impls[name]
        st = [im.make(w) for _ in range(2)]
        xi = im.take(x)
        return lambda i: im.run(st[i % 2], xi)

    def idle(seconds, spin):
        def f(i):
            if not spin:
                time.sleep(seconds)
                return
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                pass
        return f

    before = {"itself (another copy)": lambda i: target.run(timed_copy(), xt)}
    for name in ("F.linear[fp32]", "torch.ao.dynamic_int8[fbgemm]",
                 "pyquant.int8_weight_only_mm"):
        if name in impls and name != a.impl:
            before[name] = impl_call(name)
    if _native.available():
        for mb in (2, 64):
            buf = torch.ones(mb << 17, dtype=torch.int64)
            before[f"read probe, {mb} MB"] = (lambda b: lambda i: _native.stream_read(b))(buf)
    big = torch.ones(16 << 20)
    before["torch sum over 64 MB"] = lambda i: big.sum()
    before["main thread sleeping 2 ms"] = idle(0.002, spin=False)
    before["main thread spinning 2 ms"] = idle(0.002, spin=True)

    times = {k: [] for k in before}
    rng = random.Random(0)
    keys = list(before)
    with torch.inference_mode():
        for k in keys:  # warm every path once
            before[k](0)
            target.run(timed_copy(), xt)
        for r in range(a.rounds):
            rng.shuffle(keys)
            for k in keys:
                before[k](r)
                s = timed_copy()
                t0 = time.perf_counter()
                target.run(s, xt)
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["itself (another copy)"])
    print(f"{a.impl} at {a.n}x{a.k}, M = 1, {torch.get_num_threads()} threads, "
          f"{a.rounds} rounds, {a.copies} weight copies; median ms of a call right after:")
    for k in before:
        m = statistics.median(times[k])
        print(f"  {k:34s} {m * 1e3:8.3f}  ({m / base:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
