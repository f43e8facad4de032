"""The ``native`` backend of topk_mask: the Python side of the C++ op ``sdecor::native_topk_mask``.

Rule of :mod:`sdecor.ops`: the glue of a family's C++ ops (the autograd around
``torch.ops.sdecor.native_*``) lives in ``ops/<family>_native.py``. The op's Meta and Autocast kernels
come with it (``csrc/topk_cpu.cpp``); its autograd is the triton op's, which
:mod:`sdecor.ops.topk` registers through :func:`register_autograd` when the extension loads.
"""

from __future__ import annotations

import torch

__all__ = ["register_autograd", "topk_mask_native"]


def topk_mask_native(x, saliency, k, largest, reduce, abs, fill, value, baseline, seed: int, call: int):
    """(x_masked, mask) of :func:`sdecor.ops.topk.topk_mask` on the native backend for a resolved k
    and the Philox stream (seed, call) of the uniform fill (arguments checked by the caller)."""
    # the kernel rounds the constant to x's dtype as torch.full(value, dtype=x.dtype) does; x_masked
    # comes in x's memory format
    return torch.ops.sdecor.native_topk_mask(x, saliency, k, bool(largest), reduce == "mean", bool(abs), fill,
                                             float(value) if fill == "constant" else 0.0,
                                             baseline if fill == "baseline" else None, seed, call)


def register_autograd(backward, setup_context) -> None:
    """Register the autograd of ``sdecor::native_topk_mask`` (from ``sdecor._C``)."""
    torch.library.register_autograd("sdecor::native_topk_mask", backward, setup_context=setup_context)
