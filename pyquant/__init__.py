"""pyquant: quantized (int8, int4) linear layers for PyTorch models, run by native kernels.

    import pyquant
    report = pyquant.quantize_(model, pyquant.Int4WeightOnly(group_size=128))

Importing pyquant needs only torch and numpy: no GPU, no Triton, not even the native module
(the reference backend runs then, and ``pyquant info`` says why).
"""
from __future__ import annotations

__version__ = "0.1.0"

from .api import SwapReport, quantize_
from .config import Int4Dynamic, Int4WeightOnly, Int8Dynamic, Int8WeightOnly, QuantConfig
from .io import load, save
from .nn import (Int4DynamicLinear, Int4WeightOnlyLinear, Int8DynamicLinear,
                 Int8WeightOnlyLinear)
from .ops import use_backend
from ._triton import warmup
from .config import (SparseConfig, Sparse24, Sparse24Int4WeightOnly, Sparse24Int8WeightOnly,
                     SparseGPTOptions, Unstructured)
from .sparse_nn import (Sparse24Int4Linear, Sparse24Int8Linear, Sparse24Linear,
                        UnstructuredSparseLinear)
from .prune import sparsify_
from .config import AWQOptions, GPTQOptions, SmoothQuantOptions

__all__ = [
    "Int4Dynamic",
    "Int4DynamicLinear",
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
    "warmup",
    "Sparse24",
    "Sparse24Int4Linear",
    "Sparse24Int4WeightOnly",
    "Sparse24Int8Linear",
    "Sparse24Int8WeightOnly",
    "Sparse24Linear",
    "SparseConfig",
    "SparseGPTOptions",
    "Unstructured",
    "UnstructuredSparseLinear",
    "sparsify_",
    "AWQOptions",
    "GPTQOptions",
    "SmoothQuantOptions",
    "__version__",
]
