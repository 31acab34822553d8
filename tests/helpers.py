"""The only tolerance helpers of the test suite, plus the generators and backend/ISA iteration
that the op tests share.

House rule (DESIGN.md): kernel error and quantization error are tested separately.

* Kernel error: a backend's output against ``pyquant.reference`` on the *same* canonical
  (already quantized) tensors, with the named tolerances of ``TOLERANCES`` below. Integer paths
  (int8 codes, int32 accumulation) are compared exactly, not here.
* Quantization error: dequantized weights against float weights as SQNR floors (``sqnr_db``),
  in test_formats.py / test_quantize_api.py.

No test file defines its own atol/rtol: add a named entry here, with the reason for its size.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import pytest
import torch

import pyquant
from pyquant import _native, formats

OPS = ("int8_weight_only_mm", "int8_dynamic_mm", "int4_weight_only_mm")
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT4_GROUP_SIZES = (32, 64, 128, 256)

# ----------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tol:
    """|actual - expected| <= atol * scale + rtol * |expected|, element-wise, in float64, where
    ``scale`` = max |expected| over the whole tensor (1 for an all-zero tensor).

    The absolute term is relative to the tensor's magnitude, not a fixed number, because a dot
    product's rounding error scales with its terms, not with its (possibly cancelled) result:
    an output that happens to be ~0 still carries the absolute error of its magnitude class.
    """

    rtol: float
    atol: float
    why: str


# fp32 dot products summed in a different order (SIMD lanes, K blocks, threads, FMA vs
# mul+add, group-scale factored out or not) than the reference's F.linear: each ordering has
# forward error <= ~K * eps32 * sum|x*w| in the worst case and ~sqrt(K) * eps32 * rms in
# practice. For K <= 1024 and gaussian data that is < 1e-6 of max|ref|; 1e-5 leaves 10x
# margin and still catches a dropped or duplicated term (~1/K ~ 1e-3 of the scale).
# Measured (native, all 3 ISAs, K <= 1024, M <= 64): max |err| / max|ref| = 8.3e-7.
_F32_KERNEL = 1e-5
# The int8 dynamic path is exact up to the epilogue: int32 sums are exact, the x codes are
# bit-identical (tested separately), and out = float(acc) * (xs*ws) + b differs from the
# reference at most by FMA contraction of the last multiply-add: ~2 ulp of the result.
# Measured: 0 (the CPU build uses -ffp-contract=off); the slack is for GPU backends that fuse.
_F32_EPILOGUE = 4 * torch.finfo(torch.float32).eps  # 4.8e-7
# bf16/fp16 outputs: both sides compute in fp32 and round *once* to the output dtype. Two fp32
# values within d of each other round to values at most d + one output ulp apart, and one ulp
# of r is <= finfo(dtype).eps * |r| (eps is the gap at 1.0; 2^-7 bf16, 2^-10 fp16).
_EPS_BF16 = torch.finfo(torch.bfloat16).eps
_EPS_F16 = torch.finfo(torch.float16).eps

TOLERANCES: dict[str, Tol] = {
    # float-activation kernels: fp32 accumulation order
    "int8_weight_only_mm/float32": Tol(_F32_KERNEL, _F32_KERNEL, "fp32 summation order"),
    "int8_weight_only_mm/bfloat16": Tol(
        _EPS_BF16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 order + one bf16 rounding"),
    "int8_weight_only_mm/float16": Tol(
        _EPS_F16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 order + one fp16 rounding"),
    "int4_weight_only_mm/float32": Tol(_F32_KERNEL, _F32_KERNEL, "fp32 summation order"),
    "int4_weight_only_mm/bfloat16": Tol(
        _EPS_BF16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 order + one bf16 rounding"),
    "int4_weight_only_mm/float16": Tol(
        _EPS_F16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 order + one fp16 rounding"),
    # W4A8: exact int32 dot products per group, then an fp32 sum over the K/G groups (scale
    # times acc) whose order and zero-point factoring differ by backend: fp32 summation order
    "int4_dynamic_mm/float32": Tol(_F32_KERNEL, _F32_KERNEL, "fp32 sum over groups"),
    "int4_dynamic_mm/bfloat16": Tol(
        _EPS_BF16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 sum over groups + one bf16 rounding"),
    "int4_dynamic_mm/float16": Tol(
        _EPS_F16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 sum over groups + one fp16 rounding"),
    # W8A8: exact integer core, only the fp32 epilogue may round differently
    "int8_dynamic_mm/float32": Tol(_F32_EPILOGUE, _F32_EPILOGUE, "fp32 epilogue (FMA)"),
    "int8_dynamic_mm/bfloat16": Tol(
        _EPS_BF16 + _F32_EPILOGUE, 2 * _F32_EPILOGUE, "fp32 epilogue + one bf16 rounding"),
    "int8_dynamic_mm/float16": Tol(
        _EPS_F16 + _F32_EPILOGUE, 2 * _F32_EPILOGUE, "fp32 epilogue + one fp16 rounding"),
    # Sparse ops (2:4, unstructured, 2:4 + int8/int4): float activations, float32 accumulation
    # of the kept products; a backend sums them in another order than the reference's dense
    # F.linear over the decompressed weight (the pruned terms are exact zeros there).
    "sparse24_mm/float32": Tol(_F32_KERNEL, _F32_KERNEL, "fp32 summation order"),
    "sparse24_mm/bfloat16": Tol(_EPS_BF16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 order + one bf16 rounding"),
    "sparse24_mm/float16": Tol(_EPS_F16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 order + one fp16 rounding"),
    "sparse_unstructured_mm/float32": Tol(_F32_KERNEL, _F32_KERNEL, "fp32 summation order"),
    "sparse_unstructured_mm/bfloat16": Tol(_EPS_BF16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 order + one bf16 rounding"),
    "sparse_unstructured_mm/float16": Tol(_EPS_F16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 order + one fp16 rounding"),
    "sparse24_int8_mm/float32": Tol(_F32_KERNEL, _F32_KERNEL, "fp32 summation order"),
    "sparse24_int8_mm/bfloat16": Tol(_EPS_BF16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 order + one bf16 rounding"),
    "sparse24_int8_mm/float16": Tol(_EPS_F16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 order + one fp16 rounding"),
    "sparse24_int4_mm/float32": Tol(_F32_KERNEL, _F32_KERNEL, "fp32 summation order"),
    "sparse24_int4_mm/bfloat16": Tol(_EPS_BF16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 order + one bf16 rounding"),
    "sparse24_int4_mm/float16": Tol(_EPS_F16 + _F32_KERNEL, 2 * _F32_KERNEL, "fp32 order + one fp16 rounding"),
    # torch.compile (eager/aot_eager/inductor) of a quantized model against eager: the op is one
    # opaque node and runs the same kernel; only the float glue (bias-free Linear-free ReLU,
    # adds) may be fused or reordered by inductor.
    "compile_vs_eager/float32": Tol(1e-5, 1e-5, "inductor may reorder float glue ops"),
    # A tensor-parallel model (pyquant.distributed) against the same model on one process: the
    # same codes and scales (row-parallel int8 dynamic quantizes with the whole row's scale), but
    # each row-parallel layer sums W fp32 partial dot products (one per rank) where one process
    # sums one K loop, and that order difference flows through the following blocks (norms,
    # softmax). Measured (2 ranks, tiny Llama/BERT, 2 blocks, K <= 256): max |err| / max|ref|
    # <= 5e-7 for float, int8, int8 dynamic, int4 and int4 dynamic. (Bigger dynamic-activation
    # models can flip an activation code at a rounding boundary; a 1e-7 nudge of the input does
    # the same on one process: see docs/distributed.md.)
    "tensor_parallel/float32": Tol(_F32_KERNEL, _F32_KERNEL, "fp32 order of per-rank partials"),
}

# The ops on the CPU panel layouts: the arithmetic of the canonical op they stand for.
TOLERANCES.update({f"{op}_panels/{d}": TOLERANCES[f"{op}/{d}"]
                   for op in ("sparse24_int8_mm", "sparse24_int4_mm")
                   for d in ("float32", "bfloat16", "float16")})

# Quantization quality floors: SQNR (dB) of dequantized vs float weights, 256 x 1024, seeds
# 0..2 of this file's generators, torch 2.13 (lowest of the 3 seeds in brackets). Each floor
# sits ~1 dB below the lowest measurement: a real regression (a wrong rounding mode, a lost zero
# point, per-tensor instead of per-channel scales) costs several dB, seed noise ~0.5 dB.
#   int8 per-channel, gaussian              [41.99]  ~ 6.02*8 + 1.76 - 20log10(amax/sigma*sqrt3)
#   int8 per-channel, 4 rows (channels) x100 [41.36] per-row scales absorb row outliers
#   int8 per-channel, 4 columns x100        [24.86]  documented limit: every row's scale grows
#   int8 per-channel, student-t df=3        [29.50]
#   int4 asymmetric, gaussian g32/64/128/256 [21.84 / 20.80 / 19.92 / 19.20]
#   int4 symmetric,  gaussian g32/64/128/256 [20.25 / 19.35 / 18.58 / 17.94]  ~1.4 dB lower: the
#        symmetric range is 2*max|w| (wider than max-min) and code 0 (-8) is never used
SQNR_FLOORS_DB: dict[str, float] = {
    "int8/gaussian": 41.0,
    "int8/outlier_channels": 40.0,
    "int8/outlier_features": 24.0,
    "int8/heavy_tailed": 28.5,
    "int4/g32/asymmetric/gaussian": 20.8,
    "int4/g64/asymmetric/gaussian": 19.8,
    "int4/g128/asymmetric/gaussian": 19.0,
    "int4/g256/asymmetric/gaussian": 18.2,
    "int4/g32/symmetric/gaussian": 19.2,
    "int4/g64/symmetric/gaussian": 18.3,
    "int4/g128/symmetric/gaussian": 17.6,
    "int4/g256/symmetric/gaussian": 16.9,
}
# End-to-end (a whole model, float vs quantized outputs): cosine similarity floors.
COSINE_FLOORS: dict[str, float] = {"int8": 0.99, "int4": 0.95}


def tol_name(op: str, dtype: torch.dtype) -> str:
    return f"{op}/{str(dtype).replace('torch.', '')}"


def assert_close_named(actual: torch.Tensor, expected: torch.Tensor, tol_name: str,
                       msg: str = "") -> None:
    """Assert ``actual`` matches ``expected`` within ``TOLERANCES[tol_name]`` (see ``Tol``).

    Shapes and dtypes must match exactly; NaN must appear at the same places."""
    tol = TOLERANCES[tol_name]
    where = f" [{tol_name}{'; ' + msg if msg else ''}]"
    assert isinstance(actual, torch.Tensor), f"got {type(actual).__name__}{where}"
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}{where}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}{where}"
    if expected.numel() == 0:
        return
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"NaN pattern differs{where}"
    a, e = a[~nan_e], e[~nan_e]
    if e.numel() == 0:
        return
    inf_e = torch.isinf(e)
    assert torch.equal(a[inf_e], e[inf_e]), f"inf values differ{where}"
    a, e = a[~inf_e], e[~inf_e]
    if e.numel() == 0:
        return
    scale = e.abs().max().item() or 1.0
    bound = tol.atol * scale + tol.rtol * e.abs()
    err = (a - e).abs()
    excess = err - bound
    if (excess > 0).any():
        i = int(excess.argmax())
        n_bad = int((excess > 0).sum())
        raise AssertionError(
            f"{n_bad}/{e.numel()} elements outside rtol={tol.rtol:.3g}, atol={tol.atol:.3g}*"
            f"scale (scale=max|expected|={scale:.4g}, {tol.why}); worst: actual={a[i].item():.9g} "
            f"expected={e[i].item():.9g} |err|={err[i].item():.3g} bound={bound[i].item():.3g}; "
            f"max |err|/scale={(err.max() / scale).item():.3g}{where}"
        )


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10*log10(sum ref^2 / sum (ref-approx)^2), in dB
    (inf when exact)."""
    r = ref.detach().to(torch.float64)
    noise = (r - approx.detach().to(torch.float64)).pow(2).sum().item()
    signal = r.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().to(torch.float64).flatten()
    b = b.detach().to(torch.float64).flatten()
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


# --------------------------------------------------------------------- backends and ISAs


def native_available() -> bool:
    return _native.available()


def available_isas() -> Iterator[str]:
    """Names of the CPU instruction sets the native module can run here ("portable", "avx2",
    "avx512_vnni"); nothing when the native module is not loaded."""
    if not _native.available():
        return
    mod = _native.module()
    for i, name in enumerate(_native.ISA_NAMES):
        if mod.isa_available(i):
            yield name


def backend_isa_params() -> list:
    """pytest params (backend, isa) for every CPU backend: the reference, then the native
    backend once per instruction set. Missing ones are listed as skips with the reason, so the
    report shows what did not run."""
    params = [pytest.param("reference", None, id="reference")]
    if not _native.available():
        params.append(pytest.param(
            "cpu", None, id="cpu",
            marks=pytest.mark.skip(reason=f"native module not loaded: {_native.load_error()}")))
        return params
    have = set(available_isas())
    for name in _native.ISA_NAMES:
        marks = () if name in have else pytest.mark.skip(
            reason=f"ISA {name} not available on this CPU/build")
        params.append(pytest.param("cpu", name, id=f"cpu-{name}", marks=marks))
    return params


def isa_params() -> list:
    """pytest params, one per native ISA (skips when unavailable), for native-only tests."""
    return [p for p in backend_isa_params() if p.values[0] == "cpu"]


@contextlib.contextmanager
def on_backend(backend: str, isa: Optional[str] = None):
    """Force ``backend`` (and, for the native one, the instruction set ``isa``)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(pyquant.use_backend(backend))
        if isa is not None:
            stack.enter_context(_native.use_isa(isa))
        yield


@contextlib.contextmanager
def num_threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def run_op(op: str, backend: str, isa: Optional[str], x, wargs: tuple, bias):
    """``torch.ops.pyquant.<op>(x, *wargs, bias)`` on a forced backend/ISA; asserts that the
    dispatcher really chose that backend."""
    with on_backend(backend, isa):
        assert pyquant.ops.select(op, x.device).name == backend
        return getattr(torch.ops.pyquant, op)(x, *wargs, bias)


def reference_op(op: str, x, wargs: tuple, bias):
    return getattr(pyquant.reference, op)(x, *wargs, bias)


def check_op(op: str, backend: str, isa: Optional[str], x, wargs: tuple, bias, msg: str = ""):
    """The core kernel-error check: backend output vs the reference on the same inputs."""
    expected = reference_op(op, x, wargs, bias)
    actual = run_op(op, backend, isa, x, wargs, bias)
    assert actual.dtype == x.dtype
    assert actual.shape == (*x.shape[:-1], wargs[0].shape[0])
    assert_close_named(actual, expected, tol_name(op, x.dtype), msg)
    return actual


# ----------------------------------------------------------------------- one quantized layer

#: Every layer config, one pytest param each (the layers' own tests: autograd, LayerCall).
LAYER_CONFIGS = [
    pytest.param(pyquant.Int8WeightOnly(), id="int8_weight_only"),
    pytest.param(pyquant.Int8Dynamic(), id="int8_dynamic"),
    pytest.param(pyquant.Int4WeightOnly(group_size=32), id="int4_weight_only"),
    pytest.param(pyquant.Int4Dynamic(group_size=32), id="int4_dynamic"),
    pytest.param(pyquant.Sparse24(), id="sparse24"),
    pytest.param(pyquant.Unstructured(0.5), id="unstructured"),
    pytest.param(pyquant.Sparse24Int8WeightOnly(), id="sparse24_int8"),
    pytest.param(pyquant.Sparse24Int4WeightOnly(group_size=64), id="sparse24_int4"),
]


def one_layer(config, k: int = 128, n: int = 24, bias: bool = True):
    """The pyquant layer that ``config`` makes of a seeded nn.Linear(k, n)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias))
    run = pyquant.sparsify_ if isinstance(config, pyquant.SparseConfig) else pyquant.quantize_
    assert run(model, config).swapped == ["0"]
    return model[0]


# --------------------------------------------------------------------------- generators


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_weight(n: int, k: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, k, generator=gen(seed)).to(dtype)


def outlier_channel_weight(n: int, k: int, seed: int = 0, n_outliers: int = 4,
                           factor: float = 100.0) -> torch.Tensor:
    """Gaussian weights with ``n_outliers`` output channels (rows) scaled by ``factor``: what
    per-channel scales absorb and a per-tensor scale would not."""
    g = gen(seed)
    w = torch.randn(n, k, generator=g)
    rows = torch.randperm(n, generator=g)[:n_outliers]
    w[rows] *= factor
    return w


def outlier_feature_weight(n: int, k: int, seed: int = 0, n_outliers: int = 4,
                           factor: float = 100.0) -> torch.Tensor:
    """Gaussian weights with a few input features (columns) scaled by ``factor``: the hard
    case for per-channel int8 (every row's scale grows)."""
    g = gen(seed)
    w = torch.randn(n, k, generator=g)
    cols = torch.randperm(k, generator=g)[:n_outliers]
    w[:, cols] *= factor
    return w


def heavy_tailed_weight(n: int, k: int, seed: int = 0, df: float = 3.0) -> torch.Tensor:
    """Student-t weights (df=3): LLM-like tails without hand-placed outliers."""
    g = gen(seed)
    z = torch.randn(n, k, generator=g)
    chi2 = torch.randn(n, k, int(df), generator=g).pow(2).sum(-1)
    return z / torch.sqrt(chi2 / df)


def random_int8_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical int8 weight (q in [-127, 127] int8 [N, K], scale float32 [N] > 0) with random
    codes: covers every code value, which quantizing gaussian weights would not."""
    g = gen(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, generator=g) + 0.5) / 127.0
    return q, scale


def random_int4_weight(n: int, k: int, group_size: int, seed: int = 0):
    """Canonical int4 weight (packed uint8 [N, K/2], scales float32 [N, G], zeros uint8 [N, G]
    in 0..15) with uniformly random codes and zero points."""
    g = gen(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    groups = k // group_size
    scales = (torch.rand(n, groups, generator=g) + 0.5) / 8.0
    zeros = torch.randint(0, 16, (n, groups), generator=g, dtype=torch.uint8)
    return formats.pack_int4(codes), scales, zeros


LAYOUTS = ("contiguous", "col_slice", "transposed", "row_step")


def activation(shape: tuple, dtype=torch.float32, seed: int = 0,
               layout: str = "contiguous") -> torch.Tensor:
    """Gaussian activations of ``shape`` and ``dtype`` in a memory layout:

    contiguous  plain
    col_slice   big[..., :K] of a wider tensor (row stride > K: the native ldx path)
    transposed  a [K, M] tensor transposed (unit stride along M, not along K)
    row_step    big[::2] (every other row; row stride 2K)
    """
    g = gen(seed)
    *lead, k = shape
    if layout == "contiguous":
        x = torch.randn(*lead, k, generator=g)
    elif layout == "col_slice":
        x = torch.randn(*lead, k + 7, generator=g)[..., :k]
    elif layout == "transposed":
        assert len(lead) == 1, "transposed layout is for 2-D activations"
        x = torch.randn(k, lead[0], generator=g).t()
    elif layout == "row_step":
        assert len(lead) == 1, "row_step layout is for 2-D activations"
        x = torch.randn(2 * lead[0], k, generator=g)[::2]
    else:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    if dtype != torch.float32:
        # Convert without making the result contiguous: keep the layout under test.
        y = torch.empty_strided(x.shape, x.stride(), dtype=dtype) if x.numel() else x.to(dtype)
        if x.numel():
            y.copy_(x)
        x = y
    assert x.shape == tuple(shape)
    if layout != "contiguous" and x.numel() > 1 and x.shape[0] > 1:
        assert not x.is_contiguous(), f"layout {layout} came out contiguous"
    return x


def make_bias(n: int, kind: Optional[str], x_dtype: torch.dtype, seed: int = 1):
    """kind: None (no bias), "x" (bias in the activation dtype) or "fp32"."""
    if kind is None:
        return None
    b = torch.randn(n, generator=gen(seed))
    return b.to(x_dtype if kind == "x" else torch.float32)


# ------------------------------------------------------------------- bad inputs (int8 ops)


def int8_bad_cases():
    """(id, x, w, w_scale, bias, exception, match) for both int8 ops: every case must be
    rejected before any kernel runs, with a message that names the offending value."""
    n, k = 13, 100
    x = torch.randn(3, k)
    w, s = random_int8_weight(n, k)
    b = torch.randn(n)
    meta = torch.device("meta")
    return [
        ("x_int32", x.to(torch.int32), w, s, b, TypeError, r"x has dtype torch\.int32"),
        ("x_float64", x.double(), w, s, b, TypeError, r"x has dtype torch\.float64"),
        ("x_uint8", x.to(torch.uint8), w, s, b, TypeError, r"x has dtype torch\.uint8"),
        ("w_float32", x, w.float(), s, b, TypeError, r"w has dtype torch\.float32, expected torch\.int8"),
        ("w_uint8", x, w.view(torch.uint8), s, b, TypeError, r"w has dtype torch\.uint8"),
        ("w_1d", x, w.flatten(), s, b, ValueError, r"w must be a 2-D int8 tensor"),
        ("w_3d", x, w[None], s, b, ValueError, r"w must be a 2-D int8 tensor"),
        ("k_mismatch", torch.randn(3, k + 1), w, s, b, ValueError,
         r"x has shape \(3, 101\) but the weight expects K=100"),
        ("k_mismatch_3d", torch.randn(2, 3, k - 1), w, s, b, ValueError,
         r"x has shape \(2, 3, 99\) but the weight expects K=100"),
        ("x_0d", torch.tensor(1.0), w, s, b, ValueError, r"x has shape \(\)"),
        ("scale_short", x, w, s[:-1], b, ValueError, r"w_scale has shape \(12,\), expected \(13,\)"),
        ("scale_2d", x, w, s[:, None], b, ValueError, r"w_scale has shape \(13, 1\), expected \(13,\)"),
        ("scale_f16", x, w, s.half(), b, TypeError, r"w_scale has dtype torch\.float16, expected torch\.float32"),
        ("bias_short", x, w, s, b[:-1], ValueError, r"bias has shape \(12,\), expected \(13,\)"),
        ("bias_2d", x, w, s, b[None], ValueError, r"bias has shape \(1, 13\), expected \(13,\)"),
        ("bias_int", x, w, s, b.to(torch.int64), TypeError, r"bias has dtype torch\.int64"),
        ("w_meta", x, w.to(meta), s, b, ValueError, r"w is on meta but x is on cpu"),
        ("scale_meta", x, w, s.to(meta), b, ValueError, r"w_scale is on meta but x is on cpu"),
        ("bias_meta", x, w, s, b.to(meta), ValueError, r"bias is on meta but x is on cpu"),
        ("x_meta", x.to(meta), w, s, b, ValueError, r"w is on cpu but x is on meta"),
    ]


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def assert_dense_path_close(y: torch.Tensor, want: torch.Tensor, mag: torch.Tensor,
                            dtype: torch.dtype) -> None:
    """The Triton backend's dense path (pyquant/_triton.py) rounds the dequantized weight to
    the activation dtype, then cuBLAS may also reduce in 16 bits: its error against the fp32
    reference ``want`` is bounded by a few roundings of each |x| |w| product (``mag`` =
    |x| @ |w|^T), not by the kernels' fp32-order tolerance."""
    u = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -22}[dtype]
    want = want.float()
    err = (y.float() - want).abs()
    bound = 4 * u * mag + 2 * u * want.abs() + 1e-6
    assert y.dtype == dtype and bool((err <= bound).all()), (dtype, float((err / bound).max()))


@contextlib.contextmanager
def native_calls():
    """The names of pyquant._C's functions called inside the block, in order: a recording
    proxy stands in for the loaded module (tests that a path really ran, not a fallback that
    gives the same result)."""
    real = _native._load()
    names: list = []

    class Spy:
        def __getattr__(self, name):
            f = getattr(real, name)
            if not callable(f):
                return f

            def call(*a, **k):
                names.append(name)
                return f(*a, **k)
            return call

    _native._module = Spy()
    try:
        yield names
    finally:
        _native._module = real


def assert_bf16_of_fp32(got: torch.Tensor, f32: torch.Tensor, shape) -> torch.Tensor:
    """got: a bf16 result of the given shape whose every non-NaN value has the bits of the
    float32 result f32 rounded as torch rounds (pq_f32_to_bf16: nearest, ties to even), and
    NaN exactly where f32 rounds to NaN (the payload may differ: torch's own conversion keeps
    other bits). Returns the NaN mask."""
    want = torch.empty_like(f32, dtype=torch.bfloat16)
    _native.module().f32_to_bf16(f32.data_ptr(), f32.numel(), want.data_ptr())
    assert got.dtype == torch.bfloat16 and tuple(got.shape) == tuple(shape)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    return nan


def amx_only_query(query, first_m: int, *sizes) -> int:
    """A native query of the AMX-only bf16 calls, query(isa, M, *sizes): off (0 or -1) on every
    ISA below AMX, and on AMX off at first_m - 1 and on (> 0) at first_m. Returns the AMX ISA's
    number; skips the test on a CPU without AMX."""
    amx = _native.ISA_NAMES.index("avx512_amx")
    for isa in range(amx):
        assert query(isa, max(first_m, 64), *sizes) <= 0, isa
    if not _native.module().isa_available(amx):
        pytest.skip("no AMX on this CPU")
    assert query(amx, first_m - 1, *sizes) <= 0 and query(amx, first_m, *sizes) > 0
    return amx


def aligned_work(nbytes: int) -> tuple:
    """(buffer, address): nbytes of scratch starting on a 64-byte boundary, as the native
    calls' workspaces must (keep the buffer alive while the address is used)."""
    buf = torch.empty(nbytes + 64, dtype=torch.uint8)
    return buf, buf.data_ptr() + (-buf.data_ptr() % 64)
