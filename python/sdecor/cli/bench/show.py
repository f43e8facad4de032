"""``sdecor bench --show FILE``: the table of a saved results file (<device>.json of a timing run).

The file is checked before it is shown: JSON holding an ``environment`` object and a ``results``
list of measurement records, every field the table reads present and of its type. Anything else
(an empty file, not JSON, another command's JSON, a record without its time) is one line that names
the file and what is wrong with it, never a traceback.
"""

from __future__ import annotations

import json
import math
import sys

from ..output import reason

# fields the table reads: name -> (what it must be, test)
_STR = ("a string", lambda v: isinstance(v, str))
_OPT_STR = ("a string or null", lambda v: v is None or isinstance(v, str))
_NUM = ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
_OPT_NUM = ("a number or null", lambda v: v is None or _NUM[1](v))
_POS = ("a finite number > 0", lambda v: _NUM[1](v) and math.isfinite(v) and v > 0)
_THREADS = ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)

ENVIRONMENT = {"device": _STR, "device_name": _STR, "torch": _STR, "torch_threads": _THREADS, "sdecor": _STR,
               "timestamp": _STR, "timer": _STR}
ENVIRONMENT_OPTIONAL = {"threads_from": _OPT_STR}
RECORD = {"op": _STR, "status": _STR, "impl": _STR, "kind": _STR, "mode": _STR, "dtype": _STR,
          "shape_desc": _STR, "note": _OPT_STR}
RECORD_OPTIONAL = {"gbps": _OPT_NUM, "peak_mem_bytes": _OPT_NUM, "minor_faults": _OPT_NUM, "err_ratio": _OPT_NUM,
                   "checked": ("true or false", lambda v: isinstance(v, bool))}
TARGET = {"mode": _STR, "baseline": _STR, "ratio": ("\"time\" or \"speedup\"", lambda v: v in ("time", "speedup"))}

# what other sdecor JSON files hold: their top-level keys -> what they are
FOREIGN = ((("rows", "world"), "the result of bench --distributed"),
           (("kernels", "bandwidth"), "the report of bench --static"),
           (("meta", "summary", "runs"), "the results.json of sdecor demo"),
           (("config", "history", "test"), "the metrics.json of sdecor train"))


class NotAResultsFile(ValueError):
    """The file given to --show cannot be shown; the message says why."""


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _fields(obj: dict, where: str, required: dict, optional: dict = None) -> None:
    for key, (what, ok) in required.items():
        if key not in obj:
            raise NotAResultsFile(f"{where} has no {key!r}")
        if not ok(obj[key]):
            raise NotAResultsFile(f"{where}.{key} must be {what}; got {obj[key]!r:.60}")
    for key, (what, ok) in (optional or {}).items():
        if key in obj and not ok(obj[key]):
            raise NotAResultsFile(f"{where}.{key} must be {what}; got {obj[key]!r:.60}")


def check_results(doc) -> tuple[dict, list]:
    """(environment, records) of a parsed results file; raises :class:`NotAResultsFile`."""
    if not isinstance(doc, dict):
        raise NotAResultsFile(f"it holds {_type_name(doc)}, not an object with 'environment' and 'results'")
    for keys, what in FOREIGN:
        if "results" not in doc and all(k in doc for k in keys):
            raise NotAResultsFile(f"it is {what}; --show reads the <device>.json of a timing run")
    for key, kind in (("environment", dict), ("results", list)):
        if key not in doc:
            raise NotAResultsFile(f"it has no {key!r}" + ("" if doc else " (an empty object)"))
        if not isinstance(doc[key], kind):
            raise NotAResultsFile(f"{key!r} must be {'an object' if kind is dict else 'a list'}; "
                                  f"got {_type_name(doc[key])}")
    env, records = doc["environment"], doc["results"]
    _fields(env, "environment", ENVIRONMENT, ENVIRONMENT_OPTIONAL)
    alloc = env.get("allocations")
    if alloc and not (isinstance(alloc, dict) and isinstance(alloc.get("text"), str)
                      and alloc.get("kept", False) in (True, False, None)):
        raise NotAResultsFile("environment.allocations must be an object with a 'text' string and 'kept' "
                              "true, false or null")
    for i, r in enumerate(records):
        where = f"results[{i}]"
        if not isinstance(r, dict):
            raise NotAResultsFile(f"{where} must be an object; got {_type_name(r)}")
        _fields(r, where, RECORD, RECORD_OPTIONAL)
        _fields(r, where, {"time_ms": _POS} if r["status"] == "ok" else {"reason": _STR})
        speedup = r.get("speedup")
        if speedup is not None and not (isinstance(speedup, dict) and all(_OPT_NUM[1](v) for v in speedup.values())):
            raise NotAResultsFile(f"{where}.speedup must be an object of numbers; got {speedup!r:.60}")
        if r["impl"] == "floor" and r.get("flops") is not None:
            _fields(r, where, {"flops": _NUM, "matmul_flops_per_s": _POS, "matmul_n": _NUM})
        targets = r.get("targets")
        if targets:
            if not isinstance(targets, list):
                raise NotAResultsFile(f"{where}.targets must be a list; got {_type_name(targets)}")
            _fields(r, where, {"shape": _STR})
            for j, t in enumerate(targets):
                if not isinstance(t, dict):
                    raise NotAResultsFile(f"{where}.targets[{j}] must be an object; got {_type_name(t)}")
                _fields(t, f"{where}.targets[{j}]", TARGET, {"bound": _OPT_NUM})
    return env, records


def read_results(path: str) -> tuple[dict, list]:
    """(environment, records) of the results file at path; raises :class:`NotAResultsFile`."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise NotAResultsFile(f"cannot read it: {reason(err)}") from None
    if not data.strip():
        raise NotAResultsFile("it is empty")
    try:
        doc = json.loads(data)
    except UnicodeDecodeError:
        raise NotAResultsFile("it is not text (not UTF-8), so not JSON") from None
    except json.JSONDecodeError as err:
        raise NotAResultsFile(f"it is not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise NotAResultsFile("its JSON is nested too deeply to read") from None
    return check_results(doc)


def show(args) -> int:
    """Print the table of ``args.show`` (filtered by --ops); 2 with one line when it cannot."""
    from . import report

    try:
        env, records = read_results(args.show)
        if args.ops:
            records = [r for r in records if r["op"] in args.ops.split(",")]
        table = report.format_table(records, env, markdown=args.markdown)
    except NotAResultsFile as err:
        print(f"sdecor bench: error: --show {args.show}: not a results file: {err}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as err:
        # a field the checks above do not cover: still the file's fault, still one line
        print(f"sdecor bench: error: --show {args.show}: not a results file: it does not make a table "
              f"({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    print(table)
    return 0
