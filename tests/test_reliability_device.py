"""A layer, or the statistics and parameters given beside x, on another device than x (or of a dtype
that cannot be converted): one clear error naming both devices, in training and in eval mode, on
every backend, before any work (running statistics and the batch counter unchanged). The dtype
combinations that work (a layer of any floating dtype on input of any floating dtype, autocast)
keep working."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sdecor
from sdecor import _ext
from sdecor.fold import fold_whitening
from sdecor.nn import GroupWhitening, GroupWhiteningAct, SyncGroupWhitening, SyncGroupWhiteningAct
from sdecor.ops import whiten, whiten_sync

from conftest import INTERPRET

META = torch.device("meta")
STATE = ("weight", "bias", "running_mean", "running_wm", "num_batches_tracked")


def _backends():
    out = [pytest.param("torch", id="torch")]
    out.append(pytest.param("native", id="native", marks=pytest.mark.skipif(
        not _ext.available(), reason="sdecor._C is not built")))
    out.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        not (INTERPRET or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1")))
    return out


BACKENDS = _backends()


def _x_device(backend, device):
    # the triton backend runs on the GPU where there is one, else on CPU tensors under the interpreter
    return device if backend == "triton" else torch.device("cpu")


def _layer(kind, C=12, d=4, **kw):
    if kind in ("GroupWhiteningAct", "SyncGroupWhiteningAct"):
        kw.update(act=nn.ReLU())
    cls = {"GroupWhitening": GroupWhitening, "SyncGroupWhitening": SyncGroupWhitening,
           "GroupWhiteningAct": GroupWhiteningAct, "SyncGroupWhiteningAct": SyncGroupWhiteningAct}[kind]
    layer = cls(C, d, **kw)
    with torch.no_grad():
        if layer.affine:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
    return layer


def _readable_state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items() if v.device.type != "meta"}


def _assert_same_state(layer, before):
    after = _readable_state(layer)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


KINDS = ["GroupWhitening", "SyncGroupWhitening", "GroupWhiteningAct", "SyncGroupWhiteningAct"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_on_meta_with_input_elsewhere_names_both_devices(kind, training, backend, device):
    layer = _layer(kind, device=META).train(training)
    x = torch.randn(6, 12, 5, device=_x_device(backend, device))
    with sdecor.use_backend(backend), pytest.raises(ValueError) as err:
        layer(x)
    message = str(err.value)
    assert kind in message and "weight" in message
    assert "meta" in message and str(x.device) in message


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", STATE)
def test_one_tensor_elsewhere_is_named_and_nothing_changes(name, training, backend, device):
    """One parameter or buffer moved to meta: named in the error; the others (readable) unchanged,
    num_batches_tracked included (the update of the running statistics starts with it)."""
    xdev = _x_device(backend, device)
    layer = _layer("GroupWhitening", last_group="smaller", C=10, d=4, device=xdev).train(training)
    t = getattr(layer, name)
    moved = t.to(META)
    if isinstance(t, nn.Parameter):
        setattr(layer, name, nn.Parameter(moved))
    else:
        setattr(layer, name, moved)
    before = _readable_state(layer)
    x = torch.randn(6, 10, 3, device=xdev, requires_grad=True)
    with sdecor.use_backend(backend), pytest.raises(ValueError, match=rf"GroupWhitening: {name} is on meta but "
                                                                      rf"the input is on {xdev}"):
        layer(x)
    _assert_same_state(layer, before)
    assert x.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_on_meta_with_layer_elsewhere(training, backend, device):
    xdev = _x_device(backend, device)
    layer = _layer("GroupWhitening", device=xdev).train(training)
    before = _readable_state(layer)
    with sdecor.use_backend(backend), pytest.raises(ValueError, match=rf"is on {xdev} but the input is on meta"):
        layer(torch.randn(6, 12, 5, device=META))
    _assert_same_state(layer, before)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32])
def test_state_of_a_dtype_that_cannot_be_used_is_refused_before_any_work(dtype, training):
    layer = _layer("GroupWhitening").train(training)
    layer.running_wm = layer.running_wm.to(dtype)
    before = _readable_state(layer)
    with pytest.raises(TypeError, match=rf"GroupWhitening: running_wm must be a floating-point tensor; got "
                                        rf"dtype {dtype}"):
        layer(torch.randn(6, 12, 5))
    _assert_same_state(layer, before)


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_layer_moved_to_complex_is_refused():
    layer = _layer("GroupWhitening").to(torch.complex64)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor; got dtype torch.complex64"):
        layer(torch.randn(6, 12, 5))


# ---------------------------------------------------------------------------------------------------
# what works keeps working: any floating dtype of the layer on input of any floating dtype, autocast

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
MIXED = [(F32, F64), (F64, F32), (BF16, F32), (F32, BF16), (F16, F64), (F64, F16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("x_dtype, layer_dtype", MIXED, ids=[f"x-{a}-layer-{b}".replace("torch.", "")
                                                             for a, b in MIXED])
def test_mixed_dtypes_keep_working(x_dtype, layer_dtype, training, backend, device):
    if backend == "triton" and x_dtype == F64:
        pytest.skip("the triton backend takes no float64 input")
    xdev = _x_device(backend, device)
    layer = _layer("GroupWhitening", C=6, d=4, last_group="smaller", dtype=layer_dtype, device=xdev).train(training)
    x = torch.randn(5, 6, 3, dtype=x_dtype, device=xdev, requires_grad=True)
    with sdecor.use_backend(backend):
        y = layer(x)
        y.float().square().sum().backward()
    assert y.dtype == x_dtype and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert layer.weight.grad.dtype == layer_dtype and torch.isfinite(layer.weight.grad).all()
    if training:
        assert layer.num_batches_tracked.item() == 1
        assert torch.isfinite(layer.running_wm).all()


@pytest.mark.parametrize("x_dtype", [F32, BF16])
def test_autocast_with_a_float32_layer_keeps_working(x_dtype):
    layer = _layer("GroupWhitening")
    x = torch.randn(6, 12, 5, dtype=x_dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y.float().sum().backward()
    assert y.dtype == x_dtype and torch.isfinite(x.grad).all()
    layer.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == x_dtype


# ---------------------------------------------------------------------------------------------------
# functions given statistics or parameters beside x


def _eval_args(C=10, d=4):
    G = -(-C // d)
    return dict(mean=torch.randn(G, d), wm=torch.eye(d).repeat(G, 1, 1), weight=torch.rand(C) + 0.5,
                bias=torch.randn(C))


@pytest.mark.parametrize("name", ["mean", "wm", "weight", "bias"])
def test_group_whiten_eval_refuses_an_argument_on_another_device(name):
    args = _eval_args()
    args[name] = args[name].to(META)
    with pytest.raises(ValueError, match=rf"{name} must be on x's device cpu; got meta"):
        whiten.group_whiten_eval(torch.randn(5, 10, 3), **args)


@pytest.mark.parametrize("name", ["mean", "wm", "weight", "bias"])
def test_group_whiten_eval_refuses_an_argument_of_complex_dtype(name):
    args = _eval_args()
    args[name] = args[name].to(torch.complex64)
    with pytest.raises(TypeError, match=rf"{name} must be a floating-point tensor; got dtype torch.complex64"):
        whiten.group_whiten_eval(torch.randn(5, 10, 3), **args)


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_group_whiten_train_refuses_a_parameter_on_another_device(name):
    params = {"weight": torch.rand(8) + 0.5, "bias": torch.randn(8)}
    params[name] = params[name].to(META)
    with pytest.raises(ValueError, match=rf"{name} must be on x's device cpu; got meta"):
        whiten.group_whiten_train(torch.randn(5, 8, 3), 4, **params)


def test_functions_refuse_an_input_on_another_device_than_their_statistics():
    args = _eval_args()
    with pytest.raises(ValueError, match="mean must be on x's device meta; got cpu"):
        whiten.group_whiten_eval(torch.randn(5, 10, 3, device=META), **args)


# ---------------------------------------------------------------------------------------------------
# SyncGroupWhitening with a process group of 2: the check runs before the collective


@pytest.mark.parametrize("kind", ["SyncGroupWhitening", "SyncGroupWhiteningAct"])
def test_sync_layer_on_another_device_fails_before_the_collective(kind, fake_world_of_two, monkeypatch):
    calls = []
    real = whiten_sync.all_gather

    def counted(t, group):
        calls.append(t.shape)
        return real(t, group)

    monkeypatch.setattr(whiten_sync, "all_gather", counted)
    layer = _layer(kind, device=META)
    assert layer._sync_world_size() == 2
    with pytest.raises(ValueError, match=f"{kind}: weight is on meta but the input is on cpu"):
        layer(torch.randn(6, 12, 5))
    assert calls == []
    # one buffer elsewhere: named, and the readable state unchanged
    layer = _layer(kind)
    running_mean = layer.running_mean
    layer.running_mean = running_mean.to(META)
    before = _readable_state(layer)
    with pytest.raises(ValueError, match=f"{kind}: running_mean is on meta but the input is on cpu"):
        layer(torch.randn(6, 12, 5))
    assert calls == []
    _assert_same_state(layer, before)
    # the same layer on the input's device reaches the collective (the world size really is 2)
    layer.running_mean = running_mean
    layer(torch.randn(6, 12, 5))
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------
# fold_whitening


def _conv_model(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), GroupWhitening(8, 4, **kw), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          GroupWhitening(4, 2, **kw))
    model.train()
    for _ in range(2):
        model(torch.randn(4, 3, 6, 6))
    return model.eval()


@pytest.mark.parametrize("inplace", [False, True])
def test_fold_with_a_whitening_layer_on_another_device_than_example_inputs(inplace):
    model = _conv_model()
    model[4].to(META)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.device.type != "meta"}
    modes = [m.training for m in model.modules()]
    with pytest.raises(ValueError, match="GroupWhitening: weight is on meta but the input is on cpu"):
        fold_whitening(model, torch.randn(2, 3, 6, 6), inplace=inplace)
    assert all(isinstance(m, GroupWhitening) for m in (model[1], model[4]))
    assert [m.training for m in model.modules()] == modes
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["running_wm", "bias", "num_batches_tracked"])
def test_fold_refuses_a_whitening_layer_split_over_devices(name):
    model = _conv_model()
    t = getattr(model[4], name)
    setattr(model[4], name, nn.Parameter(t.to(META)) if isinstance(t, nn.Parameter) else t.to(META))
    with pytest.raises(ValueError, match=rf"fold_whitening: layer '4' \(GroupWhitening\): {name} is on meta but "
                                         rf"weight is on cpu"):
        fold_whitening(model, inplace=True)
    assert isinstance(model[4], GroupWhitening)


def test_fold_refuses_a_whitening_layer_of_complex_dtype():
    model = _conv_model()
    model[4].running_wm = model[4].running_wm.to(torch.complex64)
    with pytest.raises(TypeError, match=r"layer '4' \(GroupWhitening\): running_wm must be a floating-point"):
        fold_whitening(model)


@pytest.mark.parametrize("dtype", [F64, BF16])
def test_fold_builds_layers_on_the_layers_device_and_in_their_dtype(dtype):
    model = _conv_model().to(dtype)
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    expected = model(x)
    folded, report = fold_whitening(model, return_report=True)          # no example_inputs: any rank
    assert all(p.dtype == dtype for p in folded.parameters())
    torch.testing.assert_close(folded(x), expected, **sdecor.testing.tol(dtype))
    assert report.folded                                                 # the conv layers took the maps
    on_meta = fold_whitening(_conv_model().to(META))
    assert all(p.device.type == "meta" for p in on_meta.parameters())
    assert not any(isinstance(m, GroupWhitening) for m in on_meta.modules())


def test_fold_builds_the_replacement_in_the_dtype_of_its_input():
    """A float32 whitening layer fed bf16 (a model in bf16 whose norm layers were kept in float32):
    the layer that replaces it takes bf16, so the folded model runs where the model did."""
    model = nn.Sequential(nn.Flatten(), GroupWhitening(12, 4)).train()
    for _ in range(2):
        model(torch.randn(8, 12))
    model.eval()
    x = torch.randn(3, 12, dtype=BF16)
    expected = model(x)
    folded = fold_whitening(model, x)
    assert isinstance(folded[1], nn.Linear) and folded[1].weight.dtype == BF16
    torch.testing.assert_close(folded(x), expected, **sdecor.testing.tol(BF16))


@pytest.mark.parametrize("frozen", [True, False])
def test_fold_replacement_keeps_the_requires_grad_of_the_whitening_layer(frozen):
    model = nn.Sequential(nn.Flatten(), GroupWhitening(12, 4)).eval()
    model[1].requires_grad_(not frozen)
    folded = fold_whitening(model, torch.randn(3, 12))
    assert all(p.requires_grad is (not frozen) for p in folded[1].parameters())
