"""Triton kernels of pyquant, one file per op (installed as pyquant/kernels).

Importing pyquant never imports this package; pyquant/_triton.py loads it only when Triton and
a CUDA device are present (or under TRITON_INTERPRET=1 in the tests)."""
