"""Triton kernels of pyquant, one file per op (installed as pyquant/kernels):

    int8_weight_only_mm.py   int8 weights x float activations
    int8_dynamic_mm.py       W8A8: per-token int8 activations, int8 x int8 -> int32 MMA
    int4_weight_only_mm.py   int4 group-wise weights (canonical packing), dequantized in the K loop
                             (gemv32: the packed bytes read as int32 words at decode)
    sparse24_mm.py           2:4 sparse weights (float or int8 kept values + 2-bit positions):
                             sparse24_mm and sparse24_int8_mm
    dequant.py               one-pass dequantization (int8, int4) and 2:4 densification:
                             the dense path of pyquant/_triton.py (DENSE_FALLBACK_MIN_M)
    _common.py               tile order, fused epilogue, split-K reduction, bit tricks
    _autotune.py             per-(M bucket, N, K) autotuning with an on-disk cache

Each op module has the launcher ``<op>(x, ..., bias, config=None)`` (checked arguments in,
output out; sparse24_mm.py has one per op), ``launch``, ``default_config`` and ``candidates``.
Importing pyquant never imports
this package; pyquant/_triton.py loads it only when Triton and a CUDA device are present, or
as a separate interpreted copy (TRITON_INTERPRET=1) for the CPU tests."""
