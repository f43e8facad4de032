"""Worker processes for tests/test_decor_global.py: decorrelation_loss and SaliencyDecor on the global
batch over torch.distributed (gloo on the loopback interface only).

:func:`launch` starts ``world`` processes of this file; each runs every part of the job on its rank
and saves what it saw to ``out<rank>.pt`` in a work folder. Rendezvous is a file store in the work
folder (no port to pick), gloo talks over ``lo``, and the process groups' timeouts and the launcher's
deadline are short, so that a hang fails the test instead of stalling the run.

The inputs come from :func:`case_x`, :func:`sd_model` and :func:`sd_batch`, used by the workers and by
the tests alike.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class WorkerError(AssertionError):
    pass


def launch(workdir, world: int, spec: dict, *, timeout: float = 120.0, pg_timeout: float = 60.0) -> list:
    """Run the job on ``world`` worker processes; each rank's saved result. Raises WorkerError with the
    logs when a worker fails or they are not done within ``timeout`` seconds (then they are killed)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.save({"spec": spec, "pg_timeout": pg_timeout}, workdir / "spec.pt")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", PYTHONDONTWRITEBYTECODE="1",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    procs, logs = [], []
    try:
        for rank in range(world):
            logs.append(open(workdir / f"log{rank}.txt", "w"))
            procs.append(subprocess.Popen([sys.executable, str(Path(__file__)), str(workdir), str(rank), str(world)],
                                          env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()

    def tails() -> str:
        return "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n"
                         + (workdir / f"log{r}.txt").read_text()[-3000:] for r, p in enumerate(procs))

    if timed_out:
        raise WorkerError(f"the workers did not finish within {timeout} s\n{tails()}")
    if any(p.returncode != 0 for p in procs):
        raise WorkerError(f"a worker failed\n{tails()}")
    return [torch.load(workdir / f"out{rank}.pt", weights_only=False) for rank in range(world)]


# ---------------------------------------------------------------------------------------------------
# inputs shared by the workers and the tests


def offsets(sizes) -> list[tuple[int, int]]:
    """[lo, hi) of each rank's samples in the concatenated batch."""
    out, lo = [], 0
    for n in sizes:
        out.append((lo, lo + n))
        lo += n
    return out


def case_x(case: dict) -> torch.Tensor:
    """The concatenated batch of all ranks (sum(sizes), *shape): correlated channels of unit-order
    variance; ``spread`` adds spread * k to the samples of rank k (ranks with unlike means),
    ``offset`` adds the same constant to all, ``scale`` multiplies everything."""
    g = torch.Generator().manual_seed(case["seed"])
    shape = case["shape"]
    C = shape[0]
    x = torch.randn((sum(case["sizes"]), *shape), generator=g, dtype=torch.float64)
    mix = torch.eye(C, dtype=torch.float64) + 0.3 * torch.randn(C, C, generator=g, dtype=torch.float64)
    x = torch.einsum("dc,nc...->nd...", mix, x)
    x = x + torch.randn(C, generator=g, dtype=torch.float64).reshape((1, C) + (1,) * (x.dim() - 2))
    for k, (lo, hi) in enumerate(offsets(case["sizes"])):
        x[lo:hi] += case.get("spread", 0.0) * k
    x = (x + case.get("offset", 0.0)) * case.get("scale", 1.0)
    return x.to(case["dtype"])


def sd_model(seed: int, dtype=torch.float32) -> nn.Module:
    """A small CNN without batch statistics (so that a step is the same per sample in any batch)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 5)).to(dtype)


def sd_batch(spec: dict):
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    n = sum(spec["sizes"])
    return (torch.randn(n, 3, 8, 8, generator=g, dtype=spec["dtype"]), torch.randint(0, 5, (n,), generator=g))


def sd_objective(model: nn.Module, spec: dict, process_group=None):
    import sdecor

    # decorrelated: the 4D input of the second convolution (8 channels) and the last Linear's (16)
    return sdecor.SaliencyDecor(model, mask_ratio=0.5, fill="mean", lambda_consistency=1.0,
                                lambda_decor=spec["lambda_decor"], decor_layers=["2", "7"], num_channels=8,
                                kind=spec["kind"], process_group=process_group)


def sgd_step(objective, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict:
    """One SGD step of ``objective`` (a SaliencyDecor or its DDP wrapper) on (x, y); the terms, and
    every parameter after the step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad(set_to_none=True)
    terms = objective(x, y)
    terms.total.backward()
    opt.step()
    return {"terms": [t.detach().clone() for t in terms],
            "params": {k: v.detach().clone() for k, v in model.named_parameters()}}


# ---------------------------------------------------------------------------------------------------
# the job of every rank


def outcome(fn):
    try:
        return ("ok", fn())
    except Exception as err:                                          # noqa: BLE001 - recorded for the test
        return (type(err).__name__, str(err))


def run_cases(rank: int, cases: list, group, seen) -> dict:
    """decorrelation_loss on this rank's share of each case's batch: the loss, the input gradient and
    the collectives of the forward and of the backward."""
    import sdecor

    out = {}
    for case in cases:
        lo, hi = offsets(case["sizes"])[rank]
        x = case_x(case)[lo:hi].clone().requires_grad_()
        seen.take()
        loss = sdecor.decorrelation_loss(x, case["d"], kind=case["kind"], last_group=case["last_group"],
                                         process_group=group)
        fwd = seen.take()
        loss.backward()
        out[case["id"]] = {"loss": loss.detach(), "gx": x.grad, "fwd": fwd, "bwd": seen.take()}
    return out


def run_saliency(rank: int, spec: dict, group) -> dict:
    """One SGD step of SaliencyDecor in DDP on this rank's share of the batch, with the decorrelation
    term on the global batch (``process_group``) and per rank (None)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    lo, hi = offsets(spec["sizes"])[rank]
    x, y = sd_batch(spec)
    out = {}
    for name, pg in (("global", group),) + ((("per_rank", None),) if spec["per_rank"] else ()):
        model = sd_model(spec["seed"], spec["dtype"])
        ddp = DDP(sd_objective(model, spec, pg), find_unused_parameters=False)
        out[name] = sgd_step(ddp, model, x[lo:hi], y[lo:hi], spec["lr"])
    return out


def run_bad_input(rank: int, group, seen) -> dict:
    """What bad input does on each rank; every call's outcome and the collectives it made."""
    import torch.distributed as dist

    import sdecor

    out = {}
    g = torch.Generator().manual_seed(10 + rank)

    def x_of(C, n=4):
        return torch.randn(n, C, 3, generator=g)

    def record(name, fn):
        seen.take()
        out[name] = outcome(fn)
        out[name + "_calls"] = seen.take()

    record("not_a_group", lambda: sdecor.decorrelation_loss(x_of(16), 8, process_group="WORLD"))
    record("non_member", lambda: sdecor.decorrelation_loss(x_of(16), 8,
                                                           process_group=dist.GroupMember.NON_GROUP_MEMBER))
    record("objective_not_a_group", lambda: sdecor.SaliencyDecor(sd_model(0), process_group=3))
    # channel counts that differ (each valid on its rank)
    record("channels", lambda: sdecor.decorrelation_loss(x_of(12 if rank == 1 else 16), 4, process_group=group))
    record("group_size", lambda: sdecor.decorrelation_loss(x_of(16), 4 if rank == 0 else 8, process_group=group))
    record("kind", lambda: sdecor.decorrelation_loss(x_of(16), 8, "corr" if rank == 2 else "decov",
                                                     process_group=group))
    # arguments that fail on one rank only: that rank raises its error, the others theirs
    record("one_rank_fails", lambda: sdecor.decorrelation_loss(x_of(12 if rank == 2 else 16), 8,
                                                               process_group=group))
    # fewer than 2 samples over all ranks together (one rank alone would be fine with 2)
    record("too_few", lambda: sdecor.decorrelation_loss(x_of(16, 1 if rank == 0 else 0)[..., :1], 8,
                                                        process_group=group))
    # the group still works, and a rank may hold a single sample when the others hold more
    record("good_after_bad", lambda: sdecor.decorrelation_loss(x_of(16, 1 if rank == 0 else 3)[..., :1], 8,
                                                               process_group=group).detach())
    return out


def run_timeout(rank: int, spec: dict, short_group) -> dict:
    """Rank 0 never joins the call (it stays alive); the others wait until the group's timeout."""
    import sdecor

    start = time.monotonic()
    if rank == 0:
        time.sleep(spec["hold"])
        result = ("skipped", None)
    else:
        result = outcome(lambda: sdecor.decorrelation_loss(torch.randn(4, 16), 8, process_group=short_group))
    return {"timeout": result, "timeout_seconds": time.monotonic() - start}


def main(workdir: str, rank: int, world: int) -> int:
    import torch.distributed as dist

    from dist_worker import Collectives

    workdir = Path(workdir)
    job = torch.load(workdir / "spec.pt", weights_only=False)
    spec = job["spec"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir / 'store'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=job["pg_timeout"]))
    group = dist.group.WORLD
    # a second group over the same ranks with a short timeout, for the part where one rank never joins
    short = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=spec["short_timeout"]))
    seen = Collectives()
    result = {"cases": run_cases(rank, spec["cases"], group, seen)}
    result["saliency"] = {s["id"]: run_saliency(rank, s, group) for s in spec["saliency"]}
    result["bad"] = run_bad_input(rank, group, seen)
    dist.barrier()
    result.update(run_timeout(rank, spec, short))
    torch.save(result, workdir / f"out{rank}.pt")
    # a group that timed out cannot be torn down: leave without destroy_process_group
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
