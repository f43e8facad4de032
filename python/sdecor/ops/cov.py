"""group_cov: mean and biased covariance of every group of channels.

Public function -> backend table -> ``triton``: the op ``sdecor::group_cov`` (launcher
:func:`sdecor_kernels.stats.group_stats`: one read of x) and its backward op
``sdecor::group_cov_backward`` (launcher :func:`sdecor_kernels.backward.whiten_bwd_dx` without dy),
below; ``native`` (CPU tensors; picked where the extension is built and the CPU choice table,
:mod:`sdecor._cpu_choice`, names it for the dtype and d):
:func:`sdecor.ops.cov_native.group_cov_native`, the C++ statistics pass (one read of x) and its
backward; ``torch``: :func:`sdecor.reference.group_cov`. A backward with create_graph=True (double
backward) differentiates the reference recomputed from the saved x instead of launching the backward
op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _checks
from .. import reference as ref
from .._double_backward import graph_backward
from .._layout import samples_per_channel
from .._precision import no_autocast
from . import cov_native
from ._library import triton_custom_op

__all__ = ["SUPPORTS", "group_cov", "run_group_cov"]

# Backends of group_cov per device type, in order of preference ("interpret": forced only, on CPU
# tensors under TRITON_INTERPRET=1).
SUPPORTS = {"cuda": ("triton", "torch"), "cpu": ("native", "torch"), "interpret": ("triton",)}


def group_cov(x: Tensor, num_channels: int, last_group: str = "even") -> tuple[Tensor, Tensor]:
    """Mean (G, d) and biased covariance (G, d, d) of every group of ``num_channels`` channels.

    last_group="smaller": d need not divide C; the last group's r = C - (G - 1) d channels are a group
    of their own, in the top-left block of its entries (zeros in the padding)."""
    _checks.check_input(x)
    _checks.check_groups(num_channels, x.shape[1], last_group)
    _checks.check_training_samples(x)
    return run_group_cov(x, num_channels)


@no_autocast
def run_group_cov(x: Tensor, num_channels: int) -> tuple[Tensor, Tensor]:
    """group_cov on the selected backend, for callers that checked the arguments."""
    backend = _backend.select("group_cov", {"x": x}, SUPPORTS, num_channels)
    if backend == "triton":
        return group_cov_op(x, num_channels)
    if backend == "native":
        return cov_native.group_cov_native(x, num_channels)
    return ref.group_cov_unchecked(x, num_channels)


# ---------------------------------------------------------------------------------------------------
# triton backend


@triton_custom_op("group_cov", "(Tensor x, int d) -> (Tensor, Tensor)")
def group_cov_op(x: Tensor, d: int) -> tuple[Tensor, Tensor]:
    from sdecor_kernels import stats

    return stats.group_stats(x, d)


@triton_custom_op("group_cov_backward", "(Tensor x, Tensor mean, Tensor a, Tensor v) -> Tensor")
def group_cov_backward_op(x: Tensor, mean: Tensor, a: Tensor, v: Tensor) -> Tensor:
    """dx_j = A (x_j - mean) + v."""
    from sdecor_kernels import backward

    return backward.whiten_bwd_dx(None, x, mean, a, None, v)


def _group_cov_setup(ctx, inputs, output):
    x, _ = inputs
    ctx.save_for_backward(x, output[0])


def _group_cov_backward(ctx, grad_mean, grad_cov):
    x, mean = ctx.saved_tensors
    if torch.is_grad_enabled():                                       # create_graph=True: double backward
        def fn(x):
            return ref.group_cov_unchecked(x, mean.shape[-1])
        return graph_backward(fn, (x,), (True,), (grad_mean, grad_cov))[0], None
    m = samples_per_channel(x)
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
    if grad_cov is None:
        grad_cov = torch.zeros(mean.shape + mean.shape[-1:], dtype=mean.dtype, device=mean.device)
    a = (grad_cov + grad_cov.transpose(-1, -2)) / m               # cov = Xc Xc^T / m
    return group_cov_backward_op(x, mean, a, grad_mean / m), None


group_cov_op.register_autograd(_group_cov_backward, setup_context=_group_cov_setup)
