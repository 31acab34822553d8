"""Quantization configs: frozen dataclasses that validate themselves.

A config names a scheme and its parameters; it knows which layer class implements it
(``layer_cls``) and serializes to a plain dict (``to_dict``/``config_from_dict``) so that a
checkpoint can say how it was made without pickle.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

INT4_GROUP_SIZES = (32, 64, 128, 256)


# ----------------------------------------------------------------------------- calibration
# ``method=`` of a scheme: "rtn" (round to nearest, no data) or a calibrated method that needs
# ``quantize_(model, config, calibration=batches)``. Its options live in one frozen dataclass
# (``options=``; a dict of its fields is accepted too, which is what ``config_from_dict`` hands
# over). The canonical formats never change: calibration only chooses better codes and scales,
# plus, for AWQ and SmoothQuant, a per-input-channel ``input_scale`` the layer applies to x.


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ (Frantar et al., 2023): quantize one column at a time and push its error onto the
    columns not yet quantized through the inverse Hessian H = 2 X^T X of the layer inputs.

    damp_percent: added to H's diagonal, as a fraction of its mean (numerical stability), (0, 1].
    block_size:   columns per lazy batch update (a speed knob; results barely change), >= 1.
    act_order:    quantize columns in order of decreasing H diagonal (the most active inputs
                  first). Scales and zeros are fixed per contiguous group before the first
                  column ("static groups"), so the checkpoint format and every backend stay the
                  same: no group index, no reordering at run time.
    """

    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = False

    def __post_init__(self):
        if not _number(self.damp_percent) or not 0 < self.damp_percent <= 1:
            raise ValueError(f"GPTQOptions.damp_percent={self.damp_percent!r} must be a number "
                             "in (0, 1], e.g. 0.01 (1% of the mean Hessian diagonal)")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or self.block_size < 1:
            raise ValueError(f"GPTQOptions.block_size={self.block_size!r} must be an int >= 1, "
                             "e.g. 128")
        if not isinstance(self.act_order, bool):
            raise TypeError(f"GPTQOptions.act_order must be True or False, got "
                            f"{self.act_order!r}")


@dataclass(frozen=True)
class AWQOptions:
    """AWQ (Lin et al., 2024): scale each input channel by s = mean|x|^alpha before quantizing
    (weights times s, activations times 1/s, exact in float), alpha picked per layer from
    ``grid_size`` values in [0, 1) by the smallest output error on the calibration data; alpha=0
    is plain RTN, so a layer is never worse than RTN on that data.

    grid_size: alphas tried, i / grid_size for i in 0..grid_size-1; >= 1 (1: RTN only).
    clip:      also search, per output channel and group, how far to shrink the weight range
               (AWQ's auto-clip; int4 only), by the same output error.
    """

    grid_size: int = 20
    clip: bool = True

    def __post_init__(self):
        if isinstance(self.grid_size, bool) or not isinstance(self.grid_size, int) \
                or not 1 <= self.grid_size <= 1000:
            raise ValueError(f"AWQOptions.grid_size={self.grid_size!r} must be an int in "
                             "[1, 1000], e.g. 20")
        if not isinstance(self.clip, bool):
            raise TypeError(f"AWQOptions.clip must be True or False, got {self.clip!r}")


@dataclass(frozen=True)
class SmoothQuantOptions:
    """SmoothQuant (Xiao et al., 2023): move activation outliers into the weights with the
    per-input-channel factor s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); the layer multiplies
    x by 1/s (``input_scale``) before quantizing it per token.

    alpha: migration strength in [0, 1] (0: nothing moves; 0.5 balances the two ranges).
    """

    alpha: float = 0.5

    def __post_init__(self):
        if not _number(self.alpha) or not 0 <= self.alpha <= 1:
            raise ValueError(f"SmoothQuantOptions.alpha={self.alpha!r} must be a number in "
                             "[0, 1], e.g. 0.5")


METHOD_OPTIONS = {"rtn": None, "gptq": GPTQOptions, "awq": AWQOptions,
                  "smoothquant": SmoothQuantOptions}
#: methods whose layers carry an ``input_scale`` buffer (the migrated activation scale)
INPUT_SCALE_METHODS = ("awq", "smoothquant")


def _check_method(cfg, allowed: tuple) -> None:
    """Validate ``cfg.method`` / ``cfg.options`` and normalize the options to their dataclass
    (None -> the method's defaults; a dict -> the dataclass, as ``config_from_dict`` passes)."""
    name = type(cfg).__name__
    method = cfg.method
    if not isinstance(method, str) or method not in allowed:
        raise ValueError(f"{name}.method={method!r} is not supported; use one of "
                         f"{', '.join(repr(m) for m in allowed)}")
    cls = METHOD_OPTIONS[method]
    opts = cfg.options
    if cls is None:
        if opts is not None:
            raise ValueError(f"{name}(method={method!r}) takes no options, got {opts!r}")
        return
    if opts is None:
        opts = cls()
    elif isinstance(opts, dict):
        known = {f.name for f in fields(cls)}
        extra = sorted(set(opts) - known)
        if extra:
            raise ValueError(f"{name}: unknown {cls.__name__} field(s) {extra}; known: "
                             f"{sorted(known)}")
        opts = cls(**opts)
    elif not isinstance(opts, cls):
        raise TypeError(f"{name}(method={method!r}) needs options of type {cls.__name__} (or a "
                        f"dict of its fields), got {type(opts).__name__}")
    object.__setattr__(cfg, "options", opts)


class QuantConfig:
    """Base class of every config. Subclasses are frozen dataclasses."""

    #: short name written into checkpoints, e.g. "int8_weight_only"
    scheme: str = ""

    @property
    def layer_cls(self):
        from . import nn as _nn

        return _nn.LAYER_FOR_SCHEME[self.scheme]

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, **asdict(self)}


@dataclass(frozen=True)
class Int8WeightOnly(QuantConfig):
    """int8 weights, symmetric per output channel; activations stay float.

    method: "rtn" (default), "gptq" or "awq" (calibrated: see GPTQOptions / AWQOptions).
    """

    scheme = "int8_weight_only"
    method: str = "rtn"
    options: Any = None

    def __post_init__(self):
        _check_method(self, ("rtn", "gptq", "awq"))


@dataclass(frozen=True)
class Int8Dynamic(QuantConfig):
    """W8A8: int8 per-channel weights and int8 per-token activations quantized at run time,
    multiplied with int32 accumulation; scales and bias are fused into the output.

    method: "rtn" (default) or "smoothquant" (calibrated: see SmoothQuantOptions).
    """

    scheme = "int8_dynamic"
    method: str = "rtn"
    options: Any = None

    def __post_init__(self):
        _check_method(self, ("rtn", "smoothquant"))


def _check_int4_fields(cfg) -> None:
    """group_size, symmetric and method of the int4 configs (they share one weight format)."""
    name = type(cfg).__name__
    if isinstance(cfg.group_size, bool) or not isinstance(cfg.group_size, int):
        raise TypeError(
            f"{name}.group_size must be an int, got {type(cfg.group_size).__name__} "
            f"{cfg.group_size!r}; use one of {INT4_GROUP_SIZES}"
        )
    if cfg.group_size not in INT4_GROUP_SIZES:
        raise ValueError(
            f"{name}.group_size={cfg.group_size} is not supported; "
            f"use one of {INT4_GROUP_SIZES}"
        )
    if not isinstance(cfg.symmetric, bool):
        raise TypeError(f"{name}.symmetric must be True or False, got {cfg.symmetric!r}")
    _check_method(cfg, ("rtn", "gptq", "awq"))


@dataclass(frozen=True)
class Int4WeightOnly(QuantConfig):
    """int4 weights, group-wise along K (two codes a byte); activations stay float.

    group_size: weights per scale along the input dimension, one of 32, 64, 128, 256.
    symmetric:  False (default) stores an integer zero point per group (codes span
                [min, max]); True uses zero point 8 and codes span [-max|w|, max|w|].
    method:     "rtn" (default), "gptq" or "awq" (calibrated: see GPTQOptions / AWQOptions).
    options:    the method's options dataclass (or a dict of its fields); None: its defaults.
    """

    scheme = "int4_weight_only"
    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    options: Any = None

    def __post_init__(self):
        _check_int4_fields(self)


@dataclass(frozen=True)
class Int4Dynamic(QuantConfig):
    """W4A8: int4 group-wise weights (the Int4WeightOnly format) and int8 per-token activations
    quantized at run time; exact int32 dot products per group on the int8 dot-product units,
    group scales and the activation scale applied in float32.

    group_size: weights per scale along the input dimension, one of 32, 64, 128, 256.
    symmetric:  as Int4WeightOnly (zero point 8 when True).
    method:     "rtn" (default), "gptq" or "awq" (calibrated weights, as Int4WeightOnly).
    options:    the method's options dataclass (or a dict of its fields); None: its defaults.
    """

    scheme = "int4_dynamic"
    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    options: Any = None

    def __post_init__(self):
        _check_int4_fields(self)


# ----------------------------------------------------------------------------- sparsity
# Pruning configs (``pyquant.sparsify_``). ``method`` is the pruning method: "magnitude" (no
# data), "wanda" or "sparsegpt" (need ``calibration=``); see pyquant/prune. Layers and
# compressed formats: pyquant/sparse_nn.py, pyquant/sparse_formats.py.

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSE_VALUE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class SparseGPTOptions:
    """SparseGPT (Frantar & Alistarh, 2023) knobs.

    damp_percent: added to the Hessian diagonal, as a fraction of its mean, (0, 1].
    block_size:   columns whose mask is chosen together (lazy-batch width), >= 1; N:M rounds
                  it down to a multiple of M.
    """

    damp_percent: float = 0.01
    block_size: int = 128

    def __post_init__(self):
        if not _number(self.damp_percent) or not 0 < self.damp_percent <= 1:
            raise ValueError(f"SparseGPTOptions.damp_percent={self.damp_percent!r} must be a "
                             "number in (0, 1], e.g. 0.01")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or self.block_size < 1:
            raise ValueError(f"SparseGPTOptions.block_size={self.block_size!r} must be an int "
                             ">= 1, e.g. 128")


def _check_prune(cfg) -> None:
    name = type(cfg).__name__
    if not isinstance(cfg.method, str) or cfg.method not in PRUNE_METHODS:
        raise ValueError(f"{name}.method={cfg.method!r} is not a pruning method; use one of "
                         f"{', '.join(repr(m) for m in PRUNE_METHODS)}")
    opts = cfg.options
    if cfg.method != "sparsegpt":
        if opts is not None:
            raise ValueError(f"{name}(method={cfg.method!r}) takes no options, got {opts!r}")
        return
    if opts is None:
        opts = SparseGPTOptions()
    elif isinstance(opts, dict):
        known = {f.name for f in fields(SparseGPTOptions)}
        extra = sorted(set(opts) - known)
        if extra:
            raise ValueError(f"{name}: unknown SparseGPTOptions field(s) {extra}; known: "
                             f"{sorted(known)}")
        opts = SparseGPTOptions(**opts)
    elif not isinstance(opts, SparseGPTOptions):
        raise TypeError(f"{name}(method='sparsegpt') needs options of type SparseGPTOptions "
                        f"(or a dict of its fields), got {type(opts).__name__}")
    object.__setattr__(cfg, "options", opts)


def _check_value_dtype(cfg) -> None:
    v = cfg.value_dtype
    if v is not None and v not in SPARSE_VALUE_DTYPES:
        raise ValueError(f"{type(cfg).__name__}.value_dtype={v!r}: use None (the weight's own "
                         f"dtype) or one of {SPARSE_VALUE_DTYPES}")


class SparseConfig(QuantConfig):
    """Base of the pruning configs: ``pattern`` is (sparsity, nm) for pyquant.prune."""

    @property
    def pattern(self) -> tuple:
        return (0.5, (2, 4))


@dataclass(frozen=True)
class Sparse24(SparseConfig):
    """2:4 sparsity: of every 4 consecutive weights along K, 2 are kept (K % 4 == 0); stored
    compressed (the kept half plus 2-bit positions, sparse_formats.py).

    method:      "magnitude" (default), "wanda" or "sparsegpt" (these two need calibration).
    options:     SparseGPTOptions for "sparsegpt" (or a dict of its fields); None: defaults.
    value_dtype: dtype of the kept values: None keeps the weight's own, or "float32",
                 "bfloat16", "float16".
    """

    scheme = "sparse24"
    method: str = "magnitude"
    options: Any = None
    value_dtype: Any = None

    def __post_init__(self):
        _check_prune(self)
        _check_value_dtype(self)


@dataclass(frozen=True)
class Unstructured(SparseConfig):
    """Unstructured sparsity: every output row keeps the K - floor(K * sparsity) weights the
    method ranks highest; stored as a bitmask plus the kept values (sparse_formats.py).

    sparsity:    fraction of each row pruned, in (0, 1).
    method, options, value_dtype: as Sparse24.
    """

    scheme = "unstructured"
    sparsity: float = 0.5
    method: str = "magnitude"
    options: Any = None
    value_dtype: Any = None

    def __post_init__(self):
        if not _number(self.sparsity) or not 0 < self.sparsity < 1:
            raise ValueError(f"Unstructured.sparsity={self.sparsity!r} must be a number in "
                             "(0, 1), e.g. 0.5")
        _check_prune(self)
        _check_value_dtype(self)

    @property
    def pattern(self) -> tuple:
        return (float(self.sparsity), None)


@dataclass(frozen=True)
class Sparse24Int8WeightOnly(SparseConfig):
    """2:4 sparsity, then the kept values as int8 per output channel (activations float).
    What ``quantize_(model, Int8WeightOnly())`` makes of a Sparse24 layer, or one config for
    ``sparsify_``. method/options: the pruning method, as Sparse24."""

    scheme = "sparse24_int8_weight_only"
    method: str = "magnitude"
    options: Any = None

    def __post_init__(self):
        _check_prune(self)


@dataclass(frozen=True)
class Sparse24Int4WeightOnly(SparseConfig):
    """2:4 sparsity, then the kept values [N, K/2] as int4 group-wise along the compressed
    axis (group_size divides K/2). What ``quantize_(model, Int4WeightOnly(...))`` makes of a
    Sparse24 layer, or one config for ``sparsify_``.

    group_size: kept values per scale, one of 32, 64, 128, 256.
    symmetric:  as Int4WeightOnly.
    method/options: the pruning method, as Sparse24.
    """

    scheme = "sparse24_int4_weight_only"
    group_size: int = 64
    symmetric: bool = False
    method: str = "magnitude"
    options: Any = None

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) \
                or self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"Sparse24Int4WeightOnly.group_size={self.group_size!r} is not "
                             f"supported; use one of {INT4_GROUP_SIZES}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"Sparse24Int4WeightOnly.symmetric must be True or False, got "
                            f"{self.symmetric!r}")
        _check_prune(self)


SPARSE_CONFIGS = (Sparse24, Unstructured, Sparse24Int8WeightOnly, Sparse24Int4WeightOnly)


CONFIG_CLASSES = {c.scheme: c for c in (Int8WeightOnly, Int8Dynamic, Int4WeightOnly,
                                        Int4Dynamic)}
CONFIG_CLASSES.update({c.scheme: c for c in SPARSE_CONFIGS})


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    """Rebuild a config from ``to_dict()`` output, validating every field."""
    if not isinstance(d, dict) or "scheme" not in d:
        raise ValueError(f"not a pyquant config: {d!r}")
    scheme = d["scheme"]
    cls = CONFIG_CLASSES.get(scheme)
    if cls is None:
        raise ValueError(
            f"unknown quantization scheme {scheme!r}; known: {sorted(CONFIG_CLASSES)}"
        )
    names = {f.name for f in fields(cls)}
    extra = set(d) - names - {"scheme"}
    if extra:
        raise ValueError(f"unknown fields {sorted(extra)} for scheme {scheme!r}")
    return cls(**{k: v for k, v in d.items() if k != "scheme"})
