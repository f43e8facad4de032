"""Baselines the benchmark measures sdecor against (besides the reference and torch.compile of it).

* :func:`iternorm`: IterNorm (Huang et al., CVPR 2019, Algorithm 1) as a user writes it
  (:func:`iternorm_train`); half-precision inputs get float32 statistics, as in sdecor.
* :func:`sgt_mask`: the masking step of Saliency Guided Training (Ismail et al., NeurIPS 2021): per
  sample, torch.topk of the k lowest saliencies, scatter into a mask, torch.where with the fill.
* ``torch.nn.BatchNorm*d`` and ``torch.linalg.eigh`` are used as they are.
"""

from __future__ import annotations

import torch


class Unavailable(RuntimeError):
    """A baseline cannot run here (reported as skipped, with this message)."""


def iternorm_train(x: torch.Tensor, num_channels: int, T: int = 5, eps: float = 1e-5,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """IterNorm with batch statistics on x (N, C, *S); groups of ``num_channels`` channels.

    The paper's Algorithm 1 as a user would write it in PyTorch: move the channels to the front,
    centre, form the covariance, normalise it by its trace, run T Newton iterations, whiten, and move
    the channels back; autograd supplies the backward pass. Running statistics are left out (the
    benchmark times training-mode forward and backward only).
    """
    N, C = x.shape[:2]
    d = num_channels
    G = C // d
    xt = x.transpose(0, 1).reshape(G, d, -1)                       # (G, d, m): channels first
    m = xt.shape[-1]
    xc = xt - xt.mean(dim=-1, keepdim=True)
    eye = torch.eye(d, dtype=x.dtype, device=x.device).expand(G, d, d)
    sigma = eps * eye + xc @ xc.transpose(1, 2) / m                # eps I + Xc Xc^T / m
    tr = sigma.diagonal(dim1=1, dim2=2).sum(-1).reshape(G, 1, 1)
    sigma_n = sigma / tr                                           # trace-normalised
    p = eye
    for _ in range(T):                                             # P <- 1.5 P - 0.5 P^3 Sn
        p = 1.5 * p - 0.5 * torch.matrix_power(p, 3) @ sigma_n
    wm = p / tr.sqrt()
    y = (wm @ xc).reshape(C, N, *x.shape[2:]).transpose(0, 1)     # back to (N, C, *S)
    if weight is not None:
        y = y * weight.reshape(1, C, *([1] * (x.dim() - 2)))
    if bias is not None:
        y = y + bias.reshape(1, C, *([1] * (x.dim() - 2)))
    return y


def iternorm(x: torch.Tensor, num_channels: int, T: int, eps: float, weight=None, bias=None) -> torch.Tensor:
    """IterNorm's training forward (:func:`iternorm_train`), statistics in float32 as in sdecor."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return iternorm_train(x.float(), num_channels, T, eps, weight, bias).to(x.dtype)
    return iternorm_train(x, num_channels, T, eps, weight, bias)


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
