"""Whitening and the correlation penalty stay finite wherever BatchNorm does (torch backend).

fp32 sums of squares overflow at |x| ~ 1e19 and bf16 inputs reach 3e38; the torch backend works in
units of a per-group power of two. Whitening is exactly equivariant under a power-of-two scale s when
eps scales with s^2: y(s x; eps) = y(x; eps / s^2) and dx(s x) = dx(x) / s, so a float64 reference on
the unscaled input is the oracle at any scale.
"""

import pytest
import torch
import torch.nn.functional as F

import sdecor
from sdecor import reference as ref
from sdecor.testing import assert_close

EPS = 1e-5
# 2^63 ~ 9e18 and 2^66 ~ 7e19 bracket the fp32 overflow of x^2 sums; 2^100 ~ 1e30; 2^124 ~ 2e37
FP32_EXPONENTS = [63, 66, 100, 124]
BF16_EXPONENTS = [96, 100]                   # BatchNorm's bf16 output is NaN at 2^124
CASES = ([(torch.float32, k) for k in FP32_EXPONENTS] + [(torch.bfloat16, k) for k in BF16_EXPONENTS])


@pytest.fixture(autouse=True)
def torch_backend():
    with sdecor.use_backend("torch"):
        yield


def _base(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.7).to(dtype)


def _reference(base, d, method, k, weight=None, bias=None):
    """y and (dx, dweight, dbias) for an upstream gradient gy, in float64 on the unscaled input with
    eps / 4^k: the values of the op at x = 2^k base (dx scaled back by 2^k)."""
    x = base.double().requires_grad_()
    y = ref.group_whiten(x, d, method, EPS / 4.0 ** k, 5)
    inputs = [x]
    if weight is not None:
        w = weight.double().requires_grad_()
        b = bias.double().requires_grad_()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = y * w.reshape(shape) + b.reshape(shape)
        inputs += [w, b]
    return y, inputs


@pytest.mark.parametrize("method", ["newton", "zca"])
@pytest.mark.parametrize("dtype, k", CASES, ids=[f"{str(c[0])[6:]}-2^{c[1]}" for c in CASES])
def test_group_whiten_finite_and_exact_at_scale(method, dtype, k):
    base = _base((6, 12, 5, 5), dtype)
    x = (base * 2.0 ** k).requires_grad_()                         # exact: a power of two
    assert torch.isfinite(x).all()
    # the premise: BatchNorm's output is finite for this input
    assert torch.isfinite(F.batch_norm(x.detach(), None, None, training=True)).all()
    y = sdecor.group_whiten(x, 4, method, EPS)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (dx,) = torch.autograd.grad(y, x, gy)
    assert y.dtype == dtype and torch.isfinite(y).all() and torch.isfinite(dx).all()

    y_ref, (x_ref,) = _reference(base, 4, method, k)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, gy.double())
    assert_close(y, y_ref)
    assert_close(dx * 2.0 ** k, dx_ref)                            # dx(2^k base) = dx(base) / 2^k


@pytest.mark.parametrize("method", ["newton", "zca"])
@pytest.mark.parametrize("k", [66, 124])
def test_group_whitening_module_at_scale(method, k):
    """Affine module in training (weight, bias gradients; running statistics finite: mean ~ 2^k,
    W ~ 2^-k) and in eval with those statistics (momentum 1: eval equals training)."""
    base = _base((8, 8, 4, 4), torch.float32, seed=2)
    x = (base * 2.0 ** k).requires_grad_()
    layer = sdecor.GroupWhitening(8, 4, method=method, eps=EPS, momentum=1.0)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, 8))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, 8))
    y = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    dx, dw, db = torch.autograd.grad(y, (x, layer.weight, layer.bias), gy)
    y_ref, (x_ref, w_ref, b_ref) = _reference(base, 4, method, k, layer.weight.detach(), layer.bias.detach())
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (x_ref, w_ref, b_ref), gy.double())
    assert_close(y, y_ref)
    assert_close(dx * 2.0 ** k, dx_ref)
    assert_close(dw, dw_ref)
    assert_close(db, db_ref)

    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_wm).all()
    mean_ref, cov_ref = ref.group_cov(base.double(), 4)
    assert_close(layer.running_mean.reshape(2, 4) / 2.0 ** k, mean_ref)
    assert_close(layer.running_wm * 2.0 ** k, ref.whitening_matrix(cov_ref, method, EPS / 4.0 ** k))
    layer.eval()
    with torch.no_grad():
        assert_close(layer(x.detach()), y.detach())


@pytest.mark.parametrize("method", ["newton", "zca"])
def test_groups_of_every_magnitude_in_one_tensor(method):
    """A group at 2^124, a group with a dead (constant) channel at 2^100, a group at 1e-30 and a group
    at unit scale: every output and gradient finite, and the groups are independent of each other."""
    x = _base((6, 16, 3, 3), torch.float32, seed=4)
    x[:, 0:4] *= 2.0 ** 124
    x[:, 4:8] *= 2.0 ** 100
    x[:, 5] = 7.0 * 2.0 ** 100                                        # constant over the batch
    x[:, 8:12] *= 1e-30
    x.requires_grad_()
    y = sdecor.group_whiten(x, 4, method, EPS)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    for lo, hi, k in [(0, 4, 124), (12, 16, 0)]:
        y_ref, _ = _reference(x.detach()[:, lo:hi] / 2.0 ** k, 4, method, k)
        assert_close(y[:, lo:hi], y_ref)
    # the tiny group is dominated by eps: y = W (x - mean) with W ~ eps^-1/2
    y_tiny = ref.group_whiten(x.detach()[:, 8:12].double(), 4, method, EPS, 5)
    assert_close(y[:, 8:12], y_tiny)


@pytest.mark.parametrize("dtype, k", CASES + [(torch.float32, 127)],
                         ids=[f"{str(c[0])[6:]}-2^{c[1]}" for c in CASES] + ["float32-2^127"])
@pytest.mark.parametrize("api", ["sdecor", "reference"])
def test_corr_penalty_is_scale_free(dtype, k, api):
    decorrelation_loss = sdecor.decorrelation_loss if api == "sdecor" else ref.decorrelation_loss
    base = _base((32, 8), dtype, seed=5) / 4                          # |base| < 2: 2^127 base is finite
    base[:, 1] += base[:, 0]                                          # correlated pair
    unit = base.clone().requires_grad_()
    big = (base * 2.0 ** k).requires_grad_()
    assert torch.isfinite(big).all()
    l_unit = decorrelation_loss(unit, 4, "corr")
    l_big = decorrelation_loss(big, 4, "corr")
    assert l_big.dtype == l_unit.dtype and torch.isfinite(l_big)
    assert_close(l_big, l_unit)
    (g_unit,) = torch.autograd.grad(l_unit, unit)
    (g_big,) = torch.autograd.grad(l_big, big)
    assert torch.isfinite(g_big).all()
    assert_close(g_big * 2.0 ** k, g_unit)
