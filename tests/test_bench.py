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

import sdecor.bench as bench
from sdecor import reference as ref
from sdecor.bench import harness, report
from sdecor.bench.ops import Impl, Prepared
from sdecor.bench.plot import plot_op

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
    from sdecor.bench.baselines import iternorm_train

    x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(iternorm_train(x, 4, 5, 1e-5), ref.group_whiten(x, 4, "newton", 1e-5, 5))

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
    # the focused comparisons: GroupWhitening vs BatchNorm and the naive IterNorm on CPU, topk_mask
    # vs SGT on an ImageNet batch, eigh_small vs torch.linalg.eigh on the batches of the solver paths
    s = bench.settings_from_args(_parse(["--suite", "groupwhitening-cpu,topk-cpu,eigh"]))
    assert s.dtypes == ("float32",) and s.min_time == 0.5
    entries = harness.select_entries(s)
    gw = [e for e in entries if e["op"] == "GroupWhitening"]
    assert sorted(e["d"] for e in gw) == [16, 64]
    assert all((e["N"], e["C"], e["S"], e["method"], e["T"]) == (32, 256, (28, 28), "newton", 5) for e in gw)
    topk = [e for e in entries if e["op"] == "topk_mask"]
    assert {e["reduce"] for e in topk} == {"mean", None}
    assert all((e["N"], e["C"], e["S"], e["ratio"], e["fill"]) == (64, 3, (224, 224), 0.5, "uniform") for e in topk)
    eigh = [e for e in entries if e["op"] == "eigh_small"]
    assert sorted((e["G"], e["d"]) for e in eigh) == [(64, 128), (256, 64), (1024, 16), (1024, 32)]
    assert len(entries) == len(gw) + len(topk) + len(eigh)
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
    rc = bench.main(CHEAP + ["--out", str(tmp_path), "--no-plot"])
    out = capsys.readouterr().out
    assert rc == 0 and "== eigh_small ==" in out and "4x16x16" in out
    assert len(list(tmp_path.glob("*.json"))) == 1 and len(list(tmp_path.glob("*.csv"))) == 1
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


# ---------------------------------------------------------------------------------------------------
# --distributed: the cost of synchronised statistics


def test_distributed_measures_both_layers_and_counts_the_bytes():
    from sdecor.bench import distributed
    from sdecor.ops.whiten_sync import payload_numel

    doc = distributed.measure(2, reps=2, layers=[("tiny", (4, 32, 3, 3), 8)], resnet=None, timeout=300)
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


def test_distributed_needs_two_processes(capsys):
    assert bench.main(["--distributed", "1", "--no-save"]) == 2
    assert "--distributed needs at least 2 processes" in capsys.readouterr().err
