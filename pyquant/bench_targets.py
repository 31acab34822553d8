"""The dense decode targets of `pyquant bench` at M = 1: each weight-only and dynamic op's share
of the read bandwidth and its speedup over the baselines of the same run, against what the
CPU kernels promise there (int4 weight-only: 80% of the bandwidth, 1.6x torch's int4pack, 6x
fp32 F.linear; int8 weight-only and dynamic: 80%, no slower than FBGEMM). A reader sees which
part of a target a shape misses without adding up the columns of the main table; the sparse
ops have theirs in pyquant.bench_sparse. The targets are set on Llama-2-7B's shapes (weights of
8-90 MB, read from memory); on MiniLM's (under 2.5 MB, a few microseconds of reading) a call
is its fixed cost, so those rows are left out.
"""
from __future__ import annotations

from typing import Optional

from .bench import SHORT  # the baselines' short names, as the main table prints them

BANDWIDTH_FLOOR = 0.80
FP32 = "F.linear[fp32]"
FBGEMM = "torch.ao.dynamic_int8[fbgemm]"
INT4PACK = "torch._weight_int4pack_mm_for_cpu[g128]"

# (impl, {baseline: minimum speedup}); every one also needs BANDWIDTH_FLOOR
TARGETS = (
    ("pyquant.int4_weight_only_mm[g128]", {INT4PACK: 1.6, FP32: 6.0}),
    ("pyquant.int8_weight_only_mm", {FBGEMM: 1.0}),
    ("pyquant.int8_dynamic_mm", {FBGEMM: 1.0}),
)
MODELS = ("llama2-7b",)  # pyquant.bench.SHAPES names whose shapes the targets are set on


def decode_targets(result: dict) -> list[dict]:
    """One row per target impl and Llama-2-7B shape timed at M = 1 in ``result`` (a bench run),
    where the targets are set: its share
    of the bandwidth, its speedups over the target's baselines (None where the run lacks one)
    and which parts it misses."""
    out = []
    for r in result["rows"]:
        if r["m"] != 1 or r.get("shape") not in MODELS:
            continue
        for impl, need in TARGETS:
            if r["impl"] != impl:
                continue
            speedups = {b: r.get("speedup", {}).get(b) for b in need}
            misses = [] if r["bw_share"] >= BANDWIDTH_FLOOR else [
                f"bw% < {100 * BANDWIDTH_FLOOR:.0f}%"]
            misses += [f"{SHORT[b]} < {v:.1f}x" for b, v in need.items()
                       if speedups[b] is not None and speedups[b] < v]
            out.append({"impl": impl, "shape": f"{r['n']}x{r['k']}", "ms": r["ms"],
                        "bw_share": r["bw_share"], "bw_share_now": r["bw_share_now"],
                        "speedup": speedups, "need": dict(need), "misses": misses})
    return out


def format_decode_targets(rows: list[dict], bw: Optional[float] = None) -> str:
    """The rows of decode_targets as a table: ms, bw%, now%, each speedup with what it needs,
    and what a row misses."""
    note = f" (read bandwidth {bw:.1f} GB/s measured in this run)" if bw else ""
    lines = [f"dense decode targets, M = 1, Llama-2-7B shapes{note}: bw% >= "
             f"{100 * BANDWIDTH_FLOOR:.0f}% and the speedups shown as got/needed",
             f"{'impl':36s} {'shape':>11s} {'ms':>8s} {'bw%':>5s} {'now%':>5s}  speedups"]
    for r in rows:
        sp = "  ".join(
            f"{SHORT[b]} " + (f"{v:.2f}x" if v is not None else "-") + f"/{r['need'][b]:.1f}x"
            for b, v in r["speedup"].items())
        verdict = f"  (below target: {', '.join(r['misses'])})" if r["misses"] else ""
        lines.append(f"{r['impl']:36s} {r['shape']:>11s} {r['ms']:8.3f} "
                     f"{100 * r['bw_share']:4.0f}% {100 * r['bw_share_now']:4.0f}%  {sp}{verdict}")
    return "\n".join(lines)
