"""convert_whitening and convert_iternorm: which layers are replaced or skipped and why, what carries over,
argument checks, and the same function before and after on real networks (torchvision, timm)."""

import copy
import importlib

import pytest
import torch
from torch import nn

from sdecor.convert import _KNOWN, ConversionReport, convert_iternorm, convert_whitening
from sdecor.nn import GroupWhitening, GroupWhiteningAct, SyncGroupWhitening, SyncGroupWhiteningAct
from sdecor.testing import assert_close

import iternorm_flexgroup_standin
import iternorm_standin


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


# ---------------------------------------------------------------------------------------------------
# helpers for whole networks: cheap random weights, non-trivial BatchNorm state, output comparison


def randomize_batchnorms(model):
    """Non-trivial running statistics and affine maps in every BatchNorm layer, so that a conversion
    that loses or misplaces any part of a layer's function shows in the output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                if m.track_running_stats:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    return model


_POOL = torch.rand(1_000_003, generator=torch.Generator().manual_seed(0)) * 2 - 1   # a prime length


def fill_parameters(model):
    """Every parameter from a fixed pseudo-random pool in [-1, 1) (copies, no random draws per
    element: a 600M-parameter network fills in under a second), weights scaled to variance 1 / fan_in
    (LeCun's uniform initialisation), then randomize_batchnorms.

    Kaiming's variance 2 / fan_in makes the deepest of these networks chaotic in fp32: efficientnet_v2
    then amplifies rounding so much that its fp32 output is O(1) away from its fp64 output, with or
    without conversion; at 1 / fan_in every network here reproduces its output to ~1e-6."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            flat, done = p.view(-1), 0
            while done < flat.numel():
                k = min(flat.numel() - done, _POOL.numel() - offset)
                flat[done:done + k].copy_(_POOL[offset:offset + k])
                done, offset = done + k, (offset + k) % _POOL.numel()
            p.mul_((3.0 / p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1)
    return randomize_batchnorms(model)


@pytest.fixture
def no_weight_init(monkeypatch):
    """torch.nn.init's functions do nothing inside the test: networks are built at the cost of
    allocating them, and fill_parameters gives every parameter its value."""
    for name, fn in vars(nn.init).items():
        if callable(fn) and name.endswith("_") and not name.startswith("_"):
            monkeypatch.setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)


@pytest.fixture
def one_thread():
    """Batches of one small image gain nothing from intra-op threads, and on a busy machine their
    spinning costs several times the work (the torchvision sweep: 31 s of CPU on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_function(after, before, msg=None):
    """fp32 outputs of a network before and after conversion agree to fp32 rounding, relative to the
    output's scale (a deep network amplifies rounding, not a lost activation or statistic)."""
    assert torch.isfinite(before).all() and before.abs().max() > 0, msg
    scale = before.abs().max()
    assert_close(after / scale, before / scale, msg=msg)


def layer_types(model):
    return {n: type(m) for n, m in model.named_modules()}


# ---------------------------------------------------------------------------------------------------
# BatchNorm subclasses: known ones keep their behaviour, unknown ones that override forward are skipped


class RenamedBatchNorm2d(nn.BatchNorm2d):
    """A subclass that adds nothing to the computation."""

    def extra_repr(self):
        return "renamed " + super().extra_repr()


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A subclass whose forward does more than BatchNorm: converting it would change the function."""

    def forward(self, x):
        return 2 * super().forward(x)


class SubclassOfRenamed(RenamedBatchNorm2d):
    pass


def _net_with(*layers):
    net = nn.Sequential(nn.Conv2d(3, 16, 1), *layers)
    return randomize_batchnorms(net).eval()


def test_subclass_without_forward_converted_as_its_base():
    net = _net_with(RenamedBatchNorm2d(16), nn.ReLU(), SubclassOfRenamed(16))
    x = torch.randn(2, 3, 5, 5)
    before = net(x)
    report = convert_whitening(net, num_channels=4)
    assert [n for n, _ in report.replaced] == ["1", "3"] and report.skipped == []
    assert type(net[1]) is GroupWhitening and type(net[3]) is GroupWhitening
    assert "SubclassOfRenamed(16) -> GroupWhitening(16" in report.replaced[1][1]
    assert_same_function(net(x), before)


def test_subclass_overriding_forward_skipped_with_reason():
    scaled = ScaledBatchNorm2d(16)
    net = _net_with(scaled, nn.BatchNorm2d(16))
    x = torch.randn(2, 3, 5, 5)
    before = net(x)
    report = convert_whitening(net, num_channels=4)
    assert [n for n, _ in report.replaced] == ["2"]
    assert [n for n, _ in report.skipped] == ["1"]
    reason = report.skipped[0][1]
    assert "ScaledBatchNorm2d" in reason and "its own forward" in reason
    assert net[1] is scaled
    assert_same_function(net(x), before)
    assert "skipped:" in str(report) and "ScaledBatchNorm2d" in str(report)


def test_subclass_of_a_known_variant_that_overrides_forward_is_skipped():
    timm = pytest.importorskip("timm")

    class MyBatchNormAct(timm.layers.BatchNormAct2d):
        def forward(self, x):
            return super().forward(x) + 1

    class RenamedBatchNormAct(timm.layers.BatchNormAct2d):
        pass

    net = _net_with(MyBatchNormAct(16), RenamedBatchNormAct(16, act_layer=nn.SiLU))
    x = torch.randn(2, 3, 5, 5)
    before = net(x)
    report = convert_whitening(net, num_channels=4)
    assert [n for n, _ in report.skipped] == ["1"] and "MyBatchNormAct" in report.skipped[0][1]
    assert [n for n, _ in report.replaced] == ["2"] and type(net[2]) is GroupWhiteningAct
    assert isinstance(net[2].act, nn.SiLU)
    assert_same_function(net(x), before)


def test_instance_level_changes_are_skipped():
    hooked, patched, parametrized = nn.BatchNorm2d(16), nn.BatchNorm2d(16), nn.BatchNorm2d(16)
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    patched.forward = lambda x: x
    torch.nn.utils.parametrize.register_parametrization(parametrized, "weight", _Double())
    net = _net_with(hooked, patched, parametrized)
    report = convert_whitening(net, num_channels=4)
    assert report.replaced == []
    reasons = dict(report.skipped)
    assert "forward hooks" in reasons["1"]
    assert "forward is replaced on the instance" in reasons["2"]
    assert "parametrized" in reasons["3"]
    assert net[1] is hooked and net[2] is patched


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_lazy_batchnorm_reported_until_initialized():
    net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.LazyBatchNorm2d(), nn.ReLU())
    report = convert_whitening(net, num_channels=4)
    assert report.replaced == [] and [n for n, _ in report.skipped] == ["1"]
    assert "LazyBatchNorm2d is not initialized yet" in report.skipped[0][1]
    assert "first forward pass" in report.skipped[0][1]
    assert "skipped 1" in str(report) and "LazyBatchNorm2d" in str(report)
    assert isinstance(net[1], nn.LazyBatchNorm2d)
    net(torch.randn(2, 3, 4, 4))                          # materialises it as a BatchNorm2d
    randomize_batchnorms(net).eval()
    x = torch.randn(2, 3, 4, 4)
    before = net(x)
    report = convert_whitening(net, num_channels=4)
    assert [n for n, _ in report.replaced] == ["1"] and type(net[1]) is GroupWhitening
    assert_same_function(net(x), before)


def test_sync_batchnorm_becomes_sync_whitening_in_its_process_group(fake_world_of_two):
    group = torch.distributed.new_group([0, 1])
    net = _net_with(nn.SyncBatchNorm(16, process_group=group), nn.ReLU(), nn.SyncBatchNorm(16))
    x = torch.randn(2, 3, 5, 5)
    before = net(x)
    report = convert_whitening(net, num_channels=4)
    assert [n for n, _ in report.replaced] == ["1", "3"]
    assert "SyncBatchNorm(16) -> SyncGroupWhitening(16" in report.replaced[0][1]
    assert "in its process group" in report.replaced[0][1]
    assert type(net[1]) is SyncGroupWhitening and net[1].process_group is group
    assert type(net[3]) is SyncGroupWhitening and net[3].process_group is None
    assert_same_function(net(x), before)            # eval mode: no communication


def test_frozen_batchnorm_is_reported():
    torchvision = pytest.importorskip("torchvision")
    frozen = torchvision.ops.misc.FrozenBatchNorm2d(16)
    net = _net_with(frozen, nn.BatchNorm2d(16))
    report = convert_whitening(net, num_channels=4)
    assert [n for n, _ in report.replaced] == ["2"]
    assert [n for n, _ in report.skipped] == ["1"] and "frozen" in report.skipped[0][1]
    assert net[1] is frozen


def test_eps_override_keeps_the_eval_function():
    """The running W is built with the BatchNorm's own eps; the new eps applies to batch statistics."""
    net = _net_with(nn.BatchNorm2d(16, eps=1e-1))
    x = torch.randn(2, 3, 5, 5)
    before = net(x)
    convert_whitening(net, num_channels=4, eps=1e-5)
    assert net[1].eps == 1e-5
    assert_same_function(net(x), before)


def test_options_that_change_the_eval_function_are_noted():
    net = _net_with(nn.BatchNorm2d(16), nn.BatchNorm2d(16, track_running_stats=False))
    report = convert_whitening(net, num_channels=4, affine=False)
    first, second = (reason for _, reason in report.replaced)
    assert "affine map is dropped" in first and "no running statistics" not in first
    assert "no running statistics" in second


# ---------------------------------------------------------------------------------------------------
# GroupWhiteningAct


def test_group_whitening_act_forward_and_state():
    act, drop = nn.SiLU(), nn.Dropout(0.5)
    layer = GroupWhiteningAct(16, 4, drop=drop, act=act, eps=1e-3).eval()
    assert layer.act is act and layer.drop is drop
    plain = GroupWhitening(16, 4, eps=1e-3).eval()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items()})
    x = torch.randn(3, 16, 4, 4)
    assert_close(layer(x), act(plain(x)))                 # eval: dropout is the identity
    assert set(layer.state_dict()) == set(plain.state_dict())
    prelu = GroupWhiteningAct(16, 4, act=nn.PReLU())
    assert "act.weight" in prelu.state_dict() and isinstance(prelu.drop, nn.Identity)
    assert isinstance(GroupWhiteningAct(16, 4).act, nn.Identity)
    with pytest.raises(TypeError, match="act must be a torch.nn.Module"):
        GroupWhiteningAct(16, 4, act=torch.relu)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    plain.train()
    assert_close(y, act(drop(plain(x))))


def test_sync_conversion_keeps_drop_and_act():
    act = nn.Hardswish()
    net = nn.Sequential(GroupWhiteningAct(16, 4, act=act), GroupWhitening(16, 4))
    SyncGroupWhitening.convert_sync_whitening(net)
    assert type(net[0]) is SyncGroupWhiteningAct and net[0].act is act
    assert type(net[1]) is SyncGroupWhitening
    x = torch.randn(3, 16, 2, 2)
    net.eval()
    y = net(x)
    SyncGroupWhitening.revert_sync_whitening(net)
    assert type(net[0]) is GroupWhiteningAct and net[0].act is act and type(net[1]) is GroupWhitening
    assert_close(net(x), y)


# ---------------------------------------------------------------------------------------------------
# every torchvision classification network: the same function right after conversion (eval mode)

try:
    import torchvision
    TORCHVISION_CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)
except ImportError:
    TORCHVISION_CLASSIFIERS = []

# the smallest inputs the networks take: 32 x 32 but for these
_INPUT_SIZE = {"inception_v3": 75, "maxvit_t": 224}
_BUILD_OPTIONS = {"inception_v3": {"aux_logits": False, "init_weights": False},
                  "googlenet": {"aux_logits": False, "init_weights": False}}


def _has_batchnorm_on_meta(arch):
    """Whether a network has BatchNorm layers, from a copy built on the meta device (no memory, no
    initialisation); None where the builder needs real tensors."""
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(arch, weights=None, num_classes=10,
                                                 **_BUILD_OPTIONS.get(arch, {}))
    except NotImplementedError:
        return None, None
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()), model


@pytest.mark.parametrize("arch", TORCHVISION_CLASSIFIERS)
def test_every_torchvision_classifier_computes_the_same(arch, no_weight_init, one_thread):
    has_bn, meta_model = _has_batchnorm_on_meta(arch)
    if has_bn is False:
        # Nothing to convert (ViT, Swin, ConvNeXt, ...): the conversion must leave every module in place.
        layout = layer_types(meta_model)
        report = convert_whitening(meta_model, num_channels=8)
        assert report.replaced == [] and report.skipped == [] and layer_types(meta_model) == layout
        return
    model = torchvision.models.get_model(arch, weights=None, num_classes=10, **_BUILD_OPTIONS.get(arch, {}))
    fill_parameters(model).eval()
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    size = _INPUT_SIZE.get(arch, 32)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        before = model(x)
        report = convert_whitening(model, num_channels=8)
        after = model(x)
    assert len(report.replaced) + len(report.skipped) == n_bn
    assert len(report.replaced) > 0
    for name, reason in report.skipped:
        assert "not divisible by num_channels=8" in reason, (name, reason)
    assert_same_function(after, before, msg=str(report))


# ---------------------------------------------------------------------------------------------------
# timm networks (random weights, no downloads): plain BatchNorm and BatchNorm + drop + act layers

# one small network per family: resnet, efficientnet, mobilenetv3, regnet, cspnet, dla, densenet,
# byobnet, dpn (some channel counts not divisible by 8), levit (BatchNorm1d over tokens)
TIMM_NETWORKS = ["test_resnet", "test_efficientnet", "mobilenetv3_small_050", "regnetx_002",
                 "cs3darknet_focus_s", "dla46_c", "densenet121", "test_byobnet", "dpn48b", "levit_128s"]


@pytest.mark.parametrize("arch", TIMM_NETWORKS)
def test_timm_networks_compute_the_same(arch, no_weight_init, one_thread):
    timm = pytest.importorskip("timm")
    model = fill_parameters(timm.create_model(arch, pretrained=False)).eval()
    norm_act = {name: (m.drop, m.act) for name, m in model.named_modules()
                if type(m) is timm.layers.BatchNormAct2d}
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    size = 224 if arch.startswith("levit") else 64          # levit's attention biases fix its input size
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        before = model(x)
        report = convert_whitening(model, num_channels=8)
        after = model(x)
    assert len(report.replaced) + len(report.skipped) == n_bn and len(report.replaced) > 0
    for name, reason in report.skipped:
        assert "not divisible by num_channels=8" in reason, (name, reason)
    skipped = {name for name, _ in report.skipped}
    for name, (drop, act) in norm_act.items():       # the very drop and act modules, in the new layer
        if name not in skipped:
            new = model.get_submodule(name)
            assert type(new) is GroupWhiteningAct and new.drop is drop and new.act is act, name
    assert_same_function(after, before, msg=str(report))


def test_timm_network_trains_after_conversion():
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    report = convert_whitening(model, num_channels=8)
    assert report.skipped == []
    model.train()
    out = model(torch.randn(4, 3, 32, 32))
    out.square().mean().backward()
    layers = [m for m in model.modules() if isinstance(m, GroupWhiteningAct)]
    assert layers and all(int(m.num_batches_tracked) == 1 for m in layers)
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in layers)


def test_known_timm_classes_exist_under_their_table_names():
    """The table names timm's classes by module and qualified name: they must still be there."""
    pytest.importorskip("timm")
    names = [name for name in _KNOWN if name.startswith("timm.")]
    assert len(names) >= 4
    for name in names:
        module, _, cls = name.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), cls), type), name


def test_timm_sync_batchnorm_act_and_split_batchnorm(fake_world_of_two):
    timm = pytest.importorskip("timm")
    group = torch.distributed.new_group([0, 1])
    net = nn.Sequential(nn.Conv2d(3, 16, 1), timm.layers.BatchNormAct2d(16, act_layer=nn.GELU),
                        nn.Conv2d(16, 16, 1), timm.layers.SplitBatchNorm2d(16, num_splits=2))
    randomize_batchnorms(net).eval()
    timm.layers.convert_sync_batchnorm(net, process_group=group)
    assert type(net[1]) is timm.layers.SyncBatchNormAct
    act = net[1].act
    x = torch.randn(2, 3, 4, 4)
    before = net(x)
    report = convert_whitening(net, num_channels=4)
    assert type(net[1]) is SyncGroupWhiteningAct and net[1].process_group is group and net[1].act is act
    assert "keeping its drop (Identity) and act (GELU), in its process group" in report.replaced[0][1]
    # timm's convert_sync_batchnorm made the SplitBatchNorm2d a SyncBatchNorm that still holds the
    # auxiliary BatchNorms as (unused) submodules: they go with it
    assert type(net[3]) is SyncGroupWhitening and not hasattr(net[3], "aux_bn")
    assert [n for n, _ in report.replaced] == ["1", "3"] and report.skipped == []
    assert "without its unused submodules ['aux_bn']" in report.replaced[1][1]
    assert_same_function(net(x), before)


def test_timm_split_batchnorm_is_skipped_with_its_auxiliary_layers():
    timm = pytest.importorskip("timm")
    split = timm.layers.SplitBatchNorm2d(16, num_splits=2)
    net = nn.Sequential(nn.Conv2d(3, 16, 1), split)
    report = convert_whitening(net, num_channels=4)
    assert report.replaced == [] and [n for n, _ in report.skipped] == ["1"]
    assert "SplitBatchNorm2d" in report.skipped[0][1] and "auxiliary" in report.skipped[0][1]
    assert net[1] is split and type(split.aux_bn[0]) is nn.BatchNorm2d


# ---------------------------------------------------------------------------------------------------
# convert_iternorm: IterNorm-pytorch's layers (stand-ins written from the algorithm and state layout)

def _iternorm_net(kind, C=32, d=8, dim=4, **kw):
    module = {"even": iternorm_standin, "flex": iternorm_flexgroup_standin}[kind]
    layer = module.IterNorm(C, d, dim=dim, dtype=torch.float64, **kw)
    if layer.affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(nn.Identity(), layer)


def _iternorm_input(dim, C=32, N=6):
    shape = (N, C, 3, 5) if dim == 4 else (N * 8, C)
    return torch.randn(shape, dtype=torch.float64) * 2 + 0.5


def _running_stats(layer):
    """running_mean (G, d, 1) and running_wm (G, d, d) of either stand-in, the flexible one's groups
    zero-padded to d as GroupWhitening's buffers."""
    if not hasattr(layer, "iterNorm_Groups"):
        return layer.running_mean, layer.running_wm
    G, d = layer.num_groups, layer.num_channels
    mean, wm = torch.zeros(G, d, 1, dtype=torch.float64), torch.zeros(G, d, d, dtype=torch.float64)
    for g, single in enumerate(layer.iterNorm_Groups):
        c = single.num_features
        mean[g, :c], wm[g, :c, :c] = single.running_mean, single.running_wm
    return mean, wm


def _assert_same_layers(converted, original, x):
    """Eval output, then a training step (output, input gradient, running statistics), then eval again."""
    for step, training in enumerate((False, True, False)):
        converted.train(training)
        original.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = converted(xa), original(xb)
        assert_close(ya, yb, msg=f"output, step {step}")
        grad = torch.randn_like(ya)
        ya.backward(grad)
        yb.backward(grad)
        assert_close(xa.grad, xb.grad, msg=f"input gradient, step {step}")
        mean, wm = _running_stats(original[1])
        assert_close(converted[1].running_mean, mean, msg=f"running_mean, step {step}")
        assert_close(converted[1].running_wm, wm, msg=f"running_wm, step {step}")


@pytest.mark.parametrize("kind, dim, trained", [
    ("even", 4, False), ("even", 4, True), ("even", 2, True), ("flex", 4, True), ("flex", 2, False),
], ids=["even-fresh", "even-trained", "even-2d", "flex-trained", "flex-2d-fresh"])
def test_iternorm_converted_to_the_same_layer(kind, dim, trained):
    original = _iternorm_net(kind, dim=dim, T=7, eps=1e-3, momentum=0.3)
    x = _iternorm_input(dim)
    if trained:                           # non-trivial running statistics
        original.train()
        original(_iternorm_input(dim) * 3 - 1)
    elif kind == "even":                  # the buffer as IterNorm makes it: one matrix, stride 0
        assert original[1].running_wm.stride(0) == 0
    original.eval()
    converted = copy.deepcopy(original)
    report = convert_iternorm(converted)
    assert [n for n, _ in report.replaced] == ["1"] and report.skipped == []
    assert report.function == "convert_iternorm" and str(report).startswith("convert_iternorm: replaced 1")
    layer = converted[1]
    assert type(layer) is GroupWhitening and layer.method == "newton"
    settings = (layer.num_features, layer.num_channels, layer.T, layer.eps, layer.momentum)
    assert settings == (32, 8, 7, 1e-3, 0.3)
    assert layer.running_wm.dtype == torch.float64 and not layer.training
    assert layer.running_wm.is_contiguous()
    _assert_same_layers(converted, original, x)


def test_iternorm_without_affine():
    original = _iternorm_net("even", affine=False)
    converted = copy.deepcopy(original)
    convert_iternorm(converted)
    assert converted[1].weight is None
    _assert_same_layers(converted, original, _iternorm_input(4))


def test_flexible_iternorm_with_a_smaller_last_group():
    """C = 30 in groups of 8: 3 groups of 8 and one of 6 -> GroupWhitening(last_group="smaller")."""
    original = _iternorm_net("flex", C=30, d=8)
    original.train()
    original(_iternorm_input(4, C=30))
    converted = copy.deepcopy(original)
    report = convert_iternorm(converted)
    assert [n for n, _ in report.replaced] == ["1"], str(report)
    assert "last_group='smaller' (last group of 6)" in report.replaced[0][1]
    assert converted[1].last_group == "smaller" and converted[1].num_groups == 4
    _assert_same_layers(converted, original, _iternorm_input(4, C=30))


def _broken(change):
    net = _iternorm_net("even")
    change(net[1])
    return net


@pytest.mark.parametrize("change, words", [
    (lambda m: m.register_buffer("running_wm", torch.zeros(4, 8, 7)), "running_wm has shape (4, 8, 7)"),
    (lambda m: setattr(m, "num_groups", 3), "num_groups=3"),
    (lambda m: setattr(m, "momentum", 2.0), "momentum"),
    (lambda m: setattr(m, "T", "5"), "its T is '5'"),
    (lambda m: setattr(m, "weight", nn.Parameter(torch.ones(1, 16, 1, 1))), "weight has shape (1, 16, 1, 1)"),
    (lambda m: m.register_forward_hook(lambda *a: None), "forward hooks"),
], ids=["wm-shape", "groups", "momentum", "T", "weight", "hook"])
def test_iternorm_unexpected_state_is_skipped(change, words):
    net = _broken(change)
    layer = net[1]
    report = convert_iternorm(net)
    assert report.replaced == [] and [n for n, _ in report.skipped] == ["1"]
    assert "iternorm_standin.IterNorm" in report.skipped[0][1] and words in report.skipped[0][1]
    assert net[1] is layer


def test_flexible_iternorm_groups_must_share_settings():
    net = _iternorm_net("flex")
    net[1].iterNorm_Groups[2].eps = 1e-2
    report = convert_iternorm(net)
    assert report.replaced == [] and "groups differ in eps" in report.skipped[0][1]


def test_convert_iternorm_checks_before_changing_and_finds_nested_layers():
    net = nn.Sequential(_iternorm_net("even"), nn.Sequential(_iternorm_net("flex")), nn.BatchNorm2d(4))
    report = convert_iternorm(net, exclude="1.*")
    assert [n for n, _ in report.replaced] == ["0.1"] and type(net[0][1]) is GroupWhitening
    assert type(net[1][0][1]).__name__ == "IterNorm" and type(net[2]) is nn.BatchNorm2d
    root = iternorm_standin.IterNorm(16, 4)
    report = convert_iternorm(root)
    assert report.replaced == [] and "container" in report.skipped[0][1]
    with pytest.raises(TypeError, match="include"):
        convert_iternorm(net, include=5)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert_iternorm("net")
    shared = _iternorm_net("even")[1]
    net = nn.Sequential(shared, nn.Identity(), shared)
    report = convert_iternorm(net)
    assert [n for n, _ in report.replaced] == ["0", "2"] and net[0] is net[2]


# ---------------------------------------------------------------------------------------------------
# last_group: "even" skips layers whose channel count d does not divide, "smaller" converts them all


def test_even_skip_reason_suggests_smaller_last_group():
    report = convert_whitening(small_net(), num_channels=8)
    assert 'last_group="smaller" for a last group of 2 channels' in dict(report.skipped)["8"]


@pytest.mark.parametrize("value", ["uneven", None, 1])
def test_last_group_checked_before_changing(value):
    net = small_net()
    layout = layer_types(net)
    with pytest.raises(ValueError, match="last_group must be one of"):
        convert_whitening(net, num_channels=8, last_group=value)
    assert layer_types(net) == layout


def test_smaller_last_group_converts_every_layer_and_keeps_the_function():
    net = small_net(torch.float64).eval()
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    before = net(x)
    report = convert_whitening(net, num_channels=8, last_group="smaller")
    assert [n for n, _ in report.replaced] == ["1", "3.1", "5", "8"] and report.skipped == []
    assert "BatchNorm1d(10) -> GroupWhitening(10, num_channels=8, method='newton', last_group='smaller')" \
        in report.replaced[3][1]
    last = net[8]
    assert last.last_group == "smaller" and last.num_groups == 2
    assert last.running_wm.shape == (2, 8, 8)
    # the last group's 2 channels in the top-left block, zeros elsewhere
    assert torch.equal(last.running_wm[1, 2:], torch.zeros(6, 8, dtype=torch.float64))
    assert torch.equal(last.running_wm[1, :, 2:], torch.zeros(8, 6, dtype=torch.float64))
    assert torch.equal(last.running_mean[1, 2:], torch.zeros(6, 1, dtype=torch.float64))
    assert_close(net(x), before)


@pytest.mark.parametrize("source, arch, d", [("timm", "dpn48b", 8), ("torchvision", "mobilenet_v2", 16)])
def test_smaller_last_group_on_networks(source, arch, d, no_weight_init, one_thread):
    lib = pytest.importorskip(source)
    if source == "timm":
        model = lib.create_model(arch, pretrained=False)
    else:
        model = lib.models.get_model(arch, weights=None, num_classes=10)
    fill_parameters(model).eval()
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert convert_whitening(copy.deepcopy(model), num_channels=d).skipped     # some do not divide
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        report = convert_whitening(model, num_channels=d, last_group="smaller")
        after = model(x)
    assert len(report.replaced) == n_bn and report.skipped == []
    assert_same_function(after, before, msg=str(report))
