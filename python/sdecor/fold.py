"""Fold a network's GroupWhitening layers for inference: a model of plain PyTorch layers.

In eval mode a GroupWhitening layer with running statistics is an affine map of the channels, block
diagonal over its groups: for group g (d channels; the last one r <= d)

    y_g = diag(gamma_g) W_g (x_g - mean_g) + beta_g = A_g x_g + (beta_g - A_g mean_g),

with W_g = running_wm[g], mean_g = running_mean[g], gamma / beta = weight / bias (1 / 0 without
affine). :func:`fold_whitening` multiplies this map into the Conv / ConvTranspose / Linear layer that
produces the layer's input, where that layer's output feeds nothing else, and otherwise replaces the
whitening layer by a standard layer that computes the same map (a 1x1 convolution grouped as finely
as the whitening groups allow). The result holds no sdecor module and gives the eval-mode output of
the model it came from, up to rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import warnings

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from . import _checks
from ._conversion import report_rows
from ._layout import group_sizes
from .nn import GroupWhitening, GroupWhiteningAct, SyncGroupWhitening, SyncGroupWhiteningAct

__all__ = ["fold_whitening", "FoldReport"]

# Layers a whitening map can be multiplied into: exactly these forwards (a subclass with its own forward,
# e.g. a weight-standardised convolution, computes something else from its weight).
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE = _CONVS + _TRANSPOSED + (nn.Linear,)
_RANK_LAYERS = {2: None, 3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


@dataclasses.dataclass
class FoldReport:
    """What :func:`fold_whitening` did, by qualified layer name (of the model given).

    ``folded``: (whitening layer, layer it was folded into); ``replaced``: (whitening layer, what
    replaced it); ``traced``: whether torch.fx could trace the model (without a trace nothing is
    folded, every layer is replaced); ``trace_error``: why not.
    """

    folded: list = dataclasses.field(default_factory=list)
    replaced: list = dataclasses.field(default_factory=list)
    traced: bool = True
    trace_error: str | None = None

    def __str__(self) -> str:
        lines = [f"fold_whitening: folded {len(self.folded)} layer(s), replaced {len(self.replaced)}"]
        if not self.traced:
            lines.append(f"torch.fx could not trace the model, so nothing was folded: {self.trace_error}")
        lines += report_rows((("folded", self.folded), ("replaced", self.replaced)))
        return "\n".join(lines)


def fold_whitening(model: nn.Module, example_inputs=None, *, inplace: bool = False,
                   return_report: bool = False):
    """The model in eval mode with its whitening layers folded away.

    Every :class:`~sdecor.nn.GroupWhitening` layer (SyncGroupWhitening, GroupWhiteningAct and
    SyncGroupWhiteningAct included) becomes the affine map of its eval mode (running statistics, weight and bias):

    - folded into the Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear that computes its input, when
      torch.fx finds that layer's output used by the whitening layer alone, the layer called once and
      its parameters not shared. The whitening layer becomes ``nn.Identity()``. A grouped convolution
      (e.g. depthwise) takes the map only when every whitening group lies inside one of its groups;
    - otherwise replaced by a standard layer computing the map: with the input's rank known
      (``example_inputs``), ``nn.Conv1d/2d/3d`` with kernel size 1 (``nn.Linear`` for 2D input),
      grouped as finely as the whitening groups allow; with it unknown, a ``torch.fx.GraphModule``
      that runs such an ``nn.Conv1d`` on the input reshaped to (N, C, -1), for any rank. The layer is
      made on the whitening layer's device, in the dtype of its input where ``example_inputs`` show
      it (else that of the whitening layer's parameters), its parameters requiring gradients where
      the whitening layer's weight does.

    A GroupWhiteningAct (or SyncGroupWhiteningAct) keeps its tail: ``nn.Sequential(drop, act)`` where it was folded,
    ``nn.Sequential(map, drop, act)`` otherwise.

    Args:
        model: the network (its own training mode does not matter: folding uses the running
            statistics, which are what eval mode uses). Every whitening layer must track running
            statistics (a layer with ``track_running_stats=False`` normalises each batch by its own
            statistics in eval mode too, which is no fixed map): ValueError naming the layers. The
            parameters and buffers of each must be floating-point and on one device (TypeError /
            ValueError naming the layer).
        example_inputs: optional input(s) of ``model`` (a tensor or a tuple of positional
            arguments), run once in eval mode without gradients to learn the rank and dtype of each
            whitening layer's input (a whitening layer on another device than its input raises
            there, naming both devices). With them a Linear takes a map only when its output is 2D (N, C); without
            them a Linear feeding a whitening layer is taken to have 2D output (for (N, L, C) output
            the whitening layer would see L as its channels).
        inplace: change ``model`` itself (its layers are replaced, the weights of the layers folded
            into change) instead of a deep copy; ``model`` is left as it was in either case when an
            error is raised.
        return_report: also return a :class:`FoldReport`.

    Returns:
        the folded model in eval mode (``model`` itself for ``inplace=True``, except that a model
        which is itself a whitening layer is returned as its replacement), or (model, report).

    A model that torch.fx cannot trace (data-dependent control flow, ...) still has every layer
    replaced, with a warning that names the tracing error; nothing is folded then. Hooks registered
    on a whitening layer do not carry over to its replacement, and a layer with forward hooks or
    parametrizations is not folded into.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    for name, flag in (("inplace", inplace), ("return_report", return_report)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
    args = _example_args(example_inputs)
    _check_layers(model)

    target = model if inplace else copy.deepcopy(model)
    modes = {m: m.training for m in target.modules()}
    try:
        target.eval()
        result, report = _fold(target, args)
    except BaseException:
        if inplace:                              # leave the model as it came: only modes changed so far
            for m, mode in modes.items():
                m.training = mode
        raise
    return (result, report) if return_report else result


# ---------------------------------------------------------------------------------------------------
# checks


def _example_args(example_inputs) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be None, a tensor or a tuple of the model's positional "
                    f"arguments; got {type(example_inputs).__name__}")


def _whitening_layers(model: nn.Module) -> dict[int, tuple[GroupWhitening, list[str]]]:
    """id -> (layer, its qualified names), in the order of ``named_modules``."""
    found: dict[int, tuple[GroupWhitening, list[str]]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, GroupWhitening):
            found.setdefault(id(m), (m, []))[1].append(name)
    return found


# the whitening layer, then its submodules drop and act
_ACT_CLASSES = (GroupWhiteningAct, SyncGroupWhiteningAct)


def _tail(layer: GroupWhitening) -> list[nn.Module]:
    if isinstance(layer, _ACT_CLASSES):
        return [layer.drop, layer.act]
    return []


def _check_layers(model: nn.Module) -> None:
    no_stats, unknown = [], []
    known = (GroupWhitening.forward, SyncGroupWhitening.forward) + tuple(c.forward for c in _ACT_CLASSES)
    for layer, names in _whitening_layers(model).values():
        label = names[0] or "<the model itself>"
        # its map is computed from these tensors together, and the layer replacing it made on their device
        _checks.check_state(f"fold_whitening: layer {label!r} ({type(layer).__name__})", _layer_tensors(layer))
        if not layer.track_running_stats:
            no_stats.append(label)
        if type(layer).forward not in known:
            unknown.append(f"{label} ({type(layer).__name__})")
    if no_stats:
        raise ValueError(
            f"fold_whitening: layer(s) {', '.join(map(repr, no_stats))} have track_running_stats=False: "
            f"they whiten every batch with its own statistics, in eval mode too, so they are no fixed "
            f"affine map and cannot be folded")
    if unknown:
        raise TypeError(f"fold_whitening: layer(s) {', '.join(unknown)} are GroupWhitening subclasses with "
                        f"a forward of their own, whose eval-mode map is unknown here")


def _layer_tensors(layer: GroupWhitening) -> tuple:
    return (("weight", layer.weight), ("bias", layer.bias), ("running_mean", layer.running_mean),
            ("running_wm", layer.running_wm), ("num_batches_tracked", layer.num_batches_tracked))


# ---------------------------------------------------------------------------------------------------
# the eval-mode map of a whitening layer


def layer_group_sizes(layer: GroupWhitening) -> list[int]:
    """Channels per group of a whitening layer (:func:`sdecor._layout.group_sizes`): num_channels for
    all groups but the last, which holds the rest."""
    return group_sizes(layer.num_features, layer.num_channels)


def affine_map(layer: GroupWhitening) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks (G, d, d), shift (C,)), float64, of the layer's eval mode: y = A x + shift with A the
    block-diagonal matrix of ``blocks`` (the last group's block its top-left r x r part, the rest 0)."""
    G, d, C = layer.num_groups, layer.num_channels, layer.num_features
    r = layer_group_sizes(layer)[-1]
    f64 = torch.float64
    wm = layer.running_wm.detach().to(f64).clone()
    mean = layer.running_mean.detach().to(f64).reshape(G, d).clone()
    wm[-1, r:, :] = 0                                   # padding of a smaller last group
    wm[-1, :, r:] = 0
    mean[-1, r:] = 0
    pad = G * d - C
    if layer.affine:
        gamma = nn.functional.pad(layer.weight.detach().to(f64), (0, pad)).reshape(G, d)
        beta = layer.bias.detach().to(f64)
    else:
        gamma = torch.ones(G, d, dtype=f64, device=wm.device)
        beta = torch.zeros(C, dtype=f64, device=wm.device)
    blocks = gamma.unsqueeze(-1) * wm                   # diag(gamma_g) W_g
    shift = beta - (blocks @ mean.unsqueeze(-1)).reshape(G * d)[:C]
    return blocks, shift


def mix_rows(blocks: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """A @ mat for the block-diagonal A of ``blocks`` (G, d, d) and mat (C, K), C <= G d."""
    G, d = blocks.shape[0], blocks.shape[-1]
    C, K = mat.shape
    if C < G * d:
        mat = nn.functional.pad(mat, (0, 0, 0, G * d - C))
    return (blocks @ mat.reshape(G, d, K)).reshape(G * d, K)[:C]


def _groups_fit(sizes: list[int], group_width: int) -> bool:
    """Whether every whitening group lies inside one of the consecutive blocks of ``group_width``
    channels."""
    start = 0
    for s in sizes:
        if start // group_width != (start + s - 1) // group_width:
            return False
        start += s
    return True


def conv_groups(sizes: list[int]) -> int:
    """The largest number k of equal channel blocks such that every whitening group lies inside one
    block (k = G for groups of equal size)."""
    C = sum(sizes)
    return next(k for k in range(C, 0, -1) if C % k == 0 and _groups_fit(sizes, C // k))


# ---------------------------------------------------------------------------------------------------
# folding into the layer before


def _folded_params(layer: nn.Module, blocks: torch.Tensor, shift: torch.Tensor):
    """(weight, bias) of ``layer`` followed by the map o -> A o + shift, float64."""
    w = layer.weight.detach().to(torch.float64)
    transposed = isinstance(layer, _TRANSPOSED)
    if transposed:
        # (in, out / groups, *k) -> the convolution layout (out, in / groups, *k) of the same map
        g = layer.groups
        cin, opg, k = w.shape[0], w.shape[1], w.shape[2:]
        w = w.reshape(g, cin // g, opg, *k).transpose(1, 2).reshape(g * opg, cin // g, *k)
    new_w = mix_rows(blocks, w.reshape(w.shape[0], -1)).reshape(w.shape)
    if transposed:
        new_w = new_w.reshape(g, opg, cin // g, *k).transpose(1, 2).reshape(layer.weight.shape)
    b = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros_like(shift)
    new_b = mix_rows(blocks, b.unsqueeze(-1)).squeeze(-1) + shift
    return new_w, new_b


@torch.no_grad()
def _set_params(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy into the layer's Parameters (kept, for optimizers and tied references); a bias is added
    where there was none."""
    layer.weight.copy_(weight)
    if layer.bias is not None:
        layer.bias.copy_(bias)
    else:
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)


def _foldable_reason(layer: nn.Module, wl: GroupWhitening, rank: int | None) -> str | None:
    """None when ``wl``'s map can be multiplied into ``layer``; otherwise why not."""
    base = next((c for c in _FOLDABLE if isinstance(layer, c)), None)
    if base is None:
        return f"{type(layer).__name__} is not a convolution or Linear"
    if type(layer).forward is not base.forward or (
            getattr(type(layer), "_conv_forward", None) is not getattr(base, "_conv_forward", None)):
        return f"{type(layer).__name__} has a forward of its own"
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return f"{type(layer).__name__} is not initialized"
    if parametrize.is_parametrized(layer) or layer._forward_hooks or layer._forward_pre_hooks:
        return f"{type(layer).__name__} has hooks or parametrizations"
    out = layer.out_features if base is nn.Linear else layer.out_channels
    if out != wl.num_features:
        return f"it has {out} output channels, the whitening layer {wl.num_features}"
    want = 2 if base is nn.Linear else len(layer.kernel_size) + 2
    if rank is not None and rank != want:
        return f"its output is {rank}D, not {want}D"
    if base is not nn.Linear and layer.groups > 1 and not _groups_fit(layer_group_sizes(wl), out // layer.groups):
        return (f"its {layer.groups} groups of {out // layer.groups} output channels split whitening "
                f"groups of {wl.num_channels}")
    return None


# ---------------------------------------------------------------------------------------------------
# standard layers computing the map


def affine_layer(wl: GroupWhitening, rank: int | None, dtype: torch.dtype | None = None) -> nn.Module:
    """A standard layer computing ``wl``'s eval-mode map on input of the given rank (None: any), on the
    layer's device, in ``dtype`` (that of its input; None: the dtype of its parameters, or of its
    running statistics without an affine map), with parameters that require gradients where the
    layer's own do (its weight)."""
    blocks, shift = affine_map(wl)
    C = wl.num_features
    if dtype is None:
        dtype = wl.weight.dtype if wl.affine else wl.running_wm.dtype
    factory = {"device": wl.running_wm.device, "dtype": dtype}
    trainable = wl.weight.requires_grad if wl.affine else True
    dense = mix_rows(blocks, torch.eye(C, dtype=blocks.dtype, device=blocks.device))
    if rank == 2:
        lin = nn.Linear(C, C, **factory)
        with torch.no_grad():
            lin.weight.copy_(dense)
            lin.bias.copy_(shift)
        return lin.requires_grad_(trainable)
    k = conv_groups(layer_group_sizes(wl))
    s = C // k
    weight = torch.stack([dense[j * s:(j + 1) * s, j * s:(j + 1) * s] for j in range(k)]).reshape(C, s)
    conv_cls = _RANK_LAYERS[rank] if rank is not None else nn.Conv1d
    conv = conv_cls(C, C, 1, groups=k, **factory)
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(conv.weight.shape))
        conv.bias.copy_(shift)
    conv.requires_grad_(trainable)
    if rank is not None:
        return conv
    return _any_rank(conv)


def _any_rank(conv: nn.Conv1d) -> torch.fx.GraphModule:
    """A GraphModule holding ``conv`` as ``conv``: y = conv(x.reshape(N, C, -1)).reshape(x.shape)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    shape = graph.call_function(getattr, (x, "shape"))
    n = graph.call_function(operator.getitem, (shape, 0))
    c = graph.call_function(operator.getitem, (shape, 1))
    flat = graph.call_method("reshape", (x, n, c, -1))
    y = graph.call_module("conv", (flat,))
    graph.output(graph.call_method("reshape", (y, shape)))
    return torch.fx.GraphModule({"conv": conv}, graph, class_name="GroupAffine")


# ---------------------------------------------------------------------------------------------------
# the fold


class _Tracer(torch.fx.Tracer):
    """Whitening layers are leaves (one call_module node each), like torch.nn's layers."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, GroupWhitening) or super().is_leaf_module(m, qualname)


def _input_ranks(model: nn.Module, layers, args) -> tuple[dict, dict]:
    """(ranks, dtypes): id -> the rank and the dtype of the layer's input in one eval forward of ``args``
    (None: not called, or called with several)."""
    seen: dict[int, set[int]] = {}
    dtypes: dict[int, set[torch.dtype]] = {}
    handles = []

    def hook(module, inputs):
        if inputs and isinstance(inputs[0], torch.Tensor):
            seen.setdefault(id(module), set()).add(inputs[0].dim())
            dtypes.setdefault(id(module), set()).add(inputs[0].dtype)

    try:
        for layer, _ in layers.values():
            handles.append(layer.register_forward_pre_hook(hook))
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    def single(table, key):
        return next(iter(table[key])) if len(table.get(key, ())) == 1 else None

    return {key: single(seen, key) for key in layers}, {key: single(dtypes, key) for key in layers}


def _pairs(model: nn.Module, layers, ranks, report: FoldReport) -> dict[int, tuple[nn.Module, str]]:
    """id of a whitening layer -> (the layer to fold it into, its name), from an fx trace."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:                              # noqa: BLE001 -- any tracing failure
        report.traced = False
        report.trace_error = f"{type(exc).__name__}: {exc}".strip()
        return {}
    named = dict(model.named_modules())
    calls: dict[int, int] = {}
    used_attrs = []
    for node in graph.nodes:
        if node.op == "call_module":
            key = id(named[node.target])
            calls[key] = calls.get(key, 0) + 1
        elif node.op == "get_attr":
            used_attrs.append(node.target)
    # parameters held by several modules (tied weights) must not change
    holders: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1

    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(named[node.target], GroupWhitening):
            continue
        wl = named[node.target]
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        prev = named[src.target]
        if calls.get(id(wl)) != 1 or calls.get(id(prev)) != 1:
            continue
        if any(t == src.target or t.startswith(src.target + ".") for t in used_attrs):
            continue
        if any(holders.get(id(p), 0) > 1 for p in prev._parameters.values() if p is not None):
            continue
        if _foldable_reason(prev, wl, ranks.get(id(wl))) is None:
            pairs[id(wl)] = (prev, src.target)
    return pairs


def _describe(module: nn.Module) -> str:
    if isinstance(module, torch.fx.GraphModule):
        return f"GraphModule(reshape to (N, C, -1), {module.conv}, reshape back)"
    return repr(module).replace("\n", " ")


def _fold(model: nn.Module, args) -> tuple[nn.Module, FoldReport]:
    report = FoldReport()
    layers = _whitening_layers(model)
    if not layers:
        return model, report
    ranks, dtypes = _input_ranks(model, layers, args) if args is not None else ({}, {})
    # (a model that is itself a whitening layer has no layer before it)
    pairs = {} if isinstance(model, GroupWhitening) else _pairs(model, layers, ranks, report)

    # Everything is computed before the model changes.
    replacement: dict[int, nn.Module] = {}
    params = []
    for key, (wl, names) in layers.items():
        tail = _tail(wl)
        if key in pairs:
            prev, prev_name = pairs[key]
            params.append((prev, *_folded_params(prev, *affine_map(wl))))
            new = nn.Sequential(*tail) if tail else nn.Identity()
            report.folded.append((names[0], prev_name))
        else:
            mapped = affine_layer(wl, ranks.get(key), dtypes.get(key))
            new = nn.Sequential(mapped, *tail) if tail else mapped
            report.replaced.append((names[0], _describe(mapped)))
        replacement[key] = new

    for prev, weight, bias in params:
        _set_params(prev, weight, bias)
    root = replacement.get(id(model))
    for key, (wl, names) in layers.items():
        for name in names:
            if not name:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, replacement[key])
    if not report.traced:
        warnings.warn(f"fold_whitening: torch.fx could not trace the model ({report.trace_error}); "
                      f"every whitening layer was replaced by an equivalent layer, none folded into the "
                      f"layer before it", stacklevel=3)
    result = root if root is not None else model
    result.eval()
    return result, report
