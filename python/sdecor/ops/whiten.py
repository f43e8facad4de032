"""Whitening: whitening_matrix, group_whiten, and the training / eval paths of GroupWhitening.

Public functions check their arguments once and pick the backend (``SUPPORTS``); ``run_train`` and
``run_eval`` are the same dispatch without checks, for ``GroupWhitening`` (which checks its input
itself). Backends:

- ``triton`` (CUDA tensors of float32/float16/bfloat16; CPU tensors only when forced under
  TRITON_INTERPRET=1): the custom ops below, each a launcher of :mod:`sdecor_kernels`, and their
  autograd; :class:`TritonPasses` are its passes of the training paths. Forward of
  ``whiten_train``: statistics (one read of x; for newton the Newton-Schulz steps run in the same
  finalize program, for every d) -> W -> apply (one read of x, one write of y): 3 launches for newton.
  Backward: one pass over (dy, x) for D = sum dy (x - mean)^T and sum dy, the d x d math (Newton
  backward kernel, or the stable ZCA backward in torch), one pass over (dy, x) that writes dx.
  Nothing synchronises with the host (except torch.linalg.eigh on CUDA for zca without the native
  extension). The statistics and the d x d math of training run in units of a per-group power-of-two
  scale (exact, 1 for |x - shift| < 1), so that y, W and dx stay finite up to |x| ~ 3e38, where the
  covariance overflows fp32 from 1e19.
- ``torch``: :mod:`sdecor.ops.whiten_torch` for the whitening itself (torch ops, hand-written
  backward), the reference for whitening_matrix.
- ``native``: :mod:`sdecor.ops.whiten_native`. On CPU tensors (picked where the extension is built
  and the CPU choice table, :mod:`sdecor._cpu_choice`, names it for the dtype and d), group
  whitening in training and eval mode through the C++ passes of ``csrc/whiten_cpu.cpp``
  (``sdecor::native_whiten_*``: statistics in one read of x, apply in one read and one write,
  backward in two reads of (dy, x) and one write, parallel over groups and blocks of samples with
  register-blocked SIMD microkernels for the d x d x block products), the Newton steps of a layer in
  one op each way (``csrc/newton_cpu.cpp``), and the autograd of :mod:`sdecor.ops.whiten_torch`; for
  whitening_matrix (zca) the batched Jacobi eigensolver :func:`sdecor._native.eigh_small` with the
  stable ZCA backward (on CPU where the choice table names it), on CUDA also the eigensolver of the
  triton zca path.

The passes of the training paths share one interface (:mod:`sdecor.ops._whiten_passes`), used by
the single-process path and by SyncGroupWhitening (:mod:`sdecor.ops.whiten_sync`).

Double backward (a backward run with create_graph=True) is exact on every backend: the ZCA backward
is itself differentiable (:class:`sdecor._zca.ZCAWhitening`), and the backward of every triton op,
when a graph of it is requested, differentiates the torch formulation recomputed from the saved
inputs (:func:`sdecor._double_backward.graph_backward`) instead of launching kernels that have no
derivative.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _backend, _checks
from .. import reference as ref
from .._double_backward import graph_backward
from .._layout import last_group_mask, per_channel, per_group, samples_per_channel, zero_padding
from .._precision import no_autocast
from .._zca import shifted_cov, zca_backward_masked, zca_scaled
from . import whiten_native, whiten_torch
from ._library import triton_custom_op
from ._whiten_passes import ScaledStats

__all__ = [
    "SUPPORTS",
    "whitening_matrix",
    "group_whiten",
    "group_whiten_train",
    "group_whiten_eval",
    "run_train",
    "run_eval",
    "TritonPasses",
]

_TRITON = {"cuda": ("triton", "torch"), "cpu": ("torch",), "interpret": ("triton",)}
_TRITON_NATIVE = {"cuda": ("triton", "torch"), "cpu": ("native", "torch"), "interpret": ("triton",)}

# Backends of each op per device type, in order of preference ("interpret": forced only, on CPU
# tensors under TRITON_INTERPRET=1).
SUPPORTS = {
    "group_whiten": _TRITON_NATIVE,
    "group_whiten_train": _TRITON_NATIVE,
    "group_whiten_eval": _TRITON_NATIVE,
    "whitening_matrix": _TRITON,                                      # method="newton"
    # On CPU the choice table (sdecor._cpu_choice) picks between LAPACK's eigh and the Jacobi
    # solver; without an entry, torch first.
    "whitening_matrix[zca]": {"cuda": ("native", "triton", "torch"), "cpu": ("torch", "native"),
                              "interpret": ("triton",)},
}


# ---------------------------------------------------------------------------------------------------
# public functions


@no_autocast
def whitening_matrix(cov: Tensor, method: str = "newton", eps: float = 1e-5, T: int = 5) -> Tensor:
    """Whitening matrices of ``cov + eps I`` (..., d, d): exact ZCA or T Newton-Schulz steps."""
    _checks.check_cov(cov)
    _checks.check_whitening_args(method, eps, T)
    key = "whitening_matrix[zca]" if method == "zca" else "whitening_matrix"
    backend = _backend.select("whitening_matrix", {"cov": cov}, SUPPORTS[key], cov.shape[-1])
    if backend == "native":
        return whiten_native.zca_matrix_native(cov, eps)
    if backend == "triton" and method == "newton" and math.prod(cov.shape[:-2]) > 0:
        d = cov.shape[-1]
        flat = cov.to(torch.float32).reshape(-1, d, d).contiguous()
        return newton_op(flat, float(eps), T).reshape(cov.shape)
    # torch; triton for zca (torch.linalg.eigh with the stable backward) and for an empty batch
    return ref.whitening_matrix_unchecked(cov, method, eps, T)


def group_whiten(x: Tensor, num_channels: int, method: str = "newton", eps: float = 1e-5,
                 T: int = 5, last_group: str = "even") -> Tensor:
    """y_g = W_g (x_g - mean_g) with batch statistics; same shape, dtype and memory format as x.

    ``num_channels`` is the group size d: G = C / d groups of d contiguous channels (IterNorm's
    meaning), the opposite of ``torch.nn.GroupNorm(num_groups, num_channels)``, whose num_channels is
    the channel count C. last_group="smaller": d need not divide C; a last group of
    r = C - (G - 1) d channels is whitened as a group of its own."""
    _checks.check_input(x)
    _checks.check_groups(num_channels, x.shape[1], last_group)
    _checks.check_whitening_args(method, eps, T)
    _checks.check_training_samples(x)
    return run_train(x, num_channels, method, eps, T, None, None, op="group_whiten")[0]


def group_whiten_train(x: Tensor, num_channels: int, method: str = "newton", eps: float = 1e-5,
                       T: int = 5, weight: Tensor | None = None, bias: Tensor | None = None,
                       last_group: str = "even"):
    """Training-mode group whitening with batch statistics, for the GroupWhitening module.

    Returns (y, mean, wm): y = weight * W (x - mean) + bias (weight, bias shaped (C,), optional),
    differentiable w.r.t. x, weight and bias; mean (G, d) and wm (G, d, d) fp32 (fp64 for fp64 x on
    the torch backend), detached, computed in the same pass as y (for running statistics). With
    last_group="smaller" a last group of r < d channels is whitened on its own, its statistics in
    the top-left block of its entries and zeros in the padding.
    """
    _checks.check_input(x)
    _checks.check_groups(num_channels, x.shape[1], last_group)
    _checks.check_whitening_args(method, eps, T)
    _checks.check_affine(weight, "weight", x)
    _checks.check_affine(bias, "bias", x)
    _checks.check_training_samples(x)
    return run_train(x, num_channels, method, eps, T, weight, bias)


def group_whiten_eval(x: Tensor, mean: Tensor, wm: Tensor, weight: Tensor | None = None,
                      bias: Tensor | None = None) -> Tensor:
    """y = weight * wm (x - mean) + bias per group with given statistics (mean (G, d) or (G, d, 1),
    wm (G, d, d); a smaller last group, (G - 1) d < C < G d, in the top-left block of its entries);
    differentiable w.r.t. x, weight and bias (and mean, wm)."""
    _checks.check_input(x)
    _checks.check_stats(mean, wm, x)
    _checks.check_affine(weight, "weight", x)
    _checks.check_affine(bias, "bias", x)
    return run_eval(x, mean, wm, weight, bias)


@no_autocast
def run_train(x: Tensor, num_channels: int, method: str, eps: float, T: int, weight: Tensor | None,
              bias: Tensor | None, op: str = "group_whiten_train"):
    """(y, mean, wm) of :func:`group_whiten_train` on the selected backend; no argument checks."""
    backend = _backend.select(op, {"x": x}, SUPPORTS[op], num_channels)
    if backend == "triton":
        y, mean, w = whiten_train_op(x, num_channels, method, float(eps), T, weight, bias)[:3]
        return y, mean, w
    if backend == "native":
        return whiten_native.train_native(x, num_channels, method, eps, T, weight, bias)
    return whiten_torch.train_torch(x, num_channels, method, eps, T, weight, bias)


@no_autocast
def run_eval(x: Tensor, mean: Tensor, wm: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """:func:`group_whiten_eval` on the selected backend; no argument checks."""
    G, d = wm.shape[0], wm.shape[-1]
    mean = mean.reshape(G, d)
    backend = _backend.select("group_whiten_eval", {"x": x}, SUPPORTS["group_whiten_eval"], d)
    if backend == "triton":
        return whiten_apply_op(x, mean.to(torch.float32), wm.to(torch.float32), weight, bias)
    if backend == "native":
        return whiten_native.eval_native(x, mean, wm, weight, bias)
    return whiten_torch.eval_torch(x, mean, wm, weight, bias)


# ---------------------------------------------------------------------------------------------------
# triton backend: the ops and their autograd


@triton_custom_op("newton", "(Tensor cov, float eps, int T) -> Tensor")
def newton_op(cov: Tensor, eps: float, T: int) -> Tensor:
    """W (G, d, d) of cov + eps I by T Newton-Schulz steps."""
    from sdecor_kernels import newton

    return newton.newton_forward(cov, eps, T)


@triton_custom_op("newton_backward", "(Tensor cov, Tensor grad_w, float eps, int T, Tensor? scale=None, "
                                     "int? C=None) -> Tensor")
def newton_backward_op(cov: Tensor, grad_w: Tensor, eps: float, T: int, scale: Tensor | None = None,
                       C: int | None = None) -> Tensor:
    """dL/dcov from dL/dW for W = newton(cov, eps, T); with scale, in its units; C: the channels of
    the groups when the last one is smaller (see :func:`sdecor_kernels.newton.newton_backward`)."""
    from sdecor_kernels import newton

    return newton.newton_backward(cov, grad_w, eps, T, scale, C)


def _newton_setup(ctx, inputs, output):
    cov, eps, T = inputs
    ctx.eps, ctx.T = eps, T
    ctx.save_for_backward(cov)


def _newton_backward(ctx, grad_w):
    (cov,) = ctx.saved_tensors
    if torch.is_grad_enabled():                                       # create_graph=True: double backward
        def fn(cov):
            return ref.newton_schulz(shifted_cov(cov, ctx.eps), ctx.T)
        return graph_backward(fn, (cov,), (True,), (grad_w,))[0], None, None
    return newton_backward_op(cov, grad_w, ctx.eps, ctx.T), None, None


newton_op.register_autograd(_newton_backward, setup_context=_newton_setup)


@triton_custom_op("whiten_bwd_reduce", "(Tensor dy, Tensor x, Tensor mean, Tensor? scale=None) -> (Tensor, Tensor)")
def whiten_bwd_reduce_op(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """D = sum_j dy_j (x_j - mean)^T / scale (G, d, d), s = sum_j dy_j (G, d); scale (G,) or 1."""
    from sdecor_kernels import backward

    return backward.whiten_bwd_reduce(dy, x, mean, scale)


@triton_custom_op("whiten_bwd_dx", "(Tensor dy, Tensor x, Tensor mean, Tensor a, Tensor b, Tensor v, "
                                   "Tensor? scale=None) -> Tensor")
def whiten_bwd_dx_op(dy: Tensor, x: Tensor, mean: Tensor, a: Tensor, b: Tensor, v: Tensor,
                     scale: Tensor | None = None) -> Tensor:
    """dx_j = B dy_j + A (x_j - mean) / scale + v; scale (G,) or 1."""
    from sdecor_kernels import backward

    return backward.whiten_bwd_dx(dy, x, mean, a, b, v, scale)


# -- group whitening, training (batch statistics) ----------------------------------------------------


@triton_custom_op("whiten_train", "(Tensor x, int d, str method, float eps, int T, Tensor? weight, "
                                  "Tensor? bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def whiten_train_op(x: Tensor, d: int, method: str, eps: float, T: int, weight: Tensor | None,
                    bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, W, cov / c^2, evals, evecs, c); evals/evecs (zca, of Se / c^2) are empty for newton.

    d need not divide C: a smaller last group of r = C - (G-1) d channels is whitened on its own, in
    the same kernels (masked by each group's channel count, see :mod:`sdecor_kernels._common`).

    c (G,): each group's power-of-two scale of the statistics (1 unless max |x - shift| >= 1, see
    :func:`sdecor_kernels.stats.group_stats_scaled`). The d x d math runs on Se / c^2 = cov / c^2 +
    eps / c^2 I, finite up to |x| ~ 3e38 where cov itself overflows fp32 from |x| ~ 1e19; W (true
    units, ~1 / std) is finite.
    """
    from sdecor_kernels import apply, stats

    if method == "newton":
        mean, cov, scale, w = stats.group_stats_newton(x, d, eps, T)
        evals = cov.new_empty((0,))
        evecs = cov.new_empty((0,))
    else:
        mean, cov, scale = stats.group_stats_scaled(x, d)
        w, (evals, evecs) = TritonPasses.matrix(cov, scale, method, eps, T, x.shape[1])
    y = apply.whiten_apply(x, mean, w, weight, bias)
    return y, mean, w, cov, evals, evecs, scale


def _whiten_train_setup(ctx, inputs, output):
    x, d, method, eps, T, weight, bias = inputs
    y, mean, w, cov, evals, evecs, scale = output
    ctx.method, ctx.eps, ctx.T = method, eps, T
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, mean, w, cov, evals, evecs, weight, bias, scale)
    ctx.mark_non_differentiable(mean, w, cov, evals, evecs, scale)


def _whiten_train_backward(ctx, dy, *_):
    x, mean, w, cov, evals, evecs, weight, bias, scale = ctx.saved_tensors
    G, d = mean.shape
    if torch.is_grad_enabled():                                       # create_graph=True: double backward
        need = ctx.needs_input_grad
        gx, gw, gb = whiten_torch.train_graph_backward(dy, x, weight, bias, (need[0], need[5], need[6]), d,
                                                       ctx.method, ctx.eps, ctx.T, whiten_native.eigh_for(x.device))
        return gx, None, None, None, None, gw, gb
    m = samples_per_channel(x)
    run = TritonPasses(x, d)
    # In units of the scales c of the statistics (cov is cov / c^2): D / c, dL/dW' = dL/dW / c for
    # W' = c W, dL/dSe' / c and c A, all finite where D, dL/dSe and A (~1e-60 at |x| ~ 1e30) are not.
    D, s = run.reduce_grad(dy, mean, scale)                          # D / c
    gamma = per_group(weight.to(torch.float32), G, d) if ctx.has_weight else torch.ones_like(mean)
    grad_w = gamma.unsqueeze(-1) * D                                # dL/dW' = diag(gamma) D / c
    grad_se = TritonPasses.matrix_grad(grad_w, (evals, evecs), cov, scale, ctx.method, ctx.eps, ctx.T, x.shape[1])
    a = (grad_se + grad_se.transpose(-1, -2)) / m                   # through cov = Xc Xc^T / m
    b = w.transpose(-1, -2) * gamma.unsqueeze(-2)                   # W^T diag(gamma)
    v = -(b @ s.unsqueeze(-1)).squeeze(-1) / m                      # through the mean
    dx = run.input_grad(dy, mean, scale, a, b, v)                   # c A applied to (x - mean) / c
    grad_weight = grad_bias = None
    if ctx.has_weight:
        # sum_j dy * W (x - mean) = (D / c) (c W)
        grad_weight = per_channel((D * (w * scale[:, None, None])).sum(-1), x.shape[1]).to(weight.dtype)
    if ctx.has_bias:
        grad_bias = per_channel(s, x.shape[1]).to(dy.dtype)
    return dx, None, None, None, None, grad_weight, grad_bias


whiten_train_op.register_autograd(_whiten_train_backward, setup_context=_whiten_train_setup)


# -- group whitening with given statistics (eval) ----------------------------------------------------


@triton_custom_op("whiten_apply", "(Tensor x, Tensor mean, Tensor wm, Tensor? weight, Tensor? bias) -> Tensor")
def whiten_apply_op(x: Tensor, mean: Tensor, wm: Tensor, weight: Tensor | None,
                    bias: Tensor | None) -> Tensor:
    from sdecor_kernels import apply

    return apply.whiten_apply(x, mean, wm, weight, bias)


def _whiten_apply_setup(ctx, inputs, output):
    x, mean, wm, weight, bias = inputs
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, mean, wm, weight, bias)


def _whiten_apply_backward(ctx, dy):
    x, mean, wm, weight, bias = ctx.saved_tensors
    if torch.is_grad_enabled():                                       # create_graph=True: double backward
        return tuple(graph_backward(whiten_torch.eval_torch, (x, mean, wm, weight, bias),
                                    ctx.needs_input_grad, (dy,)))
    G, d = mean.shape
    # a smaller last group: the padding entries of mean and wm are not read (the forward's kernel
    # masks them), so whatever they hold (NaN, inf) is selected away here, and gets zero gradient
    mask = last_group_mask(wm, x.shape[1])
    mean, wm = zero_padding(mean, mask), zero_padding(wm, mask)
    gamma = per_group(weight.to(torch.float32), G, d) if ctx.has_weight else torch.ones_like(mean)
    b = wm.to(torch.float32).transpose(-1, -2) * gamma.unsqueeze(-2)
    zeros = torch.zeros_like(b)
    need = ctx.needs_input_grad
    dx = whiten_bwd_dx_op(dy, x, mean, zeros, b, torch.zeros_like(mean)) if need[0] else None
    grad_mean = grad_wm = grad_weight = grad_bias = None
    if any(need[1:]):
        D, s = whiten_bwd_reduce_op(dy, x, mean)
        if need[1]:
            grad_mean = zero_padding(-(b @ s.unsqueeze(-1)).squeeze(-1), mask).to(mean.dtype)
        if need[2]:
            grad_wm = zero_padding(gamma.unsqueeze(-1) * D, mask).to(wm.dtype)
        if need[3] and ctx.has_weight:
            grad_weight = per_channel((D * wm).sum(-1), x.shape[1]).to(weight.dtype)
        if need[4] and ctx.has_bias:
            grad_bias = per_channel(s, x.shape[1]).to(dy.dtype)
    return dx, grad_mean, grad_wm, grad_weight, grad_bias


whiten_apply_op.register_autograd(_whiten_apply_backward, setup_context=_whiten_apply_setup)


# -- the passes of the training paths (the single-process backward above, SyncGroupWhitening) --------


class TritonPasses:
    """The passes of the triton backend over one input x (N, C, *S) in groups of d
    (:class:`~sdecor.ops._whiten_passes.WhiteningPasses`): the ops above, the Newton-Schulz kernels or
    the ZCA math (eigensolver :func:`sdecor.ops.whiten_native.eigh_for`) for the d x d part; a
    smaller last group is masked in the kernels."""

    def __init__(self, x: Tensor, d: int):
        self.x, self.d = x, d

    def statistics(self) -> ScaledStats:
        from sdecor_kernels import stats

        mean, cov, c = stats.group_stats_scaled(self.x, self.d)
        return ScaledStats(mean, c, None, None, cov)

    def whiten(self, mean, w, weight, bias) -> Tensor:
        return whiten_apply_op(self.x, mean, w, weight, bias)

    def reduce_grad(self, dy, mean, c):
        return whiten_bwd_reduce_op(dy, self.x, mean, c)

    def input_grad(self, dy, mean, c, a, b, v) -> Tensor:
        return whiten_bwd_dx_op(dy, self.x, mean, a, b, v, c)

    @staticmethod
    def matrix(cov, c, method, eps, T, C):
        if method == "newton":
            from sdecor_kernels import newton

            return newton.newton_forward(cov, eps, T, c, C), ()
        evals, evecs, w = zca_scaled(cov, eps, c, C, whiten_native.eigh_for(cov.device))
        return w, (evals, evecs)

    @staticmethod
    def matrix_grad(grad_w, state, cov, c, method, eps, T, C) -> Tensor:
        if method == "newton":
            return newton_backward_op(cov, grad_w, eps, T, c, C)
        evals, evecs = state
        return zca_backward_masked(grad_w, evals, evecs, eps, c, C)
