"""``python -m sdecor train``: train a small CNN with the SaliencyDecor objective and evaluate it.

The objective is CE + lambda_consistency * KL(f(x) || f(x masked)) + lambda_decor * decorrelation
(:class:`sdecor.SaliencyDecor`); with both lambdas 0 it is plain cross-entropy. The model's norm
layers are BatchNorm where decorrelation is off and GroupWhitening where it is on (``--norm auto``).
After training it reports test accuracy and the saliency metrics of :mod:`sdecor.metrics`, and
writes ``metrics.json`` and ``model.pt`` into ``--out``. ``--amp bf16|fp16`` runs the training steps
in mixed precision (forward and loss under torch.autocast; fp16 with a GradScaler); evaluation stays
in fp32.

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
from typing import Optional

import torch
import torch.nn.functional as F

from . import data as data_mod
from . import metrics
from ._optional import require
from .models import MODELS, NORMS, build_model, check_group_size

__all__ = ["AMP_DTYPES", "ConfigError", "TrainConfig", "TrainResult", "UsageError", "accuracy", "add_arguments",
           "check_amp", "check_args", "check_device", "check_out_dir", "evaluate", "run", "train_model"]

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


def make_objective(model: torch.nn.Module, cfg: TrainConfig):
    """The SaliencyDecor objective of the configuration (no masking pass when lambda_consistency = 0)."""
    from .objective import SaliencyDecor

    return SaliencyDecor(model, mask_ratio=cfg.mask_ratio, fill=cfg.fill,
                         lambda_consistency=float(cfg.lambda_consistency),
                         lambda_decor=float(cfg.lambda_decor), num_channels=cfg.num_channels,
                         generator=torch.Generator(device=cfg.device).manual_seed(cfg.seed + 1))


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Shuffled index batches of one epoch; drops a last batch too small for batch statistics."""
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if idx.numel() >= 2:
            yield idx


def train_model(cfg: TrainConfig, dataset: data_mod.Dataset, progress=None) -> TrainResult:
    """Train cfg.model on dataset.train with the SaliencyDecor objective given by cfg.

    With cfg.amp "bf16" / "fp16" each step's forward and loss run under torch.autocast in that dtype
    (the backward after it, outside the region, as PyTorch advises); fp16 scales the loss with a
    GradScaler, which skips the steps whose gradients overflow. ``progress``: an optional tqdm-like
    object; it is advanced by one per optimisation step.
    """
    cfg.check()
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg.model, dataset.in_channels, dataset.num_classes, norm=cfg.resolved_norm(),
                        num_channels=cfg.num_channels, width=cfg.width).to(device)
    objective = make_objective(model, cfg)
    x_all, y_all = dataset.train.x.to(device), dataset.train.y.to(device)
    steps_per_epoch = len(list(batches(len(y_all), cfg.batch_size, torch.Generator().manual_seed(0))))
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
        for idx in batches(len(y_all), cfg.batch_size, gen):
            idx = idx.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                terms = objective.loss(x_all[idx], y_all[idx])
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
        means = (sums / count).tolist()
        history.append({"epoch": epoch + 1, **dict(zip(terms._fields, means))})
        if not all(math.isfinite(v) for v in means):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1}: mean loss terms {history[-1]}")
    model.eval()
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
    from .masking import saliency as saliency_fn

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
    if args.out is not None:
        try:
            check_out_dir(args.out, OUTPUT_FILES)
        except ValueError as err:
            raise UsageError("--out", str(err)) from None
    return cfg


def run(args: argparse.Namespace) -> int:
    try:
        cfg = check_args(args)
        dataset = data_mod.load(args.dataset, args.data_root, seed=0)
    except (ValueError, data_mod.DatasetNotFoundError) as err:     # UsageError, or a bad dataset file
        print(f"sdecor train: error: {err}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return train_and_report(cfg, dataset, args)
    finally:
        torch.set_num_threads(threads)


def train_and_report(cfg: TrainConfig, dataset: data_mod.Dataset, args: argparse.Namespace) -> int:
    tqdm = require("tqdm.auto", "demo", "sdecor train's progress bar").tqdm
    print(f"dataset {dataset.name}: {dataset.description}; train {len(dataset.train.y)}, "
          f"test {len(dataset.test.y)}")
    print(f"model {cfg.model} ({cfg.resolved_norm()} norm, group size {cfg.num_channels}); "
          f"lambda_consistency {cfg.lambda_consistency}, lambda_decor {cfg.lambda_decor}, "
          f"mask ratio {cfg.mask_ratio}, fill {cfg.fill}; {cfg.epochs} epochs on {cfg.device}"
          + (f", {cfg.amp} autocast" if cfg.amp != "off" else ""))
    steps = cfg.epochs * len(list(batches(len(dataset.train.y), cfg.batch_size, torch.Generator())))
    disable = args.no_progress or not sys.stderr.isatty()
    with tqdm(total=steps, desc="train", unit="step", disable=disable) as bar:
        result = train_model(cfg, dataset, progress=bar)
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
        with open(os.path.join(args.out, "metrics.json"), "w") as fh:
            json.dump({"config": asdict(cfg), "history": result.history, "train_seconds": result.seconds,
                       "test": ev}, fh, indent=2)
        torch.save({"config": asdict(cfg), "state_dict": result.model.state_dict()},
                   os.path.join(args.out, "model.pt"))
        print(f"wrote {os.path.abspath(args.out)}")
    return 0
