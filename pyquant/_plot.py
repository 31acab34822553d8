"""Roofline picture of a `pyquant bench` result (needs matplotlib: pip install 'pyquant[bench]').

x: arithmetic intensity (ops per weight byte, 2*M*N*K / bytes); y: achieved GOP/s. The
memory roof is the measured read bandwidth times the intensity, so a memory-bound kernel at the
limit sits on the slanted line; the flat lines are the measured peaks of the vector units (the
weight-only ops' fixed point needs three int8 products a product: its roof is a third of int8's)."""
from __future__ import annotations


def roofline(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bw = result["machine"]["read_bandwidth_gbps"]
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    impls = sorted({r["impl"] for r in rows}, key=lambda s: (not s.startswith("pyquant"), s))
    markers = "o^sDvP*Xh<>"
    xs_all = []
    for i, name in enumerate(impls):
        pts = [r for r in rows if r["impl"] == name]
        xs = [2 * r["m"] * r["n"] * r["k"] / r["weight_bytes"] for r in pts]
        ys = [r["gops"] for r in pts]
        xs_all += xs
        ax.scatter(xs, ys, label=name, marker=markers[i % len(markers)],
                   s=36 if name.startswith("pyquant") else 22,
                   alpha=0.9 if name.startswith("pyquant") else 0.6)
    if xs_all:
        lo, hi = min(xs_all) / 1.5, max(xs_all) * 1.5
        ax.plot([lo, hi], [bw * lo, bw * hi], "k--", lw=1,
                label=f"memory roof ({bw:.0f} GB/s measured)")
        # the compute roofs: the vector units' measured peaks (bench.measure_peaks)
        styles = {"int8": ":", "bf16": "-.", "fp32": "-"}
        for unit, peak in result["machine"].get("peak_gops", {}).items():
            ax.plot([lo, hi], [peak, peak], "k", ls=styles.get(unit, ":"), lw=0.8,
                    label=f"{unit} peak ({peak:.0f} GOP/s measured)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (ops / weight byte)")
    ax.set_ylabel("achieved GOP/s")
    mi = result["machine"]
    ax.set_title(f"pyquant bench: {mi['cpu']}, {mi['threads']} threads, ISA {mi['isa']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
