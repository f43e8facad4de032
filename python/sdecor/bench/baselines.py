"""Baselines the benchmark measures sdecor against (besides the reference and torch.compile of it).

* :func:`iternorm`: IterNorm (Huang et al., CVPR 2019, Algorithm 1) as a user writes it, from
  ``benchmarks/iternorm_naive.py``; half-precision inputs get float32 statistics, as in sdecor.
* :func:`sgt_mask`: the masking step of Saliency Guided Training (Ismail et al., NeurIPS 2021): per
  sample, torch.topk of the k lowest saliencies, scatter into a mask, torch.where with the fill.
* ``torch.nn.BatchNorm*d`` and ``torch.linalg.eigh`` are used as they are.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch


class Unavailable(RuntimeError):
    """A baseline cannot run here (reported as skipped, with this message)."""


def source_tree_module(name: str):
    """Import ``benchmarks/<name>.py`` of the source tree (benchmarks/ is not installed)."""
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ImportError:
        pass
    path = Path(__file__).resolve().parents[3] / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise Unavailable(f"benchmarks/{name}.py not found: run from a source checkout of sdecor")
    spec = importlib.util.spec_from_file_location(f"_sdecor_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def iternorm(x: torch.Tensor, num_channels: int, T: int, eps: float, weight=None, bias=None) -> torch.Tensor:
    """IterNorm's training forward (benchmarks/iternorm_naive.py), statistics in float32 as in sdecor."""
    fn = source_tree_module("iternorm_naive").iternorm_train
    if x.dtype in (torch.float16, torch.bfloat16):
        return fn(x.float(), num_channels, T, eps, weight, bias).to(x.dtype)
    return fn(x, num_channels, T, eps, weight, bias)


SGT_FILLS = ("zero", "constant", "mean", "uniform")


def sgt_mask(x: torch.Tensor, saliency: torch.Tensor, k: int, reduce="mean", fill: str = "zero",
             value: float = 0.0, generator=None):
    """Replace each sample's k least salient features the way Saliency Guided Training does:
    per sample, torch.topk of the lowest scores, scatter into a mask, torch.where with the fill.

    Scores are |saliency| (averaged over channels for ``reduce="mean"``). ``fill="uniform"`` draws
    from U[min, max] of the whole sample, as SGT does. torch.topk breaks ties in no defined order,
    so on tied scores the mask may differ from topk_mask's (lower index first). Returns
    (x_masked, mask) like ``topk_mask``.
    """
    if fill not in SGT_FILLS:
        raise ValueError(f"fill must be one of {SGT_FILLS} for the SGT baseline; got {fill!r}")
    N, C = x.shape[:2]
    score = saliency.abs()
    if reduce == "mean":
        score = score.mean(1)
    out = torch.empty_like(x)
    mask = torch.zeros(score.shape, dtype=torch.bool, device=x.device)
    for i in range(N):                      # SGT's loop over the samples of the batch
        flat = score[i].reshape(-1)
        idx = torch.topk(flat, k, largest=False).indices
        mask[i] = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, True).view(score[i].shape)
        where = mask[i].unsqueeze(0) if reduce == "mean" else mask[i]
        xi = x[i]
        if fill == "uniform":
            lo, hi = xi.min(), xi.max()
            values = lo + (hi - lo) * torch.rand(xi.shape, generator=generator, device=x.device)
        elif fill == "mean":
            values = xi.reshape(C, -1).mean(1).view((C,) + (1,) * (xi.dim() - 1))
        else:
            values = torch.tensor(value if fill == "constant" else 0.0, device=x.device)
        out[i] = torch.where(where, values.to(x.dtype), xi)
    return out, mask
