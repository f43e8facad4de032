"""CPU benchmark: GroupWhitening forward + backward against BatchNorm2d and a naive IterNorm.

    python benchmarks/bench_groupwhitening_cpu.py [--shape 32 256 28 28] [--d 16 64] [--repeats 15]

Times one training step of each layer (forward, backward of a fixed upstream gradient, gradients
of the input and of the affine parameters) on CPU in float32:

- ``batchnorm2d``: torch.nn.BatchNorm2d, the target to stay close to;
- ``groupwhitening``: sdecor.nn.GroupWhitening with the default backend selection;
- ``torch_fused``: sdecor._torch_fused.group_whiten_train_torch, the CPU training path with the
  hand-written backward, called directly (what the module runs once it is the torch backend);
- ``iternorm_naive``: benchmarks/iternorm_naive.py, the published algorithm with autograd.

The layers are timed round-robin (one step of each per round, after warm-up rounds) so that
they share the machine's load; the median over rounds is reported. Before timing, each
implementation is checked against sdecor.reference on a small input; a failing check aborts.
Results go to benchmarks/results/groupwhitening_cpu.json with the CPU model and thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.iternorm_naive import iternorm_train  # noqa: E402
from sdecor import reference as ref  # noqa: E402
from sdecor._torch_fused import group_whiten_train_torch  # noqa: E402
from sdecor.nn import GroupWhitening  # noqa: E402
from sdecor.testing import assert_close  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def module_train_function() -> str:
    """Qualified name of the function GroupWhitening calls for batch statistics."""
    from sdecor import whitening
    fn = getattr(whitening, "group_whiten_train", None)
    return "missing" if fn is None else f"{fn.__module__}.{fn.__qualname__}"


def check_correctness(d: int, T: int, eps: float) -> None:
    """Every timed implementation against the reference on a small float64 input."""
    x = (torch.randn(4, 4 * d, 5, 5, dtype=torch.float64) + 0.5).requires_grad_()
    w = torch.rand(4 * d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4 * d, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    want = ref.group_whiten(x, d, "newton", eps, T) * w[:, None, None] + b[:, None, None]
    grads_want = torch.autograd.grad(want, (x, w, b), g)
    module = GroupWhitening(4 * d, d, T=T, eps=eps).double()
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.copy_(b)
    candidates = {
        "groupwhitening": (lambda: module(x), (x, module.weight, module.bias)),
        "torch_fused": (lambda: group_whiten_train_torch(x, d, "newton", eps, T, w, b)[0], (x, w, b)),
        "iternorm_naive": (lambda: iternorm_train(x, d, T, eps, w, b), (x, w, b)),
    }
    for name, (run, inputs) in candidates.items():
        y = run()
        assert_close(y, want, msg=f"{name}: output differs from the reference")
        for got, exp in zip(torch.autograd.grad(y, inputs, g), grads_want):
            assert_close(got, exp, msg=f"{name}: gradient differs from the reference")


def make_steps(shape, d: int, T: int, eps: float):
    """name -> a function running one forward + backward step (inputs created here, not timed)."""
    C = shape[1]
    x = torch.randn(shape).requires_grad_()
    grad = torch.randn(shape)
    bn = torch.nn.BatchNorm2d(C)
    gw = GroupWhitening(C, d, T=T, eps=eps)
    w = torch.ones(C, requires_grad=True)
    b = torch.zeros(C, requires_grad=True)

    def step(forward, params):
        def run():
            y = forward()
            y.backward(grad)
            x.grad = None
            for p in params:
                p.grad = None
        return run

    return {
        "batchnorm2d": step(lambda: bn(x), list(bn.parameters())),
        "groupwhitening": step(lambda: gw(x), list(gw.parameters())),
        "torch_fused": step(lambda: group_whiten_train_torch(x, d, "newton", eps, T, w, b)[0], [w, b]),
        "iternorm_naive": step(lambda: iternorm_train(x, d, T, eps, w, b), [w, b]),
    }


def time_round_robin(steps: dict, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        for run in steps.values():
            run()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[32, 256, 28, 28], metavar=("N", "C", "H", "W"))
    parser.add_argument("--d", type=int, nargs="+", default=[16, 64], help="group sizes")
    parser.add_argument("--T", type=int, default=5)
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "groupwhitening_cpu.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    result = {
        "benchmark": "groupwhitening_cpu",
        "device": "cpu",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "dtype": "float32",
        "shape": args.shape,
        "T": args.T,
        "method": "newton",
        "step": "forward + backward (grads of x, weight, bias), training mode",
        "statistic": f"median over {args.repeats} round-robin repeats after {args.warmup} warm-up rounds",
        "groupwhitening_train_function": module_train_function(),
        "load_average_before": load_average(),
        "runs": [],
    }
    for d in args.d:
        check_correctness(d, args.T, args.eps)
        times = time_round_robin(make_steps(tuple(args.shape), d, args.T, args.eps), args.warmup, args.repeats)
        ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
        run = {
            "d": d,
            "median_ms": ms,
            "min_ms": {name: 1e3 * min(v) for name, v in times.items()},
            "groupwhitening_over_batchnorm": ms["groupwhitening"] / ms["batchnorm2d"],
            "torch_fused_over_batchnorm": ms["torch_fused"] / ms["batchnorm2d"],
            "naive_over_groupwhitening": ms["iternorm_naive"] / ms["groupwhitening"],
            "naive_over_torch_fused": ms["iternorm_naive"] / ms["torch_fused"],
        }
        result["runs"].append(run)
        print(f"d={d:3d}  " + "  ".join(f"{k} {v:8.2f} ms" for k, v in ms.items()))
        print(f"       groupwhitening / batchnorm2d = {run['groupwhitening_over_batchnorm']:.2f}   "
              f"torch_fused / batchnorm2d = {run['torch_fused_over_batchnorm']:.2f}   "
              f"naive / groupwhitening = {run['naive_over_groupwhitening']:.2f}   "
              f"naive / torch_fused = {run['naive_over_torch_fused']:.2f}")
    result["load_average_after"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
