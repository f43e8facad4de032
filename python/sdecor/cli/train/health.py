"""The whitening health of a model during training (``sdecor train --report-every N``) and the batch
that ``sdecor inspect`` reports on.

Every N epochs the training loop runs :func:`sdecor.whitening_report` on a fixed batch, the first
``batch_size`` images of the training split (:func:`probe_batch`), and logs its worst group
(:func:`worst_entry`, :func:`format_entry`): the layer, the group, its whitening error, the condition
number of its shifted covariance and the Newton-Schulz step count T it needs, beside the layer's T.
A run that logs these shows when and where whitening degrades.
"""

from __future__ import annotations

import torch

from ...health import WhiteningReport, whitening_report
from .. import data as data_mod
from ..models import build_model
from .config import TrainConfig

__all__ = ["health_entry", "format_entry", "probe_batch", "worst_entry"]


def probe_batch(split: data_mod.Split, batch_size: int, batches: int = 1) -> torch.Tensor:
    """The first ``batches * batch_size`` images of ``split`` in its order, as one batch (the whole
    split where it holds fewer)."""
    return split.x[:batches * batch_size]


def worst_entry(report: WhiteningReport) -> dict:
    """The worst group of a report (the largest whitening error, :meth:`WhiteningReport.worst`) as
    plain numbers: layer, group, whitening_error, running_error, condition, t_needed (-1: more than
    100 steps) and the layer's T."""
    w = report.worst()
    r, g = w.record, w.group
    return {"layer": r.name, "group": g, "whitening_error": w.value,
            "running_error": float(r.running_error[g]), "condition": float(r.condition[g]),
            "t_needed": int(r.t_needed[g]), "T": r.T}


def format_entry(entry: dict) -> str:
    """One line: ``worst whitening layer features.0.1 group 0: error 0.73 (running 0.75), condition
    3.3e+04, T needed 17 (T=5)``."""
    t = entry["t_needed"]
    needed = ">100" if t < 0 else str(t)
    return (f"worst whitening layer {entry['layer']} group {entry['group']}: error {entry['whitening_error']:.3g} "
            f"(running {entry['running_error']:.3g}), condition {entry['condition']:.3g}, T needed {needed} "
            f"(T={entry['T']})")


def health_entry(cfg: TrainConfig, model: torch.nn.Module, dataset: data_mod.Dataset, epoch: int) -> dict:
    """The worst group of ``model``'s whitening report on :func:`probe_batch` of the training split
    (``cfg.batch_size`` images), as :func:`worst_entry` with the epoch. The report runs on a copy of
    the model built from ``cfg`` (plain GroupWhitening layers, so a distributed run's synchronised
    layers do not communicate), in float32; the model itself is not touched."""
    device = next(model.parameters()).device
    twin = build_model(cfg.model, dataset.in_channels, dataset.num_classes, norm=cfg.resolved_norm(),
                       num_channels=cfg.num_channels, width=cfg.width).to(device)
    twin.load_state_dict(model.state_dict())
    report = whitening_report(twin, probe_batch(dataset.train, cfg.batch_size).to(device))
    return {"epoch": epoch, **worst_entry(report)}
