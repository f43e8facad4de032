"""SaliencyDecor: terms as docs/design.md ("Semantics") defines them, gradients reach every parameter, training lowers it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdecor import reference as ref
from sdecor.masking import saliency, topk_mask
from sdecor.objective import SaliencyDecor, SaliencyDecorTerms, decorrelation_loss


def _cnn(classes=4):
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, classes))


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.arange(n) % 4
    x[:, 0] += y.view(-1, 1, 1).float()                             # learnable signal
    return x, y


def test_terms_match_design():
    model = _cnn()
    obj = SaliencyDecor(model, mask_ratio=0.5, fill="uniform", lambda_consistency=0.7,
                        lambda_decor=0.3, num_channels=8, generator=torch.Generator().manual_seed(1))
    x, y = _data()
    twin = copy.deepcopy(model)                     # the loss updates BatchNorm statistics
    t = obj.loss(x, y)
    assert isinstance(t, SaliencyDecorTerms) and len(t) == 4
    total, ce, cons, dec = t
    model = twin
    sal = saliency(model, x, y)
    torch.testing.assert_close(t.saliency, sal)
    xm, mask = topk_mask(x, sal, ratio=0.5, fill="uniform", generator=torch.Generator().manual_seed(1))
    assert torch.equal(t.x_masked, xm) and torch.equal(t.mask, mask)
    logits = model(x)
    logits_m = model(xm)
    torch.testing.assert_close(ce, F.cross_entropy(logits, y))
    p, q = logits.softmax(1), logits_m.softmax(1)
    torch.testing.assert_close(cons, (p * (p.log() - q.log())).sum() / x.shape[0])
    feats = model[:-1](x)                                             # input of the last Linear
    torch.testing.assert_close(dec, ref.decorrelation_loss(feats, 8))
    torch.testing.assert_close(total, ce + 0.7 * cons + 0.3 * dec)


def test_gradients_reach_every_parameter_and_training_lowers_loss():
    torch.manual_seed(0)
    model = _cnn()
    obj = SaliencyDecor(model, num_channels=8, decor_layers=["3", model[7]])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = _data()

    def evaluate():
        obj.generator = torch.Generator().manual_seed(0)
        return float(obj.loss(x, y).total.detach())

    before = evaluate()
    for step in range(15):
        opt.zero_grad(set_to_none=True)
        t = obj.loss(x, y)
        t.total.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, missing
        opt.step()
    after = evaluate()
    assert after < before * 0.8, (before, after)


def test_decor_layers_features_and_divisibility():
    model = _cnn()
    obj = SaliencyDecor(model, num_channels=4, decor_layers=["3"], lambda_decor=1.0)
    x, y = _data(6)
    t = obj.loss(x, y)
    feats = model[:3](x)                                              # input of model[3]: (N, 16, 8, 8)
    torch.testing.assert_close(t.decorrelation, decorrelation_loss(feats, 4))
    bad = SaliencyDecor(model, num_channels=32, decor_layers=["3"])
    with pytest.raises(ValueError, match="not divisible by num_channels=32"):
        bad.loss(x, y)


def test_model_state_untouched_by_loss_except_grads():
    model = _cnn().train()
    obj = SaliencyDecor(model, num_channels=8)
    x, y = _data(6)
    obj.loss(x, y)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_pre_hooks for m in model.modules())     # capture hooks removed


def test_constructor_validation():
    model = _cnn()
    for bad in (dict(mask_ratio=1.5), dict(fill="baseline"), dict(fill="blur"), dict(lambda_decor=-1),
                dict(lambda_consistency="a"), dict(num_channels=0), dict(kind="l1"),
                dict(num_channels=5), dict(decor_layers=["nope"]), dict(decor_layers=[nn.Linear(2, 2)]),
                dict(decor_layers=[]), dict(kind="corr", num_channels=1)):
        with pytest.raises(ValueError):
            SaliencyDecor(model, **bad)
    with pytest.raises(ValueError, match="no nn.Linear"):
        SaliencyDecor(nn.Conv2d(3, 4, 1))
    with pytest.raises(TypeError):
        SaliencyDecor(lambda t: t)
    with pytest.raises(TypeError):
        SaliencyDecor(model, num_channels=8, decor_layers=[3])
