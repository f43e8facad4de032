"""Triton kernels of sdecor and their launch helpers.

Only kernels and launchers live here: no autograd, no nn, no backend policy, and nothing is imported
from the ``sdecor`` package. Each kernel module exposes ``STATIC_SPECS`` describing how to compile
its kernels ahead of time for a GPU target (see :mod:`sdecor_kernels.static`).
"""
