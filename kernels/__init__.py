"""Triton kernels of sphereops, installed as the import package ``sphereops_kernels``.

Importing this package imports triton; ``sphereops`` imports it lazily, only when a Triton
backend is actually used, so ``import sphereops`` works without triton and never queries CUDA.
"""
