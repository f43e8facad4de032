"""``sdecor inspect`` on a checkpoint of ``sdecor train``, and ``sdecor train --report-every``.

One digits run of one epoch with whitening layers (the CLI, in-process) is shared by the tests: its
checkpoint is inspected, and what the command writes is compared with :func:`sdecor.whitening_report`
of the same model, rebuilt here from the checkpoint, on the same batch.
"""

import contextlib
import io
import json
import math
import os

import pytest
import torch

import sdecor
from sdecor import cli
from sdecor.cli import data, train
from sdecor.cli import inspect as inspect_cli
from sdecor.cli.models import build_model
from sdecor.nn import GroupWhitening


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """sdecor train --dataset digits --epochs 1 --norm whitening --report-every 1 --out DIR, and its stdout."""
    out = tmp_path_factory.mktemp("run")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main(["train", "--dataset", "digits", "--epochs", "1", "--norm", "whitening", "--eval-samples", "8",
                       "--no-progress", "--report-every", "1", "--out", str(out)])
    assert rc == 0
    return out, stdout.getvalue()


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def _model(checkpoint, dataset):
    """The model of a checkpoint, built here as sdecor train builds it."""
    ck = torch.load(checkpoint, weights_only=True)
    cfg = ck["config"]
    norm = "whitening" if cfg["norm"] == "whitening" or cfg["lambda_decor"] > 0 else "batch"
    model = build_model(cfg["model"], dataset.in_channels, dataset.num_classes, norm=norm,
                        num_channels=cfg["num_channels"], width=cfg.get("width"))
    model.load_state_dict(ck["state_dict"])
    return model, cfg


def _inspect(capsys, *argv):
    try:
        rc = cli.main(["inspect", *map(str, argv)])
    except SystemExit as exc:                        # argparse's own errors (a value of the wrong type)
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_registers_inspect():
    assert cli.COMMANDS["inspect"][0] == "sdecor.cli.inspect"
    args = cli.build_parser(["inspect"]).parse_args(["inspect", "model.pt", "--batches", "2"])
    assert args.checkpoint == "model.pt" and args.batches == 2 and args._run is inspect_cli.run


def test_help_defines_the_batch():
    parser = cli.build_parser(["inspect"])
    sub = next(a for a in parser._actions if a.dest == "command").choices["inspect"]
    text = " ".join(sub.format_help().split())
    assert "first N x (the run's --batch-size) images of the split, taken as one batch" in text


def test_json_equals_the_api_report(run_dir, digits, tmp_path, capsys):
    out, _ = run_dir
    target = tmp_path / "new" / "folder" / "report.json"              # created by the command
    rc, stdout, err = _inspect(capsys, out / "model.pt", "--json", target)
    assert rc == 0, err
    written = sdecor.WhiteningReport.from_json(target.read_text())
    model, cfg = _model(out / "model.pt", digits)
    expected = sdecor.whitening_report(model, digits.train.x[:cfg["batch_size"]])
    assert written == expected
    assert [r.name for r in written] == ["features.0.1", "features.2.1", "features.4.1"]
    # the table: one row per layer, as the report prints it, and the summary lines
    assert str(expected) in stdout
    for r in expected:
        row = next(line for line in stdout.splitlines() if line.startswith(r.name + " "))
        assert f"{float(r.condition.max()):.3g}" in row and f"{float(r.whitening_error.max()):.3g}" in row
    assert "the first 64 images of the train split of digits (1 x batch size 64" in stdout
    assert "more Newton-Schulz steps than T needed for error < 0.001:" in stdout
    assert "covariance eigenvalues below eps" in stdout
    assert f"wrote {target}" in stdout


@pytest.mark.parametrize("batches, split", [(3, "train"), (2, "test")])
def test_batches_and_split(run_dir, digits, tmp_path, capsys, batches, split):
    out, _ = run_dir
    target = tmp_path / "r.json"
    rc, stdout, err = _inspect(capsys, out / "model.pt", "--batches", batches, "--split", split, "--tol", "1e-4",
                               "--json", target)
    assert rc == 0, err
    written = sdecor.WhiteningReport.from_json(target.read_text())
    model, cfg = _model(out / "model.pt", digits)
    images = (digits.train if split == "train" else digits.test).x
    n = batches * cfg["batch_size"]
    assert written == sdecor.whitening_report(model, images[:n], tol=1e-4)
    assert written != sdecor.whitening_report(model, images[:cfg["batch_size"]], tol=1e-4)
    assert f"the first {n} images of the {split} split of digits ({batches} x batch size 64" in stdout


def test_figure(run_dir, digits, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the figure of --out needs matplotlib")
    out, _ = run_dir
    rc, stdout, err = _inspect(capsys, out / "model.pt", "--out", tmp_path / "fig")
    assert rc == 0, err
    png = tmp_path / "fig" / inspect_cli.FIGURE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the figure's data: per layer the error of T = 1..30 steps, whose first value below tol is the
    # layer's largest t_needed, and the spectrum of its worst group, descending
    model, cfg = _model(out / "model.pt", digits)
    x = digits.train.x[:cfg["batch_size"]]
    report = sdecor.whitening_report(model, x)
    curves = inspect_cli.layer_curves(model, x, report)
    assert [c.name for c in curves] == [r.name for r in report]
    for c, r in zip(curves, report):
        assert c.errors.shape == (inspect_cli.MAX_T,)
        below = (c.errors < report.tol).nonzero()
        assert below[0].item() + 1 == int(r.t_needed.max())
        assert c.group == int(r.whitening_error.argmax())
        assert c.eigenvalues.shape == (r.group_sizes[c.group],)
        assert bool((c.eigenvalues[:-1] >= c.eigenvalues[1:]).all())
    assert report == sdecor.whitening_report(model, x)                # layer_curves changed nothing


def test_report_every_logs_the_worst_group(run_dir, digits):
    out, stdout = run_dir
    record = json.loads((out / "metrics.json").read_text())
    (entry,) = record["whitening"]
    # the entry of epoch 1 is the worst group of the trained model's report on the first training batch
    model, cfg = _model(out / "model.pt", digits)
    worst = sdecor.whitening_report(model, digits.train.x[:cfg["batch_size"]]).worst()
    g = worst.group
    assert entry == {"epoch": 1, "layer": worst.record.name, "group": g, "whitening_error": worst.value,
                     "running_error": float(worst.record.running_error[g]),
                     "condition": float(worst.record.condition[g]), "t_needed": int(worst.record.t_needed[g]),
                     "T": 5}
    line = next(line for line in stdout.splitlines() if line.startswith("epoch 1: worst whitening layer"))
    assert f"{worst.record.name} group {g}: error {worst.value:.3g}" in line and "(T=5)" in line


def _train_args(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("argv, match", [
    (("--report-every", "-1", "--norm", "whitening"), "--report-every must be >= 0"),
    (("--report-every", "2"), "--report-every reports on whitening layers"),
])
def test_train_report_every_bad(argv, match):
    with pytest.raises(train.UsageError, match=match):
        train.check_args(_train_args(*argv))


def test_train_report_every_with_decorrelation_passes():
    cfg = train.check_args(_train_args("--report-every", "2", "--lambda-decor", "0.1"))
    assert cfg.resolved_norm() == "whitening"


def test_old_checkpoint_without_later_fields(run_dir, digits, tmp_path, capsys):
    out, _ = run_dir
    ck = torch.load(out / "model.pt", weights_only=True)
    for key in ("amp", "width"):                                      # fields that later versions added
        del ck["config"][key]
    torch.save(ck, tmp_path / "old.pt")
    rc, _, err = _inspect(capsys, tmp_path / "old.pt", "--json", tmp_path / "r.json")
    assert rc == 0, err
    model, cfg = _model(out / "model.pt", digits)
    assert sdecor.WhiteningReport.from_json((tmp_path / "r.json").read_text()) == \
        sdecor.whitening_report(model, digits.train.x[:cfg["batch_size"]])


# ---------------------------------------------------------------------------------------------------
# bad input: one line, exit code 2, before any work


@pytest.fixture
def no_report(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the report ran after bad input")
    monkeypatch.setattr(inspect_cli, "whitening_report", refuse)


def _checkpoints(tmp, run_out):
    good = run_out / "model.pt"
    (tmp / "garbage.pt").write_bytes(b"not a checkpoint\n")
    (tmp / "empty.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, tmp / "other.pt")
    torch.save([1, 2], tmp / "list.pt")
    ck = torch.load(good, weights_only=True)
    torch.save({"config": {**ck["config"], "colour": "red"}, "state_dict": ck["state_dict"]}, tmp / "unknown.pt")
    torch.save({"config": {**ck["config"], "epochs": 0}, "state_dict": ck["state_dict"]}, tmp / "invalid.pt")
    narrow = build_model("tiny", 1, 10, norm="whitening", width=8)
    train.save_model(str(tmp / "mismatch.pt"), train.TrainConfig(norm="whitening"), narrow)
    train.save_model(str(tmp / "ce.pt"), train.TrainConfig(), build_model("tiny", 1, 10, norm="batch"))
    (tmp / "file").write_text("x")
    return good


@pytest.mark.parametrize("make_argv, words", [
    (lambda t, g: [t / "missing.pt"], ["CHECKPOINT: no such file"]),
    (lambda t, g: [t], ["is not a file"]),
    (lambda t, g: [t / "garbage.pt"], ["cannot be read as a PyTorch checkpoint", "not a PyTorch file"]),
    (lambda t, g: [t / "empty.pt"], ["cannot be read as a PyTorch checkpoint", "empty"]),
    (lambda t, g: [t / "other.pt"], ["is not a checkpoint of sdecor train", "got keys ['weights']"]),
    (lambda t, g: [t / "list.pt"], ["is not a checkpoint of sdecor train", "got list"]),
    (lambda t, g: [t / "unknown.pt"], ["fields this sdecor does not know: ['colour']"]),
    (lambda t, g: [t / "invalid.pt"], ["config is not valid", "epochs must be a positive int"]),
    (lambda t, g: [t / "mismatch.pt"], ["state_dict does not fit model tiny on digits"]),
    (lambda t, g: [t / "ce.pt"], ["has no whitening layer", "--norm whitening", "the demo's whiten configuration"]),
    (lambda t, g: [g, "--batches", "0"], ["--batches must be >= 1 and <= 100000", "; got 0"]),
    (lambda t, g: [g, "--batches", "-3"], ["--batches must be >= 1 and <= 100000", "; got -3"]),
    (lambda t, g: [g, "--batches", "inf"], ["--batches: invalid int value: 'inf'"]),
    (lambda t, g: [g, "--batches", "nan"], ["--batches: invalid int value: 'nan'"]),
    (lambda t, g: [g, "--batches", "1.5"], ["--batches: invalid int value: '1.5'"]),
    (lambda t, g: [g, "--batches", "22"], ["--batches: 22 x batch size 64 = 1408 images", "at most --batches 21"]),
    (lambda t, g: [g, "--split", "test", "--batches", "8"], ["of the test split of digits", "at most --batches 7"]),
    (lambda t, g: [g, "--tol", "0"], ["--tol must be a finite number > 0"]),
    (lambda t, g: [g, "--tol", "nan"], ["--tol must be a finite number > 0"]),
    (lambda t, g: [g, "--tol", "inf"], ["--tol must be a finite number > 0"]),
    (lambda t, g: [g, "--device", "gpu7"], ["--device:", "not a torch device"]),
    (lambda t, g: [g, "--json", "/proc/sdecor-x/report.json"], ["--json: cannot create /proc/sdecor-x"]),
    (lambda t, g: [g, "--json", "/proc/report.json"], ["--json: cannot write in /proc"]),
    (lambda t, g: [g, "--json", t / "file" / "sub" / "r.json"], ["--json: cannot create", "file is not a folder"]),
    (lambda t, g: [g, "--json", t], ["--json:", "is a folder; give a file path"]),
    (lambda t, g: [g, "--out", "/proc/sdecor-x"], ["--out: cannot create /proc/sdecor-x"]),
    (lambda t, g: [g, "--out", t / "file"], ["--out:", "file exists and is not a folder"]),
    (lambda t, g: [g, "--out", t / "file" / "fig"], ["--out: cannot create", "file is not a folder"]),
], ids=["missing", "folder", "garbage", "empty", "other-dict", "list", "unknown-field", "invalid-config",
        "state-mismatch", "batchnorm-model", "batches-0", "batches-negative", "batches-inf", "batches-nan",
        "batches-fraction", "batches-too-many", "batches-too-many-test", "tol-0", "tol-nan", "tol-inf", "device",
        "json-proc-folder", "json-proc", "json-under-file", "json-folder", "out-proc", "out-file",
        "out-under-file"])
def test_bad_input(run_dir, tmp_path, capsys, no_report, make_argv, words):
    good = _checkpoints(tmp_path, run_dir[0])
    before = sorted(os.listdir(tmp_path))
    rc, stdout, err = _inspect(capsys, *make_argv(tmp_path, good))
    assert rc == 2
    assert err.startswith("sdecor inspect: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and stdout == ""
    for w in words:
        assert w in err, (w, err)
    assert sorted(os.listdir(tmp_path)) == before                    # nothing made


def test_existing_json_file_is_replaced_and_output_locations_created(run_dir, tmp_path, capsys):
    target = tmp_path / "r.json"
    target.write_text("old")
    rc, _, err = _inspect(capsys, run_dir[0] / "model.pt", "--json", target)
    assert rc == 0, err
    assert sdecor.WhiteningReport.from_json(target.read_text()).tol == 1e-3
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".sdecor-write-test")]


def test_layer_curves_of_a_smaller_last_group():
    # a layer whose last group is smaller: its groups of each size are stepped together
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 20, 3), GroupWhitening(20, 8, last_group="smaller"))
    x = torch.randn(16, 3, 6, 6)
    report = sdecor.whitening_report(model, x)
    (curve,) = inspect_cli.layer_curves(model, x, report)
    assert report[0].group_sizes == (8, 8, 4)
    errs = [sdecor.health.newton_errors(s[None], 30)[:, 0] for s in _shifted_covariances(model, x)]
    # to float64 rounding: the covariances are summed in another order here; an error evaluates to
    # about u d cond(S) of noise (as in test_health)
    floor = 64 * 2.0 ** -53 * 8 * float(report[0].condition.max())
    assert torch.allclose(curve.errors, torch.stack(errs).amax(0), rtol=1e-9, atol=floor)
    assert bool((curve.errors[:8] > 1e3 * floor).all())            # the converging part is compared closely
    assert curve.eigenvalues.shape == (report[0].group_sizes[curve.group],)
    assert math.isfinite(float(curve.errors[-1]))


def _shifted_covariances(model, x):
    """Sigma_g + eps I of the whitening layer's input, one group at a time (health_reference)."""
    from sdecor import health_reference as hr

    with torch.no_grad():
        xin = model[0](x)
    layer = model[1]
    return [s + layer.eps * torch.eye(s.shape[0], dtype=torch.float64)
            for s in hr.group_covariances(xin, layer.num_channels, layer.last_group)]


def test_summary_names_the_layers_or_counts_them(run_dir, digits):
    out, _ = run_dir
    model, cfg = _model(out / "model.pt", digits)
    report = sdecor.whitening_report(model, digits.train.x[:cfg["batch_size"]])
    slow = [(int(r.t_needed.max()), r.name) for r in report if int(r.t_needed.max()) > r.T]
    lines = inspect_cli.summary(report)
    for t, name in slow:
        assert f"{name} ({t} > T=5)" in lines[0]
    if len(slow) > 1:
        short = inspect_cli.summary(report, most=1)[0]
        top = max(slow, key=lambda item: item[0])
        assert (f"{len(slow)} of 3 layers, {min(slow)[0]} to {top[0]} steps > T=5; the most: {top[1]} ({top[0]})"
                in short)
    first = report["features.0.1"]                  # 16 channels from a 3x3 conv of one input channel: rank <= 9
    assert float(first.eps_share.max()) == 7 / 16
    assert "features.0.1 (group 0: 7 of 16 below eps=1e-05)" in lines[1]
