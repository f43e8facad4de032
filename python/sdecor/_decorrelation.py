"""The decorrelation penalty of group covariances, shared by the reference and decorrelation_loss.

"decov": 0.5 (||cov||_F^2 - ||diag cov||^2) per group; "corr": ||R - I||_F^2 / (d (d - 1)) with R
the correlation matrix (variances floored at :data:`CORR_VAR_FLOOR`), on x first divided per group
by a power of two that keeps its covariance finite (:func:`scale_for_corr`). The covariance comes
from the caller's group_cov (the reference's or the selected backend's); a smaller last group is a
group of its own.
"""

from __future__ import annotations

import torch

from ._layout import grouped, split_channels
from ._precision import power_of_two, stats_dtype
from ._zca import eye_like

__all__ = ["CORR_VAR_FLOOR", "decorrelation", "decorrelation_from_cov", "decorrelation_per_group", "scale_for_corr"]

CORR_VAR_FLOOR = 1e-12

# Below 2^48 a sum of squares of up to 2^30 samples stays within fp32 (it overflows at |x| ~ 1e19).
CORR_MAX_EXP = 48


def scale_for_corr(x: torch.Tensor, num_channels: int) -> torch.Tensor:
    """x with every group divided by a power of two that brings max |x| below 2^48 (1 wherever it
    already is: the identity there), detached. The correlation matrix does not change (exact
    scaling), and its covariance stays finite at any finite scale of x."""
    with torch.no_grad():
        sd = stats_dtype(x.dtype)
        amax = grouped(x.detach(), num_channels).abs().amax(dim=(0, 2, 3)).to(sd)     # (G,)
        e = (torch.frexp(amax).exponent - CORR_MAX_EXP).clamp(0, 1022 if sd == torch.float64 else 126)
        scale = power_of_two(-e, sd).repeat_interleave(num_channels)              # (C,)
    return x * scale.reshape((1, -1) + (1,) * (x.dim() - 2)).to(x.dtype)


def decorrelation_per_group(cov: torch.Tensor, kind: str) -> torch.Tensor:
    """The penalty of every group (G,) from its covariance (G, d, d)."""
    diag = cov.diagonal(dim1=-2, dim2=-1)                            # (G, d)
    if kind == "decov":
        # 0.5 (||cov||_F^2 - ||diag cov||^2) summed as the off-diagonal squares (no cancellation)
        off = cov - torch.diag_embed(diag)
        return 0.5 * off.square().sum((-2, -1))
    d = cov.shape[-1]
    std = diag.clamp_min(CORR_VAR_FLOOR).sqrt()
    corr = cov / (std.unsqueeze(-1) * std.unsqueeze(-2))
    return (corr - eye_like(corr)).square().sum((-2, -1)) / (d * (d - 1))


def decorrelation_from_cov(cov: torch.Tensor, kind: str) -> torch.Tensor:
    return decorrelation_per_group(cov, kind).mean()


def decorrelation(x: torch.Tensor, num_channels: int, kind: str, group_cov) -> torch.Tensor:
    """decorrelation_loss of checked arguments, with the covariance from ``group_cov(x, d)`` (the
    reference's or the selected backend's); "corr" on x scaled by :func:`scale_for_corr`. A smaller
    last group (d does not divide C) is a group of its own: the mean is over all G groups."""
    x_even, x_last, r = split_channels(x, num_channels)
    if r == num_channels:
        parts = [(x, num_channels)]
    else:
        parts = [(x_even, num_channels)] * bool(x_even.shape[1]) + [(x_last, r)]
    per_group = []
    for xp, dp in parts:
        if kind == "corr":                                           # scale-free: keep it finite
            xp = scale_for_corr(xp, dp)
        _, cov = group_cov(xp, dp)
        per_group.append(decorrelation_per_group(cov, kind))
    return torch.cat(per_group).mean()
