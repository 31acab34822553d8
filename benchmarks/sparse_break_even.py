"""Where the sparse layers should switch to the dense path, measured on this machine.

From a batch size on (pyquant._native.sparse_dense_min_m(), listed by `pyquant info`) a sparse
op decompresses its weight for the call and runs the dense GEMM. This script measures what
that choice rests on, on the Llama-2-7B shapes 4096x4096 and 4096x11008:

  1. the decompression of each sparse format on every instruction set here (ms a call);
  2. each op forced onto its sparse kernel and onto the dense path at several batch sizes:
     sparse time / dense time (below 1 the sparse kernel is faster);
  3. unstructured and 2:4 with float32 activations on the sparse GEMMs (only the kept products;
     pyquant._native.unstructured_gemm_from_m, SPARSE24_GEMM_MIN_M), against the row kernel and
     the dense path: GEMM time / row kernel time and GEMM time / dense path time. --kept sets
     the share of each unstructured weight kept (0.3: 70% pruned), on which the unstructured
     GEMM's break-even depends.

    python benchmarks/sparse_break_even.py [--ms 8,16,32,64] [--reps 7] [--threads 2] [--kept 0.3]

Median of --reps calls; the machine should be otherwise idle, and the ratios, measured side
by side, are what to compare across runs.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from pyquant import _native, sparse_panels
from pyquant.bench import median_ms
from pyquant import sparse_formats as sf

SHAPES = ((4096, 4096), (4096, 11008))


def weights(n: int, k: int, kept: float = 0.3) -> dict:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    v, meta = sf.compress_24(w)
    q, s8 = sf.quantize_24_int8(v)
    p4, s4, z4 = sf.quantize_24_int4(v, 128)
    keep = w.abs() > w.abs().flatten().kthvalue(int((1 - kept) * w.numel())).values
    bm, vu, off = sf.compress_unstructured((w * keep).bfloat16(), keep)
    _, vf, _ = sf.compress_unstructured(w * keep, keep)  # fp32 values: what an fp32 model keeps
    d = dict(v=v.bfloat16(), vf24=v, meta=meta, q=q, s8=s8, p4=p4, s4=s4, z4=z4, bm=bm, vu=vu,
             vf=vf, off=off, k=k)
    if sparse_panels.layout_applies(n, k, "cpu", 128):  # what the int8/int4 layers keep here
        d["q_pv"], d["q_pm"] = sparse_panels.pack(q, meta, 8)
        d["p4_pv"], d["p4_pm"] = sparse_panels.pack(p4, meta, 4)
    return d


def decompressions(t: dict, kept: float) -> dict:
    return {
        "2:4 int8": lambda: _native._decompress_24(t["q"], t["meta"]),
        "2:4 bf16": lambda: _native._decompress_24(t["v"], t["meta"]),
        "2:4 int4 g128": lambda: _native._decompress_24_int4(t["p4"], t["meta"], t["z4"], 128),
        f"unstructured {1 - kept:.0%} bf16": lambda: _native._decompress_unstructured(
            t["bm"], t["vu"], t["off"], t["k"]),
    }


def ops(t: dict) -> dict:
    """op name -> (its sparse_dense_min_m() key, a call on activations x)."""
    return {
        "sparse24_mm bf16 x": (("sparse24_mm", "bf16"),
                               lambda x: _native.sparse24_mm(x.bfloat16(), t["v"], t["meta"])),
        "sparse24_int8_mm": (("sparse24_int8_mm", "fp32"),
                             lambda x: _native.sparse24_int8_mm(x, t["q"], t["meta"], t["s8"])),
        "sparse24_int4_mm g128": (("sparse24_int4_mm", "fp32"),
                                  lambda x: _native.sparse24_int4_mm(x, t["p4"], t["meta"],
                                                                     t["s4"], t["z4"], 128)),
        "sparse24_mm fp32": (("sparse24_mm", "fp32"),
                             lambda x: _native.sparse24_mm(x, t["vf24"], t["meta"])),
        "unstructured bf16 x": (("sparse_unstructured_mm", "bf16"),
                                lambda x: _native.sparse_unstructured_mm(
                                    x.bfloat16(), t["bm"], t["vu"], t["off"])),
        "unstructured fp32": (("sparse_unstructured_mm", "fp32"),
                              lambda x: _native.sparse_unstructured_mm(
                                  x, t["bm"], t["vf"], t["off"])),
        **({"sparse24_int8_mm_panels": (("sparse24_int8_mm_panels", "fp32"),
                                         lambda x: _native.sparse24_int8_mm_panels(
                                             x, t["q_pv"], t["q_pm"], t["s8"])),
            "sparse24_int4_mm_panels g128": (("sparse24_int4_mm_panels", "fp32"),
                                             lambda x: _native.sparse24_int4_mm_panels(
                                                 x, t["p4_pv"], t["p4_pm"], t["s4"], t["z4"],
                                                 128))} if "q_pv" in t else {}),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ms", default="8,16,32,64")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kept", type=float, default=0.3)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not _native.available():
        raise SystemExit(f"the native module is not loaded: {_native.load_error()}")
    ms = [int(v) for v in a.ms.split(",")]
    isas = [name for i, name in enumerate(_native.ISA_NAMES) if _native.module().isa_available(i)]
    table = _native.sparse_dense_min_m
    saved = table()
    for n, k in SHAPES:
        t = weights(n, k, a.kept)
        print(f"{n}x{k}: decompression, ms a call")
        for name, fn in decompressions(t, a.kept).items():
            row = []
            for isa in isas:
                with _native.use_isa(isa):
                    row.append(f"{isa} {median_ms(fn, a.reps):7.2f}")
            print(f"  {name:22s} " + "  ".join(row))
        print(f"{n}x{k}: sparse kernel time / dense path time (now dense from M = ...)")
        for name, (key, fn) in ops(t).items():
            row = []
            gemm_row = []
            for m in ms:
                x = torch.randn(m, k)
                try:
                    keys = set(saved) | {key}
                    with sparse_gemms(False):
                        _native.sparse_dense_min_m = lambda: {kk: 1 << 30 for kk in keys}
                        sparse = median_ms(lambda: fn(x), a.reps)
                        _native.sparse_dense_min_m = lambda: {kk: 1 for kk in keys}
                        dense = median_ms(lambda: fn(x), a.reps)
                    if name in GEMM_FROM:
                        _native.sparse_dense_min_m = lambda: {kk: 1 << 30 for kk in keys}
                        with sparse_gemms(True):
                            gemm = median_ms(lambda: fn(x), a.reps)
                        gemm_row.append(f"M={m} {gemm / sparse:5.2f} {gemm / dense:5.2f}")
                finally:
                    _native.sparse_dense_min_m = table
                row.append(f"M={m} {sparse / dense:5.2f}")
            print(f"  {name:22s} " + "  ".join(row) + f"   ({saved.get(key)})")
            if gemm_row:
                print(f"  {'  GEMM / rows, / dense':22s} " + "  ".join(gemm_row) +
                      f"   (GEMM from M = {GEMM_FROM[name](a.kept)})")
    return 0


# the ops with a sparse GEMM: the M it runs from, given the unstructured weights' kept share
GEMM_FROM = {"unstructured fp32": lambda kept: _native.unstructured_gemm_from_m(kept),
             "sparse24_mm fp32": lambda kept: _native.SPARSE24_GEMM_MIN_M}


@contextlib.contextmanager
def sparse_gemms(on: bool):
    """The sparse GEMMs at every M (on) or at none (off), whatever the weight's share."""
    names = ("UNSTRUCTURED_GEMM_MAX_KEPT", "UNSTRUCTURED_GEMM_M_PER_KEPT",
             "UNSTRUCTURED_GEMM_MIN_M", "SPARSE24_GEMM_MIN_M")
    saved = [getattr(_native, nm) for nm in names]
    for nm, v in zip(names, (1.0, 0, 1, 1) if on else (-1.0, 0, 1, 1 << 30)):
        setattr(_native, nm, v)
    try:
        yield
    finally:
        for nm, v in zip(names, saved):
            setattr(_native, nm, v)


if __name__ == "__main__":
    raise SystemExit(main())
