"""The native CPU kernels of group whitening and group_cov (csrc/whiten_cpu.cpp) against the torch
backend and the reference: outputs and every gradient, layouts, dtypes, thread-count independence,
registration (opcheck, torch.compile), double backward and autocast."""

import copy

import pytest
import torch
from torch import nn

import sdecor
from sdecor import _backend, _ext
from sdecor import reference as ref
from sdecor.ops import whiten
from sdecor.testing import assert_close

from conftest import train_path

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"sdecor._C is not built: {_ext.error()}")

OPS = ("native_whiten_stats", "native_whiten_apply", "native_whiten_reduce", "native_whiten_dx")

# (shape, d, layout): odd sizes, 2-D to 5-D, channels_last, a smaller last group, C < d, several
# blocks of columns per group (m = N * L > the block of d = 4: 8192 columns)
CASES = [
    ((7, 12), 4, "contiguous"),
    ((5, 6, 13), 3, "contiguous"),
    ((3, 16, 5, 7), 8, "contiguous"),
    ((3, 16, 5, 7), 8, "channels_last"),
    ((2, 10, 3, 4, 5), 5, "contiguous"),
    ((2, 12, 3, 4, 5), 4, "channels_last_3d"),
    ((4, 20, 3, 3), 8, "contiguous"),                 # groups of 8, 8, 4
    ((4, 20, 3, 3), 8, "channels_last"),
    ((3, 5, 4), 8, "contiguous"),                     # C < d: one group of 5
    ((9, 8, 31, 33), 4, "contiguous"),               # m = 9207: two blocks
    ((9, 8, 31, 33), 4, "channels_last"),
]


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _input(shape, layout, dtype, offset=3.0):
    x = torch.randn(shape, dtype=torch.float64) * 2 + offset
    return _layout(x.to(dtype), layout)


@pytest.mark.parametrize("shape,d,layout", CASES)
@pytest.mark.parametrize("method", ["newton", "zca"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_train_matches_torch_backend(shape, d, layout, method, dtype):
    x = _input(shape, layout, dtype)
    C = shape[1]
    weight = 1 + 0.1 * torch.randn(C, dtype=dtype)
    bias = 0.1 * torch.randn(C, dtype=dtype)
    want = train_path("torch", x, d, method, weight, bias)
    got = train_path("native", x, d, method, weight, bias)
    names = ("y", "mean", "wm", "grad x", "grad weight", "grad bias")
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert_close(g, w, msg=name)
    # y and grad x keep x's memory format
    assert got[0].stride() == x.stride() and got[3].stride() == x.stride()


def test_train_matches_reference_composition():
    x = _input((6, 12, 5, 5), "contiguous", torch.float64).requires_grad_()
    with sdecor.use_backend("native"):
        y = sdecor.group_whiten(x, 4, "newton", 1e-5, 5)
    want = ref.group_whiten(x.detach(), 4, "newton", 1e-5, 5)
    assert_close(y, want)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_train_bfloat16(layout):
    # bf16 x: statistics in fp32 from the same bf16 values on both backends, y rounded to bf16
    x = _input((4, 16, 6, 5), layout, torch.bfloat16)
    weight = torch.ones(16, dtype=torch.bfloat16)
    bias = torch.zeros(16, dtype=torch.bfloat16)
    want = train_path("torch", x, 8, "newton", weight, bias)
    got = train_path("native", x, 8, "newton", weight, bias)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert_close(got[1], want[1])
    assert_close(got[2], want[2])
    # y: the same fp32 values up to summation order, then one bf16 rounding
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(got[3].float(), want[3].float(), rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("shape,d,layout", [CASES[2], CASES[3], CASES[6], CASES[8], CASES[9]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_matches_torch_backend(shape, d, layout, dtype):
    x = _input(shape, layout, dtype)
    C = shape[1]
    G = -(-C // d)
    gen = torch.Generator().manual_seed(3)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    r = C - (G - 1) * d
    mask = torch.ones(G, d, dtype=sd)
    mask[-1, r:] = 0
    mean = torch.randn(G, d, generator=gen, dtype=sd) * mask
    wm = torch.randn(G, d, d, generator=gen, dtype=sd) * (mask[:, :, None] * mask[:, None, :])
    weight = 1 + 0.1 * torch.randn(C, generator=gen, dtype=dtype)
    bias = 0.1 * torch.randn(C, generator=gen, dtype=dtype)
    gy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    res = {}
    for backend in ("torch", "native"):
        leaves = [t.clone().requires_grad_() for t in (x, mean, wm, weight, bias)]
        with sdecor.use_backend(backend):
            y = whiten.group_whiten_eval(*leaves)
        (y * gy).sum().backward()
        res[backend] = (y, *[t.grad for t in leaves])
    for name, g, w in zip(("y", "x", "mean", "wm", "weight", "bias"), res["native"], res["torch"]):
        assert_close(g, w, msg=name)
    assert res["native"][0].stride() == x.stride()


@pytest.mark.parametrize("shape,d,layout", CASES)
def test_group_cov_matches_reference(shape, d, layout):
    x = _input(shape, layout, torch.float64)
    C = shape[1]
    last = "even" if C % d == 0 else "smaller"
    res = {}
    for backend in ("torch", "native"):
        xx = x.clone().requires_grad_()
        with sdecor.use_backend(backend):
            mean, cov = sdecor.group_cov(xx, d, last_group=last)
        (0.3 * mean.sum() + (cov * cov).sum()).backward()
        res[backend] = (mean, cov, xx.grad)
    for name, g, w in zip(("mean", "cov", "grad x"), res["native"], res["torch"]):
        assert_close(g, w, msg=name)


def test_group_cov_float32_offset_and_bfloat16():
    # a large common offset: the one-pass statistics centre each block first (no cancellation)
    x = torch.randn(16, 8, 20, 20) + 1000.0
    with sdecor.use_backend("native"):
        mean, cov = sdecor.group_cov(x, 4)
    want_mean, want_cov = ref.group_cov(x.double(), 4)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(cov.double(), want_cov, rtol=1e-4, atol=1e-5)
    xb = x.to(torch.bfloat16)
    with sdecor.use_backend("native"):
        mb, cb = sdecor.group_cov(xb, 4)
    wm, wc = ref.group_cov(xb.double(), 4)
    assert mb.dtype == torch.float32
    torch.testing.assert_close(mb.double(), wm, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(cb.double(), wc, rtol=1e-3, atol=1e-3)


def test_gradcheck_and_gradgradcheck():
    x = _input((3, 6, 2, 3), "channels_last", torch.float64).requires_grad_()
    w = (1 + 0.1 * torch.randn(6, dtype=torch.float64)).requires_grad_()
    b = (0.1 * torch.randn(6, dtype=torch.float64)).requires_grad_()
    with sdecor.use_backend("native"):
        def train(x, w, b):
            return whiten.group_whiten_train(x, 4, "newton", 1e-3, 3, w, b, last_group="smaller")[0]
        assert torch.autograd.gradcheck(train, (x, w, b))
        assert torch.autograd.gradgradcheck(train, (x, w, b))

        def zca(x):
            return sdecor.group_whiten(x, 3, "zca", 1e-3)
        assert torch.autograd.gradcheck(zca, (x,))

        mean = torch.randn(2, 4, dtype=torch.float64).requires_grad_()
        wm = torch.randn(2, 4, 4, dtype=torch.float64).requires_grad_()
        x8 = _input((3, 8, 2, 2), "contiguous", torch.float64).requires_grad_()
        w8 = torch.randn(8, dtype=torch.float64).requires_grad_()
        b8 = torch.randn(8, dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(whiten.group_whiten_eval, (x8, mean, wm, w8, b8))
        assert torch.autograd.gradgradcheck(whiten.group_whiten_eval, (x8, mean, wm, w8, b8))

        def cov(x):
            return sdecor.group_cov(x, 4, last_group="smaller")
        assert torch.autograd.gradcheck(cov, (x,))
        assert torch.autograd.gradgradcheck(cov, (x,))


def test_results_do_not_depend_on_thread_count():
    # several blocks per group: the partial sums are combined in block order, whatever the threads
    x = _input((9, 8, 31, 33), "contiguous", torch.float32)
    weight = 1 + 0.1 * torch.randn(8)
    bias = 0.1 * torch.randn(8)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, mean, wm, gx, gw, gb = train_path("native", x, 4, "newton", weight, bias)
            with sdecor.use_backend("native"):
                cm, cc = sdecor.group_cov(x, 4)
                ye = whiten.group_whiten_eval(x, mean, wm, weight, bias)
            runs.append((y, mean, wm, gx, gw, gb, cm, cc, ye))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def _op_args(x, d):
    G = x.shape[1] // d
    sd = torch.float64 if x.dtype == torch.float64 else torch.float32
    center, scale, inv, ms, cov = torch.ops.sdecor.native_whiten_stats(x, d)
    a = torch.randn(G, d, d, dtype=sd)
    shift = torch.randn(G, d, dtype=sd)
    gy = torch.randn_like(x)
    return {
        "native_whiten_stats": (x, d),
        "native_whiten_apply": (x, d, a, center, shift),
        "native_whiten_reduce": (gy, x, d, center, inv),
        "native_whiten_dx": (gy, x, d, center, inv, a, a.transpose(-1, -2).contiguous(), shift),
    }


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(op, layout):
    x = _input((3, 8, 4, 5), layout, torch.float32)
    args = _op_args(x, 4)[op]
    torch.library.opcheck(getattr(torch.ops.sdecor, op).default, args)


def test_dx_without_gy_and_without_x_term():
    x = _input((3, 8, 4, 5), "contiguous", torch.float64)
    args = _op_args(x, 4)["native_whiten_dx"]
    gy, x, d, center, inv, b, s2, shift = args
    full = torch.ops.sdecor.native_whiten_dx(gy, x, d, center, inv, b, s2, shift)
    no_x = torch.ops.sdecor.native_whiten_dx(gy, x, d, center, inv, b, None, shift)
    no_gy = torch.ops.sdecor.native_whiten_dx(None, x, d, center, inv, None, s2, shift)
    zero = torch.zeros_like(shift)
    only_shift = torch.ops.sdecor.native_whiten_dx(None, x, d, center, inv, None, None, shift)
    assert_close(no_x + no_gy, full + torch.ops.sdecor.native_whiten_dx(None, x, d, center, inv, None, None, zero)
                 + shift.reshape(1, 8, 1, 1))
    assert_close(only_shift, shift.reshape(1, 8, 1, 1).expand_as(x))


def test_ops_reject_bad_arguments():
    x = torch.randn(3, 8, 4)
    with pytest.raises(RuntimeError, match="d must divide the channels"):
        torch.ops.sdecor.native_whiten_stats(x, 3)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16"):
        torch.ops.sdecor.native_whiten_stats(x.to(torch.int32), 4)
    with pytest.raises(RuntimeError, match="x must have shape"):
        torch.ops.sdecor.native_whiten_stats(torch.randn(8), 4)
    with pytest.raises(RuntimeError, match="at least one sample"):
        torch.ops.sdecor.native_whiten_stats(torch.randn(0, 8, 4), 4)
    center = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="a must have shape"):
        torch.ops.sdecor.native_whiten_apply(x, 4, torch.zeros(2, 4), center, center)
    with pytest.raises(RuntimeError, match="center must be Float"):
        torch.ops.sdecor.native_whiten_apply(x, 4, torch.zeros(2, 4, 4), center.double(), center)
    with pytest.raises(RuntimeError, match="gy must have x's shape"):
        torch.ops.sdecor.native_whiten_reduce(torch.randn(3, 8, 5), x, 4, center, torch.ones(2))
    with pytest.raises(RuntimeError, match="gy and b must be given together"):
        torch.ops.sdecor.native_whiten_dx(torch.randn_like(x), x, 4, center, torch.ones(2), None, None, center)
    with pytest.raises(RuntimeError, match="derivative|not implemented|autograd"):
        torch.ops.sdecor.native_whiten_stats(x.requires_grad_(), 4)[1].sum().backward()


def test_native_is_picked_for_cpu_tensors():
    x = torch.randn(4, 8, 3)
    for op in ("group_whiten", "group_whiten_train", "group_whiten_eval"):
        assert _backend.select(op, {"x": x}, whiten.SUPPORTS[op]) == "native"
    from sdecor.ops import cov
    assert _backend.select("group_cov", {"x": x}, cov.SUPPORTS) == "native"


def test_autocast_keeps_dtypes_and_values():
    x = _input((4, 16, 5, 5), "contiguous", torch.float32)
    layer = sdecor.GroupWhitening(16, 8)
    plain = copy.deepcopy(layer)
    with sdecor.use_backend("native"):
        want = plain(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x)
            mean, cov = sdecor.group_cov(x, 8)
            got_ops = torch.ops.sdecor.native_whiten_stats(x, 8)
    assert got.dtype == torch.float32 and mean.dtype == torch.float32 and cov.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in got_ops)
    assert torch.equal(got, want)
    assert_close(layer.running_wm, plain.running_wm)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="needs torch.compile")
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    eager = sdecor.GroupWhitening(16, 6, momentum=0.2, last_group="smaller")   # groups of 6, 6, 4
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    x = torch.randn(4, 16, 5, 5)
    with sdecor.use_backend("native"):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        assert_close(yc, ye)
        ye.square().sum().backward()
        yc.square().sum().backward()
        assert_close(xc.grad, xe.grad)
        for (name, pe), pc in zip(eager.named_parameters(), layer.parameters()):
            assert_close(pc.grad, pe.grad, msg=name)
        assert_close(layer.running_wm, eager.running_wm)
        eager.eval()
        layer.eval()
        assert_close(compiled(x), eager(x))

        def cov(x):
            return sdecor.group_cov(x, 8)
        got, want = torch.compile(cov, fullgraph=True, dynamic=False)(x), cov(x)
        assert_close(got[0], want[0])
        assert_close(got[1], want[1])


@pytest.mark.parametrize("scale", [1e-30, 1e18, 1e30])
def test_extreme_magnitudes_stay_finite(scale):
    # the statistics in units of a power-of-two scale per group, as on the torch backend
    x = _input((4, 8, 5, 5), "contiguous", torch.float32, offset=0.5) * scale
    want = train_path("torch", x, 4, "newton", torch.ones(8), torch.zeros(8))
    got = train_path("native", x, 4, "newton", torch.ones(8), torch.zeros(8))
    for name, g, w in zip(("y", "mean", "wm", "grad x"), got, want):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item(), msg=name)
