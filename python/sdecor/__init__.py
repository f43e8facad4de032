"""sdecor: fused kernels for group-wise ZCA whitening, decorrelation and saliency-guided training.

Public API (see README.md): group_cov, whitening_matrix, group_whiten, topk_mask,
decorrelation_loss, use_backend, info; pure-PyTorch references in :mod:`sdecor.reference`.
"""

from ._backend import BackendUnavailableError, use_backend
from ._info import info
from . import reference
from .masking import topk_mask
from .objective import decorrelation_loss
from .whitening import group_cov, group_whiten, whitening_matrix

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "decorrelation_loss",
    "group_cov",
    "group_whiten",
    "info",
    "topk_mask",
    "use_backend",
    "whitening_matrix",
]
