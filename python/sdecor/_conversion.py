"""What both conversions of :mod:`sdecor.convert` share: the report, the selection of layers by name
patterns, the checks that a layer's instance computes what its class does, the device and dtype of the
new layers' state, and the swap of the new layers into the model (each in its old one's place among its
parent's children).
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["ConversionReport", "Skip", "buffers_like", "instance_changes", "patterns", "qualname", "report_rows",
           "selected", "state_like", "swap_in"]


def report_rows(sections) -> list[str]:
    """The lines of a report's (title, [(name, what), ...]) sections: a title, then one aligned row
    per layer; an empty section prints nothing."""
    lines = []
    for title, rows in sections:
        if rows:
            lines.append(f"{title}:")
            width = max(len(name) for name, _ in rows)
            lines.extend(f"  {name:<{width}}  {what}" for name, what in rows)
    return lines


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did: ``replaced`` and ``skipped`` are lists of (name, reason), in the order
    of ``model.named_modules()``; ``function`` names the conversion that wrote it."""

    replaced: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    function: str = "convert_whitening"

    def __str__(self) -> str:
        lines = [f"{self.function}: replaced {len(self.replaced)} layer(s), skipped {len(self.skipped)}"]
        lines += report_rows((("replaced", self.replaced), ("skipped", self.skipped)))
        return "\n".join(lines)


class Skip(Exception):
    """A layer that is left as it is; the message is the report's reason."""


def patterns(value, argname: str) -> tuple[str, ...] | None:
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


def selected(model: nn.Module, include, exclude, wanted):
    """(name, module) of the modules for which ``wanted(module)`` holds and whose name passes the
    include / exclude patterns, outermost first; a module reachable under several names comes once
    per name. The submodules of a module that comes are part of it (replaced or left with it): they
    do not come themselves."""
    taken = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not wanted(module) or any(name.startswith(prefix) for prefix in taken):
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        taken.append(name + "." if name else "")
        yield name, module


def swap_in(model: nn.Module, swaps: list) -> None:
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def state_like(*tensors) -> dict:
    """device and dtype of the first initialised tensor among ``tensors``."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.parameter.UninitializedTensorMixin):
            return {"device": t.device, "dtype": t.dtype}
    return {}


def buffers_like(layer: nn.Module, stats: torch.Tensor, counter: torch.Tensor | None = None) -> None:
    """Put a new whitening layer's running statistics on the device and in the dtype of ``stats`` (the
    running statistics of the layer it replaces) and its batch counter on ``counter``'s device (default:
    stats'). The buffers keep their names and order."""
    for name in ("running_mean", "running_wm"):
        setattr(layer, name, getattr(layer, name).to(device=stats.device, dtype=stats.dtype))
    device = (counter if isinstance(counter, torch.Tensor) else stats).device
    layer.num_batches_tracked = layer.num_batches_tracked.to(device)


def instance_changes(module: nn.Module) -> str | None:
    """Why ``module``'s instance computes something its class does not, or None."""
    if "forward" in vars(module):
        return "its forward is replaced on the instance"
    hooks = [kind for kind, table in (("forward", module._forward_hooks),
                                      ("forward pre-", module._forward_pre_hooks),
                                      ("backward", module._backward_hooks),
                                      ("backward pre-", module._backward_pre_hooks)) if table]
    if hooks:
        return (f"it has {' and '.join(hooks)} hooks, which the new layer would not run; remove them, "
                f"convert, and register them on the new layer")
    if parametrize.is_parametrized(module):
        return "its parameters are parametrized (torch.nn.utils.parametrize)"
    return None
