"""The torch backend of topk_mask (kthvalue on (value, index) keys) against the reference, bit for bit,
plus progressive_masks, SaliencyMasker and argument checks. No Triton involved. Every test runs on
the torch backend (CPU tensors would otherwise pick the native one where it is built: see
test_topk_native.py)."""

import math

import pytest
import torch

import sdecor
from sdecor import masking
from sdecor import reference as ref
from sdecor.ops.topk_torch import order_keys

FILLS = ("zero", "constant", "mean", "uniform", "baseline")
SHAPES = [(3, 3, 7, 7), (2, 5, 13), (4, 1, 3, 4, 5), (3, 6)]


@pytest.fixture(autouse=True)
def _torch_backend():
    with sdecor.use_backend("torch"):
        yield


def _scores_with_ties(shape, dtype=torch.float32):
    """Saliency with repeated values, both zeros, NaN and infinities."""
    s = torch.randn(shape).to(dtype)
    flat = s.view(-1)
    n = flat.numel()
    flat[torch.randperm(n)[: n // 3]] = 0.5                        # many ties
    flat[torch.randperm(n)[: max(1, n // 10)]] = -0.0
    flat[torch.randperm(n)[: max(1, n // 10)]] = 0.0
    flat[torch.randperm(n)[: max(1, n // 12)]] = float("nan")
    flat[torch.randperm(n)[:1]] = float("inf")
    flat[torch.randperm(n)[:1]] = float("-inf")
    return s


def _call(fn, x, s, fill, seed=0, **kw):
    base = torch.randn_like(x) if fill == "baseline" else None
    gen = torch.Generator().manual_seed(seed)
    return fn(x, s, fill=fill, value=1.25, baseline=base, generator=gen, **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduce", ["mean", None], ids=["mean", "none"])
@pytest.mark.parametrize("largest", [False, True], ids=["smallest", "largest"])
@pytest.mark.parametrize("abs", [True, False], ids=["abs", "signed"])
def test_torch_backend_matches_reference_bitwise(shape, reduce, largest, abs):
    x = torch.randn(shape)
    s = _scores_with_ties(shape)
    D = math.prod(shape[2:]) * (1 if reduce == "mean" else shape[1])
    for k in sorted({0, 1, D // 3, D // 2, D - 1, D}):
        for fill in FILLS:
            torch.manual_seed(1)
            base = torch.randn_like(x) if fill == "baseline" else None
            kw = dict(k=k, largest=largest, reduce=reduce, abs=abs, fill=fill, value=1.25, baseline=base)
            with sdecor.use_backend("torch"):
                out, mask = sdecor.topk_mask(x, s, generator=torch.Generator().manual_seed(3), **kw)
            rout, rmask = ref.topk_mask(x, s, generator=torch.Generator().manual_seed(3), **kw)
            assert torch.equal(mask, rmask), (k, fill)
            assert torch.equal(out.isnan(), rout.isnan())
            assert torch.equal(out.nan_to_num(), rout.nan_to_num()), (k, fill)
            assert int(mask.view(shape[0], -1).sum(1).min()) == k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_torch_backend_other_dtypes(dtype):
    x = torch.randn(3, 4, 9, 5).to(dtype)
    s = _scores_with_ties((3, 4, 9, 5), dtype)
    for reduce in ("mean", None):
        for largest in (False, True):
            a = sdecor.topk_mask(x, s, ratio=0.37, largest=largest, reduce=reduce, fill="mean")
            b = ref.topk_mask(x, s, ratio=0.37, largest=largest, reduce=reduce, fill="mean")
            assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_order_keys_order_every_float_class():
    vals = torch.tensor([float("-inf"), -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3e38,
                         float("inf"), float("nan"), -float("nan")])
    keys = order_keys(vals[None], largest=False)[0] >> 32
    assert torch.all(keys[1:4] > keys[0:3])
    assert keys[4] == keys[5]                                      # -0.0 == +0.0
    assert torch.all(keys[6:10] > keys[5:9])
    assert keys[10] == keys[11] and keys[10] > keys[9]              # all NaN above +inf


def test_all_ties_select_lowest_indices():
    x = torch.randn(2, 3, 4, 4)
    s = torch.ones_like(x)
    for largest in (False, True):
        _, mask = sdecor.topk_mask(x, s, k=5, largest=largest)
        expect = torch.zeros(2, 16, dtype=torch.bool)
        expect[:, :5] = True
        assert torch.equal(mask.view(2, -1), expect)


def test_nan_ranks_largest():
    x = torch.randn(1, 1, 10)
    s = torch.arange(10.0).view(1, 1, 10)
    s[0, 0, 2] = float("nan")
    _, small = sdecor.topk_mask(x, s, k=9)
    assert not bool(small[0, 2]) and int(small.sum()) == 9
    _, big = sdecor.topk_mask(x, s, k=1, largest=True)
    assert bool(big[0, 2]) and int(big.sum()) == 1


def test_ratio_bounds_and_k_range():
    x, s = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    out, mask = sdecor.topk_mask(x, s, ratio=0.0)
    assert not mask.any() and torch.equal(out, x)
    out, mask = sdecor.topk_mask(x, s, ratio=1.0, fill="constant", value=7.0)
    assert mask.all() and torch.all(out == 7.0)
    _, mask = sdecor.topk_mask(x, s, ratio=0.999)
    assert int(mask[0].sum()) == math.floor(0.999 * 25)
    for bad in (dict(ratio=1.5), dict(ratio=-0.1), dict(k=26), dict(k=-1), dict(ratio=0.5, k=3), dict(),
                dict(k=2.0), dict(ratio=True)):
        with pytest.raises(ValueError):
            sdecor.topk_mask(x, s, **bad)
    with pytest.raises(ValueError, match="fill"):
        sdecor.topk_mask(x, s, ratio=0.5, fill="blur")
    with pytest.raises(ValueError, match="baseline"):
        sdecor.topk_mask(x, s, ratio=0.5, fill="baseline")
    with pytest.raises(ValueError, match="saliency"):
        sdecor.topk_mask(x, s[:, :2], ratio=0.5)
    with pytest.raises(ValueError, match="reduce"):
        sdecor.topk_mask(x, s, ratio=0.5, reduce="max")
    with pytest.raises(TypeError, match="generator"):
        sdecor.topk_mask(x, s, ratio=0.5, fill="uniform", generator=3)


def test_uniform_repeats_and_stays_in_channel_range():
    x, s = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    a = _call(sdecor.topk_mask, x, s, "uniform", seed=5, ratio=0.6)
    b = _call(sdecor.topk_mask, x, s, "uniform", seed=5, ratio=0.6)
    c = _call(sdecor.topk_mask, x, s, "uniform", seed=6, ratio=0.6)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    assert torch.all(a[0] >= lo) and torch.all(a[0] <= hi)


# ---------------------------------------------------------------------------------------------------
# progressive masks


@pytest.mark.parametrize("reduce", ["mean", None], ids=["mean", "none"])
@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
@pytest.mark.parametrize("fill", FILLS)
def test_progressive_masks_match_topk_mask_at_every_ratio(reduce, largest, fill):
    x = torch.randn(3, 2, 5, 7)
    s = _scores_with_ties(x.shape)
    base = torch.randn_like(x)
    ratios = [0.0, 0.1, 0.25, 0.25, 0.5, 0.9, 1.0]
    opts = dict(largest=largest, reduce=reduce, fill=fill, value=-2.0,
                baseline=base if fill == "baseline" else None)
    res = masking.progressive_masks(x, s, ratios, generator=torch.Generator().manual_seed(9), **opts)
    assert res.x_masked.shape == (len(ratios),) + x.shape
    for i, r in enumerate(ratios):
        out, mask = sdecor.topk_mask(x, s, ratio=r, generator=torch.Generator().manual_seed(9), **opts)
        assert torch.equal(res.mask[i], mask), r
        assert torch.equal(res.x_masked[i], out), r
    for i in range(1, len(ratios)):                                # nested levels
        assert torch.all(res.mask[i] >= res.mask[i - 1])


def test_progressive_masks_default_deletes_most_salient_first():
    x = torch.randn(1, 1, 8)
    s = torch.arange(8.0).view(1, 1, 8)
    res = masking.progressive_masks(x, s, [0.25])
    assert res.mask[0, 0].tolist() == [False] * 6 + [True] * 2


def test_progressive_masks_arguments():
    x, s = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    for bad in ([], [0.5, 0.2], [1.2], [True]):
        with pytest.raises(ValueError):
            masking.progressive_masks(x, s, bad)
    with pytest.raises(TypeError):
        masking.progressive_masks(x, s, 0.5)


# ---------------------------------------------------------------------------------------------------
# module form


def test_saliency_masker_module():
    x, s = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    m = masking.SaliencyMasker(ratio=0.3, fill="constant", value=2.0, largest=True)
    out, mask = m(x, s)
    rout, rmask = ref.topk_mask(x, s, ratio=0.3, fill="constant", value=2.0, largest=True)
    assert torch.equal(out, rout) and torch.equal(mask, rmask)
    assert "ratio=0.3" in repr(m) and list(m.parameters()) == []
    base = torch.zeros_like(x)
    out, mask = masking.SaliencyMasker(k=4, fill="baseline")(x, s, base)
    assert torch.equal(out, torch.where(mask.unsqueeze(1), base, x))
    for bad in (dict(), dict(ratio=0.2, k=1), dict(ratio=2.0), dict(k=-1), dict(ratio=0.2, fill="x"),
                dict(ratio=0.2, reduce="sum"), dict(ratio=0.2, value="a")):
        with pytest.raises(ValueError):
            masking.SaliencyMasker(**bad)
