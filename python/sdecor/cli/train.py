"""``python -m sdecor train``: train a small CNN with the SaliencyDecor objective and evaluate it.

The objective is CE + lambda_consistency * KL(f(x) || f(x masked)) + lambda_decor * decorrelation
(:class:`sdecor.SaliencyDecor`); with both lambdas 0 it is plain cross-entropy. The model's norm
layers are BatchNorm where decorrelation is off and GroupWhitening where it is on (``--norm auto``).
After training it reports test accuracy and the saliency metrics of :mod:`sdecor.metrics`, and
writes ``metrics.json`` and ``model.pt`` into ``--out``. ``--amp bf16|fp16`` runs the training steps
in mixed precision (forward and loss under torch.autocast; fp16 with a GradScaler); evaluation stays
in fp32.

``--distributed`` trains data-parallel over the processes that torchrun starts (see
:func:`check_distributed` and :func:`train_model`): --batch-size stays the global batch, split
evenly over the ranks; only rank 0 prints and writes.

The same functions (:func:`train_model`, :func:`evaluate`) run every configuration of the demo.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.nn.functional as F

from . import data as data_mod
from .. import metrics
from .._optional import require
from .models import MODELS, NORMS, build_model, check_group_size

__all__ = ["AMP_DTYPES", "ConfigError", "Distributed", "TrainConfig", "TrainResult", "UsageError", "accuracy",
           "add_arguments", "batches", "check_amp", "check_args", "check_device", "check_distributed",
           "check_distributed_config", "check_out_dir", "evaluate", "run", "train_model"]

FILLS = ("zero", "mean", "uniform")

# --amp: the autocast dtype of the training steps (None: fp32, no autocast)
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything that defines one training run."""

    dataset: str = "digits"
    model: str = "tiny"
    norm: str = "auto"                  # "auto": whitening when lambda_decor > 0, else batch
    lambda_consistency: float = 0.0
    lambda_decor: float = 0.0
    mask_ratio: float = 0.5
    fill: str = "uniform"
    num_channels: int = 16
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    device: str = "cpu"
    seed: int = 0
    width: Optional[int] = None
    amp: str = "off"                    # "bf16" / "fp16": training steps under torch.autocast

    def resolved_norm(self) -> str:
        if self.norm == "auto":
            return "whitening" if self.lambda_decor > 0 else "batch"
        return self.norm

    def check(self) -> None:
        """Every field, before any work; raises :class:`ConfigError` (a ValueError) naming the field."""
        if self.dataset not in data_mod.DATASETS:
            raise ConfigError("dataset", f"dataset must be one of {data_mod.DATASETS}; got {self.dataset!r}")
        if self.model not in MODELS:
            raise ConfigError("model", f"model must be one of {tuple(MODELS)}; got {self.model!r}")
        if self.norm not in ("auto",) + NORMS:
            raise ConfigError("norm", f"norm must be one of {('auto',) + NORMS}; got {self.norm!r}")
        for name in ("lambda_consistency", "lambda_decor", "lr", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(name, f"{name} must be a finite number >= 0; got {value!r}")
        if self.lr <= 0:
            raise ConfigError("lr", f"lr must be > 0; got {self.lr!r}")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ConfigError("mask_ratio", f"mask_ratio must be in [0, 1]; got {self.mask_ratio!r}")
        if self.fill not in FILLS:
            raise ConfigError("fill", f"fill must be one of {FILLS}; got {self.fill!r}")
        for name in ("num_channels", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"{name} must be a positive int; got {value!r}")
        if self.batch_size < 2:
            raise ConfigError("batch_size", f"batch_size must be >= 2 (batch statistics); got {self.batch_size}")
        if self.width is not None and (isinstance(self.width, bool) or not isinstance(self.width, int)
                                       or self.width < 1):
            raise ConfigError("width", f"width must be a positive int (or None, the model's default); "
                                       f"got {self.width!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < MAX_SEED:
            raise ConfigError("seed", f"seed must be an int in [0, 2**63 - 1); got {self.seed!r}")
        try:
            check_device(self.device)
        except ValueError as err:
            raise ConfigError("device", str(err)) from None
        try:
            check_amp(self.amp, self.device)
        except ValueError as err:
            raise ConfigError("amp", str(err)) from None
        try:
            check_group_size(self.model, self.resolved_norm(), self.num_channels, self.width,
                             decorrelate=self.lambda_decor > 0)
        except ValueError as err:
            raise ConfigError("num_channels", str(err)) from None


class ConfigError(ValueError):
    """A field of :class:`TrainConfig` out of range; ``field`` names it (``sdecor train`` reports
    it as the option ``--field``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# torch seeds are 64-bit; the objective's generator takes seed + 1
MAX_SEED = 2 ** 63 - 1


def check_device(device) -> torch.device:
    """A device this machine can train on: cpu, or cuda[:index] / mps / xpu where available.

    Raises ValueError naming the device (cheap: no tensor is made, nothing is initialised but the
    driver query of torch.cuda.is_available()).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device; use cpu, cuda, cuda:<index>, mps or xpu") \
            from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: no MPS device is available")
        return dev
    if dev.type == "xpu":
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise ValueError(f"device {device!r}: no XPU device is available")
        return dev
    raise ValueError(f"device {device!r} cannot train a model here; use cpu, cuda, cuda:<index>, mps or xpu")


def check_out_dir(path, files=()) -> str:
    """The absolute path of an output folder that exists and is writable, or can be created; each
    of ``files`` in it is absent or a writable regular file. Creates nothing; raises ValueError.

    Checked before any work, so that a run cannot train for minutes and then fail to save.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"must be a folder path; got {path!r}")
    path = os.path.abspath(path)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"no permission to write in {path}")
        for name in files:
            target = os.path.join(path, name)
            if os.path.lexists(target) and (not os.path.isfile(target) or not os.access(target, os.W_OK)):
                raise ValueError(f"{target} exists and is not a writable file")
        return path
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"cannot create {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create {path}: no permission to write in {parent}")
    return path


def check_amp(amp, device) -> None:
    """``amp`` one of AMP_DTYPES, with an autocast for ``device``'s type (a checked device). Raises
    ValueError naming amp."""
    if not isinstance(amp, str) or amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}; got {amp!r}")
    kind = torch.device(device).type
    if AMP_DTYPES[amp] is not None and not torch.amp.is_autocast_available(kind):
        raise ValueError(f"amp {amp!r}: torch.autocast has no {kind!r} device type; use --amp off")


@dataclass
class TrainResult:
    model: torch.nn.Module
    config: TrainConfig
    history: list = field(default_factory=list)   # per epoch: mean loss terms
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------
# distributed training (python -m sdecor train --distributed, launched by torchrun)

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
    world_size equal shares of at least 2 samples, cpu or cuda (without an index: each rank takes
    cuda:LOCAL_RANK) and, on cpu, no BatchNorm layers (torch's SyncBatchNorm runs on GPUs only).
    Raises :class:`ConfigError` naming the field."""
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
    elif cfg.resolved_norm() == "batch":
        raise ConfigError("norm", "a distributed run synchronises the norm layers' batch statistics over the "
                                  "ranks, and torch's SyncBatchNorm does not run on cpu: use whitening norm "
                                  "layers (--norm whitening, or --lambda-decor > 0 with --norm auto) or "
                                  "--device cuda")


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


def sync_norm_layers(model: torch.nn.Module) -> torch.nn.Module:
    """model with every GroupWhitening made a SyncGroupWhitening and every BatchNorm a SyncBatchNorm
    (the same parameters and buffers), so that the batch statistics are those of all ranks' samples."""
    from ..nn import SyncGroupWhitening

    model = SyncGroupWhitening.convert_sync_whitening(model)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def make_objective(model: torch.nn.Module, cfg: TrainConfig, device=None, rank: int = 0):
    """The SaliencyDecor objective of the configuration (no masking pass when lambda_consistency = 0).

    Its generator (the uniform fill's noise) lives on ``device`` (default cfg.device) and is seeded
    with cfg.seed + 1 + rank, so that the ranks of a distributed run draw different noise.
    """
    from ..objective import SaliencyDecor

    device = cfg.device if device is None else device
    return SaliencyDecor(model, mask_ratio=cfg.mask_ratio, fill=cfg.fill,
                         lambda_consistency=float(cfg.lambda_consistency),
                         lambda_decor=float(cfg.lambda_decor), num_channels=cfg.num_channels,
                         generator=torch.Generator(device=device).manual_seed(cfg.seed + 1 + rank))


def batches(n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world_size: int = 1):
    """Shuffled index batches of one epoch, those of ``rank`` out of ``world_size``.

    The epoch's permutation is one ``torch.randperm(n, generator=generator)`` draw (the same on every
    rank, and the same as a single-process run's: a function of the seed and the epoch). Step k's
    global batch is positions [k * batch_size, (k + 1) * batch_size) of it, and rank r takes every
    world_size-th of them from the r-th: the union of the ranks' step-k batches is the
    single-process step-k batch (``batch_size`` must be a multiple of world_size). As
    torch.utils.data.DistributedSampler does, the permutation is padded with its own first indices
    to a multiple of world_size, so that every rank has as many samples in the last step; a last
    step with fewer than 2 samples per rank is dropped (batch statistics need 2). With world_size 1
    these are the single-process batches, a last batch of fewer than 2 dropped.
    """
    perm = torch.randperm(n, generator=generator)
    pad = -n % world_size
    if pad:
        perm = torch.cat([perm, perm[:pad]])
    for start in range(0, len(perm), batch_size):
        idx = perm[start:start + batch_size][rank::world_size]
        if idx.numel() >= 2:
            yield idx


def train_model(cfg: TrainConfig, dataset: data_mod.Dataset, progress=None, *,
                dist: Optional[Distributed] = None) -> TrainResult:
    """Train cfg.model on dataset.train with the SaliencyDecor objective given by cfg.

    With cfg.amp "bf16" / "fp16" each step's forward and loss run under torch.autocast in that dtype
    (the backward after it, outside the region, as PyTorch advises); fp16 scales the loss with a
    GradScaler, which skips the steps whose gradients overflow. ``progress``: an optional tqdm-like
    object; it is advanced by one per optimisation step.

    ``dist``: this process's place in a distributed run whose default process group is initialised
    (see :func:`train_distributed`); cfg is checked for it (:func:`check_distributed_config`). Every
    rank builds the same model from cfg.seed; its norm layers become the synchronised ones
    (:func:`sync_norm_layers`), and the objective is wrapped whole in DistributedDataParallel, so
    that a step is one DDP forward (the saliency pass, the clean and the masked forward) and one
    backward, whose gradients DDP averages over the ranks. Each rank trains on its share of every
    global batch of cfg.batch_size (:func:`batches`); the loss terms are those of its share (the
    decorrelation loss too: the covariance of the rank's features, not of the global batch), the
    history holds their means over the ranks. The model returned is the trained model itself (not
    the DDP wrapper), its whitening layers reverted to GroupWhitening (sharing the trained tensors).
    """
    cfg.check()
    rank, world_size = (0, 1) if dist is None else (dist.rank, dist.world_size)
    if dist is not None:
        check_distributed_config(cfg, dist)
    device = torch.device(cfg.device) if dist is None else dist.device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg.model, dataset.in_channels, dataset.num_classes, norm=cfg.resolved_norm(),
                        num_channels=cfg.num_channels, width=cfg.width).to(device)
    if dist is not None:
        model = sync_norm_layers(model)
    objective = make_objective(model, cfg, device, rank)
    if dist is None:
        step_loss = objective.loss
    else:
        # One DDP forward per step: the objective's whole loss, with its three model runs, is the
        # wrapped module's forward. Every parameter gets a gradient in every step, so no search for
        # unused ones. Buffers are not broadcast before each forward: the synchronised norm layers
        # update their running statistics from the statistics of all ranks, the same on every rank.
        step_loss = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False, forward_sync_buffers=False)
    x_all, y_all = dataset.train.x.to(device), dataset.train.y.to(device)
    steps_per_epoch = len(list(batches(len(y_all), cfg.batch_size, torch.Generator().manual_seed(0), rank,
                                       world_size)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.25)
    amp_dtype = AMP_DTYPES[cfg.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    history = []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        sums = None
        count = 0
        for idx in batches(len(y_all), cfg.batch_size, gen, rank, world_size):
            idx = idx.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                terms = step_loss(x_all[idx], y_all[idx])
            opt.zero_grad(set_to_none=True)
            scaler.scale(terms.total).backward()
            scaler.step(opt)                                         # opt.step() when not fp16
            scaler.update()
            sched.step()
            detached = torch.stack([t.detach().float() for t in terms])
            sums = detached if sums is None else sums + detached
            count += 1
            if progress is not None:
                progress.update(1)
        if dist is not None:                                         # the mean over the ranks
            torch.distributed.all_reduce(sums)
            sums = sums / world_size
        means = (sums / count).tolist()
        history.append({"epoch": epoch + 1, **dict(zip(terms._fields, means))})
        if not all(math.isfinite(v) for v in means):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1}: mean loss terms {history[-1]}")
    model.eval()
    if dist is not None:
        from ..nn import SyncGroupWhitening

        model = SyncGroupWhitening.revert_sync_whitening(model)
    return TrainResult(model, cfg, history, time.perf_counter() - start)


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: data_mod.Split, batch_size: int = 512) -> float:
    """Top-1 accuracy of model (eval mode) on a split."""
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(split.y), batch_size):
        xb = split.x[start:start + batch_size].to(device)
        yb = split.y[start:start + batch_size].to(device)
        correct += (model(xb).argmax(1) == yb).sum()
    return correct.item() / len(split.y)


def evaluate(model: torch.nn.Module, split: data_mod.Split, *, fractions=None, fill: str = "uniform",
             max_samples: Optional[int] = 256, batch_size: int = 256, keep_maps: int = 0,
             seed: int = 0) -> dict:
    """Test accuracy on the whole split and saliency metrics on its first ``max_samples`` images.

    Saliency is |d logit_y / d x| averaged over channels (:func:`sdecor.saliency`,
    :func:`sdecor.metrics.saliency_map`), for the true label y. Returns a dict of plain numbers:
    accuracy; per-sample means of gini, entropy (normalised), deletion_auc, insertion_auc and, where
    the split has object masks, mask_mass_share; and the curves (deletion, insertion,
    accuracy_under_masking) over ``fractions``. ``keep_maps`` > 0 also returns the first maps as a
    tensor under "maps" (for figures).
    """
    from ..masking import saliency as saliency_fn

    model.eval()
    device = next(model.parameters()).device
    fractions = metrics.default_fractions(10) if fractions is None else list(fractions)
    n = len(split.y) if max_samples is None else min(max_samples, len(split.y))
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = {}
    curves = {}
    maps = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        xb, yb = split.x[start:stop].to(device), split.y[start:stop].to(device)
        smap = metrics.saliency_map(saliency_fn(model, xb, yb))           # (B, H, W)
        per_sample = {"gini": metrics.gini(smap), "entropy": metrics.entropy(smap)}
        if split.mask is not None:
            per_sample["mask_mass_share"] = metrics.mask_mass_share(smap, split.mask[start:stop].to(device))
        deletion = metrics.masking_curve(model, xb, yb, smap, fractions, mode="deletion")
        insertion = metrics.masking_curve(model, xb, yb, smap, fractions, mode="insertion")
        per_sample["deletion_auc"] = metrics.trapezoid_auc(deletion.prob, fractions)
        per_sample["insertion_auc"] = metrics.trapezoid_auc(insertion.prob, fractions)
        masked_correct = metrics.accuracy_under_masking(model, xb, yb, smap, fractions, fill=fill,
                                                        generator=gen, reduction="sum")
        batch_curves = {"deletion": deletion.prob.sum(0), "insertion": insertion.prob.sum(0),
                        "accuracy_under_masking": masked_correct}
        for key, value in per_sample.items():
            sums[key] = sums.get(key, 0.0) + value.double().sum()
        for key, value in batch_curves.items():
            curves[key] = curves.get(key, 0.0) + value.double()
        if len(maps) * batch_size < keep_maps:
            maps.append(smap.detach().cpu())
    out = {"accuracy": accuracy(model, split), "saliency_samples": n}
    out.update({key: (value / n).item() for key, value in sums.items()})
    out["fractions"] = fractions
    out["curves"] = {key: (value / n).tolist() for key, value in curves.items()}
    if keep_maps:
        out["maps"] = torch.cat(maps)[:keep_maps] if maps else torch.empty(0)
    return out


# ---------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--dataset", choices=data_mod.DATASETS, default=d.dataset,
                        help="embedded: digits, shapes; torchvision (from --data-root, no download): "
                             "mnist, fashion-mnist, cifar10 (default %(default)s)")
    parser.add_argument("--data-root", default=None,
                        help="folder holding the torchvision datasets (torchvision's layout, e.g. "
                             "ROOT/MNIST/raw, ROOT/cifar-10-batches-py)")
    parser.add_argument("--model", choices=tuple(MODELS), default=d.model, help="default %(default)s")
    parser.add_argument("--norm", choices=("auto",) + NORMS, default=d.norm,
                        help="norm layers; auto = whitening when --lambda-decor > 0, else batch")
    parser.add_argument("--width", type=int, default=None, help="base channel count of the model")
    parser.add_argument("--lambda-consistency", type=float, default=d.lambda_consistency,
                        help="weight of the masking-consistency KL term (default %(default)s)")
    parser.add_argument("--lambda-decor", type=float, default=d.lambda_decor,
                        help="weight of the decorrelation loss (default %(default)s)")
    parser.add_argument("--mask-ratio", type=float, default=d.mask_ratio,
                        help="fraction of least salient positions masked (default %(default)s)")
    parser.add_argument("--fill", choices=FILLS, default=d.fill, help="masked values (default %(default)s)")
    parser.add_argument("--num-channels", type=int, default=d.num_channels,
                        help="whitening / decorrelation group size d (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="default %(default)s")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    parser.add_argument("--device", default=d.device, help="torch device (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    parser.add_argument("--amp", default=d.amp, metavar="{" + ",".join(AMP_DTYPES) + "}",
                        help="mixed precision of the training steps: torch.autocast in bf16 or fp16 (fp16 "
                             "with a GradScaler); evaluation stays fp32 (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--eval-samples", type=int, default=512,
                        help="test images used for the saliency metrics (default %(default)s)")
    parser.add_argument("--out", default=None, help="folder for metrics.json and model.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel training over the processes torchrun starts (torchrun "
                             "--nproc-per-node N -m sdecor train --distributed ...; gloo on cpu, nccl on "
                             "cuda:LOCAL_RANK): --batch-size is the global batch, split evenly over the ranks; "
                             "norm layers synchronised; only rank 0 prints and writes --out")
    parser.add_argument("--save-all-ranks", action="store_true",
                        help="with --distributed and --out: every rank r > 0 also writes its final model as "
                             "model-rank<r>.pt (to check that all ranks hold the same model)")


OUTPUT_FILES = ("metrics.json", "model.pt")


class UsageError(ValueError):
    """A bad command-line option: the one-line message starts with the option's name."""

    def __init__(self, option: str, message: str):
        super().__init__(message if message.startswith(option) else f"{option}: {message}")
        self.option = option


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def check_args(args: argparse.Namespace) -> TrainConfig:
    """Every option of ``sdecor train``, before any data is read or any folder made: the training
    configuration, --data-root, --threads, --eval-samples and --out. Raises :class:`UsageError`."""
    cfg = TrainConfig(dataset=args.dataset, model=args.model, norm=args.norm,
                      lambda_consistency=args.lambda_consistency, lambda_decor=args.lambda_decor,
                      mask_ratio=args.mask_ratio, fill=args.fill, num_channels=args.num_channels,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device,
                      seed=args.seed, width=args.width, amp=args.amp)
    try:
        cfg.check()
    except ConfigError as err:
        raise UsageError(option_name(err.field), str(err)) from None
    if args.data_root is not None and not os.path.isdir(args.data_root):
        raise UsageError("--data-root", f"no such folder: {args.data_root}")
    if args.dataset in data_mod.TORCHVISION and args.data_root is None:
        raise UsageError("--data-root", f"dataset {args.dataset!r} is read from a local folder (downloads "
                                        f"are disabled): give its root")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads", f"--threads must be >= 1; got {args.threads}")
    if args.eval_samples < 1:
        raise UsageError("--eval-samples", f"--eval-samples must be >= 1; got {args.eval_samples}")
    if args.save_all_ranks and not args.distributed:
        raise UsageError("--save-all-ranks", "--save-all-ranks is an option of --distributed runs")
    if args.save_all_ranks and args.out is None:
        raise UsageError("--save-all-ranks", "--save-all-ranks writes into --out: give --out")
    if args.out is not None:
        try:
            check_out_dir(args.out, OUTPUT_FILES)
        except ValueError as err:
            raise UsageError("--out", str(err)) from None
    return cfg


def run(args: argparse.Namespace) -> int:
    try:
        cfg = check_args(args)
        dist = check_distributed(args, cfg)
        dataset = data_mod.load(args.dataset, args.data_root, seed=0)
    except (ValueError, data_mod.DatasetNotFoundError) as err:     # UsageError, or a bad dataset file
        print(f"sdecor train: error: {err}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if dist is None:
            return train_and_report(cfg, dataset, args)
        return train_distributed(cfg, dataset, args, dist)
    finally:
        torch.set_num_threads(threads)


def train_distributed(cfg: TrainConfig, dataset: data_mod.Dataset, args: argparse.Namespace,
                      dist: Distributed) -> int:
    """Join the process group torchrun's environment describes, train and report (rank 0), leave it."""
    device = dist.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(dist.backend(cfg.device), init_method="env://", rank=dist.rank,
                                         world_size=dist.world_size, timeout=DIST_TIMEOUT,
                                         device_id=device if device.type == "cuda" else None)
    try:
        return train_and_report(cfg, dataset, args, dist)
    finally:
        torch.distributed.destroy_process_group()


def save_model(path: str, cfg: TrainConfig, model: torch.nn.Module) -> None:
    """model.pt: the configuration and the model's state_dict (loads into build_model's model)."""
    torch.save({"config": asdict(cfg), "state_dict": model.state_dict()}, path)


def train_and_report(cfg: TrainConfig, dataset: data_mod.Dataset, args: argparse.Namespace,
                     dist: Optional[Distributed] = None) -> int:
    """Train, evaluate, print and write --out. In a distributed run (``dist``) only rank 0
    prints, evaluates and writes; the other ranks return after training (writing their model as
    model-rank<r>.pt with --save-all-ranks)."""
    tqdm = require("tqdm.auto", "demo", "sdecor train's progress bar").tqdm
    lead = dist is None or dist.rank == 0
    rank, world_size = (0, 1) if dist is None else (dist.rank, dist.world_size)
    if lead:
        print(f"dataset {dataset.name}: {dataset.description}; train {len(dataset.train.y)}, "
              f"test {len(dataset.test.y)}")
        print(f"model {cfg.model} ({cfg.resolved_norm()} norm, group size {cfg.num_channels}); "
              f"lambda_consistency {cfg.lambda_consistency}, lambda_decor {cfg.lambda_decor}, "
              f"mask ratio {cfg.mask_ratio}, fill {cfg.fill}; {cfg.epochs} epochs on {cfg.device}"
              + (f", {cfg.amp} autocast" if cfg.amp != "off" else ""))
        if dist is not None:
            ranks = f"{world_size} rank" + ("s" if world_size > 1 else "")
            print(f"distributed: {ranks} ({dist.backend(cfg.device)}), global batch {cfg.batch_size} = "
                  f"{cfg.batch_size // world_size} samples per rank per step")
    steps = cfg.epochs * len(list(batches(len(dataset.train.y), cfg.batch_size, torch.Generator(), rank,
                                          world_size)))
    disable = args.no_progress or not sys.stderr.isatty() or not lead
    with tqdm(total=steps, desc="train", unit="step", disable=disable) as bar:
        result = train_model(cfg, dataset, progress=bar, dist=dist)
    if not lead:
        if args.save_all_ranks:
            os.makedirs(args.out, exist_ok=True)
            save_model(os.path.join(args.out, f"model-rank{rank}.pt"), cfg, result.model)
        return 0
    last = result.history[-1]
    print(f"trained in {result.seconds:.1f} s; last epoch: "
          + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "epoch"))
    ev = evaluate(result.model, dataset.test, fill=cfg.fill, max_samples=args.eval_samples, seed=cfg.seed)
    print(f"test accuracy {ev['accuracy']:.4f}")
    print(f"saliency on {ev['saliency_samples']} test images: gini {ev['gini']:.3f}, entropy "
          f"{ev['entropy']:.3f}, deletion AUC {ev['deletion_auc']:.3f}, insertion AUC {ev['insertion_auc']:.3f}"
          + (f", mass in object {ev['mask_mass_share']:.3f}" if "mask_mass_share" in ev else ""))
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        record = {"config": asdict(cfg), "history": result.history, "train_seconds": result.seconds, "test": ev}
        if dist is not None:
            record["distributed"] = {"world_size": world_size, "backend": dist.backend(cfg.device),
                                     "batch_per_rank": cfg.batch_size // world_size}
        with open(os.path.join(args.out, "metrics.json"), "w") as fh:
            json.dump(record, fh, indent=2)
        save_model(os.path.join(args.out, "model.pt"), cfg, result.model)
        print(f"wrote {os.path.abspath(args.out)}")
    return 0
