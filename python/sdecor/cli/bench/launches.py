"""Launches per call of the Triton path, counted without a GPU under the Triton interpreter.

A GPU call's fixed cost is its launches: the Triton kernels, and every other device op the path runs
beside them (the small d x d math in torch, allocations' fills, the running statistics). Both are
counted here on CPU tensors with ``TRITON_INTERPRET=1`` and ``sdecor.use_backend("triton")``:

* Triton launches: every grid launch goes through the interpreter's grid executor
  (``triton.runtime.interpreter.GridExecutor.__call__``); :func:`counting_launches` wraps it, counts
  the launches by kernel name and marks each as a profiler range, so that the interpreter's own work
  (its copies of the arguments, numpy) is not counted as the path's;
* the other ops: ``torch.profiler`` events of the call (CPU activity) that are aten ops at the top
  level (not inside another aten op, a Triton launch, or a native sdecor op), by name; those that do
  work are told apart from views, allocations and no-op conversions (:data:`NO_WORK`, where every
  nested aten op is of those too). A native sdecor op (``sdecor::eigh_small``, the eigensolver of
  the zca path) is listed on its own, its insides not counted. On CPU tensors a host-side op on a
  Python scalar (e.g. a 0-dim tensor's ``item``) is in the list too.

Calls measured: a GroupWhitening training forward and its backward, each counted on its own (newton T=5
and zca at d = 16 on a ResNet-18/CIFAR-10 layer (64, 64, 16, 16); a smaller last group, C = 56 at
d = 16; newton at d = 64, whose Newton steps run in the statistics finalize program in tiles of a
scratch buffer, as those of d <= 32 run in its registers: 3 launches per pass either way); and
``topk_mask`` with each fill (ratio 0.5, one mask per sample shared by the channels, on a CIFAR-10
batch (128, 3, 32, 32)).
Each configuration is called once on a small input first, so that one-time work is not counted.

:func:`measure` runs in this process when the interpreter is on here, else :func:`measure_in_subprocess`
runs ``python -m sdecor.cli.bench.launches`` with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter

import torch

import sdecor

WHITEN_CASES = (
    dict(case="newton-d16", shape=(64, 64, 16, 16), d=16, method="newton", T=5, last_group="even"),
    dict(case="zca-d16", shape=(64, 64, 16, 16), d=16, method="zca", T=5, last_group="even"),
    dict(case="newton-d16-smaller-last", shape=(64, 56, 16, 16), d=16, method="newton", T=5, last_group="smaller"),
    dict(case="newton-d64", shape=(64, 128, 8, 8), d=64, method="newton", T=5, last_group="even"),
)
FILLS = ("zero", "constant", "mean", "uniform", "baseline")
TOPK_CASES = tuple(dict(case=f"topk-{fill}", shape=(128, 3, 32, 32), ratio=0.5, reduce="mean", fill=fill)
                   for fill in FILLS)

LAUNCH_RANGE = "triton launch: "       # the profiler range of one grid launch
MARKER = "sdecor-launches-json: "     # the line of the subprocess's output that holds the result

# aten ops that launch no kernel: views, allocations, metadata and conversions that may return the input
# (an op of these that nests another aten op counts as work when the nested one does)
NO_WORK = frozenset("aten::" + n for n in (
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
    "_reshape_alias", "reshape", "as_strided", "alias", "detach", "detach_", "t", "transpose", "permute",
    "expand", "expand_as", "unsqueeze", "squeeze", "select", "slice", "narrow", "split", "unbind", "chunk",
    "diagonal", "lift_fresh", "resolve_conj", "resolve_neg", "to", "contiguous", "flatten", "unflatten",
    "view_as", "movedim"))


def interpreter_on() -> bool:
    """Whether this process runs Triton kernels through the interpreter (TRITON_INTERPRET set)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def counting_launches():
    """Count the interpreter's grid launches by kernel name (yields the Counter), each launch a
    profiler range named ``triton launch: <kernel>``."""
    from triton.runtime import interpreter

    counts: Counter = Counter()
    original = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        name = self.fn.__name__
        counts[name] += 1
        with torch.profiler.record_function(LAUNCH_RANGE + name):
            return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = call
    try:
        yield counts
    finally:
        interpreter.GridExecutor.__call__ = original


def _descendants(ev):
    for child in ev.cpu_children:
        yield child
        yield from _descendants(child)


def _is_native(ev) -> bool:
    """A native sdecor op: an sdecor:: op with no Triton launch inside."""
    return ev.name.startswith("sdecor::") and not any(c.name.startswith(LAUNCH_RANGE) for c in _descendants(ev))


def _opaque(ev) -> bool:
    # what is counted as one op (or not at all): its insides are not the path's own ops
    return ev.name.startswith(("aten::", LAUNCH_RANGE)) or _is_native(ev)


def _top_level(ev) -> bool:
    parent = ev.cpu_parent
    while parent is not None:
        if _opaque(parent):
            return False
        parent = parent.cpu_parent
    return True


def _works(ev) -> bool:
    if ev.name not in NO_WORK:
        return True
    return any(_works(c) for c in ev.cpu_children if c.name.startswith("aten::"))


def profile_call(fn) -> dict:
    """Run ``fn()`` once: its Triton launches by kernel, and the other ops at its top level.

    Returns {'launches': {kernel: n}, 'launch_total', 'ops': {aten op: n}, 'op_total',
    'work': {aten op: n} (the ops that do work), 'work_total', 'native': {sdecor op: n}}.
    """
    from torch.profiler import ProfilerActivity, profile

    with counting_launches() as launches, profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if _top_level(e)]
    aten = [e for e in events if e.name.startswith("aten::")]
    ops = Counter(e.name for e in aten)
    work = Counter(e.name for e in aten if _works(e))
    native = Counter(e.name for e in events if _is_native(e))
    return dict(launches=dict(launches), launch_total=sum(launches.values()), ops=dict(ops.most_common()),
                op_total=sum(ops.values()), work=dict(work.most_common()), work_total=sum(work.values()),
                native=dict(native))


def _whitening(case: dict, shape, seed: int):
    N, C, *S = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).requires_grad_(True)
    mod = sdecor.GroupWhitening(C, num_channels=case["d"], method=case["method"], T=case["T"],
                                last_group=case["last_group"]).train()
    dy = torch.randn(shape, generator=gen)
    return x, mod, dy


def whitening_counts(case: dict, shape=None) -> dict:
    """The launches and ops of one GroupWhitening training forward, and of its backward (``y.backward(dy)``),
    on the triton backend; ``shape`` overrides the case's."""
    shape = tuple(shape or case["shape"])
    with sdecor.use_backend("triton"):
        x, mod, dy = _whitening(case, (2, shape[1]) + (2,) * (len(shape) - 2), 1)   # one-time work
        mod(x).backward(dy)
        x, mod, dy = _whitening(case, shape, 0)
        out = {}
        forward = profile_call(lambda: out.setdefault("y", mod(x)))
        backward = profile_call(lambda: out["y"].backward(dy))
    return dict(case, shape=list(shape), forward=forward, backward=backward)


def topk_counts(case: dict, shape=None) -> dict:
    """The launches and ops of one ``topk_mask`` call on the triton backend; ``shape`` overrides the case's."""
    shape = tuple(shape or case["shape"])

    def inputs(shape, seed):
        gen = torch.Generator().manual_seed(seed)
        x, sal = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        kw = dict(ratio=case["ratio"], reduce=case["reduce"], fill=case["fill"])
        if case["fill"] == "baseline":
            kw["baseline"] = torch.zeros(shape)
        if case["fill"] == "uniform":
            kw["generator"] = torch.Generator().manual_seed(seed + 1)
        return x, sal, kw

    with sdecor.use_backend("triton"):
        x, sal, kw = inputs((2, shape[1]) + (4,) * (len(shape) - 2), 1)               # one-time work
        sdecor.topk_mask(x, sal, **kw)
        x, sal, kw = inputs(shape, 0)
        call = profile_call(lambda: sdecor.topk_mask(x, sal, **kw))
    return dict(case, shape=list(shape), call=call)


def measure_here(whitening=True, topk=True) -> dict:
    """Every case, counted in this process (the interpreter must be on)."""
    if not interpreter_on():
        raise RuntimeError("launches are counted under the Triton interpreter: set TRITON_INTERPRET=1 before "
                           "Triton is imported, or use measure(), which starts a subprocess with it")
    import triton

    return dict(triton=triton.__version__, interpreter=True,
                whitening=[whitening_counts(c) for c in WHITEN_CASES] if whitening else [],
                topk_mask=[topk_counts(c) for c in TOPK_CASES] if topk else [])


def measure_in_subprocess(whitening=True, topk=True, timeout: float = 3600) -> dict:
    """:func:`measure_here` in ``python -m sdecor.cli.bench.launches`` with TRITON_INTERPRET=1."""
    cmd = [sys.executable, "-m", "sdecor.cli.bench.launches"] + ([] if whitening else ["--no-whitening"]) \
        + ([] if topk else ["--no-topk"])
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in out.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"counting the launches failed (exit status {out.returncode}): {tail}")


def measure(whitening=True, topk=True) -> dict:
    """Every case's counts: in this process under the interpreter, else in a subprocess."""
    if interpreter_on():
        return measure_here(whitening, topk)
    return measure_in_subprocess(whitening, topk)


# ---------------------------------------------------------------------------------------------------
# the report


def _ops_text(counts: dict) -> str:
    return ", ".join(f"{name.removeprefix('aten::')}" + (f" x{n}" if n > 1 else "") for name, n in counts.items()) \
        or "none"


def _kernels_text(counts: dict) -> str:
    return ", ".join(name.removesuffix("_kernel") + (f" x{n}" if n > 1 else "") for name, n in counts.items())


def rows(doc: dict) -> list[dict]:
    """One row per counted call: the case and its parameters, the part ("forward", "backward" or "call"),
    and its counts (:func:`profile_call`)."""
    out = []
    for r in doc.get("whitening", []):
        case = {k: v for k, v in r.items() if k not in ("forward", "backward")}
        for part in ("forward", "backward"):
            out.append(dict(call="GroupWhitening", **case, part=part, **r[part]))
    for r in doc.get("topk_mask", []):
        case = {k: v for k, v in r.items() if k != "call"}
        out.append(dict(call="topk_mask", **case, part="call", **r["call"]))
    return out


def format_launches(doc: dict | None, error: str | None = None) -> list[str]:
    """The "Launches per call" section of ``bench --static``, from :func:`measure`'s result."""
    lines = ["", "== Launches per call (Triton path, counted under the Triton interpreter on CPU tensors) =="]
    if error:
        return lines + [f"  not counted: {error}"]
    lines.append("Triton: grid launches by kernel. Other ops: the aten ops at the call's top level that do work "
                 "(on a GPU a kernel, a fill or a copy each; views and allocations left out), then all of them; "
                 "native: sdecor's C++/CUDA ops.")
    head = (f"{'call':<15} {'case':<25} {'shape':<14} {'pass':<8} {'triton':>6} {'other':>5} {'all':>4}  "
            "kernels; other ops")
    lines += [head, "-" * len(head)]
    for r in rows(doc):
        native = "".join(f"; native {k} x{n}" for k, n in r["native"].items())
        lines.append(f"{r['call']:<15} {r['case']:<25} {'x'.join(map(str, r['shape'])):<14} {r['part']:<8} "
                     f"{r['launch_total']:>6} {r['work_total']:>5} {r['op_total']:>4}  "
                     f"{_kernels_text(r['launches'])}; {_ops_text(r['work'])}{native}")
    return lines


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sdecor.cli.bench.launches",
                                     description="count the launches per call of the Triton path "
                                                 "(run with TRITON_INTERPRET=1); prints one JSON line")
    parser.add_argument("--no-whitening", action="store_true", help="leave out the GroupWhitening calls")
    parser.add_argument("--no-topk", action="store_true", help="leave out the topk_mask calls")
    args = parser.parse_args(argv)
    doc = measure_here(not args.no_whitening, not args.no_topk)
    print(MARKER + json.dumps(doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
