"""``sdecor bench --suite choice-cpu``: the measurement behind the CPU choice table, on tiny shapes
(no timing assertions)."""

import ast

import pytest
import torch

import sdecor.cli.bench as bench
from sdecor import _backend, _cpu_choice, _ext
from sdecor.cli.bench import choice, harness

# every op of the table, one map with d in two columns, one image batch
TINY = choice.ChoiceConfig(maps=((4, 80, (3,)),), images=((3, 3, (4, 4)),), ds=(16, 40))


def _settings(**kw):
    return harness.Settings(**dict(dict(device="cpu", min_time=0.001, min_reps=1), **kw))


@pytest.fixture(scope="module")
def tiny_run():
    torch.manual_seed(0)
    return choice.run(_settings(), TINY, log=lambda msg: None)


def test_the_cases_are_the_tables_cells():
    cases = choice.cases(TINY)
    ops = {c.op for c in cases}
    assert ops == set(_cpu_choice.CHOICE)
    for c in cases:
        assert c.dtype in _cpu_choice.CHOICE[c.op]
        assert c.mode == {"group_cov": "fwdbwd", "group_whiten_train": "fwdbwd", "group_whiten_eval": "fwd",
                          "whitening_matrix": "fwdbwd", "topk_mask": "fwd"}[c.op]
    whitening = [c for c in cases if c.op != "topk_mask"]
    assert {(c.d, c.column) for c in whitening} == {(16, "d<=32"), (40, "d33-64")}
    assert {c.reduce for c in cases if c.op == "topk_mask"} == {"mean", None}
    assert {c.column for c in cases if c.op == "topk_mask"} == {"any d"}
    # the suite's own: both maps, every d that divides C, every dtype of the table
    full = choice.cases(choice.ChoiceConfig())
    assert {(c.N, c.C, c.S) for c in full if c.op == "group_whiten_train"} == {(32, 256, (28, 28)), (64, 128, (8, 8))}
    assert {c.d for c in full if c.C == 128} == {8, 16, 32, 64, 128}
    assert {c.d for c in full if c.C == 256} == {8, 16, 32, 64, 128, 256}
    assert {c.dtype for c in full if c.op == "group_cov"} == {"float32", "float64", "bfloat16", "float16"}
    assert {c.dtype for c in full if c.op == "whitening_matrix"} == {"float32", "float64"}
    assert len(choice.cases(choice.QUICK)) < len(full)


@pytest.mark.skipif(not _ext.available(), reason="the native extension is not built")
def test_both_backends_are_checked_then_timed(tiny_run):
    assert len(tiny_run) == 2 * len(choice.cases(TINY))
    for r in tiny_run:
        assert r["op"] == choice.OP and r["backend"] in ("native", "torch") and r["impl"] == f"sdecor[{r['backend']}]"
        assert r["status"] == "ok" and r["time_ms"] > 0 and r["checked"] and r["err_ratio"] <= 1.0, r
    m = choice.measured(tiny_run)
    assert set(m) == {(c.op, c.dtype, c.column) for c in choice.cases(TINY)}
    for cell in m.values():
        assert cell["choice"] == ("native" if cell["ratio"] < 1 else "torch") and cell["cases"] >= 1


def test_a_backend_that_disagrees_is_not_timed(monkeypatch):
    case = choice.Case("group_cov", 4, 16, (3,), 8, "float32")
    real = choice.call

    def wrong(case, inp, generator=None):
        outs = real(case, inp, generator)
        return (outs[0] + 1.0, outs[1]) if _backend.forced() == "torch" else outs
    monkeypatch.setattr(choice, "call", wrong)
    rs = choice.run_case(_settings(), case, log=lambda msg: None)
    by = {r["backend"]: r for r in rs}
    assert by["torch"]["status"] == "MISMATCH" and by["torch"]["time_ms"] is None
    assert "disagrees with the reference at output 0" in by["torch"]["reason"]


def test_without_the_extension_native_is_skipped(monkeypatch):
    monkeypatch.setattr(_ext, "error", lambda: "the native extension sdecor._C is not available (x)")
    rs = choice.run_case(_settings(), choice.Case("topk_mask", 2, 3, (4, 4), None, "float32", "mean"),
                         log=lambda msg: None)
    by = {r["backend"]: r for r in rs}
    assert by["native"]["status"] == "skipped" and "not available" in by["native"]["reason"]
    assert by["torch"]["status"] == "ok"
    assert choice.measured(rs) == {}


def test_a_backend_is_not_run_above_the_largest_d_it_takes():
    rs = choice.run_case(_settings(), choice.Case("whitening_matrix", 2, 136, (), 136, "float32"), log=lambda msg: None)
    by = {r["backend"]: r for r in rs}
    assert by["native"]["status"] == "skipped" and by["native"]["time_ms"] is None
    assert by["native"]["reason"] in ("the native backend of whitening_matrix takes d <= 128", _ext.error())
    assert by["torch"]["status"] == "ok"


def _fake(op, dtype, column, native_ms, torch_ms, shape):
    return [dict(op=choice.OP, status="ok", dtype=dtype, shape=shape, backend=b, time_ms=t,
                 params=dict(op=op, column=column)) for b, t in (("native", native_ms), ("torch", torch_ms))]


def test_the_measured_cell_is_the_median_of_the_ratios():
    rs = _fake("group_cov", "float32", "d<=32", 1.0, 4.0, "a") + _fake("group_cov", "float32", "d<=32", 2.0, 0.5, "b")
    cell = choice.measured(rs)[("group_cov", "float32", "d<=32")]
    assert cell["ratio"] == pytest.approx(1.0) and cell["choice"] == "torch"       # sqrt(0.25 * 4): not below 1
    rs += _fake("group_cov", "float32", "d<=32", 1.0, 2.0, "c")
    cell = choice.measured(rs)[("group_cov", "float32", "d<=32")]
    assert cell["cases"] == 3 and cell["choice"] == "native" and cell["ratio"] == pytest.approx(0.5)
    # two cases slowed 20x by other work do not turn a cell where native wins the other three
    rs = [r for i, s in enumerate("abcde") for r in _fake("group_cov", "float32", "d<=32",
                                                           1.0 if i < 3 else 10.0, 2.0 if i < 3 else 1.0, s)]
    cell = choice.measured(rs)[("group_cov", "float32", "d<=32")]
    assert cell["cases"] == 5 and cell["choice"] == "native" and cell["ratio"] == pytest.approx(0.5)


def test_the_printed_tables_flag_the_cells_that_differ(monkeypatch):
    monkeypatch.setattr(_cpu_choice, "CHOICE", {"group_cov": {"float32": ("native", "torch", "native", "native")},
                                                "topk_mask": {"float32": "native"}})
    rs = (_fake("group_cov", "float32", "d<=32", 3.0, 1.0, "a") + _fake("group_cov", "float32", "d33-64", 3.0, 1.0, "b")
          + _fake("topk_mask", "float32", "any d", 1.0, 2.0, "c"))
    for r in rs:
        r.update(shape_desc=r["shape"], mode="fwd", reason="")
    text = choice.format_choice(rs)
    rows = {tuple(line.split()[:3]): line.split() for line in text.splitlines() if line.startswith(("group_cov ", "topk_mask "))}
    assert rows[("group_cov", "float32", "d<=32")][3:] == ["1", "3.00x", "torch", "native", "DIFFERS"]
    assert rows[("group_cov", "float32", "d33-64")][3:] == ["1", "3.00x", "torch", "torch"]
    assert rows[("group_cov", "float32", "d65-128")][3:] == ["-", "-", "not", "measured", "native"]
    assert rows[("topk_mask", "float32", "any")][3:] == ["d", "1", "0.50x", "native", "native"]
    assert "1 cell(s) of the table differ from this measurement" in text
    # the literal: the measured choices, the current ones where a cell was not measured
    lit = text[text.index("CHOICE = {"):]
    assert ast.literal_eval(lit.split("=", 1)[1].strip()) == {
        "group_cov": {"float32": ("torch", "torch", "native", "native")}, "topk_mask": {"float32": "native"}}


def test_the_literal_of_the_current_table_is_the_table():
    text = choice.literal({})
    assert ast.literal_eval(text.split("=", 1)[1].strip()) == _cpu_choice.CHOICE


def test_the_suite_from_the_command_line(monkeypatch, capsys):
    seen, real_run = {}, choice.run

    def fake_run(settings, *args, **kwargs):
        seen["settings"] = settings
        return real_run(settings, choice.ChoiceConfig(maps=((4, 16, (3,)),), images=(), ds=(8,), dtypes=("float32",),
                                                      ops=("group_cov", "topk_mask")), log=lambda msg: None)

    monkeypatch.setattr(choice, "run", fake_run)
    rc = bench.main(["--suite", "choice-cpu", "--device", "cpu", "--threads", "1", "--reps", "1", "--min-time", "0.001",
                     "--no-save"])
    out = capsys.readouterr().out
    assert rc == 0 and seen["settings"].suites == ("choice-cpu",) and seen["settings"].min_reps == 1
    assert "== cpu_choice: native against torch per case (median ms) ==" in out
    assert "group_cov 4x16x3 d8" in out and "== cpu_choice: measured table beside" in out and "CHOICE = {" in out
    assert bench.main(["--list", "--suite", "choice-cpu", "--device", "cpu"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == len(choice.cases(choice.ChoiceConfig()))
    assert all(line.split()[0] == choice.OP for line in listed)
    assert bench.main(["--list", "--suite", "choice-cpu", "--quick", "--device", "cpu"]) == 0
    assert sum(line.startswith(choice.OP) for line in capsys.readouterr().out.splitlines()) == \
        len(choice.cases(choice.QUICK))


def test_the_suite_runs_on_the_cpu_only(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.main(["--suite", "choice-cpu", "--no-save"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["sdecor bench: error: --suite choice-cpu measures the CPU backends; add --device cpu"]
    with pytest.raises(ValueError, match="measures CPU backends"):
        choice.run(_settings(device="cuda"), TINY)
