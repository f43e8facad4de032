"""torch.library.opcheck on every custom op of the triton whitening backend (torch.ops.sdecor)."""

import pytest
import torch

from sdecor import reference as ref
from sdecor.ops import cov, whiten


@pytest.fixture(scope="module")
def ops():
    for op in (cov.group_cov_op, cov.group_cov_backward_op, whiten.newton_op, whiten.newton_backward_op,
               whiten.whiten_bwd_reduce_op, whiten.whiten_bwd_dx_op, whiten.whiten_train_op,
               whiten.whiten_apply_op):
        op.op                                    # registered on first use
    return torch.ops.sdecor


def _x(device, shape=(3, 8, 5, 5), channels_last=False):
    x = torch.randn(shape, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _stats(x, d, T=3):
    mean, cov = ref.group_cov(x, d)
    return mean, cov, ref.whitening_matrix(cov, "newton", 1e-5, T)


# opcheck's default tests: schema, autograd registration, fake tensor, aot dispatch (static/dynamic)
def _check(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_cov(ops, device, channels_last):
    _check(ops.group_cov, (_x(device, channels_last=channels_last).requires_grad_(), 4))


def test_group_cov_backward(ops, device):
    x = _x(device)
    mean, cov, _ = _stats(x, 4)
    _check(ops.group_cov_backward, (x, mean, torch.randn_like(cov), torch.randn_like(mean)))


def test_newton(ops, device):
    _, cov, _ = _stats(_x(device), 4)
    _check(ops.newton, (cov.clone().requires_grad_(), 1e-5, 3))


def test_newton_backward(ops, device):
    _, cov, _ = _stats(_x(device), 4)
    _check(ops.newton_backward, (cov, torch.randn_like(cov), 1e-5, 3))


@pytest.mark.parametrize("method", ["newton", "zca"])
def test_whiten_train(ops, device, method):
    x = _x(device, (3, 8, 4, 4)).requires_grad_()
    w = torch.randn(8, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    _check(ops.whiten_train, (x, 4, method, 1e-5, 3, w, b))


@pytest.mark.parametrize("method", ["newton", "zca"])
def test_whiten_train_smaller_last_group(ops, device, method):
    # C = 6 in groups of 4: a last group of 2 channels (GroupWhitening's last_group="smaller")
    x = _x(device, (3, 6, 3, 3)).requires_grad_()
    w = torch.randn(6, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    _check(ops.whiten_train, (x, 4, method, 1e-5, 3, w, b))


def test_newton_backward_smaller_last_group(ops, device):
    mean, cov = ref.group_cov(_x(device, (3, 6, 3, 3)), 4, last_group="smaller")
    _check(ops.newton_backward, (cov, torch.randn_like(cov), 1e-5, 3, None, 6))


def test_whiten_train_no_affine(ops, device):
    _check(ops.whiten_train, (_x(device, (4, 8)).requires_grad_(), 4, "newton", 1e-5, 2, None, None))


def test_whiten_apply(ops, device):
    x = _x(device, channels_last=True)
    mean, _, wm = _stats(x, 4)
    w = torch.randn(8, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    _check(ops.whiten_apply, (x.requires_grad_(), mean.requires_grad_(), wm.requires_grad_(), w, b))


def test_whiten_bwd_reduce(ops, device):
    x = _x(device)
    mean, _, _ = _stats(x, 4)
    _check(ops.whiten_bwd_reduce, (torch.randn_like(x), x, mean))


def test_whiten_bwd_dx(ops, device):
    x = _x(device)
    mean, cov, wm = _stats(x, 4)
    _check(ops.whiten_bwd_dx, (torch.randn_like(x), x, mean, torch.randn_like(cov), wm, torch.randn_like(mean)))
