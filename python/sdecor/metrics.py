"""Saliency quality metrics, batched on the tensors' device.

A saliency map here is nonnegative and has one value per position: shape (N, *S). Gradients
(N, C, *S) become maps with :func:`saliency_map` (|g| averaged over channels, the scores
:func:`sdecor.topk_mask` ranks with ``reduce="mean"``). Every metric returns one value per sample,
shape (N,), except the curves and :func:`accuracy_under_masking`, which return one value per level.

* :func:`gini`: Gini index of the map's magnitudes (Hurley & Rickard's form, the sparsity measure
  Hoyer's comparison favours): 0 for a uniform map, (n-1)/n for a single nonzero position.
* :func:`entropy`: Shannon entropy of the map normalised to sum 1 (nats, or divided by log n).
* :func:`mask_mass_share`: the share of the map's mass inside a ground-truth object mask.
* :func:`deletion_auc` / :func:`insertion_auc` (RISE): the probability of the true class as the
  most salient positions are removed first (replaced by a baseline, default 0), or inserted first
  into a baseline image (default a blurred copy); area under the curve over the fraction of
  positions, by the trapezoid rule. Lower deletion and higher insertion AUC mean the map ranks the
  evidence the model uses first.
* :func:`accuracy_under_masking`: accuracy as the most salient fraction of positions is masked
  (``topk_mask`` fills).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from . import _checks
from .masking import progressive_masks

__all__ = [
    "saliency_map",
    "gini",
    "entropy",
    "mask_mass_share",
    "trapezoid_auc",
    "default_fractions",
    "blur",
    "MaskingCurve",
    "masking_curve",
    "deletion_auc",
    "insertion_auc",
    "accuracy_under_masking",
]


# ---------------------------------------------------------------------------------------------------
# checks


def _check_map(saliency, name: str = "saliency") -> torch.Tensor:
    if not isinstance(saliency, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(saliency).__name__}")
    if saliency.dim() < 2:
        raise ValueError(f"{name} must have shape (N, *S) with at least one position dim; "
                         f"got shape {tuple(saliency.shape)}")
    if not saliency.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {saliency.dtype}")
    return saliency


def _flat(saliency: torch.Tensor) -> torch.Tensor:
    """(N, *S) -> (N, n) magnitudes in float32 (float64 stays float64)."""
    dtype = torch.float64 if saliency.dtype == torch.float64 else torch.float32
    # the row length spelled out: reshape(N, -1) cannot infer it when N = 0
    return saliency.reshape(saliency.shape[0], math.prod(saliency.shape[1:])).abs().to(dtype)


def _positions(c: torch.Tensor, name: str = "saliency") -> int:
    """n, the positions per sample; a map without positions has no distribution to measure."""
    if c.shape[1] == 0:
        raise ValueError(f"{name} must have at least one position per sample; got a map with 0 positions")
    return c.shape[1]


# ---------------------------------------------------------------------------------------------------
# map statistics


def saliency_map(saliency: torch.Tensor, reduce: Optional[str] = "mean") -> torch.Tensor:
    """|saliency| averaged over the channel dim: (N, C, *S) -> (N, *S); reduce=None keeps the shape."""
    _check_map(saliency)
    if reduce not in ("mean", None):
        raise ValueError(f"reduce must be 'mean' or None; got {reduce!r}")
    s = saliency.abs()
    return s.mean(dim=1) if reduce == "mean" else s


def gini(saliency: torch.Tensor) -> torch.Tensor:
    """Gini index of each sample's flattened map magnitudes c (N,).

    With c sorted ascending, c_(1) <= ... <= c_(n):
    G = 1 - 2 * sum_k (c_(k) / ||c||_1) * (n - k + 1/2) / n.
    0 for a constant map, (n-1)/n when one position holds all the mass; an all-zero map gives 0.
    """
    c = _flat(_check_map(saliency))
    n = _positions(c)
    c, _ = torch.sort(c, dim=1)
    total = c.sum(dim=1, keepdim=True)
    k = torch.arange(1, n + 1, device=c.device, dtype=c.dtype)
    weights = (n - k + 0.5) / n
    share = torch.where(total > 0, c / total.clamp_min(torch.finfo(c.dtype).tiny),
                        torch.full_like(c, 1.0 / n))
    return 1.0 - 2.0 * (share * weights).sum(dim=1)


def entropy(saliency: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """Shannon entropy (nats) of each sample's map normalised to sum 1 (N,); 0 log 0 = 0.

    normalized=True divides by log n (n positions), so a uniform map gives 1 and a single nonzero
    position 0. An all-zero map counts as uniform.
    """
    c = _flat(_check_map(saliency))
    n = _positions(c)
    total = c.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, c / total.clamp_min(torch.finfo(c.dtype).tiny), torch.full_like(c, 1.0 / n))
    h = -(torch.special.xlogy(p, p)).sum(dim=1)
    if normalized:
        h = h / math.log(n) if n > 1 else torch.zeros_like(h)
    return h


def mask_mass_share(saliency: torch.Tensor, object_mask: torch.Tensor) -> torch.Tensor:
    """Share of each map's mass inside the object mask: sum(c * m) / sum(c) (N,), NaN for a zero map.

    object_mask: bool (or 0/1) tensor shaped like the map (N, *S).
    """
    c = _flat(_check_map(saliency))
    if not isinstance(object_mask, torch.Tensor):
        raise TypeError(f"object_mask must be a torch.Tensor; got {type(object_mask).__name__}")
    if object_mask.shape != saliency.shape:
        raise ValueError(f"object_mask must have the map's shape {tuple(saliency.shape)}; "
                         f"got {tuple(object_mask.shape)}")
    if object_mask.device != saliency.device:
        raise ValueError(f"object_mask must be on the map's device {saliency.device}; got {object_mask.device}")
    m = object_mask.reshape(c.shape).to(c.dtype)
    return (c * m).sum(dim=1) / c.sum(dim=1)


# ---------------------------------------------------------------------------------------------------
# curves


def trapezoid_auc(curve: torch.Tensor, fractions) -> torch.Tensor:
    """Area under curve(...,F) over fractions (F,) by the trapezoid rule, divided by the fraction span.

    With fractions from 0 to 1 (the usual case) this is the plain area.
    """
    if not isinstance(curve, torch.Tensor):
        raise TypeError(f"curve must be a torch.Tensor; got {type(curve).__name__}")
    f = torch.as_tensor(fractions, dtype=curve.dtype, device=curve.device)
    if f.dim() != 1 or f.numel() < 2 or curve.shape[-1] != f.numel():
        raise ValueError(f"fractions must be 1-D with at least 2 values, one per point of curve's last dim "
                         f"({curve.shape[-1] if curve.dim() else 0}); got {tuple(f.shape)}")
    if not bool(torch.isfinite(f).all()):
        raise ValueError(f"fractions must be finite numbers; got {f.tolist()}")
    span = f[-1] - f[0]
    if float(span) == 0.0:
        # a repeated fraction adds a zero-width trapezoid (no area), but a curve whose fractions are
        # all equal has no span to divide by: the normalised area would be 0 / 0
        raise ValueError(f"fractions must span a nonzero range (first != last); got {f.tolist()}")
    return torch.trapezoid(curve, f, dim=-1) / span


def default_fractions(steps: int = 10) -> list:
    """steps + 1 evenly spaced fractions 0, 1/steps, ..., 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    return [i / steps for i in range(steps + 1)]


def blur(x: torch.Tensor, sigma: Optional[float] = None) -> torch.Tensor:
    """Gaussian blur of images (N, C, H, W) per channel (reflect padding); sigma default max(H, W)/8.

    An axis of size 1 is left as it is (the reflection of one pixel is constant, and a normalised
    kernel maps a constant to itself); empty images come back as an empty copy.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"blur needs images (N, C, H, W); got {getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (images to blur); got dtype {x.dtype}")
    H, W = x.shape[-2:]
    if sigma is not None and (not _checks.is_number(sigma) or not math.isfinite(sigma) or sigma <= 0):
        raise ValueError(f"sigma must be a positive finite number (or None); got {sigma!r}")
    if x.numel() == 0:
        return x.clone()
    sigma = max(H, W) / 8.0 if sigma is None else float(sigma)
    # one radius for both axes, at most (size - 1) of the smaller axis that is blurred (reflect
    # padding needs pad < size); axes of size 1 are not blurred
    sizes = [n for n in (H, W) if n > 1]
    if not sizes:
        return x.clone()
    radius = max(1, min(int(math.ceil(2.5 * sigma)), min(sizes) - 1))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    out = x
    if W > 1:
        out = F.pad(out, (radius, radius, 0, 0), mode="reflect")
        out = F.conv2d(out, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    if H > 1:
        out = F.pad(out, (0, 0, radius, radius), mode="reflect")
        out = F.conv2d(out, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    return out


class MaskingCurve(NamedTuple):
    """Per sample and level (N, F): probability of the true class and whether the argmax is right."""

    prob: torch.Tensor
    correct: torch.Tensor


def _check_curve_args(model, x, y, saliency, fractions):
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module); got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        raise ValueError(f"x must be a tensor (N, C, *S); got {getattr(x, 'shape', type(x).__name__)}")
    _checks.check_labels(y, x)
    _check_map(saliency)
    if saliency.shape != (x.shape[0],) + tuple(x.shape[2:]) and saliency.shape != x.shape:
        raise ValueError(f"saliency must be a map (N, *S) = {(x.shape[0],) + tuple(x.shape[2:])} or shaped "
                         f"like x {tuple(x.shape)}; got {tuple(saliency.shape)}")
    fr = list(fractions)
    if len(fr) < 1 or any(not (isinstance(f, (int, float)) and 0.0 <= f <= 1.0) for f in fr):
        raise ValueError(f"fractions must be numbers in [0, 1]; got {fr!r}")
    return fr


def _as_scores(x: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
    """A map (N, *S) broadcast over x's channels (its channel mean is the map itself)."""
    return saliency if saliency.shape == x.shape else saliency.unsqueeze(1).expand_as(x)


def _forward_levels(model, images: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logits (L, N, K) of the model on a stack of image levels (L, N, C, *S); y checked against K."""
    L, N = images.shape[:2]
    logits = model(images.reshape((L * N,) + tuple(images.shape[2:])))
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != L * N:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return logits of shape (batch, num_classes); got {got}")
    _checks.check_label_range(y, logits.shape[1])
    return logits.reshape(L, N, -1)


@torch.no_grad()
def masking_curve(model, x: torch.Tensor, y: torch.Tensor, saliency: torch.Tensor, fractions=None, *,
                  mode: str = "deletion", baseline: Optional[torch.Tensor] = None) -> MaskingCurve:
    """RISE curves: the model's true-class probability as positions are deleted or inserted.

    mode="deletion": at fraction f the f most salient positions of x are replaced by ``baseline``
    (default zeros). mode="insertion": the image starts as ``baseline`` (default :func:`blur` of x)
    and the f most salient positions take x's values. Positions are ranked once per sample
    (:func:`sdecor.masking.progressive_masks`; every channel of a position moves together). The
    model runs in its current mode (call ``model.eval()`` first).
    """
    fractions = _check_curve_args(model, x, y, saliency, default_fractions(10) if fractions is None else fractions)
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion'; got {mode!r}")
    if baseline is None:
        baseline = torch.zeros_like(x) if mode == "deletion" else blur(x)
    elif not isinstance(baseline, torch.Tensor) or baseline.shape != x.shape:
        raise ValueError(f"baseline must be a tensor shaped like x {tuple(x.shape)}; "
                         f"got {getattr(baseline, 'shape', type(baseline).__name__)}")
    scores = _as_scores(x, saliency)
    if mode == "deletion":          # x with its most salient positions replaced by the baseline
        levels = progressive_masks(x, scores, fractions, largest=True, fill="baseline", baseline=baseline)
    else:                           # the baseline with x's most salient positions put back
        levels = progressive_masks(baseline, scores, fractions, largest=True, fill="baseline", baseline=x)
    logits = _forward_levels(model, levels.x_masked, y)                  # (F, N, K)
    Fn, N = logits.shape[:2]
    prob = logits.softmax(-1).gather(2, y.long().view(1, N, 1).expand(Fn, N, 1)).squeeze(2)
    correct = logits.argmax(-1) == y.view(1, N)
    return MaskingCurve(prob.t(), correct.t())


def deletion_auc(model, x: torch.Tensor, y: torch.Tensor, saliency: torch.Tensor, fractions=None, *,
                 baseline: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Area under the deletion curve (N,), fractions default 0, 0.1, ..., 1 (lower is better)."""
    fractions = default_fractions(10) if fractions is None else list(fractions)
    curve = masking_curve(model, x, y, saliency, fractions, mode="deletion", baseline=baseline)
    return trapezoid_auc(curve.prob, fractions)


def insertion_auc(model, x: torch.Tensor, y: torch.Tensor, saliency: torch.Tensor, fractions=None, *,
                  baseline: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Area under the insertion curve (N,), fractions default 0, 0.1, ..., 1 (higher is better)."""
    fractions = default_fractions(10) if fractions is None else list(fractions)
    curve = masking_curve(model, x, y, saliency, fractions, mode="insertion", baseline=baseline)
    return trapezoid_auc(curve.prob, fractions)


@torch.no_grad()
def accuracy_under_masking(model, x: torch.Tensor, y: torch.Tensor, saliency: torch.Tensor,
                           fractions: Sequence[float], *, fill: str = "zero", value: float = 0.0,
                           generator: Optional[torch.Generator] = None,
                           reduction: str = "mean") -> torch.Tensor:
    """Accuracy (F,) when the most salient fraction f of positions is masked, for every f.

    Masked positions get ``topk_mask``'s fills: "zero", "constant" (value), "mean" (per-sample,
    per-channel mean) or "uniform" (U[min, max] per sample and channel, from ``generator``).
    reduction="sum" returns the count of correct samples per level instead.
    """
    fractions = _check_curve_args(model, x, y, saliency, fractions)
    if fill not in ("zero", "constant", "mean", "uniform"):
        raise ValueError(f"fill must be one of ('zero', 'constant', 'mean', 'uniform'); got {fill!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    levels = progressive_masks(x, _as_scores(x, saliency), fractions, largest=True, fill=fill, value=value,
                               generator=generator)
    logits = _forward_levels(model, levels.x_masked, y)                  # (F, N, K)
    N = x.shape[0]
    correct = (logits.argmax(-1) == y.view(1, N)).sum(1)
    return correct.to(torch.float32) / N if reduction == "mean" else correct
