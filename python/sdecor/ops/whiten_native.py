"""The ``native`` backend of whitening: the Python side of the C++ ops of ``sdecor._C``.

Rule of :mod:`sdecor.ops`: the glue of a family's C++ ops (the autograd around
``torch.ops.sdecor.native_*`` and ``eigh_small``) lives in ``ops/<family>_native.py``.

- Training (:func:`train_native`): the autograd Function of :mod:`sdecor.ops.whiten_torch` (the
  hand-written backward) over :class:`NativePasses`: the Newton steps of all groups and their reverse
  in one C++ op each (``sdecor::native_newton`` / ``_backward``, csrc/newton_cpu.cpp; zca: the torch
  backend's d x d math), and the four passes over the large
  tensors in C++ (``sdecor::native_whiten_stats`` / ``_apply`` / ``_reduce`` / ``_dx``,
  csrc/whiten_cpu.cpp): the statistics in one read of x (block statistics about each block's own
  centre and scale, combined by the parallel formula), the others as the torch passes, each on
  cache-sized blocks of (group, samples) in parallel with register-blocked SIMD microkernels
  (csrc/cpu/, one build per instruction set, chosen at run time) for the d x d x block products, in a
  fixed order whatever the thread count.
- Eval (:func:`eval_native`): y = A (x - mean) + bias by ``native_whiten_apply``, its backward by the
  C++ passes.
- zca: the batched Jacobi eigensolver :func:`eigh_native` (``sdecor::eigh_small``), with the stable
  ZCA backward of :mod:`sdecor._zca` (:func:`zca_matrix_native`); :func:`eigh_for` picks it wherever
  the native backend runs (the triton zca path's eigensolver).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _native
from .._double_backward import graph_backward
from .._layout import group_layout, like_format, split_channels
from .._precision import no_autocast_function, stats_dtype
from .._zca import ZCAWhitening, shifted_cov
from . import whiten_torch
from ._whiten_passes import ScaledStats, affine_terms

__all__ = ["NativePasses", "eigh_for", "eigh_native", "eval_native", "train_native", "zca_matrix_native"]


# ---------------------------------------------------------------------------------------------------
# training: the C++ passes


class NativePasses(whiten_torch.TorchPasses):
    """The passes of the native backend over one input x (N, C, *S) in groups of d | C
    (:class:`~sdecor.ops._whiten_passes.WhiteningPasses`): the C++ ops ``sdecor::native_whiten_*``
    on x itself (any memory format); the d x d part of method="newton" by ``sdecor::native_newton``
    and its backward (all groups in one call each way, csrc/newton_cpu.cpp), in a training step with
    the affine terms around it (``native_newton_train`` and its backward); that of zca by the torch
    backend's math."""

    def __init__(self, x: Tensor, d: int):
        self.x, self.d = x, d

    def statistics(self) -> ScaledStats:
        center, c, inv_c, ms, cov = torch.ops.sdecor.native_whiten_stats(self.x, self.d)
        return ScaledStats(center, c, inv_c, ms, cov)

    def whiten(self, mean, w, weight, bias) -> Tensor:
        a, shift = affine_terms(mean, w, weight, bias)
        return torch.ops.sdecor.native_whiten_apply(self.x, self.d, a.contiguous(), mean.contiguous(),
                                                    shift.contiguous())

    def reduce_grad(self, dy, mean, c):
        s, D = torch.ops.sdecor.native_whiten_reduce(dy.to(self.x.dtype), self.x, self.d, mean.contiguous(),
                                                     c.reciprocal())
        return D, s

    def input_grad(self, dy, mean, c, a, b, v) -> Tensor:
        dx = torch.ops.sdecor.native_whiten_dx(dy.to(self.x.dtype), self.x, self.d, mean.contiguous(),
                                               c.reciprocal(), b.contiguous(), a.contiguous(), v.contiguous())
        return dx.to(dy.dtype)


    @staticmethod
    def whitening(cov, eps_s, method, T, C):
        if method != "newton":
            return whiten_torch.TorchPasses.whitening(cov, eps_s, method, T, C)
        w, trace, hist = torch.ops.sdecor.native_newton(cov, eps_s, T, group_layout(C, cov.shape[-1])[1])
        return w, (cov, trace, hist)

    @staticmethod
    def whitening_grad(grad_w, state, eps_s, method, T, C) -> Tensor:
        if method != "newton":
            return whiten_torch.TorchPasses.whitening_grad(grad_w, state, eps_s, method, T, C)
        cov, trace, hist = state
        return torch.ops.sdecor.native_newton_backward(grad_w, cov, eps_s, trace, hist, T,
                                                       group_layout(C, grad_w.shape[-1])[1])

    @classmethod
    def train_matrix(cls, stats, weight, bias, method, eps, T):
        if method != "newton":
            return super().train_matrix(stats, weight, bias, method, eps, T)
        center, c, inv_c, ms, cov = stats
        sd = cov.dtype
        w, a, a_apply, shift, mean, w_true, eps_s, trace, hist = torch.ops.sdecor.native_newton_train(
            cov, ms, center, c, inv_c, float(eps), T, None if weight is None else weight.to(sd),
            None if bias is None else bias.to(sd))
        return w, a, a_apply, shift, mean, w_true, eps_s, (cov, trace, hist)

    @classmethod
    def train_matrix_grad(cls, gx, gsum, ms, w, a, weight, inv_c, m, state, eps_s, method, T):
        if method != "newton":
            return super().train_matrix_grad(gx, gsum, ms, w, a, weight, inv_c, m, state, eps_s, method, T)
        cov, trace, hist = state
        return torch.ops.sdecor.native_newton_train_backward(
            gx, gsum, ms, w, None if weight is None else weight.to(w.dtype), inv_c, cov, eps_s, trace, hist, T, m)


def train_native(x: Tensor, num_channels: int, method: str, eps: float, T: int, weight=None, bias=None):
    """The training path of :func:`sdecor.ops.whiten_torch.train_with_passes` on :class:`NativePasses`."""
    return whiten_torch.train_with_passes(NativePasses, x, num_channels, method, eps, T, weight, bias)


# ---------------------------------------------------------------------------------------------------
# eval: given statistics, the C++ apply pass, its backward by the C++ passes


@no_autocast_function
class _GroupWhitenEvalNative(torch.autograd.Function):
    """y = A (x - mean) + bias, A = diag(weight) wm, for d | C (``sdecor::native_whiten_apply``: one
    read of x, one write of y). Backward: dx = A^T dy (``native_whiten_dx``), and for the statistics
    and the affine parameters s = sum dy, D = sum dy (x - mean)^T (``native_whiten_reduce``):
    d mean = -A^T s, d wm = diag(weight) D, d weight = rowsum(D o wm), d bias = s."""

    @staticmethod
    def forward(ctx, x, mean, wm, weight, bias):
        G, d = mean.shape
        sd = stats_dtype(x.dtype)
        w = wm.to(sd)
        a = w if weight is None else weight.to(sd).reshape(G, d).unsqueeze(-1) * w
        shift = torch.zeros(G, d, dtype=sd, device=x.device) if bias is None else bias.to(sd).reshape(G, d)
        y = torch.ops.sdecor.native_whiten_apply(x, d, a.contiguous(), mean.to(sd).contiguous(),
                                                 shift.contiguous())
        ctx.save_for_backward(x, mean, wm, weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, mean, wm, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():                                   # create_graph=True: double backward
            return tuple(graph_backward(whiten_torch.eval_torch, (x, mean, wm, weight, bias), need, (grad_y,)))
        G, d = mean.shape
        sd = stats_dtype(x.dtype)
        gy = grad_y if grad_y.dtype == x.dtype else grad_y.to(x.dtype)
        w = wm.to(sd)
        gamma = None if weight is None else weight.to(sd).reshape(G, d)
        a = w if gamma is None else gamma.unsqueeze(-1) * w
        center = mean.to(sd).contiguous()
        ones = torch.ones(G, dtype=sd, device=x.device)
        grad_x = grad_mean = grad_wm = grad_weight = grad_bias = None
        if need[0]:
            grad_x = torch.ops.sdecor.native_whiten_dx(gy, x, d, center, ones, a.transpose(-1, -2).contiguous(),
                                                       None, torch.zeros_like(center))
        if any(need[1:]):
            s, D = torch.ops.sdecor.native_whiten_reduce(gy, x, d, center, ones)
            if need[1]:
                grad_mean = (-(a.transpose(-1, -2) @ s.unsqueeze(-1))).squeeze(-1).to(mean.dtype)
            if need[2]:
                grad_wm = (D if gamma is None else gamma.unsqueeze(-1) * D).to(wm.dtype)
            if need[3] and weight is not None:
                grad_weight = (D * w).sum(-1).reshape(-1).to(weight.dtype)
            if need[4] and bias is not None:
                grad_bias = s.reshape(-1).to(bias.dtype)
        return grad_x, grad_mean, grad_wm, grad_weight, grad_bias


def eval_native(x: Tensor, mean: Tensor, wm: Tensor, weight=None, bias=None) -> Tensor:
    """:func:`sdecor.ops.whiten_torch.eval_torch` on the native backend (arguments checked by the
    caller); a smaller last group runs as a part of its own (views of x and of the statistics, outputs
    concatenated), as in training."""
    G, d = wm.shape[0], wm.shape[-1]
    mean = mean.reshape(G, d)
    if x.shape[1] % d == 0:                  # no smaller last group: x itself (no views to make)
        return _GroupWhitenEvalNative.apply(x, mean, wm, weight, bias)
    x_even, x_last, r = split_channels(x, d)
    c0 = x_even.shape[1]
    parts = [(x_even, slice(0, G - 1), d, slice(0, c0)), (x_last, slice(G - 1, G), r, slice(c0, None))]
    if c0 == 0:
        parts = parts[1:]
    ys = [_GroupWhitenEvalNative.apply(xp, mean[gs, :dp], wm[gs, :dp, :dp],
                                       None if weight is None else weight[cs], None if bias is None else bias[cs])
          for xp, gs, dp, cs in parts]
    return like_format(torch.cat(ys, 1).contiguous(), x)


# ---------------------------------------------------------------------------------------------------
# zca: the Jacobi eigensolver


def eigh_native(a: Tensor):
    """sdecor's batched Jacobi solver, unchecked (the backend was selected for a's device)."""
    return _native.eigh_small(a, check=False)


def eigh_for(device: torch.device):
    """The eigensolver of the triton zca path: :func:`eigh_native` where the native backend runs on
    ``device``, else torch.linalg.eigh."""
    return eigh_native if _backend.reason("native", device) is None else torch.linalg.eigh


def zca_matrix_native(cov: Tensor, eps: float) -> Tensor:
    """whitening_matrix(cov, "zca", eps) by :func:`eigh_native`, with the stable ZCA backward."""
    return ZCAWhitening.apply(shifted_cov(cov, eps), float(eps), eigh_native)
