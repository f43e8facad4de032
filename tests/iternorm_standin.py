"""A stand-in for IterNorm-pytorch's ``IterNorm`` (iterative_normalization.py; Huang et al.,
"Iterative Normalization: Beyond Standardization towards Efficient Whitening", CVPR 2019), so that
convert_iternorm is tested without that project.

Written here from the published algorithm and the state layout of that project's layers (class,
attribute and buffer names, shapes, the expanded identity that ``running_wm`` starts as); plain
autograd instead of a hand-written backward, the textbook Newton-Schulz recurrence of the paper:

    Sigma = Xc Xc^T / m + eps I,  Sn = Sigma / tr(Sigma),  P_0 = I,
    P_{k+1} = 1.5 P_k - 0.5 P_k^3 Sn,  W = P_T / sqrt(tr(Sigma)),  y = W Xc,

training with batch statistics and ``running <- momentum * batch + (1 - momentum) * running`` for the
mean and W; eval mode with the running ones. Then ``y * weight + bias``, weight and bias shaped
(1, C, 1, 1) (``dim=4``) or (1, C) (``dim=2``).
"""

import torch
from torch import nn


def iterative_whitening(x, running_mean, running_wm, T, eps, momentum, training):
    """Whitens the channels of x (N, C, *S) in the G groups of d channels given by running_mean
    (G, d, 1) / running_wm (G, d, d). Returns (y, running_mean, running_wm): the running statistics
    after this step (new tensors in training mode, the given ones in eval mode)."""
    N, C = x.shape[:2]
    G, d = running_wm.shape[:2]
    xg = x.transpose(0, 1).reshape(G, d, -1)                      # (G, d, m)
    if training:
        mean = xg.mean(-1, keepdim=True)
        xc = xg - mean
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        sigma = xc @ xc.transpose(1, 2) / xc.shape[-1] + eps * eye
        trace = sigma.diagonal(dim1=1, dim2=2).sum(-1).reshape(G, 1, 1)
        sn = sigma / trace
        P = eye.expand(G, d, d)
        for _ in range(T):
            P = 1.5 * P - 0.5 * torch.linalg.matrix_power(P, 3) @ sn
        wm = P / trace.sqrt()
        with torch.no_grad():
            running_mean = momentum * mean + (1 - momentum) * running_mean
            running_wm = momentum * wm + (1 - momentum) * running_wm
    else:
        xc = xg - running_mean
        wm = running_wm
    y = wm @ xc
    return y.reshape(C, N, *x.shape[2:]).transpose(0, 1), running_mean, running_wm


class IterNorm(nn.Module):
    """IterNorm with C = num_groups * num_channels (every group of the same size)."""

    def __init__(self, num_features, num_channels, T=5, dim=4, eps=1e-5, momentum=0.1, affine=True,
                 dtype=None):
        super().__init__()
        assert num_features % num_channels == 0
        self.num_features = num_features
        self.num_channels = num_channels
        self.num_groups = num_features // num_channels
        self.T, self.dim, self.eps, self.momentum, self.affine = T, dim, eps, momentum, affine
        shape = [1] * dim
        shape[1] = num_features
        if affine:
            self.weight = nn.Parameter(torch.ones(shape, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(shape, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        G, d = self.num_groups, num_channels
        self.register_buffer("running_mean", torch.zeros(G, d, 1, dtype=dtype))
        # as in the original: one identity matrix seen G times (a stride-0, non-contiguous buffer)
        self.register_buffer("running_wm", torch.eye(d, dtype=dtype).expand(G, d, d))

    def forward(self, x):
        y, self.running_mean, self.running_wm = iterative_whitening(
            x, self.running_mean, self.running_wm, self.T, self.eps, self.momentum, self.training)
        return y * self.weight + self.bias if self.affine else y
