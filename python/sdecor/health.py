"""Whitening health report: how well each whitening layer of a model whitens a batch.

:func:`whitening_report` runs one training-mode forward of a model, takes the input of every
whitening layer (:class:`~sdecor.nn.GroupWhitening`, :class:`~sdecor.nn.SyncGroupWhitening` and their
subclasses) and measures, per group of channels, what decides the group size, the Newton-Schulz step
count T and eps: the condition number of the shifted covariance, how far the layer's training matrix
and its running matrix are from whitening the batch, how far T Newton-Schulz steps are from the exact
inverse square root, the effective rank of the covariance, the share of its eigenvalues below eps
and the smallest T that would whiten the group to a tolerance. The model is left exactly as it was.

The definitions, one group at a time in float64, are :mod:`sdecor.health_reference`; the report
computes the same fields batched over groups (one batched eigendecomposition per layer, a second for a
smaller last group; one Newton-Schulz run for all groups of a size in the model), and the tests hold it
to the reference. :func:`newton_errors` gives the whitening error of every Newton-Schulz step count
from 1 to a maximum for a batch of matrices (the curve whose first value below ``tol`` is ``t_needed``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import _checks, _health_math, reference
from .health_reference import FIELDS, MAX_T
from .nn import GroupWhitening, SyncGroupWhitening

__all__ = ["WhiteningRecord", "WhiteningReport", "WorstGroup", "newton_errors", "whitening_report"]


# ---------------------------------------------------------------------------------------------------
# the report


@dataclasses.dataclass(frozen=True, eq=False)
class WhiteningRecord:
    r"""The health of one whitening layer on one batch.

    For each group g of the layer's input (d_g channels; a smaller last group has its own size),
    :math:`\Sigma_g` is the biased batch covariance of its channels (float64), :math:`S_g = \Sigma_g
    + \epsilon I`, W_g the whitening matrix the layer computes in training from this batch and R_g
    its running whitening matrix (what eval mode uses). Every per-group field is a float64 tensor of
    shape (num_groups,):

    Attributes:
        name: the layer's qualified name in the model (``model.named_modules()``).
        num_groups: G, the number of groups.
        group_sizes: the size d_g of every group (a tuple of G ints; the last one smaller with
            ``last_group="smaller"``).
        method, T, eps: the layer's settings, for reading the fields below.
        condition: lambda_max(S_g) / lambda_min(S_g).
        whitening_error: ||W_g S_g W_g^T - I||_F / sqrt(d_g): 0 for a perfect whitening, about 1 for
            none. W_g is computed as the layer computes it (its backend, method, T and eps, in its
            statistics dtype: float32 for float32 / float16 / bfloat16 input, float64 for float64),
            and the error is evaluated in float64 against the float64 S_g.
        running_error: the same with R_g: how well eval mode whitens this batch. A layer without
            running statistics (``track_running_stats=False``) whitens with batch statistics in eval
            mode too; its running_error is its whitening_error.
        newton_residual: ||W_g - S_g^(-1/2)||_F / ||S_g^(-1/2)||_F, how far T Newton-Schulz steps are
            from the exact ZCA matrix; 0 for ``method="zca"``.
        effective_rank: exp(entropy of lambda_i(Sigma_g) / sum_j lambda_j(Sigma_g)), between 1 (one
            direction holds all the variance) and d_g (all directions alike); 0 for a group without
            any variance.
        eps_share: the fraction of the eigenvalues of Sigma_g below eps (directions that eps, not
            the data, scales).
        t_needed: the smallest T <= 100 at which Newton-Schulz whitens S_g to whitening_error < the
            report's ``tol`` (computed in float64); -1 where 100 steps do not. Whole numbers, stored
            as float64 like the other fields.
    """

    name: str
    num_groups: int
    group_sizes: tuple
    method: str
    T: int
    eps: float
    condition: torch.Tensor
    whitening_error: torch.Tensor
    running_error: torch.Tensor
    newton_residual: torch.Tensor
    effective_rank: torch.Tensor
    eps_share: torch.Tensor
    t_needed: torch.Tensor

    def to_dict(self) -> dict:
        """The record as plain Python values: numbers as ints / floats, tensors as lists of floats."""
        out = {"name": self.name, "num_groups": self.num_groups, "group_sizes": list(self.group_sizes),
               "method": self.method, "T": self.T, "eps": self.eps}
        for field in FIELDS:
            out[field] = getattr(self, field).tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "WhiteningRecord":
        """The record of :meth:`to_dict` (e.g. read back from JSON)."""
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict; got {type(data).__name__}")
        expected = {f.name for f in dataclasses.fields(cls)}
        if set(data) != expected:
            missing, extra = sorted(expected - set(data)), sorted(set(data) - expected)
            raise ValueError(f"data is not a whitening record: missing keys {missing}, unknown keys {extra}")
        G = int(data["num_groups"])
        if len(data["group_sizes"]) != G:
            raise ValueError(f"data['group_sizes'] must hold num_groups={G} sizes; got {data['group_sizes']!r}")
        values = {}
        for field in FIELDS:
            t = torch.tensor(data[field], dtype=torch.float64)
            if t.shape != (G,):
                raise ValueError(f"data[{field!r}] must hold num_groups={G} numbers; got shape {tuple(t.shape)}")
            values[field] = t
        return cls(name=str(data["name"]), num_groups=G, group_sizes=tuple(int(k) for k in data["group_sizes"]),
                   method=str(data["method"]), T=int(data["T"]), eps=float(data["eps"]), **values)

    def __eq__(self, other) -> bool:
        """Equal settings and bitwise equal fields (NaN equal to NaN)."""
        if not isinstance(other, WhiteningRecord):
            return NotImplemented
        if (self.name, self.num_groups, tuple(self.group_sizes), self.method, self.T, self.eps) != (
                other.name, other.num_groups, tuple(other.group_sizes), other.method, other.T, other.eps):
            return False
        for field in FIELDS:
            a, b = getattr(self, field), getattr(other, field)
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.isnan(), b.isnan()):
                return False
            if not torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)):
                return False
        return True

    __hash__ = None


@dataclasses.dataclass(frozen=True)
class WorstGroup:
    """The group of a report with the largest whitening error (:meth:`WhiteningReport.worst`):
    ``record`` its layer's record, ``group`` its index in that layer, ``value`` its whitening error."""

    record: WhiteningRecord
    group: int
    value: float


class WhiteningReport(Sequence):
    """The health of every whitening layer of a model on one batch (:func:`whitening_report`).

    A sequence of :class:`WhiteningRecord`, one per whitening layer that ran, in the order of
    ``model.named_modules()``: ``len(report)``, ``report[i]``, ``report["layer1.0.bn1"]`` (by
    name), iteration. ``tol`` is the tolerance ``t_needed`` was computed for. ``print(report)``
    gives one line per layer (the worst group of each field); :meth:`worst` the worst group of all;
    :meth:`to_dict` / :meth:`to_json` and :meth:`from_dict` / :meth:`from_json` the round trip
    through JSON (``from_json(report.to_json()) == report``).
    """

    def __init__(self, records, tol: float):
        self._records = tuple(records)
        for r in self._records:
            if not isinstance(r, WhiteningRecord):
                raise TypeError(f"records must be WhiteningRecord objects; got {type(r).__name__}")
        self.tol = float(tol)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        if isinstance(index, str):
            for r in self._records:
                if r.name == index:
                    return r
            raise KeyError(f"no whitening layer named {index!r} in the report; layers: "
                           f"{[r.name for r in self._records]}")
        if isinstance(index, slice):
            return WhiteningReport(self._records[index], self.tol)
        return self._records[index]

    def __eq__(self, other) -> bool:
        if not isinstance(other, WhiteningReport):
            return NotImplemented
        return self.tol == other.tol and self._records == other._records

    __hash__ = None

    def worst(self) -> WorstGroup:
        """The layer and group with the largest ``whitening_error`` (NaN counts as the largest; on a
        tie the first in module and group order), as a :class:`WorstGroup`."""
        best = None
        for record in self._records:
            err = record.whitening_error
            if err.numel() == 0:
                continue
            key_values = torch.where(err.isnan(), torch.full_like(err, math.inf), err)
            g = int(torch.argmax(key_values))                        # the first maximum
            key = (bool(err[g].isnan()), float(key_values[g]))
            if best is None or key > best[0]:
                best = (key, WorstGroup(record, g, float(err[g])))
        if best is None:
            raise ValueError("the report holds no group")
        return best[1]

    def to_dict(self) -> dict:
        """``{"tol": tol, "layers": [record.to_dict(), ...]}``: plain Python values (JSON-ready)."""
        return {"tol": self.tol, "layers": [r.to_dict() for r in self._records]}

    def to_json(self, **kwargs) -> str:
        """:meth:`to_dict` as JSON text (keyword arguments go to :func:`json.dumps`, e.g. indent=2).
        NaN, where a field has one, is written as ``NaN`` (Python's json reads it back)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> "WhiteningReport":
        """The report of :meth:`to_dict`."""
        if not isinstance(data, dict) or set(data) != {"tol", "layers"}:
            raise ValueError("data must be a dict with the keys 'tol' and 'layers' (WhiteningReport.to_dict)")
        return cls([WhiteningRecord.from_dict(r) for r in data["layers"]], data["tol"])

    @classmethod
    def from_json(cls, text: str) -> "WhiteningReport":
        """The report of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        return f"WhiteningReport({len(self)} layers, tol={self.tol:g})"

    def __str__(self) -> str:
        head = ("layer", "groups", "method", "T", "eps", "cond max", "error max", "running max",
                "residual max", "rank/d min", "eps share max", "T needed max")
        rows = [head]
        for r in self._records:
            sizes = torch.tensor(r.group_sizes, dtype=torch.float64)
            t = r.t_needed
            t_max = ">100" if bool((t < 0).any()) else f"{int(t.max())}"
            d, last = r.group_sizes[0], r.group_sizes[-1]
            group_desc = f"{r.num_groups}x{d}" if last == d else (
                f"{r.num_groups - 1}x{d}+{last}" if r.num_groups > 1 else f"1x{last}")
            rows.append((r.name, group_desc, r.method, str(r.T), f"{r.eps:g}",
                         f"{float(r.condition.max()):.3g}", f"{float(r.whitening_error.max()):.3g}",
                         f"{float(r.running_error.max()):.3g}", f"{float(r.newton_residual.max()):.3g}",
                         f"{float((r.effective_rank / sizes).min()):.3g}", f"{float(r.eps_share.max()):.3g}",
                         t_max))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = [f"whitening report: {len(self)} layer(s), T needed for whitening error < {self.tol:g}"]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        if self._records:
            w = self.worst()
            lines.append(f"worst group: {w.record.name} group {w.group}, whitening error {w.value:.3g}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# the API


def whitening_report(model: nn.Module, x, *, tol: float = 1e-3) -> WhiteningReport:
    r"""Measure how well every whitening layer of ``model`` whitens the batch ``x``.

    Runs one forward of ``model`` on ``x`` with the whole model in training mode (batch statistics,
    as in a training step; under ``torch.no_grad``), takes the input of every whitening layer
    (:class:`~sdecor.nn.GroupWhitening`, :class:`~sdecor.nn.SyncGroupWhitening` and their subclasses,
    e.g. :class:`~sdecor.nn.GroupWhiteningAct`) through forward hooks, and returns a
    :class:`WhiteningReport` with one :class:`WhiteningRecord` per whitening layer that ran, in the
    order of ``model.named_modules()``. The record's fields are defined per group in
    :class:`WhiteningRecord` (and, in float64 one group at a time, in :mod:`sdecor.health_reference`).

    Nothing of the model or of torch's random state changes: every parameter and buffer (running
    statistics, ``num_batches_tracked``; ``model.state_dict()`` is bitwise equal afterwards), every
    module's ``training`` flag, the whitening layers' ``momentum`` and the CPU and CUDA random number
    generators' states are restored,
    also when the forward raises (the error is then raised as it is). The hooks are removed in any
    case. Dropout and other random layers draw as a training step would, from the current random
    state, which is then put back: two calls give the same report.

    How the numbers are obtained:

    - W_g, the matrix the layer uses in training, is the one the layer itself computes in this
      forward (on the active backend, in float32 for float32 / float16 / bfloat16 input and float64
      for float64 input): each whitening layer runs at momentum 1 during the forward, so that its
      running matrix right after it is this batch's W, read in the hook (a layer without running
      statistics, or with buffers of another dtype than W's, has W computed by the same training
      path of a fresh GroupWhitening with its settings). Its errors are then evaluated in float64.
    - Sigma_g is the biased covariance of the layer's input in float64
      (:func:`sdecor.reference.group_cov` of the input converted to float64); the eigenvalues come
      from one batched ``torch.linalg.eigh`` per layer (the smaller last group on its own r x r
      matrix), so a condition number of 1e8 is resolved to about 1e-8 relative.
    - ``t_needed`` runs the coupled Newton-Schulz iteration of the design contract in float64
      (Sn = S / tr S, Y_0 = Sn, Z_0 = I, M = (3I - Z Y) / 2, Y <- Y M, Z <- M Z, W_T = Z_T / sqrt(tr S)),
      once, for all groups of a size in the model together, up to 100 steps (stopping when every
      group has reached ``tol``).

    Args:
        model: a ``torch.nn.Module`` with at least one whitening layer.
        x: the batch: a tensor (``model(x)``), or a tuple or list of tensors passed as positional
            arguments (``model(*x)``).
        tol: the whitening error below which a group counts as whitened, for ``t_needed``: a finite
            number > 0.

    Returns:
        A :class:`WhiteningReport` (its tensors on the CPU). Whitening layers that the forward does
        not reach have no record.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``; ``x`` is neither a tensor nor a non-empty
            tuple / list of tensors; ``tol`` is not a number.
        ValueError: ``tol`` is not finite or not > 0; ``model`` has no whitening layer, or none of
            them ran in the forward; a whitening layer ran more than once in the forward (its
            running statistics mix several inputs; report on a model that calls it once); a
            SyncGroupWhitening layer would synchronise over a process group of world size > 1 (the
            report is a single-process tool: use ``SyncGroupWhitening.revert_sync_whitening`` on a
            copy of the model).

    Example::

        model = torchvision.models.resnet18(num_classes=10)
        sdecor.convert_whitening(model, num_channels=16)
        report = sdecor.whitening_report(model, images)         # images: (64, 3, 32, 32)
        print(report)                                           # one line per layer
        worst = report.worst()                                  # largest whitening error
        print(worst.record.name, worst.group, worst.value, worst.record.t_needed[worst.group])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    args = _checks.report_model_args(x)
    tol = _checks.report_tol(tol)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, GroupWhitening)]
    if not layers:
        raise ValueError("model has no whitening layer (GroupWhitening, SyncGroupWhitening or a subclass); "
                         "convert its normalisation layers first, e.g. sdecor.convert_whitening(model)")
    for name, layer in layers:
        if isinstance(layer, SyncGroupWhitening) and _world_size(layer) > 1:
            raise ValueError(f"model's layer {name!r} is a SyncGroupWhitening in a process group of world "
                             f"size {_world_size(layer)}: its training forward would synchronise the "
                             f"statistics of every process; whitening_report is a single-process tool "
                             f"(report on a copy with SyncGroupWhitening.revert_sync_whitening)")

    captured: dict[str, _LayerStats] = {}

    # A forward hook (after the layer) rather than a pre-hook: the layer has accepted its input, which
    # is measured before any later in-place operation can change it, and no input is kept.
    def hook(name, layer, inputs, output):
        if name in captured:
            raise ValueError(f"model's whitening layer {name!r} ran more than once in one forward; "
                             f"whitening_report needs every whitening layer to run once")
        captured[name] = _layer_stats(layer, inputs[0])

    with _health_math.model_kept(model):
        # momentum 1: after its forward a layer's running matrix is the W it computed (_layer_stats);
        # the running statistics are restored with every other buffer
        momenta = [(layer, layer.momentum) for _, layer in layers]
        handles = [layer.register_forward_hook(lambda l, i, o, name=name: hook(name, l, i, o))
                   for name, layer in layers]
        try:
            for layer, _ in momenta:
                layer.momentum = 1.0
            model.train()
            with torch.no_grad():
                model(*args)
        finally:
            for h in handles:
                h.remove()
            for layer, momentum in momenta:
                layer.momentum = momentum
    if not captured:
        raise ValueError(f"none of model's {len(layers)} whitening layer(s) ran in the forward on x")
    ran = [(name, layer) for name, layer in layers if name in captured]
    return WhiteningReport(_records(ran, captured, tol), tol)


def newton_errors(s: torch.Tensor, max_T: int = 30) -> torch.Tensor:
    r"""The whitening error of T Newton-Schulz steps, for every T from 1 to ``max_T``: how fast the
    iteration whitens each matrix of a batch.

    For each S of ``s`` (e.g. a group's Sigma + eps I), row T - 1 of the result is
    ||W_T S W_T^T - I||_F / sqrt(d), W_T the Newton-Schulz matrix of S after T steps (the design
    contract's coupled iteration, as :func:`sdecor.reference.newton_schulz` computes it), all in
    float64: one run of the iteration for the whole batch. These are the errors whose first one
    below ``tol`` gives a report's ``t_needed``.

    Args:
        s: (B, d, d) symmetric positive definite matrices, a floating dtype (computed in float64).
        max_T: the largest step count, an int from 1 to 100.

    Returns:
        A (max_T, B) float64 tensor on the device of ``s``.

    Raises:
        TypeError: ``s`` is not a tensor; ``max_T`` is not an int.
        ValueError: ``s`` is not a batch of square floating-point matrices; ``max_T`` is out of range.
    """
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"s must be a tensor; got {type(s).__name__}")
    if s.dim() != 3 or s.shape[-1] != s.shape[-2] or not s.is_floating_point():
        raise ValueError(f"s must be a (B, d, d) floating-point tensor of square matrices; got a {s.dtype} "
                         f"tensor of shape {tuple(s.shape)}")
    if isinstance(max_T, bool) or not isinstance(max_T, numbers.Integral):
        raise TypeError(f"max_T must be an int; got {type(max_T).__name__}")
    if not 1 <= max_T <= MAX_T:
        raise ValueError(f"max_T must be an int from 1 to {MAX_T}; got {max_T!r}")
    steps = _health_math.newton_step_errors(s.to(torch.float64))
    return torch.stack([next(steps) for _ in range(int(max_T))])


# ---------------------------------------------------------------------------------------------------
# the layer's process group


def _world_size(layer: SyncGroupWhitening) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(layer.process_group)


# ---------------------------------------------------------------------------------------------------
# statistics of one layer call, in the forward hook


@dataclasses.dataclass
class _LayerStats:
    sigma: torch.Tensor        # (G, d, d) float64, a smaller last group top-left in its entry
    w: torch.Tensor            # (G, d, d) the layer's training matrices, in its statistics dtype


def _layer_stats(layer: GroupWhitening, x: torch.Tensor) -> _LayerStats:
    """Sigma (float64) and the layer's training W for its input x. Runs in the hook, right after the
    layer (so that no later in-place operation on x can change what is measured, and x need not be
    kept), with autocast off: the float64 math stays float64.

    W: the layer ran at momentum 1 (see :func:`whitening_report`), so its running matrix now holds
    this batch's W exactly (r <- r + 1 * (W - r) gives W), where that buffer has W's dtype. Otherwise
    (no running statistics, or buffers of another dtype) a fresh GroupWhitening with the layer's
    settings runs the same training path on x and holds W in a buffer of W's dtype."""
    x = x.detach()
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        if layer.track_running_stats and layer.running_wm.dtype == stats_dtype:
            w = layer.running_wm.clone()
        else:
            probe = GroupWhitening(layer.num_features, layer.num_channels, method=layer.method, T=layer.T,
                                   eps=layer.eps, momentum=1.0, affine=False, track_running_stats=True,
                                   last_group=layer.last_group, device=x.device, dtype=stats_dtype)
            probe(x)
            w = probe.running_wm
        _, sigma = reference.group_cov(x.to(torch.float64), layer.num_channels, layer.last_group)
    return _LayerStats(sigma=sigma, w=w)


def _records(layers, captured: dict, tol: float) -> list[WhiteningRecord]:
    # every field but t_needed per layer part; the S of all parts of one size, for one t_needed run
    parts_out = []                       # per layer: list of (size, fields of the part)
    by_size: dict[int, list[torch.Tensor]] = {}
    for name, layer in layers:
        stats = captured[name]
        running = layer.running_wm if layer.track_running_stats else None
        out = []
        for groups, k in _health_math.parts(layer):
            fields = _health_math.part_fields(stats.sigma[groups, :k, :k], stats.w[groups, :k, :k],
                                  None if running is None else running[groups, :k, :k], layer.method, layer.eps)
            by_size.setdefault(k, []).append(fields.pop("s"))
            out.append((k, fields))
        parts_out.append(out)
    needed = {}
    for k, ss in by_size.items():
        batch = torch.cat([s.to(ss[0].device) for s in ss])
        needed[k] = iter(_health_math.t_needed(batch, tol).split([s.shape[0] for s in ss]))
    records = []
    for (name, layer), out in zip(layers, parts_out):
        values = {field: [] for field in FIELDS}
        for k, fields in out:
            fields["t_needed"] = next(needed[k])
            for field in FIELDS:
                values[field].append(fields[field])
        sizes = tuple(k for groups, k in _health_math.parts(layer) for _ in range(groups.stop - groups.start))
        values = {field: torch.cat(v).cpu() for field, v in values.items()}
        records.append(WhiteningRecord(
            name=name, num_groups=layer.num_groups, group_sizes=sizes, method=layer.method, T=layer.T,
            eps=layer.eps, **values))
    return records
