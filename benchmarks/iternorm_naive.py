"""A straightforward implementation of Iterative Normalization (Huang et al., CVPR 2019), the baseline
of the CPU group-whitening benchmark.

It follows the paper's Algorithm 1 as a user would write it in PyTorch: move the channels to the
front, centre, form the covariance, normalise it by its trace, run T Newton iterations, whiten, and
move the channels back; autograd supplies the backward pass. Running statistics are left out (the
benchmark times training-mode forward + backward only).
"""

from __future__ import annotations

import torch


def iternorm_train(x: torch.Tensor, num_channels: int, T: int = 5, eps: float = 1e-5,
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """IterNorm with batch statistics on x (N, C, *S); groups of ``num_channels`` channels."""
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
