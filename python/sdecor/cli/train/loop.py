"""The training loop (:func:`train_model`) and the evaluation (:func:`accuracy`, :func:`evaluate`)
that ``sdecor train`` and every configuration of the demo run."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ... import metrics
from .. import data as data_mod
from ..models import build_model
from .config import AMP_DTYPES, TrainConfig
from .distributed import Distributed, check_distributed_config, decor_mode, sync_norm_layers
from .health import format_entry, health_entry


@dataclass
class TrainResult:
    model: torch.nn.Module
    config: TrainConfig
    history: list = field(default_factory=list)   # per epoch: mean loss terms
    seconds: float = 0.0
    whitening: list = field(default_factory=list)  # report_every: the worst whitening group per report


def make_objective(model: torch.nn.Module, cfg: TrainConfig, device=None, rank: int = 0, process_group=None):
    """The SaliencyDecor objective of the configuration (no masking pass when lambda_consistency = 0).

    Its generator (the uniform fill's noise) lives on ``device`` (default cfg.device) and is seeded
    with cfg.seed + 1 + rank, so that the ranks of a distributed run draw different noise.
    ``process_group``: None, the decorrelation term of this process's batch; a process group, that
    of the global batch (see :class:`sdecor.SaliencyDecor`).
    """
    from ...objective import SaliencyDecor

    device = cfg.device if device is None else device
    return SaliencyDecor(model, mask_ratio=cfg.mask_ratio, fill=cfg.fill,
                         lambda_consistency=float(cfg.lambda_consistency),
                         lambda_decor=float(cfg.lambda_decor), num_channels=cfg.num_channels,
                         generator=torch.Generator(device=device).manual_seed(cfg.seed + 1 + rank),
                         process_group=process_group)


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
                dist: Optional[Distributed] = None, decor_per_rank: bool = False, report_every: int = 0,
                log=print) -> TrainResult:
    """Train cfg.model on dataset.train with the SaliencyDecor objective given by cfg.

    With cfg.amp "bf16" / "fp16" each step's forward and loss run under torch.autocast in that dtype
    (the backward after it, outside the region, as PyTorch advises); fp16 scales the loss with a
    GradScaler, which skips the steps whose gradients overflow. ``progress``: an optional tqdm-like
    object; it is advanced by one per optimisation step.

    ``dist``: this process's place in a distributed run whose default process group is initialised
    (see :func:`.distributed.process_group`); cfg is checked for it (:func:`check_distributed_config`).
    Every rank builds the same model from cfg.seed; its norm layers become the synchronised ones
    (:func:`sync_norm_layers`), and the objective is wrapped whole in DistributedDataParallel, so
    that a step is one DDP forward (the saliency pass, the clean and the masked forward) and one
    backward, whose gradients DDP averages over the ranks. Each rank trains on its share of every
    global batch of cfg.batch_size (:func:`batches`). Cross-entropy and consistency are means over
    the rank's share; the decorrelation term is that of the global batch (the covariance of all
    ranks' features, :class:`sdecor.SaliencyDecor` with the default process group, whose gradient
    makes a step with equal shares the single-process step), or with ``decor_per_rank`` that of the
    rank's share (the covariance of its own features). The history holds the terms' means over the
    ranks. The model returned is the trained model itself (not
    the DDP wrapper), its whitening layers reverted to GroupWhitening (sharing the trained tensors).

    ``report_every`` N > 0: after every N-th epoch, the worst group of the model's whitening report
    on the first cfg.batch_size training images (:func:`.health.health_entry`) goes to
    ``result.whitening`` and, as one line, to ``log`` (rank 0 only; the model needs whitening layers);
    ``result.seconds`` leaves the reports' time out.
    """
    cfg.check()
    rank, world_size = (0, 1) if dist is None else (dist.rank, dist.world_size)
    if dist is not None:
        check_distributed_config(cfg, dist)
    elif decor_per_rank:
        raise ValueError("decor_per_rank chooses the decorrelation loss of a distributed run; dist is None")
    device = torch.device(cfg.device) if dist is None else dist.device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg.model, dataset.in_channels, dataset.num_classes, norm=cfg.resolved_norm(),
                        num_channels=cfg.num_channels, width=cfg.width).to(device)
    if dist is not None:
        model = sync_norm_layers(model, device)
    group = None if dist is None or decor_mode(cfg, decor_per_rank) != "global" else torch.distributed.group.WORLD
    objective = make_objective(model, cfg, device, rank, group)
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
    history, whitening = [], []
    reporting = 0.0                                                  # seconds of the reports, not of training
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
        if report_every > 0 and (epoch + 1) % report_every == 0 and rank == 0:
            t0 = time.perf_counter()
            whitening.append(health_entry(cfg, model, dataset, epoch + 1))
            log(f"epoch {epoch + 1}: {format_entry(whitening[-1])}")
            reporting += time.perf_counter() - t0
    model.eval()
    if dist is not None:
        from ...nn import SyncGroupWhitening

        model = SyncGroupWhitening.revert_sync_whitening(model)
    return TrainResult(model, cfg, history, time.perf_counter() - start - reporting, whitening)


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


@torch.no_grad()
def feature_decorrelation(model: torch.nn.Module, split: data_mod.Split, num_channels: int,
                          batch_size: int = 512) -> Optional[dict]:
    """How decorrelated the trained model's features are on a split: the input of its last
    nn.Linear (the layer SaliencyDecor decorrelates by default), in eval mode, over the whole split,
    in groups of ``num_channels``. Returns the layer's name, its channels, the group size, the
    sample count and two numbers of :func:`sdecor.decorrelation_loss` on all those samples at once:
    "decov" (the term the objective trains: the squared covariances of the pairs of channels of a
    group, summed, in the features' units) and "corr" (the mean squared correlation of two channels of a group,
    independent of the features' scale). None where the model has no nn.Linear or its input does
    not split into groups of ``num_channels`` >= 2 channels."""
    from ...objective import decorrelation_loss

    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears or num_channels < 2 or linears[-1][1].in_features % num_channels:
        return None
    name, layer = linears[-1]
    model.eval()
    device = next(model.parameters()).device
    feats = []
    handle = layer.register_forward_pre_hook(lambda module, args: feats.append(args[0].float()))
    try:
        for start in range(0, len(split.y), batch_size):
            model(split.x[start:start + batch_size].to(device))
    finally:
        handle.remove()
    f = torch.cat(feats)
    return {"layer": name, "channels": layer.in_features, "num_channels": num_channels, "samples": f.shape[0],
            "decov": decorrelation_loss(f, num_channels, "decov").item(),
            "corr": decorrelation_loss(f, num_channels, "corr").item()}


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
    from ...masking import saliency as saliency_fn

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
