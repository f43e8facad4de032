"""Every argument of the modules and of the conversion and fold functions is checked where it is
given, with an error that names it: the signatures are enumerated (inspect.signature), so that an
argument without a bad-value case here fails the test. A rejected conversion or fold leaves the model
as it was."""

import inspect

import pytest
import torch
from torch import nn

import sdecor
from sdecor.convert import convert_iternorm, convert_whitening
from sdecor.fold import fold_whitening
from sdecor.nn import GroupWhitening, GroupWhiteningAct, SaliencyDecor, SaliencyMasker, SyncGroupWhitening, \
    SyncGroupWhiteningAct

import iternorm_standin

# bad values of the arguments the whitening modules share (each value is refused on its own, the
# other arguments left at valid values)
WHITENING_BAD = {
    "num_features": [0, -3, 8.0, "8", True, None],
    "num_channels": [0, 2.0, "4", True, None, 3],                    # 3 does not divide 8 ("even")
    "method": ["ZCA", "iternorm", 1, None],
    "T": [0, 101, 2.0, True, None],
    "eps": [0, -1e-5, float("nan"), float("inf"), "1e-5", None],
    "momentum": [-0.1, 1.5, float("nan"), "0.1", True],
    "affine": [1, "yes", None],
    "track_running_stats": [0, "no", None],
    "last_group": ["odd", None, 1],
    "device": ["abc", "cuda:x", -1, 2.5, True, object()],
    "dtype": [torch.int32, torch.complex64, "float32", 1],
}
SYNC_BAD = {"process_group": ["abc", 5, object(), 1.0]}
ACT_BAD = {"drop": ["dropout", 0.1, nn.Dropout], "act": ["relu", 5, nn.ReLU]}

MASKER_BAD = {
    "ratio": [-0.1, 1.5, "0.5", True, float("nan")],
    "k": [-1, 2.5, "3", True],
    "largest": [1, "no", None],
    "reduce": ["sum", 1],
    "abs": [0, "no", None],
    "fill": ["nope", None],
    "value": ["0", None, True],
    "generator": ["gen", 5],
}

DECOR_BAD = {
    "model": ["model", None, nn.Linear],
    "mask_ratio": [-0.5, 1.5, "0.5", True, float("nan")],
    "fill": ["baseline", "nope", None],
    "lambda_consistency": [-1.0, float("inf"), "1", True],
    "lambda_decor": [-0.1, float("nan"), None],
    "decor_layers": ["nope", 5, [5], [], [nn.Linear(2, 2)]],
    "num_channels": [0, 4.0, "4", True, 5],                          # 5 does not divide the 16 features
    "kind": ["cov", None],
    "generator": ["gen", 1],
    "process_group": ["WORLD", 5],
}

CONVERT_BAD = {
    "model": ["model", None, nn.BatchNorm2d],
    "num_channels": [0, 4.0, "4", True, None],
    "method": ["ZCA", 1, None],
    "include": [5, [5], object()],
    "exclude": [5, [None]],
    "last_group": ["odd", None],
    # **kw: the options of the new layers, and a keyword that is none of them
    "T": [0, 2.5, None],
    "eps": [0, "1e-5", None],
    "momentum": [2.0, "0.1"],
    "affine": [1, None],
    "track_running_stats": [1, "yes"],
    "bogus": [1],
}
ITERNORM_BAD = {"model": ["model", None], "include": [5, [5]], "exclude": [5, [None]]}
FOLD_BAD = {"model": ["model", None], "example_inputs": ["x", 5, {}], "inplace": [1, "yes", None],
            "return_report": [1, "yes"]}
SYNC_CONVERT_BAD = {"module": ["model", None], "process_group": ["abc", 5, object()]}
SYNC_REVERT_BAD = {"module": ["model", None]}


def _params(fn):
    return {n for n, p in inspect.signature(fn).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


MODULES = {
    GroupWhitening: WHITENING_BAD,
    SyncGroupWhitening: {**WHITENING_BAD, **SYNC_BAD},
    GroupWhiteningAct: {**WHITENING_BAD, **ACT_BAD},
    SyncGroupWhiteningAct: {**WHITENING_BAD, **SYNC_BAD, **ACT_BAD},
}


def _act_signature(cls):
    """The arguments of an *Act layer: its own (num_features, num_channels, drop, act) and, through
    **kwargs, those of the whitening layer it extends."""
    base = SyncGroupWhitening if issubclass(cls, SyncGroupWhitening) else GroupWhitening
    return _params(cls.__init__) | _params(base.__init__)


@pytest.mark.parametrize("cls", list(MODULES), ids=lambda c: c.__name__)
def test_every_module_argument_has_bad_cases(cls):
    names = _act_signature(cls) if cls in (GroupWhiteningAct, SyncGroupWhiteningAct) else _params(cls.__init__)
    assert names - {"self"} == set(MODULES[cls])


@pytest.mark.parametrize("fn, table", [
    (SaliencyMasker.__init__, MASKER_BAD), (SaliencyDecor.__init__, DECOR_BAD),
    (convert_whitening, {k: v for k, v in CONVERT_BAD.items() if k not in ("T", "eps", "momentum", "affine",
                                                                          "track_running_stats", "bogus")}),
    (convert_iternorm, ITERNORM_BAD), (fold_whitening, FOLD_BAD),
    (SyncGroupWhitening.convert_sync_whitening, SYNC_CONVERT_BAD),
    (SyncGroupWhitening.revert_sync_whitening, SYNC_REVERT_BAD),
], ids=["SaliencyMasker", "SaliencyDecor", "convert_whitening", "convert_iternorm", "fold_whitening",
        "convert_sync_whitening", "revert_sync_whitening"])
def test_every_function_argument_has_bad_cases(fn, table):
    assert _params(fn) - {"self"} == set(table)


def _cases(table):
    return [pytest.param(name, value, id=f"{name}={value!r}"[:60]) for name, values in table.items()
            for value in values]


def _named(err, name):
    message = str(err.value)
    assert name in message, f"the error does not name {name}: {message}"


@pytest.mark.parametrize("cls", list(MODULES), ids=lambda c: c.__name__)
def test_module_refuses_each_bad_argument(cls):
    for name, values in MODULES[cls].items():
        for value in values:
            kw = {"num_features": 8, "num_channels": 4, name: value}
            num_features, num_channels = kw.pop("num_features"), kw.pop("num_channels")
            with pytest.raises((TypeError, ValueError)) as err:
                cls(num_features, num_channels, **kw)
            _named(err, name)


@pytest.mark.parametrize("name, value", _cases(MASKER_BAD))
def test_saliency_masker_refuses_each_bad_argument(name, value):
    kw = {"k": value} if name == "k" else {"ratio": 0.5, name: value}
    with pytest.raises((TypeError, ValueError)) as err:
        SaliencyMasker(**kw)
    _named(err, name)


@pytest.mark.parametrize("name", ["largest", "abs"])
def test_masking_functions_refuse_flags_that_are_not_bools(name):
    x, s = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    for fn in (lambda **kw: sdecor.topk_mask(x, s, ratio=0.5, **kw),
               lambda **kw: sdecor.reference.topk_mask(x, s, ratio=0.5, **kw),
               lambda **kw: sdecor.progressive_masks(x, s, [0.5], **kw)):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            fn(**{name: "no"})


def _classifier():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("name, value", _cases(DECOR_BAD))
def test_saliency_decor_refuses_each_bad_argument(name, value):
    kw = {"model": _classifier(), name: value}
    with pytest.raises((TypeError, ValueError)) as err:
        SaliencyDecor(**kw)
    _named(err, "decor_layers" if name == "decor_layers" else name)


def test_sync_layer_takes_a_process_group(fake_world_of_two):
    layer = SyncGroupWhitening(8, 4, process_group=fake_world_of_two)
    assert layer.process_group is fake_world_of_two
    assert SyncGroupWhiteningAct(8, 4, process_group=fake_world_of_two, act=nn.ReLU()).process_group is \
        fake_world_of_two


def test_sync_layer_refuses_a_process_group_of_an_uninitialised_world():
    with pytest.raises(TypeError, match="process_group must be None or a torch.distributed.ProcessGroup"):
        SyncGroupWhitening(8, 4, process_group="abc")


# ---------------------------------------------------------------------------------------------------
# conversions and fold: refused before the model is touched


def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()},
            [(p, p.requires_grad) for p in model.parameters()],
            [m.training for m in model.modules()])


def _assert_unchanged(model, snap):
    layout, state, flags, modes = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == layout
    after = model.state_dict(keep_vars=True)
    assert after.keys() == state.keys()
    for k, (t, copy) in state.items():
        assert after[k] is t and torch.equal(t.detach(), copy.detach()), k
    assert [(p, p.requires_grad) for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes


def _bn_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    model[1].weight.requires_grad_(False)
    model[4].eval()
    return model


@pytest.mark.parametrize("name, value", _cases(CONVERT_BAD))
def test_convert_whitening_refuses_each_bad_argument_and_leaves_the_model(name, value):
    model = _bn_model()
    snap = _snapshot(model)
    with pytest.raises((TypeError, ValueError)) as err:
        if name == "model":
            convert_whitening(value)
        else:
            convert_whitening(model, **{name: value})
    _named(err, name)
    _assert_unchanged(model, snap)


def _iternorm_model():
    return nn.Sequential(nn.Conv2d(3, 8, 1), iternorm_standin.IterNorm(8, 4))


@pytest.mark.parametrize("name, value", _cases(ITERNORM_BAD))
def test_convert_iternorm_refuses_each_bad_argument_and_leaves_the_model(name, value):
    model = _iternorm_model()
    snap = _snapshot(model)
    with pytest.raises((TypeError, ValueError)) as err:
        if name == "model":
            convert_iternorm(value)
        else:
            convert_iternorm(model, **{name: value})
    _named(err, name)
    _assert_unchanged(model, snap)


def _whitened_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), GroupWhitening(8, 4), nn.ReLU(), GroupWhitening(8, 2))
    model[3].train()
    model[1].eval()
    return model


@pytest.mark.parametrize("name, value", _cases(FOLD_BAD))
def test_fold_whitening_refuses_each_bad_argument_and_leaves_the_model(name, value):
    model = _whitened_model()
    snap = _snapshot(model)
    with pytest.raises((TypeError, ValueError)) as err:
        if name == "model":
            fold_whitening(value)
        else:
            fold_whitening(model, **{"inplace": True, name: value})
    _named(err, name)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("name, value", _cases(SYNC_CONVERT_BAD))
def test_convert_sync_whitening_refuses_each_bad_argument_and_leaves_the_model(name, value):
    model = _whitened_model()
    snap = _snapshot(model)
    with pytest.raises((TypeError, ValueError)) as err:
        if name == "module":
            SyncGroupWhitening.convert_sync_whitening(value)
        else:
            SyncGroupWhitening.convert_sync_whitening(model, **{name: value})
    _named(err, name)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("value", SYNC_REVERT_BAD["module"])
def test_revert_sync_whitening_refuses_a_module_that_is_not_one(value):
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        SyncGroupWhitening.revert_sync_whitening(value)
