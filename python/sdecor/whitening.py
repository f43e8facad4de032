"""Group-wise covariance and whitening: public functions dispatching between backends.

Layers: public function (argument checks, backend choice) -> for ``triton``, a torch.library custom op
(``torch.ops.sdecor_triton.*``, built with ``triton_op`` + ``wrap_triton``, gradients through
``register_autograd``; opaque ``custom_op`` under the Triton interpreter) -> launcher in
:mod:`sdecor_kernels` (``stats``, ``newton``, ``apply``, ``backward``) -> kernel. The ``torch``
backend runs the reference functions for group_cov and whitening_matrix, and for group_whiten /
group_whiten_train the same math in torch ops with a hand-written backward (:mod:`sdecor._torch_fused`);
``native`` (whitening_matrix, zca) uses the batched Jacobi eigensolver ``sdecor._native.eigh_small``.

Forward of group_whiten_train on ``triton``: stats kernel (one read of x) -> finalize (+ Newton-Schulz,
one program per group) -> apply kernel (one read of x, one write of y). Backward: one pass over
(dy, x) for D = sum dy (x - mean)^T and sum dy, the d x d math (Newton backward kernel, or the
stable ZCA backward in torch), one pass over (dy, x) that writes dx. Nothing synchronises with the
host (except torch.linalg.eigh on CUDA, which checks its result on the host; eigh_small does not).
"""

from __future__ import annotations

import importlib
import importlib.util
import math

import torch

from . import _backend
from . import reference as ref
from ._torch_fused import group_whiten_train_torch

__all__ = [
    "SUPPORTS",
    "TRITON_DTYPES",
    "group_cov",
    "whitening_matrix",
    "group_whiten",
    "group_whiten_train",
    "group_whiten_eval",
]

# dtypes of x the Triton kernels take (statistics in fp32, outputs in x's dtype)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _native_present() -> bool:
    try:
        return importlib.util.find_spec("sdecor._native") is not None
    except (ImportError, ValueError):
        return False


_NATIVE = ("native",) if _native_present() else ()

_TRITON = {"cuda": ("triton", "torch"), "cpu": ("torch",), "interpret": ("triton",)}

# Backends implementing each op, per device type, in order of preference. "interpret": backends that
# can be forced on CPU tensors through the Triton interpreter (never picked automatically).
SUPPORTS = {
    "group_cov": _TRITON,
    "group_whiten": _TRITON,
    "group_whiten_train": _TRITON,
    "group_whiten_eval": _TRITON,
    "whitening_matrix": _TRITON,                                      # method="newton"
    # On CPU, LAPACK's eigh beats the Jacobi solver at these sizes: native only when forced.
    "whitening_matrix[zca]": {"cuda": _NATIVE + ("triton", "torch"), "cpu": ("torch",) + _NATIVE,
                              "interpret": ("triton",)},
}


def _select(op: str, key: str, t: torch.Tensor) -> str:
    """The backend for ``op`` (SUPPORTS[key]) on t, with Triton limited to TRITON_DTYPES."""
    supports = SUPPORTS[key]
    if t.dtype not in TRITON_DTYPES:
        if _backend.forced() == "triton":
            raise _backend.BackendUnavailableError(
                f"sdecor.{op}: the 'triton' backend takes {', '.join(str(d) for d in TRITON_DTYPES)} "
                f"inputs; got {t.dtype} (use the 'torch' backend for it)")
        supports = {k: tuple(b for b in v if b != "triton") for k, v in supports.items()}
    return _backend.select(op, (t,), supports)


# ---------------------------------------------------------------------------------------------------
# eigensolvers for zca


def _native_eigh():
    """sdecor._native.eigh_small (ascending eigenvalues, eigenvectors as columns), imported lazily."""
    return importlib.import_module("sdecor._native").eigh_small


def _eigh_for(device: torch.device):
    """The eigensolver of the zca path on ``device``: eigh_small where the native backend runs there,
    else torch.linalg.eigh."""
    if _NATIVE and _backend.reason("native", device) is None:
        solver = _native_eigh()
        return lambda a: solver(a, check=False)
    return torch.linalg.eigh


# ---------------------------------------------------------------------------------------------------
# custom ops of the triton backend (kernels imported lazily: sdecor imports without Triton)

_kernels = None


def _K():
    """The kernel family modules of sdecor_kernels, as attributes stats, newton, apply, backward."""
    global _kernels
    if _kernels is None:
        import types

        _kernels = types.SimpleNamespace(**{name: importlib.import_module(f"sdecor_kernels.{name}")
                                            for name in ("stats", "newton", "apply", "backward")})
    return _kernels


_ops = None


def _triton_ops():
    """Define the torch.ops.sdecor_triton custom ops on first use; returns torch.ops.sdecor_triton."""
    global _ops
    if _ops is None:
        _define_ops()
        _ops = torch.ops.sdecor_triton
    return _ops


def _samples(x: torch.Tensor) -> int:
    return x.shape[0] * math.prod(x.shape[2:])


def _op(name: str, schema: str):
    """Register ``fn`` as the custom op sdecor_triton::<name>: a ``triton_op`` (visible to
    torch.compile, kernels launched through wrap_triton). Under the Triton interpreter kernels are
    not traceable, so the op is an opaque ``custom_op`` whose fake implementation is the same
    function (the launcher skips kernels on fake tensors)."""
    def dec(fn):
        if _backend.interpreter_on():
            op = torch.library.custom_op(f"sdecor_triton::{name}", fn, mutates_args=(), schema=schema)
            op.register_fake(fn)
            return op
        return torch.library.triton_op(f"sdecor_triton::{name}", fn, mutates_args=(), schema=schema)
    return dec


def _define_ops() -> None:
    K = _K()
    Tensor = torch.Tensor

    # -- group_cov ----------------------------------------------------------------------------------
    @_op("group_cov", "(Tensor x, int d) -> (Tensor, Tensor)")
    def group_cov_op(x: Tensor, d: int) -> tuple[Tensor, Tensor]:
        return K.stats.group_stats(x, d)

    @_op("group_cov_backward", "(Tensor x, Tensor mean, Tensor a, Tensor v) -> Tensor")
    def group_cov_backward_op(x: Tensor, mean: Tensor, a: Tensor, v: Tensor) -> Tensor:
        """dx_j = A (x_j - mean) + v."""
        return K.backward.whiten_bwd_dx(None, x, mean, a, None, v)

    def group_cov_setup(ctx, inputs, output):
        x, _ = inputs
        ctx.save_for_backward(x, output[0])

    def group_cov_backward(ctx, grad_mean, grad_cov):
        x, mean = ctx.saved_tensors
        m = _samples(x)
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        if grad_cov is None:
            grad_cov = torch.zeros(mean.shape + mean.shape[-1:], dtype=mean.dtype, device=mean.device)
        a = (grad_cov + grad_cov.transpose(-1, -2)) / m               # cov = Xc Xc^T / m
        return torch.ops.sdecor_triton.group_cov_backward(x, mean, a, grad_mean / m), None

    group_cov_op.register_autograd(group_cov_backward, setup_context=group_cov_setup)

    # -- newton ------------------------------------------------------------------------------------
    @_op("newton", "(Tensor cov, float eps, int T) -> Tensor")
    def newton_op(cov: Tensor, eps: float, T: int) -> Tensor:
        return K.newton.newton_forward(cov, eps, T)

    @_op("newton_backward", "(Tensor cov, Tensor grad_w, float eps, int T) -> Tensor")
    def newton_backward_op(cov: Tensor, grad_w: Tensor, eps: float, T: int) -> Tensor:
        return K.newton.newton_backward(cov, grad_w, eps, T)

    def newton_setup(ctx, inputs, output):
        cov, eps, T = inputs
        ctx.eps, ctx.T = eps, T
        ctx.save_for_backward(cov)

    def newton_backward(ctx, grad_w):
        (cov,) = ctx.saved_tensors
        return torch.ops.sdecor_triton.newton_backward(cov, grad_w, ctx.eps, ctx.T), None, None

    newton_op.register_autograd(newton_backward, setup_context=newton_setup)

    # -- passes of the whitening backward ----------------------------------------------------------
    @_op("whiten_bwd_reduce", "(Tensor dy, Tensor x, Tensor mean) -> (Tensor, Tensor)")
    def bwd_reduce_op(dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        """D = sum_j dy_j (x_j - mean)^T (G, d, d), s = sum_j dy_j (G, d)."""
        return K.backward.whiten_bwd_reduce(dy, x, mean)

    @_op("whiten_bwd_dx", "(Tensor dy, Tensor x, Tensor mean, Tensor a, Tensor b, Tensor v) -> Tensor")
    def bwd_dx_op(dy: Tensor, x: Tensor, mean: Tensor, a: Tensor, b: Tensor, v: Tensor) -> Tensor:
        """dx_j = B dy_j + A (x_j - mean) + v."""
        return K.backward.whiten_bwd_dx(dy, x, mean, a, b, v)

    # -- group whitening, training (batch statistics) ------------------------------------------------
    @_op("whiten_train", "(Tensor x, int d, str method, float eps, int T, Tensor? weight, Tensor? bias)"
                         " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
    def whiten_train_op(x: Tensor, d: int, method: str, eps: float, T: int, weight: Tensor | None,
                        bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(y, mean, W, cov, evals, evecs); evals/evecs (zca) are empty for newton."""
        if method == "newton":
            mean, cov, w = K.stats.group_stats_newton(x, d, eps, T)
            evals = cov.new_empty((0,))
            evecs = cov.new_empty((0,))
        else:
            mean, cov = K.stats.group_stats(x, d)
            se = cov + eps * torch.eye(d, dtype=cov.dtype, device=cov.device)
            evals, evecs = _eigh_for(x.device)(se)
            w = ref.zca_from_eigh(evals, evecs, eps)
        y = K.apply.whiten_apply(x, mean, w, weight, bias)
        return y, mean, w, cov, evals, evecs

    def whiten_train_setup(ctx, inputs, output):
        x, d, method, eps, T, weight, bias = inputs
        y, mean, w, cov, evals, evecs = output
        ctx.method, ctx.eps, ctx.T = method, eps, T
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(x, mean, w, cov, evals, evecs, weight)
        ctx.mark_non_differentiable(mean, w, cov, evals, evecs)

    def whiten_train_backward(ctx, dy, *_):
        x, mean, w, cov, evals, evecs, weight = ctx.saved_tensors
        ops = torch.ops.sdecor_triton
        G, d = mean.shape
        m = _samples(x)
        D, s = ops.whiten_bwd_reduce(dy, x, mean)
        gamma = weight.to(torch.float32).reshape(G, d) if ctx.has_weight else torch.ones_like(mean)
        grad_w = gamma.unsqueeze(-1) * D                                # dL/dW = diag(gamma) D
        if ctx.method == "newton":
            grad_se = ops.newton_backward(cov, grad_w, ctx.eps, ctx.T)
        else:
            grad_se = ref.zca_backward(grad_w, evals, evecs, ctx.eps)
        a = (grad_se + grad_se.transpose(-1, -2)) / m                   # through cov = Xc Xc^T / m
        b = w.transpose(-1, -2) * gamma.unsqueeze(-2)                   # W^T diag(gamma)
        v = -(b @ s.unsqueeze(-1)).squeeze(-1) / m                      # through the mean
        dx = ops.whiten_bwd_dx(dy, x, mean, a, b, v)
        grad_weight = grad_bias = None
        if ctx.has_weight:
            grad_weight = (D * w).sum(-1).reshape(-1).to(weight.dtype)  # sum_j dy * W (x - mean)
        if ctx.has_bias:
            grad_bias = s.reshape(-1).to(dy.dtype)
        return dx, None, None, None, None, grad_weight, grad_bias

    whiten_train_op.register_autograd(whiten_train_backward, setup_context=whiten_train_setup)

    # -- group whitening with given statistics (eval) ---------------------------------------------
    @_op("whiten_apply", "(Tensor x, Tensor mean, Tensor wm, Tensor? weight, Tensor? bias) -> Tensor")
    def whiten_apply_op(x: Tensor, mean: Tensor, wm: Tensor, weight: Tensor | None,
                        bias: Tensor | None) -> Tensor:
        return K.apply.whiten_apply(x, mean, wm, weight, bias)

    def whiten_apply_setup(ctx, inputs, output):
        x, mean, wm, weight, bias = inputs
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.save_for_backward(x, mean, wm, weight)

    def whiten_apply_backward(ctx, dy):
        x, mean, wm, weight = ctx.saved_tensors
        ops = torch.ops.sdecor_triton
        G, d = mean.shape
        gamma = weight.to(torch.float32).reshape(G, d) if ctx.has_weight else torch.ones_like(mean)
        b = wm.to(torch.float32).transpose(-1, -2) * gamma.unsqueeze(-2)
        zeros = torch.zeros_like(b)
        need = ctx.needs_input_grad
        dx = ops.whiten_bwd_dx(dy, x, mean, zeros, b, torch.zeros_like(mean)) if need[0] else None
        grad_mean = grad_wm = grad_weight = grad_bias = None
        if any(need[1:]):
            D, s = ops.whiten_bwd_reduce(dy, x, mean)
            if need[1]:
                grad_mean = -(b @ s.unsqueeze(-1)).squeeze(-1).to(mean.dtype)
            if need[2]:
                grad_wm = (gamma.unsqueeze(-1) * D).to(wm.dtype)
            if need[3] and ctx.has_weight:
                grad_weight = (D * wm).sum(-1).reshape(-1).to(weight.dtype)
            if need[4] and ctx.has_bias:
                grad_bias = s.reshape(-1).to(dy.dtype)
        return dx, grad_mean, grad_wm, grad_weight, grad_bias

    whiten_apply_op.register_autograd(whiten_apply_backward, setup_context=whiten_apply_setup)


# ---------------------------------------------------------------------------------------------------
# argument checks


def _check_stats(mean, wm, x: torch.Tensor) -> tuple[int, int]:
    for name, t in (("mean", mean), ("wm", wm)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}; got {t.device}")
    if wm.dim() != 3 or wm.shape[-1] != wm.shape[-2]:
        raise ValueError(f"wm must have shape (G, d, d); got {tuple(wm.shape)}")
    G, d = wm.shape[0], wm.shape[-1]
    if G * d != x.shape[1]:
        raise ValueError(f"wm of shape {tuple(wm.shape)} gives G*d = {G * d} channels; x has C={x.shape[1]}")
    if mean.shape not in ((G, d), (G, d, 1)):
        raise ValueError(f"mean must have shape (G, d) = ({G}, {d}) (or (G, d, 1)); got {tuple(mean.shape)}")
    return G, d


def _affine(y: torch.Tensor, weight, bias) -> torch.Tensor:
    shape = (1, y.shape[1]) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape).to(y.dtype)
    if bias is not None:
        y = y + bias.reshape(shape).to(y.dtype)
    return y


# ---------------------------------------------------------------------------------------------------
# public functions


def group_cov(x: torch.Tensor, num_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (G, d) and biased covariance (G, d, d) of every group of ``num_channels`` channels."""
    ref.check_input(x)
    ref.check_groups(num_channels, x.shape[1])
    ref.check_training_samples(x)
    if _select("group_cov", "group_cov", x) == "triton":
        return _triton_ops().group_cov(x, num_channels)
    return ref.group_cov(x, num_channels)


def whitening_matrix(cov: torch.Tensor, method: str = "newton", eps: float = 1e-5, T: int = 5) -> torch.Tensor:
    """Whitening matrices of ``cov + eps I`` (..., d, d): exact ZCA or T Newton-Schulz steps."""
    ref.check_cov(cov)
    ref.check_whitening_args(method, eps, T)
    key = "whitening_matrix[zca]" if method == "zca" else "whitening_matrix"
    backend = _select("whitening_matrix", key, cov)
    if backend == "native":
        return ref.whitening_matrix(cov, "zca", eps, T, eigh=lambda a: _native_eigh()(a, check=False))
    if backend == "triton" and method == "newton":
        d = cov.shape[-1]
        flat = cov.to(torch.float32).reshape(-1, d, d)
        if flat.shape[0] == 0:
            return ref.whitening_matrix(cov, method, eps, T)
        w = _triton_ops().newton(flat.contiguous(), float(eps), T)
        return w.reshape(cov.shape)
    # triton, zca: the torch eigensolver with the stable backward
    return ref.whitening_matrix(cov, method, eps, T)


def group_whiten(x: torch.Tensor, num_channels: int, method: str = "newton", eps: float = 1e-5,
                 T: int = 5) -> torch.Tensor:
    """y_g = W_g (x_g - mean_g) with batch statistics; same shape, dtype and memory format as x."""
    ref.check_input(x)
    ref.check_groups(num_channels, x.shape[1])
    ref.check_whitening_args(method, eps, T)
    ref.check_training_samples(x)
    if _select("group_whiten", "group_whiten", x) == "triton":
        return _triton_ops().whiten_train(x, num_channels, method, float(eps), T, None, None)[0]
    return group_whiten_train_torch(x, num_channels, method, eps, T)[0]


def group_whiten_train(x: torch.Tensor, num_channels: int, method: str = "newton", eps: float = 1e-5,
                       T: int = 5, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
    """Training-mode group whitening with batch statistics, for the GroupWhitening module.

    Returns (y, mean, wm): y = weight * W (x - mean) + bias (weight, bias shaped (C,), optional),
    differentiable w.r.t. x, weight and bias; mean (G, d) and wm (G, d, d) fp32 (fp64 for fp64 x on
    the torch backend), detached, computed in the same pass as y (for running statistics).
    """
    ref.check_input(x)
    ref.check_groups(num_channels, x.shape[1])
    ref.check_whitening_args(method, eps, T)
    ref.check_affine(weight, "weight", x)
    ref.check_affine(bias, "bias", x)
    ref.check_training_samples(x)
    if _select("group_whiten_train", "group_whiten_train", x) == "triton":
        y, mean, wm = _triton_ops().whiten_train(x, num_channels, method, float(eps), T, weight, bias)[:3]
        return y, mean, wm
    return group_whiten_train_torch(x, num_channels, method, eps, T, weight, bias)


def group_whiten_eval(x: torch.Tensor, mean: torch.Tensor, wm: torch.Tensor,
                      weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = weight * wm (x - mean) + bias per group with given statistics (mean (G, d) or (G, d, 1),
    wm (G, d, d)); differentiable w.r.t. x, weight and bias (and mean, wm)."""
    ref.check_input(x)
    G, d = _check_stats(mean, wm, x)
    ref.check_affine(weight, "weight", x)
    ref.check_affine(bias, "bias", x)
    mean = mean.reshape(G, d)
    if _select("group_whiten_eval", "group_whiten_eval", x) == "triton":
        return _triton_ops().whiten_apply(x, mean.to(torch.float32), wm.to(torch.float32), weight, bias)
    sd = ref.stats_dtype(x.dtype)
    y = _affine(ref.apply_whitening(x, mean.to(sd), wm.to(sd)), weight, bias)
    return ref.like_format(y, x)
