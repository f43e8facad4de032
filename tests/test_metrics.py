"""sdecor.metrics against small hand-computed cases."""

import math

import pytest
import torch
from torch import nn

from sdecor import metrics

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def maps(*rows, device="cpu", dtype=torch.float32):
    """Maps (N, 2, 2) from rows of 4 values."""
    return torch.tensor(rows, dtype=dtype, device=device).reshape(len(rows), 2, 2)


# ---------------------------------------------------------------------------------------------------
# map statistics


@pytest.mark.parametrize("device", DEVICES)
def test_gini_hand_computed(device):
    # one-hot over n=4: (n-1)/n; uniform: 0; [1,2,3,4]: 1 - 2 * (1*.875 + 2*.625 + 3*.375 + 4*.125) / 10
    s = maps([0, 0, 5, 0], [2, 2, 2, 2], [1, 2, 3, 4], [4, 3, 2, 1], [0, 0, 0, 0], device=device)
    got = metrics.gini(s)
    assert got.device.type == device and got.shape == (5,)
    expected = torch.tensor([0.75, 0.0, 0.25, 0.25, 0.0])
    torch.testing.assert_close(got.cpu(), expected, atol=1e-6, rtol=0)


def test_gini_uses_magnitudes_and_is_scale_invariant():
    s = maps([1, -2, 3, -4])
    torch.testing.assert_close(metrics.gini(s), torch.tensor([0.25]))
    torch.testing.assert_close(metrics.gini(7.0 * s), torch.tensor([0.25]))


def test_gini_float64_stays_float64():
    assert metrics.gini(maps([1, 2, 3, 4], dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_hand_computed(device):
    s = maps([1, 1, 1, 1], [0, 3, 0, 0], [1, 1, 0, 0], [1, 2, 1, 0], device=device)
    # nats: log 4, 0, log 2; [1/4, 1/2, 1/4, 0]: 1.5 log 2
    nats = metrics.entropy(s, normalized=False).cpu()
    torch.testing.assert_close(nats, torch.tensor([math.log(4), 0.0, math.log(2), 1.5 * math.log(2)]))
    normalized = metrics.entropy(s).cpu()
    torch.testing.assert_close(normalized, torch.tensor([1.0, 0.0, 0.5, 0.75]))


def test_entropy_of_zero_map_is_uniform():
    torch.testing.assert_close(metrics.entropy(maps([0, 0, 0, 0])), torch.tensor([1.0]))


def test_mask_mass_share_hand_computed():
    s = maps([1, 2, 3, 4], [0, 0, 0, 2])
    m = torch.tensor([[True, False, False, True], [True, True, True, False]]).reshape(2, 2, 2)
    torch.testing.assert_close(metrics.mask_mass_share(s, m), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(metrics.mask_mass_share(s, m.float()), torch.tensor([0.5, 0.0]))


def test_mask_mass_share_checks_its_arguments():
    s = maps([1, 2, 3, 4])
    with pytest.raises(ValueError, match="object_mask must have the map's shape"):
        metrics.mask_mass_share(s, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="object_mask must be a torch.Tensor"):
        metrics.mask_mass_share(s, [[1, 0], [0, 1]])


def test_saliency_map_averages_magnitudes_over_channels():
    g = torch.tensor([[[[1.0, -2.0]], [[-3.0, 0.0]]]])               # (1, 2, 1, 2)
    torch.testing.assert_close(metrics.saliency_map(g), torch.tensor([[[2.0, 1.0]]]))
    torch.testing.assert_close(metrics.saliency_map(g, reduce=None), g.abs())
    with pytest.raises(ValueError, match="reduce"):
        metrics.saliency_map(g, reduce="max")


@pytest.mark.parametrize("fn", [metrics.gini, metrics.entropy])
def test_map_metrics_reject_bad_input(fn):
    with pytest.raises(TypeError, match="saliency must be a torch.Tensor"):
        fn([[1.0, 2.0]])
    with pytest.raises(ValueError, match="at least one position dim"):
        fn(torch.ones(4))
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.ones(2, 3, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------
# curves


def test_trapezoid_auc_hand_computed():
    torch.testing.assert_close(metrics.trapezoid_auc(torch.tensor([1.0, 0.5, 0.0]), [0, 0.5, 1]),
                               torch.tensor(0.5))
    # uneven spacing: 0.25 * (1 + 0) / 2 + 0.75 * 0 = 0.125
    torch.testing.assert_close(metrics.trapezoid_auc(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]),
                                                     [0, 0.25, 1]), torch.tensor([0.125, 1.0]))
    # a span other than [0, 1] is normalised: mean height
    torch.testing.assert_close(metrics.trapezoid_auc(torch.tensor([2.0, 2.0]), [0.2, 0.6]), torch.tensor(2.0))
    with pytest.raises(ValueError, match="one per point"):
        metrics.trapezoid_auc(torch.ones(3), [0, 1])


def test_default_fractions():
    assert metrics.default_fractions(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="steps"):
        metrics.default_fractions(0)


class Linear2(nn.Module):
    """Two-class model on (N, 1, 2, 2): logits [sum(w * x) - bias, 0]."""

    def __init__(self, w, bias=0.0):
        super().__init__()
        self.w = torch.tensor(w, dtype=torch.float32).reshape(1, 1, 2, 2)
        self.bias = bias

    def forward(self, x):
        z = (x * self.w.to(x.device)).sum((1, 2, 3)) - self.bias
        return torch.stack([z, torch.zeros_like(z)], dim=1)


W = [[4.0, 3.0], [2.0, 1.0]]
FRACTIONS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("device", DEVICES)
def test_deletion_curve_removes_most_salient_first(device):
    model = Linear2(W)
    x = torch.ones(1, 1, 2, 2, device=device)
    y = torch.zeros(1, dtype=torch.int64, device=device)
    sal = torch.tensor(W, device=device).reshape(1, 2, 2)             # |d logit_0 / dx| = w
    curve = metrics.masking_curve(model, x, y, sal, FRACTIONS, mode="deletion")
    # remaining logit: 10, 10-4, 10-4-3, 1, 0; p(class 0) = sigmoid(logit)
    expected = torch.sigmoid(torch.tensor([[10.0, 6.0, 3.0, 1.0, 0.0]]))
    torch.testing.assert_close(curve.prob.cpu(), expected)
    assert curve.correct.cpu().tolist() == [[True, True, True, True, True]]
    auc = metrics.deletion_auc(model, x, y, sal, FRACTIONS)
    torch.testing.assert_close(auc.cpu(), torch.trapezoid(expected, torch.tensor(FRACTIONS)))


@pytest.mark.parametrize("device", DEVICES)
def test_insertion_curve_inserts_most_salient_first(device):
    model = Linear2(W)
    x = torch.ones(1, 1, 2, 2, device=device)
    y = torch.zeros(1, dtype=torch.int64, device=device)
    sal = torch.tensor(W, device=device).reshape(1, 2, 2)
    base = torch.zeros_like(x)
    curve = metrics.masking_curve(model, x, y, sal, FRACTIONS, mode="insertion", baseline=base)
    expected = torch.sigmoid(torch.tensor([[0.0, 4.0, 7.0, 9.0, 10.0]]))
    torch.testing.assert_close(curve.prob.cpu(), expected)
    torch.testing.assert_close(metrics.insertion_auc(model, x, y, sal, FRACTIONS, baseline=base).cpu(),
                               torch.trapezoid(expected, torch.tensor(FRACTIONS)))


def test_insertion_default_baseline_is_the_blur():
    model = Linear2(W)
    x = torch.rand(2, 1, 2, 2)
    y = torch.zeros(2, dtype=torch.int64)
    sal = torch.rand(2, 2, 2)
    default = metrics.masking_curve(model, x, y, sal, FRACTIONS, mode="insertion")
    explicit = metrics.masking_curve(model, x, y, sal, FRACTIONS, mode="insertion", baseline=metrics.blur(x))
    torch.testing.assert_close(default.prob, explicit.prob)


def test_deletion_ranks_by_saliency_not_position():
    # a reversed map deletes the least useful pixels first: the probability falls later, AUC is larger
    model = Linear2(W)
    x = torch.ones(1, 1, 2, 2)
    y = torch.zeros(1, dtype=torch.int64)
    good = torch.tensor(W).reshape(1, 2, 2)
    bad = 5.0 - good
    assert metrics.deletion_auc(model, x, y, good, FRACTIONS) < metrics.deletion_auc(model, x, y, bad, FRACTIONS)
    base = torch.zeros_like(x)                                         # (the blur of a constant is itself)
    assert (metrics.insertion_auc(model, x, y, good, FRACTIONS, baseline=base)
            > metrics.insertion_auc(model, x, y, bad, FRACTIONS, baseline=base))


def test_curves_accept_channel_saliency_like_x():
    model = Linear2(W)
    x = torch.ones(1, 1, 2, 2)
    y = torch.zeros(1, dtype=torch.int64)
    sal = torch.tensor(W).reshape(1, 1, 2, 2)
    a = metrics.masking_curve(model, x, y, sal, FRACTIONS)
    b = metrics.masking_curve(model, x, y, sal[:, 0], FRACTIONS)
    torch.testing.assert_close(a.prob, b.prob)


@pytest.mark.parametrize("device", DEVICES)
def test_accuracy_under_masking_hand_computed(device):
    # logit_0 = sum(w x) - 5.5 after deleting the most salient: 4.5, 0.5, -2.5, -4.5, -5.5
    model = Linear2(W, bias=5.5)
    x = torch.ones(2, 1, 2, 2, device=device)
    y = torch.tensor([0, 1], device=device)
    sal = torch.tensor([W, W], device=device)
    acc = metrics.accuracy_under_masking(model, x, y, sal, FRACTIONS, fill="zero")
    # sample 0 (class 0) right while logit_0 > 0; sample 1 (class 1) right once it is not
    torch.testing.assert_close(acc.cpu(), torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5]))
    counts = metrics.accuracy_under_masking(model, x[:1], y[:1], sal[:1], FRACTIONS, fill="zero",
                                            reduction="sum")
    assert counts.cpu().tolist() == [1, 1, 0, 0, 0]
    # constant fill 1.0 leaves the image unchanged: always right for sample 0
    same = metrics.accuracy_under_masking(model, x[:1], y[:1], sal[:1], FRACTIONS, fill="constant", value=1.0)
    assert same.cpu().tolist() == [1.0] * 5


def test_accuracy_under_masking_uniform_fill_uses_the_generator():
    model = Linear2(W)
    x = torch.rand(8, 1, 2, 2)
    y = torch.randint(0, 2, (8,))
    sal = torch.rand(8, 2, 2)
    a = metrics.accuracy_under_masking(model, x, y, sal, FRACTIONS, fill="uniform",
                                       generator=torch.Generator().manual_seed(3))
    b = metrics.accuracy_under_masking(model, x, y, sal, FRACTIONS, fill="uniform",
                                       generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert ((a >= 0) & (a <= 1)).all()


def test_curve_arguments_are_checked():
    model = Linear2(W)
    x = torch.ones(1, 1, 2, 2)
    y = torch.zeros(1, dtype=torch.int64)
    sal = torch.ones(1, 2, 2)
    with pytest.raises(ValueError, match="mode"):
        metrics.masking_curve(model, x, y, sal, FRACTIONS, mode="sideways")
    with pytest.raises(ValueError, match="fractions must be numbers in"):
        metrics.masking_curve(model, x, y, sal, [0.0, 1.5])
    with pytest.raises(ValueError, match="saliency must be a map"):
        metrics.masking_curve(model, x, y, torch.ones(1, 3, 3), FRACTIONS)
    with pytest.raises(ValueError, match="y must be a tensor of N=1"):
        metrics.masking_curve(model, x, torch.zeros(2, dtype=torch.int64), sal, FRACTIONS)
    with pytest.raises(ValueError, match="baseline must be a tensor shaped like x"):
        metrics.masking_curve(model, x, y, sal, FRACTIONS, baseline=torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="fill"):
        metrics.accuracy_under_masking(model, x, y, sal, FRACTIONS, fill="baseline")
    with pytest.raises(ValueError, match="reduction"):
        metrics.accuracy_under_masking(model, x, y, sal, FRACTIONS, reduction="none")


def test_blur_keeps_constants_and_mass():
    x = torch.full((2, 3, 8, 8), 0.7)
    torch.testing.assert_close(metrics.blur(x), x)
    spike = torch.zeros(1, 1, 9, 9)
    spike[0, 0, 4, 4] = 1.0
    out = metrics.blur(spike, sigma=1.0)
    torch.testing.assert_close(out.sum(), torch.tensor(1.0))         # away from the border: mass kept
    assert out[0, 0, 4, 4] == out.max() and out[0, 0, 4, 4] < 1.0
    torch.testing.assert_close(out, out.flip(-1))                       # symmetric kernel
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        metrics.blur(torch.ones(3, 3))
