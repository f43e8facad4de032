"""The interface of the per-backend passes of group whitening in training mode.

GroupWhitening's training step reads the large tensors x and dy in four passes: the statistics of x,
the whitening y = diag(weight) W (x - mean) + bias, and in the backward the reduction
D = sum dy (x - mean)^T, s = sum dy and the input gradient dx. The d x d math between them (W from
the statistics, dL/dSe from dL/dW) is small. Each backend implements :class:`WhiteningPasses` in the
module that owns it:

- ``torch``: :class:`sdecor.ops.whiten_torch.TorchPasses` (blocked torch ops, d x d math in torch);
- ``native``: :class:`sdecor.ops.whiten_native.NativePasses` (the C++ passes
  ``sdecor::native_whiten_*``; the Newton steps by ``sdecor::native_newton`` and its backward, the
  zca math of torch);
- ``triton``: :class:`sdecor.ops.whiten.TritonPasses` (the custom ops of the Triton kernels; the
  Newton-Schulz kernels or the ZCA math for the d x d part).

Both training paths go through them: the single-process one (the autograd Function of
:mod:`sdecor.ops.whiten_torch` for torch and native, the backward of the triton op ``whiten_train``)
and the synchronised one (:mod:`sdecor.ops.whiten_sync`, the collectives between the passes).
Everything is in units of a per-group power-of-two scale c (exact; 1 unless |x| is large), so that
the statistics and the d x d math stay finite wherever x is.

The torch and native passes work on groups of d | C channels; :class:`ByParts` runs them on x with a
smaller last group (the full groups' channels and the last group's as two inputs).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .._layout import by_part, joined_parts, like_format, per_group

__all__ = ["ByParts", "ScaledStats", "WhiteningPasses", "affine_terms"]


class ScaledStats(NamedTuple):
    """Batch statistics of x per group in units of its power-of-two scale c: with
    xs = (x - center) / c, ``ms`` = mean(xs) and ``cov`` = Sigma / c^2 (Sigma the biased covariance
    of x); the mean of x is center + c ms (:attr:`mean`). ``ms`` None: ``center`` is the mean
    itself. ``inv_c`` = 1 / c, None where the backend does not compute it (triton)."""

    center: Tensor                      # (G, d)
    c: Tensor                           # (G,)
    inv_c: Tensor | None                # (G,)
    ms: Tensor | None                   # (G, d)
    cov: Tensor                         # (G, d, d)

    @property
    def mean(self) -> Tensor:
        return self.center if self.ms is None else self.center + self.c[:, None] * self.ms


class WhiteningPasses(Protocol):
    """The passes of one backend over one input x (N, C, *S) in groups of d, made by
    ``Passes(x, d)``. Per-group values are (G, d) / (G, d, d) in the padded layout of a smaller last
    group; c (G,) is the power-of-two scale of :class:`ScaledStats`."""

    def __init__(self, x: Tensor, d: int) -> None: ...

    def statistics(self) -> ScaledStats:
        """The statistics of x (at least one sample)."""

    def whiten(self, mean: Tensor, w: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """y = diag(weight) W (x - mean) + bias (weight, bias (C,) or None), x's shape, dtype and
        memory format."""

    def reduce_grad(self, dy: Tensor, mean: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """(D / c, s): D = sum_j dy_j (x_j - mean)^T (G, d, d), s = sum_j dy_j (G, d)."""

    def input_grad(self, dy: Tensor, mean: Tensor, c: Tensor, a: Tensor, b: Tensor, v: Tensor) -> Tensor:
        """dx_j = B dy_j + A (x_j - mean) / c + v (a, b (G, d, d), v (G, d)), dy's shape and dtype."""

    @staticmethod
    def whitening(cov: Tensor, eps_s: Tensor, method: str, T: int, C: int) -> tuple[Tensor, tuple]:
        """(W', state): W' = f(cov + eps_s I) in units of the scales (eps_s (G,) = eps / c^2) for the
        groups of C channels, zeros in a smaller last group's padding, and what :meth:`whitening_grad`
        needs (a tuple of tensors). Torch and native only: the single-process training Function of
        :mod:`sdecor.ops.whiten_torch` calls it; triton's whiten_train runs its own kernels."""

    @staticmethod
    def whitening_grad(grad_w: Tensor, state: tuple, eps_s: Tensor, method: str, T: int, C: int) -> Tensor:
        """dL/dSe' from dL/dW' for W' of :meth:`whitening` (torch and native only)."""

    @classmethod
    def train_matrix(cls, stats: ScaledStats, weight, bias, method: str, eps: float, T: int) -> tuple:
        """The d x d part of a single-process training forward around :meth:`whitening`: (w, a, a_apply,
        shift, mean, w_true, eps_s, state) (torch and native only; see TorchPasses)."""

    @classmethod
    def train_matrix_grad(cls, gx, gsum, ms, w, a, weight, inv_c, m: int, state: tuple, eps_s, method: str,
                          T: int) -> tuple:
        """Its backward: (grad_weight, s2, a_t, shift) for :meth:`input_grad` (torch and native only)."""

    @staticmethod
    def matrix(cov: Tensor, c: Tensor, method: str, eps: float, T: int, C: int) -> tuple[Tensor, tuple]:
        """(W, state): W (true units) of Se = cov c^2 + eps I for the groups of C channels (cov in
        units of c), and what :meth:`matrix_grad` needs."""

    @staticmethod
    def matrix_grad(grad_w: Tensor, state: tuple, cov: Tensor, c: Tensor, method: str, eps: float, T: int,
                    C: int) -> Tensor:
        """dL/dSe' / c from dL/dW' for W' = c W, Se' = Se / c^2 (``state`` from :meth:`matrix`)."""


def affine_terms(mean: Tensor, w: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(A, shift) of y = A (x - mean) + shift = diag(weight) W (x - mean) + bias: A (G, d, d),
    shift (G, d), in w's dtype."""
    G, d = mean.shape
    a = w if weight is None else per_group(weight.to(w.dtype), G, d).unsqueeze(-1) * w
    shift = torch.zeros_like(mean) if bias is None else per_group(bias.to(w.dtype), G, d)
    return a, shift


class ByParts:
    """The passes of a backend that needs d | C (torch, native) on x whose last group may be smaller:
    made by ``ByParts(Passes)(x, d)``, they run on the full groups' channels and on the last group's
    as on two inputs (views of x, :func:`sdecor._layout.by_part`), the per-group values split and
    joined in the padded layout and the outputs concatenated along the channels."""

    def __init__(self, passes: type):
        self.passes = passes
        self.matrix = passes.matrix
        self.matrix_grad = passes.matrix_grad

    def __call__(self, x: Tensor, d: int) -> "_Parts":
        return _Parts(self.passes, x, d)


class _Parts:
    def __init__(self, passes: type, x: Tensor, d: int):
        self.passes, self.x, self.d = passes, x, d

    def _each(self, fn, channels: list, groups: list) -> list:
        return by_part(self.d, lambda dp, xp, *rest: fn(self.passes(xp, dp), *rest), [self.x] + channels, groups)

    def statistics(self) -> ScaledStats:
        return ScaledStats(*joined_parts(self._each(lambda p: p.statistics(), [], []), self.d))

    def whiten(self, mean, w, weight, bias):
        a, shift = affine_terms(mean, w, weight, bias)
        return _cat_channels(self._each(lambda p, a, mean, shift: p.whiten(mean, a, None, shift.reshape(-1)),
                                        [], [a, mean, shift]), self.x)

    def reduce_grad(self, dy, mean, c):
        return joined_parts(self._each(lambda p, dy, mean, c: p.reduce_grad(dy, mean, c), [dy], [mean, c]), self.d)

    def input_grad(self, dy, mean, c, a, b, v):
        return _cat_channels(self._each(lambda p, dy, *rest: p.input_grad(dy, *rest), [dy], [mean, c, a, b, v]), dy)


def _cat_channels(results: list, like: Tensor) -> Tensor:
    """The parts' outputs along the channels, in the memory format of ``like``."""
    if len(results) == 1:
        return results[0]
    return like_format(torch.cat([t for t in results if t is not None], 1).contiguous(), like)
