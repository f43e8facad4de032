"""Multi-process tests: worker processes on torch.distributed (gloo, loopback interface only).

:func:`launch` starts ``world`` processes of this file, each running one scenario on its rank and
saving what it saw to ``out<rank>.pt`` in a work folder; the test process compares the ranks' results
with a single-process computation. Rendezvous is a file store in the work folder, gloo talks over
``lo`` (GLOO_SOCKET_IFNAME=lo, MASTER_ADDR=127.0.0.1), and both the process group's timeout and the
launcher's deadline are short, so that a hang fails the test instead of stalling the run.

The inputs of every case come from :func:`case_steps` and :func:`init_layer`, used by the workers and
by the tests alike.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# tests/conftest.py sets TRITON_INTERPRET=1 on a machine without a GPU; the workers inherit it.


class WorkerError(AssertionError):
    pass


def launch(workdir, scenario: str, world: int, spec=None, *, timeout: float = 300.0,
           pg_timeout: float = 60.0, check: bool = True, pg_backend: str = "gloo") -> list:
    """Run ``scenario`` on ``world`` worker processes; returns each rank's saved result (None for a
    rank that saved nothing). Raises WorkerError with the logs when a worker fails (``check``) or
    when they are not done within ``timeout`` seconds (then they are killed). ``pg_backend``
    "nccl": rank r on cuda:r."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.save({"scenario": scenario, "spec": spec, "pg_timeout": pg_timeout, "pg_backend": pg_backend},
               workdir / "spec.pt")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", PYTHONDONTWRITEBYTECODE="1",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    procs, logs = [], []
    for rank in range(world):
        log = open(workdir / f"log{rank}.txt", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__)), str(workdir), str(rank), str(world)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    for log in logs:
        log.close()

    def tails() -> str:
        return "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n"
                         + (workdir / f"log{r}.txt").read_text()[-3000:] for r, p in enumerate(procs))

    if timed_out:
        raise WorkerError(f"{scenario}: the workers did not finish within {timeout} s\n{tails()}")
    if check and any(p.returncode != 0 for p in procs):
        raise WorkerError(f"{scenario}: a worker failed\n{tails()}")
    out = []
    for rank in range(world):
        f = workdir / f"out{rank}.pt"
        out.append(torch.load(f, weights_only=False) if f.exists() else None)
    return out


# ---------------------------------------------------------------------------------------------------
# inputs shared by the workers and the tests


def offsets(sizes) -> list[tuple[int, int]]:
    """[lo, hi) of each rank's samples in the concatenated batch."""
    out, lo = [], 0
    for n in sizes:
        out.append((lo, lo + n))
        lo += n
    return out


def case_steps(case: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, r) of every step: the concatenated batch of all ranks and the weights of the loss
    sum(y * r). ``spread`` shifts each rank's samples by a different constant (ranks with unlike
    means), ``scale`` multiplies everything, ``offset`` is then added to everything."""
    g = torch.Generator().manual_seed(case["seed"])
    n = sum(case["sizes"])
    steps = []
    for _ in range(case["steps"]):
        x = torch.randn((n, *case["shape"]), generator=g, dtype=torch.float64)
        C = case["shape"][0]
        x = x * (0.5 + torch.rand(C, generator=g, dtype=torch.float64)).reshape((1, C) + (1,) * (x.dim() - 2))
        x = x + torch.randn(C, generator=g, dtype=torch.float64).reshape((1, C) + (1,) * (x.dim() - 2))
        if case.get("spread"):
            for k, (lo, hi) in enumerate(offsets(case["sizes"])):
                x[lo:hi] += case["spread"] * (-1) ** k
        x = x * case.get("scale", 1.0) + case.get("offset", 0.0)
        r = torch.randn(x.shape, generator=g, dtype=torch.float64)
        steps.append((x.to(case["dtype"]), r.to(case["dtype"])))
    return steps


def layer_kwargs(case: dict) -> dict:
    return dict(method=case["method"], affine=case.get("affine", True), momentum=case.get("momentum", 0.1),
                track_running_stats=case.get("track", True), dtype=case.get("param_dtype", torch.float32),
                last_group=case.get("last_group", "even"))


def init_layer(layer, case: dict):
    """Random weight and bias from the case's seed (the same on every rank)."""
    if layer.affine:
        g = torch.Generator().manual_seed(case["seed"] + 1)
        with torch.no_grad():
            layer.weight.copy_(0.5 + torch.rand(layer.weight.shape, generator=g))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer


def layout(x: torch.Tensor, case: dict) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if case.get("channels_last") else x


# ---------------------------------------------------------------------------------------------------
# collectives seen by the workers


class Collectives:
    """Counts the torch.distributed collectives called from Python (name and numbers carried)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
             "reduce_scatter_tensor", "all_to_all_single")

    def __init__(self):
        import torch.distributed as dist

        self.calls = []
        for name in self.NAMES:
            real = getattr(dist, name, None)
            if real is not None:
                setattr(dist, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def counted(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            carried = tensors[-1] if name.startswith("all_gather") else tensors[0]
            self.calls.append((name, carried.numel(), carried.element_size()))
            return real(*args, **kwargs)
        return counted

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls


# ---------------------------------------------------------------------------------------------------
# scenarios (run on every rank)


def scenario_compare(rank: int, world: int, cases: list) -> dict:
    """Each case: SyncGroupWhitening (optionally in DDP) trained ``steps`` steps on this rank's share
    of the case's batches, recording outputs, input and parameter gradients, the collectives of the
    forward and of the backward, and the final state."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sdecor

    seen = Collectives()
    results = {}
    for case in cases:
        lo, hi = offsets(case["sizes"])[rank]
        # CUDA: rank r on cuda:r (nccl), or every rank on the one GPU (gloo carries CUDA tensors too)
        dev = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if case.get("device") == "cuda" else "cpu")
        with sdecor.use_backend(case["backend"]):
            layer = init_layer(sdecor.SyncGroupWhitening(case["shape"][0], case["d"], **layer_kwargs(case)), case)
            layer = layer.to(dev)
            ids = [dev.index] if dev.type == "cuda" else None
            model = DDP(layer, device_ids=ids, forward_sync_buffers=False) if case.get("ddp") else layer
            rec = {"y": [], "gx": [], "gw": [], "gb": [], "fwd": [], "bwd": []}
            for x_all, r_all in case_steps(case):
                x = layout(x_all[lo:hi].to(dev), case).clone().requires_grad_()
                seen.take()
                y = model(x)
                rec["fwd"].append(seen.take())
                (y * r_all[lo:hi].to(dev)).sum().backward()
                rec["bwd"].append(seen.take())
                rec["y"].append(y.detach().cpu())
                rec["gx"].append(x.grad.cpu())
                if layer.affine:
                    rec["gw"].append(layer.weight.grad.cpu())
                    rec["gb"].append(layer.bias.grad.cpu())
                    layer.weight.grad = layer.bias.grad = None
            rec["state"] = {k: v.cpu() for k, v in layer.state_dict().items()}
            rec["y_format_channels_last"] = bool(y.is_contiguous(memory_format=torch.channels_last))
        results[case["id"]] = rec
        dist.barrier()
    return results


def scenario_resnet(rank: int, world: int, spec: dict) -> dict:
    """torchvision resnet18, BatchNorm converted to GroupWhitening then synchronised, in DDP: SGD
    steps on this rank's share of each batch; returns every parameter and buffer at the end."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sdecor

    model = resnet_model(spec)
    model = sdecor.SyncGroupWhitening.convert_sync_whitening(model)
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, sdecor.GroupWhitening)})
    ddp = DDP(model, forward_sync_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=spec["lr"], momentum=0.9)
    lo, hi = offsets(spec["sizes"])[rank]
    losses = []
    for x, y in resnet_batches(spec):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(ddp(x[lo:hi]), y[lo:hi])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "kinds": kinds,
            "losses": torch.stack(losses)}


def resnet_model(spec: dict):
    import torchvision

    import sdecor

    torch.manual_seed(spec["seed"])
    model = torchvision.models.resnet18(num_classes=spec["classes"])
    sdecor.convert_whitening(model, num_channels=spec["d"], method=spec["method"])
    return model.to(spec["dtype"])


def resnet_batches(spec: dict):
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    n = sum(spec["sizes"])
    return [(torch.randn(n, 3, spec["hw"], spec["hw"], generator=g, dtype=spec["dtype"]),
             torch.randint(0, spec["classes"], (n,), generator=g)) for _ in range(spec["steps"])]


def scenario_failures(rank: int, world: int, spec: dict) -> dict:
    """What bad input, eval mode, double backward and a failing rank do; every step's outcome."""
    import torch.distributed as dist

    import sdecor

    out = {}
    seen = Collectives()
    x = torch.randn(4, 16, 3, generator=torch.Generator().manual_seed(rank))

    def outcome(fn):
        try:
            value = fn()
            return ("ok", value)
        except Exception as err:                                      # noqa: BLE001 - recorded for the test
            return (type(err).__name__, str(err))

    layer = sdecor.SyncGroupWhitening(16, 8)
    seen.take()
    # 1. bad input on every rank: an error before any collective, then the group still works
    out["bad_channels"] = outcome(lambda: layer(torch.randn(4, 12, 3)))
    out["bad_dtype"] = outcome(lambda: layer(torch.zeros(4, 16, 3, dtype=torch.int64)))
    with sdecor.use_backend("triton"):                              # takes no float64: refused up front
        out["forced_unavailable"] = outcome(lambda: layer(x.double()))
    on_meta = sdecor.SyncGroupWhitening(16, 8, device="meta")       # the layer on another device than x
    out["bad_device"] = outcome(lambda: on_meta(x))
    out["calls_after_bad"] = seen.take()
    out["good_after_bad"] = outcome(lambda: layer(x).detach())
    out["calls_good"] = seen.take()
    # 2. eval mode: no communication, GroupWhitening exactly
    layer.eval()
    plain = sdecor.GroupWhitening(16, 8)
    plain.load_state_dict(layer.state_dict())
    plain.eval()
    out["eval"] = (layer(x).detach(), plain(x).detach(), seen.take())
    layer.train()
    # 3. double backward
    xg = x.clone().requires_grad_()
    y = layer(xg)

    def double():
        (g,) = torch.autograd.grad((y * y).sum(), xg, create_graph=True)
        return g.sum()

    out["double_backward"] = outcome(double)
    seen.take()
    # 4. ranks together hold fewer than 2 samples: the running statistics stay as they were
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    tiny = torch.randn(1 if rank == 0 else 0, 16, 1)
    out["tiny"] = outcome(lambda: layer(tiny).detach())
    out["tiny_state_same"] = all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    dist.barrier()
    # 5. rank 0 fails before the forward of a step: the others wait until the process group's timeout
    start = time.monotonic()
    if rank == 0:
        out["failing"] = outcome(lambda: layer(torch.randn(4, 12, 3)))
        time.sleep(spec["hold"])                                       # alive, but never joins the step
    else:
        out["failing"] = outcome(lambda: layer(x).detach())
    out["failing_seconds"] = time.monotonic() - start
    return out


def scenario_batchnorm(rank: int, world: int, cases: list) -> dict:
    """Each case: sdecor.SyncBatchNormGloo trained ``steps`` steps on this rank's share of the case's
    batches (loss sum(y * r)), recording outputs, input and parameter gradients and the collectives
    of each step, the final state, and the eval output on the whole batch of the last step with the
    collectives it made; then bad input, refused before any collective."""
    import torch.distributed as dist

    import sdecor

    seen = Collectives()
    results = {}
    for case in cases:
        lo, hi = offsets(case["sizes"])[rank]
        layer = sdecor.SyncBatchNormGloo(case["shape"][0], momentum=case.get("momentum", 0.1),
                                         affine=case.get("affine", True), track_running_stats=case.get("track", True))
        layer = init_layer(layer, case).to(case["dtype"])
        rec = {"y": [], "gx": [], "gw": [], "gb": [], "fwd": [], "bwd": []}
        for x_all, r_all in case_steps(case):
            x = layout(x_all[lo:hi], case).clone().requires_grad_()
            seen.take()
            y = layer(x)
            rec["fwd"].append(seen.take())
            (y * r_all[lo:hi]).sum().backward()
            rec["bwd"].append(seen.take())
            rec["y"].append(y.detach())
            rec["gx"].append(x.grad)
            if layer.affine:
                rec["gw"].append(layer.weight.grad.clone())
                rec["gb"].append(layer.bias.grad.clone())
                layer.weight.grad = layer.bias.grad = None
        rec["y_channels_last"] = bool(y.is_contiguous(memory_format=torch.channels_last)) if y.dim() == 4 else None
        rec["state"] = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.eval()
        with torch.no_grad():
            rec["eval"] = layer(x_all)
        rec["eval_calls"] = seen.take()
        results[case["id"]] = rec
        dist.barrier()
    layer = sdecor.SyncBatchNormGloo(4)
    seen.take()
    bad = {}
    for name, x in (("channels", torch.randn(3, 5, 2)), ("dims", torch.randn(4)), ("dtype", torch.ones(3, 4, 2).long())):
        try:
            layer(x)
            bad[name] = ("ok", None)
        except Exception as err:                                      # noqa: BLE001 - recorded for the test
            bad[name] = (type(err).__name__, str(err))
    results["bad_input"] = bad
    results["bad_input_calls"] = seen.take()
    results["bad_input_state_same"] = int(layer.num_batches_tracked) == 0
    return results


SCENARIOS = {"compare": scenario_compare, "resnet": scenario_resnet, "failures": scenario_failures,
             "batchnorm": scenario_batchnorm}


def main(workdir: str, rank: int, world: int) -> int:
    import torch.distributed as dist

    workdir = Path(workdir)
    job = torch.load(workdir / "spec.pt", weights_only=False)
    torch.set_num_threads(1)
    if job["pg_backend"] == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(job["pg_backend"], init_method=f"file://{workdir / 'store'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=job["pg_timeout"]))
    result = SCENARIOS[job["scenario"]](rank, world, job["spec"])
    torch.save(result, workdir / f"out{rank}.pt")
    if job["scenario"] != "failures":                                 # a timed-out group cannot be torn down
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
