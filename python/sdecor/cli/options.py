"""What every command's options share: :class:`UsageError`, the error of a bad option.

A command checks all of its options before any work; the first bad one raises :class:`UsageError`,
which the command prints as one line, ``sdecor <command>: error: --option: what is wrong``, and
exits with code 2, as argparse does for the errors it finds itself.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A bad command-line option: the one-line message starts with the option's name."""

    def __init__(self, option: str, message: str):
        super().__init__(message if message.startswith(option) else f"{option}: {message}")
        self.option = option


def option_name(field: str) -> str:
    """The option of a field or argparse dest: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")
