"""convert_whitening: which layers are replaced, what carries over, argument checks, real networks."""

import copy

import pytest
import torch
from torch import nn

from sdecor.convert import ConversionReport, convert_whitening
from sdecor.nn import GroupWhitening
from sdecor.testing import assert_close


def small_net(dtype=torch.float32):
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(32, 24, 1), nn.BatchNorm2d(24, eps=1e-3, momentum=None)),
        nn.Flatten(2),
        nn.BatchNorm1d(24, affine=False),
        nn.Flatten(),
        nn.Linear(24 * 16, 10),
        nn.BatchNorm1d(10),
    ).to(dtype)
    # non-trivial parameters and running statistics
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return net


def types(model):
    return [(n, type(m)) for n, m in model.named_modules()]


def test_replaces_divisible_layers_and_reports():
    net = small_net()
    report = convert_whitening(net, num_channels=8)
    assert isinstance(report, ConversionReport)
    assert [n for n, _ in report.replaced] == ["1", "3.1", "5"]
    assert [n for n, _ in report.skipped] == ["8"]
    assert "10 channels are not divisible by num_channels=8" in report.skipped[0][1]
    assert "[1, 2, 5, 10]" in report.skipped[0][1]
    assert isinstance(net[1], GroupWhitening) and isinstance(net[3][1], GroupWhitening)
    assert isinstance(net[5], GroupWhitening) and isinstance(net[8], nn.BatchNorm1d)
    text = str(report)
    assert text.splitlines()[0] == "convert_whitening: replaced 3 layer(s), skipped 1"
    assert "3.1" in text and "BatchNorm2d(24) -> GroupWhitening(24, num_channels=8" in text


def test_carries_over_parameters_and_options():
    net = small_net()
    before = copy.deepcopy(net)
    convert_whitening(net, num_channels=8, method="zca", T=9)
    for name in ("1", "3.1", "5"):
        bn, gw = before.get_submodule(name), net.get_submodule(name)
        assert gw.method == "zca" and gw.T == 9 and gw.num_channels == 8
        assert gw.eps == bn.eps and gw.momentum == bn.momentum and gw.affine == bn.affine
        assert gw.track_running_stats == bn.track_running_stats
        if bn.affine:
            assert torch.equal(gw.weight, bn.weight) and torch.equal(gw.bias, bn.bias)
        assert torch.equal(gw.running_mean.reshape(-1), bn.running_mean)
        assert int(gw.num_batches_tracked) == 7
        assert gw.training == bn.training
    assert net[3][1].momentum is None and net[3][1].eps == 1e-3
    assert net[5].weight is None


def test_keyword_options_override_layer_settings():
    net = small_net()
    convert_whitening(net, num_channels=8, momentum=0.5, eps=1e-4, affine=True,
                      track_running_stats=False)
    gw = net[5]
    assert gw.momentum == 0.5 and gw.eps == 1e-4 and gw.affine and not gw.track_running_stats
    assert torch.equal(gw.weight, torch.ones(24)) and torch.equal(gw.bias, torch.zeros(24))


def test_eval_output_unchanged_right_after_conversion():
    """Running W = diag((var + eps)^-1/2): the converted network computes what the BatchNorms did."""
    net = small_net(torch.float64).eval()
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    before = net(x)
    convert_whitening(net, num_channels=8, method="newton")
    assert isinstance(net[1], GroupWhitening)
    assert_close(net(x), before)


def test_same_device_and_dtype():
    net = small_net(torch.float64)
    convert_whitening(net, num_channels=4)
    for m in net.modules():
        if isinstance(m, GroupWhitening):
            for t in list(m.parameters()) + [m.running_mean, m.running_wm]:
                assert t.dtype == torch.float64 and t.device == torch.device("cpu")
    net(torch.randn(2, 3, 4, 4, dtype=torch.float64)).sum().backward()


def test_include_exclude_globs():
    net = small_net()
    report = convert_whitening(net, num_channels=8, include="3.*")
    assert [n for n, _ in report.replaced] == ["3.1"] and report.skipped == []
    net = small_net()
    report = convert_whitening(net, num_channels=8, exclude=["3.*", "5"])
    assert [n for n, _ in report.replaced] == ["1"]
    net = small_net()
    report = convert_whitening(net, num_channels=8, include=["[15]"], exclude="5")
    assert [n for n, _ in report.replaced] == ["1"]


def test_shared_layer_replaced_by_one_module():
    bn = nn.BatchNorm1d(8)
    net = nn.Sequential(nn.Linear(8, 8), bn, nn.Linear(8, 8), bn)
    report = convert_whitening(net, num_channels=4)
    assert [n for n, _ in report.replaced] == ["1", "3"]
    assert isinstance(net[1], GroupWhitening) and net[1] is net[3]


def test_root_batchnorm_is_skipped():
    bn = nn.BatchNorm2d(16)
    report = convert_whitening(bn, num_channels=8)
    assert report.replaced == [] and report.skipped[0][0] == "" and "container" in report.skipped[0][1]


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(num_channels=0), ValueError, "num_channels"),
    (dict(num_channels=8, method="pca"), ValueError, "method"),
    (dict(num_channels=8, T=0), ValueError, "T"),
    (dict(num_channels=8, eps=-1.0), ValueError, "eps"),
    (dict(num_channels=8, momentum=2.0), ValueError, "momentum"),
    (dict(num_channels=8, affine="yes"), TypeError, "affine"),
    (dict(num_channels=8, include=3), TypeError, "include"),
    (dict(num_channels=8, exclude=["1", 2]), TypeError, "exclude"),
    (dict(num_channels=8, groups=4), TypeError, "groups"),
], ids=["d0", "method", "T", "eps", "momentum", "affine", "include", "exclude", "unknown-kw"])
def test_invalid_arguments_leave_model_untouched(kwargs, exc, words):
    net = small_net()
    state = copy.deepcopy(net.state_dict())
    layout = types(net)
    with pytest.raises(exc) as info:
        convert_whitening(net, **kwargs)
    assert words in str(info.value)
    assert types(net) == layout
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_model_type_checked():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert_whitening([nn.BatchNorm1d(4)])


# ---------------------------------------------------------------------------------------------------
# torchvision networks (random weights, small inputs)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2"])
def test_torchvision_networks(arch):
    torchvision = pytest.importorskip("torchvision")
    kwargs = {"num_classes": 10}
    model = getattr(torchvision.models, arch)(weights=None, **kwargs)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    report = convert_whitening(model, num_channels=16)
    assert len(report.replaced) + len(report.skipped) == n_bn
    assert len(report.replaced) > 0
    assert sum(isinstance(m, GroupWhitening) for m in model.modules()) == len(report.replaced)
    for name, reason in report.skipped:
        C = model.get_submodule(name).num_features
        assert C % 16 != 0 and "not divisible" in reason
    if arch == "mobilenet_v2":
        assert any(model.get_submodule(n).num_features == 24 for n, _ in report.skipped)
    x = torch.randn(2, 3, 64, 64)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        model.zero_grad(set_to_none=True)
        out = model(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        out.square().mean().backward()
        grads = [m.weight.grad for m in model.modules() if isinstance(m, GroupWhitening)]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    gws = [m for m in model.modules() if isinstance(m, GroupWhitening)]
    assert all(int(m.num_batches_tracked) == 1 for m in gws)
