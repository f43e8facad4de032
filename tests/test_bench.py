"""The benchmark harness: correctness gate, result files, command line and static report.

Runs on tiny shapes through the harness API (the real shapes are for `sdecor bench`).
"""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdecor

import sdecor.cli.bench as bench
from sdecor import reference as ref
from sdecor.cli.bench import harness, report, steps, timing
from sdecor.cli.bench.ops import OP_SPECS, Impl, Prepared
from sdecor.cli.bench.plot import plot_op

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# a real shape that runs in milliseconds on a CPU: 4 covariances of 16 x 16, the torch backend only
CHEAP = ["--ops", "eigh_small", "--shapes", "resnet18-cifar-stage1-d16", "--backends", "torch",
         "--min-time", "0.001", "--reps", "1"]


def _snapshot(folder: Path) -> dict:
    """name -> (size, mtime) of every file under folder: any write shows."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}

TINY = [
    dict(op="group_cov", name="tiny-d4", N=4, C=8, S=(3, 3), d=4, tags=()),
    dict(op="group_whiten", name="tiny-d4", N=4, C=8, S=(3, 3), d=4, method="newton", T=5, tags=()),
    dict(op="group_whiten", name="tiny-d4-zca", N=4, C=8, S=(3, 3), d=4, method="zca", T=5, tags=()),
    dict(op="GroupWhitening", name="tiny-d4", N=4, C=8, S=(3, 3), d=4, method="newton", T=5, tags=()),
    dict(op="whitening_matrix", name="tiny-d4", G=2, d=4, method="newton", T=5, tags=()),
    dict(op="topk_mask", name="tiny-shared", N=3, C=3, S=(4, 4), ratio=0.5, reduce="mean", fill="zero", tags=()),
    dict(op="topk_mask", name="tiny-elem", N=3, C=3, S=(4, 4), ratio=0.25, reduce=None, fill="uniform", tags=()),
    dict(op="decorrelation_loss", name="tiny-d4", N=6, C=8, S=(), d=4, kind="decov", tags=()),
    dict(op="eigh_small", name="tiny-d4", G=3, d=4, tags=()),
]


def _settings(**kw):
    base = dict(device="cpu", dtypes=("float32",), compile="off", min_time=0.002, min_reps=2)
    base.update(kw)
    return harness.Settings(**base)


def _by(records, **kw):
    return [r for r in records if all(r[k] == v for k, v in kw.items())]


@pytest.fixture(scope="module")
def tiny_run():
    torch.manual_seed(0)
    records = harness.run(_settings(dtypes=("float32", "bfloat16")), shapes=TINY, log=lambda msg: None)
    return records


def test_every_op_is_measured_against_its_baselines(tiny_run):
    for op in ("group_cov", "group_whiten", "whitening_matrix", "topk_mask", "decorrelation_loss"):
        rs = _by(tiny_run, op=op, impl="reference", status="ok", dtype="float32")
        assert rs, op
        assert all(r["time_ms"] > 0 and r["gbps"] > 0 for r in rs)
    modes = {r["mode"] for r in _by(tiny_run, op="group_whiten", impl="reference")}
    assert modes == {"fwd", "bwd", "fwdbwd"}
    assert {r["mode"] for r in _by(tiny_run, op="topk_mask")} == {"fwd"}
    # baselines where they apply, and they agree with the reference where they compute the same thing
    assert _by(tiny_run, op="group_whiten", shape="tiny-d4", impl="batchnorm", status="ok")
    assert _by(tiny_run, op="GroupWhitening", impl="batchnorm", status="ok")
    assert not _by(tiny_run, op="group_whiten", shape="tiny-d4-zca", impl="iternorm")
    assert _by(tiny_run, op="eigh_small", impl="eigh", status="ok")
    for impl in ("iternorm", "sgt"):
        rs = _by(tiny_run, impl=impl)
        assert rs and all(r["status"] == "ok" and r["err_ratio"] <= 1.0 for r in rs), impl
    # the public API on the torch backend is checked and timed
    rs = _by(tiny_run, op="group_whiten", impl="sdecor[torch]")
    assert rs and all(r["status"] == "ok" and r["err_ratio"] is not None for r in rs)


def test_interpreter_is_never_benchmarked(tiny_run):
    rs = _by(tiny_run, impl="sdecor[triton]")
    assert rs and all(r["status"] == "skipped" and r["time_ms"] is None for r in rs)
    assert all("interpreter" in r["reason"] for r in rs)


def test_speedups_are_baseline_time_over_path_time(tiny_run):
    rs = _by(tiny_run, op="group_whiten", shape="tiny-d4", dtype="float32", mode="fwd")
    times = {r["impl"]: r["time_ms"] for r in rs if r["status"] == "ok"}
    fast = _by(rs, impl="sdecor[torch]")[0]
    assert fast["speedup"]["reference"] == pytest.approx(times["reference"] / times["sdecor[torch]"])
    assert fast["speedup"]["batchnorm"] == pytest.approx(times["batchnorm"] / times["sdecor[torch]"])
    assert "reference" not in _by(rs, impl="reference")[0]["speedup"]


class _Scaled(torch.autograd.Function):
    """Identity forward, gradient scaled: a path whose backward alone is wrong."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return 1.5 * g


def _wrong_forward(inp):
    return Prepared(lambda: (1.01 * ref.group_whiten(inp["x"], 4),), [inp["x"]])


def _wrong_backward(inp):
    return Prepared(lambda: (_Scaled.apply(ref.group_whiten(inp["x"], 4)),), [inp["x"]])


def _right(inp):
    return Prepared(lambda: (ref.group_whiten(inp["x"], 4),), [inp["x"]])


def test_a_path_that_disagrees_is_refused_not_timed():
    inject = {"group_whiten": [Impl("wrong-fwd", "fast", _wrong_forward),
                               Impl("wrong-bwd", "fast", _wrong_backward),
                               Impl("right", "fast", _right)]}
    shapes = [TINY[1]]
    records = harness.run(_settings(inject=inject, backends=()), shapes=shapes, log=lambda msg: None)
    for name, where in (("wrong-fwd", "output 0"), ("wrong-bwd", "grad x")):
        rs = _by(records, impl=name)
        assert len(rs) == 3
        for r in rs:
            assert r["status"] == "MISMATCH"
            assert r["time_ms"] is None and r["gbps"] is None and r["speedup"] == {}
            assert r["err_ratio"] > 1.0 and where in r["reason"]
    right = _by(records, impl="right")
    assert len(right) == 3 and all(r["status"] == "ok" and r["time_ms"] > 0 for r in right)
    # forward only: a wrong backward cannot be seen, and the path is timed
    records = harness.run(_settings(inject=inject, backends=(), modes=("fwd",)), shapes=shapes, log=lambda m: None)
    assert _by(records, impl="wrong-bwd")[0]["status"] == "ok"
    assert _by(records, impl="wrong-fwd")[0]["status"] == "MISMATCH"
    # and the table says so
    text = report.format_table(records, report.environment(torch.device("cpu"), "test timer"))
    assert "MISMATCH" in text and "disagrees with the reference" in text


def test_a_failing_path_is_reported_and_the_others_still_run():
    def broken(inp):
        def fwd():
            raise RuntimeError("kernel launch failed")
        return Prepared(fwd, [inp["x"]])

    records = harness.run(_settings(inject={"group_cov": [Impl("broken", "fast", broken)]}, backends=()),
                          shapes=[TINY[0]], log=lambda msg: None)
    assert all(r["status"] == "error" and "kernel launch failed" in r["reason"] for r in _by(records, impl="broken"))
    assert all(r["status"] == "ok" for r in _by(records, impl="reference"))


def test_results_files_have_the_fields(tiny_run, tmp_path):
    env = report.environment(torch.device("cpu"), "test timer")
    paths = report.write_results(tiny_run, env, {"quick": False}, tmp_path)
    name = env["device_slug"]
    # one name per device, no timestamped copies
    assert paths["json"] == tmp_path / f"{name}.json" and paths["json"].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.csv", f"{name}.json"]
    doc = json.loads(paths["json"].read_text())
    for key in ("device", "device_name", "torch", "triton", "sdecor", "revision", "timestamp", "timer", "cpu_count"):
        assert key in doc["environment"], key
    assert doc["environment"]["device"] == "cpu"
    assert len(doc["results"]) == len(tiny_run)
    for key in ("op", "shape", "dtype", "mode", "impl", "kind", "status", "time_ms", "gbps", "bytes",
                "speedup", "max_abs_err", "err_ratio", "reason", "peak_mem_bytes"):
        assert key in doc["results"][0], key
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(tiny_run)
    assert set(report.CSV_FIELDS) <= set(rows[0])
    ok = [r for r in rows if r["status"] == "ok" and r["impl"] == "sdecor[torch]" and r["op"] == "group_whiten"]
    assert ok and float(ok[0]["speedup_vs_reference"]) > 0 and ok[0]["device_name"] == env["device_name"]
    png = plot_op(tiny_run, "group_whiten", env, tmp_path / "gw.png")
    assert png.exists() and png.stat().st_size < 150_000
    # a later run replaces the files; curated sets have no CSV
    again = report.write_results(tiny_run[:3], env, {}, tmp_path, with_csv=False)
    assert set(again) == {"json"} and len(json.loads(again["json"].read_text())["results"]) == 3


def test_baselines_live_in_the_package(tiny_run):
    # the naive IterNorm ran (tiny_run checks it against the reference) without the source tree
    assert _by(tiny_run, impl="iternorm", status="ok")
    assert not [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]
    from sdecor.cli.bench.baselines import iternorm_train

    x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(iternorm_train(x, 4, 5, 1e-5), ref.group_whiten(x, 4, "newton", 1e-5, 5))

# ---------------------------------------------------------------------------------------------------
# the suites' pieces: eval mode, flop floor, x.clone(), SGT's fill, targets, allocations kept


def _target(baseline, ratio, bound, mode="fwdbwd"):
    return dict(mode=mode, baseline=baseline, ratio=ratio, bound=bound)


SUITE_TINY = [
    dict(op="GroupWhitening", name="tiny-d4", N=4, C=8, S=(3, 3), d=4, method="newton", T=5, flop_floor=True,
         targets=(_target("batchnorm", "time", 1.1), _target("floor", "time", None),
                  _target("iternorm", "speedup", 2.0)), tags=()),
    dict(op="GroupWhitening", name="tiny-d4-eval", N=4, C=8, S=(3, 3), d=4, method="newton", T=5, eval=True,
         modes=("fwd",), targets=(_target("batchnorm", "time", 1.3, "fwd"),), tags=()),
    dict(op="group_cov", name="tiny-d4-fwd", N=4, C=8, S=(3, 3), d=4, modes=("fwd",),
         targets=(_target("clone", "time", 1.0, "fwd"),), tags=()),
]


@pytest.fixture(scope="module")
def suite_run():
    torch.manual_seed(0)
    return harness.run(_settings(matmul_n=32), shapes=SUITE_TINY, log=lambda msg: None)


def test_flop_floor_is_the_products_at_the_matmul_rate(suite_run):
    from sdecor.cli.bench.ops import floor_flops

    # the d = 64 case: five products of 2 d^2 m flops per group, m = 32*28*28, G = 256/64
    big = dict(N=32, C=256, S=(28, 28), d=64)
    assert floor_flops(big, "fwdbwd") == 4_110_417_920
    assert floor_flops(big, "fwd") + floor_flops(big, "bwd") == floor_flops(big, "fwdbwd")
    assert floor_flops(dict(big, d=16), "fwdbwd") == 4_110_417_920 // 4
    floors = _by(suite_run, impl="floor")
    assert sorted(r["mode"] for r in floors) == ["bwd", "fwd", "fwdbwd"]
    assert all(r["shape"] == "tiny-d4" for r in floors)          # not for eval, not for group_cov
    for r in floors:
        assert r["status"] == "ok" and r["kind"] == "baseline" and r["matmul_n"] == 32
        assert r["flops"] == {"fwd": 2, "bwd": 3, "fwdbwd": 5}[r["mode"]] * 2 * 4 * 4 * (4 * 9) * 2
        assert r["time_ms"] == pytest.approx(r["flops"] / r["matmul_flops_per_s"] * 1e3)
        fast = _by(suite_run, shape="tiny-d4", mode=r["mode"], impl="sdecor[torch]")[0]
        assert fast["speedup"]["floor"] == pytest.approx(r["time_ms"] / fast["time_ms"])
    # no floor when it is not asked for
    rs = harness.run(_settings(matmul_n=32, baselines=("reference", "batchnorm"), modes=("fwd",)),
                     shapes=SUITE_TINY[:1], log=lambda msg: None)
    assert not _by(rs, impl="floor")


def test_eval_mode_uses_the_running_statistics_of_one_training_step(suite_run):
    rs = _by(suite_run, shape="tiny-d4-eval")
    assert {r["mode"] for r in rs} == {"fwd"}
    native = {"sdecor[native]"} if sdecor._ext.available() else set()
    assert {r["impl"] for r in rs if r["status"] == "ok"} == {"reference", "batchnorm", "sdecor[torch]"} | native
    for impl in ("sdecor[torch]", *native):
        fast = _by(rs, impl=impl)[0]
        assert fast["checked"] and fast["err_ratio"] <= 1.0 and "eval" in fast["note"], impl
    assert "eval" in _by(rs, impl="batchnorm")[0]["note"]
    # the statistics every GroupWhitening is given are those a training step leaves in the module
    from sdecor.nn import GroupWhitening

    e = SUITE_TINY[1]
    spec = OP_SPECS["GroupWhitening"]
    inp = spec.inputs(e, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(1))
    mod = GroupWhitening(8, num_channels=4, T=5)
    with torch.no_grad():
        mod(inp["x"])
    torch.testing.assert_close(inp["running_mean"], mod.running_mean)
    torch.testing.assert_close(inp["running_wm"], mod.running_wm)
    # and the eval forward uses them, not the batch: it differs from the training output
    y_eval = spec.reference(e)(**inp)
    y_train = OP_SPECS["GroupWhitening"].reference(SUITE_TINY[0])(inp["x"], inp["weight"], inp["bias"])
    assert (y_eval - y_train).abs().max() > 0.1


def test_group_cov_is_measured_against_a_clone(suite_run, tiny_run):
    for records in (suite_run, tiny_run):
        rs = _by(records, op="group_cov", impl="clone", dtype="float32")
        assert rs and all(r["status"] == "ok" and not r["checked"] for r in rs)
    assert {r["mode"] for r in _by(suite_run, op="group_cov")} == {"fwd"}


def test_sgt_fills_with_each_channels_range():
    from sdecor.cli.bench.baselines import sgt_mask

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=gen)
    x[:, 1] += 10.0                          # channel 1 in [10, 11]; channels 0 and 2 in [0, 1]
    sal = torch.randn(x.shape, generator=gen)
    for reduce in ("mean", None):
        out, mask = sgt_mask(x, sal, 20, reduce, "uniform", generator=gen)
        where = mask.unsqueeze(1).expand_as(x) if reduce == "mean" else mask
        lo, hi = x.amin((2, 3), keepdim=True).expand_as(x), x.amax((2, 3), keepdim=True).expand_as(x)
        assert where.any() and torch.equal(out[~where], x[~where])
        assert ((out >= lo) & (out <= hi))[where].all()
        # the same selection as topk_mask
        _, ref_mask = ref.topk_mask(x, sal, k=20, reduce=reduce, fill="zero")
        assert torch.equal(mask, ref_mask)


def test_targets_are_read_off_per_path(suite_run):
    assert report.target_ratio(60.0, 40.0, "time") == 1.5 and report.target_ratio(60.0, 120.0, "speedup") == 2.0
    assert report.target_met(1.05, _target("b", "time", 1.1)) is True
    assert report.target_met(1.2, _target("b", "time", 1.1)) is False
    assert report.target_met(1.9, _target("b", "speedup", 2.0)) is False
    assert report.target_met(9.0, _target("b", "time", None)) is None
    env = dict(report.environment(torch.device("cpu"), "test timer"),
               allocations=dict(kept=True, how="x", text="Allocations kept in the process: x"))
    text = report.format_table(suite_run, env)
    section = text[text.index("== targets =="):]
    assert "set for 2 threads" in section and "allocations kept in the process" in section
    assert "time/batchnorm (<= 1.1x)" in section and "iternorm/time (>= 2x)" in section and "time/floor" in section
    assert "time/clone (<= 1x)" in section and "GroupWhitening 4x8x3x3 d4 newton T5 eval, fwd" in section
    # sdecor's paths, measured or not, with a verdict on the bounded targets only
    gw = section[section.index("GroupWhitening 4x8x3x3 d4 newton T5, fwdbwd"):].split("\n\n")[0]
    torch_row = [line for line in gw.splitlines() if line.startswith("sdecor[torch]")][0]
    assert torch_row.count("met") == 2
    assert any(line.startswith("sdecor[native]") for line in gw.splitlines())
    times = {r["impl"]: r["time_ms"] for r in _by(suite_run, shape="tiny-d4", mode="fwdbwd", status="ok")}
    assert f"{times['sdecor[torch]'] / times['batchnorm']:.3g}x" in torch_row


@pytest.mark.skipif(timing.minor_faults() is None, reason="no getrusage here")
def test_page_faults_per_call_are_counted(suite_run):
    assert all(r["minor_faults"] >= 0 for r in suite_run if r["status"] == "ok" and r["impl"] != "floor")

    def fresh_64mib(inp):
        # 64 MiB is above every mmap threshold glibc uses by itself: mapped, touched and unmapped per call
        return Prepared(lambda: (torch.empty(2**24).fill_(1.0),))

    inject = {"group_cov": [Impl("fresh", "baseline", fresh_64mib, same=False)]}
    rs = harness.run(_settings(inject=inject, backends=(), baselines=("reference",), modes=("fwd",)),
                     shapes=[SUITE_TINY[2]], log=lambda msg: None)
    fresh, reference = _by(rs, impl="fresh")[0], _by(rs, impl="reference")[0]
    assert fresh["minor_faults"] >= 0.9 * 2**26 / 4096 and reference["minor_faults"] < 100
    assert "faults" in report.format_table(rs, report.environment(torch.device("cpu"), "test timer"))


def test_allocations_are_kept_with_mallopt_unless_the_environment_says():
    from sdecor.cli.bench import allocator

    calls = []

    def fake(param, value):
        calls.append((param, value))
        return 1

    if allocator.glibc_version() is None:
        got = allocator.keep_allocations({}, fake)
        assert got["kept"] is False and not calls and "not kept" in got["text"]
        return
    got = allocator.keep_allocations({}, fake)
    assert calls == [(-3, 33554432), (-1, -1)] and got["kept"] is True
    assert got["text"].startswith("Allocations kept in the process: mallopt(M_MMAP_THRESHOLD, 33554432)")
    calls.clear()
    got = allocator.keep_allocations({"MALLOC_TRIM_THRESHOLD_": "4294967296"}, fake)
    assert calls == [(-3, 33554432)] and "MALLOC_TRIM_THRESHOLD_=4294967296 from the environment" in got["text"]
    calls.clear()
    env = {"MALLOC_TRIM_THRESHOLD_": "4294967296", "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432"}
    got = allocator.keep_allocations(env, fake)
    assert not calls and got["kept"] is None and "sdecor bench changed nothing" in got["text"]
    got = allocator.keep_allocations({}, lambda p, v: 0)
    assert got["kept"] is False and "failed" in got["text"]


def test_quick_selection_and_filters():
    s = bench.settings_from_args(_parse(["--quick"]))
    entries = harness.select_entries(s)
    assert sorted(e["op"] for e in entries) == sorted(bench.OPS)
    assert s.dtypes == ("float32",) and s.compile == "tagged"
    s = bench.settings_from_args(_parse(["--ops", "topk_mask", "--shapes", "imagenet", "--dtypes", "bf16,fp16"]))
    entries = harness.select_entries(s)
    assert entries and all(e["op"] == "topk_mask" and "imagenet" in e["name"] for e in entries)
    assert s.dtypes == ("bfloat16", "float16")


def test_suites_are_selections_of_the_one_harness():
    # the focused comparisons: GroupWhitening vs BatchNorm, the naive IterNorm and the flop floor on
    # CPU, its eval mode vs BatchNorm's, group_cov vs x.clone(), topk_mask vs SGT on an ImageNet
    # batch, eigh_small vs torch.linalg.eigh on the batches of the solver paths
    s = bench.settings_from_args(_parse(["--suite", "groupwhitening-cpu,topk-cpu,eigh"]))
    assert s.dtypes == ("float32",) and s.min_time == 0.5
    entries = harness.select_entries(s)
    gw = [e for e in entries if e["op"] == "GroupWhitening"]
    assert sorted((e["d"], bool(e.get("eval"))) for e in gw) == [(16, False), (16, True), (64, False)]
    assert all((e["N"], e["C"], e["S"], e["method"], e["T"]) == (32, 256, (28, 28), "newton", 5) for e in gw)
    cov = [e for e in entries if e["op"] == "group_cov"]
    assert [(e["N"], e["C"], e["S"], e["d"], e["modes"]) for e in cov] == [(32, 256, (28, 28), 16, ("fwd",))]
    topk = [e for e in entries if e["op"] == "topk_mask"]
    assert {e["reduce"] for e in topk} == {"mean", None}
    assert all((e["N"], e["C"], e["S"], e["ratio"], e["fill"]) == (64, 3, (224, 224), 0.5, "uniform") for e in topk)
    eigh = [e for e in entries if e["op"] == "eigh_small"]
    assert sorted((e["G"], e["d"]) for e in eigh) == [(64, 128), (256, 64), (1024, 16), (1024, 32)]
    assert len(entries) == len(gw) + len(cov) + len(topk) + len(eigh)
    # the targets each suite entry carries: (mode, baseline, ratio, bound)
    bounds = {(e["op"], e["d"] if "d" in e else e["reduce"], bool(e.get("eval"))):
              {(t["mode"], t["baseline"], t["ratio"], t["bound"]) for t in e["targets"]} for e in gw + cov + topk}
    assert bounds == {
        ("GroupWhitening", 16, False): {("fwdbwd", "batchnorm", "time", 1.1), ("fwdbwd", "floor", "time", None),
                                        ("fwdbwd", "iternorm", "speedup", None),
                                        ("fwdbwd", "iternorm-compile", "speedup", 1.0)},
        ("GroupWhitening", 64, False): {("fwdbwd", "floor", "time", 1.3), ("fwdbwd", "iternorm", "speedup", 2.0),
                                        ("fwdbwd", "batchnorm", "time", None),
                                        ("fwdbwd", "iternorm-compile", "speedup", 1.0)},
        ("GroupWhitening", 16, True): {("fwd", "batchnorm", "time", 1.3)},
        ("group_cov", 16, False): {("fwd", "clone", "time", 1.0)},
        ("topk_mask", "mean", False): {("fwd", "sgt", "speedup", 4.0)},
        ("topk_mask", None, False): {("fwd", "sgt", "speedup", 3.0)},
    }
    # every target names a baseline the entry's op measures, in a mode the entry runs
    for e in gw + cov + topk:
        spec = OP_SPECS[e["op"]]
        names = {i.name for i in spec.baselines(e)} | ({"floor"} if e.get("flop_floor") else set())
        for t in e["targets"]:
            assert t["baseline"] in names and t["mode"] in e.get("modes", spec.modes), (e["name"], t)
        assert bool(e.get("flop_floor")) == (spec.flops(e, "fwdbwd") is not None)
    assert [e["d"] for e in gw if e.get("flop_floor")] == [16, 64]
    assert [e["d"] for e in gw if e.get("compiled_iternorm")] == [16, 64]
    # the training steps: no per-op entry, the paths and targets of sdecor.cli.bench.steps
    assert not harness.select_entries(bench.settings_from_args(_parse(["--suite", "steps-cpu"])))
    assert {(t["path"], t["baseline"], t["ratio"], t["bound"]) for t in steps.TARGETS} == {
        ("groupwhitening", "batchnorm", "time", 1.1), ("saliencydecor", "sgt", "time", 1.1),
        ("sgt", "batchnorm", "time", None), ("saliencydecor", "batchnorm", "time", None),
        ("groupwhitening", "iternorm", "time", None)}
    assert all(t["path"] in steps.PATHS and t["baseline"] in steps.PATHS for t in steps.TARGETS)
    c = steps.StepConfig()
    assert (c.batch, c.classes, c.size, c.num_channels, c.lr, c.momentum, c.mask_ratio) == \
        (64, 10, 32, 16, 0.01, 0.9, 0.5)
    # --quick and a suite: the union
    quick = harness.select_entries(bench.settings_from_args(_parse(["--quick"])))
    both = harness.select_entries(bench.settings_from_args(_parse(["--quick", "--suite", "eigh"])))
    key = lambda es: {(e["op"], e["name"]) for e in es}  # noqa: E731
    assert key(both) == key(quick) | key(eigh) and len(both) == len(quick) + len(eigh)
    assert bench.main(["--suite", "nope"]) == 2


def _parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


def test_command_line(tmp_path, capsys):
    assert bench.main(["--ops", "nope"]) == 2
    assert "unknown op 'nope'" in capsys.readouterr().err
    assert bench.main(["--dtypes", "fp8"]) == 2
    before = _snapshot(RESULTS)
    rc = bench.main(CHEAP + ["--out", str(tmp_path), "--no-plot", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "== eigh_small ==" in out and "4x16x16" in out
    assert "Threads: torch.get_num_threads() = 1 (--threads)" in out
    assert len(list(tmp_path.glob("*.json"))) == 1 and len(list(tmp_path.glob("*.csv"))) == 1
    # how freed memory was kept (or why not) is printed and saved
    alloc = json.loads(next(tmp_path.glob("*.json")).read_text())["environment"]["allocations"]
    assert alloc["text"] in out and alloc["text"].startswith(("Allocations kept in the process", "Allocations:"))
    with open(next(tmp_path.glob("*.csv"))) as f:
        row = next(csv.DictReader(f))
    assert row["allocations"] == alloc["text"] and row["torch_threads"] == "1"
    assert bench.main(["--show", str(next(tmp_path.glob("*.json"))), "--markdown"]) == 0
    shown = capsys.readouterr().out
    assert "### eigh_small" in shown and "| shape | dtype | mode | path | time |" in shown
    assert _snapshot(RESULTS) == before
    with pytest.raises(SystemExit):            # one destination: --out, --save-results or --no-save
        bench.main(CHEAP + ["--out", str(tmp_path), "--save-results"])


def test_a_run_writes_to_the_working_directory_not_the_source_tree(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = _snapshot(RESULTS)
    assert bench.main(CHEAP) == 0
    slug = report.device_slug(torch.device("cpu"))
    out = tmp_path / "sdecor-bench-output"
    assert sorted(p.name for p in out.iterdir()) == [f"{slug}-eigh_small.png", f"{slug}.csv", f"{slug}.json"]
    assert _snapshot(RESULTS) == before
    assert "sdecor-bench-output/" in (ROOT / ".gitignore").read_text().splitlines()


def test_save_results_writes_the_curated_set_into_the_source_tree(tmp_path, monkeypatch, capsys):
    # a stand-in source tree: the real benchmarks/results is only written by hand
    tree = tmp_path / "tree"
    (tree / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.setattr(report, "source_root", lambda: tree)
    slug = report.device_slug(torch.device("cpu"))
    stale = tree / "benchmarks" / "results" / f"{slug}-group_cov.png"
    stale.write_bytes(b"an earlier run's plot")
    monkeypatch.chdir(tmp_path)
    assert bench.main(CHEAP + ["--save-results"]) == 0
    results = tree / "benchmarks" / "results"
    assert sorted(p.name for p in results.iterdir()) == [f"{slug}-eigh_small.png", f"{slug}.json"]
    doc = json.loads((results / f"{slug}.json").read_text())
    assert {r["op"] for r in doc["results"]} == {"eigh_small"}
    assert not (tmp_path / "sdecor-bench-output").exists()
    # outside a source checkout: a clear error, before anything runs
    monkeypatch.setattr(report, "source_root", lambda: None)
    capsys.readouterr()
    assert bench.main(CHEAP + ["--save-results"]) == 2
    err = capsys.readouterr().err
    assert "--save-results" in err and "source checkout" in err and "--out" in err
    assert "== eigh_small ==" not in capsys.readouterr().out


def test_this_checkout_is_a_source_tree():
    assert report.source_root() == ROOT
    assert report.results_dir() == RESULTS
    assert report.static_name((80, 90)) == "static-sm80-sm90.json"


def test_plots_without_matplotlib_name_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # import matplotlib fails
    assert bench.main(CHEAP + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sdecor[bench]" in err and "matplotlib" in err
    assert not list(tmp_path.iterdir())                         # refused before the run
    assert bench.main(CHEAP + ["--out", str(tmp_path), "--no-plot"]) == 0


def test_python_m_sdecor_bench_is_the_one_entry():
    out = subprocess.run([sys.executable, "-m", "sdecor", "bench", "--list", "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "group_whiten" in out.stdout and "eigh_small" in out.stdout
    assert not (ROOT / "benchmarks" / "__main__.py").exists()


def _no_gpu_env(tmp_path) -> dict:
    """An environment whose PATH has bash and find but no nvidia-smi."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "find"):
        (bindir / tool).symlink_to(shutil.which(tool))
    return {"PATH": str(bindir), "HOME": str(tmp_path)}


def test_gpu_check_without_a_gpu_prints_one_line(tmp_path):
    env = _no_gpu_env(tmp_path)
    script = ROOT / "benchmarks" / "gpu_check.sh"
    for extra in ({}, {"PATH": os.environ.get("PATH", ""), "CUDA_VISIBLE_DEVICES": ""}):
        out = subprocess.run([shutil.which("bash"), str(script)], env={**env, **extra}, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stderr == "", out.stderr
        assert len(out.stdout.splitlines()) == 1 and "no CUDA GPU" in out.stdout
    assert not list(tmp_path.glob("**/*.json"))


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_without_a_gpu_prints_one_line(tmp_path):
    env = _no_gpu_env(tmp_path)
    stamp = tmp_path / "installed"          # stands for the install stamp: up to date, nothing built
    stamp.touch()
    before = _snapshot(RESULTS)
    out = subprocess.run([shutil.which("make"), "gpu-check", f"STAMP={stamp}"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.splitlines() == ["make gpu-check: no CUDA GPU here (nvidia-smi finds none); nothing to run"]
    assert _snapshot(RESULTS) == before


@pytest.mark.skipif(importlib.util.find_spec("sdecor_kernels.static") is None,
                    reason="sdecor_kernels/static.py (the compile report) is not in this tree")
def test_static_report_compiles_a_kernel_module(tmp_path, capsys):
    rc = bench.main(["--static", "--arch", "80", "--d", "16", "--kernels", "topk", "--ops", "group_whiten",
                     "--shapes", "resnet50-imagenet-stage1-d16", "--dtypes", "fp32", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert [p.name for p in tmp_path.iterdir()] == ["static-sm80.json"]      # one name, no timestamp
    doc = json.loads((tmp_path / "static-sm80.json").read_text())
    assert doc["kernels"] and all(k["arch"] == 80 and "error" not in k for k in doc["kernels"])
    for k in doc["kernels"]:
        assert k["n_regs"] > 0 and k["n_spills"] >= 0 and k["shared"] >= 0 and isinstance(k["tensor_cores"], bool)
    # bytes floor: forward reads x twice and writes y once; H100 at 3.35 TB/s
    fwd = [b for b in doc["bandwidth"] if b["mode"] == "fwd"][0]
    x_bytes = 64 * 256 * 56 * 56 * 4
    assert fwd["bytes"] == 3 * x_bytes
    assert fwd["h100_bound_us"] == pytest.approx(3 * x_bytes / 3.35e12 * 1e6)
    assert "H100" in out and "regs" in out
    # launches per call of the selected family (topk_mask, every fill), counted under the interpreter
    assert doc["environment"]["launch_error"] is None and "Launches per call" in out
    rows = doc["launches"]
    assert sorted(r["fill"] for r in rows) == sorted(("zero", "constant", "mean", "uniform", "baseline"))
    for r in rows:
        assert r["call"] == "topk_mask" and r["part"] == "call" and r["launch_total"] == 3, r
        assert r["shape"] == [128, 3, 32, 32] and r["op_total"] >= r["work_total"] >= 0


# ---------------------------------------------------------------------------------------------------
# the naive IterNorm under torch.compile (groupwhitening-cpu)

COMPILED_TINY = dict(op="GroupWhitening", name="tiny-d4-compiled", N=4, C=8, S=(3, 3), d=4, method="newton", T=5,
                     compiled_iternorm=True, modes=("fwdbwd",), tags=())


def test_compiled_iternorm_is_checked_and_timed_after_compiling():
    rs = harness.run(_settings(compile="all", backends=("torch",), baselines=("reference", "iternorm-compile")),
                     shapes=[COMPILED_TINY], log=lambda msg: None)
    (r,) = _by(rs, impl="iternorm-compile")
    assert r["status"] == "ok" and r["checked"] and r["err_ratio"] <= 1.0 and r["time_ms"] > 0
    assert "torch.compile" in r["note"]
    fast = _by(rs, impl="sdecor[torch]")[0]
    assert fast["speedup"]["iternorm-compile"] == pytest.approx(r["time_ms"] / fast["time_ms"])
    # only where an entry asks for it; off with --compile off
    assert not _by(harness.run(_settings(modes=("fwd",), backends=()), shapes=[TINY[3]], log=lambda m: None),
                   impl="iternorm-compile")
    rs = harness.run(_settings(compile="off", backends=()), shapes=[COMPILED_TINY], log=lambda msg: None)
    (r,) = _by(rs, impl="iternorm-compile")
    assert r["status"] == "skipped" and "--compile off" in r["reason"]


def test_a_compiler_that_fails_is_reported_in_the_table(monkeypatch):
    from sdecor.cli.bench import baselines

    def broken():
        def fn(*args):
            raise RuntimeError("no C++ compiler found for inductor")
        return fn

    monkeypatch.setattr(baselines, "compiled_iternorm", broken)
    entry = dict(COMPILED_TINY, targets=(_target("iternorm-compile", "speedup", 1.0),))
    rs = harness.run(_settings(compile="all", backends=("torch",), baselines=("reference", "iternorm-compile")),
                     shapes=[entry], log=lambda msg: None)
    (r,) = _by(rs, impl="iternorm-compile")
    assert r["status"] == "error" and "no C++ compiler found" in r["reason"]
    assert _by(rs, impl="sdecor[torch]")[0]["status"] == "ok"
    text = report.format_table(rs, report.environment(torch.device("cpu"), "test timer"))
    section = text[text.index("== targets =="):]
    assert "(not measured: iternorm-compile)" in section and "no C++ compiler found" in section


# ---------------------------------------------------------------------------------------------------
# --suite steps-cpu: training steps of ResNet-18

SMALL_STEPS = steps.StepConfig(batch=8)
# the suite's network comes with the bench extra
needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="torchvision (sdecor[bench]) is not installed")


@pytest.fixture(scope="module")
def steps_run():
    torch.manual_seed(0)
    return steps.run(_settings(min_time=0.001, min_reps=1), SMALL_STEPS, log=lambda msg: None)


@needs_torchvision
def test_every_step_path_is_checked_then_timed(steps_run):
    assert [r["impl"] for r in steps_run] == list(steps.PATHS)
    for r in steps_run:
        assert r["status"] == "ok" and r["time_ms"] > 0 and r["op"] == steps.OP and r["mode"] == "step", r
        assert r["check"].startswith("checked: one step") and r["dtype"] == "float32"
    kinds = {r["impl"]: r["kind"] for r in steps_run}
    assert {k for k, v in kinds.items() if v == "fast"} == {"groupwhitening", "saliencydecor"}
    # the GroupWhitening step runs IterNorm's algorithm: compared with the IterNorm step
    gw = _by(steps_run, impl="groupwhitening")[0]
    assert gw["checked"] and gw["err_ratio"] <= 1.0 and "agree with the IterNorm step" in gw["check"]
    times = {r["impl"]: r["time_ms"] for r in steps_run}
    assert gw["speedup"]["batchnorm"] == pytest.approx(times["batchnorm"] / times["groupwhitening"])


@needs_torchvision
def test_step_targets_are_read_off_for_their_path_only(steps_run):
    text = report.format_table(steps_run, report.environment(torch.device("cpu"), "test timer"))
    assert "== train_step ==" in text and "checked: one step from the common weights" in text
    section = text[text.index("== targets =="):]
    assert "groupwhitening time/batchnorm (<= 1.1x)" in section and "saliencydecor time/sgt (<= 1.1x)" in section
    lines = section.splitlines()
    head = next(line for line in lines if line.startswith("path"))
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in steps.PATHS}
    times = {r["impl"]: r["time_ms"] for r in steps_run}
    gw_bn = times["groupwhitening"] / times["batchnorm"]
    assert f"{gw_bn:.3g}x" in rows["groupwhitening"] and "met" in rows["groupwhitening"]
    sd_sgt = times["saliencydecor"] / times["sgt"]
    assert f"{sd_sgt:.3g}x" in rows["saliencydecor"]
    # the baselines' rows carry no ratio of a path target, and no verdict
    assert "met" not in rows["batchnorm"] and "met" not in rows["sgt"] and "met" not in rows["iternorm"]
    assert "x" not in rows["batchnorm"][head.index("groupwhitening time/batchnorm"):head.index("note")]
    sgt_bn = times["sgt"] / times["batchnorm"]
    assert f"{sgt_bn:.3g}x" in rows["sgt"]


@needs_torchvision
def test_step_builders_train_from_common_weights():
    paths, (x, y) = steps.build_paths(SMALL_STEPS, "cpu", 3)
    assert tuple(x.shape) == (8, 3, 32, 32) and tuple(y.shape) == (8,) and int(y.max()) < 10
    first = {p.name: next(p.model.parameters()).detach().clone() for p in paths}
    assert all(torch.equal(v, first["batchnorm"]) for v in first.values())       # conv1, one model copied
    gw = dict((p.name, p) for p in paths)
    from sdecor.nn import GroupWhitening

    assert sum(isinstance(m, GroupWhitening) for m in gw["groupwhitening"].model.modules()) == 20
    assert sum(isinstance(m, steps.IterNormLayer) for m in gw["iternorm"].model.modules()) == 20
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in gw["saliencydecor"].model.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in gw["sgt"].model.modules()) == 20
    for p in paths:
        c = steps.check_step(p)
        assert c["problem"] is None and bool(torch.isfinite(c["loss"])), (p.name, c["problem"])
    # the SGT step's saliency is sdecor.saliency's (|d logit_y / d x|, eval mode, input gradient only)
    model = gw["sgt"].model
    model.zero_grad(set_to_none=True)
    sal = steps.input_saliency(model, x, y)
    assert model.training and all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(sal, sdecor.saliency(model, x, y))


@needs_torchvision
def test_a_step_that_fails_its_check_is_reported_not_timed(monkeypatch):
    def nan_model(config):
        model = steps.resnet18(config)
        with torch.no_grad():
            model.fc.bias.fill_(float("nan"))
        return model

    rs = steps.run(_settings(min_time=0.001, min_reps=1), SMALL_STEPS, model_fn=nan_model,
                   paths=("batchnorm", "sgt"), log=lambda msg: None)
    assert [r["status"] for r in rs] == ["error", "error"]
    assert all("loss of the first step is nan" in r["reason"] and r["time_ms"] is None for r in rs)
    # a GroupWhitening step that disagrees with the IterNorm step is a MISMATCH, never timed
    real = steps.IterNormLayer.forward
    monkeypatch.setattr(steps.IterNormLayer, "forward", lambda self, x: 1.01 * real(self, x))
    rs = steps.run(_settings(min_time=0.001, min_reps=1), SMALL_STEPS, paths=("groupwhitening", "iternorm"),
                   log=lambda msg: None)
    gw, it = rs
    assert gw["status"] == "MISMATCH" and gw["time_ms"] is None and "IterNorm step" in gw["reason"]
    assert gw["err_ratio"] > 1.0 and it["status"] == "ok"


@needs_torchvision
def test_the_steps_suite_from_the_command_line(monkeypatch, capsys):
    seen, real_run = {}, steps.run

    def fake_run(settings, *args, **kwargs):
        seen["settings"] = settings
        return real_run(settings, SMALL_STEPS, paths=("batchnorm", "groupwhitening"), log=lambda msg: None)

    monkeypatch.setattr(steps, "run", fake_run)
    rc = bench.main(["--suite", "steps-cpu", "--threads", "1", "--reps", "1", "--min-time", "0.001", "--no-save"])
    out = capsys.readouterr().out
    assert rc == 0 and "== train_step ==" in out and "groupwhitening time/batchnorm (<= 1.1x)" in out
    assert seen["settings"].suites == ("steps-cpu",) and seen["settings"].min_reps == 1
    assert bench.main(["--list", "--suite", "steps-cpu"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in listed] == [[steps.OP, name] for name in steps.PATHS]


# ---------------------------------------------------------------------------------------------------
# --distributed: the cost of synchronised statistics


def test_distributed_measures_both_layers_and_counts_the_bytes():
    from sdecor.cli.bench import distributed
    from sdecor.ops.whiten_sync import payload_numel

    doc = distributed.measure(2, reps=2, layers=[("tiny", (4, 32, 3, 3), 8)], resnet=None,
                              decor=[("tiny decor", (4, 32, 3, 3), 8)], objective=("tiny objective", 4, 16),
                              timeout=300)
    (row,) = doc["rows"]
    assert doc["world"] == 2 and doc["pg_backend"] == "gloo" and row["case"] == "tiny"
    assert set(row["ms"]) == {"GroupWhitening", "SyncGroupWhitening", "collectives"}
    assert all(v > 0 for v in row["ms"].values())
    assert row["ratio"] == row["ms"]["SyncGroupWhitening"] / row["ms"]["GroupWhitening"]
    # G = 4 groups of d = 8, fp32: what the forward's all_gather and the backward's all_reduce carry
    assert row["bytes_per_step"] == {"forward_sent": 4 * payload_numel(4, 8), "forward_received": 4 * payload_numel(4, 8),
                                     "backward_allreduce": 4 * 4 * 8 * 9}
    assert payload_numel(4, 8) == 2 + 4 + 4 * 8 + 4 * 36
    assert "SyncGroupWhitening vs GroupWhitening" in distributed.format_rows(doc)

    # the decorrelation term per rank and of the global batch: the loss alone, and the tiny CNN's
    # SaliencyDecor step (its decorrelated layer: the classifier's 32 inputs)
    loss_row, step_row = doc["decor_rows"]
    assert loss_row["case"] == "tiny decor" and step_row["case"] == "tiny objective"
    assert set(loss_row["ms"]) == {"per-rank", "global", "collectives"}
    assert set(step_row["ms"]) == {"per-rank", "global"}
    for row in (loss_row, step_row):
        assert all(v > 0 for v in row["ms"].values())
        assert row["ratio"] == row["ms"]["global"] / row["ms"]["per-rank"]
    # per step: a header of 6 int64 per process, and G (d + d^2) float64 (sum x, sum x x^T per group)
    assert loss_row["numbers_per_step"] == {"header_int64": 12, "moments_float64": 4 * (8 + 64),
                                            "bytes": 8 * (12 + 4 * 72)}
    assert step_row["numbers_per_step"] == {"header_int64": 12, "moments_float64": 2 * (16 + 256),
                                            "bytes": 8 * (12 + 2 * 272)}
    assert "decorrelation term of each process's batch" in distributed.format_rows(doc)


def test_distributed_needs_two_processes(capsys):
    assert bench.main(["--distributed", "1", "--no-save"]) == 2
    assert "--distributed needs at least 2 processes" in capsys.readouterr().err
