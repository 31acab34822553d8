"""Loads the native CPU module (pyquant._C), picks the instruction set, and turns checked
tensors into raw pointers. Every public function runs the ``_checks`` of its op because it is reachable directly, and
a wrong shape here would be an out-of-bounds read in C; the ops (ops.py), which have checked
already, call the unchecked ``_run_<op>`` bodies. This module then makes the memory layout
what the C API wants (float32 rows with unit stride, contiguous weights), allocates every
output with torch (scratch that never leaves a call comes from per-thread buffers), and turns
a non-zero status into a Python error that names the shapes."""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import torch

from . import _checks

ISA_NAMES = ("portable", "avx2", "avx512_vnni", "avx512_bf16", "avx512_amx")
_ISA_ALIASES = {"portable": 0, "generic": 0, "avx2": 1, "avx512_vnni": 2, "avx512": 2, "vnni": 2,
                "avx512_bf16": 3, "bf16": 3, "avx512_amx": 4, "amx": 4}
_STATUS = {1: "invalid argument", 2: "instruction set not available"}
_ERR_ISA = 2  # PQ_ERR_ISA (pq.h)
_NOT_FIXED_POINT = 3  # pq.h: PQ_NOT_FIXED_POINT, a row of x that 24-bit fixed point cannot hold
_NOT_FINITE = 4  # pq.h: PQ_NOT_FINITE, x with an Inf or NaN (a path that skips pruned weights)

_lock = threading.Lock()
_module = None
_load_error: Optional[str] = None
_loaded = False
_isa_override: Optional[int] = None


def _load():
    global _module, _load_error, _loaded
    if _loaded:
        return _module
    with _lock:
        if not _loaded:
            try:
                from . import _C  # noqa: F401  (built by CMake; absent in a source-only tree)

                if hasattr(_C, "init"):
                    _C.init()  # once per process: asks Linux for the AMX tile state
                _module = _C
            except Exception as e:  # ImportError, or an OSError from a broken build
                _load_error = f"{type(e).__name__}: {e}"
            _loaded = True
    return _module


def available() -> bool:
    return _load() is not None


def load_error() -> Optional[str]:
    """Why the native module is not loaded (None when it is)."""
    _load()
    return _load_error


def module():
    m = _load()
    if m is None:
        raise RuntimeError(
            f"pyquant's native CPU module is not loaded ({_load_error}); reinstall with a C++ "
            f"compiler available (pip install -v .) or use the reference backend"
        )
    return m


_best_isa: tuple = (None, 0)  # (module, its best ISA): a pybind call saved per op call


def best_isa() -> int:
    global _best_isa
    mod = module()
    if _best_isa[0] is not mod:  # first call, or a test swapped the module
        _best_isa = (mod, mod.best_isa())
    return _best_isa[1]


def _parse_isa(name: str) -> int:
    key = name.strip().lower()
    if key not in _ISA_ALIASES:
        raise ValueError(
            f"unknown CPU instruction set {name!r}; use one of {', '.join(ISA_NAMES)}"
        )
    return _ISA_ALIASES[key]


def current_isa() -> int:
    """The ISA the kernels run with: the CPU's best, or a lower one forced by
    ``use_isa(...)`` or the PYQUANT_CPU_ISA environment variable."""
    # the usual case first, in as few steps as it can be told (nothing forced, the module
    # loaded): at decode this runs from caches that the weight stream has just flushed,
    # where each function call and lookup saved counts (~5 us -> ~2 us, 2-core Xeon)
    mod = _module
    if (mod is not None and _best_isa[0] is mod and _isa_override is None
            and type(_ENV_BYTES) is dict and b"PYQUANT_CPU_ISA" not in _ENV_BYTES):
        return _best_isa[1]
    best = best_isa()
    if _isa_override is not None:
        want = _isa_override
        source = "use_isa()"
    else:
        env = env_setting("PYQUANT_CPU_ISA", b"PYQUANT_CPU_ISA").strip()
        if not env:
            return best
        want = _parse_isa(env)
        source = f"PYQUANT_CPU_ISA={env}"
    if not module().isa_available(want):
        avail = [ISA_NAMES[i] for i in range(len(ISA_NAMES)) if module().isa_available(i)]
        raise ValueError(
            f"{source} asks for {ISA_NAMES[want]}, which this CPU or build does not support; "
            f"available: {', '.join(avail)}"
        )
    return want


@contextlib.contextmanager
def use_isa(name: str):
    """Force a CPU instruction set for the duration of the block (tests run every path)."""
    global _isa_override
    want = _parse_isa(name)
    prev = _isa_override
    _isa_override = want
    try:
        current_isa()  # fail here, not in the middle of a model
        yield
    finally:
        _isa_override = prev


# The settings PYQUANT_BACKEND and PYQUANT_CPU_ISA are read on every op call, so that
# changing them between calls (as the tests do) takes effect; os.environ.get costs ~1.5 us a
# read (key encoding and the mapping's layers), as much as a third of a small layer's kernel.
# On POSIX os.environ keeps its contents in a dict of bytes (what os.environ[...] = and del
# update), which answers in ~0.1 us.
_ENV_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def env_setting(name: str, key: Optional[bytes] = None) -> str:
    """os.environ.get(name, ""), fast (key: name encoded, precomputed by the caller)."""
    if isinstance(_ENV_BYTES, dict):
        v = _ENV_BYTES.get(key if key is not None else os.fsencode(name))
        return "" if v is None else os.fsdecode(v)
    return os.environ.get(name, "")


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _rows_f32(x2: torch.Tensor) -> torch.Tensor:
    """float32 rows with unit element stride; a row stride > K is passed through as ldx. Rows
    of another dtype are converted, from 1 MiB of float32 on into this thread's scratch (they
    never leave the call; _SCRATCH_MAX_BYTES says why)."""
    if x2.dtype != torch.float32:
        nbytes = x2.numel() * 4
        if _SCRATCH_MIN_BYTES <= nbytes <= _SCRATCH_MAX_BYTES:
            return _work("rows_f32", nbytes)[:nbytes].view(torch.float32).view(x2.shape).copy_(x2)
        x2 = x2.to(torch.float32)
    if x2.stride(1) != 1 or x2.stride(0) < x2.shape[1] or x2.shape[0] <= 1:
        x2 = x2.contiguous()
        if x2.shape[0] == 1 and x2.stride(0) != x2.shape[1]:
            # one row is contiguous whatever its row stride (a [K, 1] tensor transposed has
            # 1); the kernels never step by it but refuse one below K: give the row K
            x2 = x2.as_strided(x2.shape, (x2.shape[1], 1))
    return x2


def _bias_f32(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()):
        return bias  # the common case without two no-op tensor calls (~1.5 us each)
    return bias.to(torch.float32).contiguous()


def _raise(op: str, status: int, **shapes) -> None:
    desc = ", ".join(f"{k}={v}" for k, v in shapes.items())
    raise ValueError(f"{op}: native kernel rejected the call ({_STATUS.get(status, status)}): {desc}")


def _require_cpu(op: str, x: torch.Tensor) -> None:
    # _checks put every tensor on x's device; the C kernels read host memory only.
    if x.device.type != "cpu":
        raise ValueError(f"{op}: the native CPU backend needs CPU tensors, got x on {x.device}")


def _require_2d(op: str, name: str, t, what: str, ok) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not ok(t):
        raise TypeError(f"{op}: {name} must be {what}, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _flat(x: torch.Tensor, n: int):
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(lead.numel(), x.shape[-1])
    return lead, x2


# Per-call overhead. At decode (M = 1) a 4096 x 4096 int4 layer's kernel takes ~0.4 ms, and
# each tensor torch allocates costs ~3 us on a small CPU; the ops below used to allocate four
# and check their arguments twice (~40 us a call). So: the ops' bodies (ops.py, which has
# already run the _checks) call the ``_run_*`` functions, which do not check again; the
# int8 codes, row scales and kernel workspace live in per-thread scratch buffers (they never
# leave the call); only the returned output is a fresh tensor.
_SCRATCH = threading.local()
# Above this a call allocates (PYQUANT_SCRATCH_MB, default 128 MiB). It was 8 MiB ("the kernel
# dwarfs the allocation"), but a buffer that large comes fresh from the kernel each time and
# its first touch faults every page in: 40 MiB took 12 ms to allocate and fill where a kept
# one took 1.1 ms (2-core Xeon), and int4 weight-only with bf16 x at M = 1024 (its 24 MiB of
# packed activations at K = 4096) ran 1.50-1.54x as fast with its buffers kept
# (benchmarks/scratch_ab.py). 128 MiB holds 1024 rows of x at K = 11008 as the three bf16 terms
# of the AMX paths (68 MiB).
def _scratch_max_bytes() -> int:
    v = os.environ.get("PYQUANT_SCRATCH_MB", "").strip()
    try:
        return max(int(v), 0) << 20 if v else 128 << 20
    except ValueError:
        import warnings

        warnings.warn(f"PYQUANT_SCRATCH_MB={v!r} is not a whole number of MiB: keeping 128",
                      stacklevel=2)
        return 128 << 20


_SCRATCH_MAX_BYTES = _scratch_max_bytes()
# Rows converted to float32 (_rows_f32) go to scratch from this size on; below it one .to()
# costs less than the views of a buffer.
_SCRATCH_MIN_BYTES = 1 << 20


def _work(key, nbytes: int, cap: bool = True) -> torch.Tensor:
    """A uint8 buffer of >= nbytes that lives only for one call on this thread: kept per key
    and reused, up to _SCRATCH_MAX_BYTES when ``cap`` (above it a fresh tensor)."""
    if cap and nbytes > _SCRATCH_MAX_BYTES:
        return torch.empty(nbytes, dtype=torch.uint8)
    d = _SCRATCH.__dict__
    buf = d.get(key)
    if buf is None or buf.numel() < nbytes:
        buf = d[key] = torch.empty(max(nbytes, 64), dtype=torch.uint8)
    return buf


def _out(m: int, n: int, x_dtype: torch.dtype) -> torch.Tensor:
    """The kernels' float32 [M, N] output: the returned tensor itself for float32 x, else a
    scratch buffer that the caller converts (the conversion allocates the returned tensor)."""
    if x_dtype == torch.float32 or m * n * 4 > _SCRATCH_MAX_BYTES:
        return torch.empty((m, n), dtype=torch.float32)
    return _work("out", m * n * 4)[: m * n * 4].view(torch.float32).view(m, n)


def _finish(out: torch.Tensor, x: torch.Tensor, lead, n: int) -> torch.Tensor:
    if x.dtype != torch.float32:
        out = out.to(x.dtype)
    return out.reshape(*lead, n) if len(lead) != 1 else out


def _int8_work(isa: int, m: int, k: int, n: int):
    """Scratch for the AMX path (activations repacked into tiles; csrc/cpu/tile_amx.h) or,
    without AMX, the panel GEMM (csrc/cpu/tile_vnni_panel.h)."""
    nbytes = module().int8_workspace_bytes(isa, m, k, n, _threads())
    return (_work("amx", nbytes) if nbytes > 0 else None), max(nbytes, 0)


def _quantize_into(x2: torch.Tensor, isa: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """x2's rows quantized to int8 into scratch: (codes address, scales address, keep-alives).
    bf16 rows are quantized from bf16 (pq_quantize_rows_int8_bf16: the same codes and scales
    as their fp32 values, without a float32 copy of x: int8 and int4 dynamic with bf16 x ran
    1.01-1.09x faster at M = 128 and 1.04-1.17x at M = 1024, Llama-2-7B shapes, 2-core Xeon)."""
    m, k = x2.shape
    xq = _work("xq", m * k)
    xs = _work("xs", m * 4)
    mod = module()
    if x2.dtype is torch.bfloat16 and x2.stride(-1) == 1 and (m <= 1 or x2.stride(0) >= k):
        nwork = mod.quantize_rows_int8_bf16_workspace_bytes(m, k, _threads())
        work = _work("xq_bf16_rows", nwork)
        st = mod.quantize_rows_int8_bf16(isa, x2.data_ptr(), m, k, max(x2.stride(0), k),
                                         _ptr(xq), _ptr(xs), _threads(), _ptr(work), nwork)
        if st:
            _raise("quantize_rows_int8", st, M=m, K=k)
        return _ptr(xq), _ptr(xs), xq, xs
    xf = _rows_f32(x2)
    st = mod.quantize_rows_int8_amax(isa, _ptr(xf), m, k, xf.stride(0), 0, _ptr(xq),
                                     _ptr(xs), _threads())
    if st:
        _raise("quantize_rows_int8", st, M=m, K=k)
    return _ptr(xq), _ptr(xs), xq, xs


def _run_int8_weight_only_mm(x, w, w_scale, bias=None):
    n, k = w.shape
    lead, x2 = _flat(x, n)
    m = x2.shape[0]
    if x.dtype is torch.bfloat16:
        y = _int8_weight_only_bf16_out(x2, w, w_scale, bias)
        if y is not None:
            return y.reshape(*lead, n) if len(lead) != 1 else y
    out = _out(m, n, x.dtype)
    if m and n:
        xf = _rows_f32(x2)
        w = w.contiguous()
        ws = w_scale.contiguous()
        b = _bias_f32(bias)
        isa, nt = current_isa(), _threads()
        # AMX: the activations' bf16 terms and the converted weight strips (tile_amx_bf16.h)
        nwork = module().int8_weight_only_workspace_bytes(isa, m, k, n, nt)
        work = _work("amx_wo", nwork) if nwork > 0 else None
        st = module().int8_weight_only_mm(
            isa, _ptr(xf), m, k, xf.stride(0), _ptr(w), n, _ptr(ws), _ptr(b),
            _ptr(out), nt, _ptr(work), max(nwork, 0),
        )
        if st:
            _raise("int8_weight_only_mm", st, M=m, N=n, K=k, ldx=xf.stride(0))
    return _finish(out, x, lead, n)


def _int8_bind_setup(w, w_scale, bias, workspace: str):
    """What an int8 bind prepares: (N, K, the addresses of weight, scales and bias, the native
    module, its ``workspace`` query cached per (ISA, M, threads)), or None where the kernel
    would need a copy of a weight tensor (a prepared call holding a copy would miss writes in
    place): the weights as they are or not at all."""
    wc, ws, b = w.contiguous(), w_scale.contiguous(), _bias_f32(bias)
    if not (wc is w and ws is w_scale and b is bias):
        return None
    n, k = w.shape
    mod = module()
    return (n, k, (_ptr(wc), _ptr(ws), _ptr(b)), mod,
            _workspace_sizes(getattr(mod, workspace), k, n))


def _bind_int8_weight_only_mm(w, w_scale, bias=None):
    """_run_int8_weight_only_mm prepared once for weights that stay the same (ops.LayerCall),
    as _bind_int8_dynamic_mm: contiguous float32 rows, and bf16 rows where the bf16-output
    tiles do not take them, go straight to the kernel; anything else (and a status other than
    0) takes the op's general path. None where the weights would need a copy. The int8
    weight-only layers keep the canonical rows on AMX, so their decode comes here."""
    setup = _int8_bind_setup(w, w_scale, bias, "int8_weight_only_workspace_bytes")
    if setup is None:
        return None
    n, k, ptrs, mod, sizes = setup

    def call(isa, xf, m, out, nt):
        nwork = sizes(isa, m, nt)
        work = _work("amx_wo", nwork) if nwork > 0 else None
        return mod.int8_weight_only_mm(isa, xf.data_ptr(), m, k, k, ptrs[0], n, ptrs[1], ptrs[2],
                                       _ptr(out), nt, _ptr(work), max(nwork, 0))
    return _prepared_call(
        n, k, call, lambda x: _run_int8_weight_only_mm(x, w, w_scale, bias),
        # bf16 rows that the bf16-output tiles take go the general way, to them
        lambda isa, m, y: y is None or not mod.int8_weight_only_bf16_applies(isa, m, k, n))


def _prepared_call(n: int, k: int, call, general, applies=None):
    """A bind's prepared call: rows that _bound_rows sends straight to a kernel (where
    applies(isa, M, bf16 output or None), if given) run call(isa, fp32 rows, M, fp32 out,
    threads) -> status; anything else, and a status other than 0, takes general(x)."""
    def bound(x):
        m, xf, out, y = _bound_rows(x, n, k)
        if m:
            isa, nt = current_isa(), _threads()
            if (applies is None or applies(isa, m, y)) and call(isa, xf, m, out, nt) == 0:
                return _bound_result(out, y)
        return general(x)
    return bound


def _quantized_call(k: int, key: str, size, run):
    """The call of _prepared_call for a dynamic op: the rows quantized to int8 into this
    thread's scratch, then run(isa, codes address, scales address, M, out, threads, work, work
    bytes) -> status with size(isa, M, threads) bytes of scratch `key` (none at 0; a size
    below 0 declines)."""
    mod = module()

    def call(isa, xf, m, out, nt):
        nwork = size(isa, m, nt)
        if nwork < 0:
            return -1
        xq, xs = _work("xq", m * k), _work("xs", m * 4)
        work = _work(key, nwork) if nwork > 0 else None
        st = mod.quantize_rows_int8_amax(isa, xf.data_ptr(), m, k, k, 0, _ptr(xq), _ptr(xs), nt)
        return st or run(isa, _ptr(xq), _ptr(xs), m, out, nt, work, nwork)
    return call


_run_int8_weight_only_mm.bind = _bind_int8_weight_only_mm


def int8_weight_only_mm(x, w, w_scale, bias=None):
    _checks.check_int8_mm("int8_weight_only_mm", x, w, w_scale, bias)
    _require_cpu("int8_weight_only_mm", x)
    return _run_int8_weight_only_mm(x, w, w_scale, bias)


def quantize_rows_int8(x2: torch.Tensor, amax: Optional[torch.Tensor] = None):
    """Native per-row int8 quantization of a 2-D float tensor (formats.quantize_rows_int8),
    with the row maxima computed, or given (``amax`` [M]: a row-parallel shard's slice of
    each row quantized with the whole row's scale)."""
    _require_2d("quantize_rows_int8", "x", x2, "a float tensor", lambda t: t.is_floating_point())
    _require_cpu("quantize_rows_int8", x2)
    m, k = x2.shape
    if amax is not None:
        if not isinstance(amax, torch.Tensor) or amax.numel() != m or amax.device.type != "cpu":
            raise ValueError(f"quantize_rows_int8: amax must be a CPU tensor of the M={m} row "
                             f"maxima, got {getattr(amax, 'shape', type(amax).__name__)}")
        amax = amax.detach().reshape(m).to(torch.float32).contiguous()
    xq = torch.empty((m, k), dtype=torch.int8)
    xs = torch.empty((m,), dtype=torch.float32)
    if m:
        xf = _rows_f32(x2)
        st = module().quantize_rows_int8_amax(
            current_isa(), _ptr(xf), m, k, xf.stride(0), _ptr(amax), _ptr(xq), _ptr(xs),
            _threads()
        )
        if st:
            _raise("quantize_rows_int8", st, M=m, K=k)
    return xq, xs


def int8_gemm_s32(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 xq @ w.T (exposed for tests of integer accumulation)."""
    int8 = lambda t: t.dtype == torch.int8  # noqa: E731
    _require_2d("int8_gemm_s32", "xq", xq, "int8", int8)
    _require_2d("int8_gemm_s32", "w", w, "int8", int8)
    if xq.shape[1] != w.shape[1]:
        raise ValueError(
            f"int8_gemm_s32: xq has shape {tuple(xq.shape)} but w has shape {tuple(w.shape)}; "
            f"both need K={w.shape[1]} columns")
    _checks.check_same_device("int8_gemm_s32", xq, w=w)
    _checks.check_int8_k("int8_gemm_s32", w.shape[1])
    _require_cpu("int8_gemm_s32", xq)
    m, k = xq.shape
    n = w.shape[0]
    acc = torch.empty((m, n), dtype=torch.int32)
    if m and n:
        xq, w = xq.contiguous(), w.contiguous()
        isa = current_isa()
        if isa == ISA_NAMES.index("avx2") and bool((xq == -128).any()):
            # the AVX2 kernel is exact for every weight but needs x >= -127 (tile_int8.h, as
            # every activation code pyquant makes is): the product the other way round, or
            # the portable kernel where both hold -128
            if not bool((w == -128).any()):
                return int8_gemm_s32(w, xq).T.contiguous()
            isa = ISA_NAMES.index("portable")
        work, nwork = _int8_work(isa, m, k, n)
        st = module().int8_gemm_s32(isa, _ptr(xq), m, k, _ptr(w), n, _ptr(acc), _threads(),
                                    _ptr(work), nwork)
        if st:
            _raise("int8_gemm_s32", st, M=m, N=n, K=k)
    return acc


def _check_codes(op: str, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Checks the codes and their scales; returns an empty float view of xq's shape for the
    weight checks that the float ops share (K, devices)."""
    _require_2d(op, "xq", xq, "int8", lambda t: t.dtype == torch.int8)
    _require_cpu(op, xq)
    ok = (isinstance(xs, torch.Tensor) and xs.dtype == torch.float32 and xs.dim() == 1
          and xs.shape[0] == xq.shape[0] and xs.device.type == "cpu")
    if not ok:
        got = (f"{xs.dtype} {tuple(xs.shape)} on {xs.device}" if isinstance(xs, torch.Tensor)
               else type(xs).__name__)
        raise ValueError(f"{op}: x_scale must be a float32 CPU vector of M={xq.shape[0]} "
                         f"row scales, got {got}")
    return xq[:0].to(torch.float32)


def _int8_codes_mm(isa, pxq, pxs, m, k, w, w_scale, bias, out):
    """The int8 x int8 core of int8_dynamic_mm on codes at address pxq (row scales at pxs)."""
    n = w.shape[0]
    w = w.contiguous()
    ws = w_scale.contiguous()
    b = _bias_f32(bias)
    work, nwork = _int8_work(isa, m, k, n)
    st = module().int8_dynamic_mm(isa, pxq, pxs, m, k, _ptr(w), n, _ptr(ws), _ptr(b),
                                  _ptr(out), _threads(), _ptr(work), nwork)
    if st:
        _raise("int8_dynamic_mm", st, M=m, N=n, K=k)


def has_panel_kernels(isa: int) -> bool:
    """True when ISA ``isa``'s kernels take the panel layouts (pyquant/panels.py): the AVX512
    levels; below them the *_panels ops unpack."""
    return isa >= ISA_NAMES.index("avx512_vnni")


def _run_dynamic(x, n: int, k: int, core, *wargs):
    """A dynamic op: x's rows quantized to int8 into scratch, then core(isa, codes address,
    scales address, M, K, *wargs, out), the op's int8 core (wargs end with the bias)."""
    lead, x2 = _flat(x, n)
    m = x2.shape[0]
    out = _out(m, n, x.dtype)
    if m and n:
        isa = current_isa()
        pxq, pxs, *_keep = _quantize_into(x2, isa)
        core(isa, pxq, pxs, m, k, *wargs, out)
    return _finish(out, x, lead, n)


def _run_codes(xq, x_scale, n: int, core, *wargs):
    """core (as _run_dynamic's) on given activation codes and row scales: float32 [M, N]."""
    m, k = xq.shape
    out = torch.empty((m, n), dtype=torch.float32)
    if m and n:
        xq, xs = xq.contiguous(), x_scale.contiguous()
        core(current_isa(), _ptr(xq), _ptr(xs), m, k, *wargs, out)
    return out


def _run_int8_dynamic_mm(x, w, w_scale, bias=None):
    if x.dtype is torch.bfloat16:
        y = _int8_dynamic_bf16_out(x, w, w_scale, bias)
        if y is not None:
            return y
    return _run_dynamic(x, *w.shape, _int8_codes_mm, w, w_scale, bias)


def _int8_dynamic_bf16_out(x, w, w_scale, bias):
    """bf16 x on the AMX tiles straight into a bf16 output (pq_int8_dynamic_mm_bf16: the float
    results rounded as torch rounds them), or None where that path does not run (other ISAs,
    M < 9, K % 64 or N % 32): no float32 output written and converted. Against the float32
    output, in-process runs on a 2-core Xeon with AMX (benchmarks/bf16_io_ab.py), Llama-2-7B
    shapes: 1.02-1.18x at M = 128, 1.01-1.24x at M = 1024 except 4096 x 11008 (0.98-1.03x: its
    K chunks' int32 sums make the same round trip through memory either way)."""
    n, k = w.shape
    mod = module()
    wc, ws, b = w.contiguous(), w_scale.contiguous(), _bias_f32(bias)
    return _dynamic_bf16_out(
        "int8_dynamic_mm", x, n, k, "amx",
        lambda isa, m, nt: mod.int8_dynamic_mm_bf16_workspace_bytes(isa, m, k, n, nt),
        lambda isa, pxq, pxs, m, out, nt, work, nwork: mod.int8_dynamic_mm_bf16(
            isa, pxq, pxs, m, k, _ptr(wc), n, _ptr(ws), _ptr(b), _ptr(out), nt, _ptr(work),
            nwork))


def _dynamic_bf16_out(op: str, x, n: int, k: int, key: str, need, call, fallback=None, **shape):
    """The bf16-output call of a dynamic op (_int8_dynamic_bf16_out, _int4_dynamic_bf16_out):
    need(isa, M, threads) -> its workspace bytes, or < 0 where it does not run (None is
    returned before anything is done); x's rows quantized from bf16 (_quantize_into), then
    call(isa, codes address, scales address, M, bf16 out, threads, work, work bytes) -> status
    into a new bf16 output of x's leading shape. The status `fallback` returns None (the float
    path takes the call); any other but 0 raises."""
    lead, x2 = _flat(x, n)
    m = x2.shape[0]
    isa, nt = current_isa(), _threads()
    nwork = need(isa, m, nt)
    if nwork < 0:
        return None
    pxq, pxs, *_keep = _quantize_into(x2, isa)
    out = torch.empty((m, n), dtype=torch.bfloat16)
    st = call(isa, pxq, pxs, m, out, nt, _work(key, nwork), nwork)
    if fallback is not None and st == fallback:
        return None
    if st:
        _raise(op, st, M=m, N=n, K=k, **shape)
    return out.reshape(*lead, n) if len(lead) != 1 else out


def _workspace_sizes(fn, *fixed):
    """fn(isa, m, *fixed, threads) kept per (isa, m, threads): the native workspace query."""
    sizes = {}

    def get(isa, m, nt):
        key = (isa, m, nt)
        v = sizes.get(key)
        if v is None:
            v = sizes[key] = fn(isa, m, *fixed, nt)
        return v
    return get


def _rows_out(x: torch.Tensor, n: int, dtype: torch.dtype = torch.float32,
              max_m: Optional[int] = None):
    """(M, out) for a contiguous x of two or more dims (a model's [batch, tokens, K] too): its
    rows M and a new output (float32, or dtype) of x's leading shape and n columns; (0, None)
    for any other x (and an empty one): the case the bound calls send straight to a kernel.
    One function, and the output's shape given as ints where x has 2 or 3 dims, because at
    decode this runs from caches that the weight stream has just flushed: there finding M
    (x.dim(), x.numel()) and building the shape as x.shape[:-1] + (n,) cost ~12 us of the
    ~38 us it took with the allocation, 2-D and 3-D x alike (2-core Xeon; the allocation
    itself ~21 us). max_m: (0, None) for more rows than that too, before anything is
    allocated."""
    if x.is_contiguous():
        s = x.shape
        d = len(s)
        if d == 2:
            m, k = s
            if m and k and (max_m is None or m <= max_m):
                return m, torch.empty(m, n, dtype=dtype)
        elif d == 3:
            a, b, k = s
            if a and b and k and (max_m is None or a * b <= max_m):
                return a * b, torch.empty(a, b, n, dtype=dtype)
        elif d > 3 and s[-1]:
            m = x.numel() // s[-1]
            if m and (max_m is None or m <= max_m):
                return m, torch.empty(s[:-1] + (n,), dtype=dtype)
    return 0, None


# Rows up to which bf16 x takes _bf16_rows. The native conversions run on one thread, torch's
# on all: int4 weight-only, 4096 x 4096, bf16 x, 2-core Xeon, hot, against the general path:
# 0.86-0.88x the time at M = 4, 0.95-1.03x at 32, 1.08x at 64, 1.09x at 128, 1.11x at 1024.
_BF16_BOUND_MAX_M = 32


def _bf16_rows(x: torch.Tensor, n: int, k: int):
    """A bound call's bf16 rows: (M, x as fp32 rows, the kernel's fp32 output, the call's bf16
    output) for contiguous bf16 rows of two or more dims, up to _BF16_BOUND_MAX_M of them, the
    first two in this thread's scratch; (0, None, None, None) for any other x. The caller runs
    its kernel from the fp32 rows into the fp32 output and then _bound_result. Why scratch and
    native conversions rather than x.float() and out.to(bfloat16): at decode each tensor torch
    makes costs ~20 us of caches the weight stream has just flushed; a 64 x 4096 int4
    weight-only layer took 105-119 us a call with bf16 x, 59-64 us with fp32 x (2-core Xeon,
    benchmarks/cold_call.py). The results are those of the fp32 path rounded to bf16 as torch
    rounds (pq_f32_to_bf16)."""
    m, y = _rows_out(x, n, torch.bfloat16, _BF16_BOUND_MAX_M)
    if not m:
        return 0, None, None, None
    xf, out = _work("bf16_rows_x", m * k * 4), _work("bf16_rows_out", m * n * 4)
    module().bf16_to_f32_rows(x.data_ptr(), m, k, k, xf.data_ptr())
    return m, xf, out, y


def _bound_rows(x: torch.Tensor, n: int, k: int):
    """What a bound call sends straight to its kernel: (M, fp32 rows, fp32 output, bf16 output
    or None) for contiguous fp32 rows (x itself, a new output) or bf16 rows (_bf16_rows), of
    two or more dims; M = 0 for any other x, which takes the op's general path."""
    dt = x.dtype
    if dt is torch.float32:
        m, out = _rows_out(x, n)
        return m, x, out, None
    if dt is torch.bfloat16:
        return _bf16_rows(x, n, k)
    return 0, None, None, None


def _bound_result(out: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
    """The bound call's result: the fp32 output, or the bf16 one (_bound_rows) rounded from it
    as torch rounds."""
    if y is None:
        return out
    module().f32_to_bf16(out.data_ptr(), y.numel(), y.data_ptr())
    return y


def _bind_int8_dynamic_mm(w, w_scale, bias=None):
    """_run_int8_dynamic_mm prepared once for weights that stay the same (ops.LayerCall; see
    _sparse_float_binder): contiguous float32 or bfloat16 rows (_bound_rows) are quantized and
    multiplied with no other step, anything else (and a status other than 0) takes the op's
    general path. None where the weights would need a copy. Int8DynamicLinear on AMX keeps the
    canonical rows, so its decode comes here: 4096 x 4096, M = 1, through a LayerCall 1.04x as
    fast as through ops.call (benchmarks/decode_call_ab.py --op int8_dynamic)."""
    setup = _int8_bind_setup(w, w_scale, bias, "int8_workspace_bytes")
    if setup is None:
        return None
    n, k, ptrs, mod, sizes = setup
    return _prepared_call(
        n, k,
        _quantized_call(k, "amx", lambda isa, m, nt: max(sizes(isa, m, nt), 0),
                        lambda isa, pxq, pxs, m, out, nt, work, nwork: mod.int8_dynamic_mm(
                            isa, pxq, pxs, m, k, ptrs[0], n, ptrs[1], ptrs[2], _ptr(out), nt,
                            _ptr(work), nwork)),
        lambda x: _run_int8_dynamic_mm(x, w, w_scale, bias))


_run_int8_dynamic_mm.bind = _bind_int8_dynamic_mm


def int8_dynamic_mm(x, w, w_scale, bias=None):
    _checks.check_int8_mm("int8_dynamic_mm", x, w, w_scale, bias)
    _require_cpu("int8_dynamic_mm", x)
    return _run_int8_dynamic_mm(x, w, w_scale, bias)


def int8_codes_mm(xq, x_scale, w, w_scale, bias=None):
    """int8_dynamic_mm on activations already quantized: float32 [M, N] =
    x_scale[m] * w_scale[n] * (xq @ w.T) + bias[n]. A row-parallel shard quantizes its slice of
    x with the whole row's scale (pyquant.distributed) and then needs only this product."""
    _checks.check_int8_mm("int8_codes_mm", _check_codes("int8_codes_mm", xq, x_scale), w,
                          w_scale, bias)
    return _run_codes(xq, x_scale, w.shape[0], _int8_codes_mm, w, w_scale, bias)


def _int8_weight_only_bf16_out(x2, w, w_scale, bias):
    """bf16 rows x2 on the AMX-BF16 tiles straight into a bf16 output
    (pq_int8_weight_only_mm_bf16), or None where that path does not run them (other ISAs and
    sizes, rows that are not unit-stride, an Inf or NaN in x): no float32 copy of x and no
    float32 output converted afterwards, as for int4 weight-only (_native_panels.py)."""
    n, k = w.shape
    m = x2.shape[0]
    isa, nt, mod = current_isa(), _threads(), module()
    if (not m or x2.stride(-1) != 1 or (m > 1 and x2.stride(0) < k)
            or not mod.int8_weight_only_bf16_applies(isa, m, k, n)):
        return None
    wc, ws, b = w.contiguous(), w_scale.contiguous(), _bias_f32(bias)
    nwork = mod.int8_weight_only_workspace_bytes(isa, m, k, n, nt)
    work = _work("amx_wo", nwork)
    out = torch.empty((m, n), dtype=torch.bfloat16)
    st = mod.int8_weight_only_mm_bf16(isa, x2.data_ptr(), m, k, max(x2.stride(0), k), _ptr(wc),
                                      n, _ptr(ws), _ptr(b), _ptr(out), nt, _ptr(work), nwork)
    if st == _NOT_FINITE:  # an Inf or NaN in x: the float path propagates it
        return None
    if st:
        _raise("int8_weight_only_mm", st, M=m, N=n, K=k)
    return out


def _run_int4_weight_only_mm(x, w_packed, scales, zeros, group_size, bias=None):
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    lead, x2 = _flat(x, n)
    m = x2.shape[0]
    out = _out(m, n, x.dtype)
    if m and n:
        xf = _rows_f32(x2)
        wp, sc, zp = w_packed.contiguous(), scales.contiguous(), zeros.contiguous()
        b = _bias_f32(bias)
        isa, nt = current_isa(), _threads()
        # decode sizes on VNNI/AMX: the fixed-point path's scratch; prefill on AMX: the
        # AMX-BF16 path's (0 bytes: the float path)
        nwork = module().int4_weight_only_workspace_bytes(isa, m, k, n, group_size, nt)
        work = _work("int4wo", nwork) if nwork > 0 else None
        st = module().int4_weight_only_mm(
            isa, _ptr(xf), m, k, xf.stride(0), _ptr(wp), n, _ptr(sc), _ptr(zp),
            group_size, _ptr(b), _ptr(out), nt, _ptr(work), max(nwork, 0),
        )
        if st:
            _raise("int4_weight_only_mm", st, M=m, N=n, K=k, group_size=group_size)
    return _finish(out, x, lead, n)


def int4_weight_only_mm(x, w_packed, scales, zeros, group_size, bias=None):
    _checks.check_int4_mm("int4_weight_only_mm", x, w_packed, scales, zeros, group_size, bias)
    _require_cpu("int4_weight_only_mm", x)
    return _run_int4_weight_only_mm(x, w_packed, scales, zeros, group_size, bias)


def _int4_codes_mm(isa, pxq, pxs, m, k, w_packed, scales, zeros, group_size, bias, out):
    """The W4A8 core of int4_dynamic_mm on codes at address pxq (row scales at pxs)."""
    n = w_packed.shape[0]
    wp, sc, zp = w_packed.contiguous(), scales.contiguous(), zeros.contiguous()
    b = _bias_f32(bias)
    nt = _threads()
    nwork = module().int4_dynamic_workspace_bytes(isa, m, k, group_size, nt)
    work = _work("int4dyn", max(nwork, 4))
    st = module().int4_dynamic_mm(isa, pxq, pxs, m, k, _ptr(wp), n, _ptr(sc), _ptr(zp),
                                  group_size, _ptr(b), _ptr(out), _ptr(work), nwork, nt)
    if st:
        _raise("int4_dynamic_mm", st, M=m, N=n, K=k, group_size=group_size)


def _run_int4_dynamic_mm(x, w_packed, scales, zeros, group_size, bias=None):
    if x.dtype is torch.bfloat16:
        y = _int4_dynamic_bf16_out(x, w_packed, scales, zeros, group_size, bias)
        if y is not None:
            return y
    return _run_dynamic(x, w_packed.shape[0], w_packed.shape[1] * 2, _int4_codes_mm, w_packed,
                        scales, zeros, group_size, bias)


def _int4_dynamic_bf16_out(x, w_packed, scales, zeros, group_size, bias, panels=False):
    """bf16 x on the AMX tiles straight into a bf16 output (pq_int4_dynamic_mm_bf16; with
    panels, codes and scales in the panel layout, 64-byte aligned: ..._panels_bf16), as
    _int8_dynamic_bf16_out; None where that path does not run (other ISAs and sizes, a zero
    point above 15)."""
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    mod = module()
    wp, sc, zp = w_packed.contiguous(), scales.contiguous(), zeros.contiguous()
    b = _bias_f32(bias)
    run = mod.int4_dynamic_mm_panels_bf16 if panels else mod.int4_dynamic_mm_bf16

    def need(isa, m, nt):
        if not mod.int4_dynamic_bf16_applies(isa, m, k, n, group_size):
            return -1
        return mod.int4_dynamic_workspace_bytes(isa, m, k, group_size, nt)
    # PQ_NOT_FIXED_POINT: a zero point above 15, which the float path takes
    return _dynamic_bf16_out(
        "int4_dynamic_mm", x, n, k, "int4dyn", need,
        lambda isa, pxq, pxs, m, out, nt, work, nwork: run(
            isa, pxq, pxs, m, k, _ptr(wp), n, _ptr(sc), _ptr(zp), group_size, _ptr(b), _ptr(out),
            nt, _ptr(work), nwork),
        _NOT_FIXED_POINT, group_size=group_size)


def int4_dynamic_mm(x, w_packed, scales, zeros, group_size, bias=None):
    """W4A8: x quantized per row to int8 (as int8_dynamic_mm), exact int32 dot products per
    weight group, combined in float32 (pq.h: pq_int4_dynamic_mm)."""
    _checks.check_int4_mm("int4_dynamic_mm", x, w_packed, scales, zeros, group_size, bias)
    _checks.check_w4a8_rows_group("int4_dynamic_mm", group_size)
    _require_cpu("int4_dynamic_mm", x)
    return _run_int4_dynamic_mm(x, w_packed, scales, zeros, group_size, bias)


def int4_codes_mm(xq, x_scale, w_packed, scales, zeros, group_size, bias=None):
    """int4_dynamic_mm on activations already quantized (see int8_codes_mm): float32 [M, N]."""
    _checks.check_int4_mm("int4_codes_mm", _check_codes("int4_codes_mm", xq, x_scale),
                          w_packed, scales, zeros, group_size, bias)
    _checks.check_w4a8_rows_group("int4_codes_mm", group_size)
    return _run_codes(xq, x_scale, w_packed.shape[0], _int4_codes_mm, w_packed, scales, zeros,
                      group_size, bias)


def stream_read(buf: torch.Tensor, n_threads: Optional[int] = None) -> int:
    """Read every byte of a contiguous CPU tensor on ``n_threads`` threads (default: torch's)
    and return their XOR fold: the benchmarks' memory read-bandwidth probe (pq.h)."""
    if not isinstance(buf, torch.Tensor) or buf.device.type != "cpu" or not buf.is_contiguous():
        raise ValueError("stream_read: buf must be a contiguous CPU tensor")
    st, checksum = module().stream_read(_ptr(buf), buf.numel() * buf.element_size(),
                                        n_threads or _threads())
    if st:
        _raise("stream_read", st, bytes=buf.numel() * buf.element_size())
    return checksum

PEAK_UNITS = ("fp32", "bf16", "int8")


def probe_peak(unit: str, n_threads: Optional[int] = None,
               iters: int = 2_000_000) -> Optional[float]:
    """Ops per second (multiply and add counted apart) that the vector unit ``unit`` ("fp32":
    FMA, "bf16": bf16 dot product, "int8": u8 x s8 dot product) retires on ``n_threads``
    threads (default: torch's), from a register-only loop of independent chains: the
    benchmarks' instruction peak (pq.h). None when this CPU has no vector instruction for it."""
    if unit not in PEAK_UNITS:
        raise ValueError(f"probe_peak: unit {unit!r} is not one of {', '.join(PEAK_UNITS)}")
    if iters < 1:
        raise ValueError(f"probe_peak: iters={iters}; give at least 1")
    m = module()
    code = {"fp32": m.PEAK_FP32, "bf16": m.PEAK_BF16, "int8": m.PEAK_INT8}[unit]
    st, ops = m.probe_peak(code, iters, n_threads or _threads())
    if st == _ERR_ISA:
        return None
    if st:
        _raise("probe_peak", st, unit=unit, iters=iters)
    return ops

# ------------------------------------------------------- sparse ops (layouts: sparse_formats.py)

_VALUE_DTYPES = {torch.float32: "DTYPE_F32", torch.bfloat16: "DTYPE_BF16",
                 torch.float16: "DTYPE_F16"}


def _value_dtype(values: torch.Tensor) -> int:
    """The pq_dtype code of stored float values: the kernels read them as stored (bf16/fp16
    halve the bytes) and widen them in registers."""
    return getattr(module(), _VALUE_DTYPES[values.dtype])


# Break-even of the sparse ops on the CPU: from this many activation rows on, decompressing the
# weight (pq_sparse24_decompress / pq_sparse24_int4_decompress / pq_sparse_unstructured_decompress)
# and running a dense GEMM beats
# the gather kernels, whose cost grows with M like FMA loops do. "bf16": bf16 values and
# activations (oneDNN's bf16 GEMM on AMX); "fp32": any other dtypes (an fp32 GEMM for float
# values; the int8/int4 weight-only kernels for int8/int4 values). Measured on a 2-core Xeon with
# AMX, 2 threads, 4096 x 4096 / 4096 x 11008 (sparse time / dense time; below 1 the sparse kernel is faster):
#   float, bf16 x:  0.83 / 0.65 at 16, 1.16 / 1.17 at 32, 2.01 / 2.39 at 64 (the per-ISA
#                   decompression, sparse_decompress.h: 4096 x 4096 bf16 1.2-2 ms; 8 ms with the
#                   scalar loop, when 32 measured 0.67 / 0.84)
#   float, fp32 x:  0.71 / 1.31 at 256 (and 1.25 at 512 on 4096 x 4096)
#   int8:           0.44 / 0.46 at 8, 1.25 / 1.22 at 16, 1.84 / 1.42 at 32 (decompression
#                   1.1-2.2 ms for 4096 x 4096, 7.5 ms scalar, when 32 measured 0.82 / 0.88;
#                   dense int8 weight-only from M = 16 runs the int8 tiles on fixed-point
#                   activations)
#   int4 g128:      1.13-1.18 / 0.89-1.03 at 8, 1.44-1.48 / 0.91-0.96 at 16, 1.46-2.33 /
#                   1.32-1.52 at 32 (decompression 0.34 ms for 4096 x 4096 with AVX512, 7.5 ms
#                   scalar, when 64 measured 1.29 / 1.03)
#   unstructured 70% (pq_sparse_unstructured_decompress, per ISA: 4096 x 4096 bf16 3.4 ms with
#                   AVX512 expands, 16.6 ms scalar): bf16 x 0.68-0.80 / 1.16 at 8, 1.41-1.80 /
#                   1.75-1.83 at 16; fp32 x 0.68-0.81 / 0.65-0.71 at 16, 1.15 / 0.98-1.08 at 32,
#                   1.74 / 1.47 at 64 (scalar decompression: bf16 x 1.44 / 1.95 at 64, fp32 x
#                   0.93 / 1.20 at 128)
# The dense path keeps the ops' arithmetic: exact products summed in fp32, one rounding.
SPARSE_DENSE_MIN_M = {("sparse24_mm", "bf16"): 32, ("sparse24_mm", "fp32"): 512,
                      ("sparse24_int8_mm", "fp32"): 16, ("sparse24_int4_mm", "fp32"): 16,
                      ("sparse_unstructured_mm", "bf16"): 16,
                      ("sparse_unstructured_mm", "fp32"): 32,
                      # the 4-row panels (pyquant/sparse_panels.py; the AVX512 levels only)
                      ("sparse24_int8_mm_panels", "fp32"): 16,
                      ("sparse24_int4_mm_panels", "fp32"): 16}
# Where the break-even of a CPU level differs. avx512_bf16, measured on a 2-core Zen 4 (EPYC), 2
# threads, 4096 x 4096 / 4096 x 11008 (benchmarks/sparse_break_even.py --ms 4,8,12,16 and
# --ms 12,16,24,32,48), with the dense paths of now: the dense int8/int4 kernels on fixed-point
# tiles, the 2:4 meta masks in vector registers (VBMI; 2:4 int8 decompression 0.41 ms for
# 4096 x 4096), and the bf16 weights (2:4 and unstructured) decompressed into per-thread bf16
# panels instead of a dense copy for oneDNN (pq_sparse24_bf16_panels_mm; 4096 x 4096 against
# bf16 F.linear, M = 32 / 128 / 512: 2:4 0.95x / 0.96x / 1.00x where the dense copy gave
# 0.76x / 0.89x / 0.97x, unstructured 0.91x / 0.95x / 1.00x where it gave 0.76x / 0.88x /
# 0.98x):
#   int8:           0.47 / 0.53 at 8, 0.92 / 0.78 at 12, 1.07 / 0.92 at 16, 1.14 / 1.02 at 24
#   int4 g128:      0.90 / 0.88 at 8, 1.01 / 0.96 at 12, 1.10 / 1.05 at 16, 1.26 / 1.19 at 24
#   float, bf16 x:  0.81 / 0.91 at 8, 1.05 / 1.17 at 12, 1.16 / 1.38 at 16
#   unstructured 70%, bf16 x: 0.52 / 1.38 at 4, 0.91 / 2.21 at 8, 2.80 / 2.92 at 12
# (An earlier run, before the fixed-point tiles and the panels, kept the int8/int4 gathers
# ahead up to M = 63, the 2:4 bf16 one up to 31 and the unstructured one up to 15.)
# The 2:4 + int8 / int4 layers keep 4-row panels on this level (pyquant/sparse_panels.py), whose
# kernels run fixed-point int8 dot products up to M = 32 and decompress straight from the
# panels; same script, same machine (sparse / dense, 4096 x 4096 / 4096 x 11008):
#   int8 panels:    0.87 / 0.45 at 8, 0.85 / 0.71 at 16, 0.92 / 0.95 at 24, 1.01 / 1.03 at 32
#   int4 g128 panels: 0.87 / 0.69 at 8, 1.01 / 0.91 at 16, 1.07 / 1.00 at 24, 1.15 / 1.15 at 32
# Unstructured bf16 with its narrowed copy of x up to 131072 values, the vpexpandw loop and the
# unstructured decompression a word at a time (its dense path 1.15x faster at M = 16), same
# machine, two threads, sparse / dense (4096 x 4096 / 4096 x 11008):
#   0.50 / 0.73 at 4, 0.92 / 1.00 at 6, 1.05 / 1.07 at 8, 1.17 / 1.31 at 10
# (before those changes: 0.85 / 0.87 at 8, 0.83 / 1.03 at 10, 1.09 at 12 on 4096 x 4096).
# Unstructured fp32 values with float32 x, the float loop's expand loads (its four expands of a
# word to four registers, two accumulator sets from two rows of x on), same script:
#   0.68 / 0.71 at 24, 0.79 / 0.83 at 32, 0.93 / 0.92 at 40, 1.01 / 1.06 at 48
# (with four accumulator sets at every M: 1.06 / 1.14 at 32).
# avx2 and avx512_vnni: the unstructured kernels' table-driven placement on AVX2 (tile_sparse.h;
# it was a set-bit walk), the float loop's expand loads on AVX512, and the unstructured
# decompression through tables where no 16-bit expand exists (4096 x 4096 bf16: 7.8 -> 1.4 ms
# on avx2, 8.2 -> 1.3 ms on avx512_vnni). Measured on the same Zen 4 running those builds
# (PYQUANT_CPU_ISA), fp32 values and float32 x, sparse / dense, 4096 x 4096 / 4096 x 11008:
#   avx2:         0.84 / 0.94 at 32, 1.08 / 1.16 at 48
#   avx512_vnni:  0.78 / 0.88 at 48, 0.95 / 1.22 at 64, 0.88 / 1.33 at 96
# The dense GEMM there is torch's, on this CPU's AVX512 kernels: on a CPU with AVX2 only it is
# slower, so these are the lowest the break-evens can be there. bf16 x keeps the default
# table: torch's bf16 GEMM ran on AVX512-BF16 units that those CPUs lack (sparse / dense came
# out 1.2-1.4 at M = 8 on avx2 here), so this machine cannot say where it lies on them.
# 2:4 + int8 / int4, whose dense side is pyquant's own int8 / int4 weight-only kernels of the
# same level (so these hold there), with the 2:4 decompression through kLut24
# (sparse_decompress.h; int8 3.0 -> 0.6 ms for 4096 x 4096 on both levels):
#   avx2 int8:         0.82 / 0.62 at 2, 1.03 / 0.90 at 4, 1.17 / 1.08 at 6, 1.31 / 1.26 at 8
#   avx2 int4 g128:    0.85 / 0.87 at 4, 0.98 / 1.00 at 8, 1.02 / 1.04 at 12, 1.06 / 1.07 at 16
#                      (with the AVX2 2:4 + int4 decompression, 4.7 -> 0.6 ms; when it was
#                      scalar the sparse kernel stayed ahead up to M = 64)
#   (then the AVX2 2:4 kernels took their x gather controls from a table, kGather24 in
#   tile_sparse.h: 1.06-1.26x at M = 1 and 1.26-1.39x at M = 4; re-measured on a Granite
#   Rapids running the avx2 build:
#   avx2 int8:         1.03 / 0.90 at 6, 1.09 / 0.99 at 8, 1.24 / 1.16 at 12
#   avx2 int4 g128:    0.93 / 0.88 at 8, 0.88 / 0.98 at 12, 0.94 / 1.04 at 16;
#   then AVX2 int4 weight-only dequantized its weight per chunk from M = 8 (kernels.cpp) and
#   the 2:4 kernels prefetched, on a Xeon with AMX running the avx2 build, two runs of
#   --ms 8,9,10,11,12,14:
#   avx2 int4 g128:    0.98 / 0.82-0.85 at 8, 1.12-1.13 / 0.90-0.98 at 9, 1.10-1.12 /
#                      0.95-0.98 at 10, 1.24-1.25 / 1.00-1.07 at 11, 1.22-1.24 / 1.04 at 12
#   avx2 int8:         1.09-1.15 / 1.09 at 8: its 8 holds)
#   avx512_vnni int8:  0.99 / 0.83 at 16, 1.07 / 0.97 at 24, 1.16 / 1.10 at 32
#   avx512_vnni int4:  0.98 / 0.78 at 8, 1.15 / 0.99 at 16 (the default 16 holds)
# avx512_amx, measured on a 2-core Intel Xeon with AMX (Granite Rapids), 2 threads, same script
# (--ms 4..48, then --ms 6,8,10,12,14,16,20,24 --reps 9 twice), sparse / dense, 4096 x 4096 /
# 4096 x 11008 (the dense side: bf16 on AMX tiles, int8/int4 pyquant's AMX kernels):
#   2:4 bf16, bf16 x:  0.96-0.99 / 0.76-0.77 at 16, 1.10-1.14 / 0.90-0.91 at 20, 1.30-1.34 /
#                      1.14-1.15 at 24 (the default 32 ran 1.3x slower than dense at 24-31)
#   int4 g128 panels:  0.95-1.03 / 0.84-0.90 at 12, 1.18-1.21 / 1.01-1.02 at 14, 1.25-1.31 /
#                      0.95-1.05 at 16
#   int4 g128 rows:    0.64 / 0.67 at 4, 0.96-1.07 at 6, 1.12-1.30 at 8 (the rows layout runs
#                      only where the panels do not apply)
#   unstructured 70%, bf16 x: 0.75-0.82 / 0.58-0.60 at 8, 0.98-1.03 / 0.78-0.79 at 10,
#                      1.08-1.17 / 1.11-1.16 at 12
# and the default entries hold: int8 panels 0.60-0.67 / 0.58-0.61 at 14, 1.45 / 1.22-1.31 at 16;
# int8 rows 0.81 / 0.74-0.77 at 14, 1.9 / 1.8 at 16; unstructured fp32 0.95 / 0.74 at 24,
# 1.16 / 0.93 at 32, 1.45 / 1.40 at 48.
# The int8 panels then took both pairs of a quad a pass at M > 1 (sparse.cpp, panel24_fx_quad;
# 1.24-1.70x at M = 2-16), and on a 2-core Zen 5 (EPYC), same script, --ms 16,24,32, ran
#   int8 panels:       0.57 / 0.69 at 16, 0.69 / 0.83 at 24, 0.87 / 0.89 at 32
# so they keep the sparse kernel up to the 32 rows of x their workspace takes (33: never dense
# below it).
# avx512_vnni's 4-row panels (the kernels of avx512_bf16, built without VBMI), measured on a
# 2-core Zen 5 (EPYC) running that level (PYQUANT_CPU_ISA=avx512_vnni), 2 threads, same script,
# --ms 10,12,16,20 --reps 9, sparse / dense, 4096 x 4096 / 4096 x 11008:
#   int8 panels:       0.75 / 0.57 at 10, 0.86 / 0.87 at 12, 1.00 / 0.95 at 16, 1.11 / 1.06 at 20
#   int4 g128 panels:  0.94 / 0.75 at 10, 1.13 / 1.01 at 12, 1.17 / 1.11 at 16, 1.54 / 1.24 at 20
# and with the int8 panels' both-pairs loop (--ms 16,24,32):
#   int8 panels:       0.59 / 0.60 at 16, 0.70 / 0.70 at 24, 0.89 / 0.85 at 32 (as avx512_bf16)
# and with the int4 panels' both-pairs loop too (--ms 12,16,24,32), avx512_vnni / avx512_bf16:
#   int4 g128 panels:  0.64 / 0.63 at 12, 0.75 / 0.70 at 16, 0.86 / 0.86 at 24, 0.92 / 1.02 at 32
#                      / 0.81 / 0.71 at 16, 0.94 / 0.87 at 24, 0.99 / 0.87 at 32
# so both keep the sparse kernel up to their workspace's 32 rows there too. On a 2-core Zen 4
# (avx512_bf16, double-pumped 512-bit units), same script, --ms 8,16,24,32 --reps 5:
#   int8 panels:       0.36 / 0.38 at 8, 0.58 / 0.56 at 16, 0.67 / 0.66 at 24, 0.76 / 0.79 at 32
#   int4 g128 panels:  0.61 / 0.54 at 8, 0.80 / 0.76 at 16, 0.95 / 0.88 at 24, 1.04 / 1.05 at 32
# int4 crosses near 30 there: 5% at most lost at M = 30-32, against 1-13% won at 32 on the Zen 5,
# so the one table of this level keeps 33.
SPARSE_DENSE_MIN_M_BY_ISA = {
    "avx2": {**SPARSE_DENSE_MIN_M, ("sparse_unstructured_mm", "fp32"): 48,
             ("sparse24_int8_mm", "fp32"): 8, ("sparse24_int4_mm", "fp32"): 10},
    "avx512_vnni": {**SPARSE_DENSE_MIN_M, ("sparse_unstructured_mm", "fp32"): 64,
                    ("sparse24_int8_mm", "fp32"): 24, ("sparse24_int8_mm_panels", "fp32"): 33,
                    ("sparse24_int4_mm_panels", "fp32"): 33},
    "avx512_bf16": {**SPARSE_DENSE_MIN_M, ("sparse24_mm", "bf16"): 12,
                    ("sparse24_int8_mm", "fp32"): 24, ("sparse24_int4_mm", "fp32"): 16,
                    ("sparse_unstructured_mm", "bf16"): 8,
                    ("sparse_unstructured_mm", "fp32"): 48,
                    ("sparse24_int8_mm_panels", "fp32"): 33,
                    ("sparse24_int4_mm_panels", "fp32"): 33},
    "avx512_amx": {**SPARSE_DENSE_MIN_M, ("sparse24_mm", "bf16"): 20,
                   ("sparse24_int4_mm", "fp32"): 6, ("sparse_unstructured_mm", "bf16"): 12,
                   ("sparse24_int4_mm_panels", "fp32"): 14},
}


def sparse_dense_min_m() -> dict:
    """{(op, kind): M}: the break-even table of the CPU level the kernels run with."""
    return SPARSE_DENSE_MIN_M_BY_ISA.get(ISA_NAMES[current_isa()], SPARSE_DENSE_MIN_M)


def sparse_dense_reason(op: str, m: int, kind: str = "fp32") -> Optional[str]:
    """Why ``op`` at M = m runs dense from its compressed weight (None: the sparse kernel)."""
    lim = sparse_dense_min_m().get((op, kind))
    if lim is not None and m >= lim:
        return (f"M={m} >= {lim}: decompressing the weight and a dense GEMM beat the sparse "
                f"kernel")
    return None


def _bf16_path(x: torch.Tensor, w: torch.Tensor, bias) -> bool:
    return x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and (
        bias is None or bias.dtype == torch.bfloat16)




def _scratch(dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols] of a per-thread buffer grown to the largest layer (``_work`` without the
    cap): a fresh 32 MB tensor costs more in first-touch page faults than decompressing into
    it (measured: 24 ms against ~3 ms for 4096 x 4096 bf16). The dense copy lives only for the
    GEMM that follows it."""
    nbytes = rows * cols * torch.empty(0, dtype=dtype).element_size()
    return _work(("dense", dtype), nbytes, cap=False)[:nbytes].view(dtype).view(rows, cols)


def _decompress_24(values: torch.Tensor, meta: torch.Tensor) -> Optional[torch.Tensor]:
    """Dense [N, K] in values' dtype, or None when meta is not canonical (duplicate positions
    add up in the ops, which a dense copy cannot express: the sparse kernel runs then)."""
    n, k = values.shape[0], values.shape[1] * 2
    v, mt = values.contiguous(), meta.contiguous()
    dense = _scratch(v.dtype, n, k)
    st = module().sparse24_decompress(current_isa(), _ptr(v), v.element_size(), _ptr(mt), n, k,
                                      _ptr(dense), _threads())
    return None if st else dense


def _decompress_unstructured(bitmask, values, row_offsets, k: int) -> Optional[torch.Tensor]:
    """Dense [N, K] in values' dtype (scratch), or None when the weight is inconsistent."""
    n = bitmask.shape[0]
    bm, v, off = bitmask.contiguous(), values.contiguous(), row_offsets.contiguous()
    dense = _scratch(v.dtype, n, k)
    st = module().sparse_unstructured_decompress(current_isa(), _ptr(bm), _ptr(v),
                                                 v.element_size(), v.numel(), _ptr(off), n, k,
                                                 _ptr(dense), _threads())
    return None if st else dense


def _sparse_fx_work(isa: int, m: int, k: int):
    """Scratch of the 2:4 + int8/int4 decode path (pq.h), or (None, 0) where it does not run."""
    nbytes = module().sparse24_workspace_bytes(isa, m, k)
    return (_work("sparse_fx", nbytes), nbytes) if nbytes > 0 else (None, 0)


def _decompress_24_int4(packed: torch.Tensor, meta: torch.Tensor, zeros: torch.Tensor,
                        group_size: int) -> Optional[torch.Tensor]:
    """Dense packed int4 codes [N, K/2] (pruned positions hold their group's zero point: the
    dense weight with group size 2 * group_size over K), or None when meta is not canonical or
    a zero point is past 15 (a pruned position's nibble cannot hold it)."""
    n, k = packed.shape[0], packed.shape[1] * 4
    p, mt, z = packed.contiguous(), meta.contiguous(), zeros.contiguous()
    dense = _scratch(torch.uint8, n, k // 2)
    st = module().sparse24_int4_decompress(current_isa(), _ptr(p), _ptr(mt), n, k, _ptr(z),
                                           group_size, _ptr(dense), _threads())
    return None if st else dense


def _dense_float_linear(x2: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    """x2 @ w.T + bias in x2's dtype, with exact products, fp32 sums (bias included) and one
    rounding, as the ops promise: bf16 x bf16 (and a bf16 or no bias) runs oneDNN's bf16 GEMM,
    which accumulates in fp32 and rounds once; everything else an fp32 GEMM."""
    if _bf16_path(x2, w, bias):
        return torch.nn.functional.linear(x2, w, bias)
    b = None if bias is None else bias.to(torch.float32)
    return torch.nn.functional.linear(x2.float(), w.float(), b).to(x2.dtype)


def _bf16_panels(x2: torch.Tensor, n: int, bias, run) -> Optional[torch.Tensor]:
    """The dense bf16 path of a sparse op without a dense copy of the weight (each thread
    decompresses 32 rows at a time into bf16 panels; pq.h: pq_sparse24_bf16_panels_mm):
    float32 [M, N], or None where it does not run (another build, K % 32, an inconsistent
    weight), and the caller decompresses the whole weight instead. run(isa, x, bias, out,
    work, work bytes, threads) calls the op's native entry with those addresses."""
    m, k = x2.shape
    isa, nt = current_isa(), _threads()
    nwork = module().sparse_bf16_panels_workspace_bytes(isa, m, k, nt)
    if nwork < 0:
        return None
    xf = x2.to(torch.float32).contiguous()  # bf16 values widened exactly; narrowed back there
    b = _bias_f32(bias)
    out = torch.empty((m, n), dtype=torch.float32)
    work = _work("sparse_bf16", nwork, cap=False)
    st = run(isa, _ptr(xf), _ptr(b), _ptr(out), _ptr(work), nwork, nt)
    return None if st else out


def _sparse24_bf16_panels(x2, values, meta, bias) -> Optional[torch.Tensor]:
    n, k = values.shape[0], x2.shape[1]
    v, mt = values.contiguous(), meta.contiguous()
    return _bf16_panels(x2, n, bias, lambda isa, px, pb, po, pw, nw, nt: module()
                        .sparse24_bf16_panels_mm(isa, px, x2.shape[0], k, k, _ptr(v), _ptr(mt),
                                                 n, pb, po, pw, nw, nt))


def _unstructured_bf16_panels(x2, bitmask, values, row_offsets, bias) -> Optional[torch.Tensor]:
    n, k = bitmask.shape[0], x2.shape[1]
    bm, v, off = bitmask.contiguous(), values.contiguous(), row_offsets.contiguous()
    return _bf16_panels(x2, n, bias, lambda isa, px, pb, po, pw, nw, nt: module()
                        .sparse_unstructured_bf16_panels_mm(isa, px, x2.shape[0], k, k, _ptr(bm),
                                                            _ptr(v), v.numel(), _ptr(off), n,
                                                            pb, po, pw, nw, nt))


def sparse24_mm(x, values, meta, bias=None):
    _checks.check_sparse24_mm("sparse24_mm", x, values, meta, bias)
    _require_cpu("sparse24_mm", x)
    return _run_sparse24_mm(x, values, meta, bias)


def _sparse_float_binder(op: str, prepare, run, other_path=None, other_min_m: int = 1 << 62):
    """run(x, *w), the op, with run.bind(*w) (ops.LayerCall: a call prepared once for weights
    that stay the same). prepare(*w) -> (n, value dtype, bias, native, copied): native(isa, x
    rows address, M, K, out, threads) the kernel's call on the weights as prepared, copied
    whether any of them is a copy (bind then declines: a write in place to the weights would
    miss it). The bound call sends contiguous float32 or bfloat16 rows below the op's dense
    break-even straight to the kernel (bf16 rows as float32, as the general path:
    _bound_rows), anything else to run. 2:4 bf16 at 4096 x 4096, M = 1: through a LayerCall
    1.05-1.06x as fast as through ops.call (benchmarks/decode_call_ab.py --op sparse24_bf16).
    other_path(m, kind, K, *w), where given, sends more sizes from other_min_m rows on to run
    (the sparse GEMMs'); below that (decode) it is not called."""
    def bind(*w):
        n, vdtype, bias, native, copied = prepare(*w)
        if copied:
            return None
        bf16 = vdtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16)

        def bound(x):
            m, xf, out, y = _bound_rows(x, n, x.shape[-1])
            if m:
                kind = "bf16" if bf16 and y is not None else "fp32"
                if not sparse_dense_reason(op, m, kind) and (
                        m < other_min_m or not other_path(m, kind, x.shape[-1], *w)):
                    if native(current_isa(), xf.data_ptr(), m, x.shape[-1], out, _threads()) == 0:
                        return _bound_result(out, y)
            return run(x, *w)
        return bound

    run.bind = bind
    return run


def _sparse24_float_prepare(values, meta, bias=None):
    n = values.shape[0]
    # every tensor whose address crosses over is held by the call until it returns
    v, mt, b = values.contiguous(), meta.contiguous(), _bias_f32(bias)
    ptrs, vd = (_ptr(v), _ptr(mt), _ptr(b)), _value_dtype(v)

    def native(isa, px, m, k, out, nt, _hold=(v, mt, b)):
        return module().sparse24_mm(isa, px, m, k, k, ptrs[0], vd, ptrs[1], n, ptrs[2],
                                    _ptr(out), nt)
    return n, values.dtype, bias, native, not (v is values and mt is meta and b is bias)


# 2:4 float weights against float32 rows of x take the 2:4 GEMM (pq_sparse24_gemm, only the
# kept products; AVX512 builds; csrc/cpu/tile_sparse24_gemm.h) from SPARSE24_GEMM_MIN_M on, at
# every M: there it beats both the row kernel and the dense path (decompress, fp32 F.linear),
# so the dense break-even above is left only to x that the GEMM hands back (Inf or NaN).
# Measured (benchmarks/sparse_break_even.py, 2 threads, Granite Rapids; time of the GEMM over
# the row kernel's, 4096 x 4096 / 4096 x 11008): 1.00 / 1.15 at M = 12, 0.98 / 1.01 at 16,
# 0.88 / 0.91 at 18, 0.83 / 0.91 at 20, 0.80 / 0.82 at 24; on the avx512_vnni and avx512_bf16
# builds forced on the same CPU 0.95 / 1.09 and 1.03 / 0.92 at 18, 0.89-0.93 at 20. Over the
# dense path 0.3-0.4 at M = 16-28. Against fp32 F.linear on the dense weight (pyquant bench
# --ms 64 and --ms 128,512,1024): 1.26-1.42x at M = 64, 1.16-1.23x at 128, 1.07-1.13x at 512,
# 1.01-1.08x at 1024, where the dense path ran 0.86-0.99x (same process without rotation, the
# other two builds at 1024: 1.01-1.14x).
SPARSE24_GEMM_MIN_M = 20


def sparse24_gemm_applies(m: int, kind: str = "fp32") -> bool:
    """2:4 float weights at M = m with activations of ``kind`` run the 2:4 GEMM (at every M
    from SPARSE24_GEMM_MIN_M: where it exists, the op's dense break-even is only for x that
    the GEMM hands back)."""
    return kind == "fp32" and m >= SPARSE24_GEMM_MIN_M and _has_sparse_gemm()


# Rows of x per sparse GEMM call: the unstructured GEMM's workspace holds the call's x
# transposed, kept per thread past _SCRATCH_MAX_BYTES (as the dense path's copy of the weight,
# which it replaces), so a long prompt runs in slabs of this many rows and leaves at most
# 1024 x K floats behind (45 MB at K = 11008), not its whole size. Each slab reads the weight
# once per 128 rows, as one call does. (The 2:4 GEMM's workspace is 512 KiB a thread whatever
# the rows; it runs in the same slabs, each reading the weight once per block of up to 960 rows.)
SPARSE_GEMM_MAX_ROWS = 1024


def _sparse_gemm_slabs(x2, out, call, query: str = "sparse_gemm_workspace_bytes") -> int:
    """call(isa, x rows (float32), m, k, out rows, work, work_bytes, threads) over slabs of
    SPARSE_GEMM_MAX_ROWS rows of x2 and out, with the workspace the native ``query`` asks for
    (the unstructured GEMM's, or sparse24_gemm_workspace_bytes); the first nonzero status, or
    0."""
    m, k = x2.shape
    isa, nt = current_isa(), _threads()
    rows = min(m, SPARSE_GEMM_MAX_ROWS)
    nwork = getattr(module(), query)(isa, rows, k, nt)
    work = _work(query, nwork, cap=False)
    for m0 in range(0, m, rows):
        xs = _rows_f32(x2[m0:m0 + rows])
        st = call(isa, xs, xs.shape[0], k, out[m0:m0 + rows], work, nwork, nt)
        if st:
            return st
    return 0


def _sparse24_gemm(x2, values, meta, bias, out) -> int:
    """pq_sparse24_gemm into out (float32 [M, N]); its status."""
    v, mt, b = values.contiguous(), meta.contiguous(), _bias_f32(bias)
    return _sparse_gemm_slabs(x2, out, lambda isa, xs, m, k, o, work, nwork, nt: (
        module().sparse24_gemm(isa, _ptr(xs), m, k, xs.stride(0), _ptr(v), _value_dtype(v),
                               _ptr(mt), values.shape[0], _ptr(b), _ptr(o), _ptr(work), nwork,
                               nt)), "sparse24_gemm_workspace_bytes")


def _run_sparse24_mm(x, values, meta, bias=None):
    n, k = values.shape[0], values.shape[1] * 2
    lead, x2 = _flat(x, n)
    m = x2.shape[0]
    kind = "bf16" if _bf16_path(x2, values, bias) else "fp32"
    if m and n and k and sparse24_gemm_applies(m, kind):
        out = _out(m, n, x.dtype)
        # else x holds an Inf or NaN: the paths that ran these sizes before the GEMM take it
        # (the row kernel, which forms no 0 * Inf either, and the dense path from its break-even)
        if _sparse24_gemm(x2, values, meta, bias, out) == 0:
            return _finish(out, x, lead, n)
    dense = sparse_dense_reason("sparse24_mm", m, kind) if m and n else None
    if dense:
        y = _sparse24_bf16_panels(x2, values, meta, bias) if kind == "bf16" else None
        if y is not None:
            return y.to(x.dtype).reshape(*lead, n)
        w = _decompress_24(values, meta)
        if w is not None:
            return _dense_float_linear(x2, w, bias).reshape(*lead, n)
    out = _out(m, n, x.dtype)
    if m and n:
        xf = _rows_f32(x2)
        v, mt = values.contiguous(), meta.contiguous()
        b = _bias_f32(bias)
        st = module().sparse24_mm(
            current_isa(), _ptr(xf), m, k, xf.stride(0), _ptr(v), _value_dtype(v), _ptr(mt), n,
            _ptr(b), _ptr(out), _threads(),
        )
        if st:
            _raise("sparse24_mm", st, M=m, N=n, K=k, values=v.dtype)
    return _finish(out, x, lead, n)


_sparse_float_binder("sparse24_mm", _sparse24_float_prepare, _run_sparse24_mm,
                     lambda m, kind, k, *w: sparse24_gemm_applies(m, kind),
                     SPARSE24_GEMM_MIN_M)


def sparse24_int8_mm(x, values_q, meta, scale, bias=None):
    _checks.check_sparse24_int8_mm("sparse24_int8_mm", x, values_q, meta, scale, bias)
    _require_cpu("sparse24_int8_mm", x)
    return _run_sparse24_int8_mm(x, values_q, meta, scale, bias)


def _run_sparse24_int8_mm(x, values_q, meta, scale, bias=None):
    n, k = values_q.shape[0], values_q.shape[1] * 2
    lead, x2 = _flat(x, n)
    m = x2.shape[0]
    if m and n and sparse_dense_reason("sparse24_int8_mm", m):
        wq = _decompress_24(values_q, meta)
        if wq is not None:  # dense int8 codes: the int8 weight-only kernels (AMX tiles)
            return int8_weight_only_mm(x, wq, scale, bias)
    out = _out(m, n, x.dtype)
    if m and n:
        xf = _rows_f32(x2)
        v, mt, s = values_q.contiguous(), meta.contiguous(), scale.contiguous()
        b = _bias_f32(bias)
        isa = current_isa()
        work, nwork = _sparse_fx_work(isa, m, k)
        st = module().sparse24_int8_mm(
            isa, _ptr(xf), m, k, xf.stride(0), _ptr(v), _ptr(mt), n, _ptr(s), _ptr(b),
            _ptr(out), _threads(), _ptr(work), nwork,
        )
        if st:
            _raise("sparse24_int8_mm", st, M=m, N=n, K=k)
    return _finish(out, x, lead, n)


def sparse24_int4_mm(x, packed, meta, scales, zeros, group_size, bias=None):
    _checks.check_sparse24_int4_mm("sparse24_int4_mm", x, packed, meta, scales, zeros,
                                   group_size, bias)
    _require_cpu("sparse24_int4_mm", x)
    return _run_sparse24_int4_mm(x, packed, meta, scales, zeros, group_size, bias)


def _run_sparse24_int4_mm(x, packed, meta, scales, zeros, group_size, bias=None):
    n, k = packed.shape[0], packed.shape[1] * 4
    lead, x2 = _flat(x, n)
    m = x2.shape[0]
    if m and n and sparse_dense_reason("sparse24_int4_mm", m):
        dense = _decompress_24_int4(packed, meta, zeros, group_size)
        if dense is not None:  # dense int4 codes: the int4 weight-only kernels (AMX tiles)
            return _run_int4_weight_only_mm(x, dense, scales.contiguous(), zeros.contiguous(),
                                            2 * group_size, bias)
    out = _out(m, n, x.dtype)
    if m and n:
        xf = _rows_f32(x2)
        p, mt = packed.contiguous(), meta.contiguous()
        sc, zp = scales.contiguous(), zeros.contiguous()
        b = _bias_f32(bias)
        isa = current_isa()
        work, nwork = _sparse_fx_work(isa, m, k)
        st = module().sparse24_int4_mm(
            isa, _ptr(xf), m, k, xf.stride(0), _ptr(p), _ptr(mt), n, _ptr(sc),
            _ptr(zp), group_size, _ptr(b), _ptr(out), _threads(), _ptr(work), nwork,
        )
        if st:
            _raise("sparse24_int4_mm", st, M=m, N=n, K=k, group_size=group_size)
    return _finish(out, x, lead, n)


def sparse_unstructured_mm(x, bitmask, values, row_offsets, bias=None):
    """The kernel checks each row's offsets against its bitmask, before reading its values
    or, where no bitmask could take a read past the values, right after (pq.h); an
    inconsistent weight is reported with sparse_formats' diagnosis."""
    op = "sparse_unstructured_mm"
    _checks.check_sparse_unstructured_mm(op, x, bitmask, values, row_offsets, bias)
    _require_cpu(op, x)
    return _run_sparse_unstructured_mm(x, bitmask, values, row_offsets, bias)


# The unstructured GEMM (pq_sparse_unstructured_gemm, csrc/cpu/tile_sparse_outer.h; AVX512
# builds): only the kept products, float32 sums, for any stored float values against float32
# rows of x (kind "fp32"). Measured on a 2-core Xeon with AMX (Granite Rapids), 2 threads,
# against the row kernels, decompression + F.linear and fp32 F.linear on the dense weight
# (times over the GEMM's, 4096 x 4096 / 4096 x 11008):
#   30% kept: rows 0.95 / 0.90 at M = 12, 1.23 / 1.24 at 16; dense 2.6 / 2.5 at 16, 1.9 / 1.9 at
#             128, 1.6 / 1.5 at 1024 (F.linear alone 1.8 / 1.5 at 16, 1.9 / 1.9 at 128, 1.5 /
#             1.4 at 1024)
#   50% kept: rows 0.88 / 0.99 at 16; dense 1.6 / 1.65 at 128, 1.03 / 0.99 at 1024
#   70% kept: rows 0.60 / 0.43 at 16; dense 1.08 / 1.14 at 128 (F.linear alone 0.85 / 0.91)
# The GEMM's time grows with the kept values, the row kernels' with M: they break even near
# M = 44 x the kept share (13 at 30%, 20 at 50%, 30 at 70%). So it runs from that M (at least
# 14, the smallest measured) on weights at most half kept; denser ones keep the table above.
UNSTRUCTURED_GEMM_MAX_KEPT = 0.5
UNSTRUCTURED_GEMM_M_PER_KEPT = 44
UNSTRUCTURED_GEMM_MIN_M = 14
_gemm_isas: dict = {}


def _has_sparse_gemm() -> bool:
    """The CPU level in use has the sparse GEMMs (pq_sparse_gemm_workspace_bytes >= 0)."""
    isa = current_isa()
    has = _gemm_isas.get(isa)
    if has is None:
        has = _gemm_isas[isa] = (
            available() and module().sparse_gemm_workspace_bytes(isa, 1, 1, 1) >= 0)
    return has


def unstructured_gemm_from_m(kept: float) -> Optional[int]:
    """The batch size from which an unstructured weight with this share of its values kept,
    against float32 activations, runs the unstructured GEMM on the CPU level in use (None:
    never, a weight over half kept or a build without the GEMM)."""
    if not _has_sparse_gemm() or kept > UNSTRUCTURED_GEMM_MAX_KEPT:
        return None
    return max(UNSTRUCTURED_GEMM_MIN_M, -int(-UNSTRUCTURED_GEMM_M_PER_KEPT * kept // 1))


def _unstructured_gemm_applies(m: int, kind: str, k: int, bitmask, values, *_) -> bool:
    if kind != "fp32" or m < UNSTRUCTURED_GEMM_MIN_M:
        return False
    lim = unstructured_gemm_from_m(values.numel() / max(bitmask.shape[0] * k, 1))
    return lim is not None and m >= lim


def _unstructured_gemm(x2, bitmask, values, row_offsets, bias, out) -> int:
    """pq_sparse_unstructured_gemm into out (float32 [M, N]); its status."""
    bm, v, off = bitmask.contiguous(), values.contiguous(), row_offsets.contiguous()
    b = _bias_f32(bias)
    return _sparse_gemm_slabs(x2, out, lambda isa, xs, m, k, o, work, nwork, nt: (
        module().sparse_unstructured_gemm(
            isa, _ptr(xs), m, k, xs.stride(0), _ptr(bm), _ptr(v), _value_dtype(v), v.numel(),
            _ptr(off), bitmask.shape[0], _ptr(b), _ptr(o), _ptr(work), nwork, nt)))


def _run_sparse_unstructured_mm(x, bitmask, values, row_offsets, bias=None):
    op = "sparse_unstructured_mm"
    n, k = bitmask.shape[0], x.shape[-1]
    lead, x2 = _flat(x, n)
    m = x2.shape[0]
    kind = "bf16" if _bf16_path(x2, values, bias) else "fp32"
    if m and n and k and _unstructured_gemm_applies(m, kind, k, bitmask, values):
        out = _out(m, n, x.dtype)
        # else x holds an Inf or NaN (0 * Inf where a weight is pruned: the paths below form
        # it), or the weight is inconsistent (the row kernel reports it)
        if _unstructured_gemm(x2, bitmask, values, row_offsets, bias, out) == 0:
            return _finish(out, x, lead, n)
    if m and n and sparse_dense_reason(op, m, kind):
        y = (_unstructured_bf16_panels(x2, bitmask, values, row_offsets, bias)
             if kind == "bf16" else None)
        if y is not None:
            return y.to(x.dtype).reshape(*lead, n)
        dense = _decompress_unstructured(bitmask, values, row_offsets, k)
        if dense is not None:  # else an inconsistent weight: the kernel reports it
            return _dense_float_linear(x2, dense, bias).reshape(*lead, n)
    out = _out(m, n, x.dtype)
    if m and n:
        xf = _rows_f32(x2)
        bm, v, off = bitmask.contiguous(), values.contiguous(), row_offsets.contiguous()
        b = _bias_f32(bias)
        st = module().sparse_unstructured_mm(
            current_isa(), _ptr(xf), m, k, xf.stride(0), _ptr(bm), _ptr(v), _value_dtype(v),
            v.numel(), _ptr(off), n, _ptr(b), _ptr(out), _threads(),
        )
        if st:
            from . import sparse_formats

            why = sparse_formats.unstructured_problem(bm, v, off, k)
            if why:
                raise ValueError(f"{op}: inconsistent unstructured sparse weight: {why}")
            _raise(op, st, M=m, N=n, K=k, nnz=v.numel())
    return _finish(out, x, lead, n)


def _unstructured_prepare(bitmask, values, row_offsets, bias=None):
    n = bitmask.shape[0]
    bm, v, off, b = bitmask.contiguous(), values.contiguous(), row_offsets.contiguous(), \
        _bias_f32(bias)
    ptrs, vd, nnz = (_ptr(bm), _ptr(v), _ptr(off), _ptr(b)), _value_dtype(v), v.numel()

    def native(isa, px, m, k, out, nt, _hold=(bm, v, off, b)):
        return module().sparse_unstructured_mm(isa, px, m, k, k, ptrs[0], ptrs[1], vd, nnz,
                                               ptrs[2], n, ptrs[3], _ptr(out), nt)
    return n, values.dtype, bias, native, not (bm is bitmask and v is values and
                                                off is row_offsets and b is bias)


_sparse_float_binder("sparse_unstructured_mm", _unstructured_prepare, _run_sparse_unstructured_mm,
                     _unstructured_gemm_applies, UNSTRUCTURED_GEMM_MIN_M)


# The ops on the CPU panel layout of the weights (pyquant/panels.py) live in their own module;
# they are this module's functions as far as the dispatch table (ops.py) is concerned.
from ._native_panels import (  # noqa: E402
    _run_int4_dynamic_mm_panels, _run_int4_weight_only_mm_panels, _run_int8_dynamic_mm_panels,
    _run_int8_weight_only_mm_panels, _run_sparse24_int4_mm_panels, _run_sparse24_int8_mm_panels,
    int4_codes_mm_panels, int4_dynamic_mm_panels, int4_weight_only_mm_panels,
    int8_codes_mm_panels, int8_dynamic_mm_panels, int8_weight_only_mm_panels,
    sparse24_int4_mm_panels, sparse24_int8_mm_panels)
