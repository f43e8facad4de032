"""Every option of every command, walked from the parser (sdecor.cli.build_parser), with bad values:
each stops before any work with exit code 2 and one line naming the option, and no traceback.

A new option cannot be missed: every option is walked by what it takes, and one that fits no kind
fails test_every_option_is_walked until it is added here. Numeric options must have a range in their
command's ``NUMBERS`` table, and their bad values come from it (nan, inf, -inf, just below the
lowest value, just above the highest); flags get a value they do not take, choices a value not among
them, output folders paths that cannot be written, input files and folders bad ones, and the other
string options the bad values of STRINGS. Everything runs in this process (sdecor.cli.main), with
the commands' work replaced by stubs that fail the test if reached; a few subprocesses show what
reaches the terminal.
"""

import argparse
import errno
import importlib
import math
import os
import subprocess
import sys

import pytest

from sdecor import cli
from sdecor.cli import options

from sdecor.cli import output, train

from test_cli_output import no_work, run_cli  # noqa: F401  (no_work is a fixture)


def subparsers() -> dict:
    """command -> its argparse parser, every command's options added."""
    parser = cli.build_parser([])
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def command_module(command: str):
    return importlib.import_module(cli.COMMANDS[command][0])


def option_actions(command: str) -> list:
    return [a for a in subparsers()[command]._actions if a.option_strings and a.dest != "help"]


def numeric_actions() -> list:
    return [(c, a) for c in sorted(cli.COMMANDS) for a in option_actions(c) if a.type in (int, float)]


# what every command needs around the option under test: a folder to write into that must stay
# unmade, and for demo the cheap mode
BASE = {"train": ["--no-progress"], "demo": ["--quick", "--no-progress"], "bench": [], "info": [],
        "inspect": ["no-such-checkpoint.pt"]}
WRITES = ("train", "demo", "bench")


def run_bad(capsys, tmp_path, command, argv):
    out = tmp_path / "out"
    given = any(a == "--out" or a.startswith("--out=") for a in argv)
    extra = ["--out", str(out)] if command in WRITES and not given else []
    code, stdout, err = run_cli(capsys, [command, *BASE[command], *argv, *extra])
    assert not out.exists()
    return code, stdout, err


def assert_one_line(err, command, option, starts=True):
    """exit 2's message: one line that names the command and the option (``starts``: first)."""
    assert len(err) == 1 and err[0].startswith(f"sdecor {command}: error: "), err
    assert err[0].startswith(f"sdecor {command}: error: {option}") if starts else option in err[0], err


# ---------------------------------------------------------------------------------------------------
# numbers


def test_every_numeric_option_has_a_range():
    seen = set()
    for command, action in numeric_actions():
        numbers = getattr(command_module(command), "NUMBERS", {})
        assert action.dest in numbers, f"sdecor {command} {action.option_strings[0]}: no range in NUMBERS"
        seen.add((command, action.dest))
    for command in cli.COMMANDS:                                   # and no range of an option that went
        for dest in getattr(command_module(command), "NUMBERS", {}):
            assert (command, dest) in seen, f"sdecor {command}: NUMBERS has {dest!r}, no such numeric option"
    assert len(seen) >= 15


def bad_numbers(rng: options.Number, kind) -> list:
    """(text, parsed by argparse?) of every bad value of a range."""
    out = [("nan", kind is float), ("inf", kind is float), ("-inf", kind is float), ("1e400", kind is float),
           ("x", False)]
    below = rng.lo if rng.lo_open else (rng.lo - 1 if kind is int else rng.lo - max(1e-6, abs(rng.lo) * 1e-6))
    out.append((repr(below) if kind is float else str(int(below)), True))
    if math.isfinite(rng.hi):
        above = rng.hi + 1 if kind is int else rng.hi * (1 + 1e-6)
        out.append((repr(above) if kind is float else str(int(above)), True))
    return out


NUMERIC_CASES = [
    pytest.param(command, action.option_strings[0], text, parsed,
                 id=f"{command} {action.option_strings[0]} {text}")
    for command, action in numeric_actions()
    for text, parsed in bad_numbers(command_module(command).NUMBERS[action.dest], action.type)
]


@pytest.mark.parametrize("command, option, text, parsed", NUMERIC_CASES)
def test_bad_numbers_stop_before_any_work(tmp_path, capsys, no_work, command, option, text, parsed):  # noqa: F811
    code, stdout, err = run_bad(capsys, tmp_path, command, [f"{option}={text}"])   # "=": -inf is a value
    assert code == 2 and no_work == [] and "Traceback" not in stdout
    assert_one_line(err, command, option)
    if not parsed:                                                     # argparse's own, in one line too
        assert f"(see sdecor {command} --help)" in err[0]


@pytest.mark.parametrize("command, option", [(c, a.option_strings[0]) for c, a in numeric_actions()],
                         ids=lambda v: v)
def test_the_ends_of_each_range_pass_the_checks(command, option):
    """The lowest and the highest value of each range are accepted by the checks themselves."""
    parser = subparsers()[command]
    action = next(a for a in option_actions(command) if a.option_strings[0] == option)
    rng = command_module(command).NUMBERS[action.dest]
    low = rng.lo + (1 if action.type is int else 1e-3) if rng.lo_open else rng.lo
    for value in [low] + ([rng.hi] if math.isfinite(rng.hi) else [10 ** 6]):
        args = parser.parse_args([*BASE[command], option, str(action.type(value))])
        options.check_numbers(args, {action.dest: rng})


def test_min_time_inf_returns_at_once():
    """The run that never returned: a subprocess, to see what reaches the terminal."""
    proc = subprocess.run([sys.executable, "-m", "sdecor", "bench", "--min-time", "inf"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.splitlines() == ["sdecor bench: error: --min-time must be > 0 and <= 3600 (seconds of "
                                        "timed calls per path and mode); got inf"]


def test_bench_group_sizes_are_checked(tmp_path, capsys, no_work):  # noqa: F811
    for text, words in [("0", "each value must be >= 1"), ("16,2048", "got 2048"), ("x", "'x' is not an integer"),
                        (",", "--d is empty")]:
        code, _, err = run_bad(capsys, tmp_path, "bench", ["--static", "--d", text])
        assert code == 2 and no_work == [] and words in err[-1]
        assert_one_line(err, "bench", "--d")


# ---------------------------------------------------------------------------------------------------
# every option, by what it takes


# paths of folders a command writes into
OUTPUTS = {("train", "--out"), ("demo", "--out"), ("bench", "--out"), ("inspect", "--out")}
# files and folders a command reads (the bad contents themselves: tests/test_cli_input_files.py)
INPUTS = {("bench", "--show"): "file", ("train", "--data-root"): "folder"}
# the other options that take a string, and values each must refuse
STRINGS = {
    ("train", "--device"): ["bogus", "cuda:99", "", "meta"],
    ("train", "--amp"): ["fp8", "", "BF16"],
    ("inspect", "--device"): ["bogus", "cuda:99", ""],
    ("inspect", "--json"): ["/proc/x", "/proc/x/y", "", "/"],
    ("inspect", "--data-root"): ["/proc/self/status", "/no-such-sdecor-data-root", ""],
    ("demo", "--device"): ["bogus", "cuda:99", ""],
    ("demo", "--amp"): ["fp8", ""],
    ("demo", "--datasets"): ["cifar10", "digits,mnist", ",", ""],
    ("bench", "--ops"): ["nope", "group_cov,nope", ",", ""],
    ("bench", "--shapes"): ["no-such-shape", "resnet18,no-such*", ",", ""],
    ("bench", "--suite"): ["nope", ""],
    ("bench", "--dtypes"): ["fp8", "int8", ""],
    ("bench", "--modes"): ["sideways", ""],
    ("bench", "--backends"): ["cuda", "nope", ""],
    ("bench", "--baselines"): ["nope", ""],
    ("bench", "--arch"): ["75", "x", ""],
    ("bench", "--d"): ["0", "-4", "x", "16,,1e9", ""],
    ("bench", "--kernels"): ["nope", "stats,nope", ""],
}
# options that legitimately take any value (none today): each with the reason, as a comment
ANY_VALUE: set = set()


def kind_of(command: str, action) -> str:
    option = action.option_strings[0]
    if action.nargs == 0:
        return "flag"
    if action.type in (int, float):
        return "number"
    if action.choices is not None:
        return "choice"
    for kind, table in (("output", OUTPUTS), ("input", INPUTS), ("string", STRINGS), ("any", ANY_VALUE)):
        if (command, option) in table:
            return kind
    return "unknown"


def all_options() -> list:
    return [(c, a) for c in sorted(cli.COMMANDS) for a in option_actions(c)]


def test_every_option_is_walked():
    unknown = [f"sdecor {c} {a.option_strings[0]}" for c, a in all_options() if kind_of(c, a) == "unknown"]
    assert unknown == [], f"options no test walks: add them to OUTPUTS, INPUTS, STRINGS or ANY_VALUE: {unknown}"
    named = {(c, a.option_strings[0]) for c, a in all_options()}
    for table in (OUTPUTS, INPUTS, STRINGS, ANY_VALUE):               # no entry for an option that went
        assert set(table) <= named, set(table) - named
    kinds = {kind_of(c, a) for c, a in all_options()}
    assert {"flag", "number", "choice", "output", "input", "string"} <= kinds


FLAG_CASES = [pytest.param(c, a.option_strings[0], id=f"{c} {a.option_strings[0]}")
              for c, a in all_options() if kind_of(c, a) == "flag" and a.dest != "help"]


@pytest.mark.parametrize("command, option", FLAG_CASES)
def test_flags_take_no_value(tmp_path, capsys, no_work, command, option):  # noqa: F811
    code, _, err = run_bad(capsys, tmp_path, command, [f"{option}=yes"])
    assert code == 2 and no_work == []
    assert_one_line(err, command, option)


CHOICE_CASES = [pytest.param(c, a.option_strings[0], id=f"{c} {a.option_strings[0]}")
                for c, a in all_options() if kind_of(c, a) == "choice"]


@pytest.mark.parametrize("command, option", CHOICE_CASES)
def test_choices_refuse_other_values(tmp_path, capsys, no_work, command, option):  # noqa: F811
    for value in ("bogus", ""):
        code, _, err = run_bad(capsys, tmp_path, command, [f"{option}={value}"])
        assert code == 2 and no_work == []
        assert_one_line(err, command, option)
        assert "invalid choice" in err[0]


STRING_CASES = [pytest.param(c, o, v, id=f"{c} {o} {v!r}") for (c, o), values in sorted(STRINGS.items())
                for v in values]


@pytest.mark.parametrize("command, option, value", STRING_CASES)
def test_strings_refuse_bad_values(tmp_path, capsys, no_work, command, option, value):  # noqa: F811
    code, stdout, err = run_bad(capsys, tmp_path, command, [f"{option}={value}"])
    assert code == 2 and no_work == [] and "Traceback" not in stdout
    assert_one_line(err, command, option, starts=False)


def bad_outputs(tmp_path):
    """name -> a path no command can write into (made under tmp_path where it needs a file)."""
    (tmp_path / "file").write_text("keep")
    return {"proc": "/proc/x", "proc-deep": "/proc/x/y", "file": str(tmp_path / "file"),
            "under-file": str(tmp_path / "file" / "x"), "empty": "", "read-only": str(tmp_path / "ro")}


OUTPUT_CASES = [pytest.param(c, o, name, id=f"{c} {o} {name}") for c, o in sorted(OUTPUTS)
                for name in ("proc", "proc-deep", "file", "under-file", "empty", "read-only")]


@pytest.mark.parametrize("command, option, where", OUTPUT_CASES)
def test_outputs_refuse_unwritable_paths(tmp_path, capsys, monkeypatch, no_work, command, option, where):  # noqa: F811
    path = bad_outputs(tmp_path)[where]
    if where == "read-only":                    # root writes anywhere: the probe write is made to fail
        def refuse(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), folder)
        monkeypatch.setattr(output, "probe_writable", refuse)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run_bad(capsys, tmp_path, command, [f"{option}={path}"])
    assert code == 2 and no_work == [] and "Traceback" not in stdout
    assert_one_line(err, command, option)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "file").read_text() == "keep"


@pytest.fixture
def no_training(monkeypatch):
    """Reading the input is the check here; training or timing on it is not allowed."""
    from sdecor.cli import demo
    from sdecor.cli.bench import harness

    for module, name in ((train, "train_model"), (demo, "train_model"), (harness, "run")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("worked on a bad input"))


def bad_inputs(tmp_path, kind):
    (tmp_path / "empty-file").write_text("")
    (tmp_path / "garbage-file").write_bytes(b"\x00\xffgarbage")
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "garbage-folder" / "MNIST" / "raw").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / "garbage-folder" / "MNIST" / "raw" / name).write_bytes(b"garbage" * 20)
    common = {"missing": str(tmp_path / "missing"), "empty-path": ""}
    if kind == "file":
        return dict(common, folder=str(tmp_path / "empty-folder"), empty=str(tmp_path / "empty-file"),
                    garbage=str(tmp_path / "garbage-file"))
    return dict(common, file=str(tmp_path / "garbage-file"), empty=str(tmp_path / "empty-folder"),
                garbage=str(tmp_path / "garbage-folder"))


INPUT_CASES = [pytest.param(c, o, name, id=f"{c} {o} {name}") for (c, o), kind in sorted(INPUTS.items())
               for name in ("missing", "empty-path", "empty", "garbage", "folder" if kind == "file" else "file")]


@pytest.mark.parametrize("command, option, what", INPUT_CASES)
def test_inputs_refuse_bad_files(tmp_path, capsys, no_training, command, option, what):
    path = bad_inputs(tmp_path, INPUTS[(command, option)])[what]
    argv = [f"{option}={path}"] + (["--dataset", "mnist"] if option == "--data-root" else [])
    code, stdout, err = run_bad(capsys, tmp_path, command, argv)
    assert code == 2 and "Traceback" not in stdout
    assert_one_line(err, command, option, starts=False)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_unknown_options_and_missing_values(capsys, command):
    positional = [a for a in BASE[command] if not a.startswith("-")]      # inspect's CHECKPOINT
    code, _, err = run_cli(capsys, [command, *positional, "--no-such-option"])
    assert code == 2 and err == [f"sdecor: error: unrecognized arguments: --no-such-option (see sdecor --help)"]
    for c, action in all_options():
        if c == command and kind_of(c, action) not in ("flag",):
            code, _, err = run_cli(capsys, [command, action.option_strings[0]])      # the value left out
            assert code == 2 and len(err) == 1 and "expected one argument" in err[0], err
            assert err[0].startswith(f"sdecor {command}: error: {action.option_strings[0]}: "), err
    code, _, err = run_cli(capsys, [])
    assert code == 2 and err == ["sdecor: error: the following arguments are required: command (see sdecor --help)"]


# ---------------------------------------------------------------------------------------------------
# what reaches the terminal


@pytest.mark.parametrize("argv, start", [
    (["train", "--out", "/proc/x", "--no-progress"], "sdecor train: error: --out: cannot create /proc/x"),
    (["train", "--epochs", "nan"], "sdecor train: error: --epochs: invalid int value: 'nan'"),
    (["bench", "--show", "/proc/self/status"], "sdecor bench: error: --show /proc/self/status: not a results file: "
                                               "it is not JSON"),
], ids=["out-proc", "argparse-type", "show-not-json"])
def test_one_line_and_no_traceback_in_a_subprocess(tmp_path, argv, start):
    proc = subprocess.run([sys.executable, "-m", "sdecor", *argv], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start) and "Traceback" not in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []
