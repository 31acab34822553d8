"""Quantization configs: frozen dataclasses that validate themselves.

A config names a scheme and its parameters; it knows which layer class implements it
(``layer_cls``) and serializes to a plain dict (``to_dict``/``config_from_dict``) so that a
checkpoint can say how it was made without pickle.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

INT4_GROUP_SIZES = (32, 64, 128, 256)


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
    """int8 weights, symmetric per output channel; activations stay float."""

    scheme = "int8_weight_only"


@dataclass(frozen=True)
class Int8Dynamic(QuantConfig):
    """W8A8: int8 per-channel weights and int8 per-token activations quantized at run time,
    multiplied with int32 accumulation; scales and bias are fused into the output."""

    scheme = "int8_dynamic"


@dataclass(frozen=True)
class Int4WeightOnly(QuantConfig):
    """int4 weights, group-wise along K (two codes a byte); activations stay float.

    group_size: weights per scale along the input dimension, one of 32, 64, 128, 256.
    symmetric:  False (default) stores an integer zero point per group (codes span
                [min, max]); True uses zero point 8 and codes span [-max|w|, max|w|].
    """

    scheme = "int4_weight_only"
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise TypeError(
                f"Int4WeightOnly.group_size must be an int, got {type(self.group_size).__name__} "
                f"{self.group_size!r}; use one of {INT4_GROUP_SIZES}"
            )
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"Int4WeightOnly.group_size={self.group_size} is not supported; "
                f"use one of {INT4_GROUP_SIZES}"
            )
        if not isinstance(self.symmetric, bool):
            raise TypeError(
                f"Int4WeightOnly.symmetric must be True or False, got {self.symmetric!r}"
            )


CONFIG_CLASSES = {c.scheme: c for c in (Int8WeightOnly, Int8Dynamic, Int4WeightOnly)}


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
