"""Calibrated quantization: GPTQ, AWQ and SmoothQuant, run block by block on calibration data,
with an accuracy report (``report.py``).

Use it through ``pyquant.quantize_(model, config, calibration=batches)`` with
``config.method`` in "gptq", "awq" (weight-only schemes) or "smoothquant" (``Int8Dynamic``).
The algorithms (``gptq_quantize``, ``awq_quantize``, ``smoothquant_quantize``) take float
weights and statistics and return canonical tensors (``QuantizedWeight``, the ``formats.py``
layouts); they never call kernels.
"""
from __future__ import annotations

from ._quant import QuantizedWeight, QuantSpec, rtn
from .awq import awq_quantize
from .gptq import gptq_quantize
from .report import AccuracyReport, LayerAccuracy, ModelAccuracy, format_table, load_report
from .sequential import find_blocks, quantize_calibrated
from .smoothquant import smoothquant_quantize

__all__ = [
    "AccuracyReport",
    "LayerAccuracy",
    "ModelAccuracy",
    "QuantSpec",
    "QuantizedWeight",
    "awq_quantize",
    "find_blocks",
    "format_table",
    "gptq_quantize",
    "load_report",
    "quantize_calibrated",
    "rtn",
    "smoothquant_quantize",
]
