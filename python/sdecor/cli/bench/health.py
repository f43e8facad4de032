"""The cost of the whitening report against a training forward of the same model, on the CPU.

    python -m sdecor.cli.bench.health [--threads N] [--min-time S] [--reps R] [--out FILE]

Case ``health-cpu``: torchvision's resnet18 (10 classes, weights of ``torch.manual_seed(0)``),
converted with ``sdecor.convert_whitening(model, num_channels=16)`` (20 whitening layers), on a batch
of 64 images of the embedded shapes set resized to 32x32 (the batch of
``benchmarks/inspect_resnet18.py``). Two paths, timed in interleaved rounds with the harness's CPU
timer (:func:`.timing.time_cpu_interleaved`: perf_counter, median of the calls, rotating order):

- ``report``: ``sdecor.whitening_report(model, x)`` -- its no-grad training-mode forward, the float64
  covariances and eigendecompositions, the Newton-Schulz run for ``t_needed`` (which stops when every
  group has reached tol, so real images rather than noise set its length);
- ``forward``: one training forward of a copy of the model, ``model.train(); model(x)`` with autograd
  recording, as a training step runs it (no backward).

The target: report time <= 3 x forward time. The time of the report depends on the data through
``t_needed``'s step count (up to 100 steps where a group converges slowly); the table gives the
largest t_needed of the batch beside the ratio.

This is a standalone case of the benchmark package, not a ``--suite`` of ``sdecor bench``: the
harness's suites select op shapes (one op, its inputs, checked against its reference), and a
whole-model report against a model forward is not one of them. The report's correctness is held to
its float64 reference by tests/test_health.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch
import torch.nn.functional as F

SUITE = "health-cpu"
TARGET = 3.0                  # report time / training forward time, at most


def build_case(batch: int = 64, size: int = 32):
    """(model, x): resnet18 converted with convert_whitening(num_channels=16), and the first ``batch``
    training images of the shapes set resized to ``size`` x ``size``."""
    import torchvision

    from ... import convert_whitening
    from .. import data

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    convert_whitening(model, num_channels=16)
    x = F.interpolate(data.load_shapes().train.x[:batch], size=(size, size), mode="bilinear", align_corners=False)
    return model, x


def measure(*, batch: int = 64, size: int = 32, min_time: float = 0.5, reps: int = 5, case=None) -> dict:
    """Time the report and the training forward (interleaved rounds); the medians in ms, their
    ratio, the target and whether it is met. ``case``: (model, x) instead of :func:`build_case`."""
    from ...health import whitening_report
    from .timing import time_cpu_interleaved

    model, x = build_case(batch, size) if case is None else case
    twin = copy.deepcopy(model).train()           # the forward's own copy: its running statistics move
    report = whitening_report(model, x)

    def forward():
        twin(x)

    stats = time_cpu_interleaved([(lambda: whitening_report(model, x), []), (forward, [])], min_time, reps)
    report_ms, forward_ms = stats[0]["median"] * 1e3, stats[1]["median"] * 1e3
    t_needed = max(int(r.t_needed.max()) if bool((r.t_needed >= 0).all()) else 101 for r in report)
    ratio = report_ms / forward_ms
    what = (f"resnet18 convert_whitening(d=16), {batch}x3x{size}x{size} shapes images" if case is None
            else f"{type(model).__name__}, input {'x'.join(map(str, x.shape))}")
    return {"suite": SUITE, "case": what,
            "layers": len(report), "t_needed_max": t_needed,
            "ms": {"report": report_ms, "forward": forward_ms},
            "p20_p80_ms": {"report": [stats[0]["p20"] * 1e3, stats[0]["p80"] * 1e3],
                           "forward": [stats[1]["p20"] * 1e3, stats[1]["p80"] * 1e3]},
            "reps": {"report": stats[0]["reps"], "forward": stats[1]["reps"]},
            "ratio": ratio, "target": TARGET, "met": ratio <= TARGET}


def format_rows(doc: dict, env: dict) -> str:
    r = doc
    verdict = "met" if r["met"] else "NOT met"
    return "\n".join([
        f"{SUITE}: whitening_report against one training forward, {env['device_name']}, "
        f"{env['torch_threads']} thread(s); perf_counter median of interleaved rounds",
        f"{'case':<58} {'report':>10} {'forward':>10} {'ratio':>7} {'target':>8}",
        f"{r['case']:<58} {r['ms']['report']:>7.1f} ms {r['ms']['forward']:>7.1f} ms {r['ratio']:>6.2f}x "
        f"{'<= %gx' % r['target']:>8} {verdict}",
        f"{r['layers']} whitening layers; largest t_needed of the batch {r['t_needed_max']} (tol 1e-3); "
        f"calls timed: report {r['reps']['report']}, forward {r['reps']['forward']}",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdecor.cli.bench.health",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per path (default 0.5)")
    parser.add_argument("--reps", type=int, default=5, help="at least this many rounds (default 5)")
    parser.add_argument("--batch", type=int, default=64, help="images in the batch (default 64)")
    parser.add_argument("--size", type=int, default=32, help="image side (default 32)")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the result and environment as JSON")
    args = parser.parse_args(argv)
    for name, value, low in (("--threads", args.threads, 1), ("--reps", args.reps, 1), ("--batch", args.batch, 2),
                             ("--size", args.size, 8)):
        if value is not None and value < low:
            parser.error(f"{name} must be >= {low}; got {value}")
    if not args.min_time > 0:
        parser.error(f"--min-time must be > 0; got {args.min_time}")
    from . import report
    from .allocator import keep_allocations

    allocations = keep_allocations()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = dict(report.environment(torch.device("cpu"), "perf_counter median over interleaved rounds"),
               allocations=allocations)
    doc = measure(batch=args.batch, size=args.size, min_time=args.min_time, reps=args.reps)
    env["load_average_end"] = report.load_average()
    print(format_rows(doc, env))
    print(allocations["text"] + f"; load average {env['load_average']} at start, {env['load_average_end']} at end")
    if args.out is not None:
        with open(args.out, "w") as fh:
            json.dump({"environment": env, **doc}, fh, indent=1)
            fh.write("\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
