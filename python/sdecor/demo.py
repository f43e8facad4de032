"""``python -m sdecor demo``: whiten a batch, mask a batch, and print what happened."""

from __future__ import annotations

import argparse

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import sdecor

    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    # Correlated features: 64 channels mixed by a random matrix, groups of 16.
    mix = torch.randn(64, 64, generator=gen)
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(32, 64, 8, 8, generator=gen)).to(device)
    d = 16
    _, cov = sdecor.group_cov(x, d)
    for method in ("zca", "newton"):
        y = sdecor.group_whiten(x, d, method=method, T=10)
        _, cov_y = sdecor.group_cov(y, d)
        off = (cov_y - torch.diag_embed(cov_y.diagonal(dim1=-2, dim2=-1))).abs().amax()
        print(f"group_whiten[{method:6s}] x {tuple(x.shape)}, d={d}: "
              f"max |cov - I| {(cov_y - torch.eye(d, device=device)).abs().amax():.2e} "
              f"(input {(cov - torch.eye(d, device=device)).abs().amax():.2e}), max off-diagonal {off:.2e}")
    print(f"decorrelation_loss(decov): input {sdecor.decorrelation_loss(x, d):.4f}, "
          f"whitened {sdecor.decorrelation_loss(sdecor.group_whiten(x, d, method='zca'), d):.2e}")

    images = torch.rand(4, 3, 16, 16, generator=gen).to(device)
    sal = torch.rand(4, 3, 16, 16, generator=gen).to(device)
    for fill in ("zero", "mean", "uniform"):
        xm, mask = sdecor.topk_mask(images, sal, ratio=0.25, fill=fill, generator=gen)
        print(f"topk_mask[{fill:7s}] ratio 0.25 of 16x16: {int(mask.sum())} of {mask.numel()} positions "
              f"replaced ({mask.sum(dim=(1, 2)).tolist()} per sample), "
              f"changed values {int((xm != images).sum())}")
    print(f"backend: {sdecor.info()['forced_backend'] or 'auto'}; device: {device}")
    return 0
