"""The CPU microkernels of the native whitening ops (csrc/cpu/) on each instruction-set path this CPU
runs (avx512, avx2, portable, forced through torch.ops.sdecor.set_cpu_isa): the four ops against a
float64 torch evaluation of their definition, GroupWhitening's training forward + backward and eval
against the torch backend, odd group sizes and sample counts, layouts, dtypes, extreme magnitudes,
thread-count independence; the run-time dispatch itself; the portable kernels' loop fallback."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import sdecor
from sdecor import _ext
from sdecor.ops import whiten
from sdecor.testing import assert_close, tol

from conftest import ISAS, runnable_isas, train_path

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"sdecor._C is not built: {_ext.error()}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _input(shape, layout, dtype, offset=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset
    return _layout(x.to(dtype), layout)


def _nan_heap(like):
    """Leave NaN in the heap block an output shaped like `like` is likely to get next: the C++ ops
    allocate their outputs themselves (at::empty), so an element they leave unwritten shows as NaN
    (or as garbage) instead of as a value some earlier tensor left there."""
    t = torch.full(like.shape, float("nan"), dtype=like.dtype)
    del t


# ---------------------------------------------------------------------------------------------------
# the four ops against their definition, evaluated in float64

# (shape, d, layout, dtype): every d of 1..128 asked for, odd sample counts (tails shorter than a vector,
# runs shorter than the in-place threshold, one sample), 2-D to 5-D, channels_last(_3d), each dtype
OP_CASES = [
    ((5, 2, 3, 5), 1, "contiguous", torch.float32),
    ((7, 4), 2, "contiguous", torch.float32),
    ((4, 6, 7), 3, "contiguous", torch.float64),
    ((3, 10, 1, 1), 5, "contiguous", torch.float32),
    ((2, 14, 3, 5), 7, "channels_last", torch.float32),
    ((3, 16, 33), 8, "contiguous", torch.bfloat16),
    ((2, 30, 2, 3, 5), 15, "channels_last_3d", torch.float32),
    ((3, 32, 17, 19), 16, "contiguous", torch.float32),
    ((2, 32, 17, 19), 16, "contiguous", torch.float16),
    ((2, 34, 23), 17, "contiguous", torch.float64),
    ((2, 62, 9, 31), 31, "contiguous", torch.float32),
    ((3, 64, 5, 7), 32, "channels_last", torch.float32),
    ((2, 66, 300), 33, "contiguous", torch.float32),
    ((2, 128, 19, 17), 64, "contiguous", torch.float32),
    ((2, 128, 19, 17), 64, "contiguous", torch.float64),
    ((3, 200, 1, 1, 33), 100, "contiguous", torch.float32),
    ((2, 256, 15, 13), 128, "contiguous", torch.float32),
    ((2, 256, 260), 128, "contiguous", torch.bfloat16),
    # above 128: reduce and dx through BLAS on the packed rows
    ((2, 258, 11, 13), 129, "contiguous", torch.float32),
    ((3, 320, 7, 9), 160, "channels_last", torch.float32),
    ((2, 384, 33), 192, "contiguous", torch.float64),
    ((2, 272, 5, 41), 136, "contiguous", torch.float16),
]


def _case_id(case):
    shape, d, layout, dtype = case
    return f"{'x'.join(map(str, shape))}-d{d}-{layout}-{str(dtype).split('.')[-1]}"


def _grouped64(t, d):
    """(G, d, m) float64 view of (N, C, *S) in (n, s) column order."""
    N, C = t.shape[:2]
    return t.double().reshape(N, C // d, d, -1).permute(1, 2, 0, 3).reshape(C // d, d, -1)


def _ungroup(g, like):
    N, C = like.shape[:2]
    G, d = g.shape[:2]
    return g.reshape(G, d, N, -1).permute(2, 0, 1, 3).reshape(like.shape)


def _out_tol(dtype):
    # outputs: the float32 values up to summation order, then one rounding to bfloat16 (as in
    # test_whiten_native.test_train_bfloat16) or float16 (its entry of sdecor.testing)
    if dtype == torch.bfloat16:
        return dict(rtol=2 ** -7, atol=2 ** -7)
    return tol(dtype)


@pytest.mark.parametrize("case", OP_CASES, ids=_case_id)
def test_ops_match_their_definition(isa, case):
    shape, d, layout, dtype = case
    x = _input(shape, layout, dtype)
    G = shape[1] // d
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(1)
    X = _grouped64(x, d)                                          # (G, d, m)
    m = X.shape[-1]

    # statistics: mean = center + c ms, covariance = c^2 cov, c a power of two bounding |x - center|
    _nan_heap(torch.empty(G, d, d, dtype=sd))
    center, c, inv_c, ms, cov = torch.ops.sdecor.native_whiten_stats(x, d)
    for t in (center, c, inv_c, ms, cov):
        assert t.dtype == sd and not t.isnan().any()
    mean64 = X.mean(-1)
    cov64 = (X - mean64[..., None]) @ (X - mean64[..., None]).transpose(1, 2) / m
    assert_close((center.double() + c.double()[:, None] * ms.double()).to(sd), mean64, dtype=sd, msg="mean")
    assert_close((cov.double() * c.double()[:, None, None] ** 2).to(sd), cov64, dtype=sd, msg="cov")
    assert torch.equal(c * inv_c, torch.ones_like(c))
    assert (torch.log2(c) == torch.log2(c).round()).all()
    assert ((X - center.double()[..., None]).abs().amax(-1).amax(-1) <= c.double() * (1 + 2 ** -20)).all()

    a = torch.randn(G, d, d, generator=gen, dtype=sd) / d ** 0.5
    b = torch.randn(G, d, d, generator=gen, dtype=sd) / d ** 0.5
    s2 = torch.randn(G, d, d, generator=gen, dtype=sd) / d ** 0.5
    shift = torch.randn(G, d, generator=gen, dtype=sd)
    gy = _layout(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype), layout)
    GY = _grouped64(gy, d)
    XS = (X - center.double()[..., None]) * inv_c.double()[:, None, None]

    # apply: y = a (x - center) + shift, in x's dtype and layout
    _nan_heap(x)
    y = torch.ops.sdecor.native_whiten_apply(x, d, a, center, shift)
    want = _ungroup(a.double() @ (X - center.double()[..., None]) + shift.double()[..., None], x)
    assert y.dtype == dtype and y.stride() == x.stride() and not y.isnan().any()
    torch.testing.assert_close(y.double(), want, **_out_tol(dtype))

    # reduce: sum gy, sum gy xs^T
    gsum, gx = torch.ops.sdecor.native_whiten_reduce(gy, x, d, center, inv_c)
    assert_close(gsum, GY.sum(-1), dtype=sd, msg="sum gy")
    assert_close(gx, GY @ XS.transpose(1, 2), dtype=sd, msg="sum gy xs^T")

    # dx = b gy + s2 xs + shift, each of the four combinations of the optional terms
    for with_gy, with_x in ((True, True), (True, False), (False, True), (False, False)):
        _nan_heap(x)
        out = torch.ops.sdecor.native_whiten_dx(gy if with_gy else None, x, d, center, inv_c,
                                                b if with_gy else None, s2 if with_x else None, shift)
        w = shift.double()[..., None].expand(G, d, m)
        if with_gy:
            w = w + b.double() @ GY
        if with_x:
            w = w + s2.double() @ XS
        assert out.dtype == dtype and out.stride() == x.stride() and not out.isnan().any()
        torch.testing.assert_close(out.double(), _ungroup(w, x), **_out_tol(dtype),
                                   msg=f"dx with gy={with_gy}, x={with_x}")


# ---------------------------------------------------------------------------------------------------
# GroupWhitening: training forward + backward and eval, native against the torch backend

# (shape, d, layout, method): every d asked for, a smaller last group where d does not divide C,
# odd sample counts, 2-D to 5-D, channels_last(_3d); m >= 2 d so that each W is well conditioned
MODULE_CASES = [
    ((9, 3, 1, 1), 1, "contiguous", "newton"),
    ((11, 5), 2, "contiguous", "zca"),
    ((4, 7, 3, 5), 3, "contiguous", "newton"),
    ((5, 12, 7), 5, "contiguous", "newton"),
    ((4, 14, 3, 5), 7, "channels_last", "zca"),
    ((6, 20, 2, 3), 8, "contiguous", "newton"),
    ((3, 30, 2, 3, 5), 15, "channels_last_3d", "newton"),
    ((4, 40, 5, 7), 16, "contiguous", "newton"),
    ((4, 36, 3, 5), 17, "channels_last", "newton"),
    ((3, 62, 31), 31, "contiguous", "zca"),
    ((4, 72, 5, 7), 32, "contiguous", "newton"),
    ((3, 66, 1, 1, 37), 33, "contiguous", "newton"),
    ((4, 128, 7, 9), 64, "contiguous", "newton"),
    ((3, 130, 9, 13), 100, "contiguous", "newton"),
    ((4, 160, 8, 9), 128, "contiguous", "newton"),
    ((5, 300, 9, 11), 144, "contiguous", "newton"),         # groups of 144, 144, 12; BLAS above 128
    ((6, 160, 7, 9), 160, "channels_last", "newton"),
]


def _module_id(case):
    shape, d, layout, method = case
    return f"{'x'.join(map(str, shape))}-d{d}-{layout}-{method}"


def _eval(backend, x, mean, wm, weight, bias):
    """(y, grad x, grad mean, grad wm, grad weight, grad bias) of the eval path on `backend`."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, mean, wm, weight, bias)]
    with sdecor.use_backend(backend):
        y = whiten.group_whiten_eval(*leaves)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(y.dtype)
    (y * gy).sum().backward()
    return (y, *[t.grad for t in leaves])


@pytest.mark.parametrize("case", MODULE_CASES, ids=_module_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_whitening_matches_torch_backend(isa, case, dtype, poison):
    shape, d, layout, method = case
    x = _input(shape, layout, dtype)
    C = shape[1]
    gen = torch.Generator().manual_seed(3)
    weight = (1 + 0.1 * torch.randn(C, generator=gen, dtype=torch.float64)).to(dtype)
    bias = (0.1 * torch.randn(C, generator=gen, dtype=torch.float64)).to(dtype)
    want = train_path("torch", x, d, method, weight, bias)
    got = train_path("native", x, d, method, weight, bias)
    for name, g, w in zip(("y", "mean", "wm", "grad x", "grad weight", "grad bias"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert_close(g, w, msg=name)
    assert got[0].stride() == x.stride() and got[3].stride() == x.stride()
    # eval with the batch's statistics
    mean, wm = want[1].detach(), want[2].detach()
    want = _eval("torch", x, mean, wm, weight, bias)
    got = _eval("native", x, mean, wm, weight, bias)
    for name, g, w in zip(("eval y", "eval grad x", "grad mean", "grad wm", "eval grad weight", "eval grad bias"),
                          got, want):
        assert_close(g, w, msg=name)
    assert got[0].stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_whitening_half_storage(isa, dtype, layout, poison):
    # 16-bit x: statistics in float32 from the same 16-bit values on both backends, y and dx rounded to
    # x's dtype once (tolerances as test_whiten_native.test_train_bfloat16; float16's from sdecor.testing)
    x = _input((4, 40, 6, 5), layout, dtype)
    weight = torch.ones(40, dtype=dtype)
    bias = torch.zeros(40, dtype=dtype)
    want = train_path("torch", x, 16, "newton", weight, bias)
    got = train_path("native", x, 16, "newton", weight, bias)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_close(got[1], want[1])
    assert_close(got[2], want[2])
    torch.testing.assert_close(got[0].float(), want[0].float(), **_out_tol(dtype))
    torch.testing.assert_close(got[3].float(), want[3].float(), **_out_tol(dtype))


@pytest.mark.parametrize("scale", [1e-30, 1e18, 1e30])
def test_extreme_magnitudes_stay_finite(isa, scale):
    # as test_whiten_native.test_extreme_magnitudes_stay_finite, on each path and d = 16, 17
    for shape, d in (((4, 32, 5, 5), 16), ((3, 34, 7), 17)):
        x = _input(shape, "contiguous", torch.float32, offset=0.5) * scale
        C = shape[1]
        want = train_path("torch", x, d, "newton", torch.ones(C), torch.zeros(C))
        got = train_path("native", x, d, "newton", torch.ones(C), torch.zeros(C))
        for name, g, w in zip(("y", "mean", "wm", "grad x"), got, want):
            assert torch.isfinite(g).all(), name
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item(), msg=name)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_results_do_not_depend_on_thread_count(isa, layout):
    # several blocks per group and tasks spread over the threads: bitwise the same results
    x = _input((9, 40, 31, 33), layout, torch.float32)
    weight = 1 + 0.1 * torch.randn(40)
    bias = 0.1 * torch.randn(40)
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, mean, wm, gx, gw, gb = train_path("native", x, 16, "newton", weight, bias)   # groups 16, 16, 8
            with sdecor.use_backend("native"):
                cm, cc = sdecor.group_cov(x, 16, last_group="smaller")
                ye = whiten.group_whiten_eval(x, mean, wm, weight, bias)
            ops = torch.ops.sdecor.native_whiten_stats(x[:, :32], 16)
            center, inv = ops[0], ops[2]
            red = torch.ops.sdecor.native_whiten_reduce(gy[:, :32], x[:, :32], 16, center, inv)
            runs.append((y, mean, wm, gx, gw, gb, cm, cc, ye, *ops, *red))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_paths_agree_with_each_other():
    # the paths differ in rounding only: float64 results agree to float64's tolerance
    paths = [p for p in ISAS if p in runnable_isas()]
    x = _input((5, 48, 9, 11), "contiguous", torch.float64)
    res = {}
    try:
        for p in paths:
            torch.ops.sdecor.set_cpu_isa(p)
            res[p] = train_path("native", x, 16, "newton", torch.ones(48, dtype=torch.float64),
                            torch.zeros(48, dtype=torch.float64))
    finally:
        torch.ops.sdecor.set_cpu_isa("auto")
    for p in paths[1:]:
        for g, w in zip(res[p], res[paths[0]]):
            assert_close(g, w)


# ---------------------------------------------------------------------------------------------------
# dispatch


def test_cpu_isa_reports_and_forces_a_path():
    runnable = runnable_isas()
    assert runnable and "portable" in runnable and set(runnable) <= set(ISAS)
    info = _ext.build_info()
    assert info["cpu_isa"] in runnable
    assert "cpu_isa" in info["ops"].split(",") and "set_cpu_isa" in info["ops"].split(",")
    try:
        for p in runnable:
            torch.ops.sdecor.set_cpu_isa(p)
            assert torch.ops.sdecor.cpu_isa() == p
            assert _ext.build_info()["cpu_isa"] == p
        torch.ops.sdecor.set_cpu_isa("auto")
        env = os.environ.get("SDECOR_CPU_ISA", "")
        assert torch.ops.sdecor.cpu_isa() == (env if env not in ("", "auto") else runnable[0])
        with pytest.raises(RuntimeError, match="set_cpu_isa: name must be one of avx512, avx2, portable or auto; got 'sse9'"):
            torch.ops.sdecor.set_cpu_isa("sse9")
    finally:
        torch.ops.sdecor.set_cpu_isa("auto")


def test_forcing_a_path_this_cpu_lacks_raises():
    lacking = [p for p in ISAS if p not in runnable_isas()]
    if not lacking:
        pytest.skip(f"this CPU runs every path ({runnable_isas()})")
    with pytest.raises(RuntimeError, match=f"set_cpu_isa: name={lacking[0]} cannot run here"):
        torch.ops.sdecor.set_cpu_isa(lacking[0])


def _run_with_env(value, code):
    env = dict(os.environ, SDECOR_CPU_ISA=value, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_environment_variable_forces_a_path_or_names_the_valid_values():
    code = ("import torch; from sdecor import _ext; _ext.require(); "
            "print(torch.ops.sdecor.cpu_isa()); "
            "x = torch.randn(4, 8, 5); print(torch.ops.sdecor.native_whiten_stats(x, 4)[0].shape)")
    out = _run_with_env("portable", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["portable", "torch.Size([2,", "4])"]
    out = _run_with_env("avx9000", code)
    assert out.returncode != 0
    assert "SDECOR_CPU_ISA must be one of avx512, avx2, portable or auto; got 'avx9000'" in out.stderr
    # build_info (sdecor info) still works and says why no path is in use
    out = _run_with_env("avx9000", "from sdecor import _ext; print(_ext.build_info()['cpu_isa'])")
    assert out.returncode == 0 and "invalid SDECOR_CPU_ISA" in out.stdout, out.stderr


# ---------------------------------------------------------------------------------------------------
# the portable kernels' loops (compilers without vector types), against a scalar evaluation


@pytest.mark.parametrize("variant", ["portable", "portable loops", "x86"])
def test_kernels_standalone(tmp_path, variant):
    # the kernel table of each path directly, torch-free, against a scalar evaluation (odd d and n)
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    cpu = os.path.join(ROOT, "csrc", "cpu")
    sources = [os.path.join(cpu, "whiten_portable.cpp")]
    flags = []
    if variant == "portable loops":
        flags.append("-DSDECOR_PORTABLE_LOOPS")
    if variant == "x86":
        if not any(p in runnable_isas() for p in ("avx2", "avx512")):
            pytest.skip(f"this CPU runs no x86 vector path ({runnable_isas()})")
        flags.append("-DSDECOR_CHECK_X86")
        sources += [os.path.join(cpu, "whiten_avx2.cpp"), os.path.join(cpu, "whiten_avx512.cpp")]
    exe = str(tmp_path / "whiten_kernels_check")
    build = subprocess.run([cxx, "-std=c++20", "-O1", *flags, "-I", os.path.join(ROOT, "csrc"),
                            os.path.join(ROOT, "csrc", "check", "whiten_kernels_check.cc"), *sources, "-o", exe],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.splitlines()[-1] == "0 mismatch(es)", run.stdout + run.stderr
    if variant == "x86":
        for p in ("avx2", "avx512"):
            if p in runnable_isas():
                assert f"{p}: 0 mismatch(es)" in run.stdout, run.stdout
