"""sdecor.saliency: |d logit_y / d x|, one backward, eval mode during it, modes and .grad preserved."""

import pytest
import torch
from torch import nn

from sdecor.masking import saliency


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))


def test_matches_per_sample_autograd_in_eval_mode():
    model = _cnn()
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 3, 1, 4])
    got = saliency(model, x, y)
    model.eval()
    for i in range(4):
        xi = x[i:i + 1].clone().requires_grad_(True)
        model(xi)[0, y[i]].backward()
        torch.testing.assert_close(got[i], xi.grad[0].abs())
    assert got.shape == x.shape and not got.requires_grad and torch.all(got >= 0)


def test_modes_and_grads_preserved():
    model = _cnn()
    model.train()
    model[1].eval()                                                  # a mixed-mode model
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    grads = [p.grad.clone() for p in model.parameters()]
    running = model[1].running_mean.clone()
    saliency(model, torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3]))
    assert [m.training for m in model.modules()] == [True, True, False, True, True, True, True, True]
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(model[1].running_mean, running)               # eval: no statistics update
    model.zero_grad(set_to_none=True)
    saliency(model, torch.randn(2, 3, 6, 6), torch.tensor([0, 1]))
    assert all(p.grad is None for p in model.parameters())


def test_deterministic_despite_dropout_and_under_no_grad():
    model = _cnn().train()
    x, y = torch.randn(3, 3, 6, 6), torch.tensor([1, 1, 2])
    a = saliency(model, x, y)
    with torch.no_grad():
        b = saliency(model, x, y)
    assert torch.equal(a, b)


def test_mode_restored_after_error():
    model = _cnn().train()
    with pytest.raises(Exception):
        saliency(model, torch.randn(2, 4, 6, 6), torch.tensor([0, 1]))   # wrong channel count
    assert all(m.training for m in model.modules())


def test_argument_checks():
    model = _cnn()
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(TypeError, match="model"):
        saliency(lambda t: t, x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="y"):
        saliency(model, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="y"):
        saliency(model, x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="logits"):
        saliency(nn.Flatten(0), x, torch.tensor([0, 1]))
