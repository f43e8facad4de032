"""Double backward (a gradient of a gradient, e.g. a gradient penalty) of every differentiable op and
module: exact on the torch backend (float64 gradgradcheck, near-repeated eigenvalues for zca, finite
differences of a gradient penalty), on the native zca path, and on the triton backend (against the
torch backend in float32: the triton ops take no float64); a third derivative of zca raises."""

import pytest
import torch
from torch.func import functional_call

import sdecor
from sdecor import _ext
from sdecor import reference as ref
from sdecor._zca import sym
from sdecor.nn import GroupWhitening
from sdecor.ops import whiten, whiten_torch
from sdecor.testing import assert_close

METHODS = ["newton", "zca"]

# (shape, d): odd sizes, 2-D to 4-D
SHAPES = [((5, 6), 3), ((3, 6, 5), 2), ((2, 4, 3, 3), 4)]
SHAPE_IDS = ["5x6-d3", "3x6x5-d2", "2x4x3x3-d4"]


def gradgradcheck(fn, inputs, **kw):
    return torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, **kw)


def spd(eigenvalues, batch=1):
    """(batch, d, d) float64 matrices with the given eigenvalues and random eigenvectors."""
    lam = torch.tensor(eigenvalues, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(batch, len(eigenvalues), len(eigenvalues), dtype=torch.float64))
    return (q * lam) @ q.transpose(-1, -2)


@pytest.fixture
def torch_backend():
    with sdecor.use_backend("torch"):
        yield


# ---------------------------------------------------------------------------------------------------
# torch backend: float64 gradgradcheck


@pytest.mark.parametrize("shape, d", SHAPES, ids=SHAPE_IDS)
def test_group_cov(torch_backend, shape, d):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: sdecor.group_cov(t, d), (x,))


@pytest.mark.parametrize("method", METHODS)
def test_whitening_matrix(torch_backend, method):
    a = spd([0.2, 0.5, 0.9, 1.0], batch=2).requires_grad_()
    # gradgradcheck perturbs one entry at a time, breaking symmetry: feed a symmetrised input
    assert gradgradcheck(lambda c: sdecor.whitening_matrix(sym(c), method, eps=1e-3, T=6), (a,))


# Se's eigenvalues (eps = 1e-12 leaves them as given): near-repeated, exactly repeated, all equal.
# Autograd through eigh divides by their differences; the ZCA backward and its derivative stay exact.
REPEATED = [[1.0, 1.0 + 1e-9, 2.0], [1.0, 1.0, 2.0], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0 + 1e-9, 3.0]]


@pytest.mark.parametrize("eigenvalues", REPEATED, ids=["near", "exact", "equal", "near-4"])
def test_whitening_matrix_zca_repeated_eigenvalues(torch_backend, eigenvalues):
    a = spd(eigenvalues).requires_grad_()
    assert gradgradcheck(lambda c: sdecor.whitening_matrix(sym(c), "zca", eps=1e-12), (a,))


def test_zca_second_order_at_scaled_identity_matches_closed_form():
    # At Se = l I, W = Se^-1/2 has second derivative D^2 f[E, E] = 2 f[l, l, l] E^2 = (3/4) l^-5/2 E^2,
    # so the gradient of <H, Df[G]> w.r.t. Se is (3/8) l^-5/2 (G H + H G) for symmetric G, H.
    lam = 2.5
    se = (lam * torch.eye(4, dtype=torch.float64)).requires_grad_()
    G, H = sym(torch.randn(4, 4, dtype=torch.float64)), sym(torch.randn(4, 4, dtype=torch.float64))
    w = ref.whitening_matrix(se, "zca", eps=1e-12)
    (g,) = torch.autograd.grad(w, se, G, create_graph=True)
    (gse,) = torch.autograd.grad(g, se, H)
    torch.testing.assert_close(gse, 0.375 * lam ** -2.5 * (G @ H + H @ G), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape, d", SHAPES, ids=SHAPE_IDS)
def test_group_whiten(torch_backend, shape, d, method):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: sdecor.group_whiten(t, d, method, eps=1e-3, T=4), (x,))


def test_group_whiten_zca_repeated_covariance_eigenvalues(torch_backend):
    # Two channels of a group identical up to 1e-9: Se has a near-repeated eigenvalue pair.
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    x[:, 1] = x[:, 0] + 1e-9 * torch.randn(6, 3, dtype=torch.float64)
    x.requires_grad_()
    assert gradgradcheck(lambda t: sdecor.group_whiten(t, 4, "zca", eps=1e-3), (x,))


@pytest.mark.parametrize("method", METHODS)
def test_group_whitening_module_train_and_eval(torch_backend, method):
    layer = GroupWhitening(6, 3, method=method, eps=1e-3, T=4, dtype=torch.float64)
    x = torch.randn(4, 6, 3, dtype=torch.float64, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(6, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, bias):
        return functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert gradgradcheck(fn, (x, weight, bias))                       # train: batch statistics
    layer.eval()                                                      # eval: the running ones
    assert gradgradcheck(fn, (x, weight, bias))


def test_group_whiten_eval_with_statistics_as_inputs(torch_backend):
    x = torch.randn(4, 6, 3, dtype=torch.float64, requires_grad=True)
    mean = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    wm = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    weight.requires_grad_()
    bias.requires_grad_()
    assert gradgradcheck(whiten.group_whiten_eval, (x, mean, wm, weight, bias))


@pytest.mark.parametrize("kind", ["decov", "corr"])
def test_decorrelation_loss(torch_backend, kind):
    x = torch.randn(5, 6, 3, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: sdecor.decorrelation_loss(t, 3, kind), (x,))


@pytest.mark.parametrize("reduce", ["mean", None], ids=["mean", "none"])
@pytest.mark.parametrize("fill", ["zero", "constant", "mean", "uniform", "baseline"])
def test_topk_mask(torch_backend, fill, reduce):
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    sal = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    baseline = torch.randn_like(x, requires_grad=True)

    def fn(x, baseline):
        gen = torch.Generator().manual_seed(7)                        # the same noise on every call
        return sdecor.topk_mask(x, sal, ratio=0.4, reduce=reduce, fill=fill, value=0.5,
                                baseline=baseline if fill == "baseline" else None, generator=gen)[0]

    assert gradgradcheck(fn, (x, baseline))


def test_ordinary_backward_keeps_the_hand_written_path(torch_backend, monkeypatch):
    # Without create_graph the hand-written backward runs, never the recomputed composition.
    def fail(*args, **kwargs):
        raise AssertionError("the double-backward path ran for an ordinary backward")

    monkeypatch.setattr(whiten_torch, "train_graph_backward", fail)
    for method in METHODS:
        x = torch.randn(4, 6, 3, requires_grad=True)
        sdecor.group_whiten(x, 3, method).square().sum().backward()
        assert torch.isfinite(x.grad).all()


def test_zca_third_derivative_raises(torch_backend):
    a = spd([0.5, 1.0, 2.0]).requires_grad_()
    w = sdecor.whitening_matrix(a, "zca")
    (g,) = torch.autograd.grad(w.sum(), a, create_graph=True)
    (g2,) = torch.autograd.grad(g.square().sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivative"):
        torch.autograd.grad(g2.sum() + a.sum(), a)                    # never a silent partial value


# ---------------------------------------------------------------------------------------------------
# a gradient penalty against finite differences


def _penalty(x, s, r, method):
    """P = ||d/dx sum(group_whiten(x * s, 4) * r)||^2, s a per-channel scale."""
    y = sdecor.group_whiten(x * s.reshape(1, -1, 1, 1), 4, method)
    (g,) = torch.autograd.grad((y * r).sum(), x, create_graph=True)
    return g.square().sum()


@pytest.mark.parametrize("method", METHODS)
def test_gradient_penalty_matches_finite_differences(torch_backend, method):
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    s = (1 + 0.5 * torch.rand(8, dtype=torch.float64)).requires_grad_()
    r = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    (dp_ds,) = torch.autograd.grad(_penalty(x, s, r, method), s)
    h = 1e-6
    fd = torch.empty_like(dp_ds)
    for i in range(8):
        e = torch.zeros_like(s)
        e[i] = h
        fd[i] = (_penalty(x, s.detach() + e, r, method) - _penalty(x, s.detach() - e, r, method)) / (2 * h)
    # central differences with h = 1e-6 in float64: error ~h^2 |P'''| + 1e-16 |P| / h, ~1e-9 here
    torch.testing.assert_close(dp_ds, fd, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# native backend: zca through sdecor's Jacobi eigensolver


@pytest.mark.skipif(not _ext.available(), reason=f"sdecor._C is not built: {_ext.error()}")
@pytest.mark.parametrize("eigenvalues", [[0.2, 0.5, 0.9, 1.0]] + REPEATED,
                         ids=["distinct", "near", "exact", "equal", "near-4"])
def test_native_whitening_matrix_zca(eigenvalues):
    a = spd(eigenvalues, batch=2).requires_grad_()
    with sdecor.use_backend("native"):
        assert gradgradcheck(lambda c: sdecor.whitening_matrix(sym(c), "zca", eps=1e-12), (a,))


# ---------------------------------------------------------------------------------------------------
# triton backend: the same second derivatives as the torch backend


def _second_order(backend, fn, inputs):
    """Gradients of P = sum_i ||d/d input_i <r, fn(inputs)>||^2 w.r.t. the inputs and r (r random,
    one per floating-point output): a double backward through every input and the grad_outputs."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    with sdecor.use_backend(backend):
        out = fn(*inputs)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.is_floating_point()]
        gen = torch.Generator(device=outs[0].device).manual_seed(1)
        rs = [torch.randn(o.shape, generator=gen, device=o.device).requires_grad_() for o in outs]
        grads = torch.autograd.grad(sum((o * r).sum() for o, r in zip(outs, rs)), inputs, create_graph=True,
                                    allow_unused=True)
        p = sum(g.square().sum() for g in grads if g is not None)
        every = inputs + rs
        second = torch.autograd.grad(p, every, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(every, second)]


def _triton_cases(device):
    x = torch.randn(3, 8, 5, device=device)
    a = torch.randn(2, 4, 6, device=device)
    w, b = 1 + 0.2 * torch.randn(8, device=device), 0.1 * torch.randn(8, device=device)
    mean, wm = torch.randn(2, 4, device=device), torch.randn(2, 4, 4, device=device)
    return {
        "group_cov": (lambda x: sdecor.group_cov(x, 4), (x,)),
        "decov": (lambda x: sdecor.decorrelation_loss(x, 4), (x,)),
        "wm-newton": (lambda a: sdecor.whitening_matrix(a @ a.mT / 6, "newton", 1e-3), (a,)),
        "wm-zca": (lambda a: sdecor.whitening_matrix(a @ a.mT / 6, "zca", 1e-3), (a,)),
        "whiten-newton": (lambda x: sdecor.group_whiten(x, 4, "newton"), (x,)),
        "whiten-zca": (lambda x: sdecor.group_whiten(x, 4, "zca"), (x,)),
        "train-newton-affine": (lambda x, w, b: whiten.group_whiten_train(x, 4, "newton", 1e-5, 5, w, b)[0],
                                (x, w, b)),
        "train-zca-affine": (lambda x, w, b: whiten.group_whiten_train(x, 4, "zca", 1e-5, 5, w, b)[0], (x, w, b)),
        "eval": (whiten.group_whiten_eval, (x, mean, wm, w, b)),
        "topk-mean": (lambda x: sdecor.topk_mask(x.reshape(3, 2, 4, 5), x.reshape(3, 2, 4, 5).cos().detach(),
                                                 ratio=0.4, fill="mean")[0], (x,)),
        "topk-baseline": (lambda x, bl: sdecor.topk_mask(x, x.sin().detach(), ratio=0.4, reduce=None,
                                                         fill="baseline", baseline=bl)[0], (x, x.flip(0))),
    }


TRITON_CASES = list(_triton_cases("cpu"))


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_torch(device, case):
    fn, inputs = _triton_cases(device)[case]
    got = _second_order("triton", fn, inputs)
    want = _second_order("torch", fn, inputs)
    for g, w in zip(got, want):
        assert_close(g, w)                                            # float32 tolerance (testing.py)


def test_triton_topk_uniform(device):
    # The uniform fill draws other noise on triton than on torch: check the double backward against
    # the Jacobian J of x_masked (x_masked is linear in x for fixed noise and min/max positions):
    # P = ||J^T r||^2 gives dP/dx = 0 and dP/dr = 2 J J^T r.
    x = torch.randn(2, 3, 4, 2, device=device, requires_grad=True)
    sal = torch.randn(2, 3, 4, 2, device=device)
    with sdecor.use_backend("triton"):
        gen = torch.Generator(device).manual_seed(5)
        out = sdecor.topk_mask(x, sal, ratio=0.4, fill="uniform", generator=gen)[0]
        r = torch.randn_like(out, requires_grad=True)
        (g,) = torch.autograd.grad(out, x, r, create_graph=True)
        dp_dx, dp_dr = torch.autograd.grad(g.square().sum(), (x, r), allow_unused=True)
        eye = torch.eye(out.numel(), device=device).reshape(-1, *out.shape)
        # row i: d out_i / dx
        jac = torch.stack([torch.autograd.grad(out, x, e, retain_graph=True)[0].reshape(-1) for e in eye])
    assert dp_dx is None or torch.count_nonzero(dp_dx) == 0
    assert_close(dp_dr.reshape(-1), 2 * jac @ (jac.T @ r.detach().reshape(-1)))
