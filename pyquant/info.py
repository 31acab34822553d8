"""``pyquant info``: what this installation can run and why not.

Every probe is wrapped: a probe that fails reports its reason as text instead of crashing, so
the command works on a broken install too, which is when it is needed most.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
from typing import Any, Callable, Optional


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:  # a diagnostic reports, never raises
        return f"error: {type(e).__name__}: {e}"


def _version(module: str) -> str:
    def get():
        if importlib.util.find_spec(module) is None:
            return "not installed"
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(module)
        except PackageNotFoundError:
            return getattr(__import__(module), "__version__", "installed")
    return _try(get)


def cpu_model_name() -> str:
    def get():
        if sys.platform.startswith("linux"):
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        return line.split(":", 1)[1].strip()
        return platform.processor() or platform.machine() or "unknown CPU"
    r = _try(get)
    return r or "unknown CPU"


CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx_vnni", "avx512_bf16", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "amx_int8")


def cpu_features() -> list:
    """The instruction-set flags that matter to pyquant's kernels, as the OS reports them."""
    def get():
        if not sys.platform.startswith("linux"):
            return "unknown (not Linux)"
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [x for x in CPU_FEATURES if x in flags]
        return "unknown"
    return _try(get)


def _cpu_isa() -> dict:
    from . import _native

    d: dict = {"override": os.environ.get("PYQUANT_CPU_ISA") or None}
    if not _native.available():
        d["in_use"] = None
        d["why_none"] = "native module not loaded"
        return d
    mod = _native.module()

    def names(values):
        return [_native.ISA_NAMES[v] if isinstance(v, int) and 0 <= v < len(_native.ISA_NAMES)
                else str(v) for v in values]

    d["compiled"] = _try(lambda: names(mod.compiled_isas()))
    d["available"] = _try(lambda: [n for i, n in enumerate(_native.ISA_NAMES)
                                   if mod.isa_available(i)])
    d["best"] = _try(lambda: _native.ISA_NAMES[_native.best_isa()])
    d["in_use"] = _try(lambda: _native.ISA_NAMES[_native.current_isa()])
    return d


def isa_summary() -> str:
    """One phrase for context lines: the ISA the kernels use now, or why there is none."""
    def get():
        from . import _native

        if not _native.available():
            return "native module not loaded, reference backend"
        return _native.ISA_NAMES[_native.current_isa()]
    return _try(get)


def _native_section() -> dict:
    from . import _native

    loaded = _try(_native.available)
    d = {"loaded": loaded is True, "error": None if loaded is True else _try(_native.load_error)}
    if loaded is True:
        d["file"] = _try(lambda: getattr(_native.module(), "__file__", None))
    return d


def _sparse_break_even() -> dict:
    """{"op (dtypes)": M}: from M rows on, the cpu backend runs that sparse op dense from its
    compressed weight (pyquant/_native.py, sparse_dense_min_m: per CPU level)."""
    from . import _native

    return {f"{op} ({kind})": m for (op, kind), m in _native.sparse_dense_min_m().items()}


def _unstructured_gemm() -> Optional[str]:
    """From which M sparse_unstructured_mm with float32 activations runs the unstructured GEMM
    (only the kept products; pyquant/_native.py), or None on a CPU level without it."""
    from . import _native

    at = {kept: _native.unstructured_gemm_from_m(kept) for kept in (0.1, 0.3, 0.5)}
    if at[0.5] is None:
        return None
    return (f"M >= max({_native.UNSTRUCTURED_GEMM_MIN_M}, "
            f"{_native.UNSTRUCTURED_GEMM_M_PER_KEPT} x kept share) for weights at most "
            f"{_native.UNSTRUCTURED_GEMM_MAX_KEPT:.0%} kept (" +
            ", ".join(f"{kept:.0%} kept: {m}" for kept, m in at.items()) +
            "); denser weights as the table above")


def _sparse24_gemm() -> Optional[str]:
    """From which M sparse24_mm with float32 activations runs the 2:4 GEMM (only the kept
    products; pyquant/_native.py), or None on a CPU level without it."""
    from . import _native

    if not _native._has_sparse_gemm():
        return None
    return (f"M >= {_native.SPARSE24_GEMM_MIN_M}, at every M from there (the dense break-even "
            "above only for x with an Inf or NaN, which the GEMM hands back)")


def _ranges(ms: list, open_end: Optional[int] = None) -> str:
    """[1, 5, 6, 7] -> "1, 5-7"; with open_end=7 (the probe's last M, which a run reaching it
    goes on past) -> "1, 5 and up"."""
    out, i = [], 0
    while i < len(ms):
        j = i
        while j + 1 < len(ms) and ms[j + 1] == ms[j] + 1:
            j += 1
        if ms[j] == open_end:
            out.append(f"{ms[i]} and up")
        else:
            out.append(str(ms[i]) if i == j else f"{ms[i]}-{ms[j]}")
        i = j + 1
    return ", ".join(out) or "none"


def _decode_paths() -> dict:
    """{"op": "M values"}: where the CPU kernels of the ISA in use write activations in 24-bit
    fixed point and run int8 dot products (csrc/pq.h), asked of the native module itself."""
    from . import _native

    mod, isa = _native.module(), _native.current_isa()
    k, n, probe = 4096, 4096, range(1, 65)
    wo = [m for m in probe if mod.int4_weight_only_fixed_point(isa, m, k, 128)]
    w8 = [m for m in probe if mod.int8_weight_only_fixed_point(isa, m, k, n)]
    sp = [m for m in probe if mod.sparse24_workspace_bytes(isa, m, k) > 0]
    # int8's AMX range reaches the probe's end and goes on: not a range the probe can end
    w8s = _ranges(w8, open_end=probe[-1])
    # int4 at K = 4096, group size 128: the M <= 4 GEMV needs K % 128 == 0 (the group sizes
    # pyquant makes, 64, 128 and 256, all fit its blocks); else M = 1 and, with AMX, 5-15;
    # without AMX from M = 5 on the W4A8 panel GEMM (K % 64 == 0), open-ended
    paths = {"int4_weight_only_mm (group size 64-256, K % 128 == 0)": _ranges(wo, probe[-1]),
             "int8_weight_only_mm (M > 1: x not bf16 values, K % 64 == 0)": w8s,
             "sparse24_int8_mm": _ranges(sp),
             "sparse24_int4_mm (group size % 32 == 0)": _ranges(sp)}
    # the ops of the layers kept in panels (pyquant/panels.py) take fixed point at every M;
    # bf16-valued x takes one bf16 term instead from M = 16 (int4) / 24 (int8) on avx512_bf16
    from . import panels

    if panels.panel_layout_applies(n, k, "cpu"):
        paths["int4/int8_weight_only_mm_panels (bf16 x, avx512_bf16: M < 16/24)"] = "1 and up"
    # the 2:4 + int8 / int4 panels (pyquant/sparse_panels.py): up to their workspace's rows,
    # below which the dense break-even lies
    sp4 = [m for m in probe if mod.sparse24_panels_workspace_bytes(isa, m, k) > 0]
    if sp4:
        paths["sparse24_int8/int4_mm_panels (up to their dense break-even)"] = _ranges(sp4)
    return paths


def _bf16_paths() -> dict:
    """{"op": "M values"}: where bf16 activations are read as bf16 and the outputs written as
    bf16 by the kernels themselves (the AMX paths: csrc/pq.h, the *_bf16 calls), asked of the
    native module at K = N = 4096, group size 128; elsewhere x is copied to float32 and the
    float32 output converted."""
    from . import _native

    mod, isa = _native.module(), _native.current_isa()
    k, n, g, probe = 4096, 4096, 128, range(1, 65)
    ms = {
        "int8_dynamic_mm (K % 64 == 0, N % 32 == 0)":
            [m for m in probe if mod.int8_dynamic_mm_bf16_workspace_bytes(isa, m, k, n, 1) >= 0],
        "int4_dynamic_mm (group size % 64 == 0, zero points <= 15)":
            [m for m in probe if mod.int4_dynamic_bf16_applies(isa, m, k, n, g)],
        "int8_weight_only_mm": [m for m in probe if mod.int8_weight_only_bf16_applies(isa, m, k, n)],
        "int4_weight_only_mm_panels": [m for m in probe if mod.int4_weight_only_panels_bf16_applies(
            isa, m, k, n, g)],
    }
    return {name: _ranges(v, open_end=probe[-1]) for name, v in ms.items()}


def _panel_layouts() -> dict:
    """{"layer": "layout"}: whether the CPU layers keep their weight in the 32-row panels of
    the ISA in use (pyquant/panels.py), asked of the native module itself."""
    from . import panels, sparse_panels

    n, k, g = 4096, 4096, 128
    yes = "32-row panels, packed once at swap time (N % 32 == 0, K % 64 == 0{})"
    no = "canonical rows (this ISA's kernels take them)"
    i8 = panels.panel_layout_applies(n, k, "cpu")
    i4 = panels.int4_panel_layout_applies(n, k, g, "cpu")
    i4wo = panels.int4_weight_only_panel_layout_applies(n, k, g, "cpu")
    s24 = sparse_panels.layout_applies(n, k, "cpu", g)
    return {"Int8WeightOnlyLinear, Int8DynamicLinear": yes.format("") if i8 else no,
            "Int4WeightOnlyLinear": yes.format(", group size % 32 == 0") if i4wo else no,
            "Int4DynamicLinear": yes.format(", group size % 32 == 0") if i4 else no,
            "Sparse24Int8Linear, Sparse24Int4Linear": (
                "values and meta in 4-row panels, packed once at swap time (N % 4 == 0, "
                "K % 128 == 0, K <= 32768, int4 group size % 32 == 0; pyquant/sparse_panels.py)"
                if s24 else "their compressed formats (pyquant/sparse_formats.py)"),
            "other sparse layers": "their compressed formats (pyquant/sparse_formats.py)"}


def _hugepages_status() -> str:
    """Where the CPU layers keep their large weights (pyquant/_hugepages.py)."""
    from . import _hugepages

    mode = _hugepages.thp_mode()
    if _hugepages.enabled():
        return (f"weight buffers of {_hugepages.MIN_BYTES >> 20} MiB or more on huge pages "
                f"(transparent huge pages: {mode}; PYQUANT_HUGEPAGES=0 turns it off)")
    why = ("PYQUANT_HUGEPAGES=0" if os.environ.get("PYQUANT_HUGEPAGES") else
           f"transparent huge pages: {mode}" if mode else "no transparent huge pages here")
    return f"off ({why}): weights on the allocator's pages"


def _cuda_section() -> dict:
    import torch

    d: dict = {"available": _try(torch.cuda.is_available),
               "torch_cuda": getattr(torch.version, "cuda", None)}
    if d["available"] is True:
        d["device_count"] = _try(torch.cuda.device_count)
        d["device"] = _try(lambda: torch.cuda.get_device_name(0))
        d["capability"] = _try(lambda: ".".join(map(str, torch.cuda.get_device_capability(0))))

    def native():
        if importlib.util.find_spec("pyquant._C_cuda") is None:
            return "not built (pyquant was built without CUDA; PYQUANT_CUDA=ON forces it)"
        try:
            from . import _C_cuda
        except Exception as e:
            return f"built but not loadable ({type(e).__name__}: {e})"
        facts = []
        if hasattr(_C_cuda, "cuda_runtime_version"):
            v = int(_C_cuda.cuda_runtime_version())
            facts.append(f"CUDA runtime {v // 1000}.{v % 1000 // 10}")
        if hasattr(_C_cuda, "device_count"):
            facts.append(f"{int(_C_cuda.device_count())} device(s) seen")
        return "built and loaded" + (f" ({', '.join(facts)})" if facts else "")

    d["native_module"] = _try(native)
    return d


def _triton_section() -> dict:
    def get():
        if importlib.util.find_spec("triton") is None:
            return {"installed": False}
        from . import _triton  # imports no Triton: the plan is a table

        return {"installed": True, "version": _version("triton"),
                "dispatch": _triton.dispatch_plan()}
    return _try(get)


def collect() -> dict:
    """Everything ``pyquant info`` reports, as plain JSON-able values."""
    import torch

    from . import ops

    def torch_threads():
        return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()}

    def location():
        import pyquant

        return os.path.dirname(pyquant.__file__)

    def minilm():
        from . import models

        path = models.minilm_path()
        return models.minilm_missing_reason() or f"installed ({path})"

    def pyquant_version():
        import pyquant

        return pyquant.__version__

    return {
        "pyquant": _try(pyquant_version),
        "pyquant_location": _try(location),
        "python": sys.version.split()[0],
        "platform": _try(platform.platform),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "transformers": _version("transformers"),
        "minilm_model": _try(minilm),
        "cpu": cpu_model_name(),
        "cpu_features": cpu_features(),
        "native": _try(_native_section),
        "cpu_isa": _try(_cpu_isa),
        "threads": _try(torch_threads),
        "cuda": _try(_cuda_section),
        "triton": _triton_section(),
        "env": {k: os.environ[k] for k in ("PYQUANT_BACKEND", "PYQUANT_CPU_ISA", "PYQUANT_QUIET",
                                                "PYQUANT_HUGEPAGES")
                if k in os.environ},
        "backends": _try(lambda: {n: ("available" if why is None else why)
                                  for n, why in ops.backend_status().items()}),
        "dispatch": _try(ops.backend_table),
        "sparse_dense_from_m": _try(_sparse_break_even),
        "sparse_unstructured_gemm": _try(_unstructured_gemm),
        "sparse24_gemm": _try(_sparse24_gemm),
        "fixed_point_decode_m": _try(_decode_paths),
        "bf16_in_out_m": _try(_bf16_paths),
        "cpu_weight_layout": _try(_panel_layouts),
        "cpu_weight_pages": _try(_hugepages_status),
    }


def _fmt(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def format_text(d: dict) -> str:
    lines = []

    def add(key, value):
        lines.append(f"{key + ':':<24}{_fmt(value)}")

    add("pyquant", f"{d['pyquant']} ({d['pyquant_location']})")
    add("python", f"{d['python']} on {d['platform']}")
    add("torch", d["torch"])
    add("numpy", d["numpy"])
    add("transformers", d["transformers"])
    add("all-MiniLM-L6-v2", d["minilm_model"])
    add("cpu", d["cpu"])
    add("cpu features", d["cpu_features"])

    nat = d["native"]
    if isinstance(nat, dict):
        add("native module _C", "loaded" + (f" ({nat['file']})" if nat.get("file") else "")
            if nat["loaded"] else f"NOT loaded: {nat['error']}")
    else:
        add("native module _C", nat)
    isa = d["cpu_isa"]
    if isinstance(isa, dict):
        if isa.get("in_use") is None:
            add("cpu isa in use", f"none ({isa.get('why_none')}; ops run on the reference backend)")
        else:
            add("cpu isa in use", isa["in_use"])
            add("cpu isa best", isa.get("best"))
            add("cpu isas compiled", isa.get("compiled"))
            add("cpu isas available", isa.get("available"))
        add("PYQUANT_CPU_ISA", isa["override"] if isa.get("override") else "not set")
    else:
        add("cpu isa", isa)
    th = d["threads"]
    add("torch threads", f"{th['intra_op']} (inter-op {th['inter_op']})"
        if isinstance(th, dict) else th)

    cuda = d["cuda"]
    if isinstance(cuda, dict):
        if cuda["available"] is True:
            add("cuda", f"available: {cuda.get('device')} (sm {cuda.get('capability')}, "
                        f"{cuda.get('device_count')} device(s), torch CUDA {cuda['torch_cuda']})")
        else:
            add("cuda", f"not available (torch CUDA build: {cuda['torch_cuda'] or 'none'})"
                if cuda["available"] is False else cuda["available"])
        add("native module _C_cuda", cuda["native_module"])
    else:
        add("cuda", cuda)
    tr = d["triton"]
    add("triton", (tr.get("version", "installed") if tr.get("installed") else "not installed")
        if isinstance(tr, dict) else tr)
    for k, v in d["env"].items():
        if k != "PYQUANT_CPU_ISA":
            add(k, v)

    lines.append("")
    lines.append("backends:")
    if isinstance(d["backends"], dict):
        for name, status in d["backends"].items():
            lines.append(f"  {name:<12}{status}")
    else:
        lines.append(f"  {d['backends']}")
    lines.append("")
    lines.append("backend per op:")
    table = d["dispatch"]
    if isinstance(table, dict):
        for dev, row in table.items():
            for op, backend in row.items():
                lines.append(f"  {dev:<5} {op:<28}{backend}")
    else:
        lines.append(f"  {table}")
    be = d.get("sparse_dense_from_m")
    if isinstance(be, dict) and be:
        lines.append("")
        lines.append("sparse ops on cpu: dense GEMM from the compressed weight from M rows on "
                     "(decompressing beats the sparse kernel there):")
        for name, m in be.items():
            lines.append(f"  {name:<32}M >= {m}")
    ug = d.get("sparse_unstructured_gemm")
    if isinstance(ug, str):
        lines.append("sparse_unstructured_mm with float32 activations: the unstructured GEMM "
                     "(only the kept products) at")
        lines.append(f"  {ug}")
    g24 = d.get("sparse24_gemm")
    if isinstance(g24, str):
        lines.append("sparse24_mm with float32 activations: the 2:4 GEMM (only the kept "
                     f"products) at {g24}")
    for key, title in (("fixed_point_decode_m", "fixed-point paths on cpu: activations in "
                         "24-bit fixed point (three int8 terms), int8 dot products, at M ="),
                       ("bf16_in_out_m", "bf16 activations on cpu read as bf16, outputs "
                        "written as bf16 (no float32 copies), at M =")):
        ms_of = d.get(key)
        if isinstance(ms_of, dict):
            lines.append("")
            lines.append(title)
            for name, ms in ms_of.items():
                lines.append(f"  {name:<66}{ms}")
    plan = tr.get("dispatch") if isinstance(tr, dict) else None
    if isinstance(plan, dict):
        lines.append("")
        lines.append("triton backend on cuda (what runs, by batch size M):")
        for op, how in plan.items():
            lines.append(f"  {op:<22}{how}")
    lay = d.get("cpu_weight_layout")
    if isinstance(lay, dict):
        lines.append("")
        lines.append("weight layout of the layers on cpu (state_dict and checkpoints: canonical):")
        for name, how in lay.items():
            lines.append(f"  {name:<42}{how}")
    if d.get("cpu_weight_pages"):
        lines.append(f"  {'pages':<42}{d['cpu_weight_pages']}")
    return "\n".join(lines)


def main(as_json: bool = False, out=None) -> int:
    out = out or sys.stdout
    d = collect()
    if as_json:
        out.write(json.dumps(d, indent=2, default=str) + "\n")
    else:
        out.write(format_text(d) + "\n")
    return 0
