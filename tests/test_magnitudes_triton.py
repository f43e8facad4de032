"""The triton backend of group whitening at extreme magnitudes: finite and correct up to |x| ~ 3e38.

Unscaled, the fp32 statistics overflow from |x| ~ 1e19 (one product x x^T ~ 1e38); the kernels work in
units of a per-group power-of-two scale c (1 for |x - shift| < 1). Checked here, in fp32:

- unchanged fast path: with c = 1, and for Newton at any scale where nothing overflows, the training
  forward and backward equal bit for bit the composition of the unscaled kernels (the code before
  the scale), and group_cov is exactly equivariant under powers of two;
- exactness of the scaling: Newton's y, W and dx at x * 2^k equal those at x (times 2^-k) bit for bit;
- extreme scales (1e19, 1e30, 3e37), and groups of different scales with a constant group in one
  tensor: y, W, dx and the affine gradients finite and equal to the float64 reference within the fp32
  tolerances.

bf16 input is not covered here: the Triton interpreter (CPU tests) has no bf16 kernels; the torch
backend's tests cover bf16 magnitudes, and the bf16 variants of the kernels compile in
test_static_compile. Shapes stay small for the interpreter.
"""

import pytest
import torch

import sdecor
from sdecor import reference as ref
from sdecor._layout import samples_per_channel
from sdecor._zca import shifted_cov, zca_backward, zca_from_eigh
from sdecor.ops import cov as cov_ops
from sdecor.ops import whiten as wh
from sdecor.ops import whiten_native
from sdecor.testing import tol

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EPS = 1e-5
T = 4


def _grad_out(shape, device):
    """A fixed, non-trivial output gradient."""
    n = torch.Size(shape).numel()
    return torch.linspace(-1.0, 1.0, n, device=device).reshape(shape).sin()


def _triton_train(x, d, method, eps=EPS, weight=None, bias=None):
    """(y, mean, wm, dx, dweight, dbias) of the triton training path."""
    xx = x.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_() if weight is not None else None
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    with sdecor.use_backend("triton"):
        y, mean, wm = wh.group_whiten_train(xx, d, method, eps, T, w, b)
    y.backward(_grad_out(y.shape, y.device))
    return (y.detach(), mean, wm, xx.grad, w.grad if w is not None else None,
            b.grad if b is not None else None)


def _reference_train(x, d, method, weight=None, bias=None):
    """The same in float64 with the reference (autograd through it)."""
    xx = x.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_() if weight is not None else None
    b = bias.detach().double().requires_grad_() if bias is not None else None
    mean, cov = ref.group_cov(xx, d)
    wm = ref.whitening_matrix(cov, method, EPS, T)
    y = ref.apply_whitening(xx, mean, wm)
    shape = (1, -1) + (1,) * (xx.dim() - 2)
    y = y * (w.view(shape) if w is not None else 1) + (b.view(shape) if b is not None else 0)
    y.backward(_grad_out(y.shape, y.device).double())
    return (y.detach(), mean.detach(), wm.detach(), xx.grad, w.grad if w is not None else None,
            b.grad if b is not None else None)


def _unscaled_composition(x, d, method, weight, bias):
    """The training forward and backward composed from the kernels without a scale, as the triton
    path computed them before the scale: group_cov, Newton-Schulz of cov + eps I (or zca from eigh),
    apply; reduce, Newton backward (or the stable zca backward), dx."""
    G = x.shape[1] // d
    m = samples_per_channel(x)
    dy = _grad_out(x.shape, x.device)
    with sdecor.use_backend("triton"):
        mean, cov = cov_ops.group_cov_op(x, d)
        if method == "newton":
            w = wh.newton_op(cov, EPS, T)
        else:
            evals, evecs = whiten_native.eigh_for(x.device)(shifted_cov(cov, EPS))
            w = zca_from_eigh(evals, evecs, EPS)
        y = wh.whiten_apply_op(x, mean, w, weight, bias)
        D, s = wh.whiten_bwd_reduce_op(dy, x, mean)
        gamma = weight.reshape(G, d)
        grad_w = gamma.unsqueeze(-1) * D
        if method == "newton":
            grad_se = wh.newton_backward_op(cov, grad_w, EPS, T)
        else:
            grad_se = zca_backward(grad_w, evals, evecs, EPS)
        a = (grad_se + grad_se.transpose(-1, -2)) / m
        b = w.transpose(-1, -2) * gamma.unsqueeze(-2)
        v = -(b @ s.unsqueeze(-1)).squeeze(-1) / m
        dx = wh.whiten_bwd_dx_op(dy, x, mean, a, b, v)
    grad_weight = (D * w).sum(-1).reshape(-1)
    return y, mean, w, dx, grad_weight, s.reshape(-1)


def _assert_equal(got, want, names):
    for name, a, b in zip(names, got, want):
        assert torch.equal(a, b), f"{name}: not bit-identical (max diff {(a - b).abs().max().item():.3e})"


NAMES = ["y", "mean", "wm", "grad x", "grad weight", "grad bias"]


# ---------------------------------------------------------------------------------------------------
# the fast path is unchanged


@pytest.mark.parametrize("method,amplitude", [("newton", 0.1), ("zca", 0.1), ("newton", 3.0),
                                              ("newton", 1000.0)],
                         ids=["newton-x0.1", "zca-x0.1", "newton-x3", "newton-x1000"])
@pytest.mark.parametrize("d", [4, 16])
def test_unscaled_path_bit_identical(method, amplitude, d, device):
    """|x - shift| < 1 (amplitude 0.1): scale 1, every factor is 1. Newton at larger amplitudes: the
    scale is an exact power of two and Newton-Schulz homogeneous, so nothing changes either (zca's
    eigensolver is not scale-equivariant bit for bit: only c = 1 is exact there)."""
    x = torch.randn(6, 2 * d, 5, device=device) * amplitude + 0.05
    if amplitude < 1:
        # the scale is 1 only while every |x - shift| < 1
        first = x[:1, :, :1]
        assert (x - first).abs().max() < 1
    weight = torch.randn(2 * d, device=device)
    bias = torch.randn(2 * d, device=device)
    got = _triton_train(x, d, method, EPS, weight, bias)
    want = _unscaled_composition(x, d, method, weight, bias)
    _assert_equal(got, want, NAMES)


@pytest.mark.parametrize("k", [20, 63, 100])
def test_group_cov_exact_under_powers_of_two(k, device):
    """group_cov(x * 2^k) = (mean * 2^k, cov * 4^k) bit for bit while cov * 4^k is finite (at k = 63
    the unscaled sums of 30 products ~2^126 overflowed), and cov is inf where the true value exceeds
    fp32 (k = 100); the mean stays exact."""
    x = torch.randn(5, 8, 6, device=device) * 0.7 + 0.3
    with sdecor.use_backend("triton"):
        mean, cov = sdecor.group_cov(x, 4)
        mean_k, cov_k = sdecor.group_cov(x * 2.0 ** k, 4)
    assert torch.equal(mean_k, mean * 2.0 ** k)
    want = cov.double() * 4.0 ** k
    fits = want.abs() <= torch.finfo(torch.float32).max
    assert torch.equal(cov_k[fits].double(), want[fits])
    assert torch.isinf(cov_k[~fits]).all()
    assert bool(fits.all()) == (k <= 63)


# ---------------------------------------------------------------------------------------------------
# exact scaling


@pytest.mark.parametrize("k", [63, 100])
@pytest.mark.parametrize("d", [4, 16, 40])
def test_newton_exact_under_powers_of_two(k, d, device):
    """Newton at x * 2^k (|x| ~ 1e19 and 1e30) is the unit-scale result bit for bit: y equal, W and dx
    times 2^-k, the affine gradients equal. eps is below the rounding of the covariance's diagonal in
    both (1e-5 at scale 2^k, 1e-30 at scale 1), so both runs whiten the same matrix."""
    x = torch.randn(8, d, 3, device=device) * 2.0 - 0.5
    weight = torch.randn(d, device=device)
    bias = torch.randn(d, device=device)
    base = _triton_train(x, d, "newton", 1e-30, weight, bias)
    big = _triton_train(x * 2.0 ** k, d, "newton", EPS, weight, bias)
    y, mean, wm, dx, dw, db = big
    assert torch.equal(y, base[0])
    assert torch.equal(mean, base[1] * 2.0 ** k)
    assert torch.equal(wm * 2.0 ** k, base[2])
    assert torch.equal(dx * 2.0 ** k, base[3])
    assert torch.equal(dw, base[4]) and torch.equal(db, base[5])


# ---------------------------------------------------------------------------------------------------
# extreme magnitudes against the float64 reference


def _assert_matches(got, want, scales, G, d, names=NAMES):
    """Every output finite and equal to the reference within the fp32 tolerance, in units where it is
    of order 1: mean / s, W * s, dx * s per group of scale s."""
    s = scales.double()
    per_channel = s.repeat_interleave(d)
    shape = (1, -1, 1)
    units = {"y": 1, "mean": 1 / s[:, None], "wm": s[:, None, None], "grad x": per_channel.view(shape),
             "grad weight": 1, "grad bias": 1}
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), f"{name} not finite"
        u = units[name]
        torch.testing.assert_close(a.double() * u, b * u, **tol(torch.float32), msg=f"{name} differs")


@pytest.mark.parametrize("method", ["newton", "zca"])
@pytest.mark.parametrize("scale", [1e19, 1e30, 3e37], ids=["1e19", "1e30", "3e37"])
def test_extreme_scale_matches_reference(method, scale, device):
    d, C = 4, 8
    x = torch.randn(16, C, 3, device=device) * scale
    weight = torch.randn(C, device=device)
    bias = torch.randn(C, device=device)
    got = _triton_train(x, d, method, EPS, weight, bias)
    want = _reference_train(x.cpu(), d, method, weight.cpu(), bias.cpu())
    _assert_matches([t.cpu() for t in got], want, torch.full((C // d,), scale), C // d, d)


@pytest.mark.parametrize("method", ["newton", "zca"])
def test_mixed_scales_and_constant_group(method, device):
    """Five groups in one tensor, at 1, 1e19, 1e30, 3e37 and a constant group (at 1e30): each with its
    own scale. The constant group has cov = 0: W = eps^-1/2 I, y = bias. (2^100 rather than 1e30: its
    float64 mean is exact, so the reference's x - mean is 0 there as well.)"""
    d, scales = 4, [1.0, 1e19, 1e30, 3e37]
    G = len(scales) + 1
    x = torch.randn(12, G * d, 2, device=device)
    for g, s in enumerate(scales):
        x[:, g * d:(g + 1) * d] *= s
    x[:, len(scales) * d:] = 2.0 ** 100
    weight = torch.randn(G * d, device=device)
    bias = torch.randn(G * d, device=device)
    got = _triton_train(x, d, method, EPS, weight, bias)
    want = _reference_train(x.cpu(), d, method, weight.cpu(), bias.cpu())
    _assert_matches([t.cpu() for t in got], want, torch.tensor(scales + [1.0]), G, d)
    const = slice(len(scales) * d, G * d)
    assert (got[0][:, const] == bias[const].view(1, -1, 1)).all()


def test_constant_channel_in_scaled_group(device):
    """A dead channel inside a group at 1e30 (a zero row and column of cov, eps / c^2 underflows):
    Newton matches the reference. zca stays finite; its value there is ill-posed at this scale (W has
    eigenvalue eps^-1/2 on the dead channel, so the rounding of the eigenvectors (~1e-7 in fp32, 1e-16
    in the float64 reference) times |x| ~ 1e30 reaches y), so only finiteness is asserted for it."""
    d, C = 4, 8
    x = torch.randn(16, C, 3, device=device) * 1e30
    x[:, 1] = 2.0 ** 98
    got = _triton_train(x, d, "newton")
    want = _reference_train(x.cpu(), d, "newton")
    _assert_matches([t.cpu() for t in got[:4]], want[:4], torch.full((2,), 1e30), 2, d, NAMES[:4])
    got = _triton_train(x, d, "zca")
    for name, t in zip(NAMES[:4], got[:4]):
        assert torch.isfinite(t).all(), f"zca: {name} not finite"


# ---------------------------------------------------------------------------------------------------
# the ops' optional scale argument


def test_scaled_ops_opcheck(device):
    """torch.library.opcheck (schema, fake tensors, aot dispatch) of the ops called with a scale."""
    x = torch.randn(3, 8, 4, 4, device=device) * 1e20
    with sdecor.use_backend("triton"):
        for op in (wh.newton_backward_op, wh.whiten_bwd_reduce_op, wh.whiten_bwd_dx_op):
            op.op                                # registered on first use
    ops = torch.ops.sdecor
    scale = torch.tensor([2.0 ** 68, 2.0 ** 70], device=device)
    mean, cov = ref.group_cov(x.double(), 4)                            # cov ~ 1e40: fp64
    cov_s = (cov / (scale.double() ** 2)[:, None, None]).float()
    mean, cov = mean.float(), cov_s
    dy = torch.randn_like(x)
    torch.library.opcheck(ops.newton_backward, (cov_s, torch.randn_like(cov), EPS, 3, scale))
    torch.library.opcheck(ops.whiten_bwd_reduce, (dy, x, mean, scale))
    torch.library.opcheck(ops.whiten_bwd_dx, (dy, x, mean, torch.randn_like(cov), torch.randn_like(cov) * 1e-20,
                                              torch.randn_like(mean), scale))


def test_scaled_reduce_and_dx_match_their_definition(device):
    """whiten_bwd_reduce / whiten_bwd_dx with a scale c: D / c and B dy + A (x - mean) / c + v, where
    D and A (x - mean) themselves are out of fp32's range (|x| ~ 1e30, A ~ 1e-60 in float64)."""
    G, d = 2, 4
    x = torch.randn(5, G * d, 3, device=device, dtype=torch.float64) * 1e30
    scale = torch.tensor([2.0 ** 101, 2.0 ** 99], device=device, dtype=torch.float64)
    mean = x.mean(dim=(0, 2)).reshape(G, d)
    dy = torch.randn_like(x)
    xc = (x - mean.reshape(1, -1, 1)).reshape(5, G, d, 3)
    dyg = dy.reshape(5, G, d, 3)
    a = torch.randn(G, d, d, device=device, dtype=torch.float64)          # c A
    b = torch.randn(G, d, d, device=device, dtype=torch.float64) * 1e-30
    v = torch.randn(G, d, device=device, dtype=torch.float64) * 1e-30
    f = lambda t: t.float()                                               # noqa: E731
    with sdecor.use_backend("triton"):
        D, s = wh.whiten_bwd_reduce_op(f(dy), f(x), f(mean), f(scale))
        dx = wh.whiten_bwd_dx_op(f(dy), f(x), f(mean), f(a), f(b), f(v), f(scale))
    want_D = torch.einsum("ngil,ngjl->gij", dyg, xc) / scale[:, None, None]
    torch.testing.assert_close(D.double(), want_D, **tol(torch.float32))
    torch.testing.assert_close(s.double(), dyg.sum(dim=(0, 3)), **tol(torch.float32))
    want_dx = (b @ dyg + a @ (xc / scale[:, None, None]) + v[..., None]).reshape(x.shape)
    torch.testing.assert_close(dx.double() * 1e30, want_dx * 1e30, **tol(torch.float32))
