"""Where the commands write (sdecor.cli.output): the output folder is made and proved writable by a
write before any work, and results whose final write fails are not lost.

Every command that writes (train, demo, bench) is run in-process with an output path it cannot
use: /proc/x (root may create folders anywhere, but not there), an existing file, a path under a
file, a folder on a read-only file system (the probe write fails: root ignores permissions, so the
write is made to fail). Each stops with code 2 and one line naming the option, before any data is
read or anything is trained or timed, and leaves nothing behind. Then the last write of a finished
run fails (a full disk): the results are in the temporary folder the message names, or on stdout.
"""

import errno
import json
import os
import re

import pytest
import torch

from sdecor import cli
from sdecor.cli import data, demo, output, train
from sdecor.cli import inspect as inspect_cli
from sdecor.cli.bench import harness
from sdecor.cli.bench import report as bench_report
from sdecor.cli.models import build_model

# a real benchmark shape that runs in milliseconds (as tests/test_bench.py's CHEAP)
BENCH_CHEAP = ["--ops", "eigh_small", "--shapes", "resnet18-cifar-stage1-d16", "--backends", "torch",
               "--min-time", "0.001", "--reps", "1", "--threads", "1"]
# the cheapest run of each command that writes, without its --out
RUNS = {
    "train": ["train", "--epochs", "1", "--eval-samples", "8", "--threads", "1", "--no-progress"],
    "demo": ["demo", "--quick", "--datasets", "digits", "--eval-samples", "8", "--no-progress"],
    "bench": ["bench", *BENCH_CHEAP],
}


@pytest.fixture
def no_work(monkeypatch):
    """Fails a command that reads data, trains or times anything; returns what was called."""
    called = []

    def refuse(what):
        def stub(*args, **kwargs):
            called.append(what)
            raise AssertionError(f"{what} ran although an option was bad")
        return stub

    monkeypatch.setattr(train.data_mod, "load", refuse("data.load"))
    monkeypatch.setattr(train, "train_model", refuse("train_model"))
    monkeypatch.setattr(demo, "load_dataset", refuse("demo.load_dataset"))
    monkeypatch.setattr(demo, "train_model", refuse("demo.train_model"))
    monkeypatch.setattr(harness, "run", refuse("bench harness.run"))
    monkeypatch.setattr(inspect_cli, "inspect_model", refuse("inspect_model"))
    return called


def run_cli(capsys, argv):
    """(exit code, stdout, stderr lines) of ``sdecor <argv>`` in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def tiny_digits():
    ds = data.load_digits()
    return ds._replace(train=data.Split(ds.train.x[:64], ds.train.y[:64]),
                       test=data.Split(ds.test.x[:32], ds.test.y[:32]))


@pytest.fixture
def small_work(monkeypatch):
    """train and demo on 64 digits: a run of a few seconds."""
    monkeypatch.setattr(train.data_mod, "load", lambda *args, **kwargs: tiny_digits())
    monkeypatch.setattr(demo, "load_dataset", lambda name, quick: tiny_digits())


@pytest.fixture
def bench_leaves_malloc(monkeypatch):
    """A bench run in this process leaves glibc's thresholds alone (it takes the environment's as the
    user's): raised thresholds would stay for every later test in this process."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")


def read_only(monkeypatch):
    def refuse(folder):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), folder)
    monkeypatch.setattr(output, "probe_writable", refuse)


# ---------------------------------------------------------------------------------------------------
# before any work


BAD_OUT = {
    "proc": (lambda tmp: "/proc/x", "cannot create /proc/x: No such file or directory"),
    "proc-deep": (lambda tmp: "/proc/x/y/z", "cannot create /proc/x/y/z: No such file or directory"),
    "file": (lambda tmp: str(tmp / "file"), "exists and is not a folder"),
    "under-file": (lambda tmp: str(tmp / "file" / "x"), "is not a folder"),
    "read-only": (lambda tmp: str(tmp / "ro" / "out"), "Read-only file system"),
    "read-only-existing": (lambda tmp: str(tmp), "Read-only file system"),
}


@pytest.mark.parametrize("where", sorted(BAD_OUT))
@pytest.mark.parametrize("command", sorted(RUNS))
def test_unusable_out_stops_before_any_work(tmp_path, capsys, monkeypatch, no_work, command, where):
    (tmp_path / "file").write_text("keep")
    make, words = BAD_OUT[where]
    if where.startswith("read-only"):
        read_only(monkeypatch)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(capsys, RUNS[command] + ["--out", make(tmp_path)])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"sdecor {command}: error: --out: ") and words in err[0], err
    assert no_work == [] and "Traceback" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before          # what prepare made is gone
    assert (tmp_path / "file").read_text() == "keep"


def test_bench_default_folder_is_checked_too(tmp_path, capsys, monkeypatch, no_work):
    """Without --out bench writes into ./sdecor-bench-output: a file of that name stops it at once."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sdecor-bench-output").write_text("keep")
    code, _, err = run_cli(capsys, RUNS["bench"])
    assert code == 2 and len(err) == 1 and err[0].startswith("sdecor bench: error: --out: ")
    assert "sdecor-bench-output exists and is not a folder" in err[0] and no_work == []


@pytest.mark.parametrize("mode", ["--distributed", "--static"])
def test_bench_other_modes_check_out_before_work(tmp_path, capsys, monkeypatch, mode):
    from sdecor.cli.bench import distributed, static_report

    monkeypatch.setattr(distributed, "measure", lambda *a, **k: pytest.fail("measured with a bad --out"))
    monkeypatch.setattr(static_report, "kernel_rows", lambda *a, **k: pytest.fail("compiled with a bad --out"))
    argv = ["bench", mode] + (["2"] if mode == "--distributed" else ["--d", "16"]) + ["--out", "/proc/x"]
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and err == ["sdecor bench: error: --out: cannot create /proc/x: No such file or directory"]


def test_bench_save_results_is_checked_by_a_write(tmp_path, capsys, monkeypatch, no_work):
    tree = tmp_path / "tree"
    (tree / "benchmarks" / "results").mkdir(parents=True)
    monkeypatch.setattr(bench_report, "source_root", lambda: tree)
    read_only(monkeypatch)
    code, _, err = run_cli(capsys, RUNS["bench"] + ["--save-results"])
    assert code == 2 and len(err) == 1 and err[0].startswith("sdecor bench: error: --save-results: cannot write")
    assert "Read-only file system" in err[0] and no_work == []
    assert list((tree / "benchmarks" / "results").iterdir()) == []


def test_a_distributed_rank_checks_its_own_file(tmp_path, capsys, monkeypatch):
    """Rank 1 of a --save-all-ranks run writes model-rank1.pt: its folder is proved writable too."""
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    read_only(monkeypatch)
    monkeypatch.setattr(train.data_mod, "load", lambda *a, **k: pytest.fail("read data with a bad --out"))
    code, _, err = run_cli(capsys, ["train", "--distributed", "--save-all-ranks", "--lambda-decor", "0.1",
                                    "--out", str(tmp_path / "o")])
    assert code == 2 and len(err) == 1 and "--out: cannot write in" in err[0] and not (tmp_path / "o").exists()


def test_prepare_makes_the_folder_and_leaves_no_probe(tmp_path):
    out = output.OutputDir(str(tmp_path / "a" / "b"), ("x.json",), command="test")
    assert not (tmp_path / "a").exists()                                # constructing it touches nothing
    assert out.prepare() == str(tmp_path / "a" / "b")
    assert list((tmp_path / "a" / "b").iterdir()) == []
    out.discard()                                                       # unused: what it made goes
    assert not (tmp_path / "a").exists()
    existing = output.OutputDir(str(tmp_path), command="test")
    existing.prepare()
    existing.discard()
    assert tmp_path.is_dir()                                            # never a folder it did not make


def test_prepare_does_not_trust_os_access(tmp_path, monkeypatch):
    """os.access is not asked: a folder it calls unwritable is used when a write works, and one it
    calls writable is refused when the write fails."""
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    output.OutputDir(str(tmp_path / "o"), command="test").prepare()
    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    read_only(monkeypatch)
    with pytest.raises(output.UsageError, match="--out: cannot write in .*Read-only file system"):
        output.OutputDir(str(tmp_path / "p"), command="test").prepare()
    assert not (tmp_path / "p").exists()


def test_a_missing_extra_removes_the_new_folder(tmp_path, monkeypatch):
    from sdecor._optional import MissingDependencyError

    def missing(*args, **kwargs):
        raise MissingDependencyError("the digits dataset needs the package 'scikit-learn'")
    monkeypatch.setattr(train.data_mod, "load", missing)
    assert cli.main(["train", "--out", str(tmp_path / "new" / "run"), "--no-progress"]) == 1
    assert not (tmp_path / "new").exists()


def test_the_dataset_failing_removes_the_new_folder(tmp_path, capsys):
    code, _, err = run_cli(capsys, ["train", "--dataset", "mnist", "--data-root", str(tmp_path),
                                    "--out", str(tmp_path / "new" / "run"), "--no-progress"])
    assert code == 2 and len(err) == 1 and "downloads are disabled" in err[0]
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------------
# after the work


def fail_writes_into(monkeypatch, folder, err=errno.ENOSPC):
    """Every write_file into ``folder`` (every one, for None) fails with ``err`` half-way."""
    real = output.write_file

    def write(where, name, data):
        if folder is None or os.path.realpath(where) == os.path.realpath(folder):
            raise OSError(err, os.strerror(err))
        return real(where, name, data)
    monkeypatch.setattr(output, "write_file", write)


FALLBACK = re.compile(r"the results are in (\S+) instead \((.*)\)$")


def fallback_folder(err, command, option="--out"):
    assert len(err) == 1, err
    assert err[0].startswith(f"sdecor {command}: error: {option} ") and "No space left on device" in err[0], err
    m = FALLBACK.search(err[0])
    assert m, err
    folder = m.group(1)
    assert os.path.basename(folder).startswith(f"sdecor-{command}-") and os.path.isdir(folder)
    return folder, m.group(2).split(", ")


def test_train_results_survive_a_failing_write(tmp_path, capsys, monkeypatch, small_work):
    out = tmp_path / "run"
    fail_writes_into(monkeypatch, out)
    code, stdout, err = run_cli(capsys, RUNS["train"] + ["--out", str(out)])
    assert code == 1
    folder, names = fallback_folder(err, "train")
    assert sorted(names) == sorted(os.listdir(folder)) == ["metrics.json", "model.pt"]
    res = json.loads(open(os.path.join(folder, "metrics.json")).read())
    assert re.search(r"^test accuracy (\S+)$", stdout, re.M).group(1) == f"{res['test']['accuracy']:.4f}"
    state = torch.load(os.path.join(folder, "model.pt"))
    build_model("tiny", 1, 10).load_state_dict(state["state_dict"])
    assert not out.exists()                  # no half-written or temporary file; the empty folder removed
    assert "wrote" not in stdout


def test_train_results_printed_when_no_folder_takes_them(tmp_path, capsys, monkeypatch, small_work):
    fail_writes_into(monkeypatch, None)
    code, stdout, err = run_cli(capsys, RUNS["train"] + ["--out", str(tmp_path / "run")])
    assert code == 1 and len(err) == 1
    assert "nor into a temporary folder" in err[0] and "metrics.json follows on stdout" in err[0]
    printed = json.loads(stdout[stdout.index("\n{\n") + 1:])
    assert printed["config"]["epochs"] == 1 and 0.0 <= printed["test"]["accuracy"] <= 1.0
    assert re.search(r"^test accuracy (\S+)$", stdout, re.M).group(1) == f"{printed['test']['accuracy']:.4f}"


def test_demo_results_survive_a_failing_write(tmp_path, capsys, monkeypatch, small_work):
    out = tmp_path / "demo"
    fail_writes_into(monkeypatch, out)
    code, stdout, err = run_cli(capsys, RUNS["demo"] + ["--out", str(out)])
    assert code == 1
    folder, names = fallback_folder(err, "demo")
    assert sorted(os.listdir(folder)) == sorted(names) == sorted(demo.output_files(["digits"], figures=True))
    res = json.loads(open(os.path.join(folder, "results.json")).read())
    assert set(res["runs"]["digits"]) == {c[0] for c in demo.CONFIGS}
    assert open(os.path.join(folder, "masking_curves.png"), "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ce |" in open(os.path.join(folder, "report.md")).read()
    assert not out.exists()


def test_bench_results_survive_a_failing_write(tmp_path, capsys, monkeypatch, bench_leaves_malloc):
    out = tmp_path / "bench"
    fail_writes_into(monkeypatch, out)
    code, stdout, err = run_cli(capsys, RUNS["bench"] + ["--out", str(out)])
    assert code == 1 and "== eigh_small ==" in stdout
    # bench logs its settings and progress on stderr too; one line is the error
    folder, names = fallback_folder([line for line in err if "error:" in line], "bench")
    slug = bench_report.device_slug(torch.device("cpu"))
    assert sorted(os.listdir(folder)) == sorted(names) == sorted([f"{slug}.json", f"{slug}.csv",
                                                                   f"{slug}-eigh_small.png"])
    doc = json.loads(open(os.path.join(folder, f"{slug}.json")).read())
    assert {r["op"] for r in doc["results"]} == {"eigh_small"}
    assert not out.exists()
    # the saved file shows like any other
    assert cli.main(["bench", "--show", os.path.join(folder, f"{slug}.json")]) == 0
    assert "== eigh_small ==" in capsys.readouterr().out


def test_write_file_replaces_whole_or_not_at_all(tmp_path):
    (tmp_path / "f.json").write_text("old")
    with pytest.raises(TypeError):
        output.write_file(str(tmp_path), "f.json", object())             # fails after the file is opened
    assert os.listdir(tmp_path) == ["f.json"] and (tmp_path / "f.json").read_text() == "old"
    output.write_file(str(tmp_path), "f.json", b"new")
    assert os.listdir(tmp_path) == ["f.json"] and (tmp_path / "f.json").read_text() == "new"


def test_save_falls_back_then_prints(tmp_path, capsys, monkeypatch):
    out = output.OutputDir(str(tmp_path / "o"), command="test")
    out.prepare()
    files = {"a.json": b'{"a": 1}', "b.bin": b"\x00\x01"}
    assert out.save(files) == (str(tmp_path / "o"), True)
    assert sorted(os.listdir(tmp_path / "o")) == ["a.json", "b.bin"]
    fail_writes_into(monkeypatch, tmp_path / "o", errno.EIO)
    saved = out.save(files, show=("a.json",))
    assert sorted(os.listdir(tmp_path / "o")) == ["a.json", "b.bin"]    # the earlier files, untouched
    err = capsys.readouterr().err.splitlines()
    assert not saved.requested and len(err) == 1 and "cannot write a.json: Input/output error" in err[0]
    assert sorted(os.listdir(saved.folder)) == ["a.json", "b.bin"] and saved.folder in err[0]
    fail_writes_into(monkeypatch, None, errno.ENOSPC)
    assert out.save(files, show=("a.json",)) == (None, False)
    captured = capsys.readouterr()
    assert captured.out == '{"a": 1}\n' and "a.json follows on stdout" in captured.err
