"""The Triton kernels of the 2:4 sparse ops (pyquant_triton/kernels/sparse24_mm.py), run under the Triton
interpreter on the CPU against ``pyquant.reference``: both ops (float and int8 kept values),
each code path forced by a small explicit config (gemv, gemv with split-K, tiled, tiled with
swapped operands and split-K), odd shapes (M 1/3/17/64, N 13/33, K 100: the last meta byte
half used), strided and 3-D activations, empty batches, non-canonical meta, every autotuning
candidate, and the registration with ops.py. The compiled kernels on a GPU:
``pytest -m gpu tests/test_triton.py tests/test_triton_sparse.py``.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import (activation, assert_close_named, assert_dense_path_close, gen, make_bias,
                     tol_name)
from pyquant import _triton, ops, reference
from pyquant import sparse_formats as sf

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_CUDA = torch.cuda.is_available()
SPARSE_OPS = ("sparse24_mm", "sparse24_int8_mm")

GEMV = dict(path="gemv", BLOCK_N=16, BLOCK_S=64, SPLIT_K=1, num_warps=4, num_stages=2)
GEMV_SPLIT = dict(GEMV, BLOCK_S=16, SPLIT_K=2)
TILED = dict(path="tiled", SWAP_AB=False, BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2,
             SPLIT_K=1, num_warps=4, num_stages=2)
TILED_SWAP_SPLIT = dict(TILED, SWAP_AB=True, SPLIT_K=2)
PATHS = {"gemv": GEMV, "gemv_splitk": GEMV_SPLIT, "tiled": TILED,
         "tiled_swap_splitk": TILED_SWAP_SPLIT}
PATH_MS = {"gemv": (1, 3, 17), "gemv_splitk": (1, 3, 17), "tiled": (1, 3, 17, 64),
           "tiled_swap_splitk": (1, 3, 17, 64)}
CASES = [(p, m) for p in PATHS for m in PATH_MS[p]]
DTYPE_BIAS = [(torch.float16, None), (torch.float16, "fp32"), (torch.float32, "x")]
DTYPE_BIAS_IDS = ["fp16-nobias", "fp16-fp32bias", "fp32-bias"]


@pytest.fixture(scope="module")
def interp():
    if not HAVE_TRITON:
        pytest.skip("Triton is not installed")
    fns = {op: _triton.interpreted(op) for op in SPARSE_OPS}
    try:
        v, meta = sf.compress_24(torch.ones(16, 64))
        fns["sparse24_mm"](torch.ones(1, 64), v, meta, None, config=GEMV_SPLIT)
    except Exception as e:
        if "0-dimensional" in str(e):
            pytest.skip(f"this Triton interpreter does not run with this numpy: {e}")
        raise
    return fns


def _weights(op: str, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """(values..., meta) of a random 2:4 weight: float values stored in ``dtype`` (what
    ``sparsify_`` keeps for a layer of that dtype), or int8 values and their scale."""
    w = torch.randn(n, k, generator=gen(seed))
    v, meta = sf.compress_24(w)
    if op == "sparse24_mm":
        return (v.to(dtype), meta)
    q, s = sf.quantize_24_int8(v)
    return (q, meta, s)


def _call(fn, op, x, wargs, bias, config=None):
    if op == "sparse24_mm":
        return fn(x, wargs[0], wargs[1], bias, config=config)
    return fn(x, wargs[0], wargs[1], wargs[2], bias, config=config)


def _check(actual, x, op, wargs, bias, msg=""):
    expected = getattr(reference, op)(x, *wargs, bias)
    assert actual.dtype == x.dtype and actual.shape == expected.shape
    assert_close_named(actual, expected, tol_name(op, x.dtype), msg)


@pytest.mark.parametrize("dtype,bias", DTYPE_BIAS, ids=DTYPE_BIAS_IDS)
@pytest.mark.parametrize("path,m", CASES, ids=[f"{p}-M{m}" for p, m in CASES])
@pytest.mark.parametrize("op", SPARSE_OPS)
def test_paths_and_odd_shapes(interp, op, path, m, dtype, bias):
    n, k = (13 if m in (1, 17) else 33), 100  # K % 8 == 4: the last meta byte is half used
    x = activation((m, k), dtype, seed=m)
    wargs = _weights(op, n, k, dtype, seed=n)
    b = make_bias(n, bias, dtype)
    _check(_call(interp[op], op, x, wargs, b, PATHS[path]), x, op, wargs, b, path)


@pytest.mark.parametrize("path", ["gemv", "tiled"])
def test_fp16_values_fp32_activations(interp, path):
    """Values stored in a narrower dtype than x widen exactly."""
    x = activation((3, 64), torch.float32, seed=2)
    wargs = _weights("sparse24_mm", 13, 64, torch.float16, seed=3)
    _check(_call(interp["sparse24_mm"], "sparse24_mm", x, wargs, None, PATHS[path]), x,
           "sparse24_mm", wargs, None, path)


@pytest.mark.parametrize("layout", ["col_slice", "transposed", "row_step"])
@pytest.mark.parametrize("path", ["gemv_splitk", "tiled", "tiled_swap_splitk"])
@pytest.mark.parametrize("op", SPARSE_OPS)
def test_strided_activations(interp, op, path, layout):
    x = activation((5, 128), torch.float16, layout=layout)
    wargs = _weights(op, 13, 128, torch.float16)
    _check(_call(interp[op], op, x, wargs, None, PATHS[path]), x, op, wargs, None,
           f"{path} {layout}")


@pytest.mark.parametrize("op", SPARSE_OPS)
def test_strided_weights(interp, op):
    """Values and meta that are column slices of wider tensors (row strides > their widths)."""
    n, k = 13, 64
    wargs = list(_weights(op, n, k, torch.float32))
    wargs[0] = torch.cat((wargs[0], wargs[0][:, :5]), 1)[:, :k // 2]
    wargs[1] = torch.cat((wargs[1], wargs[1][:, :3]), 1)[:, :k // 8]
    assert not wargs[0].is_contiguous() and not wargs[1].is_contiguous()
    x = activation((3, k), torch.float32)
    for path in ("gemv", "tiled"):
        _check(_call(interp[op], op, x, wargs, None, PATHS[path]), x, op, wargs, None, path)


@pytest.mark.parametrize("op", SPARSE_OPS)
def test_3d_and_empty(interp, op):
    n, k = 13, 64
    wargs = _weights(op, n, k, torch.float16)
    b = make_bias(n, "fp32", torch.float16)
    x = activation((2, 3, k), torch.float16)
    y = _call(interp[op], op, x, wargs, b, TILED)
    assert y.shape == (2, 3, n)
    _check(y, x, op, wargs, b)
    y0 = _call(interp[op], op, torch.zeros(0, k, dtype=torch.float16), wargs, b)
    assert y0.shape == (0, n) and y0.dtype == torch.float16


@pytest.mark.parametrize("path", ["gemv", "tiled", "tiled_swap_splitk"])
def test_non_canonical_meta_matches_reference(interp, path):
    """Meta bytes the checkpoint rules call non-canonical (both slots of a group at one
    position, or in decreasing order) still give the reference's answer: the values whose
    position points at a column add up there, as sparse_formats.decompress_24 defines."""
    n, k = 13, 64
    v, _ = sf.compress_24(torch.randn(n, k, generator=gen(5)))
    meta = torch.randint(0, 256, (n, k // 8), dtype=torch.uint8, generator=gen(6))
    assert sf.sparse24_meta_problem(meta, k) is not None
    x = activation((3, k), torch.float32, seed=7)
    _check(_call(interp["sparse24_mm"], "sparse24_mm", x, (v, meta), None, PATHS[path]), x,
           "sparse24_mm", (v, meta), None, path)


@pytest.mark.parametrize("m", [2, 20, 70])
@pytest.mark.parametrize("op", SPARSE_OPS)
def test_default_config(interp, op, m):
    """The heuristic config: gemv at M = 2, swapped tiles with split-K at 20, plain at 70."""
    n, k = 33, 256
    x = activation((m, k), torch.float16, seed=m)
    wargs = _weights(op, n, k, torch.float16)
    _check(_call(interp[op], op, x, wargs, None), x, op, wargs, None, "default")


@pytest.mark.parametrize("op", SPARSE_OPS)
def test_every_candidate_config(interp, op):
    mod = getattr(_triton.kernels(interpret=True), op)
    n, k = 40, 256
    wargs = _weights(op, n, k, torch.float16)
    seen = []
    for mb in (1, 16, 64):
        for c in mod.candidates(mb, n, k, torch.float16, 132):
            if c not in seen:
                seen.append(c)
    assert len(seen) >= 8
    for c in seen:
        m = 2 if c["path"] == "gemv" else 20
        x = activation((m, k), torch.float16, seed=3)
        _check(_call(interp[op], op, x, wargs, None, c), x, op, wargs, None, str(c))


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_candidate_spaces_are_sane():
    mod = _triton.kernels(interpret=True).sparse24_mm
    for mb in (1, 2, 4, 16, 64, 1024):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for n, k in ((4096, 4096), (11008, 4096), (13, 96)):
                cands = mod.candidates(mb, n, k, dt, 132)
                assert 1 <= len(cands) <= 24
                for c in cands:
                    assert c["SPLIT_K"] >= 1 and (c["path"] == "tiled" or mb <= 16)


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
def test_registered_as_the_cuda_backend_of_the_sparse_ops(monkeypatch):
    """With Triton and a GPU present, the 2:4 ops on CUDA tensors run these kernels; the CPU
    keeps the native ones."""
    monkeypatch.setattr(_triton, "_static_reason", lambda: None)
    saved = dict(ops._REGISTRY["triton"].impls)
    monkeypatch.setitem(_triton._STATE, "registered", False)
    monkeypatch.setitem(_triton._STATE, "available", False)
    try:
        assert _triton.why_unavailable() is None
        for op in SPARSE_OPS:
            assert ops._REGISTRY["triton"].impls[op] is _triton._IMPLS[op]
        assert "sparse24_int4_mm" not in ops._REGISTRY["triton"].impls
    finally:
        ops._REGISTRY["triton"].impls.clear()
        ops._REGISTRY["triton"].impls.update(saved)


def _dense_weight(op, wargs):
    w = sf.decompress_24(wargs[0].float(), wargs[1])
    return w if op == "sparse24_mm" else w * wargs[2][:, None]


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("n,k", [(13, 100), (33, 64), (5, 1000)])
@pytest.mark.parametrize("op", SPARSE_OPS)
def test_densify_interpreted_bit_exact(op, n, k):
    """The dense path's one-pass densification equals decompress_24 (times the int8 values'
    scale) rounded once to the activation dtype, on odd shapes and strided values."""
    dq = _triton.kernels(interpret=True).dequant
    for dtype in (torch.float16, torch.float32):
        wargs = _weights(op, n, k, dtype, seed=n)
        wide = torch.cat([wargs[0], wargs[0]], 1)[:, : wargs[0].shape[1]]  # row stride doubled
        for values in (wargs[0], wide):
            with _triton._env("TRITON_INTERPRET", "1"):
                got = dq.densify_24(values, wargs[1], wargs[2] if len(wargs) == 3 else None,
                                    dtype)
            want = _dense_weight(op, wargs).to(dtype)
            assert got.shape == (n, k) and torch.equal(got, want), (op, n, k, dtype)


def _check_dense_path(y, x, op, wargs, bias):
    assert_dense_path_close(y, getattr(reference, op)(x, *wargs, bias),
                            x.float().abs() @ _dense_weight(op, wargs).abs().t(), x.dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TRITON and HAVE_CUDA and _triton.why_unavailable() is None),
                    reason="needs the Triton backend on a CUDA GPU")
@pytest.mark.parametrize("op", SPARSE_OPS)
def test_gpu_densify_and_dense_path(op, monkeypatch):
    dq = _triton.kernels().dequant
    n, k = 333, 1000
    monkeypatch.setitem(_triton.DENSE_FALLBACK_MIN_M, op, 2)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        wargs = tuple(t.cuda() for t in _weights(op, n, k, dtype, seed=2))
        got = dq.densify_24(wargs[0], wargs[1], wargs[2] if len(wargs) == 3 else None, dtype)
        assert torch.equal(got, _dense_weight(op, wargs).to(dtype))
        x = activation((64, k), dtype, seed=4).cuda()
        b = make_bias(n, "x", dtype).cuda()
        with ops.use_backend("triton"):
            y = getattr(torch.ops.pyquant, op)(x, *wargs, b)
        _check_dense_path(y, x, op, wargs, b)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TRITON and HAVE_CUDA and _triton.why_unavailable() is None),
                    reason="needs the Triton backend on a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 17, 300])
@pytest.mark.parametrize("op", SPARSE_OPS)
def test_gpu_compiled(op, m, dtype, monkeypatch):
    monkeypatch.setattr(_triton, "DENSE_FALLBACK_MIN_M", {})  # the kernels, at every M
    n, k = 333, 1000
    x = activation((m, k), dtype, seed=m).cuda()
    wargs = tuple(t.cuda() for t in _weights(op, n, k, dtype, seed=1))
    b = make_bias(n, "x", dtype).cuda()
    with ops.use_backend("triton"):
        y = getattr(torch.ops.pyquant, op)(x, *wargs, b)
    expected = getattr(reference, op)(x.cpu(), *(t.cpu() for t in wargs), b.cpu())
    assert_close_named(y.cpu(), expected, tol_name(op, dtype), f"M={m}")
