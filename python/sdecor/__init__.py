"""sdecor: fused kernels for group-wise ZCA whitening, decorrelation and saliency-guided training.

Functions: group_cov, whitening_matrix, group_whiten, topk_mask, decorrelation_loss, saliency,
progressive_masks, convert_whitening, convert_iternorm, fold_whitening (for inference), whitening_report
(per-layer whitening health on a batch). Modules (also in
:mod:`sdecor.nn`): GroupWhitening, SyncGroupWhitening (statistics synchronised over torch.distributed),
SaliencyMasker, SaliencyDecor; SyncBatchNormGloo (:mod:`sdecor.sync_batchnorm`: BatchNorm synchronised
over torch.distributed where torch.nn.SyncBatchNorm does not run, CPU tensors over gloo). Backend control: use_backend, info. Pure-PyTorch references of the functions live in
:mod:`sdecor.reference`, saliency metrics in :mod:`sdecor.metrics`.
"""

from . import nn, reference
from ._backend import BackendUnavailableError, use_backend
from ._info import info
from ._version import __version__
from .convert import ConversionReport, convert_iternorm, convert_whitening
from .fold import FoldReport, fold_whitening
from .health import WhiteningRecord, WhiteningReport, whitening_report
from .masking import ProgressiveMasks, SaliencyMasker, progressive_masks, saliency
from .nn import GroupWhitening, SyncGroupWhitening
from .objective import SaliencyDecor, SaliencyDecorTerms, decorrelation_loss
from .sync_batchnorm import SyncBatchNormGloo
from .ops import group_cov, group_whiten, topk_mask, whitening_matrix

__all__ = [
    "BackendUnavailableError",
    "ConversionReport",
    "FoldReport",
    "GroupWhitening",
    "ProgressiveMasks",
    "SaliencyDecor",
    "SaliencyDecorTerms",
    "SaliencyMasker",
    "SyncBatchNormGloo",
    "SyncGroupWhitening",
    "WhiteningRecord",
    "WhiteningReport",
    "convert_iternorm",
    "convert_whitening",
    "decorrelation_loss",
    "fold_whitening",
    "group_cov",
    "group_whiten",
    "info",
    "nn",
    "progressive_masks",
    "reference",
    "saliency",
    "topk_mask",
    "use_backend",
    "whitening_matrix",
    "whitening_report",
]
