"""A smaller last group (last_group="smaller", IterNorm's flexible groups): d need not divide C, the
last group of r = C - (G-1) d channels is whitened as a group of its own, its statistics padded to
(G, d) / (G, d, d) with zeros.

The reference is checked against whitening each torch.split chunk alone (float64); every backend
(torch, triton through the interpreter on CPU, the native eigensolver of the triton zca path) against
the reference: output, batch statistics and every gradient; the module's running buffers and eval
path; "smaller" where d divides C bitwise equal to "even"; the synchronised statistics in process.
"""

import datetime

import pytest
import torch
import torch.distributed as dist

import sdecor
from sdecor import reference as ref
from sdecor._layout import like_format
from sdecor._zca import zca_backward_masked, zca_scaled
from sdecor.nn import GroupWhitening, SyncGroupWhitening
from sdecor.ops import whiten, whiten_native, whiten_sync
from sdecor.testing import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# (shape, d): r = 8 (mobilenet_v2's 24 channels at d=16), r = 8 after two full groups, r = 1 (a last
# group of one channel) in 2-D and 5-D, C < d (one group of C channels); 2-D to 5-D
CASES = [
    ((4, 24, 3, 3), 16),
    ((6, 40, 5), 16),
    ((7, 5), 4),
    ((3, 9, 2, 2, 2), 4),
    ((9, 5), 8),
]


def _id(case):
    shape, d = case
    return "x".join(map(str, shape)) + f"-d{d}"


def _layout(x, channels_last):
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


LAYOUT_CASES = [(c, False) for c in CASES] + [(c, True) for c in CASES if len(c[0]) >= 4]


def _layout_id(item):
    return _id(item[0]) + ("-channels_last" if item[1] else "")


def _input(shape, dtype=torch.float32, channels_last=False, device="cpu"):
    x = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.5).to(device=device, dtype=dtype)
    return _layout(x, channels_last)


def _grad_out(y):
    return torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape).sin()


def _on(backend, device):
    """Where a backend's test runs: triton on the device fixture's device (the GPU, or the CPU through
    the interpreter), torch on the CPU."""
    return device if backend == "triton" else torch.device("cpu")


def _affine(t, x):
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _padding_mask(C, d, device="cpu"):
    G = -(-C // d)
    return (torch.arange(G * d, device=device) >= C).reshape(G, d)


def _reference(x, d, method, weight, bias, T=5):
    """(y, mean, wm, grad x, grad weight, grad bias) of the reference composition."""
    xx = x.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    mean, cov = ref.group_cov(xx, d, last_group="smaller")
    wm = ref.group_whitening_matrix(cov, x.shape[1], method, 1e-5, T)
    y = ref.apply_whitening(xx, mean, wm) * _affine(w, xx) + _affine(b, xx)
    (y * _grad_out(y)).sum().backward()
    return y.detach(), mean.detach(), wm.detach(), xx.grad, w.grad, b.grad


def _backend_run(backend, x, d, method, weight, bias, T=5):
    xx = x.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    with sdecor.use_backend(backend):
        y, mean, wm = whiten.group_whiten_train(xx, d, method, 1e-5, T, w, b, last_group="smaller")
    (y * _grad_out(y)).sum().backward()
    return y, mean, wm, xx.grad, w.grad, b.grad


NAMES = ["y", "mean", "wm", "grad x", "grad weight", "grad bias"]


# ---------------------------------------------------------------------------------------------------
# the reference: each torch.split chunk whitened alone


@pytest.mark.parametrize("method", ["newton", "zca"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_reference_is_each_chunk_whitened_alone(case, method):
    shape, d = case
    x = _input(shape, torch.float64).requires_grad_()
    y = ref.group_whiten(x, d, method, last_group="smaller")
    chunks = torch.split(x, d, dim=1)
    y_split = torch.cat([ref.group_whiten(c, c.shape[1], method) for c in chunks], 1)
    torch.testing.assert_close(y, y_split, atol=0, rtol=0)
    g = _grad_out(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_split, x, g)[0],
                               atol=1e-12, rtol=1e-10)
    mean, cov = ref.group_cov(x.detach(), d, last_group="smaller")
    C = shape[1]
    G, r = -(-C // d), C - (-(-C // d) - 1) * d
    assert mean.shape == (G, d) and cov.shape == (G, d, d)
    mean_r, cov_r = ref.group_cov(chunks[-1].detach(), r)
    torch.testing.assert_close(mean[-1, :r], mean_r[0], atol=0, rtol=0)
    torch.testing.assert_close(cov[-1, :r, :r], cov_r[0], atol=0, rtol=0)
    assert not mean[-1, r:].any() and not cov[-1, r:].any() and not cov[-1, :, r:].any()


# ---------------------------------------------------------------------------------------------------
# torch backend (float64 and float32) and triton backend (float32) against the reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["newton", "zca"])
@pytest.mark.parametrize("layout_case", LAYOUT_CASES, ids=_layout_id)
def test_torch_backend_matches_reference(layout_case, method, dtype):
    (shape, d), channels_last = layout_case
    x = _input(shape, dtype, channels_last)
    weight, bias = torch.rand(shape[1], dtype=dtype) + 0.5, torch.randn(shape[1], dtype=dtype)
    got = _backend_run("torch", x, d, method, weight, bias)
    want = _reference(x, d, method, weight, bias)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, msg=f"{name} differs from the reference")
    assert got[0].stride() == like_format(torch.empty_like(x).contiguous(), x).stride()
    pad = _padding_mask(shape[1], d)
    assert not got[1][pad].any() and not got[2][pad].any() and not got[2].transpose(-1, -2)[pad].any()


@pytest.mark.parametrize("method", ["newton", "zca"])
@pytest.mark.parametrize("layout_case", LAYOUT_CASES, ids=_layout_id)
def test_triton_backend_matches_reference(layout_case, method, device, poison):
    (shape, d), channels_last = layout_case
    x = _input(shape, torch.float32, channels_last, device)
    weight, bias = torch.rand(shape[1], device=device) + 0.5, torch.randn(shape[1], device=device)
    got = _backend_run("triton", x, d, method, weight, bias)
    want = _reference(x, d, method, weight, bias)
    for name, a, b in zip(NAMES, got, want):
        assert torch.isfinite(a).all(), name                      # padding written (outputs NaN-poisoned)
        assert_close(a, b, msg=f"{name} differs from the reference")
    assert got[0].stride() == x.stride()
    pad = _padding_mask(shape[1], d, device)
    assert not got[1][pad].any() and not got[2][pad].any() and not got[2].transpose(-1, -2)[pad].any()


def test_triton_large_group_tiled_newton(device, poison):
    """d above the Newton kernels' register limit (scratch tiles, in the statistics finalize program)
    with a smaller last group of 5 channels."""
    x = _input((3, 45, 3), torch.float32, device=device)
    weight, bias = torch.rand(45, device=device) + 0.5, torch.randn(45, device=device)
    got = _backend_run("triton", x, 40, "newton", weight, bias, T=2)
    want = _reference(x, 40, "newton", weight, bias, T=2)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, msg=f"{name} differs from the reference")


def test_whitening_kernels_keep_the_padding_block_decoupled(device):
    """Newton-Schulz (forward and backward kernels) and the zca eigensolvers on the padded (G, d, d)
    matrices of a smaller last group give the r x r results of the group alone, zeros in the padding."""
    from sdecor_kernels import newton

    from sdecor import _ext

    d, r = 8, 3
    a = torch.randn(2, d, 20, device=device)
    cov = a @ a.transpose(-1, -2) / 20
    cov[-1, r:] = 0
    cov[-1, :, r:] = 0
    gw = torch.randn(2, d, d, device=device)
    gw[-1, r:] = 0
    gw[-1, :, r:] = 0
    C = d + r
    w = newton.newton_forward(cov, 1e-5, 4, None, C)
    g = newton.newton_backward(cov, gw, 1e-5, 4, None, C)
    c = cov[-1:, :r, :r].clone().requires_grad_()
    w_r = ref.whitening_matrix(c, "newton", 1e-5, 4)
    w_r.backward(gw[-1:, :r, :r])
    assert_close(w[-1:, :r, :r], w_r)
    assert_close(g[-1:, :r, :r], c.grad)
    assert not w[-1, r:].any() and not w[-1, :, r:].any() and not g[-1, r:].any() and not g[-1, :, r:].any()
    native = _ext.available() and (device.type == "cpu" or _ext.has_cuda())
    one = torch.ones(2, device=device)
    for eigh in [torch.linalg.eigh] + ([whiten_native.eigh_native] if native else []):
        evals, evecs, wz = zca_scaled(cov, 1e-5, one, C, eigh)
        gz = zca_backward_masked(gw, evals, evecs, 1e-5, one, C)
        c = cov[-1:, :r, :r].clone().requires_grad_()
        wz_r = ref.whitening_matrix(c, "zca", 1e-5)
        wz_r.backward(gw[-1:, :r, :r])
        assert_close(wz[-1:, :r, :r], wz_r)
        assert_close(gz[-1:, :r, :r], c.grad)
        assert not wz[-1, r:].any() and not gz[-1, :, r:].any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_group_cov_and_decorrelation_loss(backend, device, poison):
    x = _input((5, 24, 3, 2), torch.float32, device=_on(backend, device)).requires_grad_()
    with sdecor.use_backend(backend):
        mean, cov = sdecor.group_cov(x, 16, last_group="smaller")
    mean_r, cov_r = ref.group_cov(x, 16, last_group="smaller")
    assert_close(mean, mean_r)
    assert_close(cov, cov_r)
    g = torch.autograd.grad((mean.sin().sum() + cov.square().sum()), x)[0]
    g_r = torch.autograd.grad((mean_r.sin().sum() + cov_r.square().sum()), x)[0]
    assert_close(g, g_r)
    # the mean over the G groups of each group's own penalty (the last one over its 8 channels)
    for kind in ("decov", "corr"):
        with sdecor.use_backend(backend):
            loss = sdecor.decorrelation_loss(x, 16, kind, last_group="smaller")
        want = torch.stack([ref.decorrelation_loss(c, c.shape[1], kind) for c in torch.split(x, 16, 1)]).mean()
        assert_close(ref.decorrelation_loss(x, 16, kind, last_group="smaller"), want)
        assert_close(loss, want)
        assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(want, x)[0])
    with pytest.raises(ValueError, match="kind='corr' needs groups of at least 2 channels; the last group"):
        sdecor.decorrelation_loss(x[:, :17], 16, "corr", last_group="smaller")
    with pytest.raises(ValueError, match='last_group="smaller"'):
        sdecor.decorrelation_loss(x, 16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_matches_reference(backend, device):
    """A gradient penalty through the training path (create_graph=True)."""
    dev = _on(backend, device)
    x = _input((6, 5, 2), torch.float32, device=dev)
    weight = torch.rand(5, device=dev) + 0.5
    outs = {}
    for name in (backend, "reference"):
        xx = x.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        if name == "reference":
            y = ref.group_whiten(xx, 4, "newton", last_group="smaller") * _affine(w, xx)
        else:
            with sdecor.use_backend(backend):
                y = whiten.group_whiten_train(xx, 4, "newton", 1e-5, 5, w, None, last_group="smaller")[0]
        (gx,) = torch.autograd.grad((y * _grad_out(y)).sum(), xx, create_graph=True)
        outs[name] = torch.autograd.grad(gx.square().sum(), (xx, w))
    for a, b in zip(outs[backend], outs["reference"]):
        assert_close(a, b)


# ---------------------------------------------------------------------------------------------------
# the module: buffers, running statistics, eval


@pytest.mark.parametrize("method", ["newton", "zca"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_running_stats_and_eval(backend, method, device, poison):
    C, d, r = 24, 16, 8
    dev = _on(backend, device)
    layer = GroupWhitening(C, d, method=method, momentum=0.5, last_group="smaller", device=dev)
    assert layer.num_groups == 2 and layer.last_group == "smaller"
    assert layer.running_mean.shape == (2, d, 1) and layer.running_wm.shape == (2, d, d)
    want_wm = torch.eye(d, device=dev).repeat(2, 1, 1)
    want_wm[-1, r:, r:] = 0
    assert torch.equal(layer.running_wm, want_wm) and not layer.running_mean.any()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    xs = [_input((4, C, 3, 3), device=dev) for _ in range(2)]
    with sdecor.use_backend(backend):
        for x in xs:
            layer(x)
    # running <- 0.5 running + 0.5 batch, from the reference's batch statistics
    mean_run, wm_run = torch.zeros(2, d, device=dev), want_wm.clone()
    for x in xs:
        mean_b, cov_b = ref.group_cov(x, d, last_group="smaller")
        mean_run = 0.5 * mean_run + 0.5 * mean_b
        wm_run = 0.5 * wm_run + 0.5 * ref.group_whitening_matrix(cov_b, C, method, 1e-5, 5)
    assert_close(layer.running_mean.squeeze(-1), mean_run)
    assert_close(layer.running_wm, wm_run)
    pad = _padding_mask(C, d, dev)
    assert not layer.running_mean.squeeze(-1)[pad].any()
    assert not layer.running_wm[pad].any() and not layer.running_wm.transpose(-1, -2)[pad].any()
    layer.eval()
    x = _input((3, C, 2, 2), channels_last=True, device=dev).requires_grad_()
    with sdecor.use_backend(backend):
        y = layer(x)
    y_ref = ref.apply_whitening(x, layer.running_mean.squeeze(-1), layer.running_wm)
    y_ref = y_ref * _affine(layer.weight, x) + _affine(layer.bias, x)
    chunks = torch.split(x, d, dim=1)
    y_split = torch.cat([ref.apply_whitening(chunks[0], mean_run[:1], wm_run[:1]),
                         ref.apply_whitening(chunks[1], mean_run[1:, :r], wm_run[1:, :r, :r])], 1)
    assert_close(y_ref, y_split * _affine(layer.weight, x) + _affine(layer.bias, x))
    assert_close(y, y_ref)
    assert y.stride() == x.stride()
    g = _grad_out(y)
    got = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    want = torch.autograd.grad(y_ref, (x, layer.weight, layer.bias), g)
    for a, b in zip(got, want):
        assert_close(a, b)
    layer.reset_running_stats()
    assert torch.equal(layer.running_wm, want_wm) and not layer.running_mean.any()


def test_module_cumulative_average_keeps_padding_zero():
    layer = GroupWhitening(9, 4, momentum=None, affine=False, last_group="smaller")
    with sdecor.use_backend("torch"):
        for _ in range(3):
            layer(_input((5, 9, 2)))
    pad = _padding_mask(9, 4)
    assert int(layer.num_batches_tracked) == 3
    assert not layer.running_mean.squeeze(-1)[pad].any()
    assert not layer.running_wm[pad].any() and not layer.running_wm.transpose(-1, -2)[pad].any()
    assert (layer.running_wm[-1, 0, 0] > 0) and torch.isfinite(layer.running_wm).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_smaller_bitwise_equal_to_even_where_d_divides_c(backend, device):
    dev = _on(backend, device)
    x = _input((3, 16, 3, 3), device=dev)
    layers = {}
    for last_group in ("even", "smaller"):
        torch.manual_seed(1)
        layer = GroupWhitening(16, 8, method="zca", last_group=last_group, device=dev)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
        xx = x.clone().requires_grad_()
        with sdecor.use_backend(backend):
            y = layer(xx)
            y.backward(_grad_out(y))
            layer.eval()
            y_eval = layer(x)
        layers[last_group] = (y, xx.grad, layer.weight.grad, layer.bias.grad, y_eval, *layer.state_dict().values())
    assert "last_group='smaller'" in repr(GroupWhitening(16, 8, last_group="smaller"))
    for a, b in zip(layers["even"], layers["smaller"]):
        assert torch.equal(a, b)
    with sdecor.use_backend(backend):
        y_even = sdecor.group_whiten(x, 8)
        assert torch.equal(sdecor.group_whiten(x, 8, last_group="smaller"), y_even)


def test_errors_name_the_option():
    x = torch.randn(4, 24, 3)
    with pytest.raises(ValueError, match='last_group="smaller"'):
        GroupWhitening(24, 16)
    with pytest.raises(ValueError, match='valid group sizes.*last_group="smaller"'):
        SyncGroupWhitening(24, 16)
    for fn in (sdecor.group_cov, sdecor.group_whiten, ref.group_cov, ref.group_whiten):
        with pytest.raises(ValueError, match='last_group="smaller"'):
            fn(x, 16)
    with pytest.raises(ValueError, match="last_group must be one of"):
        GroupWhitening(24, 16, last_group="uneven")
    with pytest.raises(ValueError, match="last_group must be one of"):
        sdecor.group_whiten(x, 8, last_group=None)
    with pytest.raises(ValueError, match="num_channels"):
        GroupWhitening(24, 0, last_group="smaller")
    # given statistics of G groups of d hold (G-1) d < C <= G d channels
    with pytest.raises(ValueError, match="G\\*d"):
        whiten.group_whiten_eval(x, torch.zeros(4, 8), torch.zeros(4, 8, 8))
    y = whiten.group_whiten_eval(x, torch.zeros(2, 16), torch.eye(16).repeat(2, 1, 1))
    assert torch.equal(y, x)


def test_convert_sync_keeps_the_option():
    net = torch.nn.Sequential(GroupWhitening(24, 16, last_group="smaller"))
    sync = SyncGroupWhitening.convert_sync_whitening(net)
    assert isinstance(sync[0], SyncGroupWhitening) and sync[0].last_group == "smaller"
    back = SyncGroupWhitening.revert_sync_whitening(sync)
    assert type(back[0]) is GroupWhitening and back[0].last_group == "smaller"
    assert "last_group='smaller'" in repr(back[0])


# ---------------------------------------------------------------------------------------------------
# synchronised statistics, in this process (a world of one rank: the packing, the combination and
# the passes of both backends on the padded layout; tests/test_sync_whitening.py has real ranks)


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("method", ["newton", "zca"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", [((4, 24, 3, 3), 16), ((9, 5), 8)], ids=_id)
def test_sync_passes_match_group_whitening(world_of_one, case, backend, method, device):
    shape, d = case
    dev = _on(backend, device)
    x = _input(shape, channels_last=len(shape) == 4, device=dev)
    weight, bias = torch.rand(shape[1], device=dev) + 0.5, torch.randn(shape[1], device=dev)
    runs = []
    for sync in (True, False):
        xx, w, b = (t.clone().requires_grad_() for t in (x, weight, bias))
        with sdecor.use_backend(backend):
            if sync:
                y, mean, wm, n = whiten_sync.run_train_sync(xx, d, method, 1e-5, 5, w, b)
                assert int(n) == x.numel() // x.shape[1]
            else:
                y, mean, wm = whiten.run_train(xx, d, method, 1e-5, 5, w, b)
        (y * _grad_out(y)).sum().backward()
        runs.append((y, mean, wm, xx.grad, w.grad, b.grad))
    for name, a, b in zip(NAMES, *runs):
        assert_close(a, b, msg=name)
    assert runs[0][0].stride() == x.stride()
