"""Pruning: magnitude, Wanda and SparseGPT, unstructured (per-row ratio) and N:M (2:4, 4:8).

The algorithms (``magnitude_mask``, ``wanda_mask``, ``sparsegpt_prune``) take float weights and
statistics and return keep-masks (and, for SparseGPT, updated weights); they never call kernels.
``sparsify_`` runs them over a model (block by block on calibration data for Wanda/SparseGPT,
``sequential.run_sequential``) and swaps in the compressed layers of ``pyquant.sparse_nn``.
``accuracy_table`` measures the methods on the real all-MiniLM-L6-v2.
"""
from __future__ import annotations

from .accuracy import accuracy_table, format_accuracy_table
from .masks import magnitude_mask, mask_from_scores, wanda_mask, wanda_scores
from .sequential import run_sequential
from .sparsegpt import sparsegpt_prune
from .sparsify import SparsifyReport, prune_weight, sparsify_

__all__ = [
    "SparsifyReport",
    "accuracy_table",
    "format_accuracy_table",
    "magnitude_mask",
    "mask_from_scores",
    "prune_weight",
    "run_sequential",
    "sparsegpt_prune",
    "sparsify_",
    "wanda_mask",
    "wanda_scores",
]
