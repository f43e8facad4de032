"""Command line: ``python -m sdecor <command>`` (also the ``sdecor`` console script).

The applications built on the library: each command is a module of this package with
``add_arguments(parser)`` and ``run(args) -> int`` -- :mod:`.demo`, :mod:`.train`, :mod:`.inspect`, :mod:`.bench` --
beside the datasets and models they train (:mod:`.data`, :mod:`.models`); ``info`` is here. Nothing
in the library imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .._optional import MissingDependencyError
from .options import Parser

# command -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "info": ("sdecor.cli", "versions, available backends and the native extension's build"),
    "demo": ("sdecor.cli.demo", "the main job: SaliencyDecor ablation on embedded data, metrics and figures"),
    "train": ("sdecor.cli.train", "train a small CNN with the SaliencyDecor objective and report saliency metrics"),
    "bench": ("sdecor.cli.bench", "microbenchmarks of every op against its baselines (--static: GPU compile report)"),
    "inspect": ("sdecor.cli.inspect", "whitening health of a model that sdecor train saved: per layer condition, "
                                      "whitening error, Newton residual, effective rank, T needed"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    from .._info import format_info, info

    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The parser; only the module of the command named in ``argv`` is imported (all of them when
    no command is named, e.g. for ``--help``), so ``sdecor info`` does not load the bench harness."""
    argv = sys.argv[1:] if argv is None else list(argv)
    named = [a for a in argv if a in COMMANDS][:1]
    parser = Parser(prog="sdecor", description=__doc__.splitlines()[0])     # one-line errors, subcommands too
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if not named or name in named:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MissingDependencyError as err:
        # an optional package of an extra is missing: the message names the extra, no traceback
        print(f"sdecor {args.command}: error: {err}", file=sys.stderr)
        return 1

