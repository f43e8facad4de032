"""topk_mask on the triton backend (the interpreter without a GPU) against the reference."""

import math

import pytest
import torch

import sdecor
from sdecor import reference as ref
from sdecor.ops import topk
from sdecor.testing import assert_close

from test_topk_torch import _scores_with_ties

FILLS = ("zero", "constant", "mean", "uniform", "baseline")
# small shapes (the interpreter is slow): odd sizes, 2 to 5 dims, one row of a few thousand
SHAPES = [(3, 3, 7, 9), (2, 5, 13), (2, 2, 3, 4, 5), (3, 6), (1, 3, 40, 40)]


def _triton(x, s, **kw):
    with sdecor.use_backend("triton"):
        return sdecor.topk_mask(x, s, **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduce", ["mean", None], ids=["mean", "none"])
@pytest.mark.parametrize("largest", [False, True], ids=["smallest", "largest"])
def test_masks_and_outputs_match_reference(shape, reduce, largest, device, poison):
    x = torch.randn(shape, device=device)
    s = _scores_with_ties(shape).to(device)
    D = math.prod(shape[2:]) * (1 if reduce == "mean" else shape[1])
    ks = sorted({0, 1, D // 2, D}) if shape[-1] == 40 else sorted({0, 1, D // 3, D - 1, D})
    for k in ks:
        for fill in FILLS:
            base = torch.randn_like(x) if fill == "baseline" else None
            kw = dict(k=k, largest=largest, reduce=reduce, fill=fill, value=1.25, baseline=base)
            out, mask = _triton(x, s, generator=torch.Generator().manual_seed(1), **kw)
            rout, rmask = ref.topk_mask(x, s, **kw)
            assert mask.dtype == torch.bool and mask.shape == rmask.shape
            assert torch.equal(mask, rmask), (k, fill)
            if fill == "mean":                    # a reduction over S: summation order may differ
                assert_close(out, rout)
            elif fill == "uniform":
                assert torch.equal(out[~_bcast(mask, x, reduce)], x[~_bcast(mask, x, reduce)])
            else:
                assert torch.equal(out, rout), (k, fill)


def _bcast(mask, x, reduce):
    return mask.unsqueeze(1).expand_as(x) if reduce == "mean" else mask


@pytest.mark.parametrize("abs", [True, False], ids=["abs", "signed"])
def test_signed_scores_and_many_channels(abs, device):
    # 48 channels summed in order: the score bits match torch's mean
    x = torch.randn(2, 48, 7, 7, device=device)
    s = _scores_with_ties((2, 48, 7, 7)).to(device)
    for largest in (False, True):
        out, mask = _triton(x, s, ratio=0.4, abs=abs, largest=largest)
        rout, rmask = ref.topk_mask(x, s, ratio=0.4, abs=abs, largest=largest)
        assert torch.equal(mask, rmask) and torch.equal(out, rout)


def test_half_precision_scores(device):
    x = torch.randn(2, 3, 8, 8, device=device).half()
    s = _scores_with_ties((2, 3, 8, 8), torch.float16).to(device)
    s.view(-1)[:50] = torch.tensor(1.0009765625, dtype=torch.float16)   # ties after rounding
    for reduce in ("mean", None):
        out, mask = _triton(x, s, ratio=0.5, reduce=reduce, fill="constant", value=0.1)
        rout, rmask = ref.topk_mask(x, s, ratio=0.5, reduce=reduce, fill="constant", value=0.1)
        assert torch.equal(mask, rmask) and torch.equal(out, rout)


def test_uniform_in_channel_range_and_repeats(device):
    x = torch.randn(3, 4, 9, 9, device=device) * 3 + 1
    s = torch.randn_like(x)
    for reduce in ("mean", None):
        a = _triton(x, s, ratio=0.7, reduce=reduce, fill="uniform", generator=torch.Generator().manual_seed(4))
        b = _triton(x, s, ratio=0.7, reduce=reduce, fill="uniform", generator=torch.Generator().manual_seed(4))
        c = _triton(x, s, ratio=0.7, reduce=reduce, fill="uniform", generator=torch.Generator().manual_seed(5))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])
        lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        assert torch.all(a[0] >= lo) and torch.all(a[0] <= hi)
        filled = a[0][_bcast(a[1], x, reduce)]
        assert filled.unique().numel() > filled.numel() // 2         # noise, not a constant
        # roughly uniform: the mean of u = (v - lo) / (hi - lo) over the filled positions near 1/2
        u = ((a[0] - lo) / (hi - lo))[_bcast(a[1], x, reduce)]
        assert abs(float(u.mean()) - 0.5) < 0.05
    g = torch.Generator().manual_seed(4)
    first = _triton(x, s, ratio=0.7, fill="uniform", generator=g)[0]
    second = _triton(x, s, ratio=0.7, fill="uniform", generator=g)[0]
    assert not torch.equal(first, second)                             # the generator advanced


def test_one_long_row(device):
    # reduce=None on 3 x 30 x 30: a row of 2700 scores, every select step and the prefix count used
    x = torch.randn(2, 3, 30, 30, device=device)
    s = torch.randint(0, 7, x.shape, device=device).float()           # heavy ties
    for k in (1, 1349, 2699):
        out, mask = _triton(x, s, k=k, reduce=None)
        rout, rmask = ref.topk_mask(x, s, k=k, reduce=None)
        assert torch.equal(mask, rmask) and torch.equal(out, rout)


def test_forced_triton_rejects_float64():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(sdecor.BackendUnavailableError, match="float64"):
        _triton(x, x, ratio=0.5)


def test_opcheck(device):
    from torch.library import opcheck

    topk.topk_mask_op.op                         # registered on first use
    op = torch.ops.sdecor.topk_mask.default
    x = torch.randn(2, 3, 5, 7, device=device)
    s = torch.randn_like(x)
    opcheck(op, (x, s, 7, False, True, True, "uniform", 0.0, None, 3, 4))
    opcheck(op, (x, s, 20, True, False, False, "baseline", 0.0, torch.randn_like(x), 0, 0))
    opcheck(op, (x, s, 0, False, True, True, "mean", 0.0, None, 0, 0))
