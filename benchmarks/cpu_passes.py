"""Timings of the native CPU whitening passes on each instruction-set path, beside their yardsticks.

Per pass (stats, apply, reduce, dx: torch.ops.sdecor.native_whiten_*), per d and per path (avx512,
avx2, portable: forced with torch.ops.sdecor.set_cpu_isa), and optionally (--whole) GroupWhitening's
training forward + backward with a dense upstream gradient, its eval forward and group_cov's forward;
against torch.nn.functional.batch_norm / BatchNorm2d (training forward + backward, eval), x.clone() and
a 2048^3 float32 matmul (the rate of the flop floor). Every case runs once per round, the rounds
interleaved; medians are printed with ratios, GFLOP/s (2 d^2 m G per product, the covariance counted
as a full product) and GB/s (bytes read and written once).

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/cpu_passes.py --threads 2 --whole

On a machine shared with other work, --clock cpu times the process's CPU time instead of the wall
clock (with --threads 1, or with OMP_WAIT_POLICY=PASSIVE so that waiting threads do not spin).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

import sdecor
from sdecor import _ext


def _cases(x, gy, ds, isas, whole):
    """{name: (isa or None, fn, flops or None, bytes or None)}"""
    ops = torch.ops.sdecor
    N, C = x.shape[:2]
    m = N * math.prod(x.shape[2:])
    nbytes = x.numel() * x.element_size()
    w, b = torch.ones(C), torch.zeros(C)
    rm, rv = torch.zeros(C), torch.ones(C)

    def bn_train():
        xx = x.detach().requires_grad_()
        F.batch_norm(xx, None, None, w, b, True, 0.1, 1e-5).backward(gy)

    A, B, out = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.empty(2048, 2048)
    cases = {
        "batch_norm train fwd+bwd": (None, bn_train, None, None),
        "batch_norm eval": (None, lambda: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5), None, 2 * nbytes),
        "x.clone()": (None, lambda: x.clone(), None, 2 * nbytes),
        "sgemm 2048^3": (None, lambda: torch.mm(A, B, out=out), 2 * 2048 ** 3, None),
    }
    gen = torch.Generator().manual_seed(0)
    for d in ds:
        G = C // d
        center, _, inv, _, _ = ops.native_whiten_stats(x, d)
        a, bt, s2 = (torch.randn(G, d, d, generator=gen) / d ** 0.5 for _ in range(3))
        shift = torch.randn(G, d, generator=gen)
        product = 2 * d * d * m * G
        for isa in isas:
            tag = f"d={d} [{isa}]"
            cases[f"{tag} stats"] = (isa, lambda d=d: ops.native_whiten_stats(x, d), product, nbytes)
            cases[f"{tag} apply"] = (isa, lambda d=d, a=a, c=center, s=shift: ops.native_whiten_apply(x, d, a, c, s),
                                     product, 2 * nbytes)
            cases[f"{tag} reduce"] = (isa, lambda d=d, c=center, i=inv: ops.native_whiten_reduce(gy, x, d, c, i),
                                      product, 2 * nbytes)
            cases[f"{tag} dx"] = (isa, lambda d=d, c=center, i=inv, bt=bt, s2=s2, s=shift:
                                  ops.native_whiten_dx(gy, x, d, c, i, bt, s2, s), 2 * product, 3 * nbytes)
            if not whole:
                continue
            train = sdecor.GroupWhitening(C, num_channels=d).train()

            def step(layer=train):
                xx = x.detach().requires_grad_()
                with sdecor.use_backend("native"):
                    y = layer(xx)
                y.backward(gy)

            evaluated = sdecor.GroupWhitening(C, num_channels=d).train()
            with sdecor.use_backend("native"):
                evaluated(x)
            evaluated.eval()

            def infer(layer=evaluated):
                with torch.no_grad(), sdecor.use_backend("native"):
                    layer(x)

            def cov(d=d):
                with sdecor.use_backend("native"):
                    sdecor.group_cov(x, d)

            # the flop floor of a training step: five d x d x m products per group
            cases[f"{tag} GroupWhitening train fwd+bwd"] = (isa, step, 5 * product, None)
            cases[f"{tag} GroupWhitening eval"] = (isa, infer, product, 2 * nbytes)
            cases[f"{tag} group_cov forward"] = (isa, cov, product, nbytes)
    if whole:
        bn = torch.nn.BatchNorm2d(C).train() if x.dim() == 4 else None
        if bn is not None:
            def bn_module():
                xx = x.detach().requires_grad_()
                bn(xx).backward(gy)
            cases["BatchNorm2d train fwd+bwd"] = (None, bn_module, None, None)
    return cases


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="32,256,28,28", help="x's shape (float32, contiguous)")
    p.add_argument("--d", type=int, nargs="+", default=[16, 64], help="group sizes (must divide C)")
    p.add_argument("--isas", default="", help="comma-separated paths (default: every path this CPU runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--whole", action="store_true", help="also GroupWhitening train / eval and group_cov")
    args = p.parse_args(argv)
    _ext.require()
    torch.set_num_threads(args.threads)
    runnable = _ext.build_info()["cpu_isas"].split(",")
    isas = [s for s in args.isas.split(",") if s] or runnable
    for isa in isas:
        if isa not in runnable:
            p.error(f"--isas: this machine runs {runnable}, not {isa!r}")
    shape = tuple(int(s) for s in args.shape.split(","))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 2 + 3
    gy = torch.randn(shape, generator=gen)
    cases = _cases(x, gy, args.d, isas, args.whole)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {k: [] for k in cases}
    try:
        for _ in range(2):                                   # warm-up
            for isa, fn, _, _ in cases.values():
                torch.ops.sdecor.set_cpu_isa(isa or "auto")
                fn()
        for _ in range(args.rounds):
            for name, (isa, fn, _, _) in cases.items():
                torch.ops.sdecor.set_cpu_isa(isa or "auto")
                t = clock()
                fn()
                times[name].append(clock() - t)
    finally:
        torch.ops.sdecor.set_cpu_isa("auto")
    med = {k: statistics.median(v) for k, v in times.items()}
    clone, bn = med["x.clone()"], med.get("BatchNorm2d train fwd+bwd", med["batch_norm train fwd+bwd"])
    bn_eval, rate = med["batch_norm eval"], 2 * 2048 ** 3 / med["sgemm 2048^3"]
    print(f"shape={shape} float32, threads={args.threads}, clock={args.clock}, rounds={args.rounds}, "
          f"load average {os.getloadavg()[0]:.1f}, paths {isas}")
    for name, (_, _, flops, nbytes) in cases.items():
        t = med[name]
        cols = [f"{t * 1e3:9.3f} ms"]
        cols.append(f"{flops / t / 1e9:6.1f} GFLOP/s" if flops else " " * 14)
        cols.append(f"{nbytes / t / 1e9:5.1f} GB/s" if nbytes else " " * 10)
        cols.append(f"{t / clone:5.2f}x clone  {t / bn:5.2f}x BN train")
        if "eval" in name:
            cols.append(f"{t / bn_eval:5.2f}x BN eval")
        if flops:
            cols.append(f"{t * rate / flops:5.2f}x flop floor")
        print(f"{name:44s} " + "  ".join(cols))


if __name__ == "__main__":
    main()
