"""The torch backend of group whitening (sdecor.ops.whiten_torch: torch ops, hand-written backward)
against the reference composition: y, the batch statistics and every gradient."""

import pytest
import torch

import sdecor
from sdecor import reference as ref
from sdecor.testing import assert_close


def affine_shape(x):
    return (1, -1) + (1,) * (x.dim() - 2)



FUSED_CASES = [  # (shape, d, method, T)
    ((3, 48, 7, 7), 16, "newton", 5),
    ((3, 48, 7, 7), 16, "zca", 5),
    ((3, 48, 7, 7), 16, "newton", 60),
    ((5, 12), 4, "newton", 5),
    ((5, 12), 4, "zca", 5),
    ((2, 24, 3, 2, 3), 8, "newton", 3),
    ((2, 24, 3, 2, 3), 8, "zca", 3),
    ((4, 6, 9), 1, "newton", 5),
    ((4, 6, 9), 1, "zca", 5),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape, d, method, T", FUSED_CASES,
                         ids=[f"{len(c[0])}d-C{c[0][1]}-d{c[1]}-{c[2]}{c[3]}" for c in FUSED_CASES])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_torch_backend_matches_reference(shape, d, method, T, dtype, affine):
    from sdecor.ops.whiten_torch import train_torch as group_whiten_train_torch
    C = shape[1]
    x = (torch.randn(shape, dtype=dtype) * 1.5 + 0.7).requires_grad_()
    weight = torch.randn(C, dtype=dtype, requires_grad=True) if affine else None
    bias = torch.randn(C, dtype=dtype, requires_grad=True) if affine else None
    y, mean, wm = group_whiten_train_torch(x, d, method, 1e-4, T, weight, bias)
    r_mean, r_cov = ref.group_cov(x.detach(), d)
    assert_close(mean, r_mean)
    assert_close(wm, ref.whitening_matrix(r_cov, method, 1e-4, T))
    assert not mean.requires_grad and not wm.requires_grad
    y_ref = ref.group_whiten(x, d, method, 1e-4, T)
    if affine:
        y_ref = y_ref * weight.reshape(affine_shape(x)) + bias.reshape(affine_shape(x))
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    inputs = (x, weight, bias) if affine else (x,)
    for got, want in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_ref, inputs, g)):
        assert_close(got, want)


@pytest.fixture
def torch_backend():
    with sdecor.use_backend("torch"):
        yield


def test_torch_backend_argument_checks(torch_backend):
    # the checks run once, in the public function, before the torch backend is reached
    from sdecor.ops.whiten import group_whiten_train as group_whiten_train_torch
    x = torch.randn(4, 8, 3)
    with pytest.raises(ValueError, match="weight must have shape"):
        group_whiten_train_torch(x, 4, weight=torch.ones(1, 8, 1))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        group_whiten_train_torch(x, 4, bias=[0.0] * 8)
    with pytest.raises(ValueError, match="valid group sizes"):
        group_whiten_train_torch(x, 3)
    with pytest.raises(ValueError, match="method"):
        group_whiten_train_torch(x, 4, method="cholesky")
