"""In-process A/B of the CPU panel layout (pyquant/panels.py) against the canonical rows.

The layers of AVX512 CPUs without AMX (and the int4 layers of AMX CPUs) keep their
weights in 32-row panels packed once at swap time; with the canonical rows the same kernels convert every panel on every call (or, at small
M, run the GEMV-shaped kernels on the rows). Each op runs both ways, the calls interleaved in
one process, each on the next of several weight copies that together exceed the last-level
cache (so decode sizes read DRAM, as a model's layers do).

    python benchmarks/panel_layout_ab.py                          # Llama-2-7B shapes
    python benchmarks/panel_layout_ab.py --shapes 1536x384 --ms 1,64 --ops int8_dynamic_mm

Prints medians in ms and the ratio rows / panels, per op, shape (N x K) and M.
"""
from __future__ import annotations

import argparse

import torch

from pyquant import _native, formats, ops, panels
from pyquant.bench import _llc_bytes, _time_interleaved

OPS = ("int8_weight_only_mm", "int8_dynamic_mm", "int4_weight_only_mm", "int4_dynamic_mm")
DEFAULT_SHAPES = ("4096x4096", "11008x4096", "4096x11008")


def _states(op: str, n: int, k: int, group_size: int, copies: int):
    """([canonical weight args] * copies, [panel weight args] * copies)."""
    rows, packed = [], []
    for _ in range(copies):
        w = torch.randn(n, k) * 0.05
        if op.startswith("int8"):
            q, s = formats.quantize_int8_per_channel(w)
            rows.append((q, s))
            packed.append((panels.pack_int8(q), s))
        else:
            c, s, z = formats.quantize_int4_groupwise(w, group_size, symmetric=False)
            wp = formats.pack_int4(c)
            rows.append((wp, s, z, group_size))
            packed.append((*panels.pack_int4(wp, s, z, group_size), group_size))
    return rows, packed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="N x K, comma list")
    ap.add_argument("--ms", default="1,4,16,128", help="rows of x, comma list")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    ap.add_argument("--iters", type=int, default=9, help="interleaved calls of each layout")
    ap.add_argument("--max-copies", type=int, default=64,
                    help="at most this many weight copies (small shapes stay in cache anyway)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="activation dtype")
    ap.add_argument("--force", action="store_true",
                    help="time the panels also where the layers of this ISA keep rows (the "
                         "panel ops run wherever the ISA has the panel kernels)")
    a = ap.parse_args(argv)
    if not _native.available():
        ap.error(f"the native module is not loaded ({_native.load_error()})")
    dtype = getattr(torch, a.dtype)
    isa = _native.module().isa_name(_native.current_isa())
    print(f"ISA {isa}, {torch.get_num_threads()} threads, activations {a.dtype}")
    for spec in a.shapes.split(","):
        n, k = (int(v) for v in spec.lower().split("x"))
        for op in a.ops.split(","):
            if op not in OPS:
                ap.error(f"unknown op {op!r}; use {', '.join(OPS)}")
            g = a.group_size
            applies = (panels.panel_layout_applies(n, k, "cpu") if op.startswith("int8") else
                       panels.int4_weight_only_panel_layout_applies(n, k, g, "cpu")
                       if op == "int4_weight_only_mm" else
                       panels.int4_panel_layout_applies(n, k, g, "cpu"))
            if not applies and not (a.force and panels.shape_ok(n, k)):
                print(f"{n}x{k} {op}: the panel layout does not apply here (ISA {isa}, "
                      f"N % 32, K % 64, group size % 32)")
                continue
            wbytes = n * k if op.startswith("int8") else n * k // 2
            copies = min(a.max_copies, max(2, 2 * _llc_bytes() // wbytes + 1))
            rows, packed = _states(op, n, k, g, copies)
            for m in (int(v) for v in a.ms.split(",")):
                x = torch.randn(m, k).to(dtype)
                entries = [(lambda s, x: ops.call(op, x, *s, None), rows),
                           (lambda s, x: ops.call(op + "_panels", x, *s, None), packed)]
                t_rows, t_panels = _time_interleaved(entries, x, a.iters)
                print(f"{n}x{k} M={m} {op}{f' g{g}' if op.startswith('int4') else ''}: "
                      f"rows {1e3 * t_rows:.3f} ms, panels {1e3 * t_panels:.3f} ms: "
                      f"{t_rows / t_panels:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
