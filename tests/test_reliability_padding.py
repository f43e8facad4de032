"""The padding of a smaller last group (last_group="smaller": statistics in the (G, d) / (G, d, d)
layout, the last group's block top-left) is never read: a NaN or inf there (uninitialised memory, a
poisoned buffer) changes nothing. Every padded region is poisoned here -- the running buffers' padding,
the padding of the statistics given to group_whiten_eval, the padding of the matrices the kernels and
the d x d functions take, and every buffer the ops allocate (the ``poison`` fixture) -- and outputs
and every gradient must be finite and equal to those of the unpoisoned run, on the torch, native and
triton backends, forward and backward."""

import pytest
import torch
from torch import nn

import sdecor
from sdecor import _ext
from sdecor._zca import zca_backward_masked, zca_scaled
from sdecor.fold import fold_whitening
from sdecor.nn import GroupWhitening
from sdecor.ops import whiten, whiten_native, whiten_torch

from conftest import INTERPRET

NAN, INF = float("nan"), float("inf")

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("native", id="native", marks=pytest.mark.skipif(not _ext.available(),
                                                                  reason="sdecor._C is not built")),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        not (INTERPRET or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")),
]

# (C, d): a last group of 2 after two full groups, of 2 after one, C < d (one group of 3 channels),
# and a last group of 8 at d = 16 (the kernels' tl.dot path)
LAYOUTS = [(10, 4), (6, 4), (3, 4), (24, 16)]


def _on(backend, device):
    return device if backend == "triton" else torch.device("cpu")


def _pad_masks(G, d, C, device):
    """(channels (G, d), matrix entries (G, d, d)) of the padding: True where nothing exists."""
    keep = (torch.arange(G * d, device=device) < C).reshape(G, d)
    return ~keep, ~(keep.unsqueeze(-1) & keep.unsqueeze(-2))


def _poisoned(t, pad, value):
    return t.masked_fill(pad, value)


def _assert_same(got, want, what):
    for name, a, b in zip(("y", "grad x", "grad weight", "grad bias", "grad mean", "grad wm"), got, want):
        if a is None and b is None:
            continue
        assert torch.isfinite(a).all(), f"{name} not finite ({what})"
        assert torch.equal(a, b), f"{name} differs from the unpoisoned run ({what})"


def _trained_layer(C, d, device, method="newton"):
    layer = GroupWhitening(C, d, method=method, last_group="smaller", device=device)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    for _ in range(2):
        layer(torch.randn(8, C, 3, device=device) * 2 + 1)
    return layer


def _module_run(layer, x, backend):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with sdecor.use_backend(backend):
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("C, d", LAYOUTS, ids=[f"C{c}-d{d}" for c, d in LAYOUTS])
def test_eval_with_poisoned_running_buffers(C, d, value, backend, device, poison):
    dev = _on(backend, device)
    layer = _trained_layer(C, d, dev).eval()
    x = torch.randn(5, C, 4, device=dev)
    want = _module_run(layer, x, backend)
    pad_c, pad_m = _pad_masks(layer.num_groups, d, C, dev)
    with torch.no_grad():
        layer.running_mean.copy_(_poisoned(layer.running_mean, pad_c.unsqueeze(-1), value))
        layer.running_wm.copy_(_poisoned(layer.running_wm, pad_m, value))
    got = _module_run(layer, x, backend)
    _assert_same(got, want, f"{backend}, padding {value}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["newton", "zca"])
def test_training_with_poisoned_running_buffers_then_eval(method, backend, device, poison):
    """Training reads no running buffer: the outputs, gradients and the real block of the updated
    buffers are those of the unpoisoned layer, and eval mode after it too."""
    dev = _on(backend, device)
    C, d = 10, 4
    clean = _trained_layer(C, d, dev, method)
    dirty = _trained_layer(C, d, dev, method)
    dirty.load_state_dict(clean.state_dict())
    pad_c, pad_m = _pad_masks(clean.num_groups, d, C, dev)
    with torch.no_grad():
        dirty.running_mean.masked_fill_(pad_c.unsqueeze(-1), NAN)
        dirty.running_wm.masked_fill_(pad_m, NAN)
    x = torch.randn(6, C, 3, device=dev)
    for mode in ("train", "eval"):
        clean.train(mode == "train")
        dirty.train(mode == "train")
        _assert_same(_module_run(dirty, x, backend), _module_run(clean, x, backend), f"{backend} {mode}")
        assert torch.equal(dirty.running_wm.masked_fill(pad_m, 0), clean.running_wm)
        assert torch.equal(dirty.running_mean.masked_fill(pad_c.unsqueeze(-1), 0), clean.running_mean)


def _eval_inputs(C, d, device, mean_shape3):
    G = -(-C // d)
    pad_c, pad_m = _pad_masks(G, d, C, device)
    mean = torch.randn(G, d, device=device).masked_fill(pad_c, 0)
    a = torch.randn(G, d, d, device=device)
    wm = (torch.eye(d, device=device) + 0.2 * a).masked_fill(pad_m, 0)
    if mean_shape3:
        mean, pad_c = mean.unsqueeze(-1), pad_c.unsqueeze(-1)
    return dict(mean=mean, wm=wm, weight=torch.rand(C, device=device) + 0.5,
                bias=torch.randn(C, device=device)), pad_c, pad_m


def _eval_run(x, args, backend, create_graph=False):
    leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
    xx = x.clone().requires_grad_()
    with sdecor.use_backend(backend):
        y = whiten.group_whiten_eval(xx, **leaves)
        r = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)
        grads = torch.autograd.grad((y * r).sum(), [xx, leaves["weight"], leaves["bias"], leaves["mean"],
                                                    leaves["wm"]], create_graph=create_graph)
    return (y.detach(),) + tuple(g.detach() for g in grads), grads, leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mean_shape3", [False, True], ids=["mean-Gd", "mean-Gd1"])
@pytest.mark.parametrize("C, d", LAYOUTS, ids=[f"C{c}-d{d}" for c, d in LAYOUTS])
def test_group_whiten_eval_with_poisoned_padding(C, d, mean_shape3, backend, device, poison):
    dev = _on(backend, device)
    args, pad_c, pad_m = _eval_inputs(C, d, dev, mean_shape3)
    x = torch.randn(4, C, 3, device=dev)
    want = _eval_run(x, args, backend)[0]
    for value in (NAN, INF):
        dirty = dict(args, mean=_poisoned(args["mean"], pad_c, value), wm=_poisoned(args["wm"], pad_m, value))
        got = _eval_run(x, dirty, backend)[0]
        _assert_same(got, want, f"{backend}, padding {value}")
        # entries that are not read get zero gradient
        assert not got[4][pad_c].any() and not got[5][pad_m].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_whiten_eval_double_backward_with_poisoned_padding(backend, device):
    dev = _on(backend, device)
    args, pad_c, pad_m = _eval_inputs(10, 4, dev, False)
    x = torch.randn(4, 10, 3, device=dev)
    dirty = dict(args, mean=_poisoned(args["mean"], pad_c, NAN), wm=_poisoned(args["wm"], pad_m, NAN))
    second = []
    for a in (args, dirty):
        _, grads, leaves = _eval_run(x, a, backend, create_graph=True)
        gg = torch.autograd.grad(sum(g.square().sum() for g in grads[1:]), [leaves["weight"], leaves["wm"]])
        second.append(gg)
    for a, b in zip(*second):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# the kernels and the d x d functions, given matrices with poisoned padding


def _psd(G, d, C, device):
    a = torch.randn(G, d, 3 * d, device=device)
    cov = a @ a.transpose(-1, -2) / (3 * d)
    pad_c, pad_m = _pad_masks(G, d, C, device)
    return cov.masked_fill(pad_m, 0), pad_c, pad_m


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("C, d, scaled", [(10, 4, False), (10, 4, True), (24, 16, False), (24, 16, True),
                                          (70, 40, True)],
                         ids=["C10-d4", "C10-d4-scaled", "C24-d16", "C24-d16-scaled", "C70-d40-tiled-scaled"])
def test_newton_kernels_ignore_poisoned_padding(C, d, scaled, device, poison):
    from sdecor_kernels import newton

    G = -(-C // d)
    cov, _, pad_m = _psd(G, d, C, device)
    gw = torch.randn(G, d, d, device=device).masked_fill(pad_m, 0)
    scale = torch.full((G,), 4.0, device=device) if scaled else None
    T = 2 if d > 32 else 4
    want = (newton.newton_forward(cov, 1e-3, T, scale, C), newton.newton_backward(cov, gw, 1e-3, T, scale, C))
    for value in (NAN, INF):
        got = (newton.newton_forward(cov.masked_fill(pad_m, value), 1e-3, T, scale, C),
               newton.newton_backward(cov.masked_fill(pad_m, value), gw.masked_fill(pad_m, value), 1e-3, T,
                                      scale, C))
        for a, b in zip(got, want):
            assert torch.isfinite(a).all() and torch.equal(a, b)
            assert not a[pad_m].any()


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("C, d", [(10, 4), (24, 16)], ids=["C10-d4", "C24-d16"])
def test_pass_kernels_ignore_poisoned_padding(C, d, device, poison):
    """apply, the backward reduce and dx passes with mean, the matrices and v poisoned in the padding."""
    from sdecor_kernels import apply, backward

    G = -(-C // d)
    pad_c, pad_m = _pad_masks(G, d, C, device)
    x, dy = torch.randn(5, C, 7, device=device), torch.randn(5, C, 7, device=device)
    mean = torch.randn(G, d, device=device).masked_fill(pad_c, 0)
    a, b = (torch.randn(G, d, d, device=device).masked_fill(pad_m, 0) for _ in range(2))
    v = torch.randn(G, d, device=device).masked_fill(pad_c, 0)
    scale = torch.full((G,), 2.0, device=device)
    weight, bias = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)

    def run(mean, a, b, v):
        return (apply.whiten_apply(x, mean, a, weight, bias), *backward.whiten_bwd_reduce(dy, x, mean, scale),
                backward.whiten_bwd_dx(dy, x, mean, a, b, v, scale), backward.whiten_bwd_dx(None, x, mean, a, None, v))

    want = run(mean, a, b, v)
    for value in (NAN, INF):
        got = run(mean.masked_fill(pad_c, value), a.masked_fill(pad_m, value), b.masked_fill(pad_m, value),
                  v.masked_fill(pad_c, value))
        for g, w in zip(got, want):
            assert torch.isfinite(g).all() and torch.equal(g, w)


def _eighs():
    out = [torch.linalg.eigh]
    if _ext.available():
        out.append(whiten_native.eigh_native)
    return out


@pytest.mark.parametrize("eigh", _eighs(), ids=lambda f: f.__module__.split(".")[-1] + "." + f.__name__)
@pytest.mark.parametrize("C, d", [(10, 4), (3, 4)], ids=["C10-d4", "C3-d4"])
def test_zca_of_the_padded_layout_ignores_poisoned_padding(C, d, eigh):
    """The zca of the triton and synchronised paths (:func:`sdecor._zca.zca_scaled` and its backward)."""
    G = -(-C // d)
    cov, _, pad_m = _psd(G, d, C, torch.device("cpu"))
    gw = torch.randn(G, d, d).masked_fill(pad_m, 0)
    scale = torch.tensor([1.0, 2.0, 4.0][:G])
    evals, evecs, w = zca_scaled(cov, 1e-3, scale, C, eigh)
    g = zca_backward_masked(gw, evals, evecs, 1e-3, scale, C)
    for value in (NAN, INF):
        evals2, evecs2, w2 = zca_scaled(cov.masked_fill(pad_m, value), 1e-3, scale, C, eigh)
        g2 = zca_backward_masked(gw.masked_fill(pad_m, value), evals2, evecs2, 1e-3, scale, C)
        for a, b in ((w2, w), (g2, g)):
            assert torch.isfinite(a).all() and not a[pad_m].any()
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["newton", "zca"])
@pytest.mark.parametrize("C, d", [(10, 4), (3, 4)], ids=["C10-d4", "C3-d4"])
def test_torch_matrix_passes_ignore_poisoned_padding(C, d, method):
    """The d x d math of the torch and native passes on the padded layout (the synchronised path)."""
    G = -(-C // d)
    cov, _, pad_m = _psd(G, d, C, torch.device("cpu"))
    gw = torch.randn(G, d, d).masked_fill(pad_m, 0)
    c = torch.tensor([1.0, 2.0, 4.0][:G])
    P = whiten_torch.TorchPasses
    w, state = P.matrix(cov, c, method, 1e-3, 4, C)
    g = P.matrix_grad(gw, state, cov, c, method, 1e-3, 4, C)
    for value in (NAN, INF):
        dirty = cov.masked_fill(pad_m, value)
        w2, state2 = P.matrix(dirty, c, method, 1e-3, 4, C)
        g2 = P.matrix_grad(gw.masked_fill(pad_m, value), state2, dirty, c, method, 1e-3, 4, C)
        for a, b in ((w2, w), (g2, g)):
            assert torch.isfinite(a).all() and not a[pad_m].any()
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fold_ignores_poisoned_padding():
    layer = _trained_layer(10, 4, "cpu").eval()
    model = nn.Sequential(nn.Flatten(), layer)
    x = torch.randn(3, 10)
    want = fold_whitening(model, x)(x)
    pad_c, pad_m = _pad_masks(3, 4, 10, "cpu")
    with torch.no_grad():
        layer.running_mean.masked_fill_(pad_c.unsqueeze(-1), NAN)
        layer.running_wm.masked_fill_(pad_m, NAN)
    got = fold_whitening(model, x)(x)
    assert torch.isfinite(got).all() and torch.equal(got, want)
