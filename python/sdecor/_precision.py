"""The precision policy (docs/design.md, "Precision"), written once for the reference and every backend.

Statistics and the d x d math accumulate in :func:`stats_dtype` (float32, float64 for float64 input),
also under torch.autocast, which :func:`no_autocast` / :func:`no_autocast_function` turn off around
sdecor's functions, autograd Functions and custom ops; outputs keep the input's dtype.
:func:`power_of_two` builds the exact power-of-two scales that keep statistics finite at any finite
scale of x.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["AUTOCAST_DEVICES", "no_autocast", "no_autocast_function", "power_of_two", "stats_dtype"]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and output dtype of statistics: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def power_of_two(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2**e exactly, built from the exponent bits; e an integer tensor of normal exponents of dtype
    (float32 or float64)."""
    if dtype == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


# The device types whose autocast sdecor turns off (torch.autocast's "cpu" and "cuda").
AUTOCAST_DEVICES = ("cpu", "cuda")


def no_autocast(fn):
    """Decorator: ``fn`` runs with autocast off on cpu and cuda, its inputs as given.

    docs/design.md, "Precision": under autocast the statistics and the d x d math stay in fp32 (fp64
    for fp64 input) and the output has the input's dtype, as BatchNorm's does (x fp32 under bf16
    autocast -> y fp32; x bf16 -> y bf16). Autocast would instead run the covariance and whitening
    matmuls in bf16 (reference group_whiten on fp32 input (8, 32, 6, 6), d=16: max error 3e-2 instead
    of 2e-6) and mix dtypes in the hand-written backward passes. The public functions, the
    torch.autograd.Functions (:func:`no_autocast_function`) and the custom ops
    (:mod:`sdecor.ops._library`) all use it. Outside autocast it costs three flag reads (0.8 us).
    """
    @functools.wraps(fn)
    def run(*args, **kwargs):
        # Under torch.compile the regions are always traced: the graph may run under another
        # autocast state than the flags read at trace time (an autograd.Function's backward is
        # traced under its forward's autocast).
        if not (torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
                or torch.is_autocast_enabled("cuda")):
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return run


def no_autocast_function(cls):
    """Class decorator of a torch.autograd.Function: its forward and backward run under
    :func:`no_autocast`. The backward needs it on its own: the autograd engine runs it in the autocast
    state of the caller of ``.backward()`` / ``torch.autograd.grad``, not in the forward's."""
    cls.forward = staticmethod(no_autocast(cls.forward))
    cls.backward = staticmethod(no_autocast(cls.backward))
    return cls
