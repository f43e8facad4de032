"""Gradients of topk_mask on the triton backend against the reference's autograd."""

import pytest
import torch

import sdecor
from sdecor import reference as ref


def _grads(fn, x, baseline):
    xx = x.clone().requires_grad_()
    bb = baseline.clone().requires_grad_() if baseline is not None else None
    out, mask = fn(xx, bb)
    weights = torch.linspace(-1, 2, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    return out, mask, xx.grad, (bb.grad if bb is not None else None)


@pytest.mark.parametrize("reduce", ["mean", None], ids=["mean", "none"])
@pytest.mark.parametrize("fill", ["zero", "constant", "mean", "baseline"])
def test_gradients_match_reference(fill, reduce):
    x = torch.randn(3, 4, 5, 6)
    sal = torch.rand_like(x)
    baseline = torch.randn_like(x) if fill == "baseline" else None
    kw = dict(ratio=0.4, reduce=reduce, fill=fill, value=1.5)

    def triton(xx, bb):
        with sdecor.use_backend("triton"):
            return sdecor.topk_mask(xx, sal, baseline=bb, **kw)

    def reference(xx, bb):
        return ref.topk_mask(xx, sal, baseline=bb, **kw)

    got, want = _grads(triton, x, baseline), _grads(reference, x, baseline)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[2], want[2])
    if fill == "baseline":
        torch.testing.assert_close(got[3], want[3])


def test_uniform_gradient_matches_finite_differences():
    """With the generator reset, the fill lo + (hi - lo) u is a fixed function of x: its
    derivative by autograd equals central differences (x has distinct values, so min and max are
    unique and stay put under the small perturbations)."""
    torch.manual_seed(3)
    x = torch.randn(2, 2, 3, 4)
    sal = torch.rand_like(x)
    weights = torch.randn_like(x)

    def f(xx):
        with sdecor.use_backend("triton"):
            out, _ = sdecor.topk_mask(xx, sal, ratio=0.5, fill="uniform",
                                      generator=torch.Generator().manual_seed(11))
        return (out * weights).sum()

    xx = x.clone().requires_grad_()
    f(xx).backward()
    h = 1e-2
    numeric = torch.zeros_like(x)
    flat = numeric.view(-1)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        e = e.view_as(x)
        flat[i] = (f(x + e) - f(x - e)) / (2 * h)
    torch.testing.assert_close(xx.grad, numeric, atol=2e-3, rtol=2e-3)
