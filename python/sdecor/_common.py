"""Helpers shared by the reference and the backends, each written once.

Layout: the statistics dtype, the (N, G, d, L) group view, the output memory format. ZCA: the
whitening matrix from an eigendecomposition and its stable backward (DESIGN.md), as an autograd
Function that takes the eigensolver (torch.linalg.eigh, or sdecor's Jacobi solver on the native
backend). Top-k masking: the per-sample scores and the fill values, shared so that the torch backend
is bit-identical to the reference.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "CORR_VAR_FLOOR",
    "ZCAWhitening",
    "decorrelation_from_cov",
    "eye_like",
    "fill_values",
    "grouped",
    "like_format",
    "mask_scores",
    "rank_order",
    "samples_per_channel",
    "shifted_cov",
    "stats_dtype",
    "sym",
    "zca_backward",
    "zca_backward_scaled",
    "zca_from_eigh",
    "zca_from_eigh_scaled",
]


# ---------------------------------------------------------------------------------------------------
# layout and dtype


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and output dtype of statistics: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def samples_per_channel(x: torch.Tensor) -> int:
    """m = N * prod(S)."""
    return x.shape[0] * math.prod(x.shape[2:])


def grouped(x: torch.Tensor, num_channels: int) -> torch.Tensor:
    """View x (N, C, *S) as (N, G, d, L) with L = prod(S) (copies only for non-contiguous x)."""
    N, C = x.shape[:2]
    return x.reshape(N, C // num_channels, num_channels, math.prod(x.shape[2:]))


def like_format(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return y (contiguous, shaped like x) in x's memory format (channels_last where x is)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return y.contiguous(memory_format=torch.channels_last_3d)
    return y


# ---------------------------------------------------------------------------------------------------
# d x d algebra


def sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def eye_like(a: torch.Tensor) -> torch.Tensor:
    """Identity matrices broadcastable against a (..., d, d)."""
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


def shifted_cov(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """Se = cov + eps I, in the statistics dtype of cov (the matrix every whitening method works on)."""
    sd = stats_dtype(cov.dtype)
    return cov.to(sd) + eps * eye_like(cov).to(sd)


def zca_from_eigh(evals: torch.Tensor, evecs: torch.Tensor, eps: float) -> torch.Tensor:
    """W = U diag(l^-1/2) U^T with the eigenvalues clamped at eps (never NaN)."""
    s_inv = evals.clamp_min(eps).rsqrt()
    return (evecs * s_inv.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def zca_backward(grad_w: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, eps: float) -> torch.Tensor:
    """dL/dSe = U (F o (U^T sym(G) U)) U^T, F_ij = -1 / (s_i s_j (s_i + s_j)), s = sqrt(l).

    F is the divided difference of f(l) = l^-1/2 at (l_i, l_j); written this way it stays finite
    when eigenvalues repeat, where autograd through eigh divides by l_i - l_j = 0.
    """
    s = evals.clamp_min(eps).sqrt()
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    F = -1.0 / (si * sj * (si + sj))
    inner = evecs.transpose(-1, -2) @ sym(grad_w) @ evecs
    return evecs @ (F * inner) @ evecs.transpose(-1, -2)


def _zca_sigma(evals: torch.Tensor, eps: float, scale: torch.Tensor):
    """(sigma, sigma / c): square roots of Se's eigenvalues clamped at eps, from the eigenvalues of
    Se' = Se / c^2 (c = scale (G,), powers of two), in Se's units and in units of c."""
    c = scale.to(evals.dtype).unsqueeze(-1)
    root_eps = torch.full((), eps, dtype=evals.dtype, device=evals.device).sqrt()
    sigma = torch.maximum(c * evals.clamp_min(0).sqrt(), root_eps)
    return sigma, sigma / c


def zca_from_eigh_scaled(evals: torch.Tensor, evecs: torch.Tensor, eps: float,
                         scale: torch.Tensor) -> torch.Tensor:
    """W of Se = c^2 Se' from eigh(Se'), c = scale (G,) (powers of two): U diag(1 / sigma) U^T, sigma
    the square roots of Se's eigenvalues clamped at eps. Finite where Se is not (and where eps / c^2
    underflows); where c = 1 exactly :func:`zca_from_eigh`."""
    sigma, _ = _zca_sigma(evals, eps, scale)
    unscaled = (scale == 1).unsqueeze(-1)
    s_inv = torch.where(unscaled, evals.clamp_min(eps).rsqrt(), sigma.reciprocal())
    return (evecs * s_inv.unsqueeze(-2)) @ evecs.transpose(-1, -2)


def zca_backward_scaled(grad_w: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, eps: float,
                        scale: torch.Tensor) -> torch.Tensor:
    """dL/dSe' / c from grad_w = dL/dW' for W' = c W = Se'^-1/2, Se' = Se / c^2 = U diag(l) U^T,
    c = scale (G,) (powers of two): :func:`zca_backward` in units of c, U ((F / c) o (U^T sym(G) U))
    U^T with F / c = -1 / (sigma_i s_j (s_i + s_j)), s = sigma / c (see zca_from_eigh_scaled).

    Divided by c it stays in fp32's range except between two eigenvalues both at the clamp (F / c ~
    c^2 / eps^1.5, e.g. 1e67 at c = 1e30): those entries are bounded by fp32's largest number, so
    that they give 0, not NaN, against the zero entries of U^T sym(G) U of a constant channel whose
    axis eigh returns exactly. Where c = 1 exactly :func:`zca_backward`.
    """
    sigma, s = _zca_sigma(evals, eps, scale)
    F = -1.0 / (sigma.unsqueeze(-1) * s.unsqueeze(-2) * (s.unsqueeze(-1) + s.unsqueeze(-2)))
    F = F.clamp_min(-torch.finfo(F.dtype).max)
    inner = evecs.transpose(-1, -2) @ sym(grad_w) @ evecs
    return evecs @ (F * inner) @ evecs.transpose(-1, -2)


class ZCAWhitening(torch.autograd.Function):
    """W = Se^-1/2 through an eigendecomposition by ``eigh`` (ascending eigenvalues, eigenvectors as
    columns), with the stable backward :func:`zca_backward`."""

    @staticmethod
    def forward(ctx, se: torch.Tensor, eps: float, eigh):
        evals, evecs = eigh(se)
        ctx.eps = eps
        ctx.save_for_backward(evals, evecs)
        return zca_from_eigh(evals, evecs, eps)

    @staticmethod
    def backward(ctx, grad_w):
        evals, evecs = ctx.saved_tensors
        return zca_backward(grad_w, evals, evecs, ctx.eps), None, None


# ---------------------------------------------------------------------------------------------------
# top-k masking


def mask_scores(saliency: torch.Tensor, reduce, abs: bool) -> torch.Tensor:
    """Scores per sample, flattened: (N, prod(S)) for reduce="mean", (N, C*prod(S)) for None."""
    score = saliency.abs() if abs else saliency
    if reduce == "mean":
        # Mean over channels, pinned to one rounding on every device: accumulate channel by channel
        # in fp32 (fp64 for fp64), divide by C once, round to the saliency's dtype.
        acc = score[:, 0].to(stats_dtype(score.dtype))
        for c in range(1, score.shape[1]):
            acc = acc + score[:, c]
        score = (acc / score.shape[1]).to(score.dtype)
    # the row length spelled out: reshape(N, -1) cannot infer it when N = 0
    return score.reshape(score.shape[0], math.prod(score.shape[1:]))


def rank_order(score: torch.Tensor, largest: bool) -> torch.Tensor:
    """Per-row positions in selection order: the k first are the selected set.

    Order: by value (ascending, or descending for largest=True), NaN ranked as the largest value,
    equal values by lower flat index. Two stable sorts: by value, then by NaN-ness.
    """
    nan = torch.isnan(score)
    value = torch.where(nan, torch.zeros_like(score), score)
    order = torch.sort(-value if largest else value, dim=1, stable=True).indices
    nan_key = nan.gather(1, order).to(torch.int8)
    regroup = torch.sort(-nan_key if largest else nan_key, dim=1, stable=True).indices
    return order.gather(1, regroup)


def fill_values(x: torch.Tensor, fill: str, value: float, baseline, generator) -> torch.Tensor:
    """What the selected positions become, as a tensor broadcastable to x."""
    spatial = tuple(range(2, x.dim()))
    if fill == "zero":
        return torch.zeros((), dtype=x.dtype, device=x.device)
    if fill == "constant":
        return torch.full((), value, dtype=x.dtype, device=x.device)
    if fill == "baseline":
        return baseline.to(x.dtype)
    if fill == "mean":                                               # per sample, per channel
        return x.mean(dim=spatial, keepdim=True) if spatial else x
    # "uniform": i.i.d. U[min, max] with per-sample, per-channel min and max of x over S
    if x.numel() == 0:                                               # no positions: min / max undefined
        return torch.zeros((), dtype=x.dtype, device=x.device)
    lo = x.amin(dim=spatial, keepdim=True) if spatial else x
    hi = x.amax(dim=spatial, keepdim=True) if spatial else x
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=stats_dtype(x.dtype))
    return (lo + (hi - lo) * u).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# decorrelation

CORR_VAR_FLOOR = 1e-12


def decorrelation_from_cov(cov: torch.Tensor, kind: str) -> torch.Tensor:
    diag = cov.diagonal(dim1=-2, dim2=-1)                            # (G, d)
    if kind == "decov":
        # 0.5 (||cov||_F^2 - ||diag cov||^2) summed as the off-diagonal squares (no cancellation)
        off = cov - torch.diag_embed(diag)
        per_group = 0.5 * off.square().sum((-2, -1))
    else:
        d = cov.shape[-1]
        std = diag.clamp_min(CORR_VAR_FLOOR).sqrt()
        corr = cov / (std.unsqueeze(-1) * std.unsqueeze(-2))
        per_group = (corr - eye_like(corr)).square().sum((-2, -1)) / (d * (d - 1))
    return per_group.mean()
