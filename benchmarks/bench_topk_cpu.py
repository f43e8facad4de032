"""topk_mask on CPU (default backend) against the Saliency Guided Training way of masking.

SGT baseline, per sample: flatten the saliency, torch.topk for the k lowest, scatter True into a
mask, torch.where(mask, uniform noise in the sample's [min, max], x). sdecor: topk_mask(x, s,
ratio, fill="uniform") with the default backend (reduce="mean", the default, and reduce=None, which
selects over C*H*W scores per sample like the baseline). Inputs are made before timing; median of
repeats after a warm-up. Writes JSON to benchmarks/results/.

    python benchmarks/bench_topk_cpu.py [--shape 64 3 224 224] [--ratio 0.5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import sdecor
from sdecor import reference as ref
from sdecor.bench.baselines import sgt_mask
from sdecor.masking import topk_mask


def timed(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return dict(median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times), repeats=repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs="+", default=[64, 3, 224, 224])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "topk_cpu.json"))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(args.shape)
    s = torch.randn(args.shape)

    # correctness before speed: the default backend against the reference on a slice
    for reduce in ("mean", None):
        a = topk_mask(x[:2], s[:2], ratio=args.ratio, reduce=reduce, fill="uniform",
                      generator=torch.Generator().manual_seed(0))
        b = ref.topk_mask(x[:2], s[:2], ratio=args.ratio, reduce=reduce, fill="uniform",
                          generator=torch.Generator().manual_seed(0))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "default backend != reference"

    k_all = int(args.ratio * x[0].numel())                           # SGT selects over C*H*W
    g = torch.Generator().manual_seed(0)
    rows = {
        "sgt_topk_scatter_where": timed(lambda: sgt_mask(x, s, k_all, reduce=None, fill="uniform"),
                                        args.repeats),
        "sdecor_topk_mask_reduce_mean": timed(
            lambda: topk_mask(x, s, ratio=args.ratio, fill="uniform", generator=g), args.repeats),
        "sdecor_topk_mask_reduce_none": timed(
            lambda: topk_mask(x, s, ratio=args.ratio, reduce=None, fill="uniform", generator=g),
            args.repeats),
        "reference_topk_mask_reduce_mean": timed(
            lambda: ref.topk_mask(x, s, ratio=args.ratio, fill="uniform", generator=g), args.repeats),
    }
    base = rows["sgt_topk_scatter_where"]["median_ms"]
    for r in rows.values():
        r["speedup_vs_sgt"] = base / r["median_ms"]
    result = dict(
        benchmark="topk_mask_cpu", device=platform.processor() or platform.machine(),
        cpu_threads=torch.get_num_threads(), torch=torch.__version__, sdecor=sdecor.__version__,
        shape=args.shape, dtype="float32", ratio=args.ratio, fill="uniform", results=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for name, r in rows.items():
        print(f"{name:34s} {r['median_ms']:9.1f} ms  x{r['speedup_vs_sgt']:.2f} vs SGT")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
