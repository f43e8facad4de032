"""Triton whitening at group sizes above 64 (padded to 128), where the kernels tile the d x d
products by row blocks and halves: output and gradients against the reference."""

import pytest
import torch

import sdecor
from sdecor import reference as ref
from sdecor.ops import whiten as wh
from sdecor.testing import assert_close

# Newton-Schulz steps. At BD = 128 the Newton backward kernel multiplies in 16 x 16 tiles (NewtonBwdConfig):
# 7 tiled products of 512 tile products per step, ~4/5 of this file's interpreter time. Two steps run
# every branch of the tiled iteration and its reverse: step 0 writes its iterates to the next hist
# slots, step 1 reads them and ends in the free buffers; the backward reads both slots in turn.
T = 2


def _reference_train(x, d, w, b):
    mean, cov = ref.group_cov(x, d)
    wm = ref.whitening_matrix(cov, "newton", 1e-3, T)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return ref.apply_whitening(x, mean, wm) * w.view(shape) + b.view(shape), mean, wm


# One case per layout keeps the interpreter's time down (each runs the BD = 128 kernels).
@pytest.mark.parametrize("d,channels_last", [(100, False), (128, True)], ids=["d100-nchw", "d128-channels_last"])
def test_large_groups_match_reference(d, channels_last, device, poison):
    x = torch.randn(2, d, 3, 3, device=device) * 1.5 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(d, device=device)
    b = torch.randn(d, device=device)
    g = torch.randn(x.shape, device=device)
    results = []
    for backend in ("triton", "reference"):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        if backend == "reference":
            y, mean, wm = _reference_train(xx, d, ww, bb)
        else:
            with sdecor.use_backend("triton"):
                y, mean, wm = wh.group_whiten_train(xx, d, "newton", 1e-3, T, ww, bb)
        (y * g).sum().backward()
        results.append((y, mean, wm, xx.grad, ww.grad, bb.grad))
    for name, got, want in zip(["y", "mean", "wm", "grad x", "grad weight", "grad bias"], *results):
        assert torch.isfinite(got).all(), name
        assert_close(got, want.detach(), msg=f"{name} differs from the reference at d={d}")
