"""The ``torch`` backend of topk_mask: the reference's semantics with a faster selection.

Scores are mapped to order-preserving int32 keys (ties are equal keys); one ``torch.kthvalue`` per row
finds the k-th key, replacing the reference's two stable sorts, and an int32 prefix count takes the
tied keys in index order. The mask and every output, uniform noise included, are bit-identical to
:func:`sdecor.reference.topk_mask` (float64 scores go through the reference's ranking itself).
"""

from __future__ import annotations

import torch

from .._masking_math import fill_values, mask_scores, rank_order

__all__ = ["FAST_TORCH_DTYPES", "order_keys", "select_mask", "topk_mask_torch", "value_keys"]

# score dtypes ranked through int32 keys (float32 bits); others through the reference's sorts
FAST_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def value_keys(score: torch.Tensor, largest: bool) -> torch.Tensor:
    """int32 keys of float scores whose ascending order is the selection order of the values.

    The float32 bits made order-preserving as a signed int32 (negatives: non-sign bits flipped),
    -0.0 equal to +0.0 (adding +0.0 turns -0.0 into +0.0), every NaN above +inf; bitwise-inverted
    for largest=True (an order reversal without overflow). Equal keys are ties.
    """
    s = score.to(torch.float32) + 0.0                                # -0.0 -> +0.0
    bits = s.view(torch.int32)
    keys = bits >> 31                                                # -1 for negatives, else 0
    keys &= 0x7FFFFFFF
    keys ^= bits
    keys.masked_fill_(torch.isnan(s), 2**31 - 1)                     # above +inf
    return keys.bitwise_not_() if largest else keys


def order_keys(score: torch.Tensor, largest: bool) -> torch.Tensor:
    """int64 keys (N, D), distinct per row, whose ascending order is the full selection order:
    (value key << 32) | flat index, so that ties go to the lower flat index."""
    index = torch.arange(score.shape[1], device=score.device, dtype=torch.int64)
    return (value_keys(score, largest).to(torch.int64) << 32) | index


def select_mask(score: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Bool (N, D): the k first positions of every row in selection order (reference.rank_order).

    The k-th value key per row by torch.kthvalue; then every key below it and, among the keys equal
    to it, the first (k - count below) in index order.
    """
    N, D = score.shape
    if k == 0 or D == 0:
        return torch.zeros((N, D), dtype=torch.bool, device=score.device)
    if score.dtype not in FAST_TORCH_DTYPES:
        mask = torch.zeros((N, D), dtype=torch.bool, device=score.device)
        return mask.scatter_(1, rank_order(score, largest)[:, :k], True)
    keys = value_keys(score, largest)
    kth = torch.kthvalue(keys, k, dim=1, keepdim=True).values
    below = keys < kth
    tied = keys == kth
    room = k - below.sum(1, keepdim=True, dtype=torch.int32)         # how many tied ones to take
    # int32 counts: half the memory traffic of the default int64 (D < 2**31)
    return below | (tied & (tied.cumsum(1, dtype=torch.int32) <= room))


def topk_mask_torch(x, saliency, k, largest, reduce, abs, fill, value, baseline, generator):
    """(x_masked, mask) of :func:`sdecor.ops.topk.topk_mask` for a resolved k (arguments checked by
    the caller)."""
    score = mask_scores(saliency, reduce, abs)                   # (N, D), as the reference
    mask = select_mask(score, k, largest)
    mask = mask.reshape((x.shape[0],) + tuple(x.shape[2:]) if reduce == "mean" else x.shape)
    where = mask.unsqueeze(1) if reduce == "mean" else mask
    x_masked = torch.where(where, fill_values(x, fill, value, baseline, generator), x)
    return x_masked, mask
