"""Masking built on :func:`sdecor.topk_mask` (:mod:`sdecor.ops.topk`): the ``SaliencyMasker`` module,
``saliency`` (|d logit_y / d x| in one backward) and ``progressive_masks`` (every level of a deletion /
insertion curve from one ranking).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import nn

from . import _checks
from ._masking_math import fill_values, mask_scores, rank_order
from .ops.topk import topk_mask
from .ops.topk_torch import FAST_TORCH_DTYPES, order_keys

__all__ = ["ProgressiveMasks", "SaliencyMasker", "progressive_masks", "saliency", "topk_mask"]


# ---------------------------------------------------------------------------------------------------
# module form


class SaliencyMasker(nn.Module):
    """:func:`topk_mask` as a module: ``forward(x, saliency, baseline=None) -> (x_masked, mask)``.

    Holds the masking options (ratio or k, largest, reduce, abs, fill, value, generator), each
    checked here (largest and abs are bools); no parameters or buffers. ``baseline`` is given per
    call for fill="baseline".
    """

    def __init__(self, ratio=None, k=None, *, largest: bool = False, reduce="mean", abs: bool = True,
                 fill: str = "zero", value: float = 0.0, generator=None):
        super().__init__()
        _checks.resolve_k(None, ratio, k)
        _checks.check_mask_options(reduce, fill, value, largest=largest, abs_=abs, value_always=True)
        _checks.check_generator(generator)
        self.ratio, self.k, self.largest, self.reduce = ratio, k, largest, reduce
        self.abs, self.fill, self.value, self.generator = abs, fill, value, generator

    def forward(self, x: torch.Tensor, saliency: torch.Tensor, baseline=None):
        return topk_mask(x, saliency, ratio=self.ratio, k=self.k, largest=self.largest,
                         reduce=self.reduce, abs=self.abs, fill=self.fill, value=self.value,
                         baseline=baseline, generator=self.generator)

    def extra_repr(self) -> str:
        amount = f"ratio={self.ratio}" if self.ratio is not None else f"k={self.k}"
        return (f"{amount}, largest={self.largest}, reduce={self.reduce!r}, abs={self.abs}, "
                f"fill={self.fill!r}" + (f", value={self.value}" if self.fill == "constant" else ""))


# ---------------------------------------------------------------------------------------------------
# saliency


def saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|d logit_y / d x| for a whole batch with one backward pass, shaped like x.

    The model runs in eval mode during the pass (so samples do not interact through batch
    statistics, and the per-sample logits can be summed into one backward); afterwards every
    module's training flag is what it was. Only x's gradient is computed: parameters' ``.grad``
    are left untouched. The result is detached. Works under ``torch.no_grad()`` too.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    _checks.check_input(x, "x", min_dim=2, max_dim=5)
    _checks.check_labels(y, x)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            logits = model(xi)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"model(x) must return logits of shape (N, num_classes); got {got}")
            _checks.check_label_range(y, logits.shape[1])
            picked = logits.gather(1, y.long()[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, xi)
    finally:
        for m, mode in modes:
            m.training = mode
    return grad.abs()


# ---------------------------------------------------------------------------------------------------
# progressive masking


class ProgressiveMasks(NamedTuple):
    """x_masked (L, N, C, *S) and mask (L, N, *S) or (L, *x.shape), one level per ratio."""
    x_masked: torch.Tensor
    mask: torch.Tensor


def progressive_masks(x: torch.Tensor, saliency: torch.Tensor, ratios: Sequence[float], *,
                      largest: bool = True, reduce="mean", abs: bool = True, fill: str = "zero",
                      value: float = 0.0, baseline=None, generator=None) -> ProgressiveMasks:
    """Every masking level of a deletion / insertion curve from one ranking of the scores.

    ``ratios``: non-decreasing numbers in [0, 1]. Level i masks the k_i = floor(ratios[i] * D)
    first positions of each sample in selection order (largest=True, the default: most salient
    first, for deletion curves; largest=False: least salient first), so each level's mask contains
    the previous one. Fill values are computed once and shared by all levels (one draw from
    ``generator`` for "uniform"). Level i equals ``topk_mask(x, saliency, ratio=ratios[i], ...)``
    with the same options and, for "uniform", the same generator state (on the torch backend).
    Returns ``ProgressiveMasks(x_masked, mask)`` stacked along a new first dim of size L.
    """
    _checks.check_mask_args(x, saliency, reduce, fill, value, baseline, largest, abs)
    _checks.check_generator(generator, x.device)
    try:
        ratios = [r for r in ratios]
    except TypeError:
        raise TypeError(f"ratios must be a sequence of numbers; got {type(ratios).__name__}") from None
    if not ratios:
        raise ValueError("ratios must hold at least one ratio; got an empty sequence")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ValueError(f"every ratio must be a number in [0, 1]; got {r!r} in ratios={ratios!r}")
    if any(b < a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f"ratios must be non-decreasing (nested masks); got {ratios!r}")
    score = mask_scores(saliency, reduce, abs)                   # (N, D)
    N, D = score.shape
    if score.dtype in FAST_TORCH_DTYPES:
        order = torch.sort(order_keys(score, largest), dim=1).indices
    else:
        order = rank_order(score, largest)
    rank = torch.empty_like(order)                                   # position -> rank in the order
    rank.scatter_(1, order, torch.arange(D, device=x.device).expand(N, D))
    ks = torch.tensor([math.floor(r * D) for r in ratios], device=x.device)
    mask = rank.unsqueeze(0) < ks.view(-1, 1, 1)                     # (L, N, D)
    mask = mask.reshape((len(ratios), N) + (tuple(x.shape[2:]) if reduce == "mean" else tuple(x.shape[1:])))
    where = mask.unsqueeze(2) if reduce == "mean" else mask
    fill_value = fill_values(x, fill, value, baseline, generator)
    return ProgressiveMasks(torch.where(where, fill_value, x.unsqueeze(0)), mask)
