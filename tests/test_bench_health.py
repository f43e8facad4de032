"""The health-cpu cost case (python -m sdecor.cli.bench.health): it runs and reports the ratio."""

import json

import pytest
import torch

from sdecor.cli.bench import health
from sdecor.nn import GroupWhitening


def test_measure_reports_the_ratio_and_target():
    # a small stand-in for the case's resnet18: the timing and the fields, not the numbers
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), GroupWhitening(16, 8), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 32, 3), GroupWhitening(32, 16))
    doc = health.measure(case=(model, torch.rand(8, 3, 12, 12)), min_time=0.01, reps=1)
    assert doc["suite"] == "health-cpu" and doc["layers"] == 2 and doc["target"] == 3.0
    assert doc["case"] == "Sequential, input 8x3x12x12"
    assert doc["ms"]["report"] > 0 and doc["ms"]["forward"] > 0
    assert doc["ratio"] == pytest.approx(doc["ms"]["report"] / doc["ms"]["forward"])
    assert doc["met"] == (doc["ratio"] <= 3.0)
    assert 1 <= doc["t_needed_max"] <= 101


def test_main_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(health, "measure", lambda **kw: dict(
        suite="health-cpu", case="c", layers=20, t_needed_max=9, ms={"report": 2.0, "forward": 1.0},
        p20_p80_ms={}, reps={"report": 3, "forward": 3}, ratio=2.0, target=3.0, met=True))
    out = tmp_path / "h.json"
    threads = torch.get_num_threads()
    try:
        assert health.main(["--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "2.00x" in text and "<= 3x met" in text
    doc = json.loads(out.read_text())
    assert doc["ratio"] == 2.0 and doc["environment"]["torch_threads"] == 1


@pytest.mark.parametrize("argv", [["--reps", "0"], ["--min-time", "0"], ["--batch", "1"], ["--threads", "0"]])
def test_main_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        health.main(argv)
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err
