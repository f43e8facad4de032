"""What every command's options share: :class:`UsageError`, the error of a bad option.

A command checks all of its options before any work; the first bad one raises :class:`UsageError`,
which the command prints as one line, ``sdecor <command>: error: --option: what is wrong``, and
exits with code 2. The errors argparse finds itself (an unknown option, a value that is not a number
or not one of the choices) look the same: :class:`Parser`.

Every numeric option of every command has a :class:`Number`, the values it takes, in its command's
``NUMBERS`` table (argparse dest -> Number): finite, and within bounds that keep a run from never
ending (``--min-time inf``), from starting thousands of threads or from overflowing what torch takes.
:func:`check_numbers` checks them all before any work.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line like the commands' own: ``sdecor train: error:
    --epochs: invalid int value: 'x' (see sdecor train --help)``, exit code 2."""

    def error(self, message: str):
        if message.startswith("argument "):               # "argument --epochs: ..." -> "--epochs: ..."
            message = message[len("argument "):]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def exit(self, status=0, message=None):
        if message:
            sys.stderr.write(message)
        raise SystemExit(status)


class UsageError(ValueError):
    """A bad command-line option: the one-line message starts with the option's name."""

    def __init__(self, option: str, message: str):
        super().__init__(message if message.startswith(option) else f"{option}: {message}")
        self.option = option


def option_name(field: str) -> str:
    """The option of a field or argparse dest: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


# The upper bounds below are not limits of the code: a value beyond them is a typo that would
# run for days, start thousands of threads or processes, or overflow what torch takes (int32
# thread counts, 64-bit seeds); each option's help and error say the bound.
MAX_THREADS = 1024
MAX_SEED = 2 ** 63 - 2                 # torch seeds are 64-bit; the objective's generator takes seed + 1


@dataclass(frozen=True)
class Number:
    """The values a numeric option takes: finite, ``lo <= value <= hi`` (``lo < value`` with
    ``lo_open``); ``hi`` may be inf (no upper bound but finiteness). ``unit`` is said in the error."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    unit: str = ""

    def text(self) -> str:
        def fmt(x):
            return str(x) if isinstance(x, int) else f"{x:g}"
        low = f"> {fmt(self.lo)}" if self.lo_open else f">= {fmt(self.lo)}"
        text = f"a finite number {low}" if math.isinf(self.hi) else f"{low} and <= {fmt(self.hi)}"
        return text + (f" ({self.unit})" if self.unit else "")

    def ok(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return (value > self.lo if self.lo_open else value >= self.lo) and value <= self.hi

    def check(self, option: str, value) -> None:
        """Raises :class:`UsageError` naming the option unless value is None or in range."""
        if value is not None and not self.ok(value):
            raise UsageError(option, f"{option} must be {self.text()}; got {value!r}")


def check_numbers(args, numbers: dict) -> None:
    """Every numeric option of a command against its :class:`Number` (``numbers``: argparse dest ->
    Number), before any work; raises :class:`UsageError` naming the first bad one."""
    for dest, rng in numbers.items():
        rng.check(option_name(dest), getattr(args, dest))


def int_list(option: str, text: str, rng: Number) -> tuple:
    """The comma-separated integers of an option like --d 16,64, each in ``rng``; UsageError else."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(option, f"{option} is empty")
    out = []
    for t in items:
        try:
            value = int(t)
        except ValueError:
            raise UsageError(option, f"{option}: {t!r} is not an integer") from None
        if not rng.ok(value):
            raise UsageError(option, f"{option}: each value must be {rng.text()}; got {value}")
        out.append(value)
    return tuple(dict.fromkeys(out))
