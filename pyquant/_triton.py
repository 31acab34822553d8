"""Optional Triton backend: registers the kernels of ``kernels/`` (installed as
pyquant/kernels) with ops.py when Triton and a CUDA device are present. Importing pyquant never
imports Triton; this module does so only when asked."""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch


def why_unavailable() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'pyquant[triton]')"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return "no Triton kernels are registered yet (planned: kernels/int8_dynamic_mm.py, ...)"
