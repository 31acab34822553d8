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
    # the machine line's thread count (the last of --threads 1,2), whose peaks the roofs are;
    # the read probe does no ops
    rows = [r for r in result["rows"] if r["kind"] != "probe"
            and r.get("threads", result["machine"]["threads"]) == result["machine"]["threads"]]
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


def _median(xs: list) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


# What a PyTorch user has for the same weight format, as `pyquant bench` names its rows: the
# first rule whose substring is in a pyquant row's name gives the baseline it is drawn against.
SAME_FORMAT = (("int4", "torch._weight_int4pack_mm_for_cpu[g128]"),
               ("int8", "torch.ao.dynamic_int8[fbgemm]"),
               ("bf16", "F.linear[bf16]"),
               ("", "F.linear[fp32]"))


def same_format_baseline(impl: str) -> str:
    return next(b for key, b in SAME_FORMAT if key in impl.replace("pyquant.", ""))


def speedup_summary(result: dict, baseline: str = "F.linear[fp32]") -> dict:
    """{m: [(impl, (lo, median, hi) over the shapes of the speedup over `baseline`,
    (lo, median, hi) of the speedup over PyTorch's path for the same format (SAME_FORMAT:
    int4 rows against int4pack, int8 rows against FBGEMM, bf16 against bf16 F.linear)))]}:
    what speedups() draws. A stat is None where the run has no such baseline."""
    out: dict = {}
    threads = result.get("machine", {}).get("threads")
    for r in result["rows"]:
        if r["kind"] != "pyquant" or not r["speedup"] or (
                threads and r.get("threads", threads) != threads):
            continue
        per_m = out.setdefault(r["m"], {})
        vs, same = per_m.setdefault(r["impl"], ([], []))
        if baseline in r["speedup"]:
            vs.append(r["speedup"][baseline])
        other = same_format_baseline(r["impl"])
        if other in r["speedup"]:
            same.append(r["speedup"][other])

    def stats(xs):
        return (min(xs), _median(xs), max(xs)) if xs else None

    return {m: [(name, stats(v), stats(b)) for name, (v, b) in impls.items()]
            for m, impls in sorted(out.items())}


def speedups(result: dict, path: str, baseline: str = "F.linear[fp32]") -> str:
    """Bars of each pyquant impl's speedup at each batch size M of the run: over fp32 `F.linear`
    and over PyTorch's own path for the same weight format (SAME_FORMAT), the median over the
    run's shapes with the range as a whisker. Log scale: 0.5x and 2x sit equally far from 1x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    summary = speedup_summary(result, baseline)
    ms = list(summary)[:6]
    n_rows = max((len(summary[m]) for m in ms), default=1)
    fig, axes = plt.subplots(1, max(1, len(ms)), figsize=(4.2 * max(1, len(ms)) + 2.2,
                                                          0.34 * n_rows + 1.6),
                             dpi=110, sharey=True, squeeze=False)
    names = sorted({name for m in ms for name, _, _ in summary[m]})
    for ax, m in zip(axes[0], ms):
        rows = {name: (vs, best) for name, vs, best in summary[m]}
        for i, name in enumerate(names):
            for j, (st, color, label) in enumerate(
                    ((rows.get(name, (None, None))[0], "tab:blue", f"over {baseline}"),
                     (rows.get(name, (None, None))[1], "tab:orange",
                      "over PyTorch's path for the same format (int4: int4pack, "
                      "int8: FBGEMM, bf16: F.linear[bf16])"))):
                if st is None:
                    continue
                lo, med, hi = st
                y = i + (0.2 if j == 0 else -0.2)
                # from 1x: a slowdown is a bar to the left
                ax.barh(y, med - 1, height=0.38, left=1, color=color,
                        label=None if label in ax.get_legend_handles_labels()[1] else label)
                ax.plot([lo, hi], [y, y], color="k", lw=1)
                ax.text(max(hi, med) * 1.04, y, f"{med:.2f}x", va="center", fontsize=7)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        top = max([st[2] for _, *sts in summary[m] for st in sts if st] + [2.0])
        low = min([st[0] for _, *sts in summary[m] for st in sts if st] + [1.0])
        ax.set_xlim(low / 1.3, top * 1.6)
        ticks = [t for t in (0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)
                 if low / 1.3 <= t <= top * 1.6]
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"M = {m}")
        ax.set_xlabel("speedup (log scale)")
        ax.grid(True, axis="x", which="both", alpha=0.3)
    axes[0][0].set_yticks(range(len(names)))
    axes[0][0].set_yticklabels([n.replace("pyquant.", "") for n in names], fontsize=8)
    axes[0][0].invert_yaxis()
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=8, frameon=False)
    mi = result["machine"]
    fig.suptitle(f"pyquant bench: {mi['cpu']}, {mi['threads']} threads, ISA {mi['isa']} "
                 f"(median over shapes, whisker: range)", fontsize=9)
    fig.tight_layout(rect=(0, 0.09, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)
    return path
