"""Reference topk_mask against hand-built expectations: counts, ties, NaN order and every fill."""

import math

import pytest
import torch

from sdecor import reference as ref


def brute_force_selection(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The selected set by the definition, with Python's sort on (NaN-ness, value, index) keys."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    for n, row in enumerate(scores.tolist()):
        def key(i):
            v = row[i]
            nan = math.isnan(v)
            if largest:
                return (0 if nan else 1, 0.0 if nan else -v, i)
            return (1 if nan else 0, 0.0 if nan else v, i)
        for i in sorted(range(len(row)), key=key)[:k]:
            out[n, i] = True
    return out


@pytest.mark.parametrize("largest", [False, True], ids=["smallest", "largest"])
@pytest.mark.parametrize("reduce", ["mean", None], ids=["mean", "none"])
@pytest.mark.parametrize("k", [0, 1, 7, 20])
def test_selection_matches_definition(largest, reduce, k):
    x = torch.randn(3, 2, 4, 5)
    sal = torch.randn(3, 2, 4, 5)
    xm, mask = ref.topk_mask(x, sal, k=k if reduce == "mean" else 2 * k, largest=largest, reduce=reduce)
    kk = k if reduce == "mean" else 2 * k
    scores = sal.abs().mean(1).reshape(3, -1) if reduce == "mean" else sal.abs().reshape(3, -1)
    expected = brute_force_selection(scores, kk, largest)
    assert torch.equal(mask.reshape(3, -1), expected)
    assert (mask.reshape(3, -1).sum(1) == kk).all()
    assert mask.shape == ((3, 4, 5) if reduce == "mean" else x.shape)


def test_ties_broken_by_lower_flat_index():
    sal = torch.zeros(2, 1, 10)
    sal[1, 0, ::2] = 1.0                                      # sample 1: ties at 1.0 and at 0.0
    _, mask = ref.topk_mask(torch.randn(2, 1, 10), sal, k=3)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert mask[1].nonzero().flatten().tolist() == [1, 3, 5]
    _, mask = ref.topk_mask(torch.randn(2, 1, 10), sal, k=3, largest=True)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert mask[1].nonzero().flatten().tolist() == [0, 2, 4]


def test_negative_zero_ties_with_zero():
    sal = torch.tensor([[[0.0, -0.0, 0.0, -0.0]]])
    _, mask = ref.topk_mask(torch.randn(1, 1, 4), sal, k=2, abs=False)
    assert mask[0].nonzero().flatten().tolist() == [0, 1]


def test_nan_ranks_as_the_largest_value():
    sal = torch.tensor([[[float("nan"), 5.0, float("inf"), -1.0, float("nan"), 0.5]]])
    _, small = ref.topk_mask(torch.randn(1, 1, 6), sal, k=5, abs=False)
    assert small[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 5]       # all but the second NaN
    _, big = ref.topk_mask(torch.randn(1, 1, 6), sal, k=3, abs=False, largest=True)
    assert big[0].nonzero().flatten().tolist() == [0, 2, 4]              # NaNs first, then +inf


def test_abs_false_uses_signed_scores():
    sal = torch.tensor([[[-3.0, 1.0, 2.0, -0.5]]])
    _, m_abs = ref.topk_mask(torch.zeros(1, 1, 4), sal, k=1)
    _, m_signed = ref.topk_mask(torch.zeros(1, 1, 4), sal, k=1, abs=False)
    assert m_abs[0].nonzero().flatten().tolist() == [3]
    assert m_signed[0].nonzero().flatten().tolist() == [0]


def test_ratio_is_floored():
    x = torch.randn(2, 3, 7, 7)
    for ratio, k in [(0.0, 0), (0.5, 24), (0.999, 48), (1.0, 49), (0.1, 4)]:
        _, mask = ref.topk_mask(x, torch.rand_like(x), ratio=ratio)
        assert (mask.flatten(1).sum(1) == k).all(), (ratio, k)


def test_fills():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 4) * 2 + 1
    sal = torch.rand_like(x)
    base = torch.randn_like(x)
    _, mask = ref.topk_mask(x, sal, ratio=0.5)
    m = mask.unsqueeze(1).expand_as(x)
    keep = ~m

    for fill, kwargs, expected in [
        ("zero", {}, torch.zeros_like(x)),
        ("constant", {"value": -7.5}, torch.full_like(x, -7.5)),
        ("mean", {}, x.mean(dim=(2, 3), keepdim=True).expand_as(x)),
        ("baseline", {"baseline": base}, base),
    ]:
        xm, mk = ref.topk_mask(x, sal, ratio=0.5, fill=fill, **kwargs)
        assert torch.equal(mk, mask)
        assert torch.equal(xm[keep], x[keep])
        torch.testing.assert_close(xm[m], expected[m])

    g1 = torch.Generator().manual_seed(123)
    xm, _ = ref.topk_mask(x, sal, ratio=0.5, fill="uniform", generator=g1)
    lo = x.amin(dim=(2, 3), keepdim=True).expand_as(x)
    hi = x.amax(dim=(2, 3), keepdim=True).expand_as(x)
    assert torch.equal(xm[keep], x[keep])
    assert ((xm[m] >= lo[m]) & (xm[m] <= hi[m])).all()
    assert not torch.equal(xm[m], x[m])
    g2 = torch.Generator().manual_seed(123)
    xm2, _ = ref.topk_mask(x, sal, ratio=0.5, fill="uniform", generator=g2)
    assert torch.equal(xm, xm2)
    xm3, _ = ref.topk_mask(x, sal, ratio=0.5, fill="uniform", generator=g1)   # state advanced
    assert not torch.equal(xm, xm3)


def test_reduce_none_fills_per_element():
    x = torch.randn(2, 3, 5)
    sal = torch.rand_like(x)
    xm, mask = ref.topk_mask(x, sal, k=4, reduce=None, fill="constant", value=9.0)
    assert mask.shape == x.shape and (mask.flatten(1).sum(1) == 4).all()
    assert (xm[mask] == 9.0).all() and torch.equal(xm[~mask], x[~mask])


def test_two_dim_input_mean_fill_is_identity_over_empty_spatial_dims():
    x = torch.randn(4, 6)
    xm, mask = ref.topk_mask(x, torch.rand_like(x), k=3, reduce=None, fill="mean")
    assert torch.equal(xm, x) and mask.sum() == 12


def test_does_not_modify_inputs_and_keeps_dtype():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    sal = torch.randn_like(x)
    x0, s0 = x.clone(), sal.clone()
    xm, mask = ref.topk_mask(x, sal, ratio=0.3, fill="uniform")
    assert torch.equal(x, x0) and torch.equal(sal, s0)
    assert xm.dtype == torch.float64 and mask.dtype == torch.bool


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one of ratio and k"),
    (dict(ratio=0.5, k=3), "exactly one of ratio and k"),
    (dict(ratio=1.5), "ratio"), (dict(ratio=-0.1), "ratio"),
    (dict(k=17), r"k must be an int in \[0, D=16\]"), (dict(k=-1), "k must"), (dict(k=2.0), "k must"),
    (dict(k=1, fill="blur"), "fill"),
    (dict(k=1, reduce="max"), "reduce"),
    (dict(k=1, fill="baseline"), "baseline"),
    (dict(k=1, fill="baseline", baseline=torch.zeros(2, 3, 4)), "baseline"),
    (dict(k=1, baseline=torch.zeros(2, 3, 4, 4)), "only used with fill='baseline'"),
    (dict(k=1, fill="constant", value="a"), "value"),
])
def test_argument_errors(kwargs, match):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=match):
        ref.topk_mask(x, torch.rand_like(x), **kwargs)


def test_saliency_shape_must_match():
    with pytest.raises(ValueError, match="saliency must have the shape of x"):
        ref.topk_mask(torch.randn(2, 3, 4), torch.randn(2, 3, 5), k=1)
