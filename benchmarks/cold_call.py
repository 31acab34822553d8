"""What the Python around one layer call costs at decode: a small layer (64 x 4096, so that
its kernel takes a few microseconds) called through an ops.LayerCall, as the layers call, right
after a 64 MB read has flushed the caches, as a real layer's weight stream does. Median
microseconds per call, 2-D x [1, K] and a model's 3-D x [1, 1, K], fp32 and bf16 (a bf16
model's); the same calls from warm caches beside them.

    python benchmarks/cold_call.py
    python benchmarks/cold_call.py --ops int4_weight_only,sparse24_int8 --calls 600

Why: from warm caches a call's Python takes a few microseconds, from the caches a 4096 x 4096
weight stream leaves behind several times that: each attribute read of a tensor ~4 us, a tensor
allocation ~21 us (2-core Xeon VM). A change to the call path is judged by this script run on
both versions (the numbers move by 5-10% from run to run: take several runs of each).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from pyquant import _native, ops
from pyquant.bench import _probe_buffer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_call_ab import _weights, ops_arg  # noqa: E402  (the layers' weights, as that script makes them)

OPS = ("int4_weight_only", "int8_dynamic", "sparse24_int8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)}")
    ap.add_argument("--calls", type=int, default=400, help="timed calls per op and x")
    ap.add_argument("--flush-mb", type=int, default=64, help="bytes read before each cold call")
    a = ap.parse_args(argv)
    ops_ = ops_arg(ap, a.ops, OPS)
    bufs = [_probe_buffer(a.flush_mb << 20) for _ in range(2)]
    torch.manual_seed(0)
    n, k = 64, 4096
    print(f"one call through ops.LayerCall, {n} x {k} layers, median us of {a.calls} calls; "
          f"cold: after a {a.flush_mb} MB read")
    with torch.inference_mode():
        for op in ops_:
            name, args = _weights(op, n, k)
            call = ops.LayerCall()
            line = []
            for shape, dt in (((1, k), torch.float32), ((1, 1, k), torch.float32),
                              ((1, 1, k), torch.bfloat16)):
                x = torch.randn(*shape).to(dt)
                call(name, x, *args)
                cold, hot = [], []
                for i in range(a.calls):
                    _native.stream_read(bufs[i % 2])
                    t0 = time.perf_counter()
                    call(name, x, *args)
                    cold.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    call(name, x, *args)
                    hot.append(time.perf_counter() - t0)
                kind = f"{len(shape)}-D" + (" bf16" if dt is torch.bfloat16 else "")
                line.append(f"{kind} x: cold {1e6 * statistics.median(cold):6.1f} us, "
                            f"warm {1e6 * statistics.median(hot):5.1f} us")
            print(f"  {name:28s} " + "; ".join(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
