"""``python -m sdecor demo --quick``: files written, every number finite and in range."""

import argparse
import json
import math

import pytest

from sdecor.cli import demo

UNIT_METRICS = ("accuracy", "gini", "entropy", "deletion_auc", "insertion_auc", "acc_masked")


def parse(*argv):
    parser = argparse.ArgumentParser(prog="sdecor demo")
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    code = demo.run(parse("--quick", "--no-progress", "--out", str(out)))
    return code, out


def test_demo_quick_writes_everything(quick_run, capsys):
    code, out = quick_run
    assert code == 0
    for name in ("report.md", "results.json", "saliency_digits.png", "saliency_shapes.png",
                 "masking_curves.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for cfg_name, *_ in demo.CONFIGS:
        assert f"| {cfg_name} |" in report
    assert "## Ablation" in report and "![masking_curves.png](masking_curves.png)" in report
    # the whitening layers and the decorrelation loss are separate rows of the ablation
    assert "| whiten |" in report and "`whiten` + whitening layers" in report
    for dataset in ("digits", "shapes"):
        assert f"- {dataset} whitening layers (ce->whiten): " in report
        assert f"- {dataset} decorrelation loss (whiten->decor): " in report
        assert f"- {dataset} decorrelation, layers + loss (ce->decor, mask->full): " in report
        assert f"- {dataset} masking (ce->mask, decor->full): " in report


def test_demo_quick_numbers_finite_and_in_range(quick_run):
    _, out = quick_run
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["mode"] == "quick" and res["meta"]["wall_seconds"] > 0
    assert set(res["runs"]) == {"digits", "shapes"}
    n_fractions = len(res["meta"]["fractions"])
    for dataset, per in res["runs"].items():
        assert set(per) == {c[0] for c in demo.CONFIGS}
        for cfg_name, runs in per.items():
            assert len(runs) == res["meta"]["seeds"] == 1
            for run in runs:
                keys = UNIT_METRICS + (("mask_mass_share",) if dataset == "shapes" else ())
                for key in keys:
                    v = run[key]
                    assert math.isfinite(v) and 0.0 <= v <= 1.0, (dataset, cfg_name, key, v)
                for key, curve in run["curves"].items():
                    assert len(curve) == n_fractions
                    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in curve), (key, curve)
                assert run["config"]["lambda_decor"] == dict((c[0], c[3]) for c in demo.CONFIGS)[cfg_name]
                assert all(math.isfinite(v) for h in run["history"] for v in h.values())
                assert run["config"]["norm"] == dict((c[0], c[4]) for c in demo.CONFIGS)[cfg_name]
            mean = res["summary"][dataset][cfg_name]["accuracy"]["mean"]
            assert mean == runs[0]["accuracy"]
        assert ("mask_mass_share" in per["ce"][0]) == (dataset == "shapes")
        # whiten: GroupWhitening layers without the decorrelation loss, beside ce / mask / decor / full
        assert set(res["summary"][dataset]) == {"ce", "mask", "whiten", "decor", "full"}
        whiten = per["whiten"][0]["config"]
        assert whiten["norm"] == "whitening" and whiten["lambda_decor"] == 0.0
        assert whiten["lambda_consistency"] == 0.0
        assert per["ce"][0]["config"]["norm"] == "batch" and per["decor"][0]["config"]["norm"] == "whitening"
    assert ["whiten", "+ whitening layers", 0.0, 0.0, "whitening"] in res["meta"]["configs"]


def test_demo_prints_table_and_output_folder(tmp_path, capsys):
    out = tmp_path / "digits-only"
    assert demo.run(parse("--quick", "--no-progress", "--no-figures", "--datasets", "digits",
                          "--out", str(out))) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "wall time" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("dataset"))
    rows = [line.split() for line in lines[header + 2: header + 2 + len(demo.CONFIGS)]]
    assert [r[:2] for r in rows] == [["digits", c[0]] for c in demo.CONFIGS]
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("argv, match", [
    (["--datasets", "cifar10"], "--datasets must be"),
    (["--seeds", "0"], "--seeds must be >= 1"),
])
def test_demo_rejects_bad_options(tmp_path, capsys, argv, match):
    assert demo.run(parse("--out", str(tmp_path / "x"), *argv)) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_summarize():
    s = demo.summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3
    assert demo.summarize([0.5])["std"] == 0.0
    assert demo.summarize([float("nan")])["n"] == 0


def test_demo_amp_reaches_every_run(tmp_path, monkeypatch, capsys):
    """--amp bf16 is passed to every training run (a tiny digits set keeps this fast) and reported."""
    from sdecor.cli import data

    def tiny(name, quick):
        ds = data.load_digits()
        return ds._replace(train=data.Split(ds.train.x[:64], ds.train.y[:64]),
                           test=data.Split(ds.test.x[:32], ds.test.y[:32]))

    monkeypatch.setattr(demo, "load_dataset", tiny)
    out = tmp_path / "out"
    assert demo.run(parse("--quick", "--datasets", "digits", "--no-figures", "--no-progress", "--amp", "bf16",
                          "--eval-samples", "8", "--out", str(out))) == 0
    assert "bf16 autocast" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["amp"] == "bf16"
    runs = [run for per in res["runs"].values() for rs in per.values() for run in rs]
    assert len(runs) == len(demo.CONFIGS) and all(run["config"]["amp"] == "bf16" for run in runs)
    assert all(math.isfinite(v) for run in runs for h in run["history"] for v in h.values())
    assert "training steps under bf16 autocast" in (out / "report.md").read_text()
