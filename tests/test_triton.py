"""The Triton backend (pyquant_triton/kernels/*.py, pyquant/_triton.py).

CPU part: every kernel runs under the Triton interpreter against ``pyquant.reference`` on odd
shapes (M 1/3/17/64, N 13/33, K 100 or 3 groups), fp16 and fp32, each code path forced by an
explicit small config: gemv (decode), gemv with split-K, tiled MMA, tiled MMA with swapped
operands and split-K. ``_triton.interpreted`` imports a second copy of the kernels with
TRITON_INTERPRET=1 set (Triton reads it when a @triton.jit function is defined) and keeps it
set during the calls, so this works whenever Triton was first imported, and GPU tests in the
same session keep their compiled kernels. Plus the host-side pieces that need no GPU: config
spaces, the on-disk autotune cache, loading and registration, warmup's walk over a model, the
dense-fallback hook, and that importing pyquant does not import Triton.

GPU part (``-m gpu``, skipped without CUDA): the compiled kernels against the reference through
``torch.ops.pyquant.*`` with the triton backend forced, bf16 included; every autotuning
candidate of a representative shape; the disk cache; warmup; torch.compile(fullgraph=True).
Run on a GPU machine with:  pytest -m gpu tests/test_triton.py
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import (
    activation,
    assert_close_named,
    assert_dense_path_close,
    make_bias,
    random_int4_weight,
    random_int8_weight,
    tol_name,
)
import pyquant
from pyquant import _triton, formats, ops, reference

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_CUDA = torch.cuda.is_available()
OPS = ("int8_weight_only_mm", "int8_dynamic_mm", "int4_weight_only_mm")
INT4_GROUPS = (32, 128)
CPU_DTYPES = (torch.float16, torch.float32)  # the interpreter has no bf16 dot

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(
    not (HAVE_TRITON and HAVE_CUDA and _triton.why_unavailable() is None),
    reason=f"needs the Triton backend on a CUDA GPU: {_triton._static_reason()}")

# Small explicit configs: the interpreter's cost grows with the number of programs and loop
# iterations, not with the tile size, so these are chosen to keep each call well under 1 s.
GEMV = dict(path="gemv", BLOCK_N=16, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=2)
GEMV_SPLIT = dict(GEMV, BLOCK_K=32, SPLIT_K=2)
TILED = dict(path="tiled", SWAP_AB=False, BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2,
             SPLIT_K=1, num_warps=4, num_stages=2)
TILED_SWAP_SPLIT = dict(TILED, SWAP_AB=True, SPLIT_K=2)
PATHS = {"gemv": GEMV, "gemv_splitk": GEMV_SPLIT, "tiled": TILED,
         "tiled_swap_splitk": TILED_SWAP_SPLIT}
# gemv is the decode path: one program per row, so M = 64 only costs interpreter time.
PATH_MS = {"gemv": (1, 3, 17), "gemv_splitk": (1, 3, 17), "tiled": (1, 3, 17, 64),
           "tiled_swap_splitk": (1, 3, 17, 64)}
CASES = [(p, m) for p in PATHS for m in PATH_MS[p]]
# Without bias, with a bias in the activation dtype, and an fp32 bias on fp16 activations.
DTYPE_BIAS = [(torch.float16, None), (torch.float16, "fp32"), (torch.float32, "x")]
DTYPE_BIAS_IDS = ["fp16-nobias", "fp16-fp32bias", "fp32-bias"]


def _n_for(m: int) -> int:
    return 13 if m in (1, 17) else 33  # no multiple of any block size


def _int4_config(path: str, group: int) -> dict:
    c = dict(PATHS[path])
    # K per iteration: one sub-tile of 32 (group 32) or 64 (group 128) values.
    c["BLOCK_K"] = 32 if group == 32 else 64
    return c


@pytest.fixture(scope="module")
def interp():
    """{op: interpreted launcher}; skips when Triton or its interpreter cannot run here."""
    if not HAVE_TRITON:
        pytest.skip("Triton is not installed")
    fns = {op: _triton.interpreted(op) for op in OPS}
    try:  # a kernel with a run-time loop bound: what old interpreters fail on
        fns["int8_weight_only_mm"](torch.ones(1, 64), torch.ones(16, 64, dtype=torch.int8),
                                   torch.ones(16), None, config=GEMV_SPLIT)
    except Exception as e:
        if "0-dimensional" in str(e):
            import numpy
            import triton

            pytest.skip(f"the interpreter of Triton {triton.__version__} does not run with "
                        f"numpy {numpy.__version__}; use numpy<2.4 or a newer Triton")
        raise
    return fns


def _check(actual, x, op, wargs, bias, msg=""):
    expected = getattr(reference, op)(x, *wargs, bias)
    assert actual.dtype == x.dtype and actual.shape == expected.shape
    assert_close_named(actual, expected, tol_name(op, x.dtype), msg)


# ------------------------------------------------------------- interpreter: paths x shapes


@pytest.mark.parametrize("dtype,bias", DTYPE_BIAS, ids=DTYPE_BIAS_IDS)
@pytest.mark.parametrize("path,m", CASES, ids=[f"{p}-M{m}" for p, m in CASES])
@pytest.mark.parametrize("op", ["int8_weight_only_mm", "int8_dynamic_mm"])
def test_int8_interpreted(interp, op, path, m, dtype, bias):
    n, k = _n_for(m), 100
    x = activation((m, k), dtype, seed=m)
    wargs = random_int8_weight(n, k, seed=n)
    b = make_bias(n, bias, dtype)
    _check(interp[op](x, *wargs, b, config=PATHS[path]), x, op, wargs, b, path)


@pytest.mark.parametrize("dtype,bias", DTYPE_BIAS, ids=DTYPE_BIAS_IDS)
@pytest.mark.parametrize("group", INT4_GROUPS)
@pytest.mark.parametrize("path,m", CASES, ids=[f"{p}-M{m}" for p, m in CASES])
def test_int4_interpreted(interp, path, m, group, dtype, bias):
    op = "int4_weight_only_mm"
    n, k = _n_for(m), 3 * group
    x = activation((m, k), dtype, seed=m)
    wargs = (*random_int4_weight(n, k, group, seed=n), group)
    b = make_bias(n, bias, dtype)
    _check(interp[op](x, *wargs, b, config=_int4_config(path, group)), x, op, wargs, b, path)


GEMV32 = dict(path="gemv32", BLOCK_N=16, BLOCK_K=32, SPLIT_K=1, num_warps=4, num_stages=2)


@pytest.mark.parametrize("dtype,bias", DTYPE_BIAS, ids=DTYPE_BIAS_IDS)
@pytest.mark.parametrize("group", INT4_GROUPS)
@pytest.mark.parametrize("split,m", [(1, 1), (1, 3), (1, 17), (3, 1), (2, 3)])
def test_int4_gemv32_interpreted(interp, split, m, group, dtype, bias):
    """The word-wise decode GEMV: odd N, one or two sub-tiles per iteration and per group,
    split K."""
    op = "int4_weight_only_mm"
    n, k = _n_for(m), 4 * group
    x = activation((m, k), dtype, seed=m)
    wargs = (*random_int4_weight(n, k, group, seed=n), group)
    b = make_bias(n, bias, dtype)
    cfg = dict(GEMV32, BLOCK_K=64 if split == 1 else 32, SPLIT_K=split)
    _check(interp[op](x, *wargs, b, config=cfg), x, op, wargs, b, f"gemv32 {cfg}")


def test_int4_gemv32_any_zero_and_strided_x(interp):
    """Zero points past 15 (the op takes any uint8; 2^23 + zero * 16^3 must stay exact),
    activations far from zero mean, a strided and a 3-D x."""
    op, group = "int4_weight_only_mm", 32
    n, k = 13, 4 * group
    p, s, _ = random_int4_weight(n, k, group, seed=3)
    z = torch.randint(0, 256, s.shape, generator=torch.Generator().manual_seed(1),
                      dtype=torch.uint8)
    wargs = (p, s, z, group)
    cfg = dict(GEMV32, BLOCK_K=64, SPLIT_K=2)
    x = (activation((3, 2 * k), torch.float32, seed=5) + 10)[:, ::2]
    _check(interp[op](x, *wargs, None, config=cfg), x, op, wargs, None, "strided, zero<=255")
    x3 = activation((2, 2, k), torch.float16, seed=6)
    _check(interp[op](x3, *wargs, None, config=cfg), x3, op, wargs, None, "3-D")


def test_int4_gemv32_refuses_unfit_weights(interp):
    op, group = "int4_weight_only_mm", 32
    p, s, z = random_int4_weight(5, 64, group)
    x = activation((1, 64), torch.float32)
    wide = torch.zeros(5, 33, dtype=torch.uint8)
    wide[:, 1:] = p  # rows start at an odd byte
    with pytest.raises(ValueError, match="gemv32 path needs contiguous, 4-byte aligned"):
        interp[op](x, wide[:, 1:], s, z, group, None, config=GEMV32)
    p6, s6, z6 = random_int4_weight(5, 12, 6)
    with pytest.raises(ValueError, match="multiple of 8 codes"):
        interp[op](activation((1, 12), torch.float32), p6, s6, z6, 6, None, config=GEMV32)


@pytest.mark.parametrize("path", ["gemv", "tiled", "tiled_swap_splitk"])
def test_int4_several_subtiles_per_iteration(interp, path):
    """BLOCK_K = 2 groups of 32: N_SUB = 2 sub-tiles per iteration, each with its own scale."""
    op, n, k, g = "int4_weight_only_mm", 13, 256, 32
    x = activation((5, k), torch.float32, seed=1)
    wargs = (*random_int4_weight(n, k, g, seed=2), g)
    c = dict(PATHS[path], BLOCK_K=64)
    mod = _triton.kernels(interpret=True).int4_weight_only_mm
    assert mod.sub_tiles(64, k, g) == (32, 2)
    _check(interp[op](x, *wargs, None, config=c), x, op, wargs, None, path)


@pytest.mark.parametrize("group", [2, 6, 48])
def test_int4_groups_without_factor_32(interp, group):
    """Group sizes with no factor 32 run on the gemv path at any M (sub-tiles of 2/2/16);
    the tensor-core path refuses them with a clear error."""
    op, n, k = "int4_weight_only_mm", 13, 2 * group * (3 if group > 2 else 8)
    x = activation((3, k), torch.float16, seed=group)
    wargs = (*random_int4_weight(n, k, group, seed=group), group)
    b = make_bias(n, "x", torch.float16)
    _check(interp[op](x, *wargs, b, config=dict(GEMV, BLOCK_K=64)), x, op, wargs, b)
    _check(interp[op](x, *wargs, b), x, op, wargs, b, "default config")
    with pytest.raises(ValueError, match=f"group_size={group}"):
        interp[op](x, *wargs, b, config=dict(TILED, BLOCK_K=64))


def _op_args(op: str, n: int, k: int, seed: int = 0):
    if op == "int4_weight_only_mm":
        return (*random_int4_weight(n, k, 32, seed=seed), 32)
    return random_int8_weight(n, k, seed=seed)


@pytest.mark.parametrize("layout", ["col_slice", "transposed", "row_step"])
@pytest.mark.parametrize("path", ["gemv_splitk", "tiled", "tiled_swap_splitk"])
@pytest.mark.parametrize("op", OPS)
def test_strided_activations(interp, op, path, layout):
    n, k = 13, 128
    x = activation((5, k), torch.float16, layout=layout)
    wargs = _op_args(op, n, k)
    c = _int4_config(path, 32) if op == "int4_weight_only_mm" else PATHS[path]
    _check(interp[op](x, *wargs, None, config=c), x, op, wargs, None, f"{path} {layout}")


@pytest.mark.parametrize("op", OPS)
def test_3d_and_empty(interp, op):
    n, k = 13, 64
    wargs = _op_args(op, n, k)
    b = make_bias(n, "fp32", torch.float16)
    x = activation((2, 3, k), torch.float16)
    y = interp[op](x, *wargs, b, config=TILED)
    assert y.shape == (2, 3, n)
    _check(y, x, op, wargs, b)
    y0 = interp[op](torch.zeros(0, k, dtype=torch.float16), *wargs, b)
    assert y0.shape == (0, n) and y0.dtype == torch.float16


@pytest.mark.parametrize("m", [1, 2, 20])
@pytest.mark.parametrize("op", OPS)
def test_default_config(interp, op, m):
    """The heuristic config (what runs untuned, or under CUDA-graph capture): gemv (int4:
    gemv32) at M=1, gemv or swapped tiles at M=2, swapped tiles with split-K at M=20."""
    n, k = 33, 256
    x = activation((m, k), torch.float16, seed=m)
    wargs = _op_args(op, n, k)
    _check(interp[op](x, *wargs, None), x, op, wargs, None, "default")


def _quant_cases():
    g = torch.Generator().manual_seed(0)
    ties = []
    for e in (0, -3, 4):
        s = 2.0 ** e
        j = torch.arange(-126, 126, dtype=torch.float32)
        ties.append(torch.cat((torch.tensor([127 * s]), (j + 0.5) * s)))
    x = torch.stack(ties)
    near = []
    for amax in torch.rand(4, generator=g) * 10 + 0.1:
        s = amax / 127
        j = torch.arange(0, 126, dtype=torch.float32)
        v = (j + 0.5) * s
        near.append(torch.cat((amax[None], v, -v, torch.nextafter(v, v * 2)))[:253])
    tiny = torch.finfo(torch.float32).smallest_normal
    special = torch.zeros(3, 253)
    special[1, :3] = torch.tensor([tiny * 0.5, -tiny * 0.25, 0.0])
    special[2] = torch.randn(253, generator=g) * 1e30
    return torch.cat((x, torch.stack(near), special))


def test_quantize_rows_bit_exact(interp):
    """The per-token codes and scales of the tiled path equal formats.quantize_rows_int8 bit
    for bit: ties to even, near ties (true division), zero / subnormal / huge rows."""
    x = _quant_cases()
    mod = _triton.kernels(interpret=True).int8_dynamic_mm
    with _triton._env("TRITON_INTERPRET", "1"):
        q, s = mod.quantize_rows(x)
    want_q, want_s = formats.quantize_rows_int8(x)
    assert torch.equal(s, want_s)
    assert torch.equal(q, want_q)


@pytest.mark.parametrize("path", ["gemv", "gemv_splitk", "tiled_swap_splitk"])
def test_int8_dynamic_fused_quantization_exact(interp, path):
    """The gemv path quantizes x inside the matmul kernel: with weights of all ones, a code off
    by one shows up as an output off by s*w_scale, far outside the epilogue tolerance."""
    x = _quant_cases()[:6, :100].contiguous()
    w = torch.ones(16, 100, dtype=torch.int8)
    ws = torch.ones(16)
    y = interp["int8_dynamic_mm"](x, w, ws, None, config=PATHS[path])
    _check(y, x, "int8_dynamic_mm", (w, ws), None, path)


@pytest.mark.parametrize("op", OPS)
def test_every_candidate_config(interp, op):
    """Every config the autotuner may pick for some M bucket runs correctly (interpreted, on
    a shape that leaves partial tiles everywhere)."""
    ks = _triton.kernels(interpret=True)
    mod = getattr(ks, op)
    n, k = 40, 256
    wargs = _op_args(op, n, k)
    seen = []
    for mb in (1, 16, 64):
        if op == "int4_weight_only_mm":
            cands = mod.candidates(mb, n, k, 32, torch.float16, 132)
        elif op == "int8_dynamic_mm":
            cands = mod.candidates(mb, n, k, 132)
        else:
            cands = mod.candidates(mb, n, k, torch.float16, 132)
        for c in cands:
            if c not in seen:
                seen.append(c)
    assert len(seen) >= 8
    for c in seen:
        m = 2 if c["path"] == "gemv" else 20  # gemv: one program per row
        x = activation((m, k), torch.float16, seed=3)
        _check(interp[op](x, *wargs, None, config=c), x, op, wargs, None, str(c))


# ---------------------------------------------------------------- host side, no kernels


@needs_triton
def test_candidate_spaces_are_sane():
    ks = _triton.kernels(interpret=True)
    for mb in (1, 2, 4, 8, 16, 32, 64, 128, 1024, 4096):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for n, k in ((4096, 4096), (11008, 4096), (1024, 8192), (13, 96)):
                for op, cands in (
                    ("int8_weight_only_mm", ks.int8_weight_only_mm.candidates(mb, n, k, dt, 132)),
                    ("int8_dynamic_mm", ks.int8_dynamic_mm.candidates(mb, n, k, 132)),
                    ("int4_weight_only_mm",
                     ks.int4_weight_only_mm.candidates(mb, n, k, 32, dt, 132)),
                ):
                    assert 1 <= len(cands) <= 40, (op, mb, n, k, len(cands))
                    for c in cands:
                        assert c["path"] in ("gemv", "tiled", "gemv32")
                        assert c["SPLIT_K"] >= 1 and c["num_warps"] in (1, 2, 4, 8)
                        if c["path"] == "gemv":
                            assert mb <= 16
                        if c["path"] == "gemv32":
                            assert op == "int4_weight_only_mm" and mb <= 4
                        elif op == "int4_weight_only_mm":
                            assert ks.int4_weight_only_mm.tiled_ok(32, c["BLOCK_K"])
    # a weight that cannot be read as words gets no gemv32 candidate
    assert not [c for c in ks.int4_weight_only_mm.candidates(1, 4096, 4096, 128, torch.bfloat16,
                                                              132, words=False)
                if c["path"] == "gemv32"]
    # group 48 has no factor 32: the gemv paths only, at every M
    c = ks.int4_weight_only_mm.candidates(4096, 4096, 4800, 48, torch.bfloat16, 132)
    assert c and all(x["path"] in ("gemv", "gemv32") for x in c)


@needs_triton
def test_m_bucket_and_key():
    at = _triton.kernels(interpret=True)._autotune
    assert [at.m_bucket(m) for m in (1, 2, 3, 5, 16, 17, 4096, 10000)] == [
        1, 2, 4, 8, 16, 32, 4096, 4096]
    assert at.make_key("int4_weight_only_mm", torch.bfloat16, 3, 4096, 11008, g=128) == \
        "int4_weight_only_mm|bfloat16|M4|N4096|K11008|g=128"


@needs_triton
def test_autotune_disk_cache(tmp_path, monkeypatch):
    """tune() benchmarks every candidate once, keeps the fastest, writes it to
    $PYQUANT_CACHE_DIR/triton_autotune.json, and a fresh process (memory cache cleared)
    reads it back without benchmarking; candidates that fail are skipped."""
    at = _triton.kernels(interpret=True)._autotune
    monkeypatch.setenv("PYQUANT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(at, "section", lambda device: "FakeGPU sm90 triton-x")
    times = {1: 30.0, 2: 10.0, 3: 20.0}
    monkeypatch.setattr(at, "_bench", lambda fn: (fn(), times[ran[-1]])[1])
    ran = []

    def run(c):
        if c["id"] == 4:
            raise RuntimeError("out of resources: shared memory")
        ran.append(c["id"])
        # id 5: a config that runs but computes garbage (a miscompile): fastest, yet rejected
        return torch.full((3,), 9.0 if c["id"] == 5 else 1.0)

    times[5] = 1.0
    at.clear_memory_cache()
    cands = [{"id": i} for i in (1, 2, 3, 4, 5)]
    dev = torch.device("cpu")
    assert at.tune(dev, "op|k", cands, run, {"id": 0}) == {"id": 2}
    data = json.loads((tmp_path / "triton_autotune.json").read_text())
    entry = data["sections"]["FakeGPU sm90 triton-x"]["op|k"]
    assert entry["config"] == {"id": 2} and entry["us"] == 10.0 and entry["candidates"] == 5
    assert [r["id"] for r in entry["rejected"]] == [4, 5]
    assert "differs" in entry["rejected"][1]["error"]
    at.clear_memory_cache()
    ran.clear()
    assert at.tune(dev, "op|k", cands, run, {"id": 0}) == {"id": 2}
    assert ran == []  # read from disk, nothing benchmarked
    monkeypatch.setenv("PYQUANT_TRITON_AUTOTUNE", "0")
    assert at.tune(dev, "op|other", cands, run, {"id": 0}) == {"id": 0}
    at.clear_memory_cache()


@needs_triton
def test_autotune_cache_survives_bad_files(tmp_path, monkeypatch):
    at = _triton.kernels(interpret=True)._autotune
    monkeypatch.setenv("PYQUANT_CACHE_DIR", str(tmp_path))
    (tmp_path / "triton_autotune.json").write_text("{not json")
    monkeypatch.setattr(at, "section", lambda device: "S")
    at.clear_memory_cache()
    assert at.lookup(torch.device("cpu"), "x") is None
    monkeypatch.setattr(at, "_bench", lambda fn: 1.0)
    at.tune(torch.device("cpu"), "x", [{"a": 1}], lambda c: torch.zeros(1), {"a": 0})
    assert json.loads((tmp_path / "triton_autotune.json").read_text())["version"] == 1
    at.clear_memory_cache()


def test_why_unavailable_names_the_reason(monkeypatch):
    why = _triton.why_unavailable()
    if not HAVE_TRITON:
        assert "Triton is not installed" in why
    elif not HAVE_CUDA:
        assert "no CUDA device" in why
    real = importlib.util.find_spec
    monkeypatch.setitem(_triton._STATE, "available", False)  # forget an earlier success
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    assert "Triton is not installed" in _triton.why_unavailable()
    assert "pyquant[triton]" in _triton.why_unavailable()


@needs_triton
def test_loading_registers_all_ops(monkeypatch):
    """When Triton and a GPU are present, the first probe loads the compiled kernels (from
    pyquant/kernels or <repo>/pyquant_triton/kernels) and registers one impl per op with ops.py."""
    monkeypatch.setattr(_triton, "_static_reason", lambda: None)
    saved = dict(ops._REGISTRY["triton"].impls)
    monkeypatch.setitem(_triton._STATE, "registered", False)
    monkeypatch.setitem(_triton._STATE, "available", False)
    try:
        assert _triton.why_unavailable() is None
        assert set(ops._REGISTRY["triton"].impls) == set(_triton.OPS) >= set(OPS)
        ks = _triton.kernels()
        assert type(ks.int8_dynamic_mm._tiled_kernel).__name__ == "JITFunction"
        assert _triton.kernels_dir() is not None
    finally:
        ops._REGISTRY["triton"].impls.clear()
        ops._REGISTRY["triton"].impls.update(saved)


def test_dense_fallback_hook(monkeypatch):
    # what the H200 measured (pyquant.bench_cuda): the dense path from M = 1024, except W8A8
    assert _triton.DENSE_FALLBACK_MIN_M == {"int8_weight_only_mm": 1024,
                                            "int4_weight_only_mm": 1024, "sparse24_mm": 1024,
                                            "sparse24_int8_mm": 1024}
    plan = _triton.dispatch_plan()
    assert plan["int8_dynamic_mm"] == "Triton kernel at every M"
    assert plan["sparse24_mm"] == ("Triton kernel for M < 1024, dequantize + dense matmul for "
                                   "M >= 1024")
    assert "pyquant.bench_cuda" in _triton.dense_fallback_reason("sparse24_int8_mm", 4096)
    monkeypatch.setitem(_triton.DENSE_FALLBACK_MIN_M, "int4_weight_only_mm", 256)
    assert _triton.dense_fallback_reason("int4_weight_only_mm", 255) is None
    assert "M=256 >= 256" in _triton.dense_fallback_reason("int4_weight_only_mm", 256)
    assert "M >= 256" in _triton.dispatch_plan()["int4_weight_only_mm"]


def _dequant_cases():
    # (kind, N, K, group): N no multiple of BLOCK_N, K no multiple of BLOCK_K (256)
    return [("int8", 13, 100, None), ("int8", 33, 300, None), ("int4", 13, 96, 32),
            ("int4", 33, 384, 128), ("int4", 5, 600, 200)]


def _dequant_pair(kind, n, k, group, dq, seed=0, device="cpu", strided=False, words=True):
    """(kernel's, formats') dense weight; ``strided``: the quantized tensors are column
    slices of wider ones; ``words=False``: the int4 kernel that reads bytes."""
    if kind == "int8":
        q, s = random_int8_weight(n, 2 * k if strided else k, seed=seed)
        q = q[:, ::2] if strided else q
        q, s = q.to(device), s.to(device)
        return (lambda dt: dq.dequantize_int8(q, s, dt)), formats.dequantize_int8_per_channel(q, s)
    p, sc, z = random_int4_weight(n, k, group, seed=seed)
    if strided:  # same values, row stride doubled
        p = torch.cat([p, torch.zeros_like(p)], 1)[:, : p.shape[1]]
        sc = torch.cat([sc, sc], 1)[:, : sc.shape[1]]
        z = torch.cat([z, z], 1)[:, : z.shape[1]]
    p, sc, z = p.to(device), sc.to(device), z.to(device)
    return ((lambda dt: dq.dequantize_int4(p, sc, z, group, dt, words=words)),
            formats.dequantize_int4_groupwise(p, sc, z, group))


@needs_triton
@pytest.mark.parametrize("words", [True, False], ids=["words", "bytes"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("case", _dequant_cases(), ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}")
def test_dequant_interpreted_bit_exact(case, strided, words):
    """The dense path's one-pass dequantization equals formats.dequantize_* rounded once to the
    activation dtype, bit for bit, on odd shapes and strided weights, int4 read as words and
    as bytes."""
    if case[0] == "int8" and not words:
        pytest.skip("int8 has one kernel")
    dq = _triton.kernels(interpret=True).dequant
    kind, n, k, group = case
    run, want = _dequant_pair(kind, n, k, group, dq, seed=n, strided=strided, words=words)
    with _triton._env("TRITON_INTERPRET", "1"):
        for dt in CPU_DTYPES:
            got = run(dt)
            assert got.dtype == dt and got.shape == (n, k) and got.is_contiguous()
            assert torch.equal(got, want.to(dt)), (case, dt)
        assert run(torch.float32).shape == (n, k)


@needs_triton
def test_warmup_walks_quantized_layers(monkeypatch):
    """warmup runs each quantized layer's op once per (layer shape, M bucket), picking the op
    by the most specific layer class, and skips everything else (interpreted, on the CPU)."""
    calls = []
    for op in OPS:
        fn = _triton.interpreted(op)
        monkeypatch.setitem(_triton._IMPLS, op,
                            lambda x, *a, op=op, fn=fn: (calls.append((op, x.shape)), fn(x, *a)))
    monkeypatch.setattr(_triton, "why_unavailable", lambda: None)
    real_kernels = _triton.kernels
    monkeypatch.setattr(_triton, "kernels", lambda interpret=False: real_kernels(True))
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=32))
    report = _triton.warmup(model, batch_sizes=(1, 3, 4), device_types=("cpu",))
    # two layer shapes ([32, 64] and [32, 32] twice) x two M buckets (1; 3 and 4 share 4)
    assert [(r["op"], r["n"], r["k"], r["m_bucket"]) for r in report] == [
        ("int4_weight_only_mm", 32, 64, 1), ("int4_weight_only_mm", 32, 64, 4),
        ("int4_weight_only_mm", 32, 32, 1), ("int4_weight_only_mm", 32, 32, 4)]
    assert [c[0] for c in calls] == ["int4_weight_only_mm"] * 4
    model8 = torch.nn.Sequential(torch.nn.Linear(32, 16))
    pyquant.quantize_(model8, pyquant.Int8Dynamic())
    calls.clear()
    assert len(_triton.warmup(model8, batch_sizes=(2,), device_types=("cpu",))) == 1
    assert calls == [("int8_dynamic_mm", (2, 32))]


def test_import_pyquant_does_not_import_triton():
    code = ("import sys, pyquant, pyquant.ops, pyquant.nn; "
            "assert 'triton' not in sys.modules, 'pyquant imported triton'; "
            "assert 'pyquant.kernels' not in sys.modules")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(pyquant.__file__))] + sys.path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------------- GPU only


def _gpu_args(op, n, k, group=128, seed=0):
    if op == "int4_weight_only_mm":
        return tuple(t.cuda() for t in random_int4_weight(n, k, group, seed=seed)) + (group,)
    return tuple(t.cuda() for t in random_int8_weight(n, k, seed=seed))


def _run_triton(op, x, wargs, bias):
    with pyquant.use_backend("triton"):
        assert ops.select(op, x.device).name == "triton"
        return getattr(torch.ops.pyquant, op)(x, *wargs, bias)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_gpu_ops_vs_reference(op, dtype, monkeypatch):
    """Odd shapes through torch.ops.pyquant with the triton backend forced, heuristic configs
    (tuning is tested separately; it would compile every candidate here)."""
    monkeypatch.setenv("PYQUANT_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(_triton, "DENSE_FALLBACK_MIN_M", {})  # the kernels, at every M
    n, k = 33, 384  # N: no multiple of any block; K: 3 groups of 128
    wargs = _gpu_args(op, n, k, group=128)
    for m in (1, 3, 17, 64, 300):
        x = activation((m, k), dtype, seed=m).cuda()
        # Bias on odd M only: each compiled variant (HAS_BIAS) is built once or twice, not
        # for every M (compiling, not running, is what costs time here).
        b = make_bias(n, "x" if m % 2 else None, dtype)
        b = None if b is None else b.cuda()
        _check(_run_triton(op, x, wargs, b), x, op, wargs, b, f"M={m} N={n} K={k}")
    # 3-D and strided (every other column of a wider tensor) activations, empty batch
    x3 = activation((2, 5, k), dtype, seed=7).cuda()
    _check(_run_triton(op, x3, wargs, None), x3, op, wargs, None, "3-D")
    xs = activation((6, 2 * k), dtype, seed=8).cuda()[:, ::2]
    _check(_run_triton(op, xs, wargs, None), xs, op, wargs, None, "strided")
    x0 = activation((0, k), dtype).cuda()
    assert _run_triton(op, x0, wargs, None).shape == (0, n)


@gpu
@needs_gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_every_candidate(op):
    """Every autotuning candidate of the M buckets 1, 16, 128 (bf16): each compiles for this
    GPU and is correct. N, K divisible by 16 like the benchmark's shapes, so the compiled
    kernels are shared with it through Triton's cache; partial tiles are the interpreter's
    and test_gpu_ops_vs_reference's business."""
    dtype = torch.bfloat16
    ks = _triton.kernels()
    mod = getattr(ks, op)
    n, k = 4096, 1024
    wargs = _gpu_args(op, n, k, group=128, seed=1)
    failures = []
    for m in (1, 16, 128):
        x = activation((m, k), dtype, seed=m).cuda()
        if op == "int4_weight_only_mm":
            cands = mod.candidates(m, n, k, 128, dtype, 132)
        elif op == "int8_dynamic_mm":
            cands = mod.candidates(m, n, k, 132)
        else:
            cands = mod.candidates(m, n, k, dtype, 132)
        for c in cands:
            y = getattr(mod, op)(x, *wargs, None, config=c)
            try:
                _check(y, x, op, wargs, None, f"M={m} {c}")
            except AssertionError as e:  # every broken config in one report, not the first
                failures.append(str(e).splitlines()[0][:400])
    assert not failures, f"{len(failures)} configs wrong:\n" + "\n".join(failures)


@gpu
@needs_gpu
def test_gpu_dequant_and_dense_path(monkeypatch):
    """The compiled dequantization is bit-exact (bf16 too), and the dense path it feeds
    (DENSE_FALLBACK_MIN_M reached) matches the reference within the op's tolerance."""
    dq = _triton.kernels().dequant
    for case in _dequant_cases():
        kind, n, k, group = case
        for words in (True, False):
            run, want = _dequant_pair(kind, n, k, group, dq, seed=n, device="cuda", words=words)
            for dt in (torch.float16, torch.bfloat16, torch.float32):
                assert torch.equal(run(dt), want.to(dt)), (case, dt, words)
    monkeypatch.setenv("PYQUANT_TRITON_AUTOTUNE", "0")
    for op in ("int8_weight_only_mm", "int4_weight_only_mm"):
        monkeypatch.setitem(_triton.DENSE_FALLBACK_MIN_M, op, 2)
        wargs = _gpu_args(op, 33, 384)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            x = activation((1, 384), dtype, seed=1).cuda()  # below the bound: the kernel
            _check(_run_triton(op, x, wargs, None), x, op, wargs, None, f"{op} M=1")
            x = activation((300, 384), dtype, seed=3).cuda()
            b = make_bias(33, "x", dtype).cuda()
            _check_dense_path(_run_triton(op, x, wargs, b), x, op, wargs, b)


def _check_dense_path(y, x, op, wargs, bias):
    w = (formats.dequantize_int8_per_channel(*wargs) if op == "int8_weight_only_mm"
         else formats.dequantize_int4_groupwise(*wargs))
    assert_dense_path_close(y, getattr(reference, op)(x, *wargs, bias),
                            x.float().abs() @ w.abs().t(), x.dtype)


@gpu
@needs_gpu
def test_gpu_quantize_rows_bit_exact():
    x = _quant_cases()[:-2].cuda()  # subnormal rows: see the interpreter test
    q, s = _triton.kernels().int8_dynamic_mm.quantize_rows(x)
    want_q, want_s = formats.quantize_rows_int8(x.cpu())
    assert torch.equal(s.cpu(), want_s)
    assert torch.equal(q.cpu(), want_q)


@gpu
@needs_gpu
def test_gpu_autotune_disk_cache(tmp_path, monkeypatch):
    """First call tunes and writes the cache file; a 'new process' (memory cache cleared)
    reads the config from disk without benchmarking anything."""
    monkeypatch.setenv("PYQUANT_CACHE_DIR", str(tmp_path))
    at = _triton.kernels()._autotune
    at.clear_memory_cache()
    op, n, k = "int8_weight_only_mm", 1000, 512
    wargs = _gpu_args(op, n, k)
    x = activation((8, k), torch.bfloat16).cuda()
    _check(_run_triton(op, x, wargs, None), x, op, wargs, None)
    data = json.loads((tmp_path / "triton_autotune.json").read_text())
    (section,) = data["sections"]
    assert torch.cuda.get_device_name() in section
    key = at.make_key(op, torch.bfloat16, 8, n, k)
    assert key in data["sections"][section]
    at.clear_memory_cache()

    def no_bench(fn):
        raise AssertionError("tuned again although the disk cache has the key")

    monkeypatch.setattr(at, "_bench", no_bench)
    x5 = activation((5, k), torch.bfloat16).cuda()  # same M bucket (8)
    _check(_run_triton(op, x5, wargs, None), x5, op, wargs, None)
    at.clear_memory_cache()


def _tiny_model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.ReLU(),
                               torch.nn.Linear(384, 256)).to("cuda", dtype)


@gpu
@needs_gpu
@pytest.mark.parametrize("cfg", [pyquant.Int8WeightOnly(), pyquant.Int8Dynamic(),
                                 pyquant.Int4WeightOnly(group_size=128)], ids=str)
def test_gpu_compile_fullgraph_and_warmup(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("PYQUANT_CACHE_DIR", str(tmp_path))
    _triton.kernels()._autotune.clear_memory_cache()
    model = _tiny_model(torch.bfloat16)
    pyquant.quantize_(model, cfg)
    report = _triton.warmup(model, batch_sizes=(1, 16))
    assert len(report) == 4  # 2 layer shapes x 2 buckets
    assert (tmp_path / "triton_autotune.json").exists()
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    with pyquant.use_backend("triton"):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    _triton.kernels()._autotune.clear_memory_cache()


@gpu
@needs_gpu
def test_gpu_auto_dispatch_includes_triton(no_backend_env):
    for op in OPS:
        assert "triton" in ops.available_backends(op, "cuda")
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    wargs = _gpu_args("int8_dynamic_mm", 64, 256)
    y = torch.ops.pyquant.int8_dynamic_mm(x, *wargs, None)  # cuda or triton, never reference
    assert ops.select("int8_dynamic_mm", x.device).name in ("cuda", "triton")
    _check(y, x, "int8_dynamic_mm", wargs, None)


def test_the_source_tree_shadows_no_other_package():
    """The kernel sources are in pyquant_triton/kernels/, not a top-level kernels/: with the source tree on
    sys.path (an editable install), a top-level kernels/ was imported by transformers >= 5.25 in
    place of Hugging Face's kernels package, and loading any model failed."""
    import importlib.util
    import pathlib

    root = pathlib.Path(pyquant.__file__).resolve().parent.parent
    spec = importlib.util.find_spec("kernels")
    # (Hugging Face's package itself may sit in a virtualenv inside the tree: that is fine)
    assert spec is None or pathlib.Path(spec.origin or "").resolve().parent != root / "kernels"
    assert not (root / "kernels").exists()
