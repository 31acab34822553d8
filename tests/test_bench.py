"""`pyquant bench` end to end on MiniLM's small shapes: every impl gets a row per shape and M,
the speedups refer to baselines timed in the same run, and the table, CSV and JSON come out.
Timings are not checked (this is a shared CI machine); the read-bandwidth probe, which reads
1 GiB, and the instruction-peak probe are replaced by fixed values."""
from __future__ import annotations

import csv
import importlib.util
import json
import math

import pytest

from pyquant import _native, bench, sparse_panels


PEAKS = {"fp32": 25.0, "bf16": 50.0, "int8": 100.0}


@pytest.fixture
def small_run(monkeypatch):
    monkeypatch.setattr(bench, "measure_read_bandwidth", lambda *a, **k: 10.0)
    monkeypatch.setattr(bench, "measure_peaks", lambda *a, **k: dict(PEAKS))
    return bench.run(models=("minilm",), ms=(1, 3), impl_filter="int8,int4", iters=2,
                     rotate_bytes=1 << 20)


@pytest.mark.skipif(not _native.available(), reason="native module not loaded")
def test_bench_rows_and_outputs(small_run, tmp_path):
    rows = small_run["rows"]
    impls = {r["impl"] for r in rows}
    # the bf16-activation rows of the weight-only ops and int8 dynamic run beside the fp32 ones
    assert {"pyquant.int8_weight_only_mm", "pyquant.int8_weight_only_mm[x-bf16]",
            "pyquant.int4_weight_only_mm[g128]", "pyquant.int4_weight_only_mm[g128 x-bf16]",
            "pyquant.int8_dynamic_mm", "pyquant.int8_dynamic_mm[x-bf16]",
            "pyquant.int4_dynamic_mm[g128]",
            "F.linear[fp32]", "F.linear[bf16]"} <= impls
    shapes = {(r["n"], r["k"]) for r in rows}
    assert shapes == set(bench.SHAPES["minilm"])
    for impl in impls:  # every M of each shape an impl runs (2:4 + int4 g128 needs K/2 % 128)
        got = sorted((r["n"], r["k"], r["m"]) for r in rows if r["impl"] == impl)
        ran = {(n, k) for (n, k, _) in got}
        assert got == sorted((n, k, m) for (n, k) in ran for m in (1, 3)), impl
        assert ran == shapes or "sparse24_int4" in impl, impl
    probe = {(r["n"], r["k"], r["m"]): r for r in rows if r["impl"] == bench.PROBE}
    assert set(probe) == {(r["n"], r["k"], r["m"]) for r in rows}
    for r in rows:
        assert r["ms"] > 0 and r["gbps"] > 0 and r["bw_share"] == pytest.approx(r["gbps"] / 10.0)
        # the share of the read probe's GB/s timed in the same rounds
        now = probe[(r["n"], r["k"], r["m"])]
        assert r["bw_share_now"] == pytest.approx(r["gbps"] / now["gbps"])
        assert now["weight_bytes"] == 4 * r["n"] * r["k"] and bench.PROBE not in r["speedup"]
        assert not now["speedup"]  # nothing is compared with the probe, nor it with anything
        if r["kind"] == "pyquant":
            # a speedup is a ratio of two times of this run
            fp32 = next(b for b in rows if b["impl"] == "F.linear[fp32]"
                        and (b["n"], b["k"], b["m"]) == (r["n"], r["k"], r["m"]))
            assert r["speedup"]["F.linear[fp32]"] == pytest.approx(fp32["ms"] / r["ms"])
    table = bench.format_table(small_run)
    assert "measured read bandwidth 10.0 GB/s" in table
    assert "measured instruction peaks, GOP/s: fp32 25, bf16 50, int8 100" in table
    assert len(table.splitlines()) == 4 + len(rows)
    assert "allocator: malloc as configured" in table  # run() alone leaves malloc be
    paths = bench.write_outputs(small_run, str(tmp_path))
    with open(tmp_path / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    with open(tmp_path / "bench.json") as f:
        machine = json.load(f)["machine"]
        assert machine["read_bandwidth_gbps"] == 10.0 and machine["peak_gops"] == PEAKS
    assert str(tmp_path / "bench.csv") in paths
    if importlib.util.find_spec("matplotlib") is not None:  # the pictures ('pyquant[bench]')
        for name in ("roofline.png", "speedups.png"):
            assert str(tmp_path / name) in paths
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speedup_summary_is_median_and_range_over_shapes():
    """What the speedups picture draws: per M and impl, over the shapes, the (min, median, max)
    of the speedup over fp32 F.linear and of the speedup over PyTorch's path for the same
    weight format (an int4 row against int4pack, an int8 row against FBGEMM, a bf16 row against
    bf16 F.linear); None where the run has no such baseline."""
    from pyquant._plot import same_format_baseline, speedup_summary

    i4p, fbg = "torch._weight_int4pack_mm_for_cpu[g128]", "torch.ao.dynamic_int8[fbgemm]"
    assert same_format_baseline("pyquant.sparse24_int4_mm[g128]") == i4p
    assert same_format_baseline("pyquant.int8_dynamic_mm[x-bf16]") == fbg
    assert same_format_baseline("pyquant.sparse_unstructured_mm[bf16,70%]") == "F.linear[bf16]"
    assert same_format_baseline("pyquant.sparse24_mm[fp32]") == "F.linear[fp32]"

    def row(m, n, impl, kind, speedup):
        return {"m": m, "n": n, "impl": impl, "kind": kind, "speedup": speedup}

    rows = [row(1, 1, "pyquant.int4_a", "pyquant", {"F.linear[fp32]": 4.0, i4p: 1.5, fbg: 0.9}),
            row(1, 2, "pyquant.int4_a", "pyquant", {"F.linear[fp32]": 6.0, i4p: 2.5}),
            row(1, 3, "pyquant.int4_a", "pyquant", {"F.linear[fp32]": 5.0, i4p: 2.0}),
            row(8, 1, "pyquant.int8_b", "pyquant", {"F.linear[fp32]": 2.0, i4p: 0.5}),
            row(1, 1, "F.linear[fp32]", "baseline", {}),
            row(1, 1, "read[probe]", "probe", {})]
    got = speedup_summary({"rows": rows})
    assert list(got) == [1, 8]
    assert got[1] == [("pyquant.int4_a", (4.0, 5.0, 6.0), (1.5, 2.0, 2.5))]
    assert got[8] == [("pyquant.int8_b", (2.0, 2.0, 2.0), None)]  # no FBGEMM row in this run


@pytest.mark.skipif(not _native.available(), reason="native module not loaded")
def test_bench_prints_sparse_ratios_with_break_even(small_run, capsys):
    """`pyquant bench` prints each sparse op against its dense counterpart of the same run, with
    its share of the bandwidth and the batch size from which its layer runs dense."""
    rows = bench.sparse_summary(small_run, (1, 3))
    printed = capsys.readouterr().out
    assert "sparse decode targets, M = 1" in printed and "sparse layers at M = 3" in printed
    assert "dense from M" in printed
    ops = {"pyquant.sparse24_int8_mm": ("sparse24_int8_mm", "pyquant.int8_weight_only_mm"),
           "pyquant.sparse24_int4_mm[g128]": ("sparse24_int4_mm",
                                              "pyquant.int4_weight_only_mm[g128]")}
    assert {r["impl"] for r in rows} == set(ops) and {r["m"] for r in rows} == {1, 3}
    by_key = {(r["impl"], r["n"], r["k"], r["m"]): r for r in small_run["rows"]}
    for r in rows:
        op, dense = ops[r["impl"]]
        n, k = map(int, r["shape"].split("x"))
        if sparse_panels.layout_applies(n, k, "cpu", None if "int8" in op else 128):
            op += "_panels"  # what the layers keep on this CPU, and so what the bench runs
        assert r["dense_from_m"] == _native.sparse_dense_min_m()[(op, "fp32")]
        assert r["speedup"] == pytest.approx(by_key[(dense, n, k, r["m"])]["ms"] /
                                             by_key[(r["impl"], n, k, r["m"])]["ms"])


def test_time_interleaved_alternates_and_rotates():
    """One call per impl each round, each impl on the next of its weight copies; each median
    belongs to its own impl."""
    import time

    calls = []

    def make_run(name, pause):
        def run(state, x):
            calls.append((name, state))
            time.sleep(pause)
        return run

    entries = [(make_run("a", 0.0), ["a0", "a1"]), (make_run("b", 0.004), ["b0"]),
               (make_run("c", 0.0), ["c0", "c1", "c2"])]
    times = bench._time_interleaved(entries, None, iters=4, warmup=0)
    rounds = ["".join(c[0] for c in calls[3 * i:3 * i + 3]) for i in range(4)]
    assert all(sorted(r) == list("abc") for r in rounds)  # each round calls each entry once
    assert [s for name, s in calls if name == "a"] == ["a0", "a1", "a0", "a1"]
    assert [s for name, s in calls if name == "c"] == ["c0", "c1", "c2", "c0"]
    assert times[1] >= 0.004 > max(times[0], times[2])


def test_time_interleaved_runs_of_calls_count_all_but_the_first():
    """With burst, each entry makes a run of calls on successive copies each round; the first
    call of a run (after another entry's) is not in its median."""
    import time

    calls = []

    def make_run(name, first_pause):
        def run(state, x):
            calls.append((name, state))
            # the first call of each run of "a" is slow: it must not reach a's median
            if name == "a" and (len(calls) < 2 or calls[-2][0] != "a"):
                time.sleep(first_pause)
        return run

    entries = [(make_run("a", 0.01), ["a0", "a1", "a2", "a3"]),
               (make_run("b", 0.0), ["b0", "b1", "b2", "b3"])]
    times = bench._time_interleaved(entries, None, iters=3, warmup=0, burst=3)
    names = "".join(c[0] for c in calls)
    assert len(names) == 18 and all(names[i:i + 3] in ("aaa", "bbb") for i in range(0, 18, 3))
    assert [s for n, s in calls if n == "a"][:5] == ["a0", "a1", "a2", "a3", "a0"]
    assert times[0] < 0.005


def test_decode_runs_never_read_a_copy_twice():
    """A run of DECODE_BURST calls never comes back to a copy it read, whatever the copies'
    size (three reads of one 56 MB copy in a row found part of it in a 32 MB cache)."""
    b = bench.DECODE_BURST
    for nbytes in (1 << 20, 20 << 20, 64 << 20, 512 << 20):
        for sharers in (1, 2):
            assert bench._copies(nbytes, 40 << 20, sharers, burst=b) >= b
    assert bench._copies(64 << 20, 40 << 20, sharers=1) == 1  # no runs: as before


def test_time_interleaved_varies_the_call_before_each_entry():
    """A call's time depends on the call before it (bench._time_interleaved), so no entry
    may always follow the same other one: over the rounds each entry follows every other,
    and the orders are the same from run to run (seeded)."""
    def orders():
        calls = []
        entries = [((lambda name: lambda s, x: calls.append(name))(n), [n]) for n in "abcd"]
        bench._time_interleaved(entries, None, iters=40, warmup=0)
        return "".join(calls)

    seq = orders()
    assert seq == orders()
    follows = {(a, b) for a, b in zip(seq, seq[1:]) if a != b}
    assert follows == {(a, b) for a in "abcd" for b in "abcd" if a != b}


def test_time_interleaved_shared_copies_never_repeat():
    """Two impls on one list of weight copies (an op and its x-bf16 row) run back to back:
    each call takes the list's next copy, so neither finds the copy the other just read."""
    calls = []

    def make_run(name):
        return lambda state, x: calls.append((name, state))

    shared = ["w0", "w1", "w2"]
    entries = [(make_run("a"), shared), (make_run("b"), shared), (make_run("p"), ["p0"])]
    bench._time_interleaved(entries, None, iters=6, warmup=1)
    used = [s for name, s in calls if name != "p"]
    assert used == [shared[i % 3] for i in range(len(used))]  # one rotation, shared by both
    assert all(a != b for a, b in zip(used, used[1:]))


def test_shared_weight_copies_are_never_one():
    """A list of copies that several impls share holds two or more, whatever their size: with
    one, the impls that run back to back would read the same bytes from the cache."""
    assert bench._copies(45 << 20, 40 << 20, sharers=3) == 2
    assert bench._copies(45 << 20, 40 << 20, sharers=1) == 1
    assert bench._copies(8 << 20, 40 << 20, sharers=2) == 5
    assert bench._copies(1, 40 << 20, sharers=1) == bench.MAX_COPIES
    # MiniLM's smallest weight, 384 x 384 int8 with its scales: copies past a 40 MB rotation
    # (at most 64 used to leave 9.5 MB of them, in a 32 MB last-level cache)
    nbytes = 384 * 384 + 384 * 4
    assert bench._copies(nbytes, 40 << 20, sharers=2) * nbytes > 40 << 20


@pytest.mark.parametrize("args, message", [
    (["--iters", "0"], "--iters 0: give at least 1 timed call"),
    (["--impls", "int9_magic"], "--impls int9_magic matches no impl; the impls: "),
    (["--out", "/proc/no/such/folder"], "--out /proc/no/such/folder: cannot write there"),
    (["--itres", "3"], "did you mean --iters?"),
])
def test_bench_arguments_fail_before_the_run_in_one_line(args, message, capsys):
    """Checked before anything is timed (a folder that cannot be written used to lose a whole
    run's results at the end; --iters 0 crashed; an unknown --impls timed the baselines)."""
    from pyquant import bench

    with pytest.raises(SystemExit) as e:
        bench.main(["--ms", "1", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bench_keeps_freed_memory_unless_told(monkeypatch, tmp_path, capsys):
    """pyquant bench applies runtime.keep_freed_memory(large_blocks=True) before it times
    anything, hands run() the outcome (recorded as the machine's malloc_tuning) and prints the
    allocator it ran under; --no-malloc-tuning leaves malloc alone and says so."""
    from pyquant import bench, runtime

    calls, runs = [], []
    monkeypatch.setattr(runtime, "keep_freed_memory",
                        lambda **kw: calls.append(kw) or True)

    def fake_run(**kw):
        runs.append(kw)
        row = {"shape": "llama2-7b", "n": 64, "k": 64, "m": 1, "impl": "pyquant.int8_dynamic_mm",
               "ms": 0.01, "bw_share": 0.5, "bw_share_now": 0.5, "speedup": {}, "gbps": 1.0,
               "gops": 1.0}
        return {"machine": bench.machine_info(30.0, {}, kw["malloc_kept"]), "rows": [row]}

    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "write_outputs", lambda result, out: [])  # rows are partial
    assert bench.main(["--ms", "1", "--out", str(tmp_path)]) == 0
    assert calls == [{"large_blocks": True}] and runs[-1]["malloc_kept"] is True
    out = capsys.readouterr().out
    assert "allocator: freed memory of every size kept in the process" in out
    assert "dense decode targets, M = 1" in out and "(below target: bw% < 80%)" in out
    assert bench.main(["--ms", "1", "--out", str(tmp_path), "--no-malloc-tuning"]) == 0
    assert len(calls) == 1 and runs[-1]["malloc_kept"] is False
    out = capsys.readouterr().out
    assert "allocator: malloc as configured" in out


def test_decode_targets_say_what_a_row_misses():
    """The dense decode targets at M = 1 (pyquant.bench_targets): a row per target impl and
    Llama-2-7B shape, its speedups over the target's baselines, and which parts it misses (the
    share of the bandwidth, a speedup); rows at other M, of other impls or of MiniLM's shapes
    are left out, and a baseline the run lacks shows '-' without a verdict of its own."""
    from pyquant import bench_targets as bt

    def row(impl, m, bw, model="llama2-7b", **sp):
        return {"shape": model, "n": 4096, "k": 4096, "m": m, "impl": impl, "ms": 0.5,
                "bw_share": bw, "bw_share_now": bw, "speedup": sp}

    i4, i8 = "pyquant.int4_weight_only_mm[g128]", "pyquant.int8_dynamic_mm"
    result = {"rows": [
        row(i4, 1, 0.85, **{bt.INT4PACK: 1.7, bt.FP32: 5.5}),
        row(i4, 16, 0.10, **{bt.INT4PACK: 0.1}),
        row(i8, 1, 0.79, **{bt.FBGEMM: 1.02}),
        row("pyquant.int8_weight_only_mm", 1, 0.9),
        row("pyquant.int8_weight_only_mm", 1, 0.1, model="minilm"),  # no targets set there
        row("F.linear[fp32]", 1, 0.9)]}
    rows = bt.decode_targets(result)
    assert [r["impl"] for r in rows] == [i4, i8, "pyquant.int8_weight_only_mm"]
    assert rows[0]["misses"] == ["fp32 < 6.0x"]
    assert rows[1]["misses"] == ["bw% < 80%"]
    assert rows[2]["misses"] == [] and rows[2]["speedup"] == {bt.FBGEMM: None}
    lines = bt.format_decode_targets(rows, 30.0).splitlines()
    assert "read bandwidth 30.0 GB/s" in lines[0]
    assert lines[2].endswith("int4pack 1.70x/1.6x  fp32 5.50x/6.0x  (below target: fp32 < 6.0x)")
    assert lines[3].endswith("fbgemm 1.02x/1.0x  (below target: bw% < 80%)")
    assert lines[4].endswith("fbgemm -/1.0x")


def test_sparse_targets_say_what_a_row_misses():
    """A decode row below target says which part it misses: the speedup, the share of the
    read bandwidth, or both (a speedup above 'need' alone is not the whole target)."""
    from pyquant.bench_sparse import format_targets

    def row(speedup, bw):
        return {"impl": "pyquant.sparse24_int8_mm", "shape": "384x1536", "m": 1, "ms": 0.1,
                "vs": "pyquant.int8_weight_only_mm", "speedup": speedup, "min_speedup": 1.4,
                "bw_share": bw, "bw_share_now": bw, "dense_from_m": 16,
                "ok": speedup >= 1.4 and bw >= 0.75}

    lines = format_targets([row(1.58, 0.5), row(1.2, 0.9), row(1.2, 0.5), row(1.5, 0.8)]
                           ).splitlines()[2:6]
    assert lines[0].endswith("(below target: bw% < 75%)")
    assert lines[1].endswith("(below target: speedup < 1.4x)")
    assert lines[2].endswith("(below target: speedup < 1.4x, bw% < 75%)")
    assert "below target" not in lines[3]


def test_sparse_targets_bytes_ratio():
    """targets() gives each row the dense op's weight bytes over the sparse op's (its speedup at
    equal GB/s), the table prints it, and a missed speedup whose target is above that ratio
    says so: meeting it would take reading memory faster than the dense op does."""
    from pyquant.bench_sparse import TARGETS, format_targets, targets

    sparse, dense, need = next((t[0], t[1], t[2]) for t in TARGETS if t[2] == 1.3)

    def result(dense_bytes):
        return {"rows": [
            {"shape": "llama", "n": 4096, "k": 4096, "m": 1, "impl": sparse, "ms": 0.4,
             "weight_bytes": 1000, "bw_share": 0.6, "bw_share_now": 0.6},
            {"shape": "llama", "n": 4096, "k": 4096, "m": 1, "impl": dense, "ms": 0.44,
             "weight_bytes": dense_bytes, "bw_share": 0.7, "bw_share_now": 0.7}]}

    low = targets(result(1286))
    assert len(low) == 1 and low[0]["bytes_ratio"] == pytest.approx(1.286)
    line = format_targets(low).splitlines()[2]
    assert " 1.29x " in line
    assert line.endswith(f"(below target: speedup < {need:.1f}x, bw% < 75%; "
                         f"{need:.1f}x is above the byte ratio 1.29x)")
    high = targets(result(1500))
    line = format_targets(high).splitlines()[2]
    assert " 1.50x " in line and line.endswith(f"(below target: speedup < {need:.1f}x, bw% < 75%)")


def test_sparse_row_without_a_target():
    """The fp32 unstructured row has no target: its table line shows '-' for 'need' and no
    verdict, and targets() gives it ok None (neither met nor missed), from a bench result."""
    from pyquant.bench_sparse import TARGETS, format_targets, targets

    name = next(t[0] for t in TARGETS if t[2] is None)
    result = {"rows": [
        {"shape": "minilm", "n": 1536, "k": 384, "m": 1, "impl": name, "ms": 0.02,
         "bw_share": 0.3, "bw_share_now": 0.3},
        {"shape": "minilm", "n": 1536, "k": 384, "m": 1, "impl": "F.linear[fp32]", "ms": 0.05,
         "bw_share": 0.9, "bw_share_now": 0.9}]}
    rows = targets(result)
    assert len(rows) == 1 and rows[0]["ok"] is None and rows[0]["speedup"] == pytest.approx(2.5)
    line = format_targets(rows).splitlines()[2]
    assert " 2.50x     - " in line and "below target" not in line and line.endswith("F.linear[fp32]")


def test_sparse_targets_without_the_dense_counterparts():
    """A run whose --impls leave the dense counterparts out (pyquant bench --impls sparse24_int)
    has no speedups: the table says which counterpart is missing instead of failing, and judges
    the share of the bandwidth alone (it used to print "speedup < 1.4x" for a speedup it never
    measured)."""
    from pyquant.bench_sparse import _verdict, format_targets

    r = {"impl": "pyquant.sparse24_int8_mm", "shape": "384x1536", "m": 1, "ms": 0.1,
         "vs": "pyquant.int8_weight_only_mm", "speedup": None, "min_speedup": 1.4,
         "bw_share": 0.5, "bw_share_now": 0.5, "dense_from_m": 16}
    assert _verdict(None, 1.4, 0.5) is False and _verdict(None, 1.4, 0.9) is None
    assert _verdict(1.2, 1.4, 0.9) is False and _verdict(1.5, 1.4, 0.9) is True
    assert _verdict(1.5, None, 0.1) is None
    slow = dict(r, ok=_verdict(None, 1.4, 0.5))
    fast = dict(r, shape="1536x384", bw_share=0.9, ok=_verdict(None, 1.4, 0.9))
    text = format_targets([slow, fast])
    assert "(below target: bw% < 75%)" in text and "speedup <" not in text
    assert "below target" not in next(ln for ln in text.splitlines() if "1536x384" in ln)
    assert text.splitlines()[-1] == ("no speedups: this run has no pyquant.int8_weight_only_mm "
                                     "(add them to --impls)")


@pytest.mark.skipif(not _native.available(), reason="needs the native module")
def test_fixed_point_ab_script_runs(capsys):
    """benchmarks/fixed_point_ab.py on tiny shapes: a line per op and shape, with the ratios;
    one shape where the fixed-point path runs for both ops on the AVX512 levels (M = 16) and
    one where it cannot (K % 64 != 0) says so."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "fixed_point_ab.py"
    spec = importlib.util.spec_from_file_location("fixed_point_ab", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--shapes", "40x128x16,40x96x16", "--reps", "1", "--rounds", "1",
                     "--group-size", "32"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [ln for ln in out if " M=16 " in ln]
    assert len(lines) == 4 and all("x float" in ln and "x fp32" in ln for ln in lines), out
    assert all("does not run here" in ln for ln in lines if ln.startswith("40x96 "))


def test_panel_layout_ab_script_runs(capsys):
    """benchmarks/panel_layout_ab.py on tiny shapes: a line per op, shape and M with the ratio
    where the panel layout applies, and a line that says so where it does not (N = 40)."""
    import importlib.util
    import pathlib

    from pyquant import panels

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "panel_layout_ab.py"
    spec = importlib.util.spec_from_file_location("panel_layout_ab", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--shapes", "64x128,40x128", "--ms", "1,3", "--iters", "1",
                     "--group-size", "32", "--max-copies", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    ran = [ln for ln in out if ln.startswith("64x128 M=")]
    if panels.panel_layout_applies(64, 128, "cpu"):
        assert len(ran) == 8 and all(ln.endswith("x") and "panels" in ln for ln in ran), out
    not_here = [ln for ln in out if "does not apply here" in ln]
    assert len([ln for ln in not_here if ln.startswith("40x128 ")]) == 4, out


@pytest.mark.skipif(not _native.available(), reason="native module not loaded")
@pytest.mark.parametrize("op", ["int4_weight_only", "int8_dynamic", "sparse24_int8",
                                "sparse24_bf16"])
def test_decode_call_ab_script_runs(capsys, op):
    """benchmarks/decode_call_ab.py on a tiny shape: a line per way (two, or four where huge
    pages are on) with finite times, and the ratios between them."""
    import importlib.util
    import math
    import pathlib

    from pyquant import _hugepages

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "decode_call_ab.py"
    spec = importlib.util.spec_from_file_location("decode_call_ab", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # 1024 x 4096 int4: 2 MiB of codes, the smallest weight the placement moves
    assert mod.main(["--op", op, "--shape", "1024x4096", "--rounds", "2",
                     "--max-copies", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    ways = [ln for ln in out if ln.strip().endswith("GB/s")]
    assert len(ways) == (4 if _hugepages.enabled() else 2), out
    assert all(math.isfinite(float(ln.split()[-4])) for ln in ways), out
    ratios = [ln for ln in out if ln.rstrip().endswith("x")]
    assert len(ratios) == (5 if _hugepages.enabled() else 1), out


@pytest.mark.skipif(not _native.available(), reason="native module not loaded")
def test_cold_call_script_runs(capsys):
    """benchmarks/cold_call.py: a line per op with a cold and a warm time for 2-D, 3-D and bf16 x,
    the cold ones no shorter than a microsecond (a flush that did nothing would not show it,
    but a call that did nothing would)."""
    import importlib.util
    import pathlib
    import re

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "cold_call.py"
    spec = importlib.util.spec_from_file_location("cold_call", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--calls", "3", "--flush-mb", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [ln for ln in out if "cold" in ln and "warm" in ln]
    assert len(lines) == 3, out
    for ln in lines:
        cold = [float(v) for v in re.findall(r"cold +([0-9.]+) us", ln)]
        assert len(cold) == 3 and min(cold) >= 1.0, ln
    with pytest.raises(SystemExit):
        mod.main(["--ops", "int3"])


def _panel_isa() -> bool:
    return _native.available() and _native.ISA_NAMES[_native.current_isa()] in (
        "avx512_vnni", "avx512_bf16")


@pytest.mark.skipif(not _native.available(), reason="native module not loaded")
def test_bench_peak_share_is_per_unit_op(monkeypatch):
    """%peak: a row's GOP/s over the peak of the unit its products run on, times the unit ops a
    product costs. fp32 and bf16 F.linear and FBGEMM on their units; the W8A8/W4A8 panels on
    int8; the weight-only panels' fp32 activations on int8 three times (24-bit fixed point);
    their bf16 activations on bf16 from M = 24 (int8) and 16 (int4); int4pack unknown."""
    monkeypatch.setattr(bench, "measure_read_bandwidth", lambda *a, **k: 10.0)
    monkeypatch.setattr(bench, "measure_peaks", lambda *a, **k: dict(PEAKS))
    res = bench.run(models=("minilm",), ms=(1, 16, 24), impl_filter="weight_only,dynamic",
                    iters=1, rotate_bytes=1 << 20)
    bf16_isa = _native.ISA_NAMES[_native.current_isa()] == "avx512_bf16"
    seen = set()
    for r in res["rows"]:
        name, m = r["impl"], r["m"]
        if name in ("F.linear[fp32]", bench.FP32_HUGE, "F.linear[bf16]",
                    "torch.ao.dynamic_int8[fbgemm]"):
            unit, cost = {"F.linear[fp32]": "fp32", bench.FP32_HUGE: "fp32",
                          "F.linear[bf16]": "bf16"}.get(name, "int8"), 1
        elif name.startswith("pyquant.") and _panel_isa():
            if "dynamic" in name:
                unit, cost = "int8", 1
            elif "x-bf16" in name and bf16_isa and m >= (24 if "int8" in name else 16):
                unit, cost = "bf16", 1
            else:
                unit, cost = "int8", 3
        else:  # the probe, int4pack, pyquant on other ISAs
            assert math.isnan(r["peak_share"]) and r["peak_unit"] == "", name
            continue
        seen.add((unit, cost))
        assert r["peak_unit"] == unit, (name, m)
        assert r["peak_share"] == pytest.approx(r["gops"] * cost / PEAKS[unit]), (name, m)
    want = {("fp32", 1), ("bf16", 1), ("int8", 1)}
    if _panel_isa():
        want.add(("int8", 3))
    assert want <= seen


@pytest.mark.skipif(not _native.available(), reason="native module not loaded")
def test_measure_peaks_has_a_ceiling_per_unit():
    """The measured peaks are positive, and per op the int8 dot product retires at least as
    many as the fp32 FMA (AVX2's three-instruction int8 sequence does 32 multiply-adds where an
    FMA does 8), on this CPU's units; bf16 only where the CPU has its dot product."""
    peaks = bench.measure_peaks(repeats=2)
    from helpers import cpu_flags

    flags = cpu_flags()
    if "avx2" not in flags:
        pytest.skip("no AVX2: the probe has no vector loop here")
    assert peaks["fp32"] > 0
    if _native.ISA_NAMES[_native.best_isa()] == "avx512_amx":
        # the int8 and bf16 products run on tiles there, past the vector units' peak
        assert set(peaks) == {"fp32"}
        return
    assert peaks["int8"] >= peaks["fp32"]
    assert ("bf16" in peaks) == ("avx512_bf16" in flags)


def test_every_pyquant_impl_runs_without_the_dispatcher(monkeypatch):
    """The dense and the sparse impls both time what the layers run in eager inference
    (ops.call: no dispatcher wrappers, ~30 us a call). The sparse ones went through
    torch.ops.pyquant.* while the dense ones did not, which charged every sparse-over-dense
    ratio at decode that much more per call."""
    import torch

    from pyquant import bench_sparse, ops

    called = []
    real_call = ops.call
    monkeypatch.setattr(ops, "call", lambda op, *a: called.append(op) or real_call(op, *a))
    real_ops = torch.ops.pyquant
    through_dispatcher = []

    class Spy:
        def __getattr__(self, name):
            through_dispatcher.append(name)
            return getattr(real_ops, name)

    monkeypatch.setattr(torch.ops, "pyquant", Spy(), raising=False)
    w = torch.randn(8, 256)
    x = torch.randn(1, 256)
    impls = bench.pyquant_impls(group_size=128) + bench_sparse.sparse_impls(group_size=128)
    for impl in impls:
        n = len(called)
        impl.run(impl.make(w), impl.take(x))
        assert len(called) == n + 1, impl.name
    assert through_dispatcher == []
    assert any(op.startswith("sparse") for op in called)


def test_bf16_rows_get_bf16_x_made_outside_the_timed_calls(monkeypatch):
    """The bf16 rows (bf16 F.linear, int4pack, pyquant's x-bf16 and bf16 sparse rows) take the
    activations a bf16 model hands its layers, converted once per batch size before the timed
    calls; the others take x as it is."""
    import torch

    from pyquant import bench_sparse

    seen = []
    real = bench._time_interleaved

    def spy(entries, x, **kw):
        seen.append([(e[2].dtype, e[2].shape) for e in entries])
        return real(entries, x, **kw)

    monkeypatch.setattr(bench, "_time_interleaved", spy)
    monkeypatch.setattr(bench, "measure_read_bandwidth", lambda *a, **k: 10.0)
    monkeypatch.setattr(bench, "measure_peaks", lambda *a, **k: {})
    res = bench.run(models=("minilm",), ms=(1,), impl_filter="x-bf16,sparse24_mm", iters=1,
                    rotate_bytes=1 << 20)
    impls = bench.probe_impls() + bench.baseline_impls() + bench.pyquant_impls() + \
        bench_sparse.sparse_impls()
    bf16 = {i.name for i in impls if i.x_dtype is torch.bfloat16}
    assert {"F.linear[bf16]", "pyquant.int8_weight_only_mm[x-bf16]",
            "pyquant.sparse24_mm[bf16]"} <= bf16
    names = list(dict.fromkeys(r["impl"] for r in res["rows"]))
    assert seen and all(len(s) == len(names) for s in seen)
    for s in seen:
        for name, (dtype, shape) in zip(names, s):
            assert dtype == (torch.bfloat16 if name in bf16 else torch.float32), name
            assert shape[0] == 1


def test_a_shapes_weight_copies_are_gone_before_the_next_shape_is_timed(monkeypatch):
    """All impls of a shape hold their weight copies at once (GBs at Llama sizes), so those of
    one shape must be freed before the next shape's are made: a name left holding the timed
    entries kept them alive, and a Llama-2-7B run at M = 1 grew past 21 GB on a 24 GB machine
    where it had peaked at ~14."""
    import gc
    import weakref

    import torch

    alive = []  # (shape, weak references to one tensor of every impl's first copy)
    real = bench._time_interleaved

    def first_tensor(state):
        if isinstance(state, torch.Tensor):
            return state
        if isinstance(state, tuple):
            return next((t for t in map(first_tensor, state) if t is not None), None)
        return None

    def spy(entries, x, **kw):
        gc.collect()
        for shape, refs in alive:
            if shape != x.shape[1:]:
                assert all(r() is None for r in refs), f"copies of K = {shape} still alive"
        refs = [weakref.ref(t) for t in (first_tensor(e[1][0]) for e in entries)
                if t is not None]
        alive.append((x.shape[1:], refs))
        return real(entries, x, **kw)

    monkeypatch.setattr(bench, "_time_interleaved", spy)
    monkeypatch.setattr(bench, "measure_read_bandwidth", lambda *a, **k: 10.0)
    monkeypatch.setattr(bench, "measure_peaks", lambda *a, **k: {})
    bench.run(models=("minilm",), ms=(1,), impl_filter="int8", iters=1, rotate_bytes=1 << 20)
    assert len({shape for shape, _ in alive}) >= 2 and all(refs for _, refs in alive)


@pytest.mark.skipif(not _native.available(), reason="needs the native module")
def test_every_pyquant_impl_takes_the_remembered_call_after_the_first(monkeypatch):
    """A layer's LayerCall checks its weights and prepares its call once; so must the bench's
    calls, or they time a path no layer takes. The dense impls built their op's name per
    call ("int4_weight_only_mm" + "_panels"), a new string each time, which LayerCall compared
    by identity: every timed call on panels went the whole way and prepared its call again
    (~80 us a call at 4096 x 4096, M = 1)."""
    import torch

    from pyquant import bench_sparse, ops

    called = []
    real_call = ops.call
    monkeypatch.setattr(ops, "call", lambda op, *a: called.append(op) or real_call(op, *a))
    w = torch.randn(64, 256)  # N = 64: the panel layouts, where this CPU has them
    x = torch.randn(1, 256)
    with torch.inference_mode():
        for impl in bench.pyquant_impls(group_size=128) + bench_sparse.sparse_impls(128):
            state = impl.make(w)
            n = len(called)
            for _ in range(3):
                impl.run(state, impl.take(x))
            assert len(called) == n + 1, (impl.name, called[n:])


@pytest.mark.parametrize("script,lines", [("sparse24_panel_loop", 10), ("unstructured_loop", 9)])
def test_loop_benchmark_builds_and_runs(capsys, script, lines):
    """benchmarks/sparse24_panel_loop.py and unstructured_loop.py compile the kernels' loops
    against the headers as they are and print cycles for every loop (in cache and from
    memory), the 2:4 instruction-mix floor and the expand probe (a few calls: the numbers are
    not checked, only that every line comes out finite)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(script, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if mod.compiler() is None or not mod.cpu_runs_it():
        pytest.skip("no C++ compiler or no AVX512-BF16-level CPU here")
    assert mod.main(["--reps", "4", "--passes", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    values = [float(ln.split()[-1]) for ln in out if ln.startswith("  ")]
    assert len(values) == lines and all(math.isfinite(v) and v > 0 for v in values), out
    assert out[0].startswith("core clock")


def test_call_order_benchmark_runs(capsys):
    """benchmarks/call_order.py times an impl after each kind of previous call (a small shape
    and two rounds: the numbers are not checked, only that every line comes out)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "call_order.py"
    spec = importlib.util.spec_from_file_location("call_order", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--n", "256", "--k", "256", "--rounds", "2", "--copies", "2"]) == 0
    out = capsys.readouterr().out
    assert "itself (another copy)" in out and "F.linear[fp32]" in out
    assert "main thread sleeping 2 ms" in out
    with pytest.raises(SystemExit):
        mod.main(["--impl", "no.such.impl"])


@pytest.mark.skipif(not _native.available(), reason="needs the native module")
def test_ab_inprocess_loads_two_builds_and_compares(capsys):
    """benchmarks/ab_inprocess.py loads a build twice beside pyquant._C (two libraries in one
    process) and times an impl with each; pyquant is pointed back at its own build after."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "ab_inprocess.py"
    spec = importlib.util.spec_from_file_location("ab_inprocess", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    so = _native.module().__file__
    before = _native.module()
    assert mod.main([so, so, "--shapes", "256x256", "--iters", "2", "--runs", "1",
                     "--rotate-mb", "1"]) == 0
    assert _native.module() is before
    out = capsys.readouterr().out
    assert "A/B" in out and "int4_weight_only_mm" in out
    b = mod.load_build(so, "t")
    assert b is not before and b.best_isa() == before.best_isa()


@pytest.mark.skipif(not _native.available(), reason="needs the native module")
def test_quantizer_ab_script_runs(capsys):
    """benchmarks/quantizer_ab.py times pq_quantize_rows_int8 of two builds (here one build
    twice) on tiny sizes: a line per size with both medians and the ratio, and the check that
    both wrote the same codes; bad --sizes are an argparse error."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "quantizer_ab.py"
    spec = importlib.util.spec_from_file_location("quantizer_ab", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    so = _native.module().__file__
    for bad in ("17", "0x64", "axb"):
        with pytest.raises(SystemExit):
            mod.main([so, so, "--sizes", bad])
    capsys.readouterr()
    assert mod.main([so, so, "--sizes", "3x17,17x100", "--calls", "2", "--rounds", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [ln for ln in out if " A/B " in ln]
    assert len(rows) == 2 and rows[0].split()[:3] == ["3", "x", "17"]
    assert out[-1] == "both builds wrote the same codes and scales"


def test_bf16_io_ab_script_runs(capsys):
    """benchmarks/bf16_io_ab.py on a tiny shape: a line per op with both medians and their
    ratio on AMX; an argparse error elsewhere and for an unknown op."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bf16_io_ab.py"
    spec = importlib.util.spec_from_file_location("bf16_io_ab", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit):
        script.main(["--ops", "int3_magic"])
    amx = _native.available() and _native.ISA_NAMES[_native.current_isa()] == "avx512_amx"
    if not amx:
        with pytest.raises(SystemExit):
            script.main(["--shapes", "64x256", "--ms", "16", "--rounds", "1"])
        return
    capsys.readouterr()
    assert script.main(["--shapes", "64x256", "--ms", "16", "--rounds", "2"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]
    assert [ln.split()[0] for ln in lines] == list(script.OPS)
    assert all(ln.rstrip().endswith("x") for ln in lines)
