"""Optional Triton backend: the glue between ops.py and the kernels of ``pyquant_triton/kernels/``.

Importing pyquant never imports Triton. This module imports it only when asked: when ops.py
probes the "triton" backend for a CUDA tensor (``why_unavailable``), when ``warmup`` runs, or
when a test asks for the interpreted kernels. The first successful probe loads the kernels and
registers them with ``ops.register_impl``; every later call is a dictionary lookup.

Where the kernels come from: ``pyquant/kernels`` in an installed wheel (pyproject maps the
``pyquant_triton/kernels/`` there), else ``<repo>/pyquant_triton/kernels`` next to the package in a source tree
(``pip install -e . -Ceditable.mode=inplace`` or plain PYTHONPATH use).

torch.compile: the ops stay ``torch.library.custom_op``s whose body calls the selected backend,
so a compiled graph holds one opaque node per op (``fullgraph=True`` works) and the Triton
launch happens in that body at run time. Tuning never runs inside CUDA-graph capture (the
heuristic config runs instead); call ``warmup`` before capturing.

Dense fallback: for some (op, M) a quantized kernel is slower than dequantizing the weight
and running the dense cuBLAS matmul in the activation dtype (large M, compute bound, when the
dequantization inside the K loop costs more than one dequantization pass over the weight).
``DENSE_FALLBACK_MIN_M`` names the M from which the triton backend runs that dense path
instead; ``dispatch_plan()`` reports it (``pyquant info``).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

OPS = ("int8_weight_only_mm", "int8_dynamic_mm", "int4_weight_only_mm", "sparse24_mm",
       "sparse24_int8_mm")
# The kernel module of each op (pyquant_triton/kernels/<module>.py has a launcher named after the op).
MODULES = {op: op for op in OPS}
MODULES["sparse24_int8_mm"] = "sparse24_mm"  # one kernel for float and int8 kept values
MIN_TRITON = (3, 0)
MIN_CAPABILITY = (8, 0)  # bf16 MMA and the int8 MMA shapes used here need Ampere or newer

# {op: M_min}: at M >= M_min the triton backend runs the dense path (dequantize the weight to
# the activation dtype once per call with pyquant_triton/kernels/dequant.py, then torch.matmul / cuBLAS; for
# int8_dynamic the exact torch._int_mm on the per-token int8 codes) instead of its kernel.
# Filled from the GPU benchmark: ``python -m pyquant.bench_cuda`` prints the M from which the
# dense path beats the kernel on every shape it ran. Measured on an H200 (Triton 3.6,
# benchmarks/results/h200): from M = 1024 for both weight-only ops and both 2:4 ops (the dense
# path 0.63-0.97x of bf16 there, the kernels 0.46-0.61x and 0.04-0.09x); never for
# int8_dynamic (its kernel beats torch._int_mm at every M measured). M = 256 and 512 were not
# measured. The dense path rounds the dequantized weight to the activation dtype once (the
# kernels multiply exact integers and scale in fp32): tests/test_triton.py bounds the
# difference.
DENSE_FALLBACK_MIN_M: dict[str, int] = {
    "int8_weight_only_mm": 1024,
    "int4_weight_only_mm": 1024,
    "sparse24_mm": 1024,
    "sparse24_int8_mm": 1024,
}

_LOCK = threading.Lock()
_STATE: dict = {}  # "kernels"/"interpret": namespaces, "registered", "available": bool


# ------------------------------------------------------------------------- availability


def _triton_version() -> Optional[tuple]:
    try:
        from importlib.metadata import version

        v = version("triton")
    except Exception:
        try:
            import triton

            v = triton.__version__
        except Exception:
            return None
    parts = []
    for p in v.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _static_reason() -> Optional[str]:
    """Why the backend cannot run here, without importing Triton (None: worth trying)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'pyquant[triton]')"
    v = _triton_version()
    if v is not None and v < MIN_TRITON:
        return (f"Triton {'.'.join(map(str, v))} is too old; pyquant's kernels need "
                f"Triton >= {'.'.join(map(str, MIN_TRITON))}")
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if torch.version.hip is None:
        cap = torch.cuda.get_device_capability()
        if cap < MIN_CAPABILITY:
            return (f"GPU {torch.cuda.get_device_name()} is sm_{cap[0]}{cap[1]}; pyquant's "
                    f"Triton kernels need sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]} (Ampere) or "
                    f"newer")
    return None


def why_unavailable() -> Optional[str]:
    """None when the Triton backend can run CUDA tensors here, else the reason. The first
    call that finds everything in place loads the kernels and registers them with ops.py."""
    if _STATE.get("available"):  # ops.select asks on every call: answer from memory
        return None
    why = _static_reason()
    if why:
        return why
    try:
        kernels()
    except Exception as e:
        return f"pyquant's Triton kernels failed to load ({type(e).__name__}: {e})"
    _register()
    _STATE["available"] = True
    return None


# ----------------------------------------------------------------------- kernel loading


def kernels_dir() -> Optional[Path]:
    """The directory of the kernel sources: pyquant/kernels (wheel) or <repo>/pyquant_triton/kernels."""
    here = Path(__file__).resolve().parent
    for d in (here / "kernels", here.parent / "pyquant_triton" / "kernels"):
        if (d / "__init__.py").is_file() and (d / "int8_dynamic_mm.py").is_file():
            return d
    try:
        spec = importlib.util.find_spec("pyquant.kernels")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return None


@contextlib.contextmanager
def _env(name: str, value: Optional[str]):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _load_package(name: str, interpret: bool) -> SimpleNamespace:
    mods = {}
    if not interpret:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:  # an installed wheel, or an editable install's redirect
            for op in OPS:
                mods[op] = importlib.import_module(f"{name}.{MODULES[op]}")
            mods["dequant"] = importlib.import_module(f"{name}.dequant")
            return SimpleNamespace(**mods, package=sys.modules[name])
    d = kernels_dir()
    if d is None:
        raise ImportError("kernel sources not found (neither pyquant/kernels nor <repo>/pyquant_triton/kernels)")
    # Triton decides at decoration time (import of the kernel modules) whether a @triton.jit
    # function is compiled or interpreted, so the interpreted copy is a separate package
    # imported with TRITON_INTERPRET=1 and the compiled one never sees it set by us.
    with _env("TRITON_INTERPRET", "1") if interpret else contextlib.nullcontext():
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                name, d / "__init__.py", submodule_search_locations=[str(d)])
            pkg = importlib.util.module_from_spec(spec)
            sys.modules[name] = pkg
            try:
                spec.loader.exec_module(pkg)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        for op in OPS:
            mods[op] = importlib.import_module(f"{name}.{MODULES[op]}")
        mods["dequant"] = importlib.import_module(f"{name}.dequant")
        mods["_autotune"] = importlib.import_module(f"{name}._autotune")
    return SimpleNamespace(**mods, package=sys.modules[name])


def kernels(interpret: bool = False) -> SimpleNamespace:
    """The kernel modules as a namespace (``.int8_dynamic_mm`` etc.). ``interpret=True`` loads
    a second, interpreted copy (TRITON_INTERPRET=1) that runs on CPU tensors: the tests use it."""
    key = "interpret" if interpret else "kernels"
    with _LOCK:
        ns = _STATE.get(key)
        if ns is None:
            ns = _load_package("pyquant._kernels_interpreted" if interpret else "pyquant.kernels",
                               interpret)
            if not hasattr(ns, "_autotune"):
                ns._autotune = importlib.import_module(f"{ns.package.__name__}._autotune")
            _STATE[key] = ns
        return ns


def interpreted(op: str):
    """The interpreted launcher of ``op`` for CPU tensors (TRITON_INTERPRET=1): the same
    signature as the op plus ``config=`` to force one kernel config. Needs Triton, not a GPU,
    and works in a process that imported Triton for the GPU too (the kernels use Triton
    builtins only, see pyquant_triton/kernels/_common.py)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; use one of {', '.join(OPS)}")
    fn = getattr(getattr(kernels(interpret=True), op), op)

    def call(*args, **kwargs):
        # Some Triton versions also consult TRITON_INTERPRET while launching (lazy imports
        # that check it), so it stays set for the duration of the call.
        with _env("TRITON_INTERPRET", "1"):
            return fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"interpreted_{op}"
    return call


# ---------------------------------------------------------------- dispatch and fallback


def dense_fallback_reason(op: str, m: int) -> Optional[str]:
    """Why the triton backend runs the dense path for ``op`` at batch ``m`` (None: kernel)."""
    lim = DENSE_FALLBACK_MIN_M.get(op)
    if lim is not None and m >= lim:
        return (f"M={m} >= {lim}: dequantize + dense matmul beat the {op} kernel in "
                f"pyquant.bench_cuda on an H200")
    return None


def dispatch_plan() -> dict:
    """{op: description} of what the triton backend runs, for ``pyquant info``."""
    plan = {}
    for op in OPS:
        lim = DENSE_FALLBACK_MIN_M.get(op)
        plan[op] = ("Triton kernel at every M" if lim is None else
                    f"Triton kernel for M < {lim}, dequantize + dense matmul for M >= {lim}")
    return plan


def _rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def _dense_linear(x, w_dense, bias):
    b = None if bias is None else bias.to(x.dtype)
    return torch.nn.functional.linear(x, w_dense.to(x.dtype), b)


def int8_weight_only_mm(x, w, w_scale, bias=None):
    if dense_fallback_reason("int8_weight_only_mm", _rows(x)):
        return _dense_linear(x, kernels().dequant.dequantize_int8(w, w_scale, x.dtype), bias)
    return kernels().int8_weight_only_mm.int8_weight_only_mm(x, w, w_scale, bias)


def int8_dynamic_mm(x, w, w_scale, bias=None):
    k = w.shape[1]
    m, n = _rows(x), w.shape[0]
    # torch._int_mm (cuBLASLt int8) needs M > 16 and K, N multiples of 8.
    if dense_fallback_reason("int8_dynamic_mm", m) and m > 16 and k % 8 == 0 and n % 8 == 0:
        kmod = kernels().int8_dynamic_mm
        x2 = x.reshape(-1, k)
        xq, xs = kmod.quantize_rows(x2)
        acc = torch._int_mm(xq, w.t())
        y = acc.to(torch.float32) * (xs[:, None] * w_scale[None, :])
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
    return kernels().int8_dynamic_mm.int8_dynamic_mm(x, w, w_scale, bias)


def int4_weight_only_mm(x, w_packed, scales, zeros, group_size, bias=None):
    if dense_fallback_reason("int4_weight_only_mm", _rows(x)):
        w = kernels().dequant.dequantize_int4(w_packed, scales, zeros, group_size, x.dtype)
        return _dense_linear(x, w, bias)
    return kernels().int4_weight_only_mm.int4_weight_only_mm(
        x, w_packed, scales, zeros, group_size, bias)


def sparse24_mm(x, values, meta, bias=None):
    if dense_fallback_reason("sparse24_mm", _rows(x)):
        return _dense_linear(x, kernels().dequant.densify_24(values, meta, None, x.dtype), bias)
    return kernels().sparse24_mm.sparse24_mm(x, values, meta, bias)


def sparse24_int8_mm(x, values_q, meta, scale, bias=None):
    if dense_fallback_reason("sparse24_int8_mm", _rows(x)):
        w = kernels().dequant.densify_24(values_q, meta, scale, x.dtype)
        return _dense_linear(x, w, bias)
    return kernels().sparse24_int8_mm.sparse24_int8_mm(x, values_q, meta, scale, bias)


_IMPLS = {
    "int8_weight_only_mm": int8_weight_only_mm,
    "int8_dynamic_mm": int8_dynamic_mm,
    "int4_weight_only_mm": int4_weight_only_mm,
    "sparse24_mm": sparse24_mm,
    "sparse24_int8_mm": sparse24_int8_mm,
}


def _register() -> None:
    if _STATE.get("registered"):
        return
    from . import ops

    for op, fn in _IMPLS.items():
        ops.register_impl("triton", op, fn)
    _STATE["registered"] = True


# ------------------------------------------------------------------------------- warmup


DEFAULT_WARMUP_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _infer_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    for mod in model.modules():
        b = getattr(mod, "bias", None)
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            return b.dtype
    return torch.bfloat16


def warmup(model: torch.nn.Module, batch_sizes=DEFAULT_WARMUP_BATCH_SIZES,
           dtype: Optional[torch.dtype] = None, verbose: bool = False, *,
           device_types: tuple = ("cuda",)) -> list:
    """Tune the Triton kernels of every quantized layer of ``model`` (on CUDA) for the given
    batch sizes (M = tokens per call) ahead of serving, so no request pays for tuning.

    Each distinct (op, N, K, group size) is run once per M bucket (the next power of two) with
    random activations of ``dtype`` (default: the model's first float parameter dtype, else
    bfloat16). Results land in the on-disk cache (``$PYQUANT_CACHE_DIR`` or
    ``~/.cache/pyquant/triton_autotune.json``), so later processes on this GPU and Triton
    version start tuned. Returns one dict per tuned (layer shape, M bucket).
    ``device_types``: whose layers to run (the CPU tests pass ("cpu",) with the interpreter).
    """
    why = why_unavailable()
    if why:
        raise RuntimeError(f"pyquant.warmup needs the Triton backend, which is unavailable: {why}")
    from . import nn as qnn

    # Most specific class first (Int4DynamicLinear subclasses Int4WeightOnlyLinear); None: an
    # op without Triton kernels, nothing to tune.
    kinds = [(getattr(qnn, "Int4DynamicLinear", None), None),
             (qnn.Int8DynamicLinear, "int8_dynamic_mm"),
             (qnn.Int4WeightOnlyLinear, "int4_weight_only_mm"),
             (qnn.Int8WeightOnlyLinear, "int8_weight_only_mm")]
    dtype = dtype or _infer_dtype(model)
    ks = kernels()
    seen: set = set()
    report = []
    for name, mod in model.named_modules():
        op = next((o for cls, o in kinds if cls is not None and isinstance(mod, cls)), None)
        if op is None:
            continue
        n, k = mod.out_features, mod.in_features
        if op == "int4_weight_only_mm":
            g = mod.group_size
            args = (mod.weight_packed, mod.weight_scales, mod.weight_zeros, g, mod.bias)
            dev = mod.weight_packed.device
        else:
            g = None
            args = (mod.weight, mod.weight_scale, mod.bias)
            dev = mod.weight.device
        if dev.type not in device_types:
            continue
        for m in batch_sizes:
            mb = ks._autotune.m_bucket(int(m))
            key = (op, n, k, g, mb, str(dev))  # the tuning key ignores the bias
            if key in seen:
                continue
            seen.add(key)
            x = torch.randn(int(m), k, device=dev, dtype=dtype)
            t0 = time.perf_counter()
            _IMPLS[op](x, *args)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            entry = dict(layer=name, op=op, n=n, k=k, group_size=g, m_bucket=mb,
                         seconds=round(time.perf_counter() - t0, 3),
                         dense_fallback=dense_fallback_reason(op, int(m)))
            report.append(entry)
            if verbose:
                print(f"pyquant.warmup: {op} N={n} K={k} M<={mb}: {entry['seconds']} s")
    return report
