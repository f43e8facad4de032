"""A catalogue of bad arguments to the library: each is refused before any work and changes nothing.

One case per argument and bad value. Each asserts the error type, that the message names the
argument and what was expected, and that nothing changed: the inputs of a function, the model
given to convert_whitening (its modules and its state_dict). A module whose construction fails
leaves nothing behind to check.
"""

import copy

import pytest
import torch
from torch import nn

import sdecor
from sdecor import reference as ref
from sdecor.ops import whiten
from sdecor.convert import convert_whitening
from sdecor.nn import GroupWhitening
from sdecor.objective import SaliencyDecor

# eps is a finite number > 0 (docs/design.md, "Semantics"): 0, a negative, inf, nan, a string and a bool are refused.
BAD_EPS = [0, 0.0, -1.0, float("inf"), float("nan"), "1e-5", True, 10 ** 400]
BAD_EPS_IDS = ["int0", "zero", "negative", "inf", "nan", "str", "bool", "int-beyond-float"]
EPS_MESSAGE = r"eps must be a finite number > 0; got "


def _cov():
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    return x @ x.transpose(-1, -2) / 4 + torch.eye(4, dtype=torch.float64)


# (name, call(eps, inputs), inputs factory): every public function that takes eps.
EPS_FUNCTIONS = [
    ("sdecor.whitening_matrix", lambda eps, t: sdecor.whitening_matrix(t[0], "zca", eps=eps), lambda: [_cov()]),
    ("sdecor.whitening_matrix-newton", lambda eps, t: sdecor.whitening_matrix(t[0], "newton", eps, 5),
     lambda: [_cov()]),
    ("sdecor.group_whiten", lambda eps, t: sdecor.group_whiten(t[0], 4, eps=eps), lambda: [torch.randn(6, 8, 3)]),
    ("ops.group_whiten_train", lambda eps, t: whiten.group_whiten_train(t[0], 4, "zca", eps, 5, t[1], t[2]),
     lambda: [torch.randn(6, 8, 3), torch.rand(8), torch.randn(8)]),
    ("reference.whitening_matrix", lambda eps, t: ref.whitening_matrix(t[0], "zca", eps=eps), lambda: [_cov()]),
    ("reference.group_whiten", lambda eps, t: ref.group_whiten(t[0], 4, "newton", eps), lambda: [torch.randn(6, 8)]),
]


@pytest.mark.parametrize("eps", BAD_EPS, ids=BAD_EPS_IDS)
@pytest.mark.parametrize("name, call, make", EPS_FUNCTIONS, ids=[f[0] for f in EPS_FUNCTIONS])
def test_function_refuses_bad_eps_and_leaves_inputs(name, call, make, eps):
    inputs = make()
    before = [t.clone() for t in inputs]
    with pytest.raises(ValueError, match=EPS_MESSAGE):
        call(eps, inputs)
    for t, b in zip(inputs, before):
        assert torch.equal(t, b), name


@pytest.mark.parametrize("eps", BAD_EPS, ids=BAD_EPS_IDS)
@pytest.mark.parametrize("method", ["newton", "zca"])
def test_group_whitening_refuses_bad_eps(method, eps):
    with pytest.raises(ValueError, match=EPS_MESSAGE):
        GroupWhitening(8, 4, method=method, eps=eps)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64],
                         ids=str)
def test_group_whitening_refuses_non_floating_dtype(dtype):
    with pytest.raises(TypeError, match=rf"dtype must be a floating-point torch.dtype or None; got {dtype}"):
        GroupWhitening(8, 4, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", 4], ids=["str", "int"])
def test_group_whitening_refuses_dtype_that_is_not_a_dtype(dtype):
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype or None; got "):
        GroupWhitening(8, 4, dtype=dtype)


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_group_whitening_takes_floating_dtypes(dtype):
    gw = GroupWhitening(8, 4, dtype=dtype)
    assert gw.weight.dtype == gw.running_wm.dtype == (dtype or torch.get_default_dtype())


def _net():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(8))
    with torch.no_grad():
        for m in (net[1], net[4]):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    return net


def _layout(net):
    return [(name, type(m)) for name, m in net.named_modules()]


def _assert_unchanged(net, layout, state):
    assert _layout(net) == layout
    now = net.state_dict()
    assert list(now) == list(state)
    for k, v in now.items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("eps", BAD_EPS, ids=BAD_EPS_IDS)
def test_convert_whitening_refuses_bad_eps_and_leaves_model(eps):
    net = _net()
    layout, state = _layout(net), copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=EPS_MESSAGE):
        convert_whitening(net, num_channels=4, eps=eps)
    _assert_unchanged(net, layout, state)


@pytest.mark.parametrize("bn_eps", [0.0, float("inf"), float("nan")], ids=["zero", "inf", "nan"])
def test_convert_whitening_refuses_a_batchnorm_eps_it_would_take_over(bn_eps):
    # The second layer holds the bad eps: the first must not have been swapped when the error comes.
    net = _net()
    net[4].eps = bn_eps
    layout, state = _layout(net), copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=r"eps of '4' \(the BatchNorm layer's own; pass eps= to override\) "
                                         r"must be a finite number > 0; got "):
        convert_whitening(net, num_channels=4)
    _assert_unchanged(net, layout, state)
    # A given eps overrides the layer's own.
    report = convert_whitening(net, num_channels=4, eps=1e-5)
    assert [n for n, _ in report.replaced] == ["1", "4"] and net[4].eps == 1e-5


def _model():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("name", ["lambda_consistency", "lambda_decor"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan"), -1.0, "1", True, 10 ** 400],
                         ids=["inf", "-inf", "nan", "negative", "str", "bool", "int-beyond-float"])
def test_saliency_decor_refuses_bad_lambda(name, value):
    model = _model()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0; got "):
        SaliencyDecor(model, num_channels=4, **{name: value})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model._forward_pre_hooks and not model[3]._forward_pre_hooks


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan"), -0.1, 1.5, "0.5", True],
                         ids=["inf", "-inf", "nan", "negative", "above-1", "str", "bool"])
def test_saliency_decor_refuses_bad_mask_ratio(value):
    with pytest.raises(ValueError, match=r"mask_ratio must be a number in \[0, 1\]; got "):
        SaliencyDecor(_model(), mask_ratio=value, num_channels=4)


@pytest.mark.parametrize("name", ["lambda_consistency", "lambda_decor"])
@pytest.mark.parametrize("value", [0, 0.0, 2, 1e3])
def test_saliency_decor_takes_finite_nonnegative_lambdas(name, value):
    obj = SaliencyDecor(_model(), num_channels=4, **{name: value})
    assert getattr(obj, name) == float(value)
