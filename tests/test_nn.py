"""GroupWhitening: construction, training / eval semantics, running statistics, state dicts, gradients."""

import pytest
import torch

import sdecor
from sdecor import reference as ref
from sdecor.ops import whiten
from sdecor.nn import GroupWhitening
from sdecor.testing import assert_close, tol

from conftest import INTERPRET


def affine_shape(x):
    return (1, -1) + (1,) * (x.dim() - 2)


def expected_train(x, gw, weight=None, bias=None):
    """Reference composition: weight * W (x - mean) + bias with batch statistics."""
    y = ref.group_whiten(x, gw.num_channels, gw.method, gw.eps, gw.T)
    if weight is not None:
        y = y * weight.reshape(affine_shape(x)).to(y.dtype)
    if bias is not None:
        y = y + bias.reshape(affine_shape(x)).to(y.dtype)
    return y


def expected_eval(x, mean, wm, weight=None, bias=None):
    y = ref.apply_whitening(x, mean, wm)
    if weight is not None:
        y = y * weight.reshape(affine_shape(x)).to(y.dtype)
    if bias is not None:
        y = y + bias.reshape(affine_shape(x)).to(y.dtype)
    return y


def batch_stats(x, gw):
    mean, cov = ref.group_cov(x, gw.num_channels)
    return mean, ref.whitening_matrix(cov, gw.method, gw.eps, gw.T)


def randomize_affine(gw):
    with torch.no_grad():
        gw.weight.copy_(torch.randn_like(gw.weight))
        gw.bias.copy_(torch.randn_like(gw.bias))


def snapshot(gw):
    return {k: v.clone() for k, v in gw.state_dict().items()}


def assert_same_state(gw, snap):
    now = gw.state_dict()
    assert now.keys() == snap.keys()
    for k in snap:
        assert torch.equal(now[k], snap[k]), k


# ---------------------------------------------------------------------------------------------------
# construction


def test_defaults_buffers_and_repr():
    gw = GroupWhitening(48)
    assert gw.num_channels == 16 and gw.num_groups == 3 and gw.method == "newton" and gw.T == 5
    assert gw.weight.shape == (48,) and gw.bias.shape == (48,)
    assert torch.equal(gw.weight, torch.ones(48)) and torch.equal(gw.bias, torch.zeros(48))
    assert gw.running_mean.shape == (3, 16, 1) and torch.equal(gw.running_mean, torch.zeros(3, 16, 1))
    assert torch.equal(gw.running_wm, torch.eye(16).expand(3, 16, 16))
    assert gw.num_batches_tracked.dtype == torch.long and int(gw.num_batches_tracked) == 0
    assert set(gw.state_dict()) == {"weight", "bias", "running_mean", "running_wm", "num_batches_tracked"}
    assert repr(gw) == ("GroupWhitening(48, num_channels=16, method='newton', T=5, eps=1e-05, "
                        "momentum=0.1, affine=True, track_running_stats=True)")


def test_no_affine_no_stats():
    gw = GroupWhitening(8, 4, affine=False, track_running_stats=False)
    assert gw.weight is None and gw.bias is None
    assert gw.running_mean is None and gw.running_wm is None and gw.num_batches_tracked is None
    assert list(gw.state_dict()) == []


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(num_features=0), ValueError, "num_features"),
    (dict(num_features=48, num_channels=5), ValueError, "[1, 2, 3, 4, 6, 8, 12, 16, 24, 48]"),
    (dict(num_features=48, num_channels=2.0), TypeError, "num_channels"),
    (dict(num_features=48, method="svd"), ValueError, "method"),
    (dict(num_features=48, T=0), ValueError, "T"),
    (dict(num_features=48, T=101), ValueError, "T"),
    (dict(num_features=48, eps=-1e-3), ValueError, "eps"),
    (dict(num_features=48, momentum=1.5), ValueError, "momentum"),
    (dict(num_features=48, momentum=-0.1), ValueError, "momentum"),
    (dict(num_features=48, momentum="0.1"), ValueError, "momentum"),
    (dict(num_features=48, affine=1), TypeError, "affine"),
], ids=["C0", "d-not-divisor", "d-float", "method", "T0", "T101", "eps", "mom>1", "mom<0", "mom-str",
        "affine-int"])
def test_constructor_validation(kwargs, exc, words):
    with pytest.raises(exc) as info:
        GroupWhitening(**kwargs)
    assert words in str(info.value)


def test_input_validation_leaves_state_alone():
    gw = GroupWhitening(32, 8)
    snap = snapshot(gw)
    with pytest.raises(ValueError, match="2D to 5D"):
        gw(torch.randn(32))
    with pytest.raises(ValueError, match="2D to 5D"):
        gw(torch.randn(2, 32, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="32 channels"):
        gw(torch.randn(4, 16, 3))
    with pytest.raises(TypeError, match="floating-point"):
        gw(torch.ones(4, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="m = N"):          # one value per channel: no statistics
        gw(torch.randn(1, 32))
    assert_same_state(gw, snap)


def test_module_calls_the_dispatch(monkeypatch):
    calls = []
    real_train, real_eval = whiten.run_train, whiten.run_eval

    def spy_train(*args, **kwargs):
        calls.append("train")
        return real_train(*args, **kwargs)

    def spy_eval(*args, **kwargs):
        calls.append("eval")
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(whiten, "run_train", spy_train)
    monkeypatch.setattr(whiten, "run_eval", spy_eval)
    gw = GroupWhitening(8, 4)
    x = torch.randn(5, 8, 3)
    gw(x)
    gw.eval()
    gw(x)
    assert calls == ["train", "eval"]


# ---------------------------------------------------------------------------------------------------
# training and eval semantics


@pytest.mark.parametrize("shape", [(7, 48), (3, 48, 11), (3, 48, 7, 7), (2, 48, 3, 4, 5)],
                         ids=["2d", "3d", "4d", "5d"])
@pytest.mark.parametrize("method", ["newton", "zca"])
def test_train_output_matches_reference(shape, method):
    gw = GroupWhitening(48, 16, method=method, T=7, eps=1e-4).double()
    randomize_affine(gw)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    y = gw(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, expected_train(x, gw, gw.weight, gw.bias))


def test_running_stats_by_hand():
    gw = GroupWhitening(12, 4, momentum=0.25, T=6).double()
    r_mean = torch.zeros(3, 4, 1, dtype=torch.float64)
    r_wm = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    for step in range(3):
        x = torch.randn(6, 12, 5, dtype=torch.float64) * (step + 1) + step
        gw(x)
        mean, wm = batch_stats(x, gw)
        r_mean = 0.75 * r_mean + 0.25 * mean.unsqueeze(-1)
        r_wm = 0.75 * r_wm + 0.25 * wm
        assert_close(gw.running_mean, r_mean)
        assert_close(gw.running_wm, r_wm)
        assert int(gw.num_batches_tracked) == step + 1


def test_momentum_none_is_cumulative_average():
    gw = GroupWhitening(8, 4, momentum=None, method="zca").double()
    means, wms = [], []
    for step in range(4):
        x = torch.randn(5, 8, 3, 3, dtype=torch.float64) + step
        gw(x)
        mean, wm = batch_stats(x, gw)
        means.append(mean.unsqueeze(-1))
        wms.append(wm)
        assert_close(gw.running_mean, torch.stack(means).mean(0))
        assert_close(gw.running_wm, torch.stack(wms).mean(0))
    assert int(gw.num_batches_tracked) == 4


def test_momentum_zero_keeps_running_stats():
    gw = GroupWhitening(8, 4, momentum=0.0)
    gw(torch.randn(6, 8, 2))
    assert torch.equal(gw.running_mean, torch.zeros(2, 4, 1))
    assert torch.equal(gw.running_wm, torch.eye(4).expand(2, 4, 4))
    assert int(gw.num_batches_tracked) == 1


def test_eval_uses_running_stats_and_does_not_update():
    gw = GroupWhitening(32, 8, momentum=0.5).double()
    randomize_affine(gw)
    for _ in range(3):
        gw(torch.randn(8, 32, 4, 4, dtype=torch.float64) * 3 - 1)
    gw.eval()
    snap = snapshot(gw)
    x = torch.randn(3, 32, 5, 5, dtype=torch.float64)
    y = gw(x)
    assert_close(y, expected_eval(x, gw.running_mean.squeeze(-1), gw.running_wm, gw.weight, gw.bias))
    # not the batch statistics
    assert not torch.allclose(y, expected_train(x, gw, gw.weight, gw.bias), atol=1e-3)
    assert_same_state(gw, snap)
    # eval works for a single sample (no batch statistics needed)
    assert gw(x[:1, :, :1, :1]).shape == (1, 32, 1, 1)


def test_track_running_stats_false_uses_batch_stats_in_eval():
    gw = GroupWhitening(16, 4, track_running_stats=False).double()
    randomize_affine(gw)
    x = torch.randn(6, 16, 3, 3, dtype=torch.float64)
    y_train = gw(x)
    gw.eval()
    y_eval = gw(x)
    want = expected_train(x, gw, gw.weight, gw.bias)
    assert_close(y_train, want)
    assert_close(y_eval, want)


def test_no_affine_train_and_eval():
    gw = GroupWhitening(16, 8, affine=False).double()
    x = torch.randn(4, 16, 5, dtype=torch.float64)
    assert_close(gw(x), expected_train(x, gw))
    gw.eval()
    assert_close(gw(x), expected_eval(x, gw.running_mean.squeeze(-1), gw.running_wm))


# ---------------------------------------------------------------------------------------------------
# state dicts


def test_state_dict_round_trip():
    gw = GroupWhitening(32, 16, method="zca", momentum=0.3)
    randomize_affine(gw)
    for _ in range(2):
        gw(torch.randn(4, 32, 6, 6))
    other = GroupWhitening(32, 16, method="zca", momentum=0.3)
    other.load_state_dict(gw.state_dict())
    for k, v in gw.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    gw.eval()
    other.eval()
    x = torch.randn(2, 32, 3, 3)
    assert torch.equal(gw(x), other(x))


@pytest.mark.parametrize("affine_shape_", [(1, 24, 1, 1), (1, 24)], ids=["1C11", "1C"])
def test_iternorm_state_dict_loads(affine_shape_):
    G, d = 3, 8
    wm = torch.linalg.qr(torch.randn(G, d, d)).Q * 0.5
    state = {
        "weight": torch.randn(affine_shape_),
        "bias": torch.randn(affine_shape_),
        "running_mean": torch.randn(G, d, 1),
        "running_wm": wm,
    }
    gw = GroupWhitening(24, d)
    gw.load_state_dict(state)                                 # strict: the counter may be absent
    assert gw.weight.shape == (24,) and torch.equal(gw.weight, state["weight"].reshape(24))
    assert torch.equal(gw.bias, state["bias"].reshape(24))
    assert torch.equal(gw.running_wm, wm) and torch.equal(gw.running_mean, state["running_mean"])
    assert int(gw.num_batches_tracked) == 0
    gw.eval()
    x = torch.randn(2, 24, 4, 4)
    assert_close(gw(x), expected_eval(x, state["running_mean"].squeeze(-1), wm, gw.weight, gw.bias))


def test_state_dict_wrong_shapes_rejected():
    gw = GroupWhitening(24, 8)
    bad = dict(gw.state_dict())
    bad["running_wm"] = torch.eye(4).expand(6, 4, 4).clone()   # groups of 4, not 8
    with pytest.raises(RuntimeError, match="running_wm"):
        gw.load_state_dict(bad)
    bad = dict(gw.state_dict())
    bad["weight"] = torch.ones(1, 12, 2)
    with pytest.raises(RuntimeError, match="weight"):
        gw.load_state_dict(bad)


# ---------------------------------------------------------------------------------------------------
# gradients and dtypes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["newton", "zca"])
def test_gradients_match_reference(method, dtype):
    gw = GroupWhitening(48, 16, method=method).to(dtype)
    randomize_affine(gw)
    x = (torch.randn(3, 48, 7, 7, dtype=dtype) + 1).requires_grad_()
    y = gw(x)
    g = torch.randn_like(y)
    gx, gwt, gb = torch.autograd.grad(y, (x, gw.weight, gw.bias), g)
    y_ref = expected_train(x, gw, gw.weight, gw.bias)
    rx, rw, rb = torch.autograd.grad(y_ref, (x, gw.weight, gw.bias), g)
    assert_close(y, y_ref)
    assert_close(gx, rx)
    assert_close(gwt, rw)
    assert_close(gb, rb)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_inputs(dtype):
    gw = GroupWhitening(32, 8)
    randomize_affine(gw)
    x = torch.randn(4, 32, 5, 5).to(dtype)
    y = gw(x)
    assert y.dtype == dtype
    assert gw.running_mean.dtype == torch.float32 and gw.running_wm.dtype == torch.float32
    x32 = x.float()
    assert_close(y, expected_train(x32, gw, gw.weight, gw.bias), dtype=dtype)
    mean, wm = batch_stats(x32, gw)
    assert_close(gw.running_mean, 0.9 * torch.zeros(4, 8, 1) + 0.1 * mean.unsqueeze(-1))
    assert_close(gw.running_wm, 0.9 * torch.eye(8) + 0.1 * wm)
    gw.eval()
    ye = gw(x)
    assert ye.dtype == dtype
    assert_close(ye, expected_eval(x32, gw.running_mean.squeeze(-1), gw.running_wm, gw.weight, gw.bias),
                 dtype=dtype)


def test_channels_last_input():
    gw = GroupWhitening(16, 8).double()
    x = torch.randn(3, 16, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = gw(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, expected_train(x.contiguous(), gw, gw.weight, gw.bias))


def test_failed_forward_leaves_running_stats_alone():
    gw = GroupWhitening(8, 4)
    gw(torch.randn(4, 8, 3))
    snap = snapshot(gw)
    with pytest.raises(ValueError):
        gw(torch.randn(1, 8, 1))
    assert_same_state(gw, snap)


# ---------------------------------------------------------------------------------------------------
# the module on the Triton backend (interpreter on CPU: small shapes)


needs_triton = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()),
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1")


@needs_triton
@pytest.mark.parametrize("method", ["newton", "zca"])
def test_module_on_triton_backend(method, device):
    gw = GroupWhitening(32, 16, method=method, momentum=0.5).to(device)
    randomize_affine(gw)
    twin = GroupWhitening(32, 16, method=method, momentum=0.5).to(device)
    twin.load_state_dict(gw.state_dict())
    x = torch.randn(3, 32, 4, 4, device=device) + 0.5
    g = torch.randn_like(x)
    xt = x.clone().requires_grad_()
    with sdecor.use_backend("triton"):
        y = gw(xt)
        y.backward(g)
    xr = x.clone().requires_grad_()
    with sdecor.use_backend("torch"):
        y_ref = twin(xr)
        y_ref.backward(g)
    assert_close(y, y_ref)
    assert_close(xt.grad, xr.grad)
    assert_close(gw.weight.grad, twin.weight.grad)
    assert_close(gw.bias.grad, twin.bias.grad)
    assert_close(gw.running_mean, twin.running_mean)
    assert_close(gw.running_wm, twin.running_wm)
    gw.eval()
    twin.eval()
    with sdecor.use_backend("triton"):
        ye = gw(x)
    with sdecor.use_backend("torch"):
        ye_ref = twin(x)
    assert_close(ye, ye_ref)
    assert tol(torch.float32)  # the float32 tolerance applies (interpreter: exact fp32 dot)


def test_output_can_be_modified_in_place():
    net = torch.nn.Sequential(GroupWhitening(16, 8), torch.nn.ReLU(inplace=True))
    x = torch.randn(4, 16, 3, 3, requires_grad=True)
    y = net(x)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
