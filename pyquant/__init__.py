"""pyquant: quantized (int8, int4) linear layers for PyTorch models, run by native kernels.

    import pyquant
    report = pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=128))

Importing pyquant needs only torch and numpy: no GPU, no Triton, not even the native module
(the reference backend runs then, and ``pyquant info`` says why).
"""
from __future__ import annotations

__version__ = "0.1.0"

from .api import SwapReport, quantize_
from .config import Int4WeightOnly, Int8Dynamic, Int8WeightOnly, QuantConfig
from .io import load, save
from .nn import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
from .ops import use_backend

__all__ = [
    "Int4WeightOnly",
    "Int4WeightOnlyLinear",
    "Int8Dynamic",
    "Int8DynamicLinear",
    "Int8WeightOnly",
    "Int8WeightOnlyLinear",
    "QuantConfig",
    "SwapReport",
    "load",
    "quantize_",
    "save",
    "use_backend",
    "__version__",
]
