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

The kernels are the ones of GroupWhitening (``triton``: :mod:`sdecor_kernels` through the ops of
:mod:`sdecor.ops.whiten`; ``native``: the C++ passes ``sdecor::native_whiten_*``; ``torch``: the
blocked passes of :mod:`sdecor.ops.whiten_torch`); the collectives sit between them. A smaller last group (d does not divide C) travels in the padded
(G, d) / (G, d, d) layout (zeros in its padding, which the combination keeps zero); the triton kernels
mask it themselves, the torch passes run on the full groups' channels and on the last group's as on
two inputs (see :mod:`sdecor.ops.whiten_torch`), and the d x d math of both takes the channel mask.
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
from .._layout import by_part, channel_mask, group_layout, joined_parts, like_format, per_channel, per_group
from .._precision import no_autocast, no_autocast_function, power_of_two, stats_dtype
from . import whiten, whiten_torch

__all__ = ["combine", "payload_numel", "run_train_sync"]


# ---------------------------------------------------------------------------------------------------
# the large-tensor passes of each backend, all in units of a per-group power-of-two scale c


def _cat_channels(results: list, like: Tensor) -> Tensor:
    """The parts' outputs of :func:`sdecor._layout.by_part` along the channels, in the memory format of ``like``."""
    if len(results) == 1:
        return results[0]
    return like_format(torch.cat([t for t in results if t is not None], 1).contiguous(), like)


class _TorchPasses:
    """The blocked torch passes of :mod:`sdecor.ops.whiten_torch` (a smaller last group: on the
    full groups' channels and on the last group's, see :func:`sdecor._layout.by_part`)."""

    @staticmethod
    def stats(x: Tensor, d: int):
        """(mean (G, d), cov / c^2 (G, d, d), c (G,)) of the local x (at least one sample)."""
        def part(dp, xp):
            xg = whiten_torch._regrouped(xp, dp)
            center, c, _, ms, cov = whiten_torch.scaled_stats(xg, xg.shape[0] * xg.shape[3])
            return center + c[:, None] * ms, cov, c

        return joined_parts(by_part(d, part, [x], []), d)

    @staticmethod
    def whitening(cov: Tensor, c: Tensor, method: str, eps: float, T: int, C: int):
        """W (true units) of cov c^2 + eps I, and what :meth:`whitening_backward` needs."""
        inv_c = c.reciprocal()                                       # exact: c is a power of two
        eps_s = whiten_torch.scaled_eps(eps, inv_c)
        w, small, history = whiten_torch.whitening_scaled(cov, eps_s, method, T, _mask(cov, C))
        return w * inv_c[:, None, None], (eps_s, *small, *history)

    @staticmethod
    def whitening_backward(grad_w: Tensor, state, cov: Tensor, c: Tensor, method: str, eps: float,
                           T: int, C: int) -> Tensor:
        """dL/dSe' / c from dL/dW' (W' = c W, Se' = Se / c^2)."""
        eps_s, *rest = state
        g = whiten_torch.whitening_scaled_backward(grad_w, rest, eps_s, method, T, _mask(cov, C))
        return g * c.reciprocal()[:, None, None]

    @classmethod
    def apply(cls, x: Tensor, mean: Tensor, w: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """y = diag(weight) W (x - mean) + bias."""
        G, d = mean.shape
        a = w if weight is None else per_group(weight.to(w.dtype), G, d).unsqueeze(-1) * w
        shift = torch.zeros_like(mean) if bias is None else per_group(bias.to(w.dtype), G, d)
        return _cat_channels(by_part(d, cls.apply_part, [x], [a, mean, shift]), x)

    @staticmethod
    def apply_part(dp: int, xp: Tensor, a: Tensor, mean: Tensor, shift: Tensor) -> Tensor:
        """:meth:`apply` on one part (shift (G, d))."""
        return whiten_torch.apply_pass(xp, whiten_torch._regrouped(xp, dp), a, mean, shift.unsqueeze(-1))

    @staticmethod
    def reduce(dy: Tensor, x: Tensor, mean: Tensor, c: Tensor):
        """(D / c = sum dy (x - mean)^T / c (G, d, d), s = sum dy (G, d))."""
        def part(dp, xp, dyp, mean, c):
            xg = whiten_torch._regrouped(xp, dp)
            gy = whiten_torch._regrouped(dyp, dp).contiguous()
            s, D = whiten_torch.reduce_pass(gy, xg, mean, c.reciprocal())
            return D, s

        return joined_parts(by_part(mean.shape[1], part, [x, dy], [mean, c]), mean.shape[1])

    @staticmethod
    def dx(dy: Tensor, x: Tensor, mean: Tensor, c: Tensor, a: Tensor, b: Tensor, v: Tensor) -> Tensor:
        """dx_j = B dy_j + A (x_j - mean) / c + v."""
        def part(dp, xp, dyp, mean, c, a, b, v):
            xg = whiten_torch._regrouped(xp, dp)
            gy = whiten_torch._regrouped(dyp, dp).contiguous()
            dx = whiten_torch.dx_pass(gy, xg, mean, c.reciprocal(), b, a, v.unsqueeze(-1))
            return dx.reshape(dyp.shape).to(dy.dtype)

        return _cat_channels(by_part(mean.shape[1], part, [x, dy], [mean, c, a, b, v]), dy)


def _mask(cov: Tensor, C: int) -> Tensor | None:
    """The channel mask (G, d) of a smaller last group (None when d divides C)."""
    G, d = cov.shape[0], cov.shape[-1]
    return None if C == G * d else channel_mask(G, d, C, cov.dtype, cov.device)


class _TritonPasses:
    """The Triton kernels of GroupWhitening's triton path (:func:`sdecor.ops.whiten.whiten_train_op`
    and its backward); a smaller last group is masked in the kernels."""

    @staticmethod
    def stats(x: Tensor, d: int):
        from sdecor_kernels import stats

        return stats.group_stats_scaled(x, d)

    @staticmethod
    def whitening(cov: Tensor, c: Tensor, method: str, eps: float, T: int, C: int):
        if method == "newton":
            from sdecor_kernels import newton

            return newton.newton_forward(cov, eps, T, c, C), ()
        evals, evecs, w = whiten._zca_scaled(cov, eps, c, C, whiten._eigh_for(cov.device))
        return w, (evals, evecs)

    @staticmethod
    def whitening_backward(grad_w: Tensor, state, cov: Tensor, c: Tensor, method: str, eps: float,
                           T: int, C: int) -> Tensor:
        if method == "newton":
            return whiten.newton_backward_op(cov, grad_w, eps, T, c, C)
        evals, evecs = state
        return whiten.zca_backward_masked(grad_w, evals, evecs, eps, c, C)

    @staticmethod
    def apply(x: Tensor, mean: Tensor, w: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return whiten.whiten_apply_op(x, mean, w, weight, bias)

    @staticmethod
    def reduce(dy: Tensor, x: Tensor, mean: Tensor, c: Tensor):
        return whiten.whiten_bwd_reduce_op(dy, x, mean, c)

    @staticmethod
    def dx(dy: Tensor, x: Tensor, mean: Tensor, c: Tensor, a: Tensor, b: Tensor, v: Tensor) -> Tensor:
        return whiten.whiten_bwd_dx_op(dy, x, mean, a, b, v, c)


class _NativePasses(_TorchPasses):
    """The C++ passes of the ``native`` backend (``sdecor::native_whiten_*``, one read of x for the
    statistics), on the parts of :func:`sdecor._layout.by_part` like the torch passes; the d x d math is theirs."""

    @staticmethod
    def stats(x: Tensor, d: int):
        def part(dp, xp):
            center, c, _, ms, cov = torch.ops.sdecor.native_whiten_stats(xp, dp)
            return center + c[:, None] * ms, cov, c

        return joined_parts(by_part(d, part, [x], []), d)

    @staticmethod
    def apply_part(dp: int, xp: Tensor, a: Tensor, mean: Tensor, shift: Tensor) -> Tensor:
        return torch.ops.sdecor.native_whiten_apply(xp, dp, a.contiguous(), mean.contiguous(), shift.contiguous())

    @staticmethod
    def reduce(dy: Tensor, x: Tensor, mean: Tensor, c: Tensor):
        def part(dp, xp, dyp, mean, c):
            s, D = torch.ops.sdecor.native_whiten_reduce(dyp.to(xp.dtype), xp, dp, mean.contiguous(),
                                                         c.reciprocal())
            return D, s

        return joined_parts(by_part(mean.shape[1], part, [x, dy], [mean, c]), mean.shape[1])

    @staticmethod
    def dx(dy: Tensor, x: Tensor, mean: Tensor, c: Tensor, a: Tensor, b: Tensor, v: Tensor) -> Tensor:
        def part(dp, xp, dyp, mean, c, a, b, v):
            dx = torch.ops.sdecor.native_whiten_dx(dyp.to(xp.dtype), xp, dp, mean.contiguous(), c.reciprocal(),
                                                   b.contiguous(), a.contiguous(), v.contiguous())
            return dx.to(dy.dtype)

        return _cat_channels(by_part(mean.shape[1], part, [x, dy], [mean, c, a, b, v]), dy)


PASSES = {"torch": _TorchPasses, "triton": _TritonPasses, "native": _NativePasses}


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


def _all_gather(t: Tensor, group) -> Tensor:
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
        if m > 0:
            mean_r, cov_r, c_r = passes.stats(x, d)
        else:                                                        # a rank without samples
            mean_r = torch.zeros(G, d, dtype=sd, device=x.device)
            cov_r = torch.zeros(G, d, d, dtype=sd, device=x.device)
            c_r = torch.ones(G, dtype=sd, device=x.device)
        gathered = _all_gather(_pack(m, mean_r.to(sd), cov_r.to(sd), c_r.to(sd)), group)
        mean, cov, c, n = combine(gathered, G, d)
        w, state = passes.whitening(cov, c, method, eps, T, C)
        if m > 0:
            y = passes.apply(x, mean, w, weight, bias)
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
        if m > 0:
            D, s = passes.reduce(grad_y, x, mean, c)                  # local: D / c, sum dy
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
            grad_se = passes.whitening_backward(gamma.unsqueeze(-1) * D, state, cov, c, method, eps, T, C)
            a = (grad_se + grad_se.transpose(-1, -2)) / n             # through cov = Xc Xc^T / n
            b = w.transpose(-1, -2) * gamma.unsqueeze(-2)             # W^T diag(gamma)
            v = -(b @ s.unsqueeze(-1)).squeeze(-1) / n                # through the mean
            grad_x = passes.dx(grad_y, x, mean, c, a, b, v) if m > 0 else torch.zeros_like(x)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


@no_autocast
def run_train_sync(x: Tensor, num_channels: int, method: str, eps: float, T: int, weight: Tensor | None,
                   bias: Tensor | None, group=None):
    """(y, mean, wm, n): GroupWhitening's training path with the statistics of all ranks of
    ``group`` (None: the default process group), on the backend GroupWhitening would use; n the
    number of samples per channel on all ranks together (a 0-dim tensor). No argument checks: the
    caller checks before calling, so that bad input fails on every rank before the collective."""
    backend = _backend.select("group_whiten_train", {"x": x}, whiten.SUPPORTS["group_whiten_train"])
    return _SyncGroupWhitenTrain.apply(x, weight, bias, PASSES[backend], num_channels, method,
                                       float(eps), int(T), group)
