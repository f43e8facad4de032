"""``python -m sdecor train``: train a small CNN with the SaliencyDecor objective and evaluate it.

The objective is CE + lambda_consistency * KL(f(x) || f(x masked)) + lambda_decor * decorrelation
(:class:`sdecor.SaliencyDecor`); with both lambdas 0 it is plain cross-entropy. The model's norm
layers are BatchNorm where decorrelation is off and GroupWhitening where it is on (``--norm auto``).
After training it reports test accuracy and the saliency metrics of :mod:`sdecor.metrics`, and
writes ``metrics.json`` and ``model.pt`` into ``--out``. ``--report-every N`` logs the worst group of
the whitening layers every N epochs (:mod:`.health`), also kept in metrics.json. ``--amp bf16|fp16``
runs the training steps in mixed precision (forward and loss under torch.autocast; fp16 with a
GradScaler); evaluation stays in fp32.

``--distributed`` trains data-parallel over the processes that torchrun starts (see
:func:`check_distributed` and :func:`train_model`): --batch-size stays the global batch, split
evenly over the ranks; only rank 0 prints and writes.

The same functions (:func:`train_model`, :func:`evaluate`) run every configuration of the demo.

Its parts: :mod:`.config` (:class:`TrainConfig`, what defines a run, and its checks), :mod:`.args`
(the options and their checks), :mod:`.distributed` (torchrun's environment, the process group, the
synchronised norm layers) and :mod:`.loop` (the training loop and the evaluation); this module runs
the command (:func:`run`) and reports. Every name above is importable from here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Optional

import torch

from ..._optional import require
from .. import data as data_mod
from .args import OUTPUT_FILES, UsageError, add_arguments, check_args, check_out_dir, option_name
from .config import AMP_DTYPES, ConfigError, TrainConfig, check_amp, check_device
from .distributed import Distributed, check_distributed, check_distributed_config, process_group
from .loop import TrainResult, accuracy, batches, evaluate, train_model

__all__ = ["AMP_DTYPES", "OUTPUT_FILES", "ConfigError", "Distributed", "TrainConfig", "TrainResult", "UsageError",
           "accuracy", "add_arguments", "batches", "check_amp", "check_args", "check_device", "check_distributed",
           "check_distributed_config", "check_out_dir", "evaluate", "option_name", "run", "train_model"]


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
    with process_group(dist, cfg.device):
        return train_and_report(cfg, dataset, args, dist)


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
        result = train_model(cfg, dataset, progress=bar, dist=dist,
                             report_every=getattr(args, "report_every", 0), log=bar.write)
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
        if result.whitening:
            record["whitening"] = result.whitening
        if dist is not None:
            record["distributed"] = {"world_size": world_size, "backend": dist.backend(cfg.device),
                                     "batch_per_rank": cfg.batch_size // world_size}
        with open(os.path.join(args.out, "metrics.json"), "w") as fh:
            json.dump(record, fh, indent=2)
        save_model(os.path.join(args.out, "model.pt"), cfg, result.model)
        print(f"wrote {os.path.abspath(args.out)}")
    return 0
