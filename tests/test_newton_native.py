"""The native Newton-Schulz ops (sdecor::native_newton and native_newton_backward, csrc/newton_cpu.cpp):
W and dL/dSe against the reference's coupled iteration and its autograd derivative in float64, on every
instruction-set path; a smaller last group; T from 0; thread-count independence; meta kernels; errors
that name the argument; and the native training path running them."""

import pytest
import torch

from sdecor import _ext, reference
from sdecor.ops import whiten_native, whiten_torch
from sdecor.testing import assert_close, tol

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"sdecor._C is not built: {_ext.error()}")

ISAS = ("avx512", "avx2", "portable")


@pytest.fixture(params=ISAS)
def isa(request):
    name = request.param
    runnable = _ext.build_info().get("cpu_isas", "").split(",")
    if name not in runnable:
        pytest.skip(f"this CPU (or build) cannot run the {name} path; it runs {runnable}")
    torch.ops.sdecor.set_cpu_isa(name)
    try:
        yield name
    finally:
        torch.ops.sdecor.set_cpu_isa("auto")


def _cov(G, d, last, dtype, seed=0, scale=1.0):
    """Covariances (G, d, d) of random samples, the last group's padding filled with NaN (never read)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(G, d, 3 * d + 5, generator=g, dtype=torch.float64) * scale
    x = x + torch.randn(G, d, 1, generator=g, dtype=torch.float64)         # correlated channels
    cov = x @ x.transpose(-1, -2) / x.shape[-1]
    cov[-1, last:, :] = float("nan")
    cov[-1, :, last:] = float("nan")
    return cov.to(dtype)


def _eps(G, dtype, value=1e-3):
    return torch.full((G,), value, dtype=dtype)


def _reference(cov, eps, T, last, grad_w):
    """W and dL/dSe per group by the reference (float64 autograd of newton_schulz on each group's own block)."""
    G, d = cov.shape[0], cov.shape[-1]
    w = torch.zeros(G, d, d, dtype=torch.float64)
    g = torch.zeros(G, d, d, dtype=torch.float64)
    for i in range(G):
        n = last if i == G - 1 else d
        se = (cov[i, :n, :n].double() + eps[i].double() * torch.eye(n, dtype=torch.float64)).requires_grad_()
        wi = reference.newton_schulz(se, T)
        (gi,) = torch.autograd.grad(wi, se, grad_w[i, :n, :n].double())
        w[i, :n, :n] = wi.detach()
        g[i, :n, :n] = gi
    return w, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,last,T", [(1, 1, 5), (2, 1, 3), (7, 7, 5), (16, 16, 5), (16, 9, 5), (17, 3, 2),
                                      (32, 32, 7), (33, 33, 1), (64, 64, 5), (64, 40, 4), (128, 128, 3),
                                      (5, 5, 0), (12, 5, 0)])
def test_against_the_reference(isa, dtype, d, last, T):
    G = 3
    cov = _cov(G, d, last, dtype)
    eps = _eps(G, dtype)
    grad_w = torch.randn(G, d, d, dtype=dtype, generator=torch.Generator().manual_seed(1))
    grad_w[-1, last:, :] = float("nan")                   # the padding of grad_w is never read
    w, trace, hist = torch.ops.sdecor.native_newton(cov, eps, T, last)
    g = torch.ops.sdecor.native_newton_backward(grad_w, cov, eps, trace, hist, T, last)
    w_ref, g_ref = _reference(cov, eps, T, last, torch.nan_to_num(grad_w, nan=0.0))
    assert w.dtype == dtype and g.dtype == dtype and w.shape == (G, d, d) and g.shape == (G, d, d)
    assert hist.shape == (G, 3 * T + 1, d, d) and trace.shape == (G,)
    # the padding is zero, not merely finite
    assert torch.equal(w[-1, last:], torch.zeros_like(w[-1, last:]))
    assert torch.equal(w[-1, :, last:], torch.zeros_like(w[-1, :, last:]))
    assert torch.equal(g[-1, last:], torch.zeros_like(g[-1, last:]))
    assert torch.equal(g[-1, :, last:], torch.zeros_like(g[-1, :, last:]))
    assert_close(w, w_ref)
    # dL/dSe: relative to its largest entry (entries cancel in the reverse recurrence)
    t = tol(dtype)
    torch.testing.assert_close(g.double(), g_ref, rtol=t["rtol"], atol=t["atol"] * g_ref.abs().max().item())
    exp_trace = torch.stack([cov[i, :n, :n].double().diagonal().sum() + n * 1e-3
                             for i, n in enumerate([d] * (G - 1) + [last])])
    assert_close(trace, exp_trace)


@pytest.mark.parametrize("d,last", [(16, 16), (24, 10)])
def test_matches_the_torch_backend(d, last):
    """The torch backend's d x d math (whitening_scaled and its backward) on the same inputs."""
    G, T = 5, 5
    cov = torch.nan_to_num(_cov(G, d, last, torch.float32), nan=0.0)
    eps = _eps(G, torch.float32)
    C = (G - 1) * d + last
    w, state = whiten_native.NativePasses.whitening(cov, eps, "newton", T, C)
    w_t, state_t = whiten_torch.TorchPasses.whitening(cov, eps, "newton", T, C)
    assert_close(w, w_t)
    grad_w = torch.randn(G, d, d, generator=torch.Generator().manual_seed(2))
    g = whiten_native.NativePasses.whitening_grad(grad_w, state, eps, "newton", T, C)
    g_t = whiten_torch.TorchPasses.whitening_grad(grad_w, state_t, eps, "newton", T, C)
    t = tol(torch.float32)
    torch.testing.assert_close(g, g_t, rtol=t["rtol"], atol=t["atol"] * g_t.abs().max().item())


def test_scaled_units_at_extreme_eps():
    """eps' as small as scaled_eps allows (2^-63 in float32) and a rank-deficient covariance: finite."""
    G, d = 2, 8
    cov = torch.zeros(G, d, d)
    cov[:, 0, 0] = 1.0                                   # one live channel, seven dead ones
    eps = torch.full((G,), 2.0 ** -63)
    w, trace, hist = torch.ops.sdecor.native_newton(cov, eps, 5, d)
    g = torch.ops.sdecor.native_newton_backward(torch.ones(G, d, d), cov, eps, trace, hist, 5, d)
    assert torch.isfinite(w).all() and torch.isfinite(g).all()
    w_ref = reference.newton_schulz(cov.double() + eps[0].double() * torch.eye(d, dtype=torch.float64), 5)
    assert_close(w, w_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_same_for_any_number_of_threads(dtype):
    G, d, T = 7, 24, 5
    cov = torch.nan_to_num(_cov(G, d, d, dtype), nan=0.0)
    eps = _eps(G, dtype)
    grad_w = torch.randn(G, d, d, dtype=dtype, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            w, trace, hist = torch.ops.sdecor.native_newton(cov, eps, T, d)
            g = torch.ops.sdecor.native_newton_backward(grad_w, cov, eps, trace, hist, T, d)
            results.append((w, trace, hist, g))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r))


def test_meta_kernels_give_the_shapes():
    cov = torch.empty(4, 16, 16, device="meta")
    eps = torch.empty(4, device="meta")
    w, trace, hist = torch.ops.sdecor.native_newton(cov, eps, 3, 9)
    assert w.shape == (4, 16, 16) and trace.shape == (4,) and hist.shape == (4, 10, 16, 16)
    g = torch.ops.sdecor.native_newton_backward(torch.empty(4, 16, 16, device="meta"), cov, eps, trace, hist, 3, 9)
    assert g.shape == (4, 16, 16) and g.device.type == "meta"


def test_no_derivative_of_their_own():
    cov = torch.nan_to_num(_cov(2, 4, 4, torch.float64), nan=0.0).requires_grad_()
    w, _, _ = torch.ops.sdecor.native_newton(cov, _eps(2, torch.float64), 2, 4)
    with pytest.raises(RuntimeError):
        w.sum().backward()


@pytest.mark.parametrize("args,kwargs,match", [
    (lambda c, e: (c[0], e, 5, 4), {}, "cov must be \\(G, d, d\\)"),
    (lambda c, e: (c[:, :, :3], e, 5, 4), {}, "cov must be \\(G, d, d\\)"),
    (lambda c, e: (c.half(), e, 5, 4), {}, "cov must be float32 or float64"),
    (lambda c, e: (c, e[:1], 5, 4), {}, "eps must have shape \\(2,\\)"),
    (lambda c, e: (c, e.double(), 5, 4), {}, "eps must be Float"),
    (lambda c, e: (c, e, -1, 4), {}, "T must be >= 0"),
    (lambda c, e: (c, e, 5, 0), {}, "last must be in \\[1, 4\\]"),
    (lambda c, e: (c, e, 5, 5), {}, "last must be in \\[1, 4\\]"),
])
def test_forward_errors_name_the_argument(args, kwargs, match):
    cov = torch.eye(4).expand(2, 4, 4).contiguous()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sdecor.native_newton(*args(cov, torch.full((2,), 1e-3)))


def test_backward_errors_name_the_argument():
    cov = torch.eye(4).expand(2, 4, 4).contiguous()
    eps = torch.full((2,), 1e-3)
    w, trace, hist = torch.ops.sdecor.native_newton(cov, eps, 3, 4)
    gw = torch.ones(2, 4, 4)
    op = torch.ops.sdecor.native_newton_backward
    with pytest.raises(RuntimeError, match="grad_w must have shape \\(2, 4, 4\\)"):
        op(gw[:, :3], cov, eps, trace, hist, 3, 4)
    with pytest.raises(RuntimeError, match="grad_w must be Float"):
        op(gw.double(), cov, eps, trace, hist, 3, 4)
    with pytest.raises(RuntimeError, match="trace must be Float of shape \\(2,\\)"):
        op(gw, cov, eps, trace[:1], hist, 3, 4)
    with pytest.raises(RuntimeError, match="hist must be Float of shape \\(2, 13, 4, 4\\)"):
        op(gw, cov, eps, trace, hist, 4, 4)                 # another T than the forward's


def _profiled_step(T):
    import sdecor
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(4, 32, 5, 5, requires_grad=True)
    with sdecor.use_backend("native"), profile(activities=[ProfilerActivity.CPU]) as prof:
        y = sdecor.GroupWhitening(32, num_channels=16, T=T)(x)
        y.backward(torch.randn_like(y))
    return [e.name for e in prof.events()]


def test_the_native_training_path_runs_them():
    """GroupWhitening's native training forward and backward call the two ops once each (all groups),
    and run no other op per Newton step: the op counts do not depend on T."""
    names = _profiled_step(5)
    assert names.count("sdecor::native_newton") == 1
    assert names.count("sdecor::native_newton_backward") == 1
    assert sorted(names) == sorted(_profiled_step(1)) == sorted(_profiled_step(9))
