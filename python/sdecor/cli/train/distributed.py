"""Distributed training (``python -m sdecor train --distributed``, launched by torchrun).

:func:`check_distributed` reads this process's place from torchrun's environment and checks what a
distributed run needs before any process group exists; :func:`process_group` joins and leaves the
group; :func:`sync_norm_layers` makes the norm layers synchronise their batch statistics over the
ranks (BatchNorm on CPU tensors by :class:`sdecor.SyncBatchNormGloo`, as torch's SyncBatchNorm
takes GPU tensors only); :func:`decor_mode` says whether the decorrelation loss is that of the
global batch (the default) or of each rank's share (--decor-per-rank). The training loop itself
(:func:`sdecor.cli.train.loop.train_model`) takes the :class:`Distributed` of this process.
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch

from .args import UsageError, check_out_dir, option_name
from .config import ConfigError, TrainConfig

# the variables torchrun sets for each process it starts (env:// initialisation reads them)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# A collective that makes no progress for this long fails the run instead of hanging it. The longest
# gap between two collectives is one training step (evaluation and saving need none).
DIST_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a distributed run: torchrun's RANK, WORLD_SIZE and LOCAL_RANK."""

    rank: int
    world_size: int
    local_rank: int

    def device(self, device) -> torch.device:
        """This rank's device for --device ``device``: cpu, or cuda:LOCAL_RANK for cuda."""
        dev = torch.device(device)
        return torch.device("cuda", self.local_rank) if dev.type == "cuda" else dev

    @staticmethod
    def backend(device) -> str:
        """The torch.distributed backend for --device ``device``: nccl on cuda, gloo on cpu."""
        return "nccl" if torch.device(device).type == "cuda" else "gloo"


def check_distributed_config(cfg: TrainConfig, dist: Distributed) -> None:
    """What a distributed run needs of a (checked) configuration: a global batch that splits into
    world_size equal shares of at least 2 samples, and cpu or cuda (without an index: each rank
    takes cuda:LOCAL_RANK). Raises :class:`ConfigError` naming the field."""
    world_size = dist.world_size
    if cfg.batch_size % world_size:
        raise ConfigError("batch_size", f"batch_size {cfg.batch_size} is the global batch of a step and must "
                                        f"split evenly over the {world_size} ranks; use a multiple of {world_size}")
    if cfg.batch_size // world_size < 2:
        raise ConfigError("batch_size", f"batch_size {cfg.batch_size} over {world_size} ranks gives "
                                        f"{cfg.batch_size // world_size} sample per rank; batch statistics need at "
                                        f"least 2 per rank, so at least {2 * world_size}")
    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        if dev.index is not None:
            raise ConfigError("device", f"device {cfg.device!r}: a distributed run takes device cuda, and each "
                                        f"rank uses cuda:LOCAL_RANK")
        if dist.local_rank >= torch.cuda.device_count():
            raise ConfigError("device", f"device cuda: LOCAL_RANK={dist.local_rank} but there are "
                                        f"{torch.cuda.device_count()} CUDA device(s); start at most that many "
                                        f"processes per node")
        if not torch.distributed.is_nccl_available():
            raise ConfigError("device", "device cuda: a distributed run on cuda needs NCCL, which this torch "
                                        "build lacks")
    elif dev.type != "cpu":
        raise ConfigError("device", f"device {cfg.device!r}: a distributed run trains on cpu (gloo) or cuda (nccl)")


def check_distributed(args: argparse.Namespace, cfg: TrainConfig, environ=None) -> Optional[Distributed]:
    """With --distributed: this process's :class:`Distributed` from torchrun's environment
    (``environ``, default os.environ), after checking what a distributed run needs; None without it.
    Nothing is initialised. Raises :class:`UsageError` naming the option.

    Without --distributed, a process started by torchrun next to others (WORLD_SIZE > 1) is an
    error too: each would train its own model and write the same files.
    """
    environ = os.environ if environ is None else environ
    if not args.distributed:
        if environ.get("WORLD_SIZE", "1") not in ("", "0", "1") and "RANK" in environ:
            raise UsageError("--distributed", f"this process is one of WORLD_SIZE={environ['WORLD_SIZE']} "
                                              f"started by torchrun: add --distributed to train one model "
                                              f"together")
        return None
    if not torch.distributed.is_available():
        raise UsageError("--distributed", "this torch build has no torch.distributed")
    missing = [name for name in TORCHRUN_ENV if not environ.get(name)]
    if missing:
        raise UsageError("--distributed", f"--distributed needs the environment torchrun sets ({', '.join(missing)} "
                                          f"missing): launch under torchrun, e.g. torchrun --nproc-per-node 2 "
                                          f"-m sdecor train --distributed ...")
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        try:
            values[name] = int(environ[name])
        except ValueError:
            values[name] = None
        if values[name] is None or values[name] < 0:
            raise UsageError("--distributed", f"--distributed: {name}={environ[name]!r} is not an int >= 0; "
                                              f"launch under torchrun")
    dist = Distributed(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if not dist.rank < dist.world_size:
        raise UsageError("--distributed", f"--distributed: RANK={dist.rank} is not below WORLD_SIZE="
                                          f"{dist.world_size}; launch under torchrun")
    try:
        check_distributed_config(cfg, dist)
    except ConfigError as err:
        raise UsageError(option_name(err.field), str(err)) from None
    if args.save_all_ranks and dist.rank > 0:
        try:
            check_out_dir(args.out, (f"model-rank{dist.rank}.pt",))
        except ValueError as err:
            raise UsageError("--out", str(err)) from None
    return dist


# how a distributed run computes the decorrelation loss (metrics.json's distributed "decorrelation")
DECOR_MODES = {
    "global": "the decorrelation loss of the global batch (group covariances all-reduced over the ranks)",
    "per-rank": "the decorrelation loss of each rank's share of the batch (--decor-per-rank)",
    "none": "no decorrelation loss (--lambda-decor 0)",
}


def decor_mode(cfg: TrainConfig, per_rank: bool = False) -> str:
    """How a distributed run of cfg computes its decorrelation term (a key of :data:`DECOR_MODES`):
    "none" with lambda_decor 0, else "per-rank" with ``per_rank`` (--decor-per-rank), else "global"."""
    if not cfg.lambda_decor > 0:
        return "none"
    return "per-rank" if per_rank else "global"


# said once by a run whose BatchNorm layers are synchronised by sdecor's layer
GLOO_BATCHNORM_NOTE = ("torch.nn.SyncBatchNorm does not run on CPU tensors: BatchNorm statistics synced over "
                       "gloo by sdecor.SyncBatchNormGloo")


def batchnorm_sync(cfg: TrainConfig) -> Optional[str]:
    """How a distributed run of cfg synchronises its BatchNorm layers: None without BatchNorm,
    "torch" (torch.nn.SyncBatchNorm) on cuda, "gloo" (:class:`sdecor.SyncBatchNormGloo`) on cpu,
    where torch's SyncBatchNorm does not run."""
    if cfg.resolved_norm() != "batch":
        return None
    return "torch" if torch.device(cfg.device).type == "cuda" else "gloo"


def sync_norm_layers(model: torch.nn.Module, device="cpu") -> torch.nn.Module:
    """model with every GroupWhitening made a SyncGroupWhitening and every BatchNorm synchronised
    (the same parameters and buffers), so that the batch statistics are those of all ranks' samples:
    torch.nn.SyncBatchNorm on cuda, :class:`sdecor.SyncBatchNormGloo` elsewhere (torch's takes GPU
    tensors only; sdecor's keeps BatchNorm's semantics on the global batch over gloo)."""
    from ...nn import SyncGroupWhitening
    from ...sync_batchnorm import SyncBatchNormGloo

    model = SyncGroupWhitening.convert_sync_whitening(model)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if torch.device(device).type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            model = SyncBatchNormGloo.convert_sync_batchnorm(model)
    return model


@contextmanager
def process_group(dist: Distributed, device):
    """Join the process group torchrun's environment describes (on cuda, this rank's device made
    the current one first) for the block, and leave it when the block ends, however it ends."""
    dev = dist.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group(dist.backend(device), init_method="env://", rank=dist.rank,
                                         world_size=dist.world_size, timeout=DIST_TIMEOUT,
                                         device_id=dev if dev.type == "cuda" else None)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
