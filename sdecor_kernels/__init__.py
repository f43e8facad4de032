"""Triton kernels of sdecor and their launch helpers.

Only kernels and launchers live here: no autograd, no nn, no backend policy, and nothing is imported
from the ``sdecor`` package. One module per kernel family: ``stats`` (group mean and covariance),
``newton`` (Newton-Schulz whitening matrix and its backward), ``apply`` (whitening with given
statistics), ``backward`` (the passes over x of the whitening backward) and ``topk`` (saliency
masking); ``_common`` holds what they share (jit helpers, layout, the one launch helper) and
``_newton_iteration`` the Newton-Schulz iteration and its reverse mode as jit helpers (run by the
``newton`` kernels and by the ``stats`` finalize kernel). Launchers take tensors and return tensors.
Each kernel module exposes ``STATIC_SPECS`` describing how to compile its kernels ahead of time for
a GPU target (see :mod:`sdecor_kernels.static`, which lists the kernel modules).
"""
