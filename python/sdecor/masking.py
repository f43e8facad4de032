"""Top-k saliency masking: public functions dispatching between backends."""

from __future__ import annotations

import torch

from . import _backend
from . import reference as ref

SUPPORTS = {"cuda": ("torch",), "cpu": ("torch",)}


def topk_mask(x: torch.Tensor, saliency: torch.Tensor, *, ratio=None, k=None, largest: bool = False,
              reduce="mean", abs: bool = True, fill: str = "zero", value: float = 0.0, baseline=None,
              generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the k least (largest=True: most) salient positions of every sample; see DESIGN."""
    ref.check_mask_args(x, saliency, reduce, fill, value, baseline)
    _backend.select("topk_mask", (x,), SUPPORTS)
    return ref.topk_mask(x, saliency, ratio=ratio, k=k, largest=largest, reduce=reduce, abs=abs,
                         fill=fill, value=value, baseline=baseline, generator=generator)
