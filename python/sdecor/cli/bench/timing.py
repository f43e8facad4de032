"""The timers of the benchmark, and the matmul whose rate sets the flop floor.

GPU: ``triton.testing.do_bench`` (median, warm-up, gradients cleared) and the peak memory of one call.
CPU: every path of a case timed in interleaved rounds with perf_counter (median of the calls,
gradients cleared between calls, outside the timed call), with the minor page faults of each call.
"""

from __future__ import annotations

import statistics
import time

import torch


def clear_grads(leaves) -> None:
    """Drop the gradients of ``leaves`` (before a timed call: none is accumulated into)."""
    for t in leaves:
        t.grad = None


def _stats(times: list, faults: list | None = None) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return dict(median=statistics.median(times), p20=q[1], p80=q[7], reps=len(times), peak_mem=None,
                faults=statistics.median(faults) if faults else None)


def minor_faults() -> int | None:
    """Minor page faults of this process so far (None where getrusage is missing): a call that
    page-faults memory back from the OS shows here, one fault per 4 KiB page."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_cpu_interleaved(fns, min_time: float, min_reps: int, max_calls_per_round: int = 50) -> list[dict]:
    """Time several (fn, leaves) in rounds, each round calling every fn, in a rotating order.

    Interleaving spreads any change of machine load over all paths alike. Within a round a fast fn is
    called several times (about as long as the slowest one, at most ``max_calls_per_round``); every
    call is timed on its own with perf_counter, gradients cleared outside the timed call. Stops after
    ``min_reps`` rounds once ``min_time`` seconds per fn have passed (or 10x that, after 3 rounds).
    The minor page faults of each call are counted too, outside the timed window (median per call).
    """
    est = []
    for fn, leaves in fns:                      # warm-up, and a first estimate of each call's time
        clear_grads(leaves)
        t0 = time.perf_counter()
        fn()
        est.append(time.perf_counter() - t0)
    slowest = max(est)
    calls = [max(1, min(max_calls_per_round, int(slowest / max(t, 1e-7)))) for t in est]
    times = [[] for _ in fns]
    faults = [[] for _ in fns] if minor_faults() is not None else None
    start, rounds, n = time.perf_counter(), 0, len(fns)
    while True:
        for j in range(n):
            i = (j + rounds) % n
            fn, leaves = fns[i]
            for _ in range(calls[i]):
                clear_grads(leaves)
                f0 = minor_faults() if faults is not None else 0
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                if faults is not None:
                    faults[i].append(minor_faults() - f0)
                times[i].append(t1 - t0)
        rounds += 1
        elapsed = time.perf_counter() - start
        if (rounds >= min_reps and elapsed >= min_time * n) or (rounds >= 3 and elapsed >= 10 * min_time * n):
            break
    for _, leaves in fns:
        clear_grads(leaves)
    return [_stats(t, None if faults is None else faults[i]) for i, t in enumerate(times)]


def time_gpu(fn, leaves) -> dict:
    """triton.testing.do_bench median (and 20/80 % quantiles), gradients cleared; peak memory."""
    from triton.testing import do_bench

    med, lo, hi = do_bench(fn, warmup=25, rep=100, grad_to_none=list(leaves), quantiles=[0.5, 0.2, 0.8])
    clear_grads(leaves)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    clear_grads(leaves)
    return dict(median=med / 1e3, p20=lo / 1e3, p80=hi / 1e3, reps=None, peak_mem=int(peak), faults=None)


# side of the square float32 matmul whose rate sets the flop floor: large enough to run at the BLAS's
# peak (2048^3 is 17 GFLOP, about 0.1 s on 2 cores), larger on a GPU
MATMUL_N = {"cpu": 2048, "cuda": 8192}


def matmul_call(device, n: int) -> dict:
    """An n x n x n float32 matmul into a preallocated output (2 n^3 flops): {'n', 'flops', 'fn'}."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device) for _ in range(2))
    out = torch.empty(n, n, device=device)
    return dict(n=n, flops=2 * n ** 3, fn=lambda: torch.mm(a, b, out=out))
