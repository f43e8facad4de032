"""The triton backend of group_cov / whitening_matrix / group_whiten(_train, _eval) against the reference.

Runs the Triton kernels on CPU through the interpreter (TRITON_INTERPRET=1, set by conftest) or on the
GPU when there is one. Output and every gradient are compared; shapes stay small for the interpreter.
"""

import pytest
import torch

import sdecor
from sdecor import reference as ref
from sdecor import _backend
from sdecor._layout import like_format
from sdecor._zca import sym
from sdecor.ops import cov
from sdecor.ops import whiten as wh
from sdecor.testing import assert_close, tol

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# (shape, d): 2-D to 5-D, odd sizes (N=3, C=48 with d=16, H*W=49) beside round ones
SHAPES = [
    ((3, 48, 7, 7), 16),
    ((4, 32, 4, 4), 16),
    ((6, 12), 4),
    ((3, 6, 5), 3),
    ((2, 8, 3, 2, 2), 8),
    ((5, 4, 3, 3), 2),
]


def _id(p):
    shape, d = p
    return "x".join(map(str, shape)) + f"-d{d}"


def _layout(x, channels_last):
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if channels_last and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _input(shape, device, channels_last=False, dtype=torch.float32):
    x = torch.randn(shape, device=device) * 1.5 + 0.5
    return _layout(x, channels_last).to(dtype)


def _grad_out(y):
    """A fixed, non-trivial output gradient (the same for both backends)."""
    return torch.linspace(-1.0, 1.0, y.numel(), device=y.device).reshape(y.shape).sin().to(y.dtype)


def _run_train(backend, x, d, method, T, weight, bias):
    xx = x.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_() if weight is not None else None
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    if backend == "reference":
        mean, cov = ref.group_cov(xx, d)
        wm = ref.whitening_matrix(cov, method, 1e-5, T)
        y = ref.apply_whitening(xx, mean, wm)
        shape = (1, -1) + (1,) * (xx.dim() - 2)
        y = y * (w.view(shape) if w is not None else 1) + (b.view(shape) if b is not None else 0)
        mean, wm = mean.detach(), wm.detach()
    else:
        with sdecor.use_backend(backend):
            y, mean, wm = wh.group_whiten_train(xx, d, method, 1e-5, T, w, b)
    (y * _grad_out(y)).sum().backward()
    return y, mean, wm, xx.grad, (w.grad if w is not None else None), (b.grad if b is not None else None)


LAYOUT_CASES = [(case, False) for case in SHAPES] + [(case, True) for case in SHAPES if len(case[0]) >= 4]


def _layout_id(item):
    case, channels_last = item
    return _id(case) + ("-channels_last" if channels_last else "-nchw")


@pytest.mark.parametrize("method", ["newton", "zca"])
@pytest.mark.parametrize("layout_case", LAYOUT_CASES, ids=_layout_id)
def test_train_matches_reference(layout_case, method, device, poison):
    (shape, d), channels_last = layout_case
    C = shape[1]
    x = _input(shape, device, channels_last)
    weight = torch.randn(C, device=device)
    bias = torch.randn(C, device=device)
    got = _run_train("triton", x, d, method, 5, weight, bias)
    want = _run_train("reference", x, d, method, 5, weight, bias)
    for name, a, b in zip(["y", "mean", "wm", "grad x", "grad weight", "grad bias"], got, want):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, msg=f"{name} differs from the reference")
    y = got[0]
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.stride() == like_format(torch.empty_like(x).contiguous(), x).stride()
    assert got[1].dtype == torch.float32 and not got[1].requires_grad and not got[2].requires_grad


@pytest.mark.parametrize("method", ["newton", "zca"])
@pytest.mark.parametrize("case", SHAPES[:4], ids=_id)
def test_group_whiten_matches_reference(case, method, device, poison):
    shape, d = case
    x = _input(shape, device)
    out = {}
    for backend in ("triton", "torch", "reference"):
        xx = x.clone().requires_grad_()
        if backend == "reference":
            y = ref.group_whiten(xx, d, method=method, T=4)
        else:
            with sdecor.use_backend(backend):
                y = sdecor.group_whiten(xx, d, method=method, T=4)
        (y * _grad_out(y)).sum().backward()
        out[backend] = (y, xx.grad)
    for backend in ("triton", "torch"):
        assert_close(out[backend][0], out["reference"][0], msg=f"{backend}: y")
        assert_close(out[backend][1], out["reference"][1], msg=f"{backend}: grad x")


@pytest.mark.parametrize("layout_case", [item for item in LAYOUT_CASES if item[0] in (SHAPES[0], SHAPES[2], SHAPES[4])],
                         ids=_layout_id)
def test_group_cov_and_grad(layout_case, device, poison):
    (shape, d), channels_last = layout_case
    x = _input(shape, device, channels_last)
    res = {}
    for backend in ("triton", "torch"):
        xx = x.clone().requires_grad_()
        with sdecor.use_backend(backend):
            mean, cov = sdecor.group_cov(xx, d)
            loss = sdecor.decorrelation_loss(xx, d, "corr") + mean.sin().sum() + cov.square().sum()
        loss.backward()
        res[backend] = (mean, cov, xx.grad)
    for a, b in zip(res["triton"], res["torch"]):
        assert_close(a, b)


def test_group_cov_large_mean(device):
    """The shifted accumulation: |mean| >> std does not cancel the covariance away."""
    x = torch.randn(4, 16, 8, 8, device=device) * 0.01 + 1000.0
    with sdecor.use_backend("triton"):
        mean, cov = sdecor.group_cov(x, 16)
    want_mean, want_cov = ref.group_cov(x.double(), 16)
    torch.testing.assert_close(mean.double(), want_mean, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(cov.double(), want_cov, atol=1e-8, rtol=1e-3)


@pytest.mark.parametrize("d", [3, 16, 40])
@pytest.mark.parametrize("T", [1, 5])
def test_whitening_matrix_newton(d, T, device, poison):
    a = torch.randn(2, d, 2 * d + 3, device=device)
    cov = a @ a.transpose(-1, -2) / (2 * d)
    res = {}
    for backend in ("triton", "torch"):
        c = cov.clone().requires_grad_()
        with sdecor.use_backend(backend):
            w = sdecor.whitening_matrix(c, "newton", 1e-5, T)
        (w * _grad_out(w)).sum().backward()
        res[backend] = (w, c.grad)
    assert_close(res["triton"][0], res["torch"][0])
    assert_close(res["triton"][1], res["torch"][1])


def test_whitening_matrix_batch_dims(device):
    a = torch.randn(2, 3, 4, 9, device=device)
    cov = a @ a.transpose(-1, -2) / 9
    with sdecor.use_backend("triton"):
        w = sdecor.whitening_matrix(cov, "newton", 1e-3, 3)
    assert w.shape == cov.shape
    assert_close(w, ref.whitening_matrix(cov, "newton", 1e-3, 3))


@pytest.mark.parametrize("T", [40, 100])
def test_newton_long_iteration_stable(T, device):
    """T up to 100: the kernels converge to the float64 ZCA matrix and gradient, never diverge."""
    d = 8
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    evals = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    cov64 = (q * evals) @ q.T
    gw = sym(torch.randn(d, d, dtype=torch.float64))   # zca's backward symmetrises dL/dW
    c64 = cov64.clone().requires_grad_()
    w64 = ref.whitening_matrix(c64, "zca", 1e-5)
    w64.backward(gw)
    cov = cov64.float().unsqueeze(0).to(device).requires_grad_()
    with sdecor.use_backend("triton"):
        w = sdecor.whitening_matrix(cov, "newton", 1e-5, T)
    w.backward(gw.float().unsqueeze(0).to(device))
    assert torch.isfinite(w).all() and torch.isfinite(cov.grad).all()
    torch.testing.assert_close(w[0].double().cpu(), w64.detach(), **tol(torch.float32))
    torch.testing.assert_close(cov.grad[0].double().cpu(), c64.grad, atol=1e-3, rtol=1e-3)
    # and the float64 reference recurrence itself at T
    c = cov64.clone().requires_grad_()
    wr = ref.whitening_matrix(c, "newton", 1e-5, T)
    wr.backward(gw)
    torch.testing.assert_close(w[0].double().cpu(), wr.detach(), **tol(torch.float32))
    torch.testing.assert_close(cov.grad[0].double().cpu(), c.grad, atol=1e-4, rtol=1e-4)


def test_newton_tiled_path(device):
    """d above the register limit of the Newton kernels (global scratch, tiled products)."""
    d = 40
    a = torch.randn(1, d, 3 * d, device=device)
    cov = a @ a.transpose(-1, -2) / (3 * d)
    from sdecor_kernels import newton as K

    assert K.NewtonFwdConfig.for_group(d).BD > K.REG_BD
    assert not K.NewtonFwdConfig.for_group(d).in_registers
    assert not K.NewtonBwdConfig.for_group(d).in_registers
    c = cov.clone().requires_grad_()
    with sdecor.use_backend("triton"):
        w = sdecor.whitening_matrix(c, "newton", 1e-5, 3)
    w.backward(_grad_out(w))
    c2 = cov.clone().requires_grad_()
    w2 = ref.whitening_matrix(c2, "newton", 1e-5, 3)
    w2.backward(_grad_out(w2))
    assert_close(w, w2)
    assert_close(c.grad, c2.grad)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_eval_matches_reference(channels_last, device, poison):
    x = _input((3, 48, 7, 7), device, channels_last)
    mean, cov = ref.group_cov(torch.randn(5, 48, 7, 7, device=device), 16)
    wm = ref.whitening_matrix(cov, "newton", 1e-5, 5)
    weight, bias = torch.randn(48, device=device), torch.randn(48, device=device)
    res = {}
    for backend in ("triton", "torch"):
        xx = x.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        m = mean.clone().requires_grad_()
        W = wm.clone().requires_grad_()
        with sdecor.use_backend(backend):
            y = wh.group_whiten_eval(xx, m, W, w, b)
        (y * _grad_out(y)).sum().backward()
        res[backend] = (y, xx.grad, w.grad, b.grad, m.grad, W.grad)
    for a, b in zip(res["triton"], res["torch"]):
        assert_close(a, b)
    assert res["triton"][0].stride() == x.stride()


def test_eval_accepts_running_mean_shape(device):
    x = _input((2, 8, 3, 3), device)
    mean = torch.randn(2, 4, 1, device=device)
    wm = torch.randn(2, 4, 4, device=device)
    with sdecor.use_backend("triton"):
        y = wh.group_whiten_eval(x, mean, wm)
    assert_close(y, ref.apply_whitening(x, mean.reshape(2, 4), wm))


def test_train_without_affine_and_no_grad(device):
    x = _input((3, 8, 5), device)
    with sdecor.use_backend("triton"), torch.no_grad():
        y, mean, wm = wh.group_whiten_train(x, 4)
    y2, mean2, wm2 = wh.group_whiten_train(x, 4)
    assert_close(y, y2)
    assert_close(mean, mean2)
    assert_close(wm, wm2)


def test_fp16_input(device):
    x = _input((3, 16, 4, 4), device, dtype=torch.float16)
    with sdecor.use_backend("triton"):
        y, mean, wm = wh.group_whiten_train(x, 16)
    assert y.dtype == torch.float16 and mean.dtype == torch.float32 and wm.dtype == torch.float32
    y_ref = ref.group_whiten(x.float(), 16)
    assert_close(y, y_ref)


def test_deterministic(device):
    x = _input((4, 16, 9, 9), device)
    with sdecor.use_backend("triton"):
        a = sdecor.group_cov(x, 16)
        b = sdecor.group_cov(x, 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_strided_input_is_read_correctly(device):
    base = torch.randn(3, 16, 6, 10, device=device)
    x = base[:, :, :, ::2]                                      # not dense: copied by the launcher
    with sdecor.use_backend("triton"):
        y = sdecor.group_whiten(x, 8)
    assert_close(y, ref.group_whiten(x, 8))


# ---------------------------------------------------------------------------------------------------
# errors


def test_bad_input_errors(device):
    x = _input((3, 8, 4), device)
    with sdecor.use_backend("triton"):
        with pytest.raises(ValueError, match="num_channels"):
            wh.group_whiten_train(x, 3)
        with pytest.raises(ValueError, match="m = N"):
            wh.group_whiten_train(x[:1, :, :1], 4)
        with pytest.raises(ValueError, match="weight must have shape"):
            wh.group_whiten_train(x, 4, weight=torch.ones(4, device=device))
        with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
            wh.group_whiten_train(x, 4, bias=[0.0] * 8)
        with pytest.raises(ValueError, match="T \\(Newton-Schulz steps\\)"):
            wh.group_whiten_train(x, 4, T=101)
        with pytest.raises(ValueError, match="method"):
            sdecor.group_whiten(x, 4, method="svd")
        with pytest.raises(ValueError, match="wm must have shape"):
            wh.group_whiten_eval(x, torch.zeros(2, 4, device=device), torch.zeros(2, 4, device=device))
        with pytest.raises(ValueError, match="mean must have shape"):
            wh.group_whiten_eval(x, torch.zeros(8, device=device), torch.zeros(2, 4, 4, device=device))
        with pytest.raises(ValueError, match="G\\*d"):
            wh.group_whiten_eval(x, torch.zeros(1, 4, device=device), torch.zeros(1, 4, 4, device=device))
        with pytest.raises(ValueError, match="shape \\(N, C, \\*S\\)"):
            sdecor.group_cov(torch.zeros(3, device=device), 1)
        with pytest.raises(sdecor.BackendUnavailableError, match="float64"):
            sdecor.group_cov(x.double(), 4)


def test_triton_not_picked_automatically_on_cpu():
    # even under the interpreter: CPU tensors get the native kernels where the extension is built,
    # else the torch backend
    x = torch.randn(3, 8, 4)
    want = "native" if sdecor._ext.available() else "torch"
    assert _backend.select("group_cov", {"x": x}, cov.SUPPORTS) == want
    for op in ("group_whiten", "group_whiten_train", "group_whiten_eval"):
        assert _backend.select(op, {"x": x}, wh.SUPPORTS[op]) == want
