"""Sparse rows of `pyquant bench` (2:4 float/int8/int4 and unstructured), and the decode
check of the sparse kernels against their dense baselines in one run:

    python -m pyquant.bench_sparse [--shapes llama2-7b] [--ms 1] [--iters 40]

``sparse_impls()`` is what pyquant.bench adds to its implementations; ``targets()`` turns one
bench result into the ratios the sparse layers promise at decode (M = 1): each sparse op's
speed over its dense counterpart measured in the same run (dense bf16 F.linear, pyquant's
dense int8 / int4 weight-only ops), and each one's share of the machine's read bandwidth on
its compressed bytes (values, positions or bitmask, scales, zeros, offsets).
"""
from __future__ import annotations

import statistics
from typing import Optional

import torch

from . import sparse_formats as sf

GROUP_SIZE = 128  # int4 group size along the kept (K/2) axis, as pyquant_impls' g128
SPARSITY = 0.7  # unstructured: 70% of every row pruned (Wanda's per-row count)

# (sparse impl, dense impl it replaces, minimum speedup at M = 1, the op and dtype kind it runs
# as in pyquant._native.sparse_dense_min_m(): from that batch size on the layer decompresses the
# weight and runs the dense GEMM); bandwidth floor for all.
TARGETS = (
    ("pyquant.sparse24_mm[bf16]", "F.linear[bf16]", 2.0, ("sparse24_mm", "bf16")),
    ("pyquant.sparse24_int8_mm", "pyquant.int8_weight_only_mm", 1.4, ("sparse24_int8_mm", "fp32")),
    (f"pyquant.sparse24_int4_mm[g{GROUP_SIZE}]", f"pyquant.int4_weight_only_mm[g{GROUP_SIZE}]",
     1.3, ("sparse24_int4_mm", "fp32")),
    (f"pyquant.sparse_unstructured_mm[bf16,{round(SPARSITY * 100)}%]", "F.linear[bf16]", 2.5,
     ("sparse_unstructured_mm", "bf16")),
    # an fp32 model's pruned layers (fp32 values and activations) against fp32 F.linear: no
    # target (None), shown so that fp32 users see what they get
    ("pyquant.sparse24_mm[fp32]", "F.linear[fp32]", None, ("sparse24_mm", "fp32")),
    (f"pyquant.sparse_unstructured_mm[fp32,{round(SPARSITY * 100)}%]", "F.linear[fp32]", None,
     ("sparse_unstructured_mm", "fp32")),
)


def dense_from_m(key: tuple) -> Optional[int]:
    """The batch size from which the op of ``key`` (op, kind) runs dense from its compressed
    weight (None: the sparse kernel at every size, or the native module is not loaded)."""
    from . import _native

    return _native.sparse_dense_min_m().get(key) if _native.available() else None


def gemm_from_m(key: tuple, kept: float) -> Optional[int]:
    """The batch size from which the op of ``key`` runs a sparse GEMM (only the kept products:
    sparse24_mm and sparse_unstructured_mm with float32 activations, the unstructured one on a
    weight at most half kept, with this share kept); None where it does not."""
    from . import _native

    if not _native.available() or key[1] != "fp32":
        return None
    if key[0] == "sparse24_mm":
        return _native.SPARSE24_GEMM_MIN_M if _native._has_sparse_gemm() else None
    if key[0] == "sparse_unstructured_mm":
        return _native.unstructured_gemm_from_m(kept)
    return None
BANDWIDTH_FLOOR = 0.75


def _runs_on_panels(op: str, n: int, k: int) -> bool:
    """True when sparse_impls' impl of ``op`` runs the 4-row panels op on an [n, k] weight (at
    the group size of TARGETS' names, the only impls targets() reads)."""
    from . import sparse_panels

    group = {"sparse24_int8_mm": None, "sparse24_int4_mm": GROUP_SIZE}
    return op in group and sparse_panels.layout_applies(n, k, "cpu", group[op])


def _bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _unstructured_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Magnitude mask keeping unstructured_kept(K, sparsity) weights of every row."""
    kept = sf.unstructured_kept(w.shape[1], sparsity)
    mask = torch.zeros(w.shape, dtype=torch.bool)
    return mask.scatter_(1, w.abs().topk(kept, dim=1).indices, True)


def sparse_impls(group_size: int = GROUP_SIZE, sparsity: float = SPARSITY) -> list:
    """bench.Impl entries of the sparse ops on magnitude-pruned weights. Activations
    are cast to bf16 first where the dense baseline does (F.linear[bf16]), so both sides
    pay the same conversion."""
    from . import ops, sparse_panels
    from .bench import Impl

    # as the dense pyquant impls (bench.pyquant_impls): what the layers run in eager inference,
    # the op through the ops.LayerCall that ends each state (one per weight copy), without the
    # dispatcher's Python wrappers (~30 us a call, which the dense side does not pay either)
    bf16 = torch.bfloat16

    def make_24_bf16(w):
        return (*sf.compress_24(w.to(bf16)), ops.LayerCall())

    def make_24_fp32(w):
        return (*sf.compress_24(w), ops.LayerCall())

    # what the 2:4 + int8 / int4 layers keep: the CPU 4-row panels where this CPU's kernels
    # take them (pyquant/sparse_panels.py), and the op that multiplies them (last entry)
    def make_24_int8(w):
        v, meta = sf.compress_24(w)
        q, s = sf.quantize_24_int8(v)
        if sparse_panels.layout_applies(*w.shape, w.device):
            return (*sparse_panels.pack(q, meta, 8), s, "sparse24_int8_mm_panels",
                    ops.LayerCall())
        return q, meta, s, "sparse24_int8_mm", ops.LayerCall()

    def make_24_int4(w):
        v, meta = sf.compress_24(w)
        p, s, z = sf.quantize_24_int4(v, group_size)
        if sparse_panels.layout_applies(*w.shape, w.device, group_size):
            return (*sparse_panels.pack(p, meta, 4), s, z, "sparse24_int4_mm_panels",
                    ops.LayerCall())
        return p, meta, s, z, "sparse24_int4_mm", ops.LayerCall()

    def make_unstructured(w):
        return (*sf.compress_unstructured(w.to(bf16), _unstructured_mask(w, sparsity)),
                ops.LayerCall())

    def make_unstructured_fp32(w):
        return (*sf.compress_unstructured(w, _unstructured_mask(w, sparsity)), ops.LayerCall())

    return [
        Impl("pyquant.sparse24_mm[bf16]", "pyquant", make_24_bf16,
             lambda s, x: s[2]("sparse24_mm", x, s[0], s[1], None),
             lambda s: _bytes(*s), "sparse24_mm", x_dtype=bf16),
        Impl("pyquant.sparse24_mm[fp32]", "pyquant", make_24_fp32,
             lambda s, x: s[2]("sparse24_mm", x, s[0], s[1], None),
             lambda s: _bytes(*s), "sparse24_mm"),
        Impl("pyquant.sparse24_int8_mm", "pyquant", make_24_int8,
             lambda s, x: s[4](s[3], x, s[0], s[1], s[2], None),
             lambda s: _bytes(*s), "sparse24_int8_mm"),
        Impl(f"pyquant.sparse24_int4_mm[g{group_size}]", "pyquant", make_24_int4,
             lambda s, x: s[5](s[4], x, s[0], s[1], s[2], s[3], group_size, None),
             lambda s: _bytes(*s), "sparse24_int4_mm"),
        Impl(f"pyquant.sparse_unstructured_mm[bf16,{round(sparsity * 100)}%]", "pyquant",
             make_unstructured,
             lambda s, x: s[3]("sparse_unstructured_mm", x, *s[:3], None),
             lambda s: _bytes(*s), "sparse_unstructured_mm", x_dtype=bf16),
        Impl(f"pyquant.sparse_unstructured_mm[fp32,{round(sparsity * 100)}%]", "pyquant",
             make_unstructured_fp32,
             lambda s, x: s[3]("sparse_unstructured_mm", x, *s[:3], None),
             lambda s: _bytes(*s), "sparse_unstructured_mm"),
    ]


def targets(result: dict, m: int = 1) -> list[dict]:
    """Per sparse impl and shape at batch ``m``: speedup over its dense counterpart (same run)
    and share of the measured read bandwidth, with pass/fail against TARGETS."""
    ms = {(r["shape"], r["n"], r["k"], r["m"], r["impl"]): r for r in result["rows"]}
    out = []
    for sparse, dense, min_speedup, key in TARGETS:
        for (shape, n, k, mm, impl), r in ms.items():
            if impl != sparse or mm != m:
                continue
            d = ms.get((shape, n, k, m, dense))
            speedup = d["ms"] / r["ms"] if d else None
            # the speedup at the dense op's own bandwidth: its bytes over the sparse op's
            wb, dwb = r.get("weight_bytes"), d.get("weight_bytes") if d else None
            bytes_ratio = dwb / wb if wb and dwb else None
            # the break-even of the op the impl runs (sparse_impls: the layers' layout)
            runs = (key[0] + "_panels", key[1]) if _runs_on_panels(key[0], n, k) else key
            # the bench's unstructured weights keep the same count in every row
            gemm_m = gemm_from_m(runs, sf.unstructured_kept(k, SPARSITY) / k)
            out.append({
                "impl": sparse, "shape": f"{n}x{k}", "m": m, "ms": r["ms"], "vs": dense,
                "speedup": speedup, "min_speedup": min_speedup, "bytes_ratio": bytes_ratio,
                "bw_share": r["bw_share"],
                "bw_share_now": r.get("bw_share_now", float("nan")),
                # a weight that takes a GEMM never runs dense (pyquant._native), but x with an
                # Inf or NaN, which the bench does not send
                "dense_from_m": None if gemm_m is not None else dense_from_m(runs),
                "gemm_from_m": gemm_m,
                # no target (min_speedup None): shown, neither met nor missed
                "ok": _verdict(speedup, min_speedup, r["bw_share"]),
            })
    return out


def _verdict(speedup: Optional[float], min_speedup: Optional[float],
             bw_share: float) -> Optional[bool]:
    """A decode target met (True), missed (False) or not judged (None: no target, or no dense
    counterpart timed to take the speedup against, as --impls can leave it out, while the share
    of the bandwidth passes)."""
    if min_speedup is None:
        return None
    if bw_share < BANDWIDTH_FLOOR:
        return False
    return None if speedup is None else speedup >= min_speedup


def _short_of(r: dict) -> str:
    """Which of a decode target's two parts a row misses; and, for a missed speedup whose
    target is above the byte ratio, that the sparse op would have to read memory faster than
    its dense counterpart does to meet it."""
    why = []
    if r["speedup"] is not None and r["speedup"] < r["min_speedup"]:
        why.append(f"speedup < {r['min_speedup']:.1f}x")
    if r["bw_share"] < BANDWIDTH_FLOOR:
        why.append(f"bw% < {100 * BANDWIDTH_FLOOR:.0f}%")
    text = ", ".join(why)
    ratio = r.get("bytes_ratio")
    if why and why[0].startswith("speedup") and ratio and r["min_speedup"] > ratio:
        text += f"; {r['min_speedup']:.1f}x is above the byte ratio {ratio:.2f}x"
    return text


def format_targets(rows: list[dict], bw: Optional[float] = None, m: int = 1) -> str:
    """The decode targets at M = 1; at other batch sizes the same ratios without targets (the
    targets are for decode), and which path the layer takes there."""
    bw_note = f" (read bandwidth {bw:.1f} GB/s measured in this run)" if bw else ""
    decode = m == 1
    lines = [("sparse decode targets, M = 1" if decode
              else f"sparse layers at M = {m} against their dense counterparts") + bw_note
             + "; bytes: the dense op's bytes over the sparse op's, its speedup at equal GB/s"]
    lines.append(f"{'impl':44s} {'shape':>11s} {'ms':>8s} {'speedup':>8s} "
                 + (f"{'need':>5s} " if decode else "")
                 + f"{'bytes':>6s} {'bw%':>5s} {'now%':>5s} {'dense from M':>12s}  vs")
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        be = r["dense_from_m"]
        gm = r.get("gemm_from_m")
        flag = ("" if r["ok"] is not False else f"  (below target: {_short_of(r)})") if decode \
            else ("  (runs dense: decompressed weight)" if be is not None and m >= be else
                  "  (runs the sparse GEMM: kept products only)"
                  if gm is not None and m >= gm else "")
        need = "-" if r["min_speedup"] is None else f"{r['min_speedup']:.1f}x"
        ratio = r.get("bytes_ratio")
        by = f"{ratio:.2f}x" if ratio else "-"
        lines.append(f"{r['impl']:44s} {r['shape']:>11s} {r['ms']:8.3f} {sp:>8s} "
                     + (f"{need:>5s} " if decode else "")
                     + f"{by:>6s} {100 * r['bw_share']:4.0f}% {100 * r['bw_share_now']:4.0f}% "
                     f"{be if be is not None else '-':>12}  "
                     f"{r['vs']}{flag}")
    speedups = [r["speedup"] for r in rows if r["speedup"]]
    if speedups:
        lines.append(f"median speedup over the dense counterparts: "
                     f"{statistics.median(speedups):.2f}x")
    elif rows:  # e.g. --impls that leaves the dense counterparts out
        missing = sorted({r["vs"] for r in rows})
        lines.append(f"no speedups: this run has no {', '.join(missing)} (add them to --impls)")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    from . import bench

    ap = argparse.ArgumentParser(prog="python -m pyquant.bench_sparse",
                                 description="sparse decode speed against the dense baselines")
    ap.add_argument("--shapes", default="llama2-7b", help=f"one of {', '.join(bench.SHAPES)}")
    ap.add_argument("--ms", default="1", help="comma-separated batch sizes")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    ms = [int(v) for v in a.ms.split(",")]
    res = bench.run(models=(a.shapes,), ms=ms, threads=a.threads, iters=a.iters,
                    impl_filter="sparse,int8_weight_only,int4_weight_only")
    print(bench.format_table(res))
    bench.sparse_summary(res, ms)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
