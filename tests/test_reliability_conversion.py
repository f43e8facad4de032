"""A conversion keeps every property of the layer it replaces that has a counterpart, as
torch.nn.SyncBatchNorm.convert_sync_batchnorm does: the parameters' requires_grad (a frozen layer
stays frozen), the training mode (of the layer alone: the drop and act modules an *Act layer shares
keep theirs), the device and dtype of the parameters and of the running statistics, the parameter
objects where their shapes agree (so gradients and an optimizer's references carry over), the
registration order of weight and bias, and the layer's place among its parent's children.
convert_whitening, convert_iternorm and SyncGroupWhitening.convert_sync_whitening /
revert_sync_whitening, on frozen, eval-mode, float64 and meta-device models."""

import pytest
import torch
from torch import nn

from sdecor.convert import convert_iternorm, convert_whitening
from sdecor.nn import GroupWhitening, GroupWhiteningAct, SyncGroupWhitening, SyncGroupWhiteningAct

import iternorm_flexgroup_standin
import iternorm_standin

F64, META = torch.float64, torch.device("meta")


def _bn_net(dtype=None, device=None, bn=nn.BatchNorm2d):
    """conv, bn, relu, conv, bn, a trailing module: the bn layers in the middle of their parent."""
    f = {"dtype": dtype, "device": device}
    return nn.Sequential(nn.Conv2d(3, 8, 1, **f), bn(8, **f), nn.ReLU(), nn.Conv2d(8, 8, 1, **f), bn(8, **f),
                         nn.Flatten())


def _flags(layer):
    return [(n, p.requires_grad, p.dtype, p.device) for n, p in layer.named_parameters(recurse=False)]


def _buffer_meta(layer):
    return [(n, b.dtype, b.device) for n, b in layer.named_buffers(recurse=False)]


def _check_kept(old, new, shares_parameters=True):
    assert new.training == old.training
    old_params = dict(old.named_parameters(recurse=False))
    new_params = dict(new.named_parameters(recurse=False))
    assert list(new_params) == ["weight", "bias"]                       # registration order
    for name in ("weight", "bias"):
        a, b = old_params[name], new_params[name]
        assert b.requires_grad == a.requires_grad, name
        assert (b.dtype, b.device) == (a.dtype, a.device), name
        if shares_parameters:
            assert b is a, name


# ---------------------------------------------------------------------------------------------------
# convert_whitening


@pytest.mark.parametrize("frozen", ["both", "weight", "none"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_convert_whitening_keeps_requires_grad_mode_and_parameters(frozen, training):
    net = _bn_net()
    for bn in (net[1], net[4]):
        if frozen in ("both", "weight"):
            bn.weight.requires_grad_(False)
        if frozen == "both":
            bn.bias.requires_grad_(False)
    net.train(training)
    net[4].train(not training)                                          # a layer in the other mode
    olds = [net[1], net[4]]
    params = list(net.parameters())
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    names = list(net._modules)
    convert_whitening(net, num_channels=4)
    assert list(net._modules) == names                                  # same place among the children
    assert [type(net[i]) for i in (1, 4)] == [GroupWhitening, GroupWhitening]
    for old, new in zip(olds, (net[1], net[4])):
        _check_kept(old, new)
    # the same Parameter objects, in the same order: an optimizer built before still updates them
    assert all(a is b for a, b in zip(net.parameters(), params)) and len(list(net.parameters())) == len(params)
    net(torch.randn(4, 3, 5, 5)).sum().backward()
    opt.step()
    if frozen == "both":
        assert net[1].weight.grad is None and net[1].bias.grad is None


@pytest.mark.parametrize("dtype, device", [(F64, None), (torch.bfloat16, None), (None, META)],
                         ids=["float64", "bfloat16", "meta"])
def test_convert_whitening_keeps_device_and_dtype(dtype, device):
    net = _bn_net(dtype, device).eval()
    net[1].weight.requires_grad_(False)
    olds = [net[1], net[4]]
    report = convert_whitening(net, num_channels=4)
    assert [n for n, _ in report.replaced] == ["1", "4"]
    want = (dtype or torch.float32, META if device is not None else torch.device("cpu"))
    for old, new in zip(olds, (net[1], net[4])):
        _check_kept(old, new)
        assert all((b.dtype, b.device) == want for n, b in new.named_buffers() if n != "num_batches_tracked")
        assert new.num_batches_tracked.device == want[1]


def test_convert_whitening_keeps_the_dtype_of_running_statistics_that_differ_from_the_weight():
    """A BatchNorm whose running statistics are float64 beside float32 parameters: the whitening
    layer's running statistics are float64 too, its parameters the very float32 ones."""
    net = _bn_net()
    bn = net[1]
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.running_mean.normal_()
    net.eval()
    x = torch.randn(2, 3, 4, 4)
    expected = net(x)                                   # (BatchNorm itself takes one dtype for all)
    bn.running_mean = bn.running_mean.double()          # the same values in float64
    bn.running_var = bn.running_var.double()
    convert_whitening(net, num_channels=4)
    assert net[1].running_mean.dtype == F64 and net[1].running_wm.dtype == F64
    assert net[1].weight is bn.weight and net[1].weight.dtype == torch.float32
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)


def test_convert_whitening_options_without_a_counterpart_make_new_parameters():
    """affine=True for a BatchNorm without an affine map: new trainable parameters (nothing to keep)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8, affine=False))
    convert_whitening(net, num_channels=4, affine=True)
    assert net[1].weight.requires_grad and net[1].bias.requires_grad
    net = _bn_net()
    net[1].weight.requires_grad_(False)
    convert_whitening(net, num_channels=4, affine=False)
    assert net[1].weight is None and not any(True for _ in net[1].parameters())


def test_sync_batchnorm_conversion_keeps_the_flags(fake_world_of_two):
    group = torch.distributed.new_group([0, 1])
    net = _bn_net(bn=lambda c, **f: nn.SyncBatchNorm(c, process_group=group, **f)).eval()
    net[1].weight.requires_grad_(False)
    net[4].train()
    olds = [net[1], net[4]]
    convert_whitening(net, num_channels=4)
    for old, new in zip(olds, (net[1], net[4])):
        assert type(new) is SyncGroupWhitening and new.process_group is group
        _check_kept(old, new)


def test_timm_batchnorm_act_keeps_the_modes_of_its_drop_and_act():
    timm = pytest.importorskip("timm")
    net = nn.Sequential(nn.Conv2d(3, 8, 1), timm.layers.BatchNormAct2d(8, act_layer=nn.GELU, drop_layer=nn.Dropout),
                        nn.Flatten())
    bn = net[1]
    bn.eval()
    bn.drop.train()                                                     # its own mode, kept
    bn.weight.requires_grad_(False)
    convert_whitening(net, num_channels=4)
    new = net[1]
    assert type(new) is GroupWhiteningAct and new.drop is bn.drop and new.act is bn.act
    assert not new.training and new.drop.training and not new.act.training
    _check_kept(bn, new)
    assert list(new._modules) == ["drop", "act"]


def test_a_rejected_conversion_changes_no_mode():
    """A layer whose eps whitening refuses, after another one was built: nothing changed, the modes
    of drop and act included."""
    timm = pytest.importorskip("timm")
    net = nn.Sequential(nn.Conv2d(3, 8, 1), timm.layers.BatchNormAct2d(8, act_layer=nn.GELU), nn.BatchNorm2d(8))
    net[1].eval()
    net[1].act.train()
    net[2].eps = 0.0
    with pytest.raises(ValueError, match="eps of '2'"):
        convert_whitening(net, num_channels=4)
    assert type(net[1]) is timm.layers.BatchNormAct2d and net[1].act.training and not net[1].training


# ---------------------------------------------------------------------------------------------------
# convert_iternorm


def _iternorm(kind, C=12, d=4, dtype=F64):
    module = {"even": iternorm_standin, "flex": iternorm_flexgroup_standin}[kind]
    layer = module.IterNorm(C, d, dtype=dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    return nn.Sequential(nn.Identity(), layer, nn.ReLU())


@pytest.mark.parametrize("kind, C", [("even", 12), ("flex", 10)])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_convert_iternorm_keeps_requires_grad_mode_device_and_dtype(kind, C, frozen, training):
    net = _iternorm(kind, C).train(training)
    old = net[1]
    old.weight.requires_grad_(not frozen)
    old.bias.requires_grad_(True)
    names = list(net._modules)
    report = convert_iternorm(net)
    assert [n for n, _ in report.replaced] == ["1"] and list(net._modules) == names
    new = net[1]
    assert type(new) is GroupWhitening and new.training == training
    assert new.weight.requires_grad == (not frozen) and new.bias.requires_grad
    assert list(dict(new.named_parameters())) == ["weight", "bias"]
    assert all(t.dtype == F64 for t in (new.weight, new.bias, new.running_mean, new.running_wm))


def test_convert_iternorm_keeps_the_dtype_of_each():
    """float32 parameters beside float64 running statistics: each kept."""
    net = _iternorm("even", dtype=F64)
    old = net[1]
    old.weight = nn.Parameter(old.weight.detach().float())
    old.bias = nn.Parameter(old.bias.detach().float())
    convert_iternorm(net)
    assert net[1].weight.dtype == torch.float32 and net[1].running_wm.dtype == F64


def test_convert_iternorm_on_meta():
    net = _iternorm("even").to(META)
    net[1].weight.requires_grad_(False)
    convert_iternorm(net)
    new = net[1]
    assert type(new) is GroupWhitening and not new.weight.requires_grad
    assert all(t.device == META for t in (new.weight, new.running_wm, new.num_batches_tracked))


# ---------------------------------------------------------------------------------------------------
# SyncGroupWhitening.convert_sync_whitening / revert_sync_whitening


def _whitened(dtype=None, device=None):
    f = {"dtype": dtype, "device": device}
    return nn.Sequential(nn.Conv2d(3, 8, 1, **f), GroupWhiteningAct(8, 4, act=nn.ReLU(), drop=nn.Dropout(), **f),
                         nn.Conv2d(8, 8, 1, **f), GroupWhitening(8, 2, **f), nn.Flatten())


@pytest.mark.parametrize("dtype, device", [(None, None), (F64, None), (None, META)], ids=["float32", "float64",
                                                                                         "meta"])
def test_sync_conversion_and_back_keep_everything(dtype, device):
    net = _whitened(dtype, device)
    net[1].weight.requires_grad_(False)
    net[1].eval()
    net[1].drop.train()
    net[3].bias.requires_grad_(False)
    names = list(net._modules)
    before = [_flags(net[i]) + _buffer_meta(net[i]) for i in (1, 3)]
    params = list(net.parameters())
    modes = [m.training for m in net.modules()]
    assert modes[2:5] == [False, True, False]           # net[1], its drop, its act
    for convert, kinds in ((SyncGroupWhitening.convert_sync_whitening, (SyncGroupWhiteningAct, SyncGroupWhitening)),
                           (SyncGroupWhitening.revert_sync_whitening, (GroupWhiteningAct, GroupWhitening))):
        assert convert(net) is net
        assert list(net._modules) == names
        assert (type(net[1]), type(net[3])) == kinds
        assert [_flags(net[i]) + _buffer_meta(net[i]) for i in (1, 3)] == before
        assert all(a is b for a, b in zip(net.parameters(), params))
        assert [m.training for m in net.modules()] == modes
