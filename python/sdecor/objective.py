"""Decorrelation loss (and the SaliencyDecor objective)."""

from __future__ import annotations

import torch

from . import reference as ref
from .whitening import group_cov


def decorrelation_loss(x: torch.Tensor, num_channels: int, kind: str = "decov") -> torch.Tensor:
    """Mean over groups of the decov or corr penalty of the group covariance (uses group_cov)."""
    if kind not in ref.DECOR_KINDS:
        raise ValueError(f"kind must be one of {ref.DECOR_KINDS}; got {kind!r}")
    if kind == "corr" and isinstance(num_channels, int) and num_channels < 2:
        raise ValueError(f"kind='corr' needs groups of at least 2 channels; got num_channels={num_channels}")
    _, cov = group_cov(x, num_channels)
    return ref.decorrelation_from_cov(cov, kind)
