"""The command line of ``sdecor train``: its options and their checks, made before any data is read
or any folder made (:func:`check_args`); a bad option raises :class:`UsageError` naming it.
(:class:`UsageError` and :func:`check_out_dir` are those of every command: :mod:`sdecor.cli.options`,
:mod:`sdecor.cli.output`.)"""

from __future__ import annotations

import argparse

from .. import data as data_mod
from ..models import MODELS, NORMS
from ..options import MAX_SEED, MAX_THREADS, Number, UsageError, check_numbers, option_name
from ..output import check_out_dir
from .config import AMP_DTYPES, FILLS, ConfigError, TrainConfig


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
    parser.add_argument("--width", type=int, default=None, help="base channel count of the model (1 to 1024)")
    parser.add_argument("--lambda-consistency", type=float, default=d.lambda_consistency,
                        help="weight of the masking-consistency KL term (default %(default)s)")
    parser.add_argument("--lambda-decor", type=float, default=d.lambda_decor,
                        help="weight of the decorrelation loss (default %(default)s)")
    parser.add_argument("--mask-ratio", type=float, default=d.mask_ratio,
                        help="fraction of least salient positions masked (default %(default)s)")
    parser.add_argument("--fill", choices=FILLS, default=d.fill, help="masked values (default %(default)s)")
    parser.add_argument("--num-channels", type=int, default=d.num_channels,
                        help="whitening / decorrelation group size d (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="1 to 100000 (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="default %(default)s")
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    parser.add_argument("--device", default=d.device, help="torch device (default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="0 to 2**63 - 2 (default %(default)s)")
    parser.add_argument("--amp", default=d.amp, metavar="{" + ",".join(AMP_DTYPES) + "}",
                        help="mixed precision of the training steps: torch.autocast in bf16 or fp16 (fp16 "
                             "with a GradScaler); evaluation stays fp32 (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 to 1024)")
    parser.add_argument("--eval-samples", type=int, default=512,
                        help="test images used for the saliency metrics (default %(default)s)")
    parser.add_argument("--out", default=None, help="folder for metrics.json and model.pt")
    parser.add_argument("--report-every", type=int, default=0, metavar="N",
                        help="every N epochs, log the worst group of the whitening layers (layer, group, "
                             "whitening error, condition number, T needed) on the first --batch-size training "
                             "images, also kept in metrics.json; needs whitening layers (default 0: off)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel training over the processes torchrun starts (torchrun "
                             "--nproc-per-node N -m sdecor train --distributed ...; gloo on cpu, nccl on "
                             "cuda:LOCAL_RANK): --batch-size is the global batch, split evenly over the ranks; "
                             "norm layers synchronised, the decorrelation loss that of the global batch; only rank 0 "
                             "prints and writes --out")
    parser.add_argument("--save-all-ranks", action="store_true",
                        help="with --distributed and --out: every rank r > 0 also writes its final model as "
                             "model-rank<r>.pt (to check that all ranks hold the same model)")
    parser.add_argument("--decor-per-rank", action="store_true",
                        help="with --distributed and --lambda-decor > 0: each rank's decorrelation loss on its own "
                             "share of the batch, for comparison; by default it is the loss of the global batch "
                             "(the group covariances of all ranks' features, from two small all-reduces per step), "
                             "as one process training on the whole batch computes it")


OUTPUT_FILES = ("metrics.json", "model.pt")

# every numeric option (argparse dest -> the values it takes: sdecor.cli.options.Number)
NUMBERS = {
    "width": Number(1, 1024, unit="base channels; the widest layer has 4x as many"),
    "lambda_consistency": Number(0),
    "lambda_decor": Number(0),
    "mask_ratio": Number(0, 1),
    "num_channels": Number(1),                       # and a divisor of the layers' channels (TrainConfig)
    "epochs": Number(1, 100_000),
    "batch_size": Number(2),                         # larger than the dataset: one batch per epoch
    "lr": Number(0, lo_open=True),
    "seed": Number(0, MAX_SEED),
    "threads": Number(1, MAX_THREADS),
    "eval_samples": Number(1),                       # more than the test split: all of it
    "report_every": Number(0, 100_000, unit="epochs; 0: off"),
}


def check_args(args: argparse.Namespace) -> TrainConfig:
    """Every option of ``sdecor train``, before any data is read or any folder made: the training
    configuration, every number against :data:`NUMBERS`, --data-root and --out. Raises :class:`UsageError`."""
    cfg = TrainConfig(dataset=args.dataset, model=args.model, norm=args.norm,
                      lambda_consistency=args.lambda_consistency, lambda_decor=args.lambda_decor,
                      mask_ratio=args.mask_ratio, fill=args.fill, num_channels=args.num_channels,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device,
                      seed=args.seed, width=args.width, amp=args.amp)
    try:
        cfg.check()
    except ConfigError as err:
        raise UsageError(option_name(err.field), str(err)) from None
    check_numbers(args, NUMBERS)
    if args.data_root is not None:
        try:
            data_mod.check_root(args.data_root)              # a folder; what it holds is read later
        except data_mod.DatasetNotFoundError as err:
            raise UsageError("--data-root", str(err)) from None
    if args.dataset in data_mod.TORCHVISION and args.data_root is None:
        raise UsageError("--data-root", f"dataset {args.dataset!r} is read from a local folder (downloads "
                                        f"are disabled): give its root")
    if args.report_every > 0 and cfg.resolved_norm() != "whitening":
        raise UsageError("--report-every", "--report-every reports on whitening layers, and this model's norm "
                                           "layers are BatchNorm: add --norm whitening (or --lambda-decor > 0)")
    if args.save_all_ranks and not args.distributed:
        raise UsageError("--save-all-ranks", "--save-all-ranks is an option of --distributed runs")
    if args.save_all_ranks and args.out is None:
        raise UsageError("--save-all-ranks", "--save-all-ranks writes into --out: give --out")
    if args.decor_per_rank and not args.distributed:
        raise UsageError("--decor-per-rank", "--decor-per-rank is an option of --distributed runs")
    if args.decor_per_rank and not cfg.lambda_decor > 0:
        raise UsageError("--decor-per-rank", "--decor-per-rank chooses how the decorrelation loss is computed, "
                                             "and --lambda-decor is 0: give --lambda-decor > 0")
    if args.out is not None:
        try:
            check_out_dir(args.out, OUTPUT_FILES)
        except ValueError as err:
            raise UsageError("--out", str(err)) from None
    return cfg
