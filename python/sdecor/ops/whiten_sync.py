"""Group whitening with batch statistics synchronised over torch.distributed (SyncGroupWhitening).

In training with a process group of world size W > 1, each group's mean and covariance are those of
the union of all ranks' samples, weighted by count; W (the whitening matrix), the outputs, the
running statistics and every gradient equal those of GroupWhitening on the concatenated batch in one
process, with the loss summed over the ranks. Per layer and training step:

forward   the backend's statistics pass over the local x (count m_r, mean_r, the centred second
          moment M2_r = sum (x - mean_r)(x - mean_r)^T, each group in units of its power-of-two scale
          c_r) -> one all_gather of these O(G d^2) numbers -> every rank combines the W entries in the
          same order by the parallel formula on (count, mean, M2) (:func:`combine`) and so computes
          the same mean, covariance and W -> the backend's apply pass.
backward  the backend's reduce pass over the local (dy, x): D = sum dy (x - mean)^T / c and
          s = sum dy -> one all_reduce (sum) of (D, s) -> the d x d backward (the same on every rank)
          -> the backend's dx pass. The weight and bias gradients are the local ones: DDP's
          all-reduce of the parameter gradients sums them over the ranks (and divides by W).

The passes are the ones of GroupWhitening, through the interface of
:mod:`sdecor.ops._whiten_passes` (``triton``: :class:`sdecor.ops.whiten.TritonPasses`; ``native``:
:class:`sdecor.ops.whiten_native.NativePasses`; ``torch``: :class:`sdecor.ops.whiten_torch.TorchPasses`,
see :data:`PASSES`); the collectives sit between them. A smaller last group (d does not divide C)
travels in the padded (G, d) / (G, d, d) layout (zeros in its padding, which the combination keeps
zero); the triton kernels mask it themselves, the torch and native passes run on the full groups'
channels and on the last group's as on two inputs (:class:`sdecor.ops._whiten_passes.ByParts`), and
the d x d math of both takes the channel mask.
Ranks may hold any number of samples, 0 included; fewer than 2 on all ranks together leave the
running statistics untouched (the counts are only known on the device, and reading them would wait
for it). Nothing here synchronises with the host.

A rank that fails between the two collectives of a step (an exception, a killed process) leaves the
others waiting in their next collective until the process group's timeout, as with SyncBatchNorm.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _backend
from .._layout import group_layout, per_channel, per_group
from .._precision import no_autocast, no_autocast_function, power_of_two, stats_dtype
from . import whiten
from ._whiten_passes import ByParts
from .whiten import TritonPasses
from .whiten_native import NativePasses
from .whiten_torch import TorchPasses

__all__ = ["PASSES", "all_gather", "combine", "payload_numel", "run_train_sync"]


# the passes of each backend (sdecor.ops._whiten_passes.WhiteningPasses); torch and native need d | C
PASSES = {"torch": ByParts(TorchPasses), "triton": TritonPasses, "native": ByParts(NativePasses)}


# ---------------------------------------------------------------------------------------------------
# what travels: (count, c, mean, M2 / c^2) per rank; the combination


def _upper(d: int, device) -> tuple[Tensor, Tensor]:
    """Row and column indices of the upper triangle of a d x d matrix (diagonal included)."""
    iu = torch.triu_indices(d, d, device=device)
    return iu[0], iu[1]


def payload_numel(G: int, d: int) -> int:
    """Numbers each rank contributes to the forward's all_gather: the count (two numbers, exact up
    to 2^48 samples), c (G), the mean (G d) and the upper triangle of M2 / c^2 (G d (d + 1) / 2).
    The backward's all_reduce carries G d (d + 1): D (G d d) and s (G d)."""
    return 2 + G + G * d + G * d * (d + 1) // 2


_COUNT_BASE = 2 ** 24                                               # exact in fp32 below 2^24


def _pack(m: int, mean: Tensor, cov: Tensor, c: Tensor) -> Tensor:
    """One flat tensor of the local statistics (count m, c, mean, M2 / c^2 = m cov / c^2)."""
    G, d = mean.shape
    rows, cols = _upper(d, mean.device)
    count = mean.new_empty(2)
    count[0] = m // _COUNT_BASE                                      # fill kernels, no host transfer
    count[1] = m % _COUNT_BASE
    return torch.cat([count, c, mean.reshape(-1), (cov[:, rows, cols] * m).reshape(-1)])


def combine(gathered: Tensor, G: int, d: int):
    """The statistics of the union of the ranks' samples from their packed local statistics
    (world, payload_numel(G, d)), the same on every rank (same data, same order of operations).

    With counts n_r, means mu_r and centred second moments M2_r, n = sum n_r:
        mu = sum (n_r / n) mu_r,   M2 = sum M2_r + sum n_r (mu_r - mu)(mu_r - mu)^T,
    (Chan, Golub and LeVeque's parallel formula: only centred quantities are added, so nothing
    cancels, unlike sums of x and x x^T). Everything is formed in units of a new power-of-two scale c
    per group that covers every rank's scale and spread of means, so that it stays finite wherever
    the ranks' statistics are.

    Returns (mean (G, d), cov / c^2 (G, d, d), c (G,), n (0-dim tensor)).
    """
    world = gathered.shape[0]
    rows, cols = _upper(d, gathered.device)
    n_r = gathered[:, 0] * _COUNT_BASE + gathered[:, 1]              # (world,)
    c_r = gathered[:, 2:2 + G]                                       # (world, G)
    mu_r = gathered[:, 2 + G:2 + G + G * d].reshape(world, G, d)
    tri = gathered[:, 2 + G + G * d:].reshape(world, G, -1)
    m2_r = gathered.new_zeros(world, G, d, d)
    m2_r[:, :, rows, cols] = tri
    m2_r[:, :, cols, rows] = tri
    n = n_r.sum()
    n_safe = n.clamp_min(1)
    mean = ((n_r / n_safe)[:, None, None] * mu_r).sum(0)
    present = (n_r > 0)[:, None]                                     # ranks holding samples
    delta = torch.where(present[..., None], mu_r - mean, 0)          # (world, G, d)
    # c: the power of two at or above every rank's scale and every |mu_r - mean|, at least 1
    bound = torch.maximum(torch.where(present, c_r, 0), delta.abs().amax(-1)).amax(0)   # (G,)
    mant, e = torch.frexp(bound)
    e = (e - (mant == 0.5).to(e.dtype)).clamp(0, 1022 if gathered.dtype == torch.float64 else 126)
    c, inv_c = power_of_two(e, gathered.dtype), power_of_two(-e, gathered.dtype)
    ratio = c_r * inv_c                                              # c_r / c <= 1, a power of two
    ds = delta * inv_c[None, :, None]
    m2 = ((ratio * ratio)[..., None, None] * m2_r).sum(0) + (
        n_r[:, None, None, None] * ds.unsqueeze(-1) * ds.unsqueeze(-2)).sum(0)
    return mean, m2 / n_safe, c, n


def all_gather(t: Tensor, group) -> Tensor:
    """(world, numel) from every rank's t, one collective."""
    world = dist.get_world_size(group)
    out = t.new_empty(world * t.numel())                           # flat: gloo takes no stacked output
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)
    return out.view(world, t.numel())


# ---------------------------------------------------------------------------------------------------
# autograd


@no_autocast_function
class _SyncGroupWhitenTrain(torch.autograd.Function):
    """y = diag(weight) W (x - mean) + bias with mean, W from the statistics of all ranks; the
    backward of GroupWhitening's training path with (D, s) summed over the ranks (see the module
    docstring). Returns (y, mean, W, n) with n the total count."""

    @staticmethod
    def forward(ctx, x, weight, bias, passes, d, method, eps, T, group):
        N, C = x.shape[:2]
        G = group_layout(C, d)[0]                                    # the last group may be smaller
        m = N * math.prod(x.shape[2:])
        sd = stats_dtype(x.dtype)
        run = passes(x, d) if m > 0 else None                        # the passes over the local x
        if m > 0:
            st = run.statistics()
            mean_r, cov_r, c_r = st.mean, st.cov, st.c
        else:                                                        # a rank without samples
            mean_r = torch.zeros(G, d, dtype=sd, device=x.device)
            cov_r = torch.zeros(G, d, d, dtype=sd, device=x.device)
            c_r = torch.ones(G, dtype=sd, device=x.device)
        gathered = all_gather(_pack(m, mean_r.to(sd), cov_r.to(sd), c_r.to(sd)), group)
        mean, cov, c, n = combine(gathered, G, d)
        w, state = passes.matrix(cov, c, method, eps, T, C)
        if m > 0:
            y = run.whiten(mean, w, weight, bias)
        else:
            y = torch.empty_like(x)
        ctx.meta = (passes, d, method, eps, T, m, group, weight is not None, bias is not None)
        ctx.save_for_backward(x, mean, cov, c, n, w, weight, bias, *state)
        ctx.mark_non_differentiable(mean, w, n)
        return y, mean, w, n

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_w, _grad_n):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "SyncGroupWhitening: a backward with create_graph=True (double backward) is not "
                "implemented for statistics synchronised across processes; use GroupWhitening "
                "(SyncGroupWhitening.revert_sync_whitening) for higher-order gradients")
        passes, d, method, eps, T, m, group, has_weight, has_bias = ctx.meta
        x, mean, cov, c, n, w, weight, bias, *state = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        G, C = mean.shape[0], x.shape[1]
        run = passes(x, d) if m > 0 else None
        if m > 0:
            D, s = run.reduce_grad(grad_y, mean, c)                  # local: D / c, sum dy
        else:
            D = mean.new_zeros(G, d, d)
            s = mean.new_zeros(G, d)
        # the parameters' gradients of this rank's loss terms: DDP sums them over the ranks
        grad_weight = grad_bias = grad_x = None
        if has_weight and need_weight:
            grad_weight = per_channel((D * (w * c[:, None, None])).sum(-1), C).to(weight.dtype)
        if has_bias and need_bias:
            grad_bias = per_channel(s, C).to(bias.dtype)
        if need_x:
            # every rank's samples feed the statistics of all: sum (D, s) over the ranks
            flat = torch.cat([D.reshape(-1), s.reshape(-1)])
            dist.all_reduce(flat, group=group)
            D, s = flat[:G * d * d].reshape(G, d, d), flat[G * d * d:].reshape(G, d)
            gamma = per_group(weight.to(w.dtype), G, d) if has_weight else torch.ones_like(s)
            grad_se = passes.matrix_grad(gamma.unsqueeze(-1) * D, state, cov, c, method, eps, T, C)
            a = (grad_se + grad_se.transpose(-1, -2)) / n             # through cov = Xc Xc^T / n
            b = w.transpose(-1, -2) * gamma.unsqueeze(-2)             # W^T diag(gamma)
            v = -(b @ s.unsqueeze(-1)).squeeze(-1) / n                # through the mean
            grad_x = run.input_grad(grad_y, mean, c, a, b, v) if m > 0 else torch.zeros_like(x)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


@no_autocast
def run_train_sync(x: Tensor, num_channels: int, method: str, eps: float, T: int, weight: Tensor | None,
                   bias: Tensor | None, group=None):
    """(y, mean, wm, n): GroupWhitening's training path with the statistics of all ranks of
    ``group`` (None: the default process group), on the backend GroupWhitening would use; n the
    number of samples per channel on all ranks together (a 0-dim tensor). No argument checks: the
    caller checks before calling, so that bad input fails on every rank before the collective."""
    backend = _backend.select("group_whiten_train", {"x": x}, whiten.SUPPORTS["group_whiten_train"],
                              num_channels)
    return _SyncGroupWhitenTrain.apply(x, weight, bias, PASSES[backend], num_channels, method,
                                       float(eps), int(T), group)
