"""`pyquant bench`: microbenchmarks of pyquant's ops against the baselines a PyTorch user has,
on the linear shapes of real models, measured side by side in one run.

Every timing rotates through copies of the weights that together exceed the last-level cache,
so decode (memory-bound) numbers are DRAM numbers, and reports medians. The impls of one shape
and M are timed interleaved, one call each in turn (each round in a fresh random order; at decode
sizes a run of calls each, of which those that follow a call of their own kind count, as the
layers of a model run), so that every ratio compares calls made at the same moments: on a
shared or virtual machine the same call moves by 30-50% over a minute, more than most of the
differences measured. The machine's read bandwidth is measured in the same run; memory-bound
rows report the share of it reached (weight bytes incl. scales and zeros / time / bandwidth),
compute-bound rows the GOP/s. The read probe also runs among the impls of each shape and M
(the read[probe] row, as many bytes as the fp32 weight): "%now" is a row's GB/s over the
probe's in the same rounds, the share of what the machine gave at those moments, where "%BW"
compares with the best pass of the start. The probe reads from huge pages where the layers
keep their weights there (_hugepages: the fastest way memory can be read here, so the ceiling),
and the pyquant rows' weights are placed as the layers place theirs; F.linear[fp32 hugepages]
is fp32 F.linear on the same placement, beside the plain one, so that a reader can tell what
the placement gives from what the kernels give.
Compute-bound rows are read against the instruction peak, measured at the start too
(_native.probe_peak: register-only dot products on every thread): "%peak" is a row's GOP/s
over the peak of the vector unit its arithmetic runs on, times the unit's operations per
useful one (three for the weight-only ops' 24-bit fixed point: three int8 products per
product). Rows whose unit the bench does not know (torch's int4pack, AMX, the sparse ops) leave
it empty.
`pyquant bench` keeps freed memory of every size in its process first
(runtime.keep_freed_memory(large_blocks=True); --no-malloc-tuning not): glibc maps a block
above 32 MB afresh, faulting in every page, whenever the heap's free top cannot hold it, so an
op whose output passes that (float32 at M = 1024 and 11008 columns: 45 MB) paid ~10 ms a call
or nothing depending on what the run had freed before (int8 dynamic, 11008 x 4096, M = 1024:
36.3 and 45.0 ms in two runs where its bf16-output row took 24.5 and 29.6; 27.4-27.9 ms with
and without the setting in a run whose heap held it), where bf16 outputs (22 MB) never did.
The setting applies to every impl alike and the machine line says so.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import _hugepages, _native, formats, info, panels
from ._progress import progress
from .ops import LayerCall

# [N, K] of the linear layers of real models (out_features, in_features).
SHAPES = {
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-8b": [(1024, 4096), (14336, 4096), (4096, 14336)],
    "minilm": [(384, 384), (1536, 384), (384, 1536)],
}
DEFAULT_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
# Decode sizes (M <= DECODE_MAX_M) are timed in runs of DECODE_BURST calls of one impl, the
# first not counted (_time_interleaved): as the layers of a model run, one kind back to back
DECODE_MAX_M = 16
DECODE_BURST = 3


@dataclass
class Impl:
    name: str  # e.g. "pyquant.int4_weight_only_mm[g128]" or "F.linear[fp32]"
    kind: str  # "pyquant" or "baseline"
    make: Callable  # (w_fp32 [N,K]) -> opaque prepared weight state
    run: Callable  # (state, x [M,K] of x_dtype: Impl.take) -> y
    nbytes: Callable  # (state) -> bytes of weights read per call
    op: str = ""
    # (state, M) -> (vector unit of _native.PEAK_UNITS, unit ops per op) the call's products
    # run on, or None where unknown: the "%peak" column
    unit: Optional[Callable] = None
    # The activations the call takes: None for float32, torch.bfloat16 for a bf16 model's. The
    # bench converts x once per batch size, outside the timed calls: a bf16 model hands its
    # layers bf16 activations, and a conversion in the call (a tensor made from cold caches,
    # ~20-30 us at decode) charged every bf16 row, pyquant's and the baselines', for it.
    x_dtype: Optional[torch.dtype] = None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """x as this impl's call takes it (x_dtype)."""
        return x if self.x_dtype is None else x.to(self.x_dtype)


@dataclass
class Row:
    shape: str
    threads: int
    n: int
    k: int
    m: int
    impl: str
    kind: str
    op: str
    ms: float
    weight_bytes: int
    gbps: float
    bw_share: float
    gops: float
    # gbps over the read probe's GB/s timed in the same rounds (the "read[probe]" row of this
    # shape and M): the share of the bandwidth the machine gave at those moments
    bw_share_now: float = float("nan")
    # gops times the unit's ops per op over the unit's measured peak (see Impl.unit)
    peak_share: float = float("nan")
    peak_unit: str = ""
    speedup: dict = field(default_factory=dict)


def _llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            s = f.read().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
        return int(s.rstrip("KMG")) * mult
    except Exception:
        return 64 << 20


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Read bandwidth in GB/s over a buffer far larger than the last-level cache: the best of
    ``repeats`` passes of the native streaming read (_native.stream_read, one XOR per 8 bytes,
    so loads, not arithmetic, set the time), on torch's thread count. The best pass, not the
    median: a ceiling, which a noisy pass can only understate. Without the native module:
    torch's sum, which understates the ceiling (its float adds cost more than the loads)."""
    nbytes = max(nbytes, 2 * _llc_bytes())
    if _native.available():
        buf = _probe_buffer(nbytes)
        read = lambda: _native.stream_read(buf)  # noqa: E731
    else:
        buf = torch.ones(nbytes // 4, dtype=torch.float32)
        read = buf.sum
    times = call_times(read, repeats)
    del buf
    return nbytes / min(times) / 1e9


def _probe_buffer(nbytes: int) -> torch.Tensor:
    """The read probe's int64 buffer of about nbytes, on huge pages where the layers' weights go
    there too (_hugepages): the probe is the ceiling, so it reads memory the fastest way it can
    be read (from 4 KiB pages it read 7-12% slower on a 2-core Xeon VM:
    benchmarks/decode_call_ab.py --probe)."""
    n = max(nbytes // 8, 1)
    buf = _hugepages.empty((n,), torch.int64) if _hugepages.enabled() else None
    return (torch.empty(n, dtype=torch.int64) if buf is None else buf).fill_(1)


def measure_peaks(repeats: int = 5) -> dict:
    """GOP/s of each vector unit of _native.PEAK_UNITS on torch's thread count, the best of
    ``repeats`` probes (a ceiling, as the bandwidth); a unit this CPU lacks is left out. Empty
    without the native module."""
    if not _native.available():
        return {}
    out = {}
    # AMX tiles (the int8 and bf16 products of that build, and oneDNN's bf16 F.linear) run past
    # the vector units' peak, and the probe does not time tiles: no ceiling for them there
    amx = _native.ISA_NAMES[_native.best_isa()] == "avx512_amx"
    for unit in _native.PEAK_UNITS:
        if amx and unit != "fp32":
            continue
        runs = [_native.probe_peak(unit, torch.get_num_threads()) for _ in range(repeats)]
        if runs[0] is not None:
            out[unit] = max(runs) / 1e9
    return out


def call_times(fn, reps: int) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn``, after one untimed warmup call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_ms(fn, reps: int) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` after a warmup call (the benchmarks/
    scripts' one-op timing)."""
    return 1e3 * statistics.median(call_times(fn, reps))


def default_rotate_bytes() -> int:
    """Bytes of the weight copies each impl rotates through: four times what the LLC holds.
    At decode sizes an impl's calls come in runs (_time_interleaved), so between two reads of
    one copy only its other copies may stream. With 1.25x the LLC (one 32 MB), 4096 x 4096
    int8 read 94-101% of the read probe in the same rounds and 2:4 + int8 85-88%, against
    90-94% and 77-78% with 300 MB; with four times (128 MB) 98-100% and 77-82%, against
    84-104% and 81-82% with 300 MB (two runs each). All impls of a shape are resident at
    once, so past a 128 MB LLC it is 512 MB an impl (a VM that reports a 300 MB LLC: 7-8 GB
    in all), and never under 1.25x the LLC."""
    llc = _llc_bytes()
    return max(llc * 5 // 4, min(llc * 4, 512 << 20))


# At most this many copies of a weight: enough that MiniLM's smallest weight (384 x 384, 37 KB
# as int4) passes a 32 MB last-level cache; at 64, 64 copies of its int8 weight (9.5 MB) stayed
# in it and its rows read 110% of the probe.
MAX_COPIES = 1024


def _copies(nbytes: int, rotate_bytes: int, sharers: int, burst: int = 1) -> int:
    """Weight copies of one make: together more than rotate_bytes (at most MAX_COPIES), at least
    two where several impls share them, and at least burst (a run of calls reads each copy
    once: a 56 MB weight read three times in a row against a 32 MB last-level cache came out
    at 103-105% of the read probe). Impls of one make run back to back in every round: with a
    single copy the second would find most of what the first just read still in the
    last-level cache (a 45 MB int8 weight against a 32 MB one read 103-167% of the bandwidth
    that way)."""
    n = max(2 if sharers > 1 else 1, min(MAX_COPIES, -(-rotate_bytes // max(nbytes, 1))))
    return max(n, burst)


def _time_interleaved(entries: list, x, iters: int, warmup: int = 2,
                      seed: int = 0, burst: int = 1) -> list[float]:
    """Median seconds of a call for each (run, states) or (run, states, x of its own) of
    ``entries`` (else x): ``iters`` rounds of
    ``burst`` calls per entry back to back, each round in a fresh random order (seeded: the
    same orders every run). With burst > 1 the first call of each run is not counted.

    Why. A call's time depends on the call before it (benchmarks/call_order.py): on a 2-core
    Zen 4 VM, pyquant's int4 weight-only at 4096 x 4096, M = 1, took 0.367 ms after another
    int4 call, 0.380 after pyquant's int8, 0.404 after fbgemm's, 0.472 after fp32 F.linear
    and 0.485 after a 64 MB read (medians of 60, weights rotated); torch's int4pack 1.00-1.18x
    of its own time after itself. Most of it is the Python of the call running from cold
    caches after another code path and a long stream. In a model the layers of one kind run
    back to back, so the decode sizes take runs of calls (burst, on successive weight copies)
    and count the calls that follow one of their own kind. Random order: in a fixed order
    every entry follows the same other one and carries its bias.

    Entries may share one list of rotating weight copies (an op and its x-bf16 row): every
    call takes the list's next copy, whoever makes it, so no call finds the copy that the
    call before it just left in the cache."""
    cursor = {}  # id(states) -> calls made on that list so far

    def next_copy(states):
        i = cursor.get(id(states), 0)
        cursor[id(states)] = i + 1
        return states[i % len(states)]

    # an entry may bring its own x (run, states, x): the activations its call takes
    xs = [e[2] if len(e) > 2 else x for e in entries]
    for (run, states, *_), xe in zip(entries, xs):
        for _ in range(warmup):
            run(next_copy(states), xe)
    rng = random.Random(seed)
    order = list(range(len(entries)))
    ts = [[] for _ in entries]
    for _ in range(iters):
        rng.shuffle(order)
        for e in order:
            run, states, xe = entries[e][0], entries[e][1], xs[e]
            for j in range(burst):
                s = next_copy(states)
                t0 = time.perf_counter()
                run(s, xe)
                if j or burst == 1:
                    ts[e].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


# ------------------------------------------------------------------ implementations


def _tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


FP32_HUGE = "F.linear[fp32 hugepages]"


def baseline_impls() -> list[Impl]:
    impls = [
        Impl("F.linear[fp32]", "baseline", lambda w: w.clone(), lambda s, x: F.linear(x, s),
             lambda s: _tensor_bytes(s), "linear", lambda s, m: ("fp32", 1)),
        # the same weight where pyquant's layers keep theirs (huge pages, _hugepages): what the
        # placement alone gives a float GEMV, beside the rows of pyquant's kernels placed so
        Impl(FP32_HUGE, "baseline", lambda w: _hugepages.place(w.clone()),
             lambda s, x: F.linear(x, s), lambda s: _tensor_bytes(s), "linear",
             lambda s, m: ("fp32", 1)),
        Impl("F.linear[bf16]", "baseline", lambda w: w.to(torch.bfloat16),
             lambda s, x: F.linear(x, s), lambda s: _tensor_bytes(s), "linear",
             lambda s, m: ("bf16", 1), torch.bfloat16),
    ]
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear  # noqa: F401

        def make_fbgemm(w):
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w
            q = torch.ao.quantization.quantize_dynamic(
                torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8
            )
            return q[0]

        impls.append(Impl("torch.ao.dynamic_int8[fbgemm]", "baseline", make_fbgemm,
                          lambda s, x: s(x), lambda s: s.weight().numel() + 4, "int8_dynamic",
                          lambda s, m: ("int8", 1)))
    except Exception:
        pass
    if hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        def make_int4pack(w, g=128):
            n, k = w.shape
            codes, scales, zeros = formats.quantize_int4_groupwise(w, g, symmetric=False)
            packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            # torch's format: w = (q - 8) * scale + zero_point (both bf16, [K/g, N, 2])
            zp = (8 - zeros.float()) * scales
            sz = torch.stack([scales.T, zp.T], dim=2).to(torch.bfloat16).contiguous()
            return packed, sz, g

        impls.append(Impl(
            "torch._weight_int4pack_mm_for_cpu[g128]", "baseline", make_int4pack,
            lambda s, x: torch._weight_int4pack_mm_for_cpu(x, s[0], s[2], s[1]),
            lambda s: _tensor_bytes(s[0], s[1]), "int4_weight_only_mm", x_dtype=torch.bfloat16))
    return impls


PROBE = "read[probe]"


def probe_impls() -> list[Impl]:
    """The native read-bandwidth loop over as many bytes as the shape's fp32 weight, timed
    interleaved with the impls like one of them (kind "probe": no speedups against it)."""
    if not _native.available():
        return []
    return [Impl(PROBE, "probe", lambda w: _probe_buffer(w.numel() * 4),
                 lambda s, x: _native.stream_read(s), lambda s: _tensor_bytes(s))]


def pyquant_impls(group_size: int = 128) -> list[Impl]:
    # What the layers run in eager inference: the op through an ops.LayerCall, one per weight
    # copy (the last entry of each state; _clone_state gives each copy its own), which checks
    # the weights once and, for the weight-only and sparse ops, prepares the call once. No
    # dispatcher (its Python wrappers cost ~30 us a call; torch.compile and autograd take
    # torch.ops.pyquant.* instead).
    from . import ops

    def make_i8(w):
        return formats.quantize_int8_per_channel(w)

    def make_i8_layer(w):
        # what the int8 layers keep: the CPU panel layout where this CPU's kernels take it
        q, s = make_i8(w)
        if panels.panel_layout_applies(*q.shape, q.device):
            return panels.pack_int8(q), s, "_panels", ops.LayerCall()
        return q, s, "", ops.LayerCall()

    # the op's name for each layout, made once: the timed call does not build it
    def names(op):
        return {"": op, "_panels": op + "_panels"}

    def int8(op):
        name = names(op)
        return lambda s, x: s[3](name[s[2]], x, s[0], s[1], None)

    def make_i4(w):
        c, s, z = formats.quantize_int4_groupwise(w, group_size, symmetric=False)
        return formats.pack_int4(c), s, z

    def make_i4_layer(w, applies=panels.int4_panel_layout_applies):
        # what the int4 layers keep: the CPU panel layout where this CPU's kernels take it
        wp, sc, zp = make_i4(w)
        if applies(*w.shape, group_size, w.device):
            return (*panels.pack_int4(wp, sc, zp, group_size), "_panels", ops.LayerCall())
        return wp, sc, zp, "", ops.LayerCall()

    def make_i4wo_layer(w):  # int4 weight-only layers keep panels on AMX too
        return make_i4_layer(w, panels.int4_weight_only_panel_layout_applies)

    def int4(op):
        name = names(op)
        return lambda s, x: s[4](name[s[3]], x, s[0], s[1], s[2], group_size, None)

    def unit(arith, bf16_from_m=None):
        """The unit of the panel kernels (AVX512-VNNI and -BF16 builds; kernels.h). arith
        "int8": W8A8 and W4A8, one int8 product a product. "fixed": the weight-only ops,
        three int8 products a product (the 24-bit fixed-point terms); with bf16_from_m, rows
        that are bf16 values take one bf16 product from that M on (the AVX512-BF16 build:
        kInt8WoPanelsBf16MinM, kBf16PanelMinM). None on other ISAs and on the rows layout,
        whose kernels the bench does not model."""
        def f(s, m):
            if s[-2] != "_panels" or _native.ISA_NAMES[_native.current_isa()] not in (
                    "avx512_vnni", "avx512_bf16"):
                return None
            if arith == "int8":
                return "int8", 1
            bf16 = (bf16_from_m is not None and m >= bf16_from_m
                    and _native.ISA_NAMES[_native.current_isa()] == "avx512_bf16")
            return ("bf16", 1) if bf16 else ("int8", 3)
        return f

    return [
        Impl("pyquant.int8_weight_only_mm", "pyquant", make_i8_layer,
             int8("int8_weight_only_mm"), lambda s: _tensor_bytes(*s[:2]), "int8_weight_only_mm",
             unit("fixed")),
        Impl("pyquant.int8_dynamic_mm", "pyquant", make_i8_layer, int8("int8_dynamic_mm"),
             lambda s: _tensor_bytes(*s[:2]), "int8_dynamic_mm", unit("int8")),
        Impl(f"pyquant.int4_weight_only_mm[g{group_size}]", "pyquant", make_i4wo_layer,
             int4("int4_weight_only_mm"), lambda s: _tensor_bytes(*s[:3]),
             "int4_weight_only_mm", unit("fixed")),
        Impl(f"pyquant.int4_dynamic_mm[g{group_size}]", "pyquant", make_i4_layer,
             int4("int4_dynamic_mm"), lambda s: _tensor_bytes(*s[:3]), "int4_dynamic_mm",
             unit("int8")),
        # A bf16 model's activations (as F.linear[bf16] and int4pack get them): on AMX the
        # weight-only kernels then multiply one bf16 term per activation instead of three.
        Impl("pyquant.int8_weight_only_mm[x-bf16]", "pyquant", make_i8_layer,
             int8("int8_weight_only_mm"), lambda s: _tensor_bytes(*s[:2]),
             "int8_weight_only_mm", unit("fixed", 24), torch.bfloat16),
        Impl(f"pyquant.int4_weight_only_mm[g{group_size} x-bf16]", "pyquant", make_i4wo_layer,
             int4("int4_weight_only_mm"), lambda s: _tensor_bytes(*s[:3]),
             "int4_weight_only_mm", unit("fixed", 16), torch.bfloat16),
        # int8 dynamic quantizes bf16 rows as they are (no float32 copy of x) and returns bf16
        Impl("pyquant.int8_dynamic_mm[x-bf16]", "pyquant", make_i8_layer, int8("int8_dynamic_mm"),
             lambda s: _tensor_bytes(*s[:2]), "int8_dynamic_mm", unit("int8"), torch.bfloat16),
    ]


def _clone_state(s, huge: bool = False):
    """A copy of a prepared weight state; huge: its large tensors on huge pages, where the
    layers keep theirs (the pyquant impls and FP32_HUGE; _hugepages)."""
    if isinstance(s, torch.Tensor):
        return _hugepages.place(s.clone()) if huge else s.clone()
    if isinstance(s, tuple):
        return tuple(_clone_state(t, huge) for t in s)
    if isinstance(s, LayerCall):  # each copy remembers its own weights
        return LayerCall()
    if isinstance(s, torch.nn.Module):
        c = copy.deepcopy(s)
        if huge:
            for m in c.modules():
                _hugepages.place_module(m)
        return c
    return s


def _placed(impl: Impl) -> bool:
    return impl.kind == "pyquant" or impl.name == FP32_HUGE


# ------------------------------------------------------------------ the run


def run(
    models=("llama2-7b",),
    ms=DEFAULT_MS,
    impl_filter: Optional[str] = None,
    threads: Optional[int] = None,
    iters: int = 20,
    rotate_bytes: Optional[int] = None,
    seed: int = 0,
    malloc_kept: bool = False,
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    rotate_bytes = rotate_bytes or default_rotate_bytes()
    from .bench_sparse import sparse_impls  # sparse rows live in their own module

    impls = probe_impls() + baseline_impls() + pyquant_impls() + sparse_impls()
    if impl_filter:
        keys = [s.strip() for s in impl_filter.split(",") if s.strip()]
        impls = [i for i in impls if i.kind in ("baseline", "probe")
                 or any(k in i.name for k in keys)]
    bw = measure_read_bandwidth()
    peaks = measure_peaks()
    rows: list[Row] = []
    g = torch.Generator().manual_seed(seed)
    jobs = [(mname, n, k) for mname in models for (n, k) in SHAPES[mname]]
    with torch.inference_mode():
        for mname, n, k in progress(jobs, desc="bench", min_items=1):
            w = torch.randn(n, k, generator=g) * 0.02
            ready = []  # (impl, weight bytes, rotating copies) of every impl this shape runs
            made = {}  # impls with the same make (e.g. an op and its x-bf16 row) share copies
            sharers = {}
            for impl in impls:
                sharers[impl.make] = sharers.get(impl.make, 0) + 1
            for impl in impls:
                if impl.make not in made:
                    try:
                        s0 = impl.make(w)
                        if impl.kind == "pyquant":  # as the layers keep it
                            s0 = _clone_state(s0, huge=True)
                    except Exception as e:  # a baseline missing on this torch build
                        print(f"skip {impl.name} on {n}x{k}: {e}", file=sys.stderr)
                        continue
                    copies = _copies(impl.nbytes(s0), rotate_bytes, sharers[impl.make],
                                     DECODE_BURST if min(ms) <= DECODE_MAX_M else 1)
                    made[impl.make] = [s0] + [_clone_state(s0, _placed(impl))
                                              for _ in range(copies - 1)]
                states = made[impl.make]
                ready.append((impl, impl.nbytes(states[0]), states))
            del w, made
            most = max((len(st) for _, _, st in ready), default=1)
            for m in ms:
                x = torch.randn(m, k, generator=g)
                # decode sizes are short calls: enough rounds to visit every weight copy
                decode = m <= DECODE_MAX_M
                # (not kept in a name: that would hold this shape's weight copies while the
                # next shape's are made)
                times = _time_interleaved([(impl.run, st, impl.take(x)) for impl, _, st in ready],
                                          x,
                                          iters=max(iters, most) if decode else iters,
                                          burst=DECODE_BURST if decode else 1)
                now = [nb / t / 1e9 for (impl, nb, _), t in zip(ready, times)
                       if impl.kind == "probe"]
                for (impl, nb, st), t in zip(ready, times):
                    gbps, gops = nb / t / 1e9, 2 * m * n * k / t / 1e9
                    u = impl.unit(st[0], m) if impl.unit else None
                    share = (gops * u[1] / peaks[u[0]]) if u and u[0] in peaks else float("nan")
                    rows.append(Row(mname, torch.get_num_threads(), n, k, m, impl.name, impl.kind,
                                    impl.op, t * 1e3, nb, gbps, gbps / bw, gops,
                                    gbps / now[0] if now else float("nan"), share,
                                    u[0] if u and u[0] in peaks else ""))
            # nothing may hold this shape's copies while the next shape's are made
            ready = st = s0 = states = None
    _add_speedups(rows)
    return {
        "machine": machine_info(bw, peaks, malloc_kept),
        "rows": [asdict(r) for r in rows],
    }


def _add_speedups(rows: list[Row]) -> None:
    base = {}
    for r in rows:
        if r.kind == "baseline":
            base[(r.n, r.k, r.m, r.impl)] = r.ms
    for r in rows:
        if r.kind == "probe":
            continue
        for (n, k, m, name), ms in base.items():
            if (n, k, m) == (r.n, r.k, r.m) and name != r.impl:
                r.speedup[name] = ms / r.ms


def thread_scaling(results: list) -> list:
    """[{shape, m, impl, ms per thread count, speedup of the most over the fewest threads}]
    from runs of the same shapes with different thread counts."""
    if len(results) < 2:
        return []
    by = {}
    for res in results:
        t = res["machine"]["threads"]
        for r in res["rows"]:
            by.setdefault((r["n"], r["k"], r["m"], r["impl"]), {})[t] = r["ms"]
    out = []
    for (n, k, m, impl), per in by.items():
        if len(per) < 2:
            continue
        lo, hi = min(per), max(per)
        out.append({"n": n, "k": k, "m": m, "impl": impl, "ms": {str(t): v for t, v in per.items()},
                    "threads": f"{lo}->{hi}", "speedup": per[lo] / per[hi]})
    return out


def format_scaling(scaling: list) -> str:
    lines = [f"{'shape':>12} {'M':>5} {'impl':<42} {'threads':>8} {'speedup':>8}"]
    for s in scaling:
        lines.append(f"{s['n']:>5}x{s['k']:<6} {s['m']:>5} {s['impl']:<42} {s['threads']:>8} "
                     f"{s['speedup']:>7.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    """`pyquant bench`: prints the table(s) and writes bench.json/bench.csv/roofline.png to --out.
    With --threads 1,2 it runs once per thread count and adds the thread-scaling table."""
    from .cli import _Parser  # one-line usage errors, as the other commands give

    ap = _Parser(prog="pyquant bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama2-7b",
                    help=f"comma-separated, from {', '.join(SHAPES)} (default llama2-7b)")
    ap.add_argument("--ms", default=",".join(str(m) for m in DEFAULT_MS),
                    help="comma-separated batch sizes M (default "
                         f"{','.join(str(m) for m in DEFAULT_MS)}: at Llama-2-7B sizes that is "
                         "many minutes; --ms 1 times decode alone)")
    ap.add_argument("--impls", default=None,
                    help="substrings of the pyquant impls to run (baselines always run)")
    ap.add_argument("--threads", default=None,
                    help="thread count, or a comma list (e.g. 1,2) for a scaling table")
    ap.add_argument("--iters", type=int, default=20,
                    help="timed rounds per shape and M, the impls interleaved in each (median; "
                         "default 20). At M <= 16 a round is a run of three calls of which the "
                         "last two count, and there are at least as many rounds as weight copies")
    ap.add_argument("--out", default="./bench_results",
                    help="output directory (default ./bench_results)")
    ap.add_argument("--no-malloc-tuning", dest="malloc_tuning", action="store_false",
                    help="leave glibc's malloc as it is: by default the bench keeps freed "
                         "memory of every size in the process "
                         "(pyquant.runtime.keep_freed_memory(large_blocks=True)), so that an "
                         "output above 32 MB (11008 float32 columns at M = 1024) is not mapped "
                         "and faulted in again on every timed call, for every impl alike")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu (default), or cuda: the Triton kernels against cuBLAS on a GPU "
                         "(pyquant bench --device cuda --help for its options)")
    a = ap.parse_args(argv)
    if a.device == "cuda":  # pyquant bench (cli.py) hands --device cuda to bench_cuda
        ap.error("--device cuda: run it as `pyquant bench --device cuda`")
    if a.iters < 1:
        ap.error(f"--iters {a.iters}: give at least 1 timed call per point")
    if a.impls:  # a filter matching no pyquant impl would time the baselines alone
        from .bench_sparse import sparse_impls

        names = [i.name for i in pyquant_impls() + sparse_impls()]
        unknown = [k for k in (s.strip() for s in a.impls.split(",")) if k
                   and not any(k in n for n in names)]
        if unknown:
            ap.error(f"--impls {', '.join(unknown)} matches no impl; the impls: "
                     f"{', '.join(sorted(set(n.split('[')[0] for n in names)))}")
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in models if m not in SHAPES]
    if bad or not models:
        ap.error(f"--models {a.models!r}: {'unknown ' + ', '.join(bad) if bad else 'none given'}"
                 f"; use one or more of {', '.join(SHAPES)}")
    ms = _int_list(ap, "--ms", a.ms)
    threads = _int_list(ap, "--threads", a.threads) if a.threads is not None else [None]
    cores = _usable_cores()
    if any(t and t > cores for t in threads):
        print(f"pyquant bench: warning: --threads {a.threads}: this process may run on "
              f"{cores} cores, so threads beyond that share them and the times measure "
              "the sharing", file=sys.stderr)
    if _native.available():
        try:  # an invalid PYQUANT_CPU_ISA: every pyquant row would be skipped
            _native.current_isa()
        except (ValueError, RuntimeError) as e:
            ap.error(" ".join(str(e).split()))
    else:
        print(f"pyquant bench: warning: the native module did not load "
              f"({_native.load_error()}): the pyquant rows time the pure-PyTorch reference",
              file=sys.stderr)
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        ap.error(f"--out {a.out}: exists and is not a directory")
    try:  # before the run: a folder that cannot be written would lose its results
        os.makedirs(a.out, exist_ok=True)
        with tempfile.TemporaryFile(dir=a.out):
            pass
    except OSError as e:
        ap.error(f"--out {a.out}: cannot write there ({e.strerror or e})")
    malloc_kept = False
    if a.malloc_tuning:  # before anything is timed: the baselines run under it too
        from . import runtime

        malloc_kept = runtime.keep_freed_memory(large_blocks=True)
    results = []
    for t in threads:
        res = run(models=models, ms=ms, impl_filter=a.impls, threads=t, iters=a.iters,
                  malloc_kept=malloc_kept)
        print(format_table(res))
        busy = busy_warning(res)
        if busy:
            print(busy, file=sys.stderr)
        decode = decode_summary(res)
        if decode:
            res["decode_targets"] = decode
        sparse = sparse_summary(res, ms)
        if sparse:
            res["sparse_targets"] = sparse
        results.append(res)
    result = results[-1] if len(results) == 1 else {
        "machine": results[-1]["machine"], "rows": [r for res in results for r in res["rows"]],
        "runs": [res["machine"] for res in results]}
    scaling = thread_scaling(results)
    if scaling:
        result["thread_scaling"] = scaling
        print(format_scaling(scaling))
    for p in write_outputs(result, a.out):
        print(f"wrote {p}")
    return 0


def _int_list(ap, option: str, text: str) -> list:
    """A comma list of positive integers for `option`, or a usage error that names it."""
    values = []
    for v in text.split(","):
        v = v.strip()
        try:
            values.append(int(v))
        except ValueError:
            ap.error(f"{option} {text!r}: {v!r} is not an integer; give a comma list of "
                     "positive integers, e.g. 1,16,128")
    if not values or any(v < 1 for v in values):
        ap.error(f"{option} {text!r}: give a comma list of positive integers, e.g. 1,16,128")
    return values


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# The read probe timed among the impls reading under this share of the start's best pass, or
# a row reading more than this many times the probe of its rounds: the machine was busy (other
# processes took the cores or the memory) and the ratios of that shape are not to be trusted.
BUSY_PROBE_SHARE, BUSY_NOW_SHARE = 0.5, 1.5


def busy_warning(result: dict) -> str:
    """A warning naming the shapes and batch sizes whose timings a busy machine spoilt, or ""."""
    bad = set()
    for r in result["rows"]:
        probe = r.get("kind") == "probe"
        if (probe and r["bw_share"] < BUSY_PROBE_SHARE) or (
                not probe and r.get("bw_share_now", 0) > BUSY_NOW_SHARE):
            bad.add((r["n"], r["k"], r["m"]))
    if not bad:
        return ""
    where = ", ".join(f"{n}x{k} M={m}" for n, k, m in sorted(bad))
    return (f"pyquant bench: warning: the machine was busy while {where} ran (the read probe "
            f"among the impls under {BUSY_PROBE_SHARE:.0%} of the start's bandwidth, or a row "
            f"above {BUSY_NOW_SHARE:.0%} of the probe of its rounds): other processes were "
            "taking the cores or the memory, so those rows' times and ratios are not "
            "meaningful; run again on an idle machine")


def decode_summary(result: dict) -> list:
    """Prints the dense ops' decode targets at M = 1 (pyquant.bench_targets) where the run
    timed them, and returns their rows."""
    from . import bench_targets

    rows = bench_targets.decode_targets(result)
    if rows:
        print(bench_targets.format_decode_targets(
            rows, result["machine"].get("read_bandwidth_gbps")))
    return rows


def sparse_summary(result: dict, ms) -> list:
    """Prints, per M, each sparse op against its dense counterpart with its share of the read
    bandwidth and its break-even batch size (pyquant.bench_sparse), and returns those rows."""
    from . import bench_sparse

    bw = result["machine"].get("read_bandwidth_gbps")
    out = []
    for m in ms:
        rows = bench_sparse.targets(result, m)
        if rows:
            print(bench_sparse.format_targets(rows, bw, m))
            out += rows
    return out


def machine_info(bw: float, peaks: Optional[dict] = None, malloc_kept: bool = False) -> dict:
    from . import _native

    isa = None
    if _native.available():
        try:
            isa = _native.ISA_NAMES[_native.current_isa()]
        except Exception as e:
            isa = f"error: {e}"
    return {
        "cpu": info.cpu_model_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "isa": isa,
        "read_bandwidth_gbps": round(bw, 2),
        # measured instruction peaks, GOP/s per vector unit (measure_peaks)
        "peak_gops": {u: round(v, 1) for u, v in (peaks or {}).items()},
        "llc_bytes": _llc_bytes(),
        "timing": "interleaved: one call per impl in turn, medians per impl",
        # True: freed blocks of every size stay in the process (main applies
        # runtime.keep_freed_memory(large_blocks=True) before the run; the caller's run()
        # says whether it did)
        "malloc_tuning": malloc_kept,
    }


SHORT = {
    "F.linear[fp32]": "fp32",
    FP32_HUGE: "fp32-hp",
    "F.linear[bf16]": "bf16",
    "torch.ao.dynamic_int8[fbgemm]": "fbgemm",
    "torch._weight_int4pack_mm_for_cpu[g128]": "int4pack",
}


def format_table(result: dict) -> str:
    mi = result["machine"]
    peaks = ", ".join(f"{u} {v:.0f}" for u, v in mi.get("peak_gops", {}).items())
    lines = [
        f"machine: {mi['cpu']}, {mi['threads']} threads, torch {mi['torch']}, ISA {mi['isa']}, "
        f"measured read bandwidth {mi['read_bandwidth_gbps']:.1f} GB/s (best pass; %now: share "
        f"of the {PROBE} row's GB/s, timed in the same rounds)",
        f"measured instruction peaks, GOP/s: {peaks or 'not measured'} (%peak: a row's GOP/s "
        "over the peak of the unit its products run on, per unit op)",
        "allocator: " + ("freed memory of every size kept in the process "
                         "(pyquant.runtime.keep_freed_memory(large_blocks=True))"
                         if mi.get("malloc_tuning") else "malloc as configured (large outputs "
                         "are mapped and faulted in on every call)"),
        f"{'shape':>12} {'M':>5} {'impl':<42} {'ms':>9} {'GB/s':>7} {'%BW':>5} {'%now':>5} "
        f"{'GOP/s':>8} {'%peak':>5}  "
        "speedup vs " + ", ".join(SHORT.values()),
    ]
    for r in result["rows"]:
        sp = "  ".join(
            f"{SHORT[b]} {r['speedup'][b]:.2f}x" for b in SHORT if b in r["speedup"]
        )
        lines.append(
            f"{r['n']:>5}x{r['k']:<6} {r['m']:>5} {r['impl']:<42} {r['ms']:>9.3f} "
            f"{r['gbps']:>7.1f} {100 * r['bw_share']:>4.0f}% {100 * r['bw_share_now']:>4.0f}% "
            f"{r['gops']:>8.1f} {_pct(r.get('peak_share', float('nan')))}  {sp}"
        )
    return "\n".join(lines)


def _pct(v: float) -> str:
    return f"{'':>5}" if v != v else f"{100 * v:>4.0f}%"


def write_outputs(result: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    jp = os.path.join(out_dir, "bench.json")
    with open(jp, "w") as f:
        json.dump(result, f, indent=1)
    paths.append(jp)
    cp = os.path.join(out_dir, "bench.csv")
    with open(cp, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["shape", "threads", "n", "k", "m", "impl", "op", "ms", "weight_bytes", "gbps",
                     "bw_share", "bw_share_now", "gops", "peak_share", "peak_unit"]
                    + [f"speedup_vs_{v}" for v in SHORT.values()])
        for r in result["rows"]:
            wr.writerow([r["shape"], r["threads"], r["n"], r["k"], r["m"], r["impl"], r["op"],
                         f"{r['ms']:.4f}", r["weight_bytes"], f"{r['gbps']:.2f}",
                         f"{r['bw_share']:.3f}", f"{r['bw_share_now']:.3f}", f"{r['gops']:.1f}",
                         f"{r.get('peak_share', float('nan')):.3f}", r.get("peak_unit", "")]
                        + [f"{r['speedup'].get(b, float('nan')):.3f}" for b in SHORT])
    paths.append(cp)
    try:
        from ._plot import roofline, speedups

        paths.append(roofline(result, os.path.join(out_dir, "roofline.png")))
        paths.append(speedups(result, os.path.join(out_dir, "speedups.png")))
    except ImportError as e:
        print(f"no plots ({e}); pip install 'pyquant[bench]'", file=sys.stderr)
    return paths
