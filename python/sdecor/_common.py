"""Helpers shared by the reference and the backends, each written once.

Layout: the statistics dtype, the (N, G, d, L) group view, the output memory format. Precision under
autocast: :func:`no_autocast` and :func:`no_autocast_function`. ZCA: the
whitening matrix from an eigendecomposition and its stable backward (DESIGN.md), as an autograd
Function that takes the eigensolver (torch.linalg.eigh, or sdecor's Jacobi solver on the native
backend). Top-k masking: the per-sample scores and the fill values, shared so that the torch backend
is bit-identical to the reference.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "AUTOCAST_DEVICES",
    "CORR_VAR_FLOOR",
    "ZCAWhitening",
    "decorrelation_from_cov",
    "eye_like",
    "fill_values",
    "grouped",
    "like_format",
    "mask_scores",
    "no_autocast",
    "no_autocast_function",
    "rank_order",
    "samples_per_channel",
    "shifted_cov",
    "stats_dtype",
    "sym",
    "zca_backward",
    "zca_from_eigh",
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
# precision under autocast

# The device types whose autocast sdecor turns off (torch.autocast's "cpu" and "cuda").
AUTOCAST_DEVICES = ("cpu", "cuda")


def no_autocast(fn):
    """Decorator: ``fn`` runs with autocast off on cpu and cuda, its inputs as given.

    DESIGN.md, "Precision": under autocast the statistics and the d x d math stay in fp32 (fp64 for
    fp64 input) and the output has the input's dtype, as BatchNorm's does (x fp32 under bf16 autocast
    -> y fp32; x bf16 -> y bf16). Autocast would instead run the covariance and whitening matmuls in
    bf16 (reference group_whiten on fp32 input (8, 32, 6, 6), d=16: max error 3e-2 instead of 2e-6)
    and mix dtypes in the hand-written backward passes. The public functions, the
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


@no_autocast_function
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
