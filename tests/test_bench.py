"""The benchmark harness: correctness gate, result files, command line and static report.

Runs on tiny shapes through the harness API (the real shapes are for `sdecor bench`).
"""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdecor.bench as bench
from sdecor import reference as ref
from sdecor.bench import harness, report
from sdecor.bench.ops import Impl, Prepared
from sdecor.bench.plot import plot_op

ROOT = Path(__file__).resolve().parents[1]

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
    assert paths["latest_json"] == tmp_path / f"latest-{name}.json"
    assert paths["run_json"].name.startswith(name + "-") and paths["run_json"].exists()
    doc = json.loads(paths["run_json"].read_text())
    for key in ("device", "device_name", "torch", "triton", "sdecor", "revision", "timestamp", "timer", "cpu_count"):
        assert key in doc["environment"], key
    assert doc["environment"]["device"] == "cpu"
    assert len(doc["results"]) == len(tiny_run)
    for key in ("op", "shape", "dtype", "mode", "impl", "kind", "status", "time_ms", "gbps", "bytes",
                "speedup", "max_abs_err", "err_ratio", "reason", "peak_mem_bytes"):
        assert key in doc["results"][0], key
    with open(paths["latest_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(tiny_run)
    assert set(report.CSV_FIELDS) <= set(rows[0])
    ok = [r for r in rows if r["status"] == "ok" and r["impl"] == "sdecor[torch]" and r["op"] == "group_whiten"]
    assert ok and float(ok[0]["speedup_vs_reference"]) > 0 and ok[0]["device_name"] == env["device_name"]
    png = plot_op(tiny_run, "group_whiten", env, tmp_path / "gw.png")
    assert png.exists() and png.stat().st_size < 150_000


def test_quick_selection_and_filters():
    s = bench.settings_from_args(_parse(["--quick"]))
    entries = harness.select_entries(s)
    assert sorted(e["op"] for e in entries) == sorted(bench.OPS)
    assert s.dtypes == ("float32",) and s.compile == "tagged"
    s = bench.settings_from_args(_parse(["--ops", "topk_mask", "--shapes", "imagenet", "--dtypes", "bf16,fp16"]))
    entries = harness.select_entries(s)
    assert entries and all(e["op"] == "topk_mask" and "imagenet" in e["name"] for e in entries)
    assert s.dtypes == ("bfloat16", "float16")


def _parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


def test_command_line(tmp_path, capsys):
    assert bench.main(["--ops", "nope"]) == 2
    assert "unknown op 'nope'" in capsys.readouterr().err
    assert bench.main(["--dtypes", "fp8"]) == 2
    rc = bench.main(["--ops", "eigh_small", "--shapes", "resnet18-cifar-stage1-d16", "--backends", "torch",
                     "--min-time", "0.001", "--reps", "1", "--out", str(tmp_path), "--no-plot"])
    out = capsys.readouterr().out
    assert rc == 0 and "== eigh_small ==" in out and "4x16x16" in out
    assert len(list(tmp_path.glob("latest-*.json"))) == 1 and len(list(tmp_path.glob("*.csv"))) == 2
    assert bench.main(["--show", str(next(tmp_path.glob("latest-*.json"))), "--markdown"]) == 0
    shown = capsys.readouterr().out
    assert "### eigh_small" in shown and "| shape | dtype | mode | path | time |" in shown


def test_python_m_benchmarks_is_the_same_entry():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--list", "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "group_whiten" in out.stdout and "eigh_small" in out.stdout


@pytest.mark.skipif(importlib.util.find_spec("sdecor_kernels.static") is None,
                    reason="sdecor_kernels/static.py (the compile report) is not in this tree")
def test_static_report_compiles_a_kernel_module(tmp_path, capsys):
    rc = bench.main(["--static", "--arch", "80", "--d", "16", "--kernels", "topk", "--ops", "group_whiten",
                     "--shapes", "resnet50-imagenet-stage1-d16", "--dtypes", "fp32", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads((tmp_path / "latest-static.json").read_text())
    assert doc["kernels"] and all(k["arch"] == 80 and "error" not in k for k in doc["kernels"])
    for k in doc["kernels"]:
        assert k["n_regs"] > 0 and k["n_spills"] >= 0 and k["shared"] >= 0 and isinstance(k["tensor_cores"], bool)
    # bytes floor: forward reads x twice and writes y once; H100 at 3.35 TB/s
    fwd = [b for b in doc["bandwidth"] if b["mode"] == "fwd"][0]
    x_bytes = 64 * 256 * 56 * 56 * 4
    assert fwd["bytes"] == 3 * x_bytes
    assert fwd["h100_bound_us"] == pytest.approx(3 * x_bytes / 3.35e12 * 1e6)
    assert "H100" in out and "regs" in out
