"""bf16 activations on the AMX paths, read and written as bf16, against the float path they
replaced (x copied to float32, the float32 output converted back), in one process: the calls
alternate between the two in every round (the bf16 path turned off by its native query
answering no), on the same weights, as the layers run them (pyquant bench's impls). Prints the
median of each and their ratio per op, shape and M.

    python benchmarks/bf16_io_ab.py
    python benchmarks/bf16_io_ab.py --ops int4_weight_only --ms 128,512,1024 --rounds 8

Why: a bf16 model's layers on AMX paid for a float32 copy of x and a float32 output converted
afterwards, 13% of int4 weight-only's time at M = 1024 (4096 x 4096, 2-core Xeon); the
quantized ops now read bf16 rows and write bf16 outputs themselves (csrc/pq.h, the *_bf16
calls). The dynamic ops quantize bf16 rows as they are on both sides
(pq_quantize_rows_int8_bf16): what differs is their output. Needs a CPU with AMX (elsewhere
both sides run the float path).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

# op -> (the bench impl it runs as, the native query that turns its bf16 path on)
OPS = {
    "int8_dynamic": ("pyquant.int8_dynamic_mm[x-bf16]", "int8_dynamic_mm_bf16_workspace_bytes"),
    "int4_dynamic": ("pyquant.int4_dynamic_mm[g128]", "int4_dynamic_bf16_applies"),
    "int8_weight_only": ("pyquant.int8_weight_only_mm[x-bf16]", "int8_weight_only_bf16_applies"),
    "int4_weight_only": ("pyquant.int4_weight_only_mm[g128 x-bf16]",
                         "int4_weight_only_panels_bf16_applies"),
}
SHAPES = "4096x4096,11008x4096,4096x11008"  # Llama-2-7B's, N x K


def _median_ms(f, calls: int) -> float:
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> int:
    from pyquant import _native, bench
    from pyquant.bench import _clone_state

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)}")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated N x K")
    ap.add_argument("--ms", default="128,1024", help="comma-separated batch sizes M")
    ap.add_argument("--rounds", type=int, default=6, help="alternated rounds (3 calls each)")
    a = ap.parse_args(argv)
    ops_ = [o.strip() for o in a.ops.split(",") if o.strip()]
    if any(o not in OPS for o in ops_):
        ap.error(f"unknown op in {ops_}; use {', '.join(OPS)}")
    if not _native.available() or _native.ISA_NAMES[_native.current_isa()] != "avx512_amx":
        ap.error("needs the native module on a CPU with AMX")
    mod = _native.module()
    impls = {i.name: i for i in bench.pyquant_impls()}
    print(f"bf16 in and out against float32 copies, {torch.get_num_threads()} threads, median ms")
    with torch.inference_mode():
        for op in ops_:
            name, query = OPS[op]
            real = getattr(mod, query)
            impl = impls[name]
            for n, k in ((int(v) for v in sh.lower().split("x")) for sh in a.shapes.split(",")):
                torch.manual_seed(0)
                state = _clone_state(impl.make(torch.randn(n, k) * 0.02), True)
                for m in (int(v) for v in a.ms.split(",")):
                    x = torch.randn(m, k).to(torch.bfloat16)
                    off = -1 if "workspace" in query else 0  # "no" in the query's terms
                    ways = (("float32", lambda *_, off=off: off), ("bf16", real))
                    times = {"float32": [], "bf16": []}
                    try:
                        for r in range(a.rounds):
                            for tag, q in (ways if r % 2 else ways[::-1]):
                                setattr(mod, query, q)  # the bound calls look it up per call
                                impl.run(state, x)
                                times[tag].append(_median_ms(lambda: impl.run(state, x), 3))
                    finally:
                        setattr(mod, query, real)
                    f32, b16 = (statistics.median(times[t]) * 1e3 for t in ("float32", "bf16"))
                    print(f"  {op:17s} {n:>5}x{k:<6} M={m:<5} float32 copies {f32:8.3f}  "
                          f"bf16 {b16:8.3f}  {f32 / b16:.3f}x", flush=True)
                del state
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
