"""Empty and bad input to the masking ops and the saliency metrics.

Empty batches (N = 0) and empty maps (a spatial dim of 0) give empty results of the right shapes and
dtypes, the same on the torch backend, the triton backend (the interpreter without a GPU) and the
reference, and draw nothing from the generator. Inputs without a meaningful answer raise TypeError /
ValueError naming the argument. Either way the caller's tensors are left as they were.
"""

import math

import pytest
import torch

import sdecor
from sdecor import metrics
from sdecor import reference as ref
from sdecor.masking import SaliencyMasker, progressive_masks

FILLS = ("zero", "constant", "mean", "uniform", "baseline")
# N = 0 (2 to 5 dims), a spatial dim of 0, and no channels (reduce=None only: see below)
EMPTY_BATCHES = [(0, 3, 4, 4), (0, 3), (0, 2, 5), (0, 2, 3, 4, 5)]
EMPTY_MAPS = [(2, 3, 0, 4), (2, 3, 4, 0), (3, 2, 0)]


def _call(backend, x, s, **kw):
    if backend == "reference":
        return ref.topk_mask(x, s, **kw)
    with sdecor.use_backend(backend):
        return sdecor.topk_mask(x, s, **kw)


def _snapshot(*tensors):
    return [t.clone() for t in tensors if isinstance(t, torch.Tensor)]


def _unchanged(before, *tensors):
    after = [t for t in tensors if isinstance(t, torch.Tensor)]
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def _expected_mask_shape(shape, reduce):
    return (shape[0],) + tuple(shape[2:]) if reduce == "mean" else tuple(shape)


# ---------------------------------------------------------------------------------------------------
# empty in, empty out


@pytest.mark.parametrize("shape", EMPTY_BATCHES + EMPTY_MAPS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduce", ["mean", None], ids=["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_topk_mask_agrees_on_every_backend(shape, reduce, dtype):
    x = torch.randn(shape).to(dtype)
    s = torch.randn(shape).to(dtype)
    D = math.prod(shape[2:]) * (1 if reduce == "mean" else shape[1])
    for fill in FILLS:
        base = torch.randn(shape).to(dtype) if fill == "baseline" else None
        for amount in ({"k": D // 2}, {"ratio": 0.5}, {"k": 0}):
            kw = dict(reduce=reduce, fill=fill, value=1.5, baseline=base, **amount)
            results = {}
            for backend in ("torch", "triton", "reference"):
                before = _snapshot(x, s, base)
                gen = torch.Generator().manual_seed(3)
                state = gen.get_state()
                out, mask = _call(backend, x, s, generator=gen, **kw)
                _unchanged(before, x, s, base)
                # nothing to draw: the generator is left where it was
                assert torch.equal(gen.get_state(), state), (backend, fill)
                assert out.shape == x.shape and out.dtype == x.dtype, (backend, fill)
                assert mask.shape == _expected_mask_shape(shape, reduce) and mask.dtype == torch.bool
                assert out.numel() == 0
                results[backend] = (out, mask)
            for backend in ("torch", "triton"):
                assert torch.equal(results[backend][0], results["reference"][0]), (backend, fill, amount)
                assert torch.equal(results[backend][1], results["reference"][1]), (backend, fill, amount)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 2, 6), (2, 3, 0, 4)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduce", ["mean", None], ids=["mean", "none"])
@pytest.mark.parametrize("fill", FILLS)
def test_empty_progressive_masks_stack_the_reference_levels(shape, reduce, fill):
    x, s = torch.randn(shape), torch.randn(shape)
    base = torch.randn(shape) if fill == "baseline" else None
    ratios = [0.0, 0.25, 1.0]
    before = _snapshot(x, s, base)
    got = progressive_masks(x, s, ratios, reduce=reduce, fill=fill, value=2.0, baseline=base,
                            generator=torch.Generator().manual_seed(0))
    _unchanged(before, x, s, base)
    L = len(ratios)
    assert got.x_masked.shape == (L,) + tuple(shape) and got.x_masked.dtype == x.dtype
    assert got.mask.shape == (L,) + _expected_mask_shape(shape, reduce) and got.mask.dtype == torch.bool
    for i, r in enumerate(ratios):
        rout, rmask = ref.topk_mask(x, s, ratio=r, largest=True, reduce=reduce, fill=fill, value=2.0,
                                    baseline=base, generator=torch.Generator().manual_seed(0))
        assert torch.equal(got.x_masked[i], rout) and torch.equal(got.mask[i], rmask)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_through_saliency_masker(backend):
    x, s = torch.randn(0, 3, 5, 5), torch.randn(0, 3, 5, 5)
    before = _snapshot(x, s)
    with sdecor.use_backend(backend):
        out, mask = SaliencyMasker(ratio=0.3, fill="uniform")(x, s)
    _unchanged(before, x, s)
    assert out.shape == (0, 3, 5, 5) and out.dtype == torch.float32
    assert mask.shape == (0, 5, 5) and mask.dtype == torch.bool


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_batch_metrics(dtype):
    s = torch.rand(0, 4, 4, dtype=dtype)
    before = _snapshot(s)
    for fn in (metrics.entropy, metrics.gini, lambda m: metrics.entropy(m, normalized=False)):
        got = fn(s)
        assert got.shape == (0,) and got.dtype == dtype
    _unchanged(before, s)


@pytest.mark.parametrize("fn", [metrics.entropy, metrics.gini], ids=["entropy", "gini"])
def test_map_without_positions_names_saliency(fn):
    s = torch.rand(2, 0, 4)
    with pytest.raises(ValueError, match="saliency must have at least one position"):
        fn(s)
    assert s.shape == (2, 0, 4)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_channel_mean_of_no_channels_names_x(backend):
    x, s = torch.randn(2, 0, 4, 4), torch.randn(2, 0, 4, 4)
    with pytest.raises(ValueError, match="x must have at least one channel for reduce='mean'"):
        _call(backend, x, s, ratio=0.5)
    with pytest.raises(ValueError, match="x must have at least one channel for reduce='mean'"):
        progressive_masks(x, s, [0.5])


# ---------------------------------------------------------------------------------------------------
# saliency of the wrong dtype


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("sal_dtype", [torch.bool, torch.int32, torch.int64, torch.uint8])
def test_non_float_saliency_names_saliency(backend, sal_dtype):
    x = torch.randn(2, 3, 4, 4)
    s = (torch.randn(2, 3, 4, 4) * 3).to(sal_dtype)
    before = _snapshot(x, s)
    msg = f"saliency must be a floating-point tensor; got dtype {sal_dtype}"
    with pytest.raises(TypeError, match="saliency must be a floating-point tensor"):
        _call(backend, x, s, ratio=0.5)
    with pytest.raises(TypeError, match=msg.replace(".", r"\.")):
        _call(backend, x, s, k=3, reduce=None, fill="uniform", generator=torch.Generator().manual_seed(0))
    if backend != "reference":
        with sdecor.use_backend(backend), pytest.raises(TypeError, match="saliency must be a floating-point"):
            SaliencyMasker(ratio=0.5)(x, s)
    _unchanged(before, x, s)


@pytest.mark.parametrize("sal_dtype", [torch.bool, torch.int32])
def test_non_float_saliency_in_progressive_masks_names_saliency(sal_dtype):
    x = torch.randn(2, 3, 4, 4)
    s = (torch.randn(2, 3, 4, 4) * 3).to(sal_dtype)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    before = _snapshot(x, s)
    with pytest.raises(TypeError, match="saliency must be a floating-point tensor"):
        progressive_masks(x, s, [0.1, 0.5], fill="uniform", generator=gen)
    _unchanged(before, x, s)
    assert torch.equal(gen.get_state(), state)


# ---------------------------------------------------------------------------------------------------
# blur


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 1, 1, 1)])
def test_blur_of_single_pixel_images_is_identity(shape):
    x = torch.randn(shape)
    before = _snapshot(x)
    for sigma in (None, 0.5, 4.0):
        got = metrics.blur(x, sigma)
        assert torch.equal(got, x) and got.dtype == x.dtype
        assert got.data_ptr() != x.data_ptr()                         # a copy, not the caller's tensor
    _unchanged(before, x)


@pytest.mark.parametrize("axis", ["row", "column"])
@pytest.mark.parametrize("sigma", [0.7, 1.5])
def test_blur_of_one_row_or_column_is_the_blur_along_the_other_axis(axis, sigma):
    # a 1 x W image equals any row of its copy stacked to 8 x W (constant along H, which a normalised
    # kernel keeps constant); 8 >= W keeps the radius bound (smaller blurred axis - 1) the same
    line = torch.randn(2, 3, 1, 6) if axis == "row" else torch.randn(2, 3, 6, 1)
    stacked = line.expand(2, 3, 8, 6) if axis == "row" else line.expand(2, 3, 6, 8)
    before = _snapshot(line)
    got = metrics.blur(line, sigma)
    want = metrics.blur(stacked.contiguous(), sigma)
    want = want[:, :, :1] if axis == "row" else want[:, :, :, :1]
    assert got.shape == line.shape and got.dtype == line.dtype
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    _unchanged(before, line)


@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (2, 3, 0, 8), (2, 3, 8, 0)])
def test_blur_of_empty_images_is_empty(shape):
    x = torch.randn(shape)
    got = metrics.blur(x)
    assert got.shape == x.shape and got.dtype == x.dtype


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_blur_of_non_float_images_names_x(dtype):
    x = torch.randint(0, 2, (1, 3, 8, 8)).to(dtype)
    before = _snapshot(x)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        metrics.blur(x)
    _unchanged(before, x)


@pytest.mark.parametrize("sigma", [float("nan"), float("inf"), -1.0, 0.0, "2", True])
def test_blur_bad_sigma_names_sigma(sigma):
    x = torch.randn(1, 3, 8, 8)
    before = _snapshot(x)
    with pytest.raises(ValueError, match="sigma must be a positive finite number"):
        metrics.blur(x, sigma)
    _unchanged(before, x)


# ---------------------------------------------------------------------------------------------------
# trapezoid_auc


def test_trapezoid_auc_repeated_fraction_adds_zero_width():
    # [0, .5, .5, 1]: (1 + .5) / 2 * .5 + 0 + (.25 + 0) / 2 * .5 = .4375, over a span of 1
    curve = torch.tensor([[1.0, 0.5, 0.25, 0.0], [1.0, 1.0, 1.0, 1.0]])
    before = _snapshot(curve)
    got = metrics.trapezoid_auc(curve, [0.0, 0.5, 0.5, 1.0])
    torch.testing.assert_close(got, torch.tensor([0.4375, 1.0]))
    # a repeated first fraction, over the span .2 -> .6: (2 + 4) / 2 * .4 / .4 = 3
    torch.testing.assert_close(metrics.trapezoid_auc(torch.tensor([9.0, 2.0, 4.0]), [0.2, 0.2, 0.6]),
                               torch.tensor(3.0))
    _unchanged(before, curve)


@pytest.mark.parametrize("fractions", [[0.5, 0.5], [0.3, 0.3, 0.3], [0.0, 1.0, 0.0]])
def test_trapezoid_auc_without_span_names_fractions(fractions):
    curve = torch.ones(len(fractions))
    with pytest.raises(ValueError, match="fractions must span a nonzero range"):
        metrics.trapezoid_auc(curve, fractions)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_trapezoid_auc_non_finite_fraction_names_fractions(bad):
    with pytest.raises(ValueError, match="fractions must be finite"):
        metrics.trapezoid_auc(torch.ones(3), [0.0, bad, 1.0])
