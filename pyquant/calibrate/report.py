"""The accuracy report of a calibrated quantization: what each layer lost and what the model's
output lost, on the calibration data.

Per layer: SQNR (dB) of the effective weights (dequantized, ``input_scale`` folded in) against
the float weights, and of the layer's outputs against the float layer's outputs on the same
inputs (the calibration tokens as they reach that layer, padding excluded when the batch has an
``attention_mask``). Model: cosine similarity and relative error of the final output (the
first tensor output: ``logits`` / ``last_hidden_state`` for Hugging Face models) against the
float model, per output vector (token) and overall.

``quantize_(..., calibration=...)`` returns it as ``SwapReport.accuracy`` and leaves it on the
model as ``model.pyquant_accuracy``; ``pyquant.save(model, path)`` writes it beside the
checkpoint as ``<path>.report.json``; ``load_report(path)`` reads and validates it back.

JSON: plain objects, numbers and strings; an SQNR of +inf (no error at all) is written as null.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

REPORT_FORMAT = "pyquant-accuracy"
REPORT_VERSION = 1
REPORT_SUFFIX = ".report.json"


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise); +inf when noise is 0 (exact)."""
    if noise <= 0:
        return math.inf
    if signal <= 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class LayerAccuracy:
    name: str  # module path in the model
    method: str  # the method that produced it: "gptq", "awq", "smoothquant", "rtn"
    out_features: int
    in_features: int
    weight_sqnr_db: float
    output_sqnr_db: Optional[float]  # None: no calibration token reached the layer
    tokens: int  # input rows the output SQNR was measured on
    note: str = ""


@dataclass
class ModelAccuracy:
    cosine_mean: float  # mean over output vectors (tokens) of cos(y_q, y_float)
    cosine_min: float
    relative_error: float  # ||Y_q - Y|| / ||Y|| over all scored outputs
    sqnr_db: float
    vectors: int  # output vectors scored
    batches: int  # calibration batches scored (the float outputs kept are capped)
    output: str = ""  # which output was compared, e.g. "last_hidden_state"


@dataclass
class AccuracyReport:
    scheme: str
    method: str
    config: dict
    calibration: dict = field(default_factory=dict)  # batches, blocks, seconds
    layers: list = field(default_factory=list)  # [LayerAccuracy]
    model: Optional[ModelAccuracy] = None

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        d = {"format": REPORT_FORMAT, "version": REPORT_VERSION, "scheme": self.scheme,
             "method": self.method, "config": self.config, "calibration": self.calibration,
             "layers": [asdict(x) for x in self.layers],
             "model": None if self.model is None else asdict(self.model)}
        return _finite_or_null(d)

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> "AccuracyReport":
        validate(d)
        layers = [LayerAccuracy(**{k: _inf_if_null(k, v) for k, v in x.items()})
                  for x in d["layers"]]
        model = None if d["model"] is None else ModelAccuracy(
            **{k: _inf_if_null(k, v) for k, v in d["model"].items()})
        return cls(d["scheme"], d["method"], d["config"], d["calibration"], layers, model)

    def __str__(self) -> str:
        return format_table(self)

    # ------------------------------------------------------------------ summaries
    def worst_layers(self, n: int = 5) -> list:
        """The ``n`` layers with the lowest output SQNR."""
        scored = [x for x in self.layers if x.output_sqnr_db is not None]
        return sorted(scored, key=lambda x: x.output_sqnr_db)[:n]


def _finite_or_null(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        if math.isnan(obj):
            raise ValueError("accuracy report holds NaN")
        return None  # +inf SQNR: exact
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def _inf_if_null(key: str, v):
    # null SQNRs mean +inf, except output_sqnr_db where null means "not measured"
    if v is None and key in ("weight_sqnr_db", "sqnr_db"):
        return math.inf
    return v


_LAYER_FIELDS = {"name": str, "method": str, "out_features": int, "in_features": int,
                 "weight_sqnr_db": (float, int, type(None)),
                 "output_sqnr_db": (float, int, type(None)), "tokens": int, "note": str}
_MODEL_FIELDS = {"cosine_mean": (float, int), "cosine_min": (float, int),
                 "relative_error": (float, int), "sqnr_db": (float, int, type(None)),
                 "vectors": int, "batches": int, "output": str}


def validate(d: Any) -> None:
    """Raise ValueError naming the first problem when ``d`` is not a valid report dict."""
    if not isinstance(d, dict):
        raise ValueError(f"accuracy report must be a JSON object, got {type(d).__name__}")
    if d.get("format") != REPORT_FORMAT or d.get("version") != REPORT_VERSION:
        raise ValueError(f"not a pyquant accuracy report (format {d.get('format')!r}, version "
                         f"{d.get('version')!r}; expected {REPORT_FORMAT!r}, {REPORT_VERSION})")
    for key, typ in (("scheme", str), ("method", str), ("config", dict), ("calibration", dict),
                     ("layers", list)):
        if not isinstance(d.get(key), typ):
            raise ValueError(f"accuracy report: {key!r} must be a {typ.__name__}, "
                             f"found {d.get(key)!r:.100}")
    for i, x in enumerate(d["layers"]):
        _check_fields(x, _LAYER_FIELDS, f"layers[{i}]")
        if x["out_features"] <= 0 or x["in_features"] <= 0 or x["tokens"] < 0:
            raise ValueError(f"accuracy report: layers[{i}] ({x['name']!r}) has impossible "
                             f"sizes {x['out_features']}x{x['in_features']}, tokens {x['tokens']}")
    if d.get("model") is not None:
        m = d["model"]
        _check_fields(m, _MODEL_FIELDS, "model")
        if not (-1.0 - 1e-6 <= m["cosine_min"] <= m["cosine_mean"] <= 1.0 + 1e-6):
            raise ValueError(f"accuracy report: model cosines must satisfy -1 <= min <= mean <= "
                             f"1, found min {m['cosine_min']}, mean {m['cosine_mean']}")
        if m["relative_error"] < 0:
            raise ValueError(f"accuracy report: negative relative error {m['relative_error']}")


def _check_fields(x: Any, spec: dict, where: str) -> None:
    if not isinstance(x, dict) or set(x) != set(spec):
        got = sorted(x) if isinstance(x, dict) else type(x).__name__
        raise ValueError(f"accuracy report: {where} must have fields {sorted(spec)}, found {got}")
    for k, typ in spec.items():
        v = x[k]
        if isinstance(v, bool) or not isinstance(v, typ):
            raise ValueError(f"accuracy report: {where}.{k} = {v!r:.100} has the wrong type")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"accuracy report: {where}.{k} = {v} is not finite")


# ---------------------------------------------------------------------- table


def _db(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return "inf" if v == math.inf else f"{v:.1f}"


def format_table(acc, max_layers: Optional[int] = None) -> str:
    """A plain-text table of an ``AccuracyReport`` (or its dict / JSON form): one line per
    layer, then the model-level error. ``max_layers`` keeps the worst ones by output SQNR."""
    if isinstance(acc, str):
        acc = json.loads(acc)
    if isinstance(acc, dict):
        acc = AccuracyReport.from_dict(acc)
    layers = list(acc.layers)
    hidden = 0
    if max_layers is not None and len(layers) > max_layers:
        keep = {id(x) for x in acc.worst_layers(max_layers)}
        hidden = len(layers) - len(keep)
        layers = [x for x in layers if id(x) in keep]
    name_w = max([len("layer")] + [len(x.name) for x in layers])
    cal = acc.calibration
    head = (f"accuracy of {acc.scheme} ({acc.method}) on the calibration data"
            f" ({cal.get('batches', '?')} batches)")
    lines = [head,
             f"  {'layer':<{name_w}}  {'method':<11} {'shape':>11}  {'weight dB':>9}  "
             f"{'output dB':>9}  {'tokens':>7}  note"]
    for x in layers:
        shape = f"{x.out_features}x{x.in_features}"
        lines.append(f"  {x.name:<{name_w}}  {x.method:<11} {shape:>11}  "
                     f"{_db(x.weight_sqnr_db):>9}  {_db(x.output_sqnr_db):>9}  {x.tokens:>7}  "
                     f"{x.note}".rstrip())
    if hidden:
        lines.append(f"  ... {hidden} better layer(s) not shown")
    m = acc.model
    if m is None:
        lines.append("  model output: not measured")
    else:
        lines.append(f"  model output ({m.output}): cosine to float mean {m.cosine_mean:.5f}, "
                     f"min {m.cosine_min:.5f}; relative error {m.relative_error:.4f}; "
                     f"SQNR {_db(m.sqnr_db)} dB over {m.vectors} vectors")
    return "\n".join(lines)


# ---------------------------------------------------------------------- files


def report_path(checkpoint: str) -> str:
    """Where ``pyquant.save`` writes the report of ``checkpoint``."""
    return os.fspath(checkpoint) + REPORT_SUFFIX


def _resolve(model, report):
    if report is None:
        report = getattr(model, "pyquant_accuracy", None)
    elif hasattr(report, "accuracy") and not isinstance(report, AccuracyReport):
        report = report.accuracy  # a SwapReport
        if report is None:
            raise ValueError("save(report=...): this SwapReport has no accuracy report "
                             "(quantize_ ran without calibration data)")
    if report is None or isinstance(report, AccuracyReport):
        return report
    if isinstance(report, dict):
        return AccuracyReport.from_dict(report)
    raise TypeError(f"report must be an AccuracyReport, a SwapReport or a dict, got "
                    f"{type(report).__name__}")


def write_beside(checkpoint, model, report=None) -> Optional[str]:
    """Write the model's (or the given) report as ``<checkpoint>.report.json``, atomically;
    remove a stale one when there is no report. Returns the path written, or None."""
    path = report_path(checkpoint)
    acc = _resolve(model, report)
    if acc is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return None
    try:
        d = acc.to_dict()
    except ValueError as e:  # NaN: after the checkpoint was written, a warning, not a failure
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        warnings.warn(f"pyquant.save({os.fspath(checkpoint)}): the checkpoint is saved, but its "
                      f"accuracy report is not: it {str(e).replace('accuracy report ', '')} "
                      "(the model's outputs on the calibration data held NaN or inf, e.g. an "
                      "fp16 overflow)", RuntimeWarning, stacklevel=3)
        return None
    d["checkpoint"] = os.path.basename(os.fspath(checkpoint))
    text = json.dumps(d, indent=1, allow_nan=False)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_beside(checkpoint, model) -> Optional[AccuracyReport]:
    """After ``pyquant.load``: put the report saved beside ``checkpoint`` back on the model (so
    that saving it again keeps the report). Missing: nothing; unreadable: a warning."""
    path = report_path(checkpoint)
    if not os.path.exists(path):
        return None
    try:
        acc = load_report(path)
    except (OSError, ValueError, TypeError) as e:
        warnings.warn(f"pyquant.load({os.fspath(checkpoint)}): ignoring the accuracy report "
                      f"beside it: {e}", RuntimeWarning, stacklevel=3)
        return None
    model.pyquant_accuracy = acc
    return acc


def load_report(path) -> AccuracyReport:
    """Read and validate the report saved beside checkpoint ``path`` (or a report file)."""
    path = os.fspath(path)
    if not path.endswith(REPORT_SUFFIX):
        path = report_path(path)
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(d, dict):
        d = dict(d)
        d.pop("checkpoint", None)
    try:
        return AccuracyReport.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
