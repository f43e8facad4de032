"""``python -m sdecor train``: train a small CNN with the SaliencyDecor objective and evaluate it.

The objective is CE + lambda_consistency * KL(f(x) || f(x masked)) + lambda_decor * decorrelation
(:class:`sdecor.SaliencyDecor`); with both lambdas 0 it is plain cross-entropy. The model's norm
layers are BatchNorm where decorrelation is off and GroupWhitening where it is on (``--norm auto``).
After training it reports test accuracy, the saliency metrics of :mod:`sdecor.metrics` and how
decorrelated the classifier's input features are on the test split (:func:`feature_decorrelation`), and
writes ``metrics.json`` and ``model.pt`` into ``--out`` (made and proved writable before any work;
where the final write fails, the files go to a temporary folder the message names:
:mod:`sdecor.cli.output`). ``--report-every N`` logs the worst group of the whitening layers every N
epochs (:mod:`.health`), also kept in metrics.json. ``--amp bf16|fp16`` runs the training steps
in mixed precision (forward and loss under torch.autocast; fp16 with a GradScaler); evaluation stays
in fp32.

``--distributed`` trains data-parallel over the processes that torchrun starts (see
:func:`check_distributed` and :func:`train_model`): --batch-size stays the global batch, split
evenly over the ranks; the decorrelation loss is that of the global batch (``--decor-per-rank``:
of each rank's share); only rank 0 prints and writes.

The same functions (:func:`train_model`, :func:`evaluate`) run every configuration of the demo.

Its parts: :mod:`.config` (:class:`TrainConfig`, what defines a run, and its checks), :mod:`.args`
(the options and their checks), :mod:`.distributed` (torchrun's environment, the process group, the
synchronised norm layers) and :mod:`.loop` (the training loop and the evaluation); this module runs
the command (:func:`run`) and reports. Every name above is importable from here.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import asdict
from typing import Optional

import torch

from ..._optional import require
from .. import data as data_mod
from ..output import OutputDir
from .args import NUMBERS, OUTPUT_FILES, UsageError, add_arguments, check_args, check_out_dir, option_name
from .config import AMP_DTYPES, ConfigError, TrainConfig, check_amp, check_device
from .distributed import (DECOR_MODES, GLOO_BATCHNORM_NOTE, Distributed, batchnorm_sync, check_distributed,
                          check_distributed_config, decor_mode, process_group, sync_norm_layers)
from .loop import TrainResult, accuracy, batches, evaluate, feature_decorrelation, train_model

__all__ = ["AMP_DTYPES", "DECOR_MODES", "GLOO_BATCHNORM_NOTE", "NUMBERS", "OUTPUT_FILES", "ConfigError", "Distributed",
           "TrainConfig", "TrainResult", "UsageError", "accuracy", "add_arguments", "batches", "batchnorm_sync",
           "check_amp", "check_args", "check_device", "check_distributed", "check_distributed_config",
           "check_out_dir", "decor_mode", "evaluate", "feature_decorrelation", "model_bytes", "option_name",
           "output_dir", "run", "save_model", "sync_norm_layers", "train_model"]


def run(args: argparse.Namespace) -> int:
    out = None
    try:
        cfg = check_args(args)
        dist = check_distributed(args, cfg)
        out = output_dir(args, dist)
        if out is not None:
            out.prepare()                                            # the last check: made and written to
        dataset = data_mod.load(args.dataset, args.data_root, seed=0)
    except (ValueError, data_mod.DatasetNotFoundError) as err:     # UsageError, or a bad dataset file
        if out is not None:
            out.discard()
        where = "--data-root: " if isinstance(err, data_mod.DatasetReadError) else ""
        print(f"sdecor train: error: {where}{err}", file=sys.stderr)
        return 2
    except BaseException:                                            # a missing extra, say: nothing to keep
        if out is not None:
            out.discard()
        raise
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        if dist is None:
            return train_and_report(cfg, dataset, args, out=out)
        return train_distributed(cfg, dataset, args, dist, out=out)
    except FloatingPointError as err:                                # the run diverged: no result to write
        print(f"sdecor train: error: {err}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
        if out is not None:
            out.discard()                                            # only folders prepare made, still empty


def output_dir(args: argparse.Namespace, dist: Optional[Distributed] = None) -> Optional[OutputDir]:
    """The output folder this process writes into: --out for rank 0 (metrics.json, model.pt) and,
    with --save-all-ranks, for every other rank (model-rank<r>.pt); None where it writes nothing."""
    if args.out is None:
        return None
    if dist is None or dist.rank == 0:
        return OutputDir(args.out, OUTPUT_FILES, command="train")
    if args.save_all_ranks:
        return OutputDir(args.out, (f"model-rank{dist.rank}.pt",), command="train")
    return None


def train_distributed(cfg: TrainConfig, dataset: data_mod.Dataset, args: argparse.Namespace,
                      dist: Distributed, out: Optional[OutputDir] = None) -> int:
    """Join the process group torchrun's environment describes, train and report (rank 0), leave it."""
    with process_group(dist, cfg.device):
        return train_and_report(cfg, dataset, args, dist, out=out)


def model_bytes(cfg: TrainConfig, model: torch.nn.Module) -> bytes:
    """model.pt: the configuration and the model's state_dict (loads into build_model's model)."""
    buf = io.BytesIO()
    torch.save({"config": asdict(cfg), "state_dict": model.state_dict()}, buf)
    return buf.getvalue()


def save_model(path: str, cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Write :func:`model_bytes` to path."""
    with open(path, "wb") as fh:
        fh.write(model_bytes(cfg, model))


def train_and_report(cfg: TrainConfig, dataset: data_mod.Dataset, args: argparse.Namespace,
                     dist: Optional[Distributed] = None, *, out: Optional[OutputDir] = None) -> int:
    """Train, evaluate, print and write ``out`` (:func:`output_dir`). In a distributed run
    (``dist``) only rank 0 prints, evaluates and writes; the other ranks return after training
    (writing their model as model-rank<r>.pt with --save-all-ranks). Returns 1 where the files could
    not be written into --out (they are then in the folder the message names)."""
    tqdm = require("tqdm.auto", "demo", "sdecor train's progress bar").tqdm
    lead = dist is None or dist.rank == 0
    rank, world_size = (0, 1) if dist is None else (dist.rank, dist.world_size)
    per_rank = getattr(args, "decor_per_rank", False)
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
                  f"{cfg.batch_size // world_size} samples per rank per step; "
                  f"{DECOR_MODES[decor_mode(cfg, per_rank)]}")
            if batchnorm_sync(cfg) == "gloo":
                print(GLOO_BATCHNORM_NOTE)
    steps = cfg.epochs * len(list(batches(len(dataset.train.y), cfg.batch_size, torch.Generator(), rank,
                                          world_size)))
    disable = args.no_progress or not sys.stderr.isatty() or not lead
    with tqdm(total=steps, desc="train", unit="step", disable=disable) as bar:
        result = train_model(cfg, dataset, progress=bar, dist=dist, decor_per_rank=per_rank,
                             report_every=getattr(args, "report_every", 0), log=bar.write)
    if not lead:
        if out is not None:
            return 0 if out.save({f"model-rank{rank}.pt": model_bytes(cfg, result.model)}).requested else 1
        return 0
    last = result.history[-1]
    print(f"trained in {result.seconds:.1f} s; last epoch: "
          + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "epoch"))
    ev = evaluate(result.model, dataset.test, fill=cfg.fill, max_samples=args.eval_samples, seed=cfg.seed)
    print(f"test accuracy {ev['accuracy']:.4f}")
    print(f"saliency on {ev['saliency_samples']} test images: gini {ev['gini']:.3f}, entropy "
          f"{ev['entropy']:.3f}, deletion AUC {ev['deletion_auc']:.3f}, insertion AUC {ev['insertion_auc']:.3f}"
          + (f", mass in object {ev['mask_mass_share']:.3f}" if "mask_mass_share" in ev else ""))
    decor = feature_decorrelation(result.model, dataset.test, cfg.num_channels)
    if decor is not None:
        ev["feature_decorrelation"] = decor
        print(f"decorrelation of the {decor['channels']} input features of {decor['layer']!r} on {decor['samples']} "
              f"test images, groups of {decor['num_channels']}: decov {decor['decov']:.4g}, mean squared "
              f"correlation {decor['corr']:.4g}")
    if out is None:
        return 0
    record = {"config": asdict(cfg), "history": result.history, "train_seconds": result.seconds, "test": ev}
    if result.whitening:
        record["whitening"] = result.whitening
    if dist is not None:
        record["distributed"] = {"world_size": world_size, "backend": dist.backend(cfg.device),
                                 "batch_per_rank": cfg.batch_size // world_size,
                                 "decorrelation": decor_mode(cfg, per_rank)}
    saved = out.save({"metrics.json": (json.dumps(record, indent=2) + "\n").encode(),
                      "model.pt": model_bytes(cfg, result.model)}, show=("metrics.json",))
    if not saved.requested:
        return 1
    print(f"wrote {saved.folder}")
    return 0
