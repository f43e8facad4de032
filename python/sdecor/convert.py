"""Turn a network's BatchNorm layers into :class:`~sdecor.nn.GroupWhitening` layers."""

from __future__ import annotations

import dataclasses
import fnmatch

import torch
from torch import nn

from . import _checks
from .nn import GroupWhitening

__all__ = ["convert_whitening", "ConversionReport"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_OPTIONS = ("T", "eps", "momentum", "affine", "track_running_stats")


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert_whitening` did: ``replaced`` and ``skipped`` are lists of (name, reason)."""

    replaced: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"convert_whitening: replaced {len(self.replaced)} layer(s), skipped {len(self.skipped)}"]
        for title, rows in (("replaced", self.replaced), ("skipped", self.skipped)):
            if rows:
                lines.append(f"{title}:")
                width = max(len(name) for name, _ in rows)
                lines.extend(f"  {name:<{width}}  {reason}" for name, reason in rows)
        return "\n".join(lines)


def _patterns(value, argname: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        items = None
    if items is None or not all(isinstance(p, str) for p in items):
        raise TypeError(f"{argname} must be None, a glob pattern (str) or a list of them; got {value!r}")
    return items


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _state_like(bn: nn.modules.batchnorm._BatchNorm) -> dict:
    """device and dtype of the layer's parameters / buffers."""
    for t in (bn.weight, bn.running_mean):
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.parameter.UninitializedTensorMixin):
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _replacement(bn, num_channels: int, method: str, options: dict) -> GroupWhitening:
    kw = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
          "track_running_stats": bn.track_running_stats}
    kw.update(options)
    new = GroupWhitening(bn.num_features, num_channels, method=method, **kw, **_state_like(bn))
    with torch.no_grad():
        if new.affine and bn.affine:
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
        if new.track_running_stats and bn.track_running_stats and bn.running_mean is not None:
            # BatchNorm's running statistics are a diagonal covariance: start from the whitening
            # matrices diag((var + eps)^-1/2), for which eval mode reproduces the BatchNorm layer.
            G, d = new.num_groups, new.num_channels
            new.running_mean.copy_(bn.running_mean.reshape(G, d, 1))
            inv_std = (bn.running_var.to(torch.float64) + new.eps).rsqrt().reshape(G, d)
            new.running_wm.copy_(torch.diag_embed(inv_std))
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def convert_whitening(model: nn.Module, num_channels: int = 16, method: str = "newton", include=None,
                      exclude=None, **kw) -> ConversionReport:
    """Replace the BatchNorm1d/2d/3d layers of ``model`` in place by :class:`GroupWhitening` layers.

    Args:
        model: the network; changed in place.
        num_channels: group size d of the new layers. A layer whose channel count d does not divide
            is left as it is and listed in ``report.skipped``.
        method: ``"newton"`` (IterNorm) or ``"zca"``.
        include: shell-style glob pattern(s) (:mod:`fnmatch`, case-sensitive) over the qualified
            layer names of ``model.named_modules()``, e.g. ``"layer3.*"`` or ``["features.1*"]``;
            only matching layers are converted (default: all).
        exclude: glob pattern(s); matching layers are not converted (applied after ``include``).
        **kw: ``T``, ``eps``, ``momentum``, ``affine``, ``track_running_stats`` for the new layers.
            By default eps, momentum, affine and track_running_stats are each BatchNorm layer's own.
            eps, given or taken over, must be a finite number > 0.

    The new layers take over the BatchNorm's weight and bias, its running mean and, as running
    whitening matrices, diag((running_var + eps)^-1/2), so that right after conversion eval mode
    gives the BatchNorm layer's output; they are created on the layer's device with its dtype and
    in its training mode. All arguments are checked, and every new layer built, before the model
    is changed.

    Returns:
        a :class:`ConversionReport` with ``replaced`` and ``skipped`` lists of (name, reason).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"num_channels must be a positive int; got {num_channels!r}")
    unknown = sorted(set(kw) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"convert_whitening got unexpected keyword argument(s) {unknown}; "
                        f"accepted: {list(_OPTIONS)}")
    _checks.check_whitening_args(method, kw.get("eps", 1e-5), kw.get("T", 5))
    include = _patterns(include, "include")
    exclude = _patterns(exclude, "exclude")
    # Validate the remaining options once, on a layer the size of a group.
    GroupWhitening(num_channels, num_channels, method=method, **kw)

    report = ConversionReport()
    swaps = []
    built = {}                           # a layer reachable under several names gets one replacement
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, _BATCHNORMS):
            continue
        if include is not None and not _matches(name, include):
            continue
        if exclude is not None and _matches(name, exclude):
            continue
        if not name:
            report.skipped.append(("", "the model itself is a BatchNorm layer; put it in a container "
                                       "(e.g. nn.Sequential) to convert it"))
            continue
        if isinstance(module.weight, nn.parameter.UninitializedTensorMixin) or (
                module.track_running_stats
                and isinstance(module.running_mean, nn.parameter.UninitializedTensorMixin)):
            report.skipped.append((name, f"{type(module).__name__} is not initialized yet (run a "
                                         f"forward pass first)"))
            continue
        C = module.num_features
        if C % num_channels != 0:
            report.skipped.append((name, f"{C} channels are not divisible by num_channels={num_channels} "
                                         f"(valid group sizes: {_checks.divisors(C)})"))
            continue
        if "eps" not in kw:               # a BatchNorm layer may hold eps = 0, which whitening refuses
            _checks.check_eps(module.eps, f"eps of {name!r} (the BatchNorm layer's own; pass eps= to override)")
        if id(module) not in built:
            built[id(module)] = _replacement(module, num_channels, method, kw)
        swaps.append((name, built[id(module)]))
        report.replaced.append((name, f"{type(module).__name__}({C}) -> GroupWhitening({C}, "
                                      f"num_channels={num_channels}, method={method!r})"))

    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return report
