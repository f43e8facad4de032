"""``python -m sdecor inspect CHECKPOINT``: how well the whitening layers of a trained model whiten.

Reads a ``model.pt`` that ``sdecor train --out`` wrote (the run's configuration and the model's
state_dict), rebuilds the model, takes a batch of its dataset -- the first ``--batches`` x the run's
batch size images of the training split (``--split test``: of the test split), in the split's order,
as ONE batch, so that ``--batches n`` reports on the statistics of n training batches together -- and
runs :func:`sdecor.whitening_report` on it: one training-mode forward (batch statistics, as in a
training step), nothing of the model changed. It prints one row per whitening layer (the worst group
of each field: condition number, whitening error of the batch and running matrices, Newton residual,
effective rank, eps share, T needed; see :class:`sdecor.WhiteningRecord`), then the layers that need
more Newton-Schulz steps than their T and those where eps, not the data, scales some directions.

``--json FILE`` writes the report (:meth:`sdecor.WhiteningReport.to_json`, read back with
``WhiteningReport.from_json``). ``--out DIR`` writes ``DIR/whitening_health.png``: per layer, the
whitening error of T Newton-Schulz steps for T = 1..30 (the largest over the layer's groups, in
float64: :func:`sdecor.health.newton_errors` of each group's Sigma + eps I) and the eigenvalue
spectrum of its worst group (the group with the largest whitening error). Every option and both
output locations are checked, and the locations created and written to, before any work.

:func:`inspect_model` runs the same on any model and batch (``benchmarks/inspect_resnet18.py``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import io
import sys

import torch

from .. import reference
from .._optional import require
from ..health import WhiteningReport, newton_errors, whitening_report
from ..nn import GroupWhitening
from . import data as data_mod
from .models import build_model
from .options import Number, UsageError, check_numbers
from .output import OutputDir, write_file
from .train.config import ConfigError, TrainConfig, check_device
from .train.health import probe_batch

__all__ = ["CheckpointError", "FIGURE", "MAX_T", "NUMBERS", "UsageError", "add_arguments", "inspect_model", "layer_curves",
           "load_checkpoint", "run"]

FIGURE = "whitening_health.png"      # the figure's name in --out
MAX_T = 30                           # the figure's Newton-Schulz step counts: 1..MAX_T


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a model.pt that sdecor train --out wrote (a model with whitening layers: "
                             "--norm whitening, or --lambda-decor > 0)")
    parser.add_argument("--batches", type=int, default=1, metavar="N",
                        help="report on the first N x (the run's --batch-size) images of the split, taken as "
                             "one batch: the statistics of N training batches together (default %(default)s)")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="the dataset split the batch comes from (default %(default)s)")
    parser.add_argument("--data-root", default=None,
                        help="folder of the torchvision datasets (mnist, fashion-mnist, cifar10), as for "
                             "sdecor train")
    parser.add_argument("--tol", type=float, default=1e-3,
                        help="whitening error below which a group counts as whitened, for 'T needed' "
                             "(default %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device to run the model on (default %(default)s)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="write the report as JSON (sdecor.WhiteningReport.to_json)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"write the figure {FIGURE}: per layer, the whitening error of T = 1..{MAX_T} "
                             f"Newton-Schulz steps, and the eigenvalue spectrum of its worst group")


# the numeric options and the values they take (sdecor.cli.options)
NUMBERS = {
    "batches": Number(1, 100_000, unit="batches of the run's --batch-size"),
    "tol": Number(0, lo_open=True),
}


class CheckpointError(UsageError):
    """CHECKPOINT is missing, unreadable, or not a checkpoint of ``sdecor train``."""

    def __init__(self, message: str):
        super().__init__("CHECKPOINT", message)


def run(args: argparse.Namespace) -> int:
    outputs = []
    try:
        check_numbers(args, NUMBERS)
        try:
            device = check_device(args.device)
        except ValueError as err:
            raise UsageError("--device", str(err)) from None
        if args.data_root is not None:
            data_mod.check_root(args.data_root)
        json_out = _json_output(args.json)
        figure_out = OutputDir(args.out, (FIGURE,), command="inspect", option="--out") if args.out is not None \
            else None
        if figure_out is not None:
            _require_matplotlib()
        for out in (json_out, figure_out):       # made and proved writable before any work
            if out is not None:
                out.prepare()
                outputs.append(out)
        cfg, state = load_checkpoint(args.checkpoint)
        dataset = _load_dataset(cfg, args.data_root)
        model = rebuild_model(cfg, state, dataset, args.checkpoint)
        split = dataset.train if args.split == "train" else dataset.test
        n = len(split.y)
        most = max(1, n // cfg.batch_size)
        if args.batches > most:
            raise UsageError("--batches", f"--batches: {args.batches} x batch size {cfg.batch_size} = "
                                          f"{args.batches * cfg.batch_size} images is more than the {n} of the "
                                          f"{args.split} split of {dataset.name}; at most --batches {most}")
    except (UsageError, data_mod.DatasetNotFoundError) as err:
        for out in outputs:                       # the folders made for a run that did not start
            out.discard()
        print(f"sdecor inspect: error: {err}", file=sys.stderr)
        return 2
    batches = args.batches
    x = probe_batch(split, cfg.batch_size, batches)
    epochs = f"{cfg.epochs} epoch" + ("s" if cfg.epochs != 1 else "")
    print(f"checkpoint {os.path.abspath(args.checkpoint)}: model {cfg.model} (whitening layers, group size "
          f"{cfg.num_channels}), trained {epochs} on {dataset.name}")
    print(f"batch: the first {len(x)} images of the {args.split} split of {dataset.name} ({batches} x batch "
          f"size {cfg.batch_size}, one forward in training mode) on {device}")
    model, x = model.to(device), x.to(device)
    report = inspect_model(model, x, tol=args.tol)
    status = 0
    if json_out is not None:
        name = json_out.files[0]
        saved = json_out.save({name: (report.to_json(indent=1) + "\n").encode()}, show=(name,))
        status = status if saved.requested else 1
        if saved.folder is not None:
            print(f"wrote {os.path.join(saved.folder, name)}")
    if figure_out is not None:
        png = figure_png(model, x, report, f"{cfg.model} on {dataset.name} ({len(x)} {args.split} images)")
        saved = figure_out.save({FIGURE: png})
        status = status if saved.requested else 1
        if saved.folder is not None:
            print(f"wrote {os.path.join(saved.folder, FIGURE)}")
    return status


# ---------------------------------------------------------------------------------------------------
# the report, its summary and the figure


def inspect_model(model: torch.nn.Module, x: torch.Tensor, *, tol: float = 1e-3, json_path=None,
                  figure_path=None, title: str = "") -> WhiteningReport:
    """Print the whitening report of ``model`` on the batch ``x`` with its summary, write it as JSON
    to ``json_path`` and the figure to ``figure_path`` (each where given); returns the report."""
    report = whitening_report(model, x, tol=tol)
    print(report)
    for line in summary(report):
        print(line)
    if json_path is not None:
        path = write_file(*os.path.split(os.path.abspath(json_path)), (report.to_json(indent=1) + "\n").encode())
        print(f"wrote {path}")
    if figure_path is not None:
        path = write_file(*os.path.split(os.path.abspath(figure_path)), figure_png(model, x, report, title))
        print(f"wrote {path}")
    return report


def figure_png(model: torch.nn.Module, x: torch.Tensor, report: WhiteningReport, title: str = "") -> bytes:
    """The figure of ``--out`` as PNG bytes (:func:`sdecor.cli.health_plot.plot_health` of
    :func:`layer_curves`)."""
    from .health_plot import plot_health

    buf = io.BytesIO()
    plot_health(layer_curves(model, x, report), report, buf, title)
    return buf.getvalue()


def summary(report: WhiteningReport, most: int = 6) -> list[str]:
    """Lines naming the layers whose groups need more Newton-Schulz steps than the layer's T to reach
    the report's tol, and those with covariance eigenvalues below eps (more than ``most`` layers of
    a kind: their count, range and worst one)."""
    slow, eps_scaled = [], []
    for r in report:
        t = r.t_needed
        worst_t = math.inf if bool((t < 0).any()) else float(t.max())
        if r.method == "newton" and worst_t > r.T:
            slow.append((worst_t, r.name, r.T))
        share = float(r.eps_share.max())
        if share > 0:
            g = int(r.eps_share.argmax())
            eps_scaled.append((share, f"{r.name} (group {g}: {round(share * r.group_sizes[g])} of "
                                      f"{r.group_sizes[g]} below eps={r.eps:g})"))

    def steps(t):
        return ">100" if t == math.inf else str(int(t))

    if not slow:
        needs = "none"
    elif len(slow) <= most:
        needs = ", ".join(f"{name} ({steps(t)} > T={T})" for t, name, T in slow)
    else:
        Ts = sorted({T for _, _, T in slow})
        top = max(slow, key=lambda item: item[0])
        needs = (f"{len(slow)} of {len(report)} layers, {steps(min(slow)[0])} to {steps(top[0])} steps > "
                 f"T={'/'.join(map(str, Ts))}; the most: {top[1]} ({steps(top[0])})")
    if not eps_scaled:
        below = "none"
    elif len(eps_scaled) <= most:
        below = ", ".join(text for _, text in eps_scaled)
    else:
        below = f"{len(eps_scaled)} of {len(report)} layers; the largest share: {max(eps_scaled)[1]}"
    return [f"more Newton-Schulz steps than T needed for error < {report.tol:g}: {needs}",
            f"covariance eigenvalues below eps (eps, not the data, scales those directions): {below}"]


@dataclasses.dataclass
class LayerCurve:
    """The figure's data for one whitening layer."""

    name: str
    T: int
    eps: float
    errors: torch.Tensor          # (MAX_T,) float64: the largest whitening error over the groups at T = 1..MAX_T
    group: int                    # the worst group (the report's largest whitening error in this layer)
    eigenvalues: torch.Tensor     # (d_g,) float64: the eigenvalues of Sigma of that group, descending


def layer_curves(model: torch.nn.Module, x: torch.Tensor, report: WhiteningReport,
                 max_T: int = MAX_T) -> list[LayerCurve]:
    """Per layer of ``report``: the whitening error of T = 1..max_T Newton-Schulz steps of every group
    (float64, :func:`sdecor.health.newton_errors` of Sigma_g + eps I), its largest over the groups,
    and the eigenvalues of Sigma of its worst group. Sigma_g is measured as the report measures it:
    the float64 covariance of the layer's input in one training-mode forward, here of a copy of the
    model (torch's random state restored afterwards)."""
    names = {r.name for r in report}
    twin = copy.deepcopy(model)
    sigmas = {}
    handles = []
    for name, layer in twin.named_modules():
        if name in names and isinstance(layer, GroupWhitening):
            def hook(module, inputs, output, name=name):
                xin = inputs[0].detach().to(torch.float64)
                sigmas[name] = reference.group_cov(xin, module.num_channels, module.last_group)[1].cpu()
            handles.append(layer.register_forward_hook(hook))
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        twin.train()
        twin(x)
    for h in handles:
        h.remove()
    curves = []
    for r in report:
        sigma = sigmas[r.name]
        per_group = []
        for size in dict.fromkeys(r.group_sizes):            # groups of one size together
            idx = [g for g, k in enumerate(r.group_sizes) if k == size]
            s = sigma[idx, :size, :size] + r.eps * torch.eye(size, dtype=torch.float64)
            per_group.append(newton_errors(s, max_T))
        errors = torch.cat(per_group, dim=1)                  # (max_T, G), groups in order
        err = r.whitening_error
        worst = int(torch.argmax(torch.where(err.isnan(), torch.full_like(err, math.inf), err)))
        k = r.group_sizes[worst]
        eigenvalues = torch.linalg.eigvalsh(sigma[worst, :k, :k]).flip(0)
        curves.append(LayerCurve(r.name, r.T, r.eps, errors.amax(dim=1), worst, eigenvalues))
    return curves


# ---------------------------------------------------------------------------------------------------
# the checkpoint


def load_checkpoint(path) -> tuple[TrainConfig, dict]:
    """(configuration, state_dict) of a ``model.pt`` that ``sdecor train`` wrote
    (``{"config": asdict(TrainConfig), "state_dict": ...}``). A configuration without a field that
    later versions added takes the field's default. Raises :class:`CheckpointError`."""
    if not os.path.lexists(path):
        raise CheckpointError(f"CHECKPOINT: no such file: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"CHECKPOINT: {path} is not a file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:                       # any failure of torch.load: not a readable checkpoint
        raise CheckpointError(f"CHECKPOINT: {path} cannot be read as a PyTorch checkpoint: {_load_error(err)}") \
            from None
    what = (f"{path} is not a checkpoint of sdecor train (a model.pt that sdecor train --out writes: "
            f"a dict with 'config' and 'state_dict')")
    if not isinstance(ck, dict) or not {"config", "state_dict"} <= set(ck):
        got = f"keys {sorted(map(str, ck))[:8]}" if isinstance(ck, dict) else type(ck).__name__
        raise CheckpointError(f"CHECKPOINT: {what}; got {got}")
    config, state = ck["config"], ck["state_dict"]
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise CheckpointError(f"CHECKPOINT: {what}; its 'config' or 'state_dict' is not a dict")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(map(str, set(config) - known))
    if unknown:
        raise CheckpointError(f"CHECKPOINT: {path}: its config has fields this sdecor does not know: {unknown} "
                              f"(written by a newer sdecor?)")
    # the device it trained on need not exist here: the model is rebuilt on --device
    cfg = TrainConfig(**{**config, "device": "cpu"})
    try:
        cfg.check()
    except ConfigError as err:
        raise CheckpointError(f"CHECKPOINT: {path}: its config is not valid: {err}") from None
    cfg.device = config.get("device", cfg.device)
    if cfg.resolved_norm() != "whitening":
        raise CheckpointError(
            f"CHECKPOINT: {path}: model {cfg.model} has no whitening layer to inspect: it was trained with "
            f"BatchNorm (sdecor train without --norm whitening and with --lambda-decor 0, as the demo's ce and "
            f"mask configurations); models trained with --norm whitening (the demo's whiten configuration) or "
            f"--lambda-decor > 0 (decor, full) have whitening layers")
    return cfg, state


def _load_error(err: Exception) -> str:
    """torch.load's error in a few words (its messages run over several lines)."""
    text = str(err)
    if isinstance(err, EOFError):
        return "the file is empty or cut short"
    marker = "WeightsUnpickler error:"
    if marker in text:                             # weights_only=True refused what the pickle holds
        detail = text.split(marker, 1)[1].strip().splitlines()[0].strip()
        return (f"not a PyTorch file, or one holding Python objects beyond tensors and plain values, which "
                f"are not unpickled ({detail[:160]})")
    first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(err).__name__
    return first[:200]


def rebuild_model(cfg: TrainConfig, state: dict, dataset: data_mod.Dataset, path="CHECKPOINT") -> torch.nn.Module:
    """The model of a checkpoint, built as ``sdecor train`` built it and loaded with its state_dict."""
    model = build_model(cfg.model, dataset.in_channels, dataset.num_classes, norm=cfg.resolved_norm(),
                        num_channels=cfg.num_channels, width=cfg.width)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, KeyError) as err:
        text = " ".join(str(err).split())
        raise CheckpointError(f"CHECKPOINT: {path}: its state_dict does not fit model {cfg.model} on "
                              f"{dataset.name} ({text[:300]})") from None
    if not any(isinstance(m, GroupWhitening) for m in model.modules()):
        raise CheckpointError(f"CHECKPOINT: {path}: model {cfg.model} has no whitening layer to inspect")
    return model


def _load_dataset(cfg: TrainConfig, data_root) -> data_mod.Dataset:
    if data_root is not None and not os.path.isdir(data_root):
        raise UsageError("--data-root", f"--data-root: no such folder: {data_root}")
    if cfg.dataset in data_mod.TORCHVISION and data_root is None:
        raise UsageError("--data-root", f"--data-root: the checkpoint's dataset {cfg.dataset!r} is read from a "
                                        f"local folder (downloads are disabled): give its root")
    return data_mod.load(cfg.dataset, data_root, seed=0)     # the seed sdecor train loads with


# ---------------------------------------------------------------------------------------------------
# option checks


def _require_matplotlib():
    return require("matplotlib", "demo", "sdecor inspect's figure (--out)")


def _json_output(path):
    """The output of ``--json FILE``: FILE's folder, checked (nothing made yet), or None."""
    if path is None:
        return None
    if not isinstance(path, str) or not path.strip():
        raise UsageError("--json", f"--json must be a file path; got {path!r}")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise UsageError("--json", f"--json: {path} is a folder; give a file path")
    folder, name = os.path.split(path)
    return OutputDir(folder, (name,), command="inspect", option="--json")
