"""Top-k masking pieces shared by the reference, the torch backend and the saliency modules.

The per-sample scores (:func:`mask_scores`: |saliency| or saliency, the channel mean pinned to one
rounding), the selection order (:func:`rank_order`: by value, ties by lower flat index, NaN as the
largest value) and the values that replace the selected positions (:func:`fill_values`), written once
so that the torch backend is bit-identical to the reference.
"""

from __future__ import annotations

import math

import torch

from ._precision import stats_dtype

__all__ = ["fill_values", "mask_scores", "rank_order"]


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
