"""Pure-PyTorch reference implementations: the definition of "correct" for every backend.

Each function follows the equations in the design contract line by line; read it next to them.
Notation: x has shape (N, C, *S) with 0 to 3 trailing dims, m = N * prod(S) samples per channel,
d = ``num_channels`` channels per group, G = C / d groups, group g = channels [g*d, (g+1)*d).
With ``last_group="smaller"`` d need not divide C: G = ceil(C / d), and the last group holds the
r = C - (G - 1) d remaining channels and is whitened as a group of its own (IterNorm's flexible
groups); its statistics are padded to the (G, d) / (G, d, d) layout (its block top-left, zeros in
the padding).

These functions run anywhere (CPU or GPU, float32 or float64; float16/bfloat16 inputs are computed
in float32, also under torch.autocast, which they turn off: outputs keep the dtypes they have without
it). They are the oracle of the tests and benchmarks, and what the ``torch`` backend runs for
group_cov and whitening_matrix: the backends call the same equations without the argument checks,
which they ran once themselves (:func:`group_cov_unchecked`, :func:`whitening_matrix_unchecked`,
:func:`group_whitening_matrix`). zca uses torch.linalg.eigh; a backend that picks another
eigensolver composes the ZCA math of :mod:`sdecor._zca` itself.

Argument checks come from :mod:`sdecor._checks`; the pieces the backends share with the reference
from the helper modules: group layout (:mod:`sdecor._layout`), the precision policy
(:mod:`sdecor._precision`), ZCA from eigh and its stable backward (:mod:`sdecor._zca`), top-k scores
and fills (:mod:`sdecor._masking_math`) and the decorrelation penalty (:mod:`sdecor._decorrelation`).
"""

from __future__ import annotations

import torch

from . import _checks as checks
from ._checks import DECOR_KINDS, FILLS, MAX_NEWTON_STEPS, METHODS
from ._decorrelation import decorrelation
from ._layout import group_layout, grouped, join_groups, like_format, samples_per_channel, split_channels, split_groups
from ._masking_math import fill_values, mask_scores, rank_order
from ._precision import no_autocast, stats_dtype
from ._zca import ZCAWhitening, eye_like, shifted_cov

__all__ = [
    "group_cov",
    "whitening_matrix",
    "newton_schulz",
    "group_whiten",
    "apply_whitening",
    "topk_mask",
    "decorrelation_loss",
    "FILLS",
    "METHODS",
    "DECOR_KINDS",
    "MAX_NEWTON_STEPS",
]


# ---------------------------------------------------------------------------------------------------
# group-wise covariance


@no_autocast
def group_cov(x: torch.Tensor, num_channels: int, last_group: str = "even") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (G, d) and biased covariance (G, d, d) = Xc Xc^T / m of every channel group.

    Accumulates in float32 (float64 for float64 input); the outputs have that dtype.
    last_group="smaller": the last group of r < d channels in the top-left (r,) / (r, r) block of
    its entry, zeros in the padding.
    """
    checks.check_input(x)
    checks.check_groups(num_channels, x.shape[1], last_group)
    checks.check_training_samples(x)
    return group_cov_unchecked(x, num_channels)


def group_cov_unchecked(x: torch.Tensor, num_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`group_cov` of checked arguments (a smaller last group whenever d does not divide C)."""
    x_even, x_last, r = split_channels(x, num_channels)
    if r == num_channels:
        return _even_group_cov(x, num_channels)
    # a smaller last group: the full groups, then the last group's r channels as a group of their own
    mean, cov = _even_group_cov(x_even, num_channels)
    mean_r, cov_r = _even_group_cov(x_last, r)
    return join_groups(mean, mean_r, num_channels), join_groups(cov, cov_r, num_channels)


def _even_group_cov(x, num_channels):
    m = samples_per_channel(x)
    xg = grouped(x, num_channels).to(stats_dtype(x.dtype))       # (N, G, d, L)
    mean = xg.mean(dim=(0, 3))                                    # (G, d)
    xc = xg - mean[None, :, :, None]                              # X - mean
    cov = torch.matmul(xc, xc.transpose(-1, -2)).sum(0) / m       # Xc Xc^T / m: (G, d, d)
    return mean, cov


# ---------------------------------------------------------------------------------------------------
# whitening matrices


@no_autocast
def newton_schulz(se: torch.Tensor, T: int) -> torch.Tensor:
    """IterNorm's W = P_T / sqrt(tr Se), P_{k+1} = 1.5 P_k - 0.5 P_k^3 Sn, Sn = Se / tr(Se), P_0 = I.

    Computed as the coupled iteration Y_0 = Sn, Z_0 = I, M = (3I - Z_k Y_k) / 2, Y_{k+1} = Y_k M,
    Z_{k+1} = M Z_k, for which Z_k = P_k and Y_k = P_k Sn in exact arithmetic. The uncoupled form
    loses the commutation of P_k and Sn to rounding and diverges after ~25 steps; this one does not.
    Differentiable by autograd (the exact derivative of the recurrence).
    """
    trace = se.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]   # tr(Se)
    eye = eye_like(se)
    y = se / trace                                                   # Y_0 = Sn
    z = eye.expand_as(se)                                            # Z_0 = I
    for _ in range(T):
        m = 0.5 * (3.0 * eye - z @ y)
        y = y @ m
        z = m @ z
    return z / trace.sqrt()


@no_autocast
def whitening_matrix(cov: torch.Tensor, method: str = "newton", eps: float = 1e-5, T: int = 5) -> torch.Tensor:
    """Whitening matrices W (..., d, d) of Se = cov + eps I.

    "zca": W = Se^-1/2 exactly: Se = U diag(l) U^T, W = U diag(l^-1/2) U^T (eigenvalues clamped at
    eps), with the stable backward dL/dSe = U (F o (U^T sym(G) U)) U^T (see :mod:`sdecor._zca`).
    "newton": IterNorm's T Newton-Schulz steps (see :func:`newton_schulz`).
    """
    checks.check_cov(cov)
    checks.check_whitening_args(method, eps, T)
    return whitening_matrix_unchecked(cov, method, eps, T)


def whitening_matrix_unchecked(cov: torch.Tensor, method: str, eps: float, T: int) -> torch.Tensor:
    """:func:`whitening_matrix` of checked arguments."""
    se = shifted_cov(cov, eps)
    if method == "zca":
        return ZCAWhitening.apply(se, float(eps), torch.linalg.eigh)
    return newton_schulz(se, T)


def group_whitening_matrix(cov: torch.Tensor, C: int, method: str, eps: float, T: int) -> torch.Tensor:
    """W (G, d, d) of the groups of C channels from their covariances (G, d, d) (padded layout): with
    a smaller last group, its W is that of its own r x r block (cov + eps I_r), zeros in the padding."""
    d = cov.shape[-1]
    r = group_layout(C, d)[1]
    if r == d:
        return whitening_matrix_unchecked(cov, method, eps, T)
    cov_even, cov_last = split_groups(cov, r)
    return join_groups(whitening_matrix_unchecked(cov_even, method, eps, T),
                       whitening_matrix_unchecked(cov_last, method, eps, T), d)


# ---------------------------------------------------------------------------------------------------
# group whitening


@no_autocast
def group_whiten(x: torch.Tensor, num_channels: int, method: str = "newton", eps: float = 1e-5,
                 T: int = 5, last_group: str = "even") -> torch.Tensor:
    """y_g = W_g (x_g - mean_g) with batch statistics; same shape, dtype and memory format as x.

    Gradients flow through the mean, the covariance and W. last_group="smaller": a last group of
    r < d channels is whitened on its own (its mean, its r x r covariance, Se = cov + eps I_r).
    """
    checks.check_input(x)
    checks.check_groups(num_channels, x.shape[1], last_group)
    checks.check_whitening_args(method, eps, T)
    checks.check_training_samples(x)
    mean, cov = group_cov_unchecked(x, num_channels)
    w = group_whitening_matrix(cov, x.shape[1], method, eps, T)      # (G, d, d)
    return apply_whitening(x, mean, w)


@no_autocast
def apply_whitening(x: torch.Tensor, mean: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y_g = W_g (x_g - mean_g) for given statistics mean (G, d) and W (G, d, d); a smaller last
    group (C < G d) uses the top-left block of its entries."""
    G, d = mean.shape
    x_even, x_last, r = split_channels(x, d)
    if r == d:
        xg = grouped(x, d).to(mean.dtype)                             # (N, G, d, L)
        y = torch.matmul(w, xg - mean[None, :, :, None])              # (N, G, d, L)
        return like_format(y.reshape(x.shape).to(x.dtype), x)
    (mean_even, mean_last), (w_even, w_last) = split_groups(mean, r), split_groups(w, r)
    y = torch.cat([apply_whitening(x_even, mean_even, w_even), apply_whitening(x_last, mean_last, w_last)], 1)
    return like_format(y.contiguous(), x)


# ---------------------------------------------------------------------------------------------------
# top-k saliency masking


@no_autocast
def topk_mask(x: torch.Tensor, saliency: torch.Tensor, *, ratio=None, k=None, largest: bool = False,
              reduce="mean", abs: bool = True, fill: str = "zero", value: float = 0.0,
              baseline=None, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the k least (largest=True: most) salient positions of every sample.

    score = |saliency| (abs=False: saliency), averaged over C for reduce="mean"; the selected set is
    the k first positions of each sample in the order of :func:`sdecor._masking_math.rank_order` (by value,
    ties by lower flat index, NaN as the largest value). Returns (x_masked, mask); mask is bool,
    True = replaced, shaped (N, *S) for reduce="mean" (one mask shared by all channels) or like x for
    reduce=None.
    """
    checks.check_mask_args(x, saliency, reduce, fill, value, baseline, largest, abs)
    score = mask_scores(saliency, reduce, abs)                       # (N, D)
    k = checks.resolve_k(score.shape[1], ratio, k)
    order = rank_order(score, largest)
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    mask = mask.reshape((x.shape[0],) + tuple(x.shape[2:]) if reduce == "mean" else x.shape)
    where = mask.unsqueeze(1) if reduce == "mean" else mask
    x_masked = torch.where(where, fill_values(x, fill, value, baseline, generator), x)
    return x_masked, mask


# ---------------------------------------------------------------------------------------------------
# decorrelation loss


@no_autocast
def decorrelation_loss(x: torch.Tensor, num_channels: int, kind: str = "decov",
                       last_group: str = "even") -> torch.Tensor:
    """Mean over groups of a decorrelation penalty on the group covariance.

    "decov": 0.5 (||cov||_F^2 - ||diag cov||^2).
    "corr":  ||R - I||_F^2 / (d (d - 1)), R the correlation matrix (variances floored at 1e-12).
    R does not depend on the scale of x: groups with max |x| >= 2^48 are first divided by a power of
    two (exact), so that "corr" stays finite at any finite scale.
    last_group="smaller": a last group of r < d channels is a group of its own (its penalty over its
    r channels, "corr" with r (r - 1), which needs r >= 2); the mean is over all G groups.
    """
    checks.check_decor_args(num_channels, kind)
    checks.check_input(x)
    checks.check_groups(num_channels, x.shape[1], last_group)
    if kind == "corr":
        checks.check_corr_groups(num_channels, x.shape[1])
    checks.check_training_samples(x)
    return decorrelation(x, num_channels, kind, group_cov_unchecked)
