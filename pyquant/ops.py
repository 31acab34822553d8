"""The one dispatch table of pyquant.

Every op is registered once as ``torch.ops.pyquant.<op>`` (a ``torch.library.custom_op`` with a
fake function, so ``torch.compile(fullgraph=True)`` sees a single opaque node), validated once
by ``_checks`` and then run by one backend:

    backend     devices   needs
    reference   any       nothing (pure PyTorch, the oracle)
    cpu         cpu       the native module pyquant._C
    triton      cuda      Triton and a CUDA device (pyquant_triton/kernels/)
    cuda        cuda      the native module pyquant._C_cuda

Only this module knows which backends exist. ``PYQUANT_BACKEND=<name>`` or
``with pyquant.use_backend(<name>):`` forces one; asking for a backend that is missing or that
does not implement an op on that device is an error, never a silent fallback. Without a forced
backend, the first available one of ``AUTO_ORDER[device]`` that implements the op runs; when
that is the reference on a device that should have a native backend, a warning says why, once.

The layers call ``ops.call(op, ...)`` (through a ``LayerCall`` each, which skips the checks of
their own unchanged tensors from the second call on): in plain eager inference it runs the
op's body (the same checks and backend) without the dispatcher's Python wrappers; with
autograd, torch.compile, tracing or tensor subclasses it goes through
``torch.ops.pyquant.<op>``.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import _checks, _native, reference

OPS = ("int8_weight_only_mm", "int8_dynamic_mm", "int4_weight_only_mm", "int4_dynamic_mm",
       # the dynamic ops on the CPU backend's panel layout of the weight (pyquant/panels.py)
       "int8_weight_only_mm_panels", "int8_dynamic_mm_panels", "int4_weight_only_mm_panels",
       "int4_dynamic_mm_panels")
# Sparse ops (pyquant/sparse_formats.py): native on CPU (csrc/cpu/sparse.cpp), the reference
# elsewhere; a backend registers an op when it has it (hasattr below).
SPARSE_OPS = ("sparse24_mm", "sparse_unstructured_mm", "sparse24_int8_mm", "sparse24_int4_mm",
              # 2:4 + int8 / int4 on the CPU backend's 4-row panels (pyquant/sparse_panels.py)
              "sparse24_int8_mm_panels", "sparse24_int4_mm_panels")
OPS = OPS + SPARSE_OPS
BACKENDS = ("reference", "cpu", "triton", "cuda")
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


@dataclass
class Backend:
    name: str
    devices: Optional[tuple]  # None: every device
    probe: Callable[[], Optional[str]]  # None when usable, else the reason it is not
    impls: dict = field(default_factory=dict)

    def why_unavailable(self) -> Optional[str]:
        return self.probe()


def _probe_cpu() -> Optional[str]:
    return None if _native.available() else f"native module not loaded ({_native.load_error()})"


def _probe_triton() -> Optional[str]:
    from . import _triton

    return _triton.why_unavailable()


def _probe_cuda() -> Optional[str]:
    try:
        from . import _C_cuda  # noqa: F401
    except Exception as e:
        return f"CUDA module not built or not loadable ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


_REGISTRY: dict[str, Backend] = {
    "reference": Backend(
        "reference",
        None,
        lambda: None,
        {op: getattr(reference, op) for op in OPS},
    ),
    # _native._run_<op>: the op without its argument checks, which the op body has just run
    "cpu": Backend("cpu", ("cpu",), _probe_cpu, {
        op: getattr(_native, f"_run_{op}", None) or getattr(_native, op)
        for op in OPS if hasattr(_native, op)}),
    # Triton kernels register here when importable (see _triton.py); CUDA kernels: not yet.
    "triton": Backend("triton", ("cuda",), _probe_triton, {}),
    "cuda": Backend("cuda", ("cuda",), _probe_cuda, {}),
}

_state = threading.local()
_warned: set = set()


# use_backend blocks open on any thread: while there are none and PYQUANT_BACKEND is unset,
# _forced answers without the thread-local and string steps, which at decode (caches the weight
# stream has just flushed) cost ~10 us of a layer's call (2-core Xeon)
_forcing = 0
_forcing_lock = threading.Lock()


def _forced() -> Optional[str]:
    env = _native._ENV_BYTES
    if not _forcing and type(env) is dict and b"PYQUANT_BACKEND" not in env:
        return None
    name = getattr(_state, "forced", None)
    if name is None:
        name = _native.env_setting("PYQUANT_BACKEND", b"PYQUANT_BACKEND").strip().lower() or None
        if name is not None and name not in _REGISTRY:
            raise ValueError(
                f"PYQUANT_BACKEND={name!r} is not a pyquant backend; use one of {', '.join(BACKENDS)}"
            )
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force one backend for every pyquant op inside the block (per thread). Names are
    case-insensitive, as PYQUANT_BACKEND's are."""
    if isinstance(name, str):
        name = name.strip().lower()
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    global _forcing
    prev = getattr(_state, "forced", None)
    _state.forced = name
    with _forcing_lock:
        _forcing += 1
    try:
        yield
    finally:
        _state.forced = prev
        with _forcing_lock:
            _forcing -= 1


def _supports(b: Backend, op: str, device: str) -> Optional[str]:
    if b.devices is not None and device not in b.devices:
        return f"runs on {'/'.join(b.devices)} tensors, not {device}"
    why = b.why_unavailable()
    if why:
        return why
    if op not in b.impls:
        return f"does not implement {op}"
    return None


def select(op: str, device: torch.device | str) -> Backend:
    """The backend that runs ``op`` on ``device`` now (forced or automatic)."""
    dev = device.type if isinstance(device, torch.device) else torch.device(device).type
    forced = _forced()
    if forced is not None:
        b = _REGISTRY[forced]
        why = _supports(b, op, dev)
        if why:
            raise RuntimeError(
                f"backend {forced!r} was forced for {op} on {dev}, but it {why}; "
                f"available here: {', '.join(available_backends(op, dev)) or 'none'}"
            )
        return b
    # The automatic choice depends only on what is installed and loaded: kept per (op,
    # device, native module), so a call pays a dict lookup instead of the probes (~1.5 us).
    # The reference is not kept: choosing it warns, and the warning's bookkeeping stays here.
    key = (op, dev, _native._module)
    b = _AUTO.get(key)
    if b is not None:
        return b
    b = _select_auto(op, dev)
    if b.name != "reference":
        _AUTO[key] = b
    return b


_AUTO: dict = {}


def _select_auto(op: str, dev: str) -> Backend:
    reasons = []
    for name in AUTO_ORDER.get(dev, ("reference",)):
        b = _REGISTRY[name]
        why = _supports(b, op, dev)
        if why is None:
            if name == "reference" and dev in AUTO_ORDER and (op, dev) not in _warned:
                _warned.add((op, dev))
                warnings.warn(
                    f"pyquant: {op} on {dev} runs on the slow reference backend because "
                    + "; ".join(reasons)
                    + " (see `pyquant info`)",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return b
        reasons.append(f"{name}: {why}")
    raise RuntimeError(f"no pyquant backend can run {op} on {dev}: " + "; ".join(reasons))


def available_backends(op: str, device: str) -> list[str]:
    return [n for n, b in _REGISTRY.items() if _supports(b, op, device) is None]


def backend_table() -> dict:
    """{device: {op: chosen backend or 'unavailable: reason'}} for `pyquant info`."""
    table = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        row = {}
        for op in OPS:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row[op] = select(op, dev).name
            except Exception as e:  # report, don't fail, in a diagnostic
                row[op] = f"unavailable: {e}"
        table[dev] = row
    return table


def backend_status() -> dict:
    """{backend: None if usable else reason} for `pyquant info`."""
    return {n: b.why_unavailable() for n, b in _REGISTRY.items()}


def register_impl(backend: str, op: str, fn: Callable) -> None:
    """Used by optional backends (Triton) to add their kernels to the table."""
    _REGISTRY[backend].impls[op] = fn


# ---------------------------------------------------------------- torch.ops.pyquant.*


def _run(op: str, x: torch.Tensor, *args):
    return select(op, x.device).impls[op](x, *args)


def _out_like(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


_EAGER: dict = {}  # op name -> the op's body (checks, then the selected backend)


def _custom_op(name: str):
    """Registers ``fn`` as torch.ops.pyquant.<name> and keeps its body for ``call``."""
    def deco(fn):
        _EAGER[name] = fn
        return torch.library.custom_op(f"pyquant::{name}", mutates_args=())(fn)

    return deco


def _needs_dispatcher(x: torch.Tensor, args: tuple) -> bool:
    if type(x) is not torch.Tensor:  # tensor subclasses, FX proxies, fake tensors
        return True
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    if torch.is_grad_enabled():  # autograd records the op (its formula: end of this file)
        return x.requires_grad or any(isinstance(a, torch.Tensor) and a.requires_grad
                                      for a in args)
    return False


def call(op: str, x: torch.Tensor, *args):
    """What the layers call. Plain eager inference runs the op's body directly (the same
    checks and backend); everything else -- autograd, torch.compile, tracing, tensor
    subclasses -- goes through torch.ops.pyquant.<op>. The dispatcher's Python wrappers cost
    about 40 us a call (measured on the CPU: 85 us through torch.ops against 45 us for the
    body on a tiny layer), as much as a small layer's whole kernel at decode."""
    if _needs_dispatcher(x, args):
        return getattr(torch.ops.pyquant, op)(x, *args)
    return _EAGER[op](x, *args)


class LayerCall:
    """``call`` for one layer whose weight tensors stay the same from call to call.

    The first call goes the whole way (dispatcher or body: checks, backend choice). When it ran
    the op's body on the native CPU backend, this remembers the weight arguments (the tensor
    objects with their data address, shape and dtype, which is all the checks look at; the other
    arguments with their types) and the backend's function; the next calls with the same
    arguments, unchanged, check only x before that function runs (an x the checks would refuse
    goes the whole way, to the checks' error). The weights' checks and the backend choice cost
    ~5 us a call in Python, as much as a MiniLM-size layer's kernel at M = 1. Where the
    backend's function has a ``bind`` (int8 weight-only and dynamic, on rows and panels, the
    other weight-only and 2:4 panel ops, W4A8 on panels, 2:4 and unstructured float), the call
    is also prepared once: the weights' kernel addresses and workspace sizes. Values written in
    place need nothing: the function reads the tensors as they are (bind declines weights it
    would have to copy). Anything else goes the whole way and remembers again, or forgets (so no
    old weights stay referenced): another tensor object, new storage or another shape or dtype
    under the same one (``.data =``, ``resize_``, ``set_``), another argument, a forced backend,
    another native module or CPU function for the op, a tensor subclass, tracing or compiling,
    autograd. Copies and pickles of a layer start empty."""

    __slots__ = ("state",)

    def __init__(self):
        # (op, args, keys, impl, native module, K, bound call or None), or None: read and
        # written whole
        self.state = None

    def __deepcopy__(self, memo):
        return LayerCall()

    def __reduce__(self):
        return (LayerCall, ())

    @staticmethod
    def _key(a):
        if isinstance(a, torch.Tensor):
            return (a.data_ptr(), a.shape, a.dtype)
        return type(a)

    @staticmethod
    def _same_args(args: tuple, mine: tuple, keys: tuple) -> bool:
        if len(args) != len(mine):
            return False
        for a, b, key in zip(args, mine, keys):
            if a is not b:
                if (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)
                        or type(a) is not key or a != b):
                    return False
            elif isinstance(key, tuple) and (a.data_ptr() != key[0] or a.shape != key[1]
                                             or a.dtype != key[2]):
                return False
        return True

    def __call__(self, op: str, x: torch.Tensor, *args):
        st = self.state
        # x as the op's checks want it (else the whole way, whose checks say what is wrong)
        # the op by equality too: a name built at run time (``"int4_weight_only_mm" + suffix``)
        # is a new string object each call, and by identity alone every such call went the
        # whole way and prepared its call again
        if (st is not None and (op is st[0] or op == st[0]) and type(x) is torch.Tensor
                and x.is_cpu and x.dtype in _checks.ACT_DTYPES and x.dim() >= 1
                and x.shape[-1] == st[5] and self._same_args(args, st[1], st[2])
                and _native._module is st[4]
                and _REGISTRY["cpu"].impls.get(op) is st[3] and _forced() is None
                and not (torch.is_grad_enabled() and (x.requires_grad or any(
                    isinstance(a, torch.Tensor) and a.requires_grad for a in args)))):
            return st[3](x, *args) if st[6] is None else st[6](x)
        self.state = None  # also when the call raises
        y = call(op, x, *args)
        self.state = self._remember(op, x, args)
        return y

    @staticmethod
    def _remember(op: str, x: torch.Tensor, args: tuple):
        # only what the call above ran as the op's body on the CPU backend: a native module
        # loaded, the automatic choice (nothing forced), plain tensors, no autograd
        if (type(x) is not torch.Tensor or not x.is_cpu or _needs_dispatcher(x, args)
                or _forced() is not None or not _native.available()
                or any(isinstance(a, torch.Tensor) and (a.requires_grad or type(a) is not
                                                         torch.Tensor) for a in args)):
            return None
        b = select(op, x.device)
        if b.name != "cpu":
            return None
        fn = b.impls[op]
        # the backend's call prepared once for these weights, where it has one (bind: the
        # weight-only and 2:4 panel ops, int8 dynamic, the float sparse ops), else its function
        bind = getattr(fn, "bind", None)
        return (op, args, tuple(LayerCall._key(a) for a in args), fn, _native._module,
                x.shape[-1], bind(*args) if bind is not None else None)


@_custom_op("int8_weight_only_mm")
def int8_weight_only_mm(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """y = x @ (w * w_scale[:, None]).T + bias; w int8 [N, K], w_scale float32 [N]."""
    _checks.check_int8_mm("int8_weight_only_mm", x, w, w_scale, bias)
    return _run("int8_weight_only_mm", x, w, w_scale, bias)


@int8_weight_only_mm.register_fake
def _(x, w, w_scale, bias):
    _checks.check_int8_mm("int8_weight_only_mm", x, w, w_scale, bias)
    return _out_like(x, w.shape[0])


@_custom_op("int8_dynamic_mm")
def int8_dynamic_mm(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """W8A8: x quantized per row to int8 at run time, int32 x @ w.T, then
    * x_scale[m] * w_scale[n] + bias[n]."""
    _checks.check_int8_mm("int8_dynamic_mm", x, w, w_scale, bias)
    return _run("int8_dynamic_mm", x, w, w_scale, bias)


@int8_dynamic_mm.register_fake
def _(x, w, w_scale, bias):
    _checks.check_int8_mm("int8_dynamic_mm", x, w, w_scale, bias)
    return _out_like(x, w.shape[0])


@_custom_op("int8_weight_only_mm_panels")
def int8_weight_only_mm_panels(
    x: torch.Tensor, panels: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """int8_weight_only_mm with the weight in the CPU panel layout (pyquant/panels.py)."""
    _checks.check_int8_panels_mm("int8_weight_only_mm_panels", x, panels, w_scale, bias)
    return _run("int8_weight_only_mm_panels", x, panels, w_scale, bias)


@int8_weight_only_mm_panels.register_fake
def _(x, panels, w_scale, bias):
    _checks.check_int8_panels_mm("int8_weight_only_mm_panels", x, panels, w_scale, bias)
    return _out_like(x, panels.shape[0])


@_custom_op("int8_dynamic_mm_panels")
def int8_dynamic_mm_panels(
    x: torch.Tensor, panels: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """int8_dynamic_mm with the weight in the CPU panel layout (pyquant/panels.py): uint8
    [N, K], converted once when the layer was swapped in. The same result, bit for bit."""
    _checks.check_int8_panels_mm("int8_dynamic_mm_panels", x, panels, w_scale, bias)
    return _run("int8_dynamic_mm_panels", x, panels, w_scale, bias)


@int8_dynamic_mm_panels.register_fake
def _(x, panels, w_scale, bias):
    _checks.check_int8_panels_mm("int8_dynamic_mm_panels", x, panels, w_scale, bias)
    return _out_like(x, panels.shape[0])


@_custom_op("int4_weight_only_mm")
def int4_weight_only_mm(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """y = x @ dequant(w_packed, scales, zeros).T + bias (format: formats.py)."""
    _checks.check_int4_mm("int4_weight_only_mm", x, w_packed, scales, zeros, group_size, bias)
    return _run("int4_weight_only_mm", x, w_packed, scales, zeros, group_size, bias)


@int4_weight_only_mm.register_fake
def _(x, w_packed, scales, zeros, group_size, bias):
    _checks.check_int4_mm("int4_weight_only_mm", x, w_packed, scales, zeros, group_size, bias)
    return _out_like(x, w_packed.shape[0])


def _check_int4_dynamic(x, w_packed, scales, zeros, group_size, bias):
    _checks.check_int4_mm("int4_dynamic_mm", x, w_packed, scales, zeros, group_size, bias)
    _checks.check_w4a8_rows_group("int4_dynamic_mm", group_size)


@_custom_op("int4_dynamic_mm")
def int4_dynamic_mm(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """W4A8: x quantized per row to int8 at run time; exact int32 dot products per weight
    group with the int4 codes minus zero points, then x_scale * sum_g scales * acc + bias."""
    _check_int4_dynamic(x, w_packed, scales, zeros, group_size, bias)
    return _run("int4_dynamic_mm", x, w_packed, scales, zeros, group_size, bias)


@int4_dynamic_mm.register_fake
def _(x, w_packed, scales, zeros, group_size, bias):
    _check_int4_dynamic(x, w_packed, scales, zeros, group_size, bias)
    return _out_like(x, w_packed.shape[0])


@_custom_op("int4_weight_only_mm_panels")
def int4_weight_only_mm_panels(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """int4_weight_only_mm with the weight in the CPU panel layout (pyquant/panels.py)."""
    _checks.check_int4_panels_mm("int4_weight_only_mm_panels", x, codes, scales, zeros,
                                 group_size, bias)
    return _run("int4_weight_only_mm_panels", x, codes, scales, zeros, group_size, bias)


@int4_weight_only_mm_panels.register_fake
def _(x, codes, scales, zeros, group_size, bias):
    _checks.check_int4_panels_mm("int4_weight_only_mm_panels", x, codes, scales, zeros,
                                 group_size, bias)
    return _out_like(x, codes.shape[0])


@_custom_op("int4_dynamic_mm_panels")
def int4_dynamic_mm_panels(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """int4_dynamic_mm with the weight in the CPU panel layout (pyquant/panels.py): the
    canonical tensors' shapes and bytes, reordered once when the layer was swapped in."""
    _checks.check_int4_panels_mm("int4_dynamic_mm_panels", x, codes, scales, zeros, group_size,
                                 bias)
    return _run("int4_dynamic_mm_panels", x, codes, scales, zeros, group_size, bias)


@int4_dynamic_mm_panels.register_fake
def _(x, codes, scales, zeros, group_size, bias):
    _checks.check_int4_panels_mm("int4_dynamic_mm_panels", x, codes, scales, zeros, group_size,
                                 bias)
    return _out_like(x, codes.shape[0])


# ------------------------------------------------------- sparse ops (layouts: sparse_formats.py)


@_custom_op("sparse24_mm")
def sparse24_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x @ W.T + bias, W [N, K] 2:4 sparse: kept values float [N, K/2] + 2-bit positions
    meta uint8 [N, ceil(K/8)]."""
    _checks.check_sparse24_mm("sparse24_mm", x, values, meta, bias)
    return _run("sparse24_mm", x, values, meta, bias)


@sparse24_mm.register_fake
def _(x, values, meta, bias):
    _checks.check_sparse24_mm("sparse24_mm", x, values, meta, bias)
    return _out_like(x, values.shape[0])


@_custom_op("sparse_unstructured_mm")
def sparse_unstructured_mm(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor,
                           row_offsets: torch.Tensor,
                           bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x @ W.T + bias, W [N, K] unstructured sparse: bitmask uint8 [N, ceil(K/8)], kept
    values float [nnz] row-major, row_offsets int64 [N + 1]."""
    _checks.check_sparse_unstructured_mm("sparse_unstructured_mm", x, bitmask, values,
                                         row_offsets, bias)
    return _run("sparse_unstructured_mm", x, bitmask, values, row_offsets, bias)


@sparse_unstructured_mm.register_fake
def _(x, bitmask, values, row_offsets, bias):
    _checks.check_sparse_unstructured_mm("sparse_unstructured_mm", x, bitmask, values,
                                         row_offsets, bias)
    return _out_like(x, bitmask.shape[0])


@_custom_op("sparse24_int8_mm")
def sparse24_int8_mm(x: torch.Tensor, values_q: torch.Tensor, meta: torch.Tensor,
                     scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """2:4 + int8: kept values int8 [N, K/2] times scale float32 [N]; float activations."""
    _checks.check_sparse24_int8_mm("sparse24_int8_mm", x, values_q, meta, scale, bias)
    return _run("sparse24_int8_mm", x, values_q, meta, scale, bias)


@sparse24_int8_mm.register_fake
def _(x, values_q, meta, scale, bias):
    _checks.check_sparse24_int8_mm("sparse24_int8_mm", x, values_q, meta, scale, bias)
    return _out_like(x, values_q.shape[0])


@_custom_op("sparse24_int4_mm")
def sparse24_int4_mm(x: torch.Tensor, packed: torch.Tensor, meta: torch.Tensor,
                     scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """2:4 + int4: kept values [N, K/2] int4 group-wise along the compressed axis (packed uint8
    [N, K/4], scales/zeros [N, K/2/G]); float activations."""
    _checks.check_sparse24_int4_mm("sparse24_int4_mm", x, packed, meta, scales, zeros,
                                   group_size, bias)
    return _run("sparse24_int4_mm", x, packed, meta, scales, zeros, group_size, bias)


@sparse24_int4_mm.register_fake
def _(x, packed, meta, scales, zeros, group_size, bias):
    _checks.check_sparse24_int4_mm("sparse24_int4_mm", x, packed, meta, scales, zeros,
                                   group_size, bias)
    return _out_like(x, packed.shape[0])


@_custom_op("sparse24_int8_mm_panels")
def sparse24_int8_mm_panels(x: torch.Tensor, values_q: torch.Tensor, meta: torch.Tensor,
                            scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """sparse24_int8_mm with values_q and meta in the CPU 4-row panels (pyquant/
    sparse_panels.py): the canonical tensors' shapes and bytes, reordered once when the layer
    was swapped in."""
    _checks.check_sparse24_int8_mm("sparse24_int8_mm_panels", x, values_q, meta, scale, bias)
    _checks.check_sparse24_panels("sparse24_int8_mm_panels", values_q)
    return _run("sparse24_int8_mm_panels", x, values_q, meta, scale, bias)


@sparse24_int8_mm_panels.register_fake
def _(x, values_q, meta, scale, bias):
    _checks.check_sparse24_int8_mm("sparse24_int8_mm_panels", x, values_q, meta, scale, bias)
    _checks.check_sparse24_panels("sparse24_int8_mm_panels", values_q)
    return _out_like(x, values_q.shape[0])


@_custom_op("sparse24_int4_mm_panels")
def sparse24_int4_mm_panels(x: torch.Tensor, packed: torch.Tensor, meta: torch.Tensor,
                            scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """sparse24_int4_mm with packed and meta in the CPU 4-row panels (pyquant/
    sparse_panels.py); scales and zeros canonical."""
    _checks.check_sparse24_int4_mm("sparse24_int4_mm_panels", x, packed, meta, scales, zeros,
                                   group_size, bias)
    _checks.check_sparse24_panels("sparse24_int4_mm_panels", packed, group_size)
    return _run("sparse24_int4_mm_panels", x, packed, meta, scales, zeros, group_size, bias)


@sparse24_int4_mm_panels.register_fake
def _(x, packed, meta, scales, zeros, group_size, bias):
    _checks.check_sparse24_int4_mm("sparse24_int4_mm_panels", x, packed, meta, scales, zeros,
                                   group_size, bias)
    _checks.check_sparse24_panels("sparse24_int4_mm_panels", packed, group_size)
    return _out_like(x, packed.shape[0])


# ------------------------------------------------------------------------------ autograd
# The weights are frozen codes (buffers, no gradient), but gradients flow to x, so that a
# quantized model can sit under trainable parts: adapters (LoRA on a quantized base), earlier
# float layers, prompt tuning. dL/dx = dL/dy @ W with the dense weight the op multiplies
# (reference.dense_weight, dequantized per backward call in float32, by blocks of rows; the
# dynamic ops pass their activation rounding straight through), and dL/dbias = the sum of
# dL/dy when the bias asks for it.


#: Output rows of W dequantized (or decompressed) at a time in the backward: 16 MiB of
#: float32 at K = 4096, where the whole W of a 4096 x 11008 layer would take 180 MB.
_GRAD_ROWS = 1024


def _weight_rows(name: str, wargs: list, n0: int, n1: int) -> list:
    """The op's weight arguments for output rows n0..n1-1: every tensor is per row except the
    unstructured values, which are cut by their row offsets. (The panel layouts hold whole
    rows per 32-row panel, and _GRAD_ROWS is a multiple of 32.)"""
    if name == "sparse_unstructured_mm":
        bitmask, values, off = wargs
        return [bitmask[n0:n1], values[int(off[n0]):int(off[n1])], off[n0:n1 + 1] - off[n0]]
    return [a[n0:n1] if isinstance(a, torch.Tensor) else a for a in wargs]


def _grad_x(name: str, k: int, wargs: list, grad: torch.Tensor) -> torch.Tensor:
    """dL/dx = dL/dy @ W (float32), W dequantized (and decompressed) by blocks of output rows,
    so that the backward holds at most _GRAD_ROWS rows of float32 W at a time."""
    n = grad.shape[-1]
    if n <= _GRAD_ROWS:
        return grad @ reference.dense_weight(name, k, *wargs).to(grad.device)
    gx = None
    for n0 in range(0, n, _GRAD_ROWS):
        n1 = min(n0 + _GRAD_ROWS, n)
        part = grad[..., n0:n1] @ reference.dense_weight(
            name, k, *_weight_rows(name, wargs, n0, n1)).to(grad.device)
        gx = part if gx is None else gx.add_(part)
    return gx


def _register_autograd(name: str) -> None:
    def setup_context(ctx, inputs, output):
        x, *wargs, bias = inputs
        ctx.k, ctx.x_dtype = x.shape[-1], x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.plain = [None if isinstance(a, torch.Tensor) else a for a in wargs]
        ctx.save_for_backward(*(a for a in wargs if isinstance(a, torch.Tensor)))

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        wargs = [next(saved) if a is None else a for a in ctx.plain]
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = _grad_x(name, ctx.k, wargs, grad.to(torch.float32)).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[-1]:
            gb = grad.reshape(-1, grad.shape[-1]).to(torch.float32).sum(0).to(ctx.bias_dtype)
        return (gx, *([None] * len(wargs)), gb)

    torch.library.register_autograd(f"pyquant::{name}", backward, setup_context=setup_context)


for _name in OPS:
    _register_autograd(_name)
