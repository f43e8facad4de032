"""Group-wise covariance and whitening: public functions dispatching between backends."""

from __future__ import annotations

import torch

from . import _backend
from . import reference as ref

# Backends implementing each op, per device type, in order of preference.
SUPPORTS = {"cuda": ("torch",), "cpu": ("torch",)}


def group_cov(x: torch.Tensor, num_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (G, d) and biased covariance (G, d, d) of every group of ``num_channels`` channels."""
    ref.check_input(x)
    ref.check_groups(num_channels, x.shape[1])
    ref.check_training_samples(x)
    _backend.select("group_cov", (x,), SUPPORTS)
    return ref.group_cov(x, num_channels)


def whitening_matrix(cov: torch.Tensor, method: str = "newton", eps: float = 1e-5, T: int = 5) -> torch.Tensor:
    """Whitening matrices of ``cov + eps I`` (..., d, d): exact ZCA or T Newton-Schulz steps."""
    ref.check_cov(cov)
    ref.check_whitening_args(method, eps, T)
    _backend.select("whitening_matrix", (cov,), SUPPORTS)
    return ref.whitening_matrix(cov, method, eps, T)


def group_whiten(x: torch.Tensor, num_channels: int, method: str = "newton", eps: float = 1e-5,
                 T: int = 5) -> torch.Tensor:
    """y_g = W_g (x_g - mean_g) with batch statistics; same shape, dtype and memory format as x."""
    ref.check_input(x)
    ref.check_groups(num_channels, x.shape[1])
    ref.check_whitening_args(method, eps, T)
    ref.check_training_samples(x)
    _backend.select("group_whiten", (x,), SUPPORTS)
    return ref.group_whiten(x, num_channels, method, eps, T)
