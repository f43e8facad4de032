"""``sdecor bench --distributed N``: what synchronised statistics cost per training step.

N worker processes (gloo on the loopback interface with CPU tensors; nccl with one GPU per process
on a machine with N GPUs) time a training step (forward + backward) of SyncGroupWhitening and of
GroupWhitening on the same per-process batches, and of the decorrelation term of each process's
batch (``process_group=None``) and of the global batch (the world group), interleaved round by
round, and report the step time of the slowest process (a synchronised step ends when the last
process is done), the ratio, and what one layer communicates per step. Whitening:

- forward: each process sends its packed statistics to the all_gather (count, scale, mean and the
  upper triangle of the centred second moment: ``payload_numel(G, d)`` numbers) and receives
  N - 1 of them;
- backward: one all_reduce of (D, s), G d (d + 1) numbers.

Cases: single layers at ResNet-like shapes (per process) and a torchvision resnet18 (all BatchNorms
converted), each process with its own batch, in DDP in both variants, so that the difference is the
synchronisation alone.

The decorrelation term (``decorrelation_loss(..., process_group=...)``, :mod:`sdecor.ops.cov_sync`):
per decorrelated layer and step one all_reduce of a header of 6 N int64 numbers and one of
G (d + d^2) float64 numbers (each group's sum x and sum x x^T), the backward none
(``decor_numbers``). Cases: the loss alone, forward + backward, on features of one process's batch
(the classifier input of a ResNet, a feature map), and a whole step (forward + backward) of
``sdecor train``'s tiny CNN with the SaliencyDecor objective in DDP, its whitening layers
synchronised in both variants, so that the difference is the decorrelation term alone.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# (name, per-process shape (N, C, *S), group size d); "resnet18": batch N, images HW x HW
LAYER_CASES = [
    ("layer 32x256x14x14 d16", (32, 256, 14, 14), 16),
    ("layer 4x256x28x28 d16", (4, 256, 28, 28), 16),
    ("layer 32x512x7x7 d64", (32, 512, 7, 7), 64),
]
RESNET_CASE = ("resnet18 8x3x64x64 d16", 8, 64, 16)
QUICK_LAYER_CASES = [("layer 8x64x14x14 d16", (8, 64, 14, 14), 16)]
QUICK_RESNET_CASE = ("resnet18 2x3x32x32 d16", 2, 32, 16)
# the decorrelation term: (name, per-process features (N, C, *S), d); the objective of sdecor train's
# tiny CNN: (name, batch N per process, d)
DECOR_CASES = [
    ("decor 32x512 d16", (32, 512), 16),
    ("decor 32x256x7x7 d16", (32, 256, 7, 7), 16),
]
OBJECTIVE_CASE = ("SaliencyDecor tiny 32x1x8x8 d16", 32, 16)
QUICK_DECOR_CASES = [("decor 8x64 d16", (8, 64), 16)]
QUICK_OBJECTIVE_CASE = ("SaliencyDecor tiny 8x1x8x8 d16", 8, 16)
DECOR_PATHS = ("per-rank", "global")       # process_group None, the world group


def layer_bytes(C: int, d: int, world: int, esize: int = 4) -> dict:
    """Bytes one whitening layer of C channels in groups of d moves per training step and process."""
    from ...ops.whiten_sync import payload_numel

    G = C // d
    sent = payload_numel(G, d) * esize
    return {"forward_sent": sent, "forward_received": (world - 1) * sent,
            "backward_allreduce": G * d * (d + 1) * esize}


def decor_numbers(C: int, d: int, world: int) -> dict:
    """Numbers the global decorrelation term of one layer of C channels in groups of d all-reduces
    per step: the header (6 per process, int64) and each group's sum x and sum x x^T (float64)."""
    G = C // d
    header, moments = 6 * world, G * (d + d * d)
    return {"header_int64": header, "moments_float64": moments, "bytes": 8 * (header + moments)}


def _median_ms(ts) -> float:
    return 1e3 * statistics.median(ts)


def _time_paths(paths: dict, reps: int, warmup: int) -> dict:
    """{name: [seconds per step]} for step functions run in turn (the order rotates every round),
    every process starting each step together."""
    import torch.distributed as dist

    names = list(paths)
    for _ in range(warmup):
        for name in names:
            paths[name]()
    times = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _layer_step(layer, x, g):
    def step():
        y = layer(x)
        y.backward(g)
        x.grad = None
        layer.weight.grad = layer.bias.grad = None
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
    return step


def _collectives_only(C: int, d: int, dev):
    """The layer's two collectives alone (an all_gather of the packed statistics, an all_reduce of
    (D, s)) on buffers of their sizes: the communication floor of a synchronised step."""
    import torch.distributed as dist

    from ...ops.whiten_sync import all_gather, payload_numel

    G = C // d
    packed = torch.zeros(payload_numel(G, d), device=dev)
    reduced = torch.zeros(G * d * (d + 1), device=dev)

    def step():
        all_gather(packed, None)
        dist.all_reduce(reduced)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return step


def _decor_step(x, d: int, group):
    from ...objective import decorrelation_loss

    def step():
        decorrelation_loss(x, d, process_group=group).backward()
        x.grad = None
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
    return step


def _decor_collectives_only(C: int, d: int, world: int, dev):
    """The global term's two all_reduces alone (the int64 header, the float64 moments) on buffers
    of their sizes."""
    import torch.distributed as dist

    n = decor_numbers(C, d, world)
    header = torch.zeros(n["header_int64"], dtype=torch.int64, device=dev)
    moments = torch.zeros(n["moments_float64"], dtype=torch.float64, device=dev)

    def step():
        dist.all_reduce(header, op=dist.ReduceOp.MAX)
        dist.all_reduce(moments)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return step


def _objective_steps(case, gen, dev) -> tuple[dict, int]:
    """{path: step} of the tiny CNN's SaliencyDecor objective in DDP (the term per rank, of the
    global batch), and the channels of its decorrelated layer."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ...nn import SyncGroupWhitening
    from ...objective import SaliencyDecor
    from ..models import build_model

    _, n, d = case
    x = torch.rand(n, 1, 8, 8, generator=gen).to(dev)
    y = torch.randint(0, 10, (n,), generator=gen).to(dev)
    steps, channels = {}, 0
    for path, group in zip(DECOR_PATHS, (None, dist.group.WORLD)):
        torch.manual_seed(0)
        model = SyncGroupWhitening.convert_sync_whitening(build_model("tiny", 1, 10, norm="whitening",
                                                                      num_channels=d).to(dev))
        objective = SaliencyDecor(model, lambda_consistency=1.0, lambda_decor=0.1, num_channels=d,
                                  generator=torch.Generator(device=dev).manual_seed(1), process_group=group)
        channels = objective.decor_layers[0][1].in_features
        ddp = DDP(objective, device_ids=[dev.index] if dev.type == "cuda" else None, forward_sync_buffers=False)

        def step(ddp=ddp):
            ddp(x, y).total.backward()
            ddp.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        steps[path] = step
    return steps, channels


def _decor_rows(job: dict, world: int, gen, dev) -> list:
    import torch.distributed as dist

    rows = []
    for name, shape, d in job["decor"]:
        x = torch.randn(shape, generator=gen).to(dev).requires_grad_()
        paths = {path: _decor_step(x, d, group) for path, group in zip(DECOR_PATHS, (None, dist.group.WORLD))}
        paths["collectives"] = _decor_collectives_only(shape[1], d, world, dev)
        times = _time_paths(paths, job["reps"], job["warmup"])
        rows.append({"case": name, "layers": 1, "channels": shape[1], "d": d,
                     "ms": {k: _median_ms(v) for k, v in times.items()}})
    if job["objective"] is not None:
        paths, channels = _objective_steps(job["objective"], gen, dev)
        times = _time_paths(paths, job["reps"], job["warmup"])
        rows.append({"case": job["objective"][0], "layers": 1, "channels": channels, "d": job["objective"][2],
                     "ms": {k: _median_ms(v) for k, v in times.items()}})
    return rows


def _worker(job: dict, rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ... import convert_whitening
    from ...nn import GroupWhitening, SyncGroupWhitening

    cuda = job["pg_backend"] == "nccl"
    dev = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    torch.set_num_threads(job["threads"])
    dist.init_process_group(job["pg_backend"], init_method=f"file://{job['store']}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=job["timeout"]))
    gen = torch.Generator().manual_seed(rank)
    rows = []
    try:
        for name, shape, d in job["layers"]:
            x = torch.randn(shape, generator=gen).to(dev).requires_grad_()
            g = torch.randn(shape, generator=gen).to(dev)
            sync = SyncGroupWhitening(shape[1], d).to(dev)
            plain = GroupWhitening(shape[1], d).to(dev)
            times = _time_paths({"GroupWhitening": _layer_step(plain, x, g),
                                 "SyncGroupWhitening": _layer_step(sync, x, g),
                                 "collectives": _collectives_only(shape[1], d, dev)}, job["reps"], job["warmup"])
            rows.append({"case": name, "layers": 1, "channels": [shape[1]], "d": d,
                         "ms": {k: _median_ms(v) for k, v in times.items()}})
        if job["resnet"] is not None:
            import torchvision

            name, n, hw, d = job["resnet"]
            x = torch.randn(n, 3, hw, hw, generator=gen).to(dev)
            y = torch.randint(0, 10, (n,), generator=gen).to(dev)
            models = {}
            for variant in ("GroupWhitening", "SyncGroupWhitening"):
                torch.manual_seed(0)
                net = torchvision.models.resnet18(num_classes=10)
                convert_whitening(net, num_channels=d)
                if variant == "SyncGroupWhitening":
                    net = SyncGroupWhitening.convert_sync_whitening(net)
                models[variant] = DDP(net.to(dev), device_ids=[dev.index] if cuda else None,
                                      forward_sync_buffers=False)
            channels = [m.num_features for m in models["GroupWhitening"].modules()
                        if isinstance(m, GroupWhitening)]

            def net_step(model):
                def step():
                    torch.nn.functional.cross_entropy(model(x), y).backward()
                    model.zero_grad(set_to_none=True)
                    if cuda:
                        torch.cuda.synchronize(dev)
                return step

            times = _time_paths({k: net_step(m) for k, m in models.items()}, job["reps"], job["warmup"])
            rows.append({"case": name, "layers": len(channels), "channels": channels, "d": d,
                         "ms": {k: _median_ms(v) for k, v in times.items()}})
        decor_rows = _decor_rows(job, world, gen, dev)
    finally:
        dist.destroy_process_group()
    return {"rows": rows, "decor_rows": decor_rows}


def measure(world: int = 2, *, quick: bool = False, device: str = "cpu", reps: int | None = None,
            threads: int = 1, timeout: float = 900.0, layers=None, resnet="default", decor=None,
            objective="default") -> dict:
    """Run the workers and gather their timings: per case the slowest process's median step time
    of each variant, the ratio, and the bytes per layer and step. ``layers`` (a list like
    LAYER_CASES), ``resnet`` (like RESNET_CASE, or None), ``decor`` (like DECOR_CASES) and
    ``objective`` (like OBJECTIVE_CASE, or None) replace the cases of the run."""
    if world < 2:
        raise ValueError(f"--distributed needs at least 2 processes; got {world}")
    pg_backend = "nccl" if device == "cuda" else "gloo"
    if pg_backend == "nccl" and torch.cuda.device_count() < world:
        raise ValueError(f"--distributed {world} on cuda needs {world} GPUs (nccl: one per process); "
                         f"{torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory(prefix="sdecor-bench-dist-") as tmp:
        job = dict(pg_backend=pg_backend, store=str(Path(tmp) / "store"), threads=threads, timeout=120,
                   reps=reps or (5 if quick else 15), warmup=1 if quick else 3,
                   layers=layers if layers is not None else (QUICK_LAYER_CASES if quick else LAYER_CASES),
                   resnet=(QUICK_RESNET_CASE if quick else RESNET_CASE) if resnet == "default" else resnet,
                   decor=decor if decor is not None else (QUICK_DECOR_CASES if quick else DECOR_CASES),
                   objective=((QUICK_OBJECTIVE_CASE if quick else OBJECTIVE_CASE) if objective == "default"
                              else objective))
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo",
                   OMP_NUM_THREADS=str(threads))
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "33554432")      # steady CPU times: freed memory stays
        env.setdefault("MALLOC_TRIM_THRESHOLD_", "4294967296")
        procs = [subprocess.Popen([sys.executable, "-m", "sdecor.cli.bench.distributed", tmp, str(r), str(world)],
                                  env=env) for r in range(world)]
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise RuntimeError(f"the benchmark's {world} processes did not finish within {timeout:.0f} s")
        if any(p.returncode for p in procs):
            raise RuntimeError("a benchmark process failed (its error is printed above)")
        results = [json.loads((Path(tmp) / f"out{r}.json").read_text()) for r in range(world)]
    rows = []
    for i, row in enumerate(results[0]["rows"]):
        ms = {k: max(res["rows"][i]["ms"][k] for res in results) for k in row["ms"]}
        per_layer = [layer_bytes(C, row["d"], world) for C in row["channels"]]
        rows.append({"case": row["case"], "layers": row["layers"], "d": row["d"], "ms": ms,
                     "ratio": ms["SyncGroupWhitening"] / ms["GroupWhitening"],
                     "extra_ms": ms["SyncGroupWhitening"] - ms["GroupWhitening"],
                     "bytes_per_step": {k: sum(b[k] for b in per_layer) for k in per_layer[0]},
                     "bytes_first_layer": per_layer[0]})
    decor_rows = []
    for i, row in enumerate(results[0]["decor_rows"]):
        ms = {k: max(res["decor_rows"][i]["ms"][k] for res in results) for k in row["ms"]}
        decor_rows.append({"case": row["case"], "layers": row["layers"], "d": row["d"], "ms": ms,
                           "ratio": ms["global"] / ms["per-rank"], "extra_ms": ms["global"] - ms["per-rank"],
                           "numbers_per_step": decor_numbers(row["channels"], row["d"], world)})
    return {"world": world, "pg_backend": pg_backend, "threads_per_process": threads,
            "reps": job["reps"], "rows": rows, "decor_rows": decor_rows}


def format_rows(doc: dict) -> str:
    lines = [f"SyncGroupWhitening vs GroupWhitening, training step (forward + backward), {doc['world']} "
             f"{doc['pg_backend']} processes, {doc['threads_per_process']} thread(s) each; median of "
             f"{doc['reps']} interleaved rounds, slowest process",
             f"{'case':<26} {'GroupWhitening':>15} {'Sync':>11} {'ratio':>7} {'collectives':>12} "
             f"{'fwd sent':>10} {'fwd recv':>10} {'bwd allreduce':>14}"]
    for r in doc["rows"]:
        b = r["bytes_per_step"]
        coll = r["ms"].get("collectives")
        lines.append(f"{r['case']:<26} {r['ms']['GroupWhitening']:>12.2f} ms {r['ms']['SyncGroupWhitening']:>8.2f} ms "
                     f"{r['ratio']:>6.2f}x {'-' if coll is None else f'{coll:.2f} ms':>12} "
                     f"{b['forward_sent']:>9}B {b['forward_received']:>9}B {b['backward_allreduce']:>13}B")
    lines.append("collectives: the layer's all_gather and all_reduce alone, on buffers of their sizes; bytes: per "
                 "process and step, summed over the case's whitening layers")
    if doc.get("decor_rows"):
        lines += ["", "decorrelation term of each process's batch (per-rank) vs of the global batch (global), "
                      "forward + backward; same rounds",
                  f"{'case':<34} {'per-rank':>11} {'global':>11} {'ratio':>7} {'collectives':>12} "
                  f"{'int64':>6} {'float64':>8} {'bytes':>8}"]
        for r in doc["decor_rows"]:
            n, ms = r["numbers_per_step"], r["ms"]
            coll = ms.get("collectives")
            lines.append(f"{r['case']:<34} {ms['per-rank']:>8.2f} ms {ms['global']:>8.2f} ms {r['ratio']:>6.2f}x "
                         f"{'-' if coll is None else f'{coll:.2f} ms':>12} {n['header_int64']:>6} "
                         f"{n['moments_float64']:>8} {n['bytes']:>7}B")
        lines.append("collectives: the term's two all_reduces alone (header, moments); numbers: all-reduced per "
                     "process and step (SaliencyDecor: its one decorrelated layer), the backward none")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tmp, rank, world = Path(argv[0]), int(argv[1]), int(argv[2])
    job = json.loads((tmp / "job.json").read_text())
    out = _worker(job, rank, world)
    (tmp / f"out{rank}.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
