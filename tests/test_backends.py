"""Backend selection (pyquant.ops) and CPU instruction-set selection (pyquant._native): what is
forced, what is automatic, and the errors and warnings when something is missing."""
from __future__ import annotations

import warnings

import pytest
import torch

import pyquant
from helpers import OPS, available_isas, native_available, random_int4_weight, random_int8_weight
from pyquant import _native, ops

needs_native = pytest.mark.skipif(not native_available(),
                                  reason=f"native module not loaded: {_native.load_error()}")


def _args(op):
    """Small valid (x, *wargs, bias) for each op."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    if op == "int4_weight_only_mm":
        return (x, *random_int4_weight(5, 64, 32), 32, None)
    return (x, *random_int8_weight(5, 64), None)


def _call(op):
    return getattr(torch.ops.pyquant, op)(*_args(op))


@pytest.fixture
def counting(monkeypatch):
    """Wrap every backend's implementation with a call counter: {(backend, op): calls}."""
    calls = {}
    for name, backend in ops._REGISTRY.items():
        for op, fn in list(backend.impls.items()):
            def wrapped(*a, _fn=fn, _key=(name, op)):
                calls[_key] = calls.get(_key, 0) + 1
                return _fn(*a)
            monkeypatch.setitem(backend.impls, op, wrapped)
    return calls


@pytest.fixture
def native_missing(monkeypatch):
    """Simulate a source-only install: the native module failed to import."""
    monkeypatch.setattr(_native, "_loaded", True)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_load_error", "ImportError: simulated missing pyquant._C")
    monkeypatch.setattr(ops, "_warned", set())


# ---------------------------------------------------------------------------- forcing


@pytest.mark.parametrize("op", OPS)
def test_use_backend_reference(no_backend_env, counting, op):
    with pyquant.use_backend("reference"):
        assert ops.select(op, "cpu").name == "reference"
        out = _call(op)
    assert counting == {("reference", op): 1}
    assert torch.equal(out, getattr(pyquant.reference, op)(*_args(op)))


def test_use_backend_names_are_case_insensitive_like_the_env_var(no_backend_env):
    with pyquant.use_backend("REFERENCE"):
        assert ops.select("int8_weight_only_mm", "cpu").name == "reference"
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with pyquant.use_backend("GPU"):
            pass


def test_use_backend_nests_and_restores(no_backend_env):
    auto = ops.select("int8_weight_only_mm", "cpu").name
    with pyquant.use_backend("reference"):
        if native_available():
            with pyquant.use_backend("cpu"):
                assert ops.select("int8_weight_only_mm", "cpu").name == "cpu"
        assert ops.select("int8_weight_only_mm", "cpu").name == "reference"
    assert ops.select("int8_weight_only_mm", "cpu").name == auto


def test_use_backend_restores_after_error(no_backend_env):
    with pytest.raises(KeyError):
        with pyquant.use_backend("reference"):
            raise KeyError("boom")
    assert getattr(ops._state, "forced", None) is None


def test_use_backend_beats_env(monkeypatch):
    monkeypatch.setenv("PYQUANT_BACKEND", "cpu" if native_available() else "triton")
    with pyquant.use_backend("reference"):
        assert ops.select("int8_dynamic_mm", "cpu").name == "reference"


@needs_native
@pytest.mark.parametrize("op", OPS)
def test_auto_picks_cpu(no_backend_env, counting, op):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning when native is there
        assert ops.select(op, "cpu").name == "cpu"
        _call(op)
    assert counting == {("cpu", op): 1}


@needs_native
def test_env_backend_cpu(monkeypatch, counting):
    monkeypatch.setenv("PYQUANT_BACKEND", "cpu")
    assert ops.select("int4_weight_only_mm", "cpu").name == "cpu"
    _call("int4_weight_only_mm")
    assert counting == {("cpu", "int4_weight_only_mm"): 1}


@pytest.mark.parametrize("value", ["reference", " Reference "])
def test_env_backend_reference(monkeypatch, counting, value):
    monkeypatch.setenv("PYQUANT_BACKEND", value)
    assert ops.select("int8_weight_only_mm", "cpu").name == "reference"
    _call("int8_weight_only_mm")
    assert counting == {("reference", "int8_weight_only_mm"): 1}


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", OPS)
def test_forcing_gpu_backend_on_cpu_tensors(no_backend_env, backend, op):
    with pyquant.use_backend(backend):
        with pytest.raises(RuntimeError,
                           match=rf"backend '{backend}' was forced for {op} on cpu, but it runs on "
                                 r"cuda tensors, not cpu; available here: reference"):
            _call(op)


def test_forcing_gpu_backend_via_env(monkeypatch):
    monkeypatch.setenv("PYQUANT_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"backend 'triton' was forced .* runs on cuda tensors"):
        _call("int8_dynamic_mm")


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; use one of reference, cpu, triton, cuda"):
        with pyquant.use_backend("tpu"):
            pass


def test_unknown_backend_env(monkeypatch):
    monkeypatch.setenv("PYQUANT_BACKEND", "tpu")
    with pytest.raises(ValueError, match=r"PYQUANT_BACKEND='tpu' is not a pyquant backend; use one of "
                                         r"reference, cpu, triton, cuda"):
        _call("int8_weight_only_mm")


def test_backend_table_and_status(no_backend_env):
    table = ops.backend_table()
    assert set(table["cpu"]) == set(ops.OPS)
    want = "cpu" if native_available() else "reference"
    # every op, the sparse ones included, has a native CPU kernel
    for op, backend in table["cpu"].items():
        assert backend == want, table
    status = ops.backend_status()
    assert status["reference"] is None
    assert (status["cpu"] is None) == native_available()
    if not torch.cuda.is_available():
        assert status["triton"] and status["cuda"]  # a reason, not None


# ------------------------------------------------------------------- native missing


@pytest.mark.parametrize("op", OPS)
def test_fallback_to_reference_warns_once(no_backend_env, native_missing, counting, op):
    assert not _native.available()
    assert _native.load_error() == "ImportError: simulated missing pyquant._C"
    with pytest.warns(RuntimeWarning, match=rf"{op} on cpu runs on the slow reference backend because "
                                            r"cpu: native module not loaded \(ImportError: simulated"):
        out = _call(op)
    assert counting == {("reference", op): 1}
    assert torch.equal(out, getattr(pyquant.reference, op)(*_args(op)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per (op, device), not per call
        _call(op)


def test_forcing_cpu_without_native_raises(no_backend_env, native_missing):
    with pyquant.use_backend("cpu"):
        with pytest.raises(RuntimeError, match=r"backend 'cpu' was forced for int8_weight_only_mm on cpu, "
                                               r"but it native module not loaded \(ImportError: simulated"):
            _call("int8_weight_only_mm")


def test_env_cpu_without_native_raises(monkeypatch, native_missing):
    monkeypatch.setenv("PYQUANT_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match=r"backend 'cpu' was forced.*native module not loaded"):
        _call("int4_weight_only_mm")


def test_native_module_error_names_the_load_error(native_missing):
    with pytest.raises(RuntimeError, match=r"native CPU module is not loaded \(ImportError: simulated"):
        _native.module()


def test_quantized_model_runs_without_native(no_backend_env, native_missing):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=32))
    with pytest.warns(RuntimeWarning, match="slow reference backend"):
        assert model(torch.randn(2, 64)).shape == (2, 32)


# ---------------------------------------------------------------------- ISA selection


def test_use_isa_unknown_name():
    with pytest.raises(ValueError, match=r"unknown CPU instruction set 'sse9'; use one of portable, avx2, avx512_vnni"):
        with _native.use_isa("sse9"):
            pass


@needs_native
def test_env_isa_bogus(monkeypatch):
    monkeypatch.setenv("PYQUANT_CPU_ISA", "bogus")
    with pytest.raises(ValueError, match=r"unknown CPU instruction set 'bogus'; use one of portable, avx2, avx512_vnni"):
        _native.current_isa()
    with pyquant.use_backend("cpu"):
        with pytest.raises(ValueError, match=r"unknown CPU instruction set 'bogus'"):
            _call("int8_weight_only_mm")


@needs_native
@pytest.mark.parametrize("name", list(available_isas()))
def test_env_isa_selects(monkeypatch, name):
    monkeypatch.setenv("PYQUANT_CPU_ISA", name)
    assert _native.current_isa() == _native.ISA_NAMES.index(name)


@needs_native
@pytest.mark.parametrize("alias,name", [("generic", "portable"), ("AVX2", "avx2"), ("vnni", "avx512_vnni"),
                                        ("avx512", "avx512_vnni")])
def test_isa_aliases(alias, name):
    if name not in set(available_isas()):
        pytest.skip(f"{name} not available here")
    with _native.use_isa(alias):
        assert _native.current_isa() == _native.ISA_NAMES.index(name)


@needs_native
def test_use_isa_beats_env_and_restores(monkeypatch):
    monkeypatch.setenv("PYQUANT_CPU_ISA", "portable")
    best = max(_native.ISA_NAMES.index(n) for n in available_isas())
    with _native.use_isa(_native.ISA_NAMES[best]):
        assert _native.current_isa() == best
    assert _native.current_isa() == 0
    monkeypatch.delenv("PYQUANT_CPU_ISA")
    assert _native.current_isa() == _native.best_isa() == best


@needs_native
def test_unavailable_isa_lists_available(monkeypatch):
    """An ISA the CPU or build lacks: ValueError naming it and what is available (simulated by
    a module that only has the portable kernels)."""
    real = _native.module()

    class OnlyPortable:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def isa_available(i):
            return i == 0

        @staticmethod
        def best_isa():
            return 0

    monkeypatch.setattr(_native, "_module", OnlyPortable())
    with pytest.raises(ValueError, match=r"use_isa\(\) asks for avx2, which this CPU or build does not support; "
                                         r"available: portable$"):
        with _native.use_isa("avx2"):
            pass
    assert _native._isa_override is None
    monkeypatch.setenv("PYQUANT_CPU_ISA", "avx512_vnni")
    with pytest.raises(ValueError, match=r"PYQUANT_CPU_ISA=avx512_vnni asks for avx512_vnni.*available: portable"):
        _native.current_isa()


def test_layers_skip_the_dispatcher_only_in_plain_eager_inference(monkeypatch):
    """ops.call runs the op's body directly for eager inference (the dispatcher's Python
    wrappers cost about as much as a small layer's kernel), and torch.ops.pyquant.<op>
    whenever autograd, torch.compile or tracing needs the registered op."""
    lin = torch.nn.Sequential(torch.nn.Linear(64, 32))
    pyquant.quantize_(lin, pyquant.Int8Dynamic())
    x = torch.randn(3, 64)
    # the CPU panel layout of the weight (pyquant/panels.py) where this CPU's kernels take it
    op = "int8_dynamic_mm_panels" if lin[0].weight_layout == "panels" else "int8_dynamic_mm"
    body = ops._EAGER[op]
    seen = []

    def spy(*args):
        seen.append(1)
        return body(*args)

    monkeypatch.setitem(ops._EAGER, op, spy)
    with torch.no_grad():
        y = lin(x)
    assert seen == [1]
    assert torch.equal(y, getattr(torch.ops.pyquant, op)(x, lin[0].weight, lin[0].weight_scale,
                                                         lin[0].bias))
    seen.clear()
    xg = x.clone().requires_grad_(True)
    out = lin(xg)  # the registered op, which autograd records
    assert seen == [] and out.requires_grad
    out.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape
