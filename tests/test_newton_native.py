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
    """GroupWhitening's native training forward and backward run the d x d part in one op each (all
    groups, with the affine terms around the Newton steps), and no other op per Newton step: the op
    counts do not depend on T."""
    names = _profiled_step(5)
    assert names.count("sdecor::native_newton_train") == 1
    assert names.count("sdecor::native_newton_train_backward") == 1
    assert "aten::bmm" not in names and "aten::matmul" not in names
    assert sorted(names) == sorted(_profiled_step(1)) == sorted(_profiled_step(9))


def _train_inputs(G, d, dtype, log2_scale=0, seed=4):
    """Statistics as native_whiten_stats gives them (units of power-of-two scales c = 2^log2_scale)."""
    gen = torch.Generator().manual_seed(seed)
    cov = torch.nan_to_num(_cov(G, d, d, torch.float64, seed=seed), nan=0.0).to(dtype)
    ms = (torch.randn(G, d, generator=gen, dtype=torch.float64) * 0.1).to(dtype)
    center = torch.randn(G, d, generator=gen, dtype=torch.float64).to(dtype) * 2.0 ** log2_scale
    c = torch.full((G,), 2.0 ** log2_scale, dtype=dtype)
    return ms, center, c, c.reciprocal(), cov


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
@pytest.mark.parametrize("d,log2_scale,T", [(16, 0, 5), (8, 60, 3), (33, -40, 4), (1, 0, 2), (64, 10, 0)])
def test_train_ops_match_the_torch_formulation(isa, dtype, affine, d, log2_scale, T):
    """native_newton_train and its backward against TorchPasses.train_matrix / train_matrix_grad (the same
    d x d part written as torch ops) on the same statistics."""
    G = 3
    ms, center, c, inv_c, cov = _train_inputs(G, d, dtype, log2_scale)
    gen = torch.Generator().manual_seed(5)
    weight = (torch.rand(G * d, generator=gen, dtype=torch.float64) + 0.5).to(dtype) if affine in ("weight", "both") else None
    bias = torch.randn(G * d, generator=gen, dtype=torch.float64).to(dtype) if affine in ("bias", "both") else None
    from sdecor.ops._whiten_passes import ScaledStats

    stats = ScaledStats(center, c, inv_c, ms, cov)
    eps = 1e-5
    # NaN left in the heap where the op's iterates (at::empty) are likely to go: a slot the backward
    # reads and the forward left unwritten shows
    poison = torch.full((G, 3 * T + 1, d, d), float("nan"), dtype=dtype)
    del poison
    got = whiten_native.NativePasses.train_matrix(stats, weight, bias, "newton", eps, T)
    assert torch.isfinite(got[7][2]).all()
    want = whiten_torch.TorchPasses.train_matrix(stats, weight, bias, "newton", eps, T)
    for name, g, w in zip(("w", "a", "a_apply", "shift", "mean", "w_true", "eps_s"), got[:7], want[:7]):
        assert g.dtype == dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, **tol(dtype), msg=name)
    m = 1000
    gx = torch.randn(G, d, d, generator=gen, dtype=torch.float64).to(dtype)
    gsum = torch.randn(G, d, generator=gen, dtype=torch.float64).to(dtype)
    w_, a_ = want[0], want[1]
    got_b = whiten_native.NativePasses.train_matrix_grad(gx, gsum, ms, w_, a_, weight, inv_c, m, got[7], got[6],
                                                          "newton", T)
    want_b = whiten_torch.TorchPasses.train_matrix_grad(gx, gsum, ms, w_, a_, weight, inv_c, m, want[7], want[6],
                                                         "newton", T)
    for name, g, w in zip(("grad_weight", "s2", "a_t", "shift"), got_b, want_b):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == w.shape, name
        t = tol(dtype)
        torch.testing.assert_close(g, w, rtol=t["rtol"], atol=t["atol"] * w.abs().max().item(), msg=name)


def test_train_ops_errors_name_the_argument():
    G, d = 2, 4
    ms, center, c, inv_c, cov = _train_inputs(G, d, torch.float32)
    op = torch.ops.sdecor.native_newton_train
    with pytest.raises(RuntimeError, match="ms must be Float of shape \\[2, 4\\]"):
        op(cov, ms[:, :3], center, c, inv_c, 1e-5, 5, None, None)
    with pytest.raises(RuntimeError, match="inv_scale must be Float of shape \\[2\\]"):
        op(cov, ms, center, c, inv_c.double(), 1e-5, 5, None, None)
    with pytest.raises(RuntimeError, match="weight must be Float of shape \\(8,\\)"):
        op(cov, ms, center, c, inv_c, 1e-5, 5, torch.ones(7), None)
    with pytest.raises(RuntimeError, match="T must be >= 0"):
        op(cov, ms, center, c, inv_c, 1e-5, -2, None, None)
    w, a, _, _, _, _, eps_s, trace, hist = op(cov, ms, center, c, inv_c, 1e-5, 5, None, None)
    back = torch.ops.sdecor.native_newton_train_backward
    gx, gsum = torch.ones(G, d, d), torch.ones(G, d)
    with pytest.raises(RuntimeError, match="hist must be Float of shape \\(2, 10, 4, 4\\)"):
        back(gx, gsum, ms, w, None, inv_c, cov, eps_s, trace, hist, 3, 10)
    with pytest.raises(RuntimeError, match="m must be >= 1"):
        back(gx, gsum, ms, w, None, inv_c, cov, eps_s, trace, hist, 5, 0)
    with pytest.raises(RuntimeError, match="gx must have shape \\(2, 4, 4\\)"):
        back(gx[:1], gsum, ms, w, None, inv_c, cov, eps_s, trace, hist, 5, 10)


def test_train_ops_meta():
    G, d = 3, 8
    meta = dict(device="meta")
    cov, v, s = torch.empty(G, d, d, **meta), torch.empty(G, d, **meta), torch.empty(G, **meta)
    out = torch.ops.sdecor.native_newton_train(cov, v, v, s, s, 1e-5, 4, None, None)
    assert [tuple(t.shape) for t in out] == [(G, d, d)] * 3 + [(G, d)] * 2 + [(G, d, d), (G,), (G,), (G, 13, d, d)]
    gw, s2, a_t, shift = torch.ops.sdecor.native_newton_train_backward(
        cov, v, v, cov, torch.empty(G * d, **meta), s, cov, s, s, out[-1], 4, 100)
    assert gw.shape == (G * d,) and s2.shape == (G, d, d) and a_t.shape == (G, d, d) and shift.shape == (G, d)
