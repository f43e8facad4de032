"""A stand-in for the flexible-group ``IterNorm`` of IterNorm-pytorch
(iterative_normalization_FlexGroup.py): C channels in G = ceil(C / d) groups, the last one of
C - (G - 1) d channels, each group an ``IterNorm_Single`` module with its own running_mean (c, 1) and
running_wm (c, c); one affine map over all C channels. Written here from that layout and the
algorithm of :mod:`iternorm_standin` (see there); not that project's code."""

import torch
from torch import nn

from iternorm_standin import iterative_whitening


class IterNorm_Single(nn.Module):              # the original's class name, which the layout names
    """Whitening of one group of ``num_features`` channels, without affine map."""

    def __init__(self, num_features, T=5, eps=1e-5, momentum=0.1, dtype=None):
        super().__init__()
        self.num_features, self.T, self.eps, self.momentum = num_features, T, eps, momentum
        self.register_buffer("running_mean", torch.zeros(num_features, 1, dtype=dtype))
        self.register_buffer("running_wm", torch.eye(num_features, dtype=dtype))

    def forward(self, x):
        # one group: the (c, 1) / (c, c) buffers as (1, c, 1) / (1, c, c)
        y, mean, wm = iterative_whitening(x, self.running_mean[None], self.running_wm[None], self.T,
                                          self.eps, self.momentum, self.training)
        self.running_mean, self.running_wm = mean[0], wm[0]
        return y


class IterNorm(nn.Module):
    """IterNorm with groups of ``num_channels`` channels and a smaller last group where d does not
    divide C."""

    def __init__(self, num_features, num_channels, T=5, dim=4, eps=1e-5, momentum=0.1, affine=True,
                 dtype=None):
        super().__init__()
        self.num_features, self.num_channels = num_features, num_channels
        self.num_groups = -(-num_features // num_channels)
        self.T, self.dim, self.eps, self.momentum, self.affine = T, dim, eps, momentum, affine
        last = num_features - (self.num_groups - 1) * num_channels
        sizes = [num_channels] * (self.num_groups - 1) + [last]
        self.iterNorm_Groups = nn.ModuleList(
            IterNorm_Single(c, T=T, eps=eps, momentum=momentum, dtype=dtype) for c in sizes)
        shape = [1] * dim
        shape[1] = num_features
        if affine:
            self.weight = nn.Parameter(torch.ones(shape, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(shape, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        parts = x.split(self.num_channels, dim=1)
        y = torch.cat([group(part) for group, part in zip(self.iterNorm_Groups, parts)], dim=1)
        return y * self.weight + self.bias if self.affine else y
