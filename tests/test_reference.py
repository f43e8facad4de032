"""The reference pinned to independent oracles: float64 numpy, identities of the whitening matrix,
finite differences (gradcheck) and closed-form derivatives."""

import math

import numpy as np
import pytest
import torch

from sdecor import reference as ref
from sdecor._zca import sym

SHAPES = {
    "2d-N5-C8": (5, 8),
    "3d-N3-C12-L7": (3, 12, 7),
    "4d-N3-C48-7x7": (3, 48, 7, 7),
    "4d-N2-C32-4x4": (2, 32, 4, 4),
    "5d-N2-C8-3x2x2": (2, 8, 3, 2, 2),
}


def numpy_group_cov(x: np.ndarray, d: int):
    N, C = x.shape[:2]
    G = C // d
    feats = np.moveaxis(x, 1, 0).reshape(C, -1)                 # (C, m)
    means, covs = [], []
    for g in range(G):
        xg = feats[g * d:(g + 1) * d]
        mu = xg.mean(axis=1)
        xc = xg - mu[:, None]
        means.append(mu)
        covs.append(xc @ xc.T / xg.shape[1])
    return np.stack(means), np.stack(covs)


def random_cov(G, d, dtype=torch.float64, cond=10.0):
    """SPD matrices with eigenvalues spread over [1/cond, 1]."""
    q, _ = torch.linalg.qr(torch.randn(G, d, d, dtype=dtype))
    lam = torch.logspace(0, -math.log10(cond), d, dtype=dtype).expand(G, d)
    return (q * lam.unsqueeze(-2)) @ q.transpose(-1, -2)


# ---------------------------------------------------------------------------------------------------
# group_cov


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_group_cov_matches_numpy_float64(shape, dtype):
    d = 4
    x = torch.randn(shape, dtype=torch.float64) * 3 + torch.arange(shape[1], dtype=torch.float64).view(
        1, -1, *([1] * (len(shape) - 2)))
    mean, cov = ref.group_cov(x.to(dtype), d)
    m_np, c_np = numpy_group_cov(x.numpy(), d)
    assert mean.dtype == dtype and cov.dtype == dtype
    assert mean.shape == (shape[1] // d, d) and cov.shape == (shape[1] // d, d, d)
    t = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(mean.double().numpy(), m_np, **t)
    np.testing.assert_allclose(cov.double().numpy(), c_np, **t)


def test_group_cov_half_input_accumulates_in_fp32():
    x = torch.randn(4, 16, 5, 5)
    mean, cov = ref.group_cov(x.half(), 8)
    assert mean.dtype == torch.float32 and cov.dtype == torch.float32
    _, c_np = numpy_group_cov(x.half().double().numpy(), 8)
    np.testing.assert_allclose(cov.numpy(), c_np, atol=1e-5, rtol=1e-4)


def test_group_cov_channels_last_equals_contiguous():
    x = torch.randn(3, 16, 5, 6)
    a = ref.group_cov(x, 8)
    b = ref.group_cov(x.contiguous(memory_format=torch.channels_last), 8)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------
# whitening_matrix


@pytest.mark.parametrize("d", [1, 2, 3, 16, 33])
def test_zca_whitens(d):
    cov = random_cov(3, d, cond=1e3)
    eps = 1e-5
    w = ref.whitening_matrix(cov, "zca", eps=eps)
    se = cov + eps * torch.eye(d, dtype=cov.dtype)
    eye = torch.eye(d, dtype=cov.dtype).expand(3, d, d)
    torch.testing.assert_close(w @ se @ w, eye, atol=1e-9, rtol=0)
    torch.testing.assert_close(w, w.transpose(-1, -2))


def test_zca_never_nan_for_singular_and_negative_eigenvalues():
    # A rank-1 "covariance" with a slightly negative eigenvalue from rounding: clamped at eps.
    v = torch.randn(1, 6, 1, dtype=torch.float64)
    cov = v @ v.transpose(-1, -2) - 1e-3 * torch.eye(6, dtype=torch.float64)
    w = ref.whitening_matrix(cov, "zca", eps=1e-5)
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("d", [4, 16])
def test_newton_large_T_approaches_zca(d):
    cov = random_cov(2, d, cond=20.0)
    zca = ref.whitening_matrix(cov, "zca", eps=1e-5)
    errs = [(ref.whitening_matrix(cov, "newton", eps=1e-5, T=T) - zca).abs().max().item() for T in (1, 3, 40)]
    assert errs[0] > errs[1] > 1e-6 * errs[0]      # a few steps: still far, getting closer
    assert errs[2] < 1e-10


@pytest.mark.parametrize("T", [1, 5, 25, 40, 100])
def test_newton_stable_for_any_T(T):
    # Eigenvalues of Sn spread over [~1e-2, 1]: the uncoupled recurrence diverges here for T >~ 25.
    cov = random_cov(4, 16, cond=50.0)
    w = ref.whitening_matrix(cov, "newton", eps=1e-5, T=T)
    assert torch.isfinite(w).all()
    zca = ref.whitening_matrix(cov, "zca", eps=1e-5)
    if T >= 40:
        torch.testing.assert_close(w, zca, atol=1e-9, rtol=0)
    else:
        assert (w - zca).abs().max() < zca.abs().max()   # bounded: no divergence


def test_newton_equals_iternorm_recurrence_for_small_T():
    """The coupled iteration computes IterNorm's P_{k+1} = 1.5 P_k - 0.5 P_k^3 Sn (while stable)."""
    cov = random_cov(2, 8, cond=10.0)
    eps = 1e-5
    se = cov + eps * torch.eye(8, dtype=cov.dtype)
    tr = se.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    sn = se / tr
    p = torch.eye(8, dtype=cov.dtype).expand_as(se)
    for _ in range(7):
        p = 1.5 * p - 0.5 * p @ p @ p @ sn
    torch.testing.assert_close(ref.whitening_matrix(cov, "newton", eps=eps, T=7), p / tr.sqrt(),
                               atol=1e-12, rtol=1e-10)


def test_newton_single_step_closed_form():
    cov = random_cov(1, 5)
    se = cov + 1e-5 * torch.eye(5, dtype=cov.dtype)
    tr = se.diagonal(dim1=-2, dim2=-1).sum()
    expected = (1.5 * torch.eye(5, dtype=cov.dtype) - 0.5 * se / tr) / tr.sqrt()
    torch.testing.assert_close(ref.whitening_matrix(cov, "newton", T=1), expected)


def test_zca_backward_at_scaled_identity_matches_closed_form():
    """At cov = c I: W = (c+eps)^-1/2 I and dL/dcov = -1/2 (c+eps)^-3/2 sym(G); eigh's own backward
    divides by zero here (all eigenvalues repeat)."""
    c, eps, d = 2.5, 1e-5, 6
    cov = (c * torch.eye(d, dtype=torch.float64)).expand(2, d, d).clone().requires_grad_(True)
    w = ref.whitening_matrix(cov, "zca", eps=eps)
    torch.testing.assert_close(w.detach(), (c + eps) ** -0.5 * torch.eye(d, dtype=torch.float64).expand(2, d, d))
    G = torch.randn(2, d, d, dtype=torch.float64)
    (w * G).sum().backward()
    expected = -0.5 * (c + eps) ** -1.5 * 0.5 * (G + G.transpose(-1, -2))
    assert torch.isfinite(cov.grad).all()
    torch.testing.assert_close(cov.grad, expected, atol=1e-12, rtol=1e-10)


def test_zca_backward_equals_eigh_autograd_for_distinct_eigenvalues():
    cov = random_cov(3, 7, cond=100.0).requires_grad_(True)
    G = torch.randn(3, 7, 7, dtype=torch.float64)
    # eps must be > 0; 1e-300 leaves the float64 eigenvalues (>= ~1e-2) and the exact ZCA unchanged.
    (ref.whitening_matrix(cov, "zca", eps=1e-300) * G).sum().backward()
    ours = cov.grad.clone()
    cov.grad = None
    lam, U = torch.linalg.eigh(cov)
    (((U * lam.rsqrt().unsqueeze(-2)) @ U.transpose(-1, -2)) * G).sum().backward()
    # eigh's gradient is the symmetric one up to the symmetric part.
    torch.testing.assert_close(ours, sym(cov.grad), atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("method", ["zca", "newton"])
def test_whitening_matrix_gradcheck(method):
    cov = random_cov(2, 5, cond=5.0).requires_grad_(True)
    # gradcheck perturbs one entry at a time, breaking symmetry: feed a symmetrised input.
    fn = lambda c: ref.whitening_matrix(sym(c), method, eps=1e-3, T=6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (cov,), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# group_whiten


@pytest.mark.parametrize("method", ["zca", "newton"])
@pytest.mark.parametrize("shape,d", [((6, 6), 3), ((4, 4, 3), 2), ((3, 4, 2, 2), 4), ((2, 4, 2, 1, 2), 2)],
                         ids=["2d", "3d", "4d", "5d"])
def test_group_whiten_gradcheck(method, shape, d):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    fn = lambda t: ref.group_whiten(t, d, method=method, eps=1e-3, T=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


def test_group_whiten_zca_output_is_white():
    x = torch.randn(64, 32, 3, 3, dtype=torch.float64) @ torch.randn(3, 3, dtype=torch.float64)
    x = torch.einsum("ij,njhw->nihw", torch.randn(32, 32, dtype=torch.float64), x)
    y = ref.group_whiten(x, 16, method="zca", eps=1e-300)   # eps > 0, too small to change float64 ZCA
    mean, cov = ref.group_cov(y, 16)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-10, rtol=0)
    torch.testing.assert_close(cov, torch.eye(16, dtype=torch.float64).expand(2, 16, 16), atol=1e-8, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_group_whiten_keeps_dtype_shape_and_memory_format(dtype):
    x = torch.randn(3, 16, 4, 5).to(dtype).contiguous(memory_format=torch.channels_last)
    y = ref.group_whiten(x, 8)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    y3 = ref.group_whiten(torch.randn(2, 8, 2, 3, 2).contiguous(memory_format=torch.channels_last_3d), 4)
    assert y3.is_contiguous(memory_format=torch.channels_last_3d)


# ---------------------------------------------------------------------------------------------------
# decorrelation_loss


def test_decorrelation_loss_decov_and_corr_against_numpy():
    x = torch.randn(7, 12, 5, dtype=torch.float64)
    x[:, 1] += 0.8 * x[:, 0]
    _, covs = numpy_group_cov(x.numpy(), 4)
    decov = np.mean([0.5 * ((c ** 2).sum() - (np.diag(c) ** 2).sum()) for c in covs])
    corr = np.mean([((c / np.sqrt(np.outer(np.diag(c), np.diag(c))) - np.eye(4)) ** 2).sum() / 12 for c in covs])
    assert ref.decorrelation_loss(x, 4, "decov").item() == pytest.approx(decov, rel=1e-12)
    assert ref.decorrelation_loss(x, 4, "corr").item() == pytest.approx(corr, rel=1e-12)


def test_decorrelation_loss_zero_for_white_features_and_differentiable():
    # eps must be > 0; 1e-300 is too small to change the float64 exact ZCA (so the output stays white).
    x = ref.group_whiten(torch.randn(50, 8, dtype=torch.float64), 4, method="zca", eps=1e-300)
    assert ref.decorrelation_loss(x, 4).item() < 1e-20
    z = torch.randn(10, 8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ref.decorrelation_loss(t, 4, "corr"), (z,))


# ---------------------------------------------------------------------------------------------------
# argument errors named in the design contract


def test_group_size_must_divide_channels():
    with pytest.raises(ValueError, match=r"C=48.*\[1, 2, 3, 4, 6, 8, 12, 16, 24, 48\]"):
        ref.group_cov(torch.randn(2, 48, 3), 10)
    with pytest.raises(ValueError, match="d=5"):
        ref.group_whiten(torch.randn(2, 8, 3), 5)


@pytest.mark.parametrize("shape", [(1, 8), (1, 8, 1), (1, 8, 1, 1)])
def test_training_statistics_need_two_values(shape):
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref.group_cov(torch.randn(shape), 4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref.group_whiten(torch.randn(shape), 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="svd"), "method"),
    (dict(T=0), "T"), (dict(T=101), "T"), (dict(T=2.5), "T"),
    (dict(eps=-1.0), "eps"),
])
def test_whitening_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ref.whitening_matrix(torch.eye(3).expand(2, 3, 3), **kwargs)
    with pytest.raises(ValueError, match=match):
        ref.group_whiten(torch.randn(4, 6), 3, **kwargs)


def test_input_shape_and_type_errors():
    with pytest.raises(ValueError, match="x must have shape"):
        ref.group_cov(torch.randn(8), 4)
    with pytest.raises(ValueError, match="x must have shape"):
        ref.group_whiten(torch.randn(2, 4, 2, 2, 2, 2), 2)
    with pytest.raises(TypeError, match="floating-point"):
        ref.group_cov(torch.ones(4, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="cov must have shape"):
        ref.whitening_matrix(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="kind"):
        ref.decorrelation_loss(torch.randn(4, 4), 2, kind="l1")
    with pytest.raises(ValueError, match="at least 2 channels"):
        ref.decorrelation_loss(torch.randn(4, 4), 1, kind="corr")
