"""Every option of every command, walked from the parser (sdecor.cli.build_parser), with bad values:
each stops before any work with exit code 2 and one line naming the option, and no traceback.

A new option cannot be missed: numeric options must have a range in their command's ``NUMBERS``
table, and the test generates their bad values from it (nan, inf, -inf, just below the lowest
value, just above the highest).
"""

import argparse
import importlib
import math
import subprocess
import sys

import pytest

from sdecor import cli
from sdecor.cli import options

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
BASE = {"train": ["--no-progress"], "demo": ["--quick", "--no-progress"], "bench": [], "info": []}
WRITES = ("train", "demo", "bench")


def run_bad(capsys, tmp_path, command, argv):
    out = tmp_path / "out"
    extra = ["--out", str(out)] if command in WRITES and "--out" not in argv else []
    code, stdout, err = run_cli(capsys, [command, *BASE[command], *argv, *extra])
    assert not out.exists()
    return code, stdout, err


def assert_one_line(err, command, option, ours=True):
    """exit 2's message: the last line names the command and the option; ours is the only line."""
    assert err and err[-1].startswith(f"sdecor {command}: error:") and option in err[-1], err
    if ours:
        assert len(err) == 1 and err[0].startswith(f"sdecor {command}: error: {option}"), err


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
    assert_one_line(err, command, option, ours=parsed)


@pytest.mark.parametrize("command, option", [(c, a.option_strings[0]) for c, a in numeric_actions()],
                         ids=lambda v: v)
def test_the_ends_of_each_range_pass_the_checks(command, option):
    """The lowest and the highest value of each range are accepted by the checks themselves."""
    parser = subparsers()[command]
    action = next(a for a in option_actions(command) if a.option_strings[0] == option)
    rng = command_module(command).NUMBERS[action.dest]
    low = rng.lo + (1 if action.type is int else 1e-3) if rng.lo_open else rng.lo
    for value in [low] + ([rng.hi] if math.isfinite(rng.hi) else [10 ** 6]):
        args = parser.parse_args([option, str(action.type(value))])
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
