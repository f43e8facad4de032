"""topk_mask on the native backend (the C++ op sdecor::native_topk_mask on CPU tensors) against the
torch backend: masks bit for bit and every output equal (the uniform noise aside, which is checked for
range, reproducibility and independence of the thread count), every gradient, opcheck, torch.compile
and autocast."""

import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import sdecor
from sdecor import _ext
from sdecor.ops import topk

from test_topk_torch import _scores_with_ties

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"sdecor._C is not built: {_ext.error()}")

FILLS = ("zero", "constant", "mean", "uniform", "baseline")
# odd sizes, 2 to 5 dims, one row of a few thousand scores
SHAPES = [(3, 3, 7, 9), (2, 5, 13), (2, 2, 3, 4, 5), (3, 6), (1, 3, 40, 40)]


def _native(x, s, **kw):
    with sdecor.use_backend("native"):
        return sdecor.topk_mask(x, s, **kw)


def _torch(x, s, **kw):
    with sdecor.use_backend("torch"):
        return sdecor.topk_mask(x, s, **kw)


def _bcast(mask, x, reduce):
    return mask.unsqueeze(1).expand_as(x) if reduce == "mean" else mask


def _assert_same(got, want, reduce, fill, x):
    """Masks bit for bit; outputs equal (NaN where NaN); uniform: the kept positions equal x and the
    filled ones lie in their channel's [min, max]."""
    out, mask = got
    rout, rmask = want
    assert mask.dtype == torch.bool and mask.shape == rmask.shape
    assert torch.equal(mask, rmask)
    assert out.dtype == x.dtype and out.shape == x.shape
    if fill == "uniform":
        keep = ~_bcast(mask, x, reduce)
        assert torch.equal(out[keep], x[keep])
        if x.dim() > 2:
            spatial = tuple(range(2, x.dim()))
            lo, hi = x.amin(spatial, keepdim=True), x.amax(spatial, keepdim=True)
            assert torch.all((out >= lo) & (out <= hi) | out.isnan())
        else:                                     # no trailing dims: min = max = x, the fill is x
            assert torch.equal(out.nan_to_num(), x.nan_to_num())
    else:
        assert torch.equal(out.isnan(), rout.isnan())
        assert torch.equal(out.nan_to_num(), rout.nan_to_num())


def _both(x, s, fill, **kw):
    base = (torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x.dtype)
            if fill == "baseline" else None)
    kw = dict(kw, fill=fill, value=1.25, baseline=base)
    got = _native(x, s, generator=torch.Generator().manual_seed(1), **kw)
    want = _torch(x, s, generator=torch.Generator().manual_seed(1), **kw)
    return got, want


def test_auto_selection_picks_native_for_cpu_tensors():
    assert topk.SUPPORTS["cpu"][0] == "native"
    x = torch.randn(2, 3, 4, 4)
    assert sdecor._backend.select("topk_mask", {"x": x, "saliency": x}, topk._supports(x, x)) == "native"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduce", ["mean", None], ids=["mean", "none"])
@pytest.mark.parametrize("largest", [False, True], ids=["smallest", "largest"])
@pytest.mark.parametrize("abs", [True, False], ids=["abs", "signed"])
def test_masks_and_outputs_match_torch_backend(shape, reduce, largest, abs):
    x = torch.randn(shape)
    s = _scores_with_ties(shape)
    D = math.prod(shape[2:]) * (1 if reduce == "mean" else shape[1])
    for k in sorted({0, 1, D // 3, D // 2, D - 1, D}):
        for fill in FILLS:
            got, want = _both(x, s, fill, k=k, largest=largest, reduce=reduce, abs=abs)
            _assert_same(got, want, reduce, fill, x)
            assert int(got[1].reshape(shape[0], -1).sum(1).min()) == k


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduce", ["mean", None], ids=["mean", "none"])
def test_other_dtypes(dtype, reduce):
    x = torch.randn(3, 4, 9, 5).to(dtype)
    s = _scores_with_ties((3, 4, 9, 5), dtype)
    for largest in (False, True):
        for fill in FILLS:
            got, want = _both(x, s, fill, ratio=0.37, largest=largest, reduce=reduce)
            _assert_same(got, want, reduce, fill, x)


def test_mixed_dtypes_of_x_saliency_and_baseline():
    x = torch.randn(2, 3, 5, 6).to(torch.bfloat16)
    s = _scores_with_ties((2, 3, 5, 6), torch.float64)
    base = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    for reduce in ("mean", None):
        kw = dict(ratio=0.5, reduce=reduce, fill="baseline", baseline=base)
        got, want = _native(x, s, **kw), _torch(x, s, **kw)
        _assert_same(got, want, reduce, "baseline", x)


def test_channel_mean_is_summed_in_channel_order():
    # position 1 holds channels (1e8, 1, -1e8, 1): added in order in fp32 they give 1 (1e8 + 1 rounds
    # to 1e8), so its score 0.25 ranks between positions 0 (0.1) and 2 (0.3); added in reverse or
    # pairwise they give 0 (ranked first), accumulated in fp64 they give 2 (0.5, ranked after 0.3)
    s = torch.zeros(1, 4, 4)
    s[0, :, 0] = 0.1
    s[0, :, 1] = torch.tensor([1e8, 1.0, -1e8, 1.0])
    s[0, :, 2] = 0.3
    s[0, :, 3] = 3.0
    x = torch.randn(1, 4, 4)
    for k, expect in ((1, [True, False, False, False]), (2, [True, True, False, False])):
        got, want = _native(x, s, k=k, abs=False), _torch(x, s, k=k, abs=False)
        assert torch.equal(want[1], torch.tensor([expect]))
        assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_channel_mean_rounds_to_the_saliency_dtype(dtype):
    # 48 channels of a few values: many fp32 means differ only in bits the saliency's dtype drops, and
    # become ties broken by index
    g = torch.Generator().manual_seed(3)
    vals = torch.tensor([0.1, 0.3, 1 / 3, 0.7, 1.1, 2.9])
    s = vals[torch.randint(0, 6, (4, 48, 7, 7), generator=g)].to(dtype)
    x = torch.randn(4, 48, 7, 7)
    for largest in (False, True):
        for k in (1, 10, 24, 48):
            got = _native(x, s, k=k, largest=largest)
            want = _torch(x, s, k=k, largest=largest)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_heavy_ties_and_nan_in_one_long_row():
    x = torch.randn(2, 3, 30, 30)
    s = torch.randint(0, 7, x.shape).float()
    s[0, 1, 3, :] = float("nan")
    s[1, 0, :, 2] = -0.0
    for k in (1, 1349, 2699, 2700):
        for largest in (False, True):
            got, want = _both(x, s, "zero", k=k, reduce=None, largest=largest)
            _assert_same(got, want, None, "zero", x)


def test_all_ties_select_lowest_indices_and_nan_ranks_largest():
    x = torch.randn(2, 3, 4, 4)
    for largest in (False, True):
        _, mask = _native(x, torch.ones_like(x), k=5, largest=largest)
        expect = torch.zeros(2, 16, dtype=torch.bool)
        expect[:, :5] = True
        assert torch.equal(mask.view(2, -1), expect)
    s = torch.arange(10.0).view(1, 1, 10)
    s[0, 0, 2] = float("nan")
    _, small = _native(torch.randn(1, 1, 10), s, k=9)
    assert not bool(small[0, 2]) and int(small.sum()) == 9
    _, big = _native(torch.randn(1, 1, 10), s, k=1, largest=True)
    assert bool(big[0, 2]) and int(big.sum()) == 1


@pytest.mark.parametrize("fmt, shape", [(torch.channels_last, (3, 5, 7, 6)),
                                        (torch.channels_last_3d, (2, 3, 4, 3, 5))],
                         ids=["channels_last", "channels_last_3d"])
def test_memory_formats(fmt, shape):
    x = torch.randn(shape).contiguous(memory_format=fmt)
    s = _scores_with_ties(shape)
    for s_in in (s, s.contiguous(memory_format=fmt)):
        for reduce in ("mean", None):
            for fill in FILLS:
                got, want = _both(x, s_in, fill, ratio=0.4, reduce=reduce)
                _assert_same(got, want, reduce, fill, x)
                assert got[0].is_contiguous(memory_format=fmt)
    # the baseline in another format than x
    base = torch.randn(shape)
    got = _native(x, s, ratio=0.4, fill="baseline", baseline=base)
    want = _torch(x, s, ratio=0.4, fill="baseline", baseline=base)
    assert torch.equal(got[0], want[0]) and got[0].is_contiguous(memory_format=fmt)


def test_non_contiguous_inputs():
    big = torch.randn(4, 6, 9, 10)
    x = big[::2, 1:4, :, ::2]                     # strided view
    s = _scores_with_ties((4, 6, 9, 10))[::2, 2:5, :, 1::2]
    base = big.transpose(2, 3).contiguous().transpose(2, 3)[::2, 1:4, :, ::2] + 1
    for reduce in ("mean", None):
        for fill in FILLS:
            kw = dict(ratio=0.3, reduce=reduce, fill=fill, value=-1.0,
                      baseline=base if fill == "baseline" else None)
            got = _native(x, s, generator=torch.Generator().manual_seed(1), **kw)
            want = _torch(x, s, generator=torch.Generator().manual_seed(1), **kw)
            _assert_same(got, want, reduce, fill, x)
            assert got[0].is_contiguous()


def test_empty_inputs():
    for shape, kw in (((0, 3, 4, 4), dict(k=0)), ((2, 3, 0), dict(k=0)), ((2, 0, 5), dict(k=0, reduce=None))):
        x = torch.randn(shape)
        g = torch.Generator().manual_seed(0)
        state = g.get_state()
        out, mask = _native(x, x, fill="uniform", generator=g, **kw)
        rout, rmask = _torch(x, x, fill="uniform", **kw)
        assert out.shape == rout.shape and mask.shape == rmask.shape
        assert torch.equal(g.get_state(), state)     # nothing drawn


def test_constant_is_rounded_like_torch_full():
    x = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    for value in (0.1, 1 / 3, -7.77, 1e-40):
        out, mask = _native(x, x, ratio=0.5, fill="constant", value=value)
        full = torch.full((), value, dtype=torch.bfloat16)
        assert torch.all(out[mask.unsqueeze(1).expand_as(x)] == full)


# ---------------------------------------------------------------------------------------------------
# uniform


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_uniform_repeats_stays_in_range_and_changes_only_masked(dtype):
    x = (torch.randn(3, 4, 9, 9) * 3 + 1).to(dtype)
    s = torch.randn(3, 4, 9, 9)
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    for reduce in ("mean", None):
        a = _native(x, s, ratio=0.7, reduce=reduce, fill="uniform", generator=torch.Generator().manual_seed(4))
        b = _native(x, s, ratio=0.7, reduce=reduce, fill="uniform", generator=torch.Generator().manual_seed(4))
        c = _native(x, s, ratio=0.7, reduce=reduce, fill="uniform", generator=torch.Generator().manual_seed(5))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(a[1], c[1]) and not torch.equal(a[0], c[0])
        where = _bcast(a[1], x, reduce)
        assert torch.equal(a[0][~where], x[~where])
        assert torch.all(a[0] >= lo) and torch.all(a[0] <= hi)
        filled = a[0][where]
        assert filled.unique().numel() > filled.numel() // 2            # noise, not a constant
        u = ((a[0].double() - lo.double()) / (hi.double() - lo.double()))[where]
        assert abs(float(u.mean()) - 0.5) < 0.05
    g = torch.Generator().manual_seed(4)
    first = _native(x, s, ratio=0.7, fill="uniform", generator=g)[0]
    second = _native(x, s, ratio=0.7, fill="uniform", generator=g)[0]
    assert not torch.equal(first, second)                                # the generator advanced
    torch.manual_seed(8)
    d1 = _native(x, s, ratio=0.7, fill="uniform")[0]
    torch.manual_seed(8)
    d2 = _native(x, s, ratio=0.7, fill="uniform")[0]
    assert torch.equal(d1, d2)                                           # the default generator


@pytest.mark.parametrize("dtype, lo, hi", [(torch.bfloat16, -255.0, 0.5), (torch.float16, -1023.0, 2.5)],
                         ids=["bfloat16", "float16"])
def test_uniform_stays_in_range_where_rounding_would_leave_it(dtype, lo, hi):
    # hi - lo (255.5, 1025.5) rounds up in x's dtype (to 256, 1026), as the torch backend computes it,
    # so lo + (hi - lo) u passes hi for u above 0.998 (0.9995), a few of each channel's 2048 draws,
    # and would round to 1.0 (3.0) without the clamp
    x = torch.rand(4, 4, 32, 64) * (hi - lo) + lo
    x[:, :, 0, 0], x[:, :, 0, 1] = lo, hi
    xd = x.to(dtype)
    assert float(xd.amin()) == lo and float(xd.amax()) == hi
    out, _ = _native(xd, torch.rand(x.shape), ratio=1.0, fill="uniform",
                     generator=torch.Generator().manual_seed(1))
    assert torch.all(out >= lo) and torch.all(out <= hi)
    assert float(out.max()) > hi - 0.1 * (hi - lo)                    # draws near the top


def _philox4x32_10(blocks, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC 2011) in numpy: words (len(blocks), 4) of the counters
    (block low, block high, c2, c3) under the key (k0, k1)."""
    import numpy as np

    u32, mask = np.uint64(32), np.uint64(0xFFFFFFFF)
    blocks = np.asarray(blocks, dtype=np.uint64)
    x0, x1 = blocks & mask, blocks >> u32
    x2, x3 = np.full_like(x0, c2), np.full_like(x0, c3)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * x0, np.uint64(0xCD9E8D57) * x2
        x0, x1, x2, x3 = (p1 >> u32) ^ x1 ^ np.uint64(k0), p1 & mask, (p0 >> u32) ^ x3 ^ np.uint64(k1), p0 & mask
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return np.stack([x0, x1, x2, x3], 1)


def test_uniform_noise_is_the_philox_stream_of_seed_and_call():
    """u of flat element i: Philox4x32-10 under key = seed, counter = (i // 4, call), word i % 4, its top
    24 bits (float64 x: two words of block i // 2, 53 bits), as the op documents."""
    import numpy as np

    # the published known-answer vectors of Philox4x32-10 (Random123)
    assert [int(v) for v in _philox4x32_10([0], 0, 0, 0, 0)[0]] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert ([int(v) for v in _philox4x32_10([(ones << 32) | ones], ones, ones, ones, ones)[0]]
            == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD])
    seed, call = 12345678901, 987654321012
    x = torch.randn(3, 4, 37, 29)
    s = torch.randn_like(x)
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype)
        out, mask = torch.ops.sdecor.native_topk_mask(xd, s, 500, False, True, True, "uniform", 0.0, None, seed, call)
        n = xd.numel()
        i = np.arange(n, dtype=np.uint64)
        per = np.uint64(4 if dtype == torch.float32 else 2)
        r = _philox4x32_10(i // per, call & ones, call >> 32, seed & ones, seed >> 32)
        j = (i % per).astype(np.int64)
        rows = np.arange(n)
        if dtype == torch.float32:
            u = (r[rows, j] >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)
        else:
            bits = ((r[rows, 2 * j] << np.uint64(32)) | r[rows, 2 * j + 1]) >> np.uint64(11)
            u = bits.astype(np.float64) * 2.0**-53
        u = torch.from_numpy(u).reshape(x.shape)
        lo, hi = xd.amin((2, 3), keepdim=True), xd.amax((2, 3), keepdim=True)
        want = torch.minimum(torch.maximum(lo + (hi - lo) * u, lo), hi)
        where = mask.unsqueeze(1).expand_as(xd)
        assert torch.equal(out[where], want[where])


# ---------------------------------------------------------------------------------------------------
# thread count


def test_outputs_do_not_depend_on_the_thread_count():
    x = torch.randn(9, 3, 40, 40)                 # 9 samples of 4800 elements: split among threads
    s = _scores_with_ties(x.shape)
    base = torch.randn_like(x)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            run = []
            for reduce in ("mean", None):
                for fill in FILLS:
                    run.append(_native(x, s, ratio=0.45, reduce=reduce, fill=fill,
                                       baseline=base if fill == "baseline" else None,
                                       generator=torch.Generator().manual_seed(6)))
            results.append(run)
    finally:
        torch.set_num_threads(before)
    for (a, ma), (b, mb) in zip(*results):
        assert torch.equal(ma, mb) and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# gradients


def _grads(fn, x, baseline, weights):
    xx = x.clone().requires_grad_()
    bb = baseline.clone().requires_grad_() if baseline is not None else None
    out, mask = fn(xx, bb)
    (out * weights).sum().backward()
    return out, mask, xx.grad, (bb.grad if bb is not None else None)


@pytest.mark.parametrize("reduce", ["mean", None], ids=["mean", "none"])
@pytest.mark.parametrize("fill", ["zero", "constant", "mean", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_equal_torch_backend(fill, reduce, dtype):
    x = torch.randn(3, 4, 5, 6).to(dtype)
    sal = torch.rand(3, 4, 5, 6)
    baseline = torch.randn_like(x) if fill == "baseline" else None
    weights = torch.linspace(-1, 2, x.numel()).reshape(x.shape).to(dtype)
    kw = dict(ratio=0.4, reduce=reduce, fill=fill, value=1.5)
    got = _grads(lambda xx, bb: _native(xx, sal, baseline=bb, **kw), x, baseline, weights)
    want = _grads(lambda xx, bb: _torch(xx, sal, baseline=bb, **kw), x, baseline, weights)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.equal(g, w)


def test_uniform_gradient_goes_to_kept_positions_and_channel_extremes():
    """The uniform fill's gradient (the triton op's backward, u recovered from the output): 1 at kept
    positions, 0 at masked ones other than the channel's min and max, and a total of P per channel
    (the masked mass (1 - u) + u = 1 each goes to the min and the max)."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    sal = torch.rand_like(x)
    xx = x.clone().requires_grad_()
    out, mask = _native(xx, sal, ratio=0.5, fill="uniform", generator=torch.Generator().manual_seed(2))
    out.sum().backward()
    where = mask.unsqueeze(1).expand_as(x)
    # total gradient per channel: kept positions 1 each, masked mass (1 - u) + u = 1 each -> P in all
    assert torch.allclose(xx.grad.sum((2, 3)), torch.full((2, 3), 20.0, dtype=torch.float64))
    lo, hi = x == x.amin((2, 3), keepdim=True), x == x.amax((2, 3), keepdim=True)
    assert torch.equal(xx.grad[~where & ~lo & ~hi], torch.ones_like(xx.grad[~where & ~lo & ~hi]))
    assert torch.all(xx.grad[where & ~lo & ~hi] == 0)


@pytest.mark.parametrize("reduce", ["mean", None], ids=["mean", "none"])
@pytest.mark.parametrize("fill", FILLS)
def test_gradcheck_and_double_backward(fill, reduce):
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    sal = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    baseline = torch.randn_like(x, requires_grad=True)

    def fn(x, baseline):
        gen = torch.Generator().manual_seed(7)                        # the same noise on every call
        return _native(x, sal, ratio=0.4, reduce=reduce, fill=fill, value=0.5,
                       baseline=baseline if fill == "baseline" else None, generator=gen)[0]

    assert gradcheck(fn, (x, baseline))
    assert gradgradcheck(fn, (x, baseline))


# ---------------------------------------------------------------------------------------------------
# op registration: opcheck, torch.compile, autocast, errors


def test_opcheck():
    from torch.library import opcheck

    op = torch.ops.sdecor.native_topk_mask.default
    x = torch.randn(2, 3, 5, 7)
    s = torch.randn_like(x)
    opcheck(op, (x, s, 7, False, True, True, "uniform", 0.0, None, 3, 4))
    opcheck(op, (x.requires_grad_(), s, 20, True, False, False, "baseline", 0.0,
                 torch.randn_like(x, requires_grad=True), 0, 0))
    opcheck(op, (x.detach(), s, 0, False, True, True, "mean", 0.0, None, 0, 0))
    opcheck(op, (x.detach().contiguous(memory_format=torch.channels_last), s, 11, False, True, True,
                 "constant", 2.0, None, 0, 0))
    opcheck(op, (torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5), 3, False, False, True, "zero",
                 0.0, None, 0, 0))


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="needs torch.compile")
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(3, 4, 6, 7)
    s = _scores_with_ties(x.shape)
    base = torch.randn_like(x)

    def fn(x, s, base):
        a = sdecor.topk_mask(x, s, ratio=0.3, fill="mean")
        b = sdecor.topk_mask(x, s, k=17, reduce=None, largest=True, fill="baseline", baseline=base)
        c = sdecor.topk_mask(x, s, ratio=0.5, abs=False, fill="constant", value=0.25)
        return a + b + c

    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = fn(xe, s, base), compiled(xc, s, base)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    sum(o.sum() for o in want[0::2]).backward()
    sum(o.sum() for o in got[0::2]).backward()
    assert torch.equal(xc.grad, xe.grad)


def test_autocast_changes_nothing():
    x = torch.randn(3, 4, 6, 6)
    s = torch.randn_like(x)
    op = torch.ops.sdecor.native_topk_mask.default
    for fill in FILLS:
        base = torch.randn_like(x) if fill == "baseline" else None
        kw = dict(ratio=0.3, fill=fill, baseline=base)
        want = _native(x, s, generator=torch.Generator().manual_seed(3), **kw)
        want_op = op(x, s, 20, False, False, True, fill, 0.5, base, 5, 6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _native(x, s, generator=torch.Generator().manual_seed(3), **kw)
            got_op = op(x, s, 20, False, False, True, fill, 0.5, base, 5, 6)
        for g, w in zip(got + got_op, want + want_op):
            assert g.dtype == w.dtype and torch.equal(g, w)


def test_bad_input_to_the_op_raises():
    op = torch.ops.sdecor.native_topk_mask.default
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="k must be in"):
        op(x, x, 5, False, True, True, "zero", 0.0, None, 0, 0)
    with pytest.raises(RuntimeError, match="fill must be one of"):
        op(x, x, 1, False, True, True, "blur", 0.0, None, 0, 0)
    with pytest.raises(RuntimeError, match="needs a baseline"):
        op(x, x, 1, False, True, True, "baseline", 0.0, None, 0, 0)
    with pytest.raises(RuntimeError, match="shape of x"):
        op(x, x[:, :2], 1, False, True, True, "zero", 0.0, None, 0, 0)
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 or float16"):
        op(x.int(), x, 1, False, True, True, "zero", 0.0, None, 0, 0)


def test_forced_native_rejects_other_float_dtypes():
    x = torch.randn(2, 3, 4)
    s = x.to(torch.float8_e4m3fn)
    with pytest.raises(sdecor.BackendUnavailableError, match="native"):
        _native(x, s, ratio=0.5)
    # automatic selection leaves such tensors to the torch backend
    assert sdecor._backend.select("topk_mask", {"x": x, "saliency": s}, topk._supports(x, s)) == "torch"
