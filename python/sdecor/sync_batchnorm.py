r"""BatchNorm whose training statistics are those of all processes of a torch.distributed process
group, also where :class:`torch.nn.SyncBatchNorm` does not run: CPU tensors over gloo.

torch's SyncBatchNorm takes GPU (and XPU) tensors only, so on CPUs a data-parallel run with
BatchNorm either fails or, with plain BatchNorm, normalises each rank by its own share of the batch
and trains another model than one process on the whole batch. :class:`SyncBatchNormGloo` keeps
BatchNorm's semantics exactly on the global batch: the outputs, the gradients (loss summed over the
ranks) and the running statistics (the unbiased variance, ``num_batches_tracked``, momentum or the
cumulative average) equal those of BatchNorm on the concatenation of the ranks' batches. It uses
only ``all_gather`` and ``all_reduce``, so it runs on any backend (gloo, nccl) and device.

One collective each way per layer and training step, O(C) numbers whatever the batch size:

* forward: an ``all_gather`` of each rank's (count, mean, centred sum of squares) per channel,
  2 C + 1 float64 numbers, combined on every rank by the parallel formula of Chan et al.:
  n = sum n_r, mean = sum n_r mean_r / n, M2 = sum M2_r + sum n_r (mean_r - mean)^2. Only centred
  moments are added, so nothing cancels where |mean| >> std (a sum of squares would lose the
  variance there); ranks may hold different batch sizes, 0 included;
* backward: an ``all_reduce`` of (sum dy, sum dy xhat) per channel, 2 C float64 numbers, from which
  dx = w invstd (dy - sum dy / n - xhat sum(dy xhat) / n) as in one process. The weight and bias
  gradients are the rank's own sums (DDP then averages them).

In eval mode, at world size 1 or without an initialised process group there is no communication
and the layer is BatchNorm exactly (``torch.nn.modules.batchnorm._BatchNorm.forward``). Its
state_dict has BatchNorm's keys and shapes, and loads into ``torch.nn.BatchNorm1d/2d/3d`` (and
theirs into it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from . import _checks

__all__ = ["SyncBatchNormGloo"]


class SyncBatchNormGloo(nn.modules.batchnorm._BatchNorm):
    r"""BatchNorm over N-D input (N, C, *S) whose training statistics are those of all processes of
    a torch.distributed process group together; runs on CPU tensors over gloo, where
    :class:`torch.nn.SyncBatchNorm` does not.

    Same arguments, parameters, buffers and state_dict as :class:`torch.nn.BatchNorm2d` (of any
    number of dims, as torch's SyncBatchNorm), plus ``process_group`` (None: the default group).

    In training mode with an initialised process group of world size > 1, the batch mean and
    variance of each channel are those of the union of the ranks' samples, weighted by count (ranks
    may hold different batch sizes, 0 included). Every rank computes the same output normalisation
    and the same running statistics (unbiased variance), and the outputs and gradients equal
    BatchNorm's on the concatenated batch in one process with the loss summed over the ranks. Cost
    per layer and step: one all_gather of 2 C + 1 numbers per rank in the forward and one all_reduce
    of 2 C numbers in the backward (:mod:`sdecor.sync_batchnorm`). Statistics are accumulated in
    float64 and combined from centred moments, so that large means do not cancel the variance.

    In eval mode, at world size 1 or without an initialised process group there is no
    communication, and the layer is BatchNorm exactly.

    Every rank must call the layer in the same order (as with SyncBatchNorm and DDP). The input is
    checked before any collective, so that bad input fails on every rank alike. With fewer than 2
    samples on all ranks together the running statistics are left as they are (one process raises
    there, which a rank cannot know without waiting for the others). A backward with
    ``create_graph=True`` raises.

    ``convert_sync_batchnorm`` converts a model's BatchNorm layers, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _sync_world_size(self) -> int:
        """The number of processes whose statistics are combined: 1 (no communication) in eval mode
        or without an initialised process group."""
        if not self.training or not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        world_size = self._sync_world_size()
        if world_size <= 1:
            return super().forward(input)
        # Checked here, before the collective: bad input fails on every rank alike.
        _checks.check_module_input(input, self.num_features, type(self).__name__)
        return SyncBatchNormFunction.apply(input, self.weight, self.bias, self.running_mean, self.running_var,
                                           self.num_batches_tracked, self.momentum, self.eps, self.process_group,
                                           world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm layer of ``module`` (``torch.nn.modules.batchnorm._BatchNorm``:
        BatchNorm1d/2d/3d, torch's SyncBatchNorm) by a SyncBatchNormGloo, in place, and return the
        module, or the replacement when ``module`` itself is one.

        The new layers share the old ones' parameters and buffers (the same tensors, so an optimizer
        built before still updates them) and take over their options and training mode. Layers that
        already are SyncBatchNormGloo are left as they are.
        """
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
            return out
        for name, child in module.named_children():
            new = cls.convert_sync_batchnorm(child, process_group)
            if new is not child:
                module.add_module(name, new)
        return module


def _view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel (C,) tensor shaped to broadcast against (N, C, *S)."""
    return t.view((1, -1) + (1,) * (ndim - 2))


class SyncBatchNormFunction(torch.autograd.Function):
    """The training step of :class:`SyncBatchNormGloo` at world size > 1: statistics of the global
    batch (one all_gather), the normalisation, the running statistics; its backward (one all_reduce)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group,
                world_size):
        C, ndim = x.shape[1], x.dim()
        dims = [0] + list(range(2, ndim))
        n_local = x.numel() // C if C else 0
        # this rank's count, mean and centred sum of squares per channel, in float64
        if n_local:
            xd = x.detach().to(torch.float64)
            mean_r = xd.mean(dims)
            m2_r = (xd - _view(mean_r, ndim)).square().sum(dims)
            del xd
        else:
            mean_r = m2_r = torch.zeros(C, dtype=torch.float64, device=x.device)
        count_r = torch.full((1,), float(n_local), dtype=torch.float64, device=x.device)
        payload = torch.cat([count_r, mean_r, m2_r])
        gathered = [torch.empty_like(payload) for _ in range(world_size)]
        dist.all_gather(gathered, payload, group=group)
        table = torch.stack(gathered)                                    # (world, 2C + 1)
        counts, means, m2s = table[:, :1], table[:, 1:C + 1], table[:, C + 1:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n.clamp_min(1)
        m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)      # Chan et al.: centred terms only
        invstd = (m2 / n.clamp_min(1) + eps).rsqrt()

        cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean_c, invstd_c = mean.to(cdtype), invstd.to(cdtype)
        scale = invstd_c if weight is None else invstd_c * weight.detach().to(cdtype)
        shift = -mean_c * scale if bias is None else bias.detach().to(cdtype) - mean_c * scale
        y = (x.to(cdtype) * _view(scale, ndim) + _view(shift, ndim)).to(x.dtype)

        if running_mean is not None:
            _update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, m2, n)
        ctx.save_for_backward(x, weight, mean_c, invstd_c, n)
        ctx.group, ctx.has_bias = group, bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean_c, invstd_c, n = ctx.saved_tensors
        ndim, C = x.dim(), x.shape[1]
        dims = [0] + list(range(2, ndim))
        cdtype = mean_c.dtype
        xhat = (x.to(cdtype) - _view(mean_c, ndim)) * _view(invstd_c, ndim)
        dyc = dy.to(cdtype)
        sum_dy = dyc.sum(dims, dtype=torch.float64)
        sum_dy_xhat = (dyc * xhat).sum(dims, dtype=torch.float64)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype if weight is not None else cdtype) \
            if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            # the same on every rank: the graph is, so every rank joins this collective
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            n = n.clamp_min(1)
            mean_dy, mean_dy_xhat = (sums[:C] / n).to(cdtype), (sums[C:] / n).to(cdtype)
            scale = invstd_c if weight is None else invstd_c * weight.to(cdtype)
            grad_x = ((dyc - _view(mean_dy, ndim) - xhat * _view(mean_dy_xhat, ndim)) * _view(scale, ndim)).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None


@torch.no_grad()
def _update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, m2, n) -> None:
    """BatchNorm's update, (1 - f) r + f batch with the unbiased variance, where the ranks hold at
    least 2 samples together; nothing changes where they do not (read on the device: no host sync).
    f = momentum, or 1 / num_batches_tracked (after its increment) for momentum None."""
    valid = n >= 2
    num_batches_tracked.add_(valid.to(num_batches_tracked.dtype))
    dtype = running_mean.dtype     # the buffers' own
    if momentum is None:
        factor = num_batches_tracked.to(torch.float64).clamp_min(1).reciprocal()
    else:
        factor = torch.full((), float(momentum), dtype=torch.float64, device=running_mean.device)
    factor = torch.where(valid, factor, torch.zeros_like(factor))
    unbiased = m2 / (n - 1).clamp_min(1)
    # in float64, then rounded once to the buffers' dtype, as BatchNorm's CPU kernel does
    running_mean.copy_(((1 - factor) * running_mean.to(torch.float64) + factor * mean).to(dtype))
    running_var.copy_(((1 - factor) * running_var.to(torch.float64) + factor * unbiased).to(dtype))
