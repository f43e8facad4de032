"""fold_whitening: the eval-mode map folded into the layer before or replaced by standard layers; the
result has no sdecor module and gives the eval output of the model it came from."""

import copy
import pickle
import types

import pytest
import torch
import torchvision
from torch import nn

import sdecor
from sdecor import fold
from sdecor.fold import FoldReport, fold_whitening
from sdecor.nn import GroupWhitening, SyncGroupWhitening
from sdecor.testing import assert_close

F64 = torch.float64


def randomize(model: nn.Module, scale: float = 0.3) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every whitening layer: W = diag(s)
    (I + scale * noise), not symmetric, so that a transposed map fails."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GroupWhitening) and m.track_running_stats:
                G, d = m.num_groups, m.num_channels
                noise = torch.randn(G, d, d, dtype=F64) * scale / d ** 0.5
                s = torch.empty(G, d, 1, dtype=F64).uniform_(0.5, 1.5)
                m.running_wm.copy_(s * (torch.eye(d, dtype=F64) + noise))
                m.running_mean.copy_(torch.randn(G, d, 1) * 0.5)
                m.num_batches_tracked.fill_(3)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model


def eval_out(model, *args):
    model.eval()
    with torch.no_grad():
        return model(*args)


def assert_plain_torch(model: nn.Module) -> None:
    """No sdecor class in the module tree, and nothing of sdecor in its pickle."""
    assert not [type(m) for m in model.modules() if type(m).__module__.startswith("sdecor")]
    assert b"sdecor" not in pickle.dumps(model)


def gw(C, d, **kw):
    return GroupWhitening(C, d, dtype=F64, **kw)


# ---------------------------------------------------------------------------------------------------
# the map of one layer, general in the size of the last group


def standin(C, d, seed=0):
    """A layer-like namespace with G = ceil(C / d) groups, the last one r = C - (G-1) d channels,
    padded buffers whose padding holds NaN (it must not be read)."""
    g = torch.Generator().manual_seed(seed)
    G = -(-C // d)
    wm = torch.randn(G, d, d, generator=g, dtype=F64)
    mean = torch.randn(G, d, 1, generator=g, dtype=F64)
    r = C - (G - 1) * d
    wm[-1, r:, :] = wm[-1, :, r:] = float("nan")
    mean[-1, r:] = float("nan")
    return types.SimpleNamespace(num_features=C, num_channels=d, num_groups=G, affine=True,
                                 running_wm=wm, running_mean=mean,
                                 weight=torch.rand(C, generator=g, dtype=F64) + 0.5,
                                 bias=torch.randn(C, generator=g, dtype=F64))


def dense_reference(layer):
    """(A, shift) built block by block from the definition."""
    C, d = layer.num_features, layer.num_channels
    blocks, means = [], []
    for g, start in enumerate(range(0, C, d)):
        n = min(d, C - start)
        blocks.append(layer.running_wm[g, :n, :n])
        means.append(layer.running_mean[g, :n, 0])
    A = layer.weight[:, None] * torch.block_diag(*blocks)
    return A, layer.bias - A @ torch.cat(means)


@pytest.mark.parametrize("C,d", [(16, 4), (10, 4), (13, 16), (7, 3)], ids=lambda v: str(v))
def test_affine_map_and_layers_for_any_last_group(C, d):
    layer = standin(C, d)
    A, shift = dense_reference(layer)
    blocks, b = fold.affine_map(layer)
    M = torch.randn(C, 5, dtype=F64)
    assert_close(fold.mix_rows(blocks, M), A @ M)
    assert_close(b, shift)
    for rank in (None, 2, 3, 4, 5):
        x = torch.randn((3, C) + (2,) * (max(rank or 4, 2) - 2), dtype=F64)
        want = torch.einsum("ij,nj...->ni...", A, x) + shift.reshape((1, C) + (1,) * (x.dim() - 2))
        mapped = fold.affine_layer(layer, rank)
        assert_close(mapped(x), want)
        if rank is None:                                        # one layer for every rank
            for r in (2, 3, 5):
                x = torch.randn((2, C) + (3,) * (r - 2), dtype=F64)
                assert_close(mapped(x), torch.einsum("ij,nj...->ni...", A, x)
                             + shift.reshape((1, C) + (1,) * (r - 2)))


def test_conv_groups_follow_the_whitening_groups():
    assert fold.conv_groups([4, 4, 4, 4]) == 4
    assert fold.conv_groups([8, 8, 8]) == 3
    assert fold.conv_groups([4, 4, 2]) == 1
    assert fold.conv_groups([6, 6, 6, 2]) == 1                 # C = 20: no equal split keeps groups whole
    assert fold.layer_group_sizes(standin(10, 4)) == [4, 4, 2]


# ---------------------------------------------------------------------------------------------------
# folding into the layer before


FOLDABLE = {
    "conv1d": (lambda: nn.Conv1d(5, 12, 3, padding=1), (2, 5, 7)),
    "conv2d": (lambda: nn.Conv2d(5, 12, 3, stride=2, padding=1), (2, 5, 7, 6)),
    "conv2d-reflect": (lambda: nn.Conv2d(5, 12, 3, padding=2, dilation=2, padding_mode="reflect"), (2, 5, 7, 6)),
    "conv2d-nobias": (lambda: nn.Conv2d(5, 12, 1, bias=False), (2, 5, 4, 4)),
    "conv2d-groups2": (lambda: nn.Conv2d(6, 12, 3, groups=2), (2, 6, 5, 5)),          # 6 per group, d=3
    "conv3d": (lambda: nn.Conv3d(5, 12, 2), (2, 5, 3, 4, 3)),
    "convT2d-groups2": (lambda: nn.ConvTranspose2d(6, 12, 3, stride=2, groups=2), (2, 6, 4, 3)),
    "convT1d-nobias": (lambda: nn.ConvTranspose1d(5, 12, 2, bias=False), (2, 5, 6)),
    "linear": (lambda: nn.Linear(5, 12), (4, 5)),
}


@pytest.mark.parametrize("kind", list(FOLDABLE))
def test_folds_into_the_layer_before(kind):
    make, shape = FOLDABLE[kind]
    d = 3 if "groups" in kind else 4
    net = randomize(nn.Sequential(make().to(F64), gw(12, d), nn.ReLU()))
    x = torch.randn(shape, dtype=F64)
    want = eval_out(net, x)
    folded, report = fold_whitening(net, return_report=True)
    assert report.folded == [("1", "0")] and report.replaced == [] and report.traced
    assert isinstance(folded[1], nn.Identity) and type(folded[0]) is type(net[0])
    assert folded[0].bias is not None
    assert_close(folded(x), want)
    assert_plain_torch(folded)
    # with example inputs: the same
    again = fold_whitening(net, x, return_report=True)[1]
    assert again.folded == [("1", "0")]


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.bn = gw(8, 4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.bn = gw(8, 4)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


class StdConv(nn.Conv2d):
    """A convolution whose forward does not use its weight as given."""

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.b.weight = self.a.weight
        self.bn = gw(8, 4)

    def forward(self, x):
        return self.b(self.bn(self.a(x)))


NOT_FOLDABLE = {
    "depthwise": (lambda: nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), gw(8, 4)), (2, 8, 5, 5),
                  "groups of 1 output channels split whitening groups of 4"),
    "groups-misaligned": (lambda: nn.Sequential(nn.Conv2d(12, 12, 1, groups=2), gw(12, 4)), (2, 12, 3, 3),
                          "groups of 6 output channels split"),
    "two-users": (TwoUsers, (2, 4, 3, 3), None),
    "called-twice": (CalledTwice, (2, 8, 3, 3), None),
    "own-forward": (lambda: nn.Sequential(StdConv(4, 8, 3), gw(8, 4)), (2, 4, 5, 5), "forward of its own"),
    "tied-weights": (Tied, (2, 8, 3, 3), None),
    "after-relu": (lambda: nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), gw(8, 4)), (2, 4, 3, 3), None),
    "linear-3d": (lambda: nn.Sequential(nn.Linear(6, 4), gw(4, 2)), (2, 4, 6), "its output is 3D, not 2D"),
}


@pytest.mark.parametrize("kind", list(NOT_FOLDABLE))
def test_replaced_where_it_cannot_fold(kind):
    make, shape, why = NOT_FOLDABLE[kind]
    net = randomize(make().to(F64))
    x = torch.randn(shape, dtype=F64)
    want = eval_out(net, x)
    for example in (None, x):
        if kind == "linear-3d" and example is None:
            continue                          # without example inputs a Linear's output is taken as 2D
        folded, report = fold_whitening(net, example, return_report=True)
        assert report.folded == [] and len(report.replaced) == 1, report
        assert_close(folded(x), want)
        assert_plain_torch(folded)
    if why is not None:
        wl = [m for m in net.modules() if isinstance(m, GroupWhitening)][0]
        prev = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][0]
        assert why in fold._foldable_reason(prev, wl, 3 if kind == "linear-3d" else None)


def test_replacement_by_input_rank():
    net = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.ReLU(), gw(8, 4), nn.Flatten(2),
                                  gw(8, 2), nn.Flatten(), nn.Linear(72, 6), nn.ReLU(), gw(6, 3))).to(F64)
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    want = eval_out(net, x)
    anyrank = fold_whitening(net)
    assert all(isinstance(anyrank[i], torch.fx.GraphModule) for i in (2, 4, 8))
    assert anyrank[2].conv.groups == 2 and anyrank[4].conv.groups == 4
    ranked = fold_whitening(net, x)
    assert type(ranked[2]) is nn.Conv2d and ranked[2].groups == 2 and ranked[2].kernel_size == (1, 1)
    assert type(ranked[4]) is nn.Conv1d and ranked[4].groups == 4
    assert type(ranked[8]) is nn.Linear
    for folded in (anyrank, ranked):
        assert_close(folded(x), want)
        assert_plain_torch(folded)


class TwoRanks(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = gw(8, 4)

    def forward(self, x):
        return self.bn(x).flatten(1) + self.bn(x.flatten(2)).flatten(1)


def test_layer_seen_with_two_ranks_gets_the_any_rank_layer():
    net = randomize(TwoRanks())
    x = torch.randn(2, 8, 3, 3, dtype=F64)
    folded = fold_whitening(net, x)
    assert isinstance(folded.bn, torch.fx.GraphModule)
    assert_close(folded(x), eval_out(net, x))


# ---------------------------------------------------------------------------------------------------
# layer kinds: SyncGroupWhitening, GroupWhiteningAct, no affine


def test_sync_whitening_and_no_affine():
    net = randomize(nn.Sequential(nn.Conv2d(3, 8, 1), gw(8, 4, affine=False), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, groups=8), gw(8, 2))).to(F64)
    SyncGroupWhitening.convert_sync_whitening(net)
    assert isinstance(net[1], SyncGroupWhitening)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    folded, report = fold_whitening(net, return_report=True)
    assert [n for n, _ in report.folded] == ["1"] and [n for n, _ in report.replaced] == ["4"]
    assert_close(folded(x), eval_out(net, x))
    assert_plain_torch(folded)


class _ActStandIn(GroupWhitening):
    """GroupWhitening, then drop, then act (the contract of sdecor.nn.GroupWhiteningAct)."""

    def __init__(self, num_features, num_channels, **kw):
        super().__init__(num_features, num_channels, **kw)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


@pytest.fixture
def act_class(monkeypatch):
    """sdecor.nn.GroupWhiteningAct, or a stand-in with its contract where it does not exist yet."""
    cls = getattr(sdecor.nn, "GroupWhiteningAct", None)
    if cls is None:
        monkeypatch.setattr(sdecor.nn, "GroupWhiteningAct", _ActStandIn, raising=False)
        cls = _ActStandIn

    def make(C, d):
        layer = cls.__new__(cls)
        GroupWhitening.__init__(layer, C, d, dtype=F64)
        layer.drop = nn.Dropout(0.5)
        layer.act = nn.Hardtanh(-0.5, 0.5)
        return layer
    return make


def test_whitening_act_keeps_drop_and_act(act_class):
    net = randomize(nn.Sequential(nn.Conv2d(3, 8, 1).to(F64), act_class(8, 4),
                                  nn.Conv2d(8, 8, 3, groups=8).to(F64), act_class(8, 4)))
    net.train()                                                  # folding uses eval mode regardless
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    want = eval_out(copy.deepcopy(net), x)
    folded, report = fold_whitening(net, return_report=True)
    assert [n for n, _ in report.folded] == ["1"] and [n for n, _ in report.replaced] == ["3"]
    assert [type(m) for m in folded[1]] == [nn.Dropout, nn.Hardtanh]
    assert [type(m) for m in folded[3]][1:] == [nn.Dropout, nn.Hardtanh]
    assert not folded.training and not folded[1][0].training
    assert_close(folded(x), want)
    assert_plain_torch(folded)


def test_smaller_last_group():
    layer = GroupWhitening(10, 4, last_group="smaller", dtype=F64)
    with torch.no_grad():
        layer.running_wm[:, :4, :4].copy_(torch.eye(4) + 0.2 * torch.randn(3, 4, 4))
        layer.running_wm[-1, 2:, :] = 0
        layer.running_wm[-1, :, 2:] = 0
        layer.running_mean[:, :, 0].normal_()
        layer.running_mean[-1, 2:] = 0
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    net = nn.Sequential(nn.Conv2d(3, 10, 3).to(F64), layer, nn.Conv2d(10, 10, 3, groups=5).to(F64),
                        copy.deepcopy(layer))
    x = torch.randn(2, 3, 7, 7, dtype=F64)
    folded, report = fold_whitening(net, return_report=True)
    assert [n for n, _ in report.folded] == ["1"] and [n for n, _ in report.replaced] == ["3"]
    assert_close(folded(x), eval_out(net, x))


# ---------------------------------------------------------------------------------------------------
# modes, copies, errors


def test_copy_by_default_inplace_on_request():
    net = randomize(nn.Sequential(nn.Conv2d(3, 8, 1), gw(8, 4).float(), nn.ReLU()))
    net.train()
    state = copy.deepcopy(net.state_dict())
    x = torch.randn(2, 3, 4, 4)
    want = eval_out(copy.deepcopy(net), x)
    folded = fold_whitening(net)
    assert folded is not net and net.training and isinstance(net[1], GroupWhitening)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any(m.training for m in folded.modules())
    assert_close(folded(x), want)

    weight = net[0].weight
    same = fold_whitening(net, inplace=True)
    assert same is net and isinstance(net[1], nn.Identity) and net[0].weight is weight
    assert not net.training
    assert_close(net(x), want)


def test_model_that_is_a_whitening_layer():
    layer = randomize(nn.Sequential(gw(8, 4)))[0]
    x = torch.randn(3, 8, 2, 2, dtype=F64)
    folded = fold_whitening(layer)
    assert isinstance(folded, torch.fx.GraphModule)
    assert_close(folded(x), eval_out(layer, x))
    assert type(fold_whitening(layer, x, inplace=True)) is nn.Conv2d


def test_model_without_whitening_layers():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    folded, report = fold_whitening(net, return_report=True)
    assert report == FoldReport() and not folded.training and net.training
    assert "folded 0 layer(s), replaced 0" in str(report)


def test_refuses_layers_without_running_statistics():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(GroupWhitening(8, 4, track_running_stats=False)))
    before = copy.deepcopy(net)
    with pytest.raises(ValueError, match=r"'1\.0' have track_running_stats=False.*no fixed"):
        fold_whitening(net, inplace=True)
    assert net.training and [type(m) for m in net.modules()] == [type(m) for m in before.modules()]


def test_refuses_unknown_subclasses_and_bad_arguments():
    class Custom(GroupWhitening):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match=r"0 \(Custom\).*forward of their own"):
        fold_whitening(nn.Sequential(Custom(8, 4)))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fold_whitening(lambda x: x)
    with pytest.raises(TypeError, match="example_inputs must be"):
        fold_whitening(nn.Sequential(), example_inputs={"x": 1})
    with pytest.raises(TypeError, match="inplace must be a bool"):
        fold_whitening(nn.Sequential(), inplace=1)


def test_failing_example_inputs_leave_the_model_as_it_was():
    net = randomize(nn.Sequential(nn.Conv2d(3, 8, 1), gw(8, 4).float())).train()
    with pytest.raises(RuntimeError):
        fold_whitening(net, torch.randn(2, 5, 4, 4), inplace=True)
    assert net.training and net[1].training and isinstance(net[1], GroupWhitening)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = gw(8, 4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if x.sum() > 0 else -y


def test_untraceable_model_gets_every_layer_replaced_with_a_warning():
    net = randomize(Branchy().to(F64))
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    with pytest.warns(UserWarning, match="could not trace the model"):
        folded, report = fold_whitening(net, return_report=True)
    assert not report.traced and "TraceError" in report.trace_error
    assert report.folded == [] and [n for n, _ in report.replaced] == ["bn"]
    assert "nothing was folded" in str(report)
    for sign in (1, -1):
        assert_close(folded(sign * x.abs()), eval_out(net, sign * x.abs()))
    with pytest.warns(UserWarning):
        assert type(fold_whitening(net, x).bn) is nn.Conv2d


# ---------------------------------------------------------------------------------------------------
# real networks


def _timm(name):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10)


MODELS = {
    # name: (constructor, group size, (folded, replaced))
    "resnet18-d16": (lambda: torchvision.models.resnet18(num_classes=10), 16, (20, 0)),
    "mobilenet_v2-d8": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 8, (35, 17)),
    # 24-channel layers at d = 16: a last group of 8 channels
    "mobilenet_v2-d16-smaller": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 16, (35, 17)),
    "timm-resnet10t-d8": (lambda: _timm("resnet10t"), 8, (14, 0)),
    # BatchNormAct2d -> GroupWhiteningAct: the tails (drop, act) stay, after depthwise convolutions too
    "timm-mobilenetv3_small_050-act-d8": (lambda: _timm("mobilenetv3_small_050"), 8, (23, 11)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_real_networks(name):
    make, d, (n_folded, n_replaced) = MODELS[name]
    act = "-act-" in name
    net = make()
    conv = sdecor.convert_whitening(net, num_channels=d,
                                    **({"last_group": "smaller"} if "-smaller" in name else {}))
    assert conv.replaced and not conv.skipped
    if "-smaller" in name:
        assert any(m.num_features % d for m in net.modules() if isinstance(m, GroupWhitening))
    if act:
        assert all(isinstance(m, sdecor.nn.GroupWhiteningAct) for m in net.modules()
                   if isinstance(m, GroupWhitening))
    randomize(net, scale=0.2)
    x = torch.randn(2, 3, 32, 32)
    want = eval_out(net, x)
    folded, report = fold_whitening(net, return_report=True)
    assert (len(report.folded), len(report.replaced)) == (n_folded, n_replaced), str(report)
    assert_plain_torch(folded)
    with torch.no_grad():
        got = folded(x)
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
