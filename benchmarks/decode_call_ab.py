"""Decode-size calls of one op four ways in one process: weights on huge pages or on the
allocator's pages (pyquant/_hugepages.py), called through ops.call or through an ops.LayerCall
as the layers call (checks once, the call prepared once where the op has a bind). Interleaved
rounds in a seeded random order, runs of three calls each of which the last two count (as
pyquant bench times decode), weight copies rotated through more memory than the last-level
cache. Prints the median ms of each way and the ratios that isolate each change.

    python benchmarks/decode_call_ab.py                                  # int4 weight-only
    python benchmarks/decode_call_ab.py --op sparse24_int8 --shape 11008x4096 --rounds 120
    python benchmarks/decode_call_ab.py --probe        # and the read probe on both page kinds

Why: at M = 1 a call's Python runs from caches that the previous call's weight stream has just
flushed, so it costs several times what it costs in a hot loop, and a 4096 x 4096 int4 weight
is read in ~0.3 ms.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from pyquant import _hugepages, formats, ops, panels, sparse_formats, sparse_panels
from pyquant.bench import _llc_bytes

OPS = ("int4_weight_only", "int8_dynamic", "sparse24_int8", "sparse24_bf16")


def _weights(op: str, n: int, k: int):
    """(op name, weight args) as the layers keep them on this CPU."""
    w = torch.randn(n, k) * 0.05
    if op == "int4_weight_only":
        c, s, z = formats.quantize_int4_groupwise(w, 128, symmetric=False)
        wp = formats.pack_int4(c)
        if panels.int4_weight_only_panel_layout_applies(n, k, 128, "cpu"):
            return "int4_weight_only_mm_panels", (*panels.pack_int4(wp, s, z, 128), 128, None)
        return "int4_weight_only_mm", (wp, s, z, 128, None)
    if op == "int8_dynamic":
        q, s = formats.quantize_int8_per_channel(w)
        if panels.panel_layout_applies(n, k, "cpu"):
            return "int8_dynamic_mm_panels", (panels.pack_int8(q), s, None)
        return "int8_dynamic_mm", (q, s, None)
    if op == "sparse24_int8":
        v, meta = sparse_formats.compress_24(w)
        q, s = sparse_formats.quantize_24_int8(v)
        if sparse_panels.layout_applies(n, k, "cpu"):
            return "sparse24_int8_mm_panels", (*sparse_panels.pack(q, meta, 8), s, None)
        return "sparse24_int8_mm", (q, meta, s, None)
    return "sparse24_mm", (*sparse_formats.compress_24(w.to(torch.bfloat16)), None)


def ops_arg(ap, text: str, allowed) -> list:
    """The op names of a comma-separated --ops value, each one of ``allowed``; an argparse
    error for any other, or where the native module is not loaded (the scripts time it)."""
    from pyquant import _native

    ops_ = [o.strip() for o in text.split(",") if o.strip()]
    bad = [o for o in ops_ if o not in allowed]
    if bad:
        ap.error(f"unknown op(s) {bad}; use {', '.join(allowed)}")
    if not _native.available():
        ap.error("needs the native module")
    return ops_


def _place(args):
    return tuple(_hugepages.place(a) if isinstance(a, torch.Tensor) else a for a in args)


def probe_pages(nbytes: int = 1 << 30, passes: int = 5) -> None:
    """The read probe (_native.stream_read: eight streams a thread) over nbytes on the
    allocator's pages and on huge pages, on one and on all threads: best pass, GB/s."""
    from pyquant import _native

    bufs = {"4k": torch.ones(nbytes // 8, dtype=torch.int64)}
    huge = _hugepages.empty((nbytes // 8,), torch.int64)
    if huge is not None:
        bufs["huge"] = huge.fill_(1)
    for threads in sorted({1, torch.get_num_threads()}):
        line = []
        for pages, buf in bufs.items():
            best = float("inf")
            for _ in range(passes):
                t0 = time.perf_counter()
                _native.stream_read(buf, threads)
                best = min(best, time.perf_counter() - t0)
            line.append(f"{pages} {nbytes / best / 1e9:.1f} GB/s")
        print(f"read probe, {threads} thread(s): " + ", ".join(line))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=OPS, default=OPS[0])
    ap.add_argument("--shape", default="4096x4096", help="N x K")
    ap.add_argument("--m", type=int, default=1, help="rows of x")
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--probe", action="store_true",
                    help="also the read probe on both kinds of pages, 1 GB, 1 and all threads")
    ap.add_argument("--max-copies", type=int, default=128,
                    help="at most this many weight copies (small shapes stay in cache anyway)")
    a = ap.parse_args(argv)
    n, k = (int(v) for v in a.shape.lower().split("x"))
    if a.probe:
        probe_pages()
    torch.manual_seed(0)
    name, probe = _weights(a.op, n, k)
    nbytes = sum(t.numel() * t.element_size() for t in probe if isinstance(t, torch.Tensor))
    copies = min(a.max_copies, max(4, 2 * _llc_bytes() // nbytes + 1))
    plain = [probe] + [_weights(a.op, n, k)[1] for _ in range(copies - 1)]
    huge = [_place(args) for args in plain] if _hugepages.enabled() else None
    x = torch.randn(a.m, k)
    if a.op == "sparse24_bf16":
        x = x.to(torch.bfloat16)
    ways = {}
    for pages, sets in (("4k", plain), ("huge", huge)):
        if sets is None:
            continue
        calls = [ops.LayerCall() for _ in sets]
        ways[f"{pages} ops.call"] = (sets, lambda i, s: ops.call(name, x, *s))
        ways[f"{pages} LayerCall"] = (sets, lambda i, s, c=calls: c[i](name, x, *s))
    times = {w: [] for w in ways}
    rng, names, j = random.Random(0), list(ways), 0
    with torch.inference_mode():
        for w, (sets, f) in ways.items():
            for i, s in enumerate(sets):
                f(i, s)
        for _ in range(a.rounds):
            rng.shuffle(names)
            for w in names:
                sets, f = ways[w]
                for b in range(3):
                    i = j % len(sets)
                    j += 1
                    t0 = time.perf_counter()
                    f(i, sets[i])
                    if b:
                        times[w].append(time.perf_counter() - t0)
    med = {w: statistics.median(t) * 1e3 for w, t in times.items()}
    print(f"{name} {n}x{k} M={a.m}, {copies} weight copies, {torch.get_num_threads()} threads, "
          f"transparent huge pages: {_hugepages.thp_mode() or 'none'}")
    for w, ms in med.items():
        print(f"  {w:16s} {ms:.3f} ms  {nbytes / ms / 1e6:.1f} GB/s")
    for pages in ("4k", "huge"):
        if f"{pages} LayerCall" in med:
            print(f"  LayerCall over ops.call, {pages} pages: "
                  f"{med[f'{pages} ops.call'] / med[f'{pages} LayerCall']:.3f}x")
    if "huge LayerCall" in med:
        for via in ("ops.call", "LayerCall"):
            print(f"  huge over 4k pages, {via}: {med[f'4k {via}'] / med[f'huge {via}']:.3f}x")
        print(f"  both against 4k ops.call: {med['4k ops.call'] / med['huge LayerCall']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
