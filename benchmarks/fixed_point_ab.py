"""In-process A/B of the CPU weight-only kernels' fixed-point paths against their float paths.

The same native call runs with its workspace (the fixed-point path: activations in 24-bit fixed
point, three int8 terms on the int8 dot-product units) and without (the float path that
dequantizes the weights), alternately in one process, beside fp32 `F.linear` on the same
activations. On a noisy machine this is steadier than comparing two builds in two processes.

    python benchmarks/fixed_point_ab.py                     # MiniLM and Llama-2-7B shapes
    python benchmarks/fixed_point_ab.py --shapes 384x384x2048 --op int4 --group-size 64

A shape is N x K x M. Prints medians in ms and the ratios float / fixed and fp32 / fixed.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pyquant import _native, formats
from pyquant.bench import median_ms

DEFAULT_SHAPES = ("384x384x2048", "1536x384x2048", "384x1536x2048", "11008x4096x128",
                  "4096x11008x128", "4096x4096x16")


def _calls(op: str, n: int, k: int, m: int, group_size: int):
    """(call with workspace, call without, fp32 F.linear, whether the fixed-point path runs)."""
    mod, isa, nt = _native.module(), _native.current_isa(), torch.get_num_threads()
    w = torch.randn(n, k) * 0.05
    x = torch.randn(m, k)
    out = torch.empty(m, n)
    if op == "int8":
        w8, s8 = formats.quantize_int8_per_channel(w)
        nbytes = mod.int8_weight_only_workspace_bytes(isa, m, k, n, nt)
        fixed = bool(mod.int8_weight_only_fixed_point(isa, m, k, n))

        def call(work, nb):
            return mod.int8_weight_only_mm(isa, x.data_ptr(), m, k, k, w8.data_ptr(), n,
                                           s8.data_ptr(), 0, out.data_ptr(), nt, work, nb)
    else:
        codes, scales, zeros = formats.quantize_int4_groupwise(w, group_size, symmetric=False)
        packed = formats.pack_int4(codes)
        nbytes = mod.int4_weight_only_workspace_bytes(isa, m, k, n, group_size, nt)
        fixed = bool(mod.int4_weight_only_fixed_point(isa, m, k, group_size))

        def call(work, nb):
            return mod.int4_weight_only_mm(isa, x.data_ptr(), m, k, k, packed.data_ptr(), n,
                                           scales.data_ptr(), zeros.data_ptr(), group_size, 0,
                                           out.data_ptr(), nt, work, nb)
    buf = torch.empty(max(nbytes, 0) + 64, dtype=torch.uint8)  # the closures keep it alive
    return (lambda: call((buf.data_ptr() + 63) // 64 * 64, max(nbytes, 0)), lambda: call(0, 0),
            lambda: F.linear(x, w), fixed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="N x K x M, comma list")
    ap.add_argument("--op", choices=("int8", "int4", "both"), default="both")
    ap.add_argument("--group-size", type=int, default=None,
                    help="int4 group size (default: 64 where K < 1024, else 128)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds per shape")
    a = ap.parse_args(argv)
    if not _native.available():
        ap.error(f"the native module is not loaded ({_native.load_error()})")
    ops = ("int8", "int4") if a.op == "both" else (a.op,)
    isa = _native.module().isa_name(_native.current_isa())
    print(f"ISA {isa}, {torch.get_num_threads()} threads")
    for spec in a.shapes.split(","):
        n, k, m = (int(v) for v in spec.lower().split("x"))
        for op in ops:
            g = a.group_size or (64 if k < 1024 else 128)
            fixed, plain, fp32, runs = _calls(op, n, k, m, g)
            cells = []
            for _ in range(a.rounds):
                tf, tp, t32 = (median_ms(f, a.reps) for f in (fixed, plain, fp32))
                cells.append(f"fixed {tf:.2f} float {tp:.2f} fp32 {t32:.2f} ms: "
                             f"{tp / tf:.2f}x float, {t32 / tf:.2f}x fp32")
            label = f"{op} weight-only{'' if op == 'int8' else f' g{g}'}"
            note = "" if runs else "  (the fixed-point path does not run here)"
            print(f"{n}x{k} M={m} {label}: " + " | ".join(cells) + note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
