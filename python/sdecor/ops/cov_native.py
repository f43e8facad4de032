"""The ``native`` backend of group_cov: the Python side of the C++ statistics pass of ``sdecor._C``.

Rule of :mod:`sdecor.ops`: the glue of a family's C++ ops (the autograd around
``torch.ops.sdecor.native_*``) lives in ``ops/<family>_native.py``. Here: the statistics pass
``sdecor::native_whiten_stats`` (one read of x) and, backward, ``sdecor::native_whiten_dx`` (one read
of x, one write of dx), for CPU tensors where the extension is built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference as ref
from .._double_backward import graph_backward
from .._layout import by_part, joined_parts, samples_per_channel
from .._precision import no_autocast_function

__all__ = ["group_cov_native"]


@no_autocast_function
class _GroupCovNative(torch.autograd.Function):
    """(mean, cov) of x for d | C from ``sdecor::native_whiten_stats`` (in units of each group's
    power-of-two scale c: mean = centre + c ms, cov = c^2 cov'). Backward:
    dx = (grad_cov + grad_cov^T) (x - mean) / m + grad_mean / m by ``sdecor::native_whiten_dx``, with
    x - mean = c (xs - ms), xs = (x - centre) / c."""

    @staticmethod
    def forward(ctx, x, d):
        center, c, inv_c, ms, cov = torch.ops.sdecor.native_whiten_stats(x, d)
        ctx.d = d
        ctx.save_for_backward(x, center, c, inv_c, ms)
        return center + c[:, None] * ms, cov * (c * c)[:, None, None]

    @staticmethod
    def backward(ctx, grad_mean, grad_cov):
        x, center, c, inv_c, ms = ctx.saved_tensors
        d = ctx.d
        if torch.is_grad_enabled():                                   # create_graph=True: double backward
            def fn(x):
                return ref.group_cov_unchecked(x, d)
            return graph_backward(fn, (x,), (True,), (grad_mean, grad_cov))[0], None
        m = samples_per_channel(x)
        G = center.shape[0]
        if grad_mean is None:
            grad_mean = torch.zeros_like(center)
        if grad_cov is None:
            grad_cov = torch.zeros(G, d, d, dtype=center.dtype, device=center.device)
        s2 = (grad_cov + grad_cov.transpose(-1, -2)) * (c / m)[:, None, None]
        shift = grad_mean / m - (s2 @ ms.unsqueeze(-1)).squeeze(-1)
        dx = torch.ops.sdecor.native_whiten_dx(None, x, d, center, inv_c, None, s2.contiguous(), shift.contiguous())
        return dx, None


def group_cov_native(x: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """group_cov on the native backend; a smaller last group as a part of its own (views of x), its
    statistics in the padded layout."""
    return joined_parts(by_part(d, lambda dp, xp: _GroupCovNative.apply(xp, dp), [x], []), d)
