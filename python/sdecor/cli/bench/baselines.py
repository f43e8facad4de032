"""Baselines the benchmark measures sdecor against (besides the reference and torch.compile of it).

* :func:`iternorm`: IterNorm (Huang et al., CVPR 2019, Algorithm 1) as a user writes it
  (:func:`iternorm_train`); half-precision inputs get float32 statistics, as in sdecor.
* :func:`compiled_iternorm`: :func:`iternorm` under ``torch.compile``, the speed-up a user tries first.
* :func:`sgt_mask`: the masking step of Saliency Guided Training (Ismail et al., NeurIPS 2021): per
  sample, torch.topk of the k lowest saliencies, scatter into a mask, per-channel min and max,
  torch.rand, torch.where with the fill.
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


def compiled_iternorm():
    """``torch.compile`` of :func:`iternorm` (static shapes; forward and backward compiled on the first
    call, which the benchmark makes before timing).

    The compiler's caches are kept (no ``torch._dynamo.reset()``): a case's other compiled baseline
    keeps its code. Donated buffers are turned off (process-wide), as for the compiled reference: the
    ``bwd`` mode runs backward repeatedly on one retained graph.
    """
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    return torch.compile(iternorm, dynamic=False)


SGT_FILLS = ("zero", "constant", "mean", "uniform")


def sgt_mask(x: torch.Tensor, saliency: torch.Tensor, k: int, reduce="mean", fill: str = "zero",
             value: float = 0.0, generator=None):
    """Replace each sample's k least salient features the way Saliency Guided Training does, in
    plain torch: |saliency| (its channel mean for ``reduce="mean"``; per element for ``reduce=None``,
    SGT's own way), torch.topk of each sample's k lowest scores, scatter into a mask, the fill, and
    torch.where. Returns (x_masked, mask) like ``topk_mask``.

    ``fill="uniform"`` draws from U[min, max] with the min and max of each channel of each sample
    (torch.rand, then scaled), the fill topk_mask draws; "mean" is each channel's mean of the sample.
    The topk runs once on the (N, D) scores, one row per sample: the way a torch user writes the
    per-sample selection, and faster on CPU than a Python loop over the samples (this baseline's
    earlier form, which also took the min and max of the whole sample rather than of each channel).
    torch.topk breaks ties in no defined order, so on tied scores the mask may differ from
    topk_mask's (lower index first).
    """
    if fill not in SGT_FILLS:
        raise ValueError(f"fill must be one of {SGT_FILLS} for the SGT baseline; got {fill!r}")
    N = x.shape[0]
    score = saliency.abs()
    if reduce == "mean":
        score = score.mean(1)
    flat = score.reshape(N, -1)
    idx = torch.topk(flat, k, dim=1, largest=False).indices                 # per sample
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True).view(score.shape)
    where = mask.unsqueeze(1) if reduce == "mean" else mask
    dims = tuple(range(2, x.dim()))                                         # each channel of each sample
    if fill == "uniform":
        lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
        values = lo + (hi - lo) * torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    elif fill == "mean":
        values = x.mean(dims, keepdim=True)
    else:
        values = torch.tensor(value if fill == "constant" else 0.0, dtype=x.dtype, device=x.device)
    return torch.where(where, values, x), mask
