"""Turn a network's normalisation layers into whitening layers, without changing what it computes.

:func:`convert_whitening` replaces BatchNorm layers (torch's, and the BatchNorm subclasses of timm)
by :class:`~sdecor.nn.GroupWhitening` and its variants; :func:`convert_iternorm` replaces the
``IterNorm`` layers of IterNorm-pytorch by equivalent GroupWhitening layers. Both check everything
and build every new layer before they change the model, and return a :class:`ConversionReport`.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _checks
from ._conversion import (ConversionReport, Skip, buffers_like, instance_changes, patterns, qualname, selected,
                          state_like, swap_in)
from ._layout import group_layout, group_sizes
from .nn import GroupWhitening, GroupWhiteningAct, SyncGroupWhitening, SyncGroupWhiteningAct

__all__ = ["convert_whitening", "convert_iternorm", "ConversionReport"]

_OPTIONS = ("T", "eps", "momentum", "affine", "track_running_stats")
_LAST_GROUPS = ("even", "smaller")

_TORCH = "torch.nn.modules.batchnorm."
_TIMM = "timm.layers."
_FROZEN = ("frozen BatchNorm (fixed statistics and affine map, nothing estimated from batches): "
           "left as it is")

# What each known normalisation class becomes, by qualified class name (``__module__`` + "." +
# ``__qualname__``): names let timm's classes be recognised without importing timm (an optional
# dependency), and never match a like-named class of another library. A class is the whitening
# layer that replaces the layer; a string is the reason the layer is left as it is.
#
# A BatchNorm subclass that is not listed is converted as its nearest listed base class, provided
# no class on the way defines ``forward``: one that does adds behaviour this table does not know,
# and the layer is skipped rather than replaced by something that computes a different function.
_KNOWN = {
    _TORCH + "_BatchNorm": GroupWhitening,
    _TORCH + "BatchNorm1d": GroupWhitening,
    _TORCH + "BatchNorm2d": GroupWhitening,
    _TORCH + "BatchNorm3d": GroupWhitening,
    _TORCH + "SyncBatchNorm": SyncGroupWhitening,               # in the layer's process group
    # timm >= 0.9 (timm.layers): BatchNorm, then the layer's ``drop`` and ``act`` modules
    _TIMM + "norm_act.BatchNormAct2d": GroupWhiteningAct,
    _TIMM + "norm_act.SyncBatchNormAct": SyncGroupWhiteningAct,
    _TIMM + "split_batchnorm.SplitBatchNorm2d": (
        "timm's SplitBatchNorm2d normalises parts of each training batch with auxiliary BatchNorm "
        "layers (AdvProp), which no whitening layer does; turn it back into BatchNorm2d to convert it"),
    # not BatchNorm subclasses; listed so that the report names them
    "torchvision.ops.misc.FrozenBatchNorm2d": _FROZEN,
    _TIMM + "norm_act.FrozenBatchNormAct2d": _FROZEN,
}


def _last_group_option(last_group: str) -> dict:
    # "even" is GroupWhitening's default: passed on only when it is not.
    return {} if last_group == "even" else {"last_group": last_group}


# ---------------------------------------------------------------------------------------------------
# BatchNorm -> GroupWhitening


def _target(module: nn.Module) -> type:
    """The whitening class for a BatchNorm layer (see ``_KNOWN``); raises Skip with the reason."""
    for cls in type(module).__mro__:
        entry = _KNOWN.get(qualname(cls))
        if isinstance(entry, str):
            raise Skip(entry)
        if entry is not None:
            return entry
        if "forward" in vars(cls):
            raise Skip(f"{qualname(type(module))} is a BatchNorm subclass with its own forward "
                        f"(in {qualname(cls)}), not one of the known variants: what it adds is unknown")
    raise AssertionError("unreachable: every BatchNorm layer derives from torch's _BatchNorm")


def _is_uninitialized(bn: nn.Module) -> bool:
    return any(isinstance(t, nn.parameter.UninitializedTensorMixin)
               for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))


def _whitening_layer(bn: nn.modules.batchnorm._BatchNorm, target: type, num_channels: int, method: str,
                     options: dict) -> GroupWhitening:
    """The ``target`` layer that computes in eval mode what ``bn`` computes (given no overriding
    options), in its training mode, with its very weight and bias Parameters (so their
    requires_grad, device, dtype, gradients and an optimizer's references carry over) and running
    statistics on the device and in the dtype of its own."""
    kw = {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
          "track_running_stats": bn.track_running_stats}
    kw.update(options)
    if issubclass(target, SyncGroupWhitening):
        kw["process_group"] = bn.process_group
    if issubclass(target, (GroupWhiteningAct, SyncGroupWhiteningAct)):
        # timm's SyncBatchNormAct applies drop / act only where they are set
        kw["drop"] = getattr(bn, "drop", None)
        kw["act"] = getattr(bn, "act", None)
    new = target(bn.num_features, num_channels, method=method, **kw,
                 **state_like(bn.weight, bn.running_mean))
    if new.affine and bn.affine:
        # the same Parameters (shape (C,) both): registered in the same order, weight then bias
        new.weight, new.bias = bn.weight, bn.bias
    if new.track_running_stats and bn.track_running_stats and bn.running_mean is not None:
        buffers_like(new, bn.running_mean, bn.num_batches_tracked)
    with torch.no_grad():
        if new.track_running_stats and bn.track_running_stats and bn.running_mean is not None:
            # BatchNorm's running statistics are a diagonal covariance: the whitening matrices
            # diag((running_var + eps)^-1/2), with the BatchNorm's own eps, make eval mode compute
            # exactly the BatchNorm's function. (An eps that whitening refuses, 0, inf or nan, only
            # gets here when eps= overrides it: then the new one.) Channels beyond C (a smaller
            # last group) stay 0.
            eps = bn.eps if _checks.is_finite_number(bn.eps) and bn.eps > 0 else new.eps
            G, d = new.running_wm.shape[:2]
            mean = new.running_mean.new_zeros(G * d)
            mean[:bn.num_features] = bn.running_mean
            inv_std = torch.zeros(G * d, dtype=torch.float64, device=bn.running_var.device)
            inv_std[:bn.num_features] = (bn.running_var.to(torch.float64) + eps).rsqrt()
            new.running_mean.copy_(mean.reshape(G, d, 1))
            new.running_wm.copy_(torch.diag_embed(inv_std.reshape(G, d)))
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    # the flag alone: the drop and act modules an *Act layer shares with bn keep their own modes
    new.training = bn.training
    return new


def _description(bn: nn.Module, new: GroupWhitening, method: str, last_group: str) -> str:
    C, d = bn.num_features, new.num_channels
    extra = f", last_group={last_group!r}" if last_group != "even" else ""
    text = (f"{type(bn).__name__}({C}) -> {type(new).__name__}({C}, num_channels={d}, "
            f"method={method!r}{extra})")
    if isinstance(new, (GroupWhiteningAct, SyncGroupWhiteningAct)):
        text += f", keeping its drop ({type(new.drop).__name__}) and act ({type(new.act).__name__})"
    if isinstance(new, SyncGroupWhitening):
        text += ", in its process group"
    dropped = sorted(set(bn._modules) - set(new._modules))
    if dropped:                           # BatchNorm's forward uses no submodule
        text += f", without its unused submodules {dropped}"
    notes = []
    if bn.affine and not new.affine:
        notes.append("its affine map is dropped (affine=False)")
    if not bn.track_running_stats:
        notes.append("it keeps no running statistics, so eval mode whitens with batch statistics")
    elif not new.track_running_stats:
        notes.append("its running statistics are dropped (track_running_stats=False)")
    if notes:
        text += "; eval output differs from the BatchNorm's: " + "; ".join(notes)
    return text


def _convert_batchnorm(name: str, bn, num_channels: int, method: str, last_group: str, kw: dict):
    """The new layer for one BatchNorm layer; raises Skip with the reason it is left as it is."""
    if not name:
        raise Skip("the model itself is a BatchNorm layer; put it in a container (e.g. nn.Sequential) "
                    "to convert it")
    if _is_uninitialized(bn):
        raise Skip(f"{type(bn).__name__} is not initialized yet: its channel count is unknown until a "
                    f"first forward pass")
    target = _target(bn)
    changed = instance_changes(bn)
    if changed:
        raise Skip(changed)
    if target is GroupWhiteningAct and not all(isinstance(getattr(bn, a, None), nn.Module)
                                               for a in ("drop", "act")):
        raise Skip(f"{type(bn).__name__} without the drop and act submodules it is expected to have")
    C = bn.num_features
    if last_group == "even" and C % num_channels != 0:
        raise Skip(f"{C} channels are not divisible by num_channels={num_channels} (valid group sizes: "
                    f"{_checks.divisors(C)}; or pass last_group=\"smaller\" for a last group of "
                    f"{C % num_channels} channels)")
    if "eps" not in kw:                   # a BatchNorm layer may hold eps = 0, which whitening refuses
        _checks.check_eps(bn.eps, f"eps of {name!r} (the BatchNorm layer's own; pass eps= to override)")
    return _whitening_layer(bn, target, num_channels, method, {**kw, **_last_group_option(last_group)})


def _is_candidate(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            or isinstance(_KNOWN.get(qualname(type(module))), str))


def convert_whitening(model: nn.Module, num_channels: int = 16, method: str = "newton", include=None,
                      exclude=None, *, last_group: str = "even", **kw) -> ConversionReport:
    """Replace the BatchNorm layers of ``model`` in place by group-whitening layers.

    Right after conversion the model computes in eval mode what it computed before (up to rounding):
    each new layer takes over the BatchNorm's weight and bias, its running mean and, as running
    whitening matrices, diag((running_var + eps)^-1/2) with the BatchNorm's eps. Only options given
    here that differ from a layer's own (``affine=False``, ``track_running_stats=False``), and
    BatchNorm layers without running statistics, change the eval output; the report says so.

    Which layers become what (the known classes, by qualified name, so timm need not be imported):

    * ``torch.nn.BatchNorm1d/2d/3d`` -> :class:`~sdecor.nn.GroupWhitening`;
    * ``torch.nn.SyncBatchNorm`` -> :class:`~sdecor.nn.SyncGroupWhitening` in the layer's process group;
    * timm's ``BatchNormAct2d`` (BatchNorm, then its ``drop`` and ``act`` modules) ->
      :class:`~sdecor.nn.GroupWhiteningAct` with the same ``drop`` and ``act`` modules, and timm's
      ``SyncBatchNormAct`` -> :class:`~sdecor.nn.SyncGroupWhiteningAct`;
    * another BatchNorm subclass -> as its nearest known base class when it does not define
      ``forward`` (e.g. a class that only renames); one that defines its own ``forward`` is left
      as it is and reported, as are timm's ``SplitBatchNorm2d`` and the frozen BatchNorm layers of
      torchvision and timm.

    Also left as they are and reported: the model itself when it is a BatchNorm layer, a LazyBatchNorm
    layer before its first forward pass (its size is unknown), a layer whose forward is replaced on
    the instance or that has forward / backward hooks or parametrizations, and, with
    ``last_group="even"``, a layer whose channel count ``num_channels`` does not divide.

    Args:
        model: the network; changed in place.
        num_channels: group size d of the new layers.
        method: ``"newton"`` (IterNorm) or ``"zca"``.
        include: shell-style glob pattern(s) (:mod:`fnmatch`, case-sensitive) over the qualified
            layer names of ``model.named_modules()``, e.g. ``"layer3.*"`` or ``["features.1*"]``;
            only matching layers are considered (default: all).
        exclude: glob pattern(s); matching layers are not considered (applied after ``include``).
            Layers that ``include`` / ``exclude`` leave out do not appear in the report.
        last_group: ``"even"`` (d must divide a layer's channel count C, else the layer is skipped)
            or ``"smaller"`` (any C: the last group of each layer holds the C % d remaining channels;
            no layer is skipped for its channel count).
        **kw: ``T``, ``eps``, ``momentum``, ``affine``, ``track_running_stats`` for the new layers.
            By default eps, momentum, affine and track_running_stats are each BatchNorm layer's own.
            eps, given or taken over, must be a finite number > 0.

    A new layer keeps what the BatchNorm layer had, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
    does: its weight and bias are the BatchNorm's very Parameters (same objects, registered in the same
    order, so requires_grad -- a frozen layer stays frozen --, device, dtype, ``.grad`` and an
    optimizer's references carry over); its running statistics are on the device and in the dtype of
    the BatchNorm's; it has the layer's training mode (the flag alone: the ``drop`` and ``act`` it
    shares keep their own) and takes its place among its parent's children. All arguments are
    checked, and every new layer built, before the model is changed: on an error the model is
    untouched. A layer reachable under several names is replaced by one new layer.

    Returns:
        a :class:`ConversionReport`: ``replaced`` and ``skipped`` lists of (name, reason).

    IterNorm-pytorch's IterNorm layers are converted by :func:`convert_iternorm`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"num_channels must be a positive int; got {num_channels!r}")
    unknown = sorted(set(kw) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"convert_whitening got unexpected keyword argument(s) {unknown}; "
                        f"accepted: {list(_OPTIONS)} and last_group")
    if not isinstance(last_group, str) or last_group not in _LAST_GROUPS:
        raise ValueError(f"last_group must be one of {_LAST_GROUPS}; got {last_group!r}")
    _checks.check_whitening_args(method, kw.get("eps", 1e-5), kw.get("T", 5))
    include = patterns(include, "include")
    exclude = patterns(exclude, "exclude")
    # Validate the remaining options once, on a layer the size of a group.
    GroupWhitening(num_channels, num_channels, method=method, **kw, **_last_group_option(last_group))

    report = ConversionReport()
    swaps = []
    built = {}                           # a layer reachable under several names gets one replacement
    for name, module in selected(model, include, exclude, _is_candidate):
        try:
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise Skip(_KNOWN[qualname(type(module))])
            if id(module) not in built:
                built[id(module)] = _convert_batchnorm(name, module, num_channels, method, last_group, kw)
        except Skip as skip:
            report.skipped.append((name, str(skip)))
            continue
        swaps.append((name, built[id(module)]))
        report.replaced.append((name, _description(module, built[id(module)], method, last_group)))
    swap_in(model, swaps)
    return report


# ---------------------------------------------------------------------------------------------------
# IterNorm-pytorch's IterNorm -> GroupWhitening


def _iternorm_number(layer: nn.Module, attr: str, what: str):
    value = getattr(layer, attr, None)
    if not _checks.is_number(value):
        raise Skip(f"its {attr} is {value!r}, not {what}")
    return value


def _iternorm_affine(layer: nn.Module, C: int):
    """(weight, bias) as (C,) tensors, or (None, None); IterNorm stores them as (1, C, 1, ...)."""
    affine = getattr(layer, "affine", None)
    if not isinstance(affine, bool):
        raise Skip(f"its affine is {affine!r}, not a bool")
    if not affine:
        return None, None
    out = []
    for attr in ("weight", "bias"):
        t = getattr(layer, attr, None)
        if not isinstance(t, torch.Tensor) or t.numel() != C or (t.dim() > 1 and t.shape[1] != C):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else t
            raise Skip(f"its {attr} has shape {shape}; expected C={C} values along dim 1")
        out.append(t.detach().reshape(C))
    return tuple(out)


def _expect_shape(t, shape: tuple, what: str) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else t
        raise Skip(f"{what} has shape {got}; expected {shape}")


def _iternorm_state(layer: nn.Module) -> dict:
    """Settings and running statistics of an IterNorm layer of either variant, with the buffers
    laid out as GroupWhitening's (G, d, 1) / (G, d, d), a smaller last group zero-padded."""
    C = _iternorm_number(layer, "num_features", "a channel count")
    d = _iternorm_number(layer, "num_channels", "a group size")
    if not (isinstance(C, int) and isinstance(d, int) and 1 <= d and C >= 1):
        raise Skip(f"num_features={C!r} and num_channels={d!r} are not positive ints")
    groups = getattr(layer, "iterNorm_Groups", None)
    if groups is None:                   # one module for all groups, each of d channels
        G = C // d
        if G * d != C or getattr(layer, "num_groups", None) != G:
            raise Skip(f"num_groups={getattr(layer, 'num_groups', None)!r} groups of num_channels={d} "
                        f"do not make num_features={C}")
        _expect_shape(getattr(layer, "running_mean", None), (G, d, 1), "running_mean")
        _expect_shape(getattr(layer, "running_wm", None), (G, d, d), "running_wm")
        mean, wm, settings = layer.running_mean, layer.running_wm, layer
    else:                                # flexible groups: one IterNorm_Single per group
        G, r = group_layout(C, d)
        if not isinstance(groups, nn.ModuleList) or len(groups) != G:
            held = f"{len(groups)} groups" if isinstance(groups, nn.ModuleList) else repr(groups)
            raise Skip(f"iterNorm_Groups holds {held}; expected a ModuleList of ceil({C} / {d}) = {G} "
                        f"groups")
        sizes = group_sizes(C, d)
        for g, (single, c) in enumerate(zip(groups, sizes)):
            _expect_shape(getattr(single, "running_mean", None), (c, 1), f"iterNorm_Groups[{g}].running_mean")
            _expect_shape(getattr(single, "running_wm", None), (c, c), f"iterNorm_Groups[{g}].running_wm")
            for attr in ("T", "eps", "momentum"):   # each group whitens with its own settings
                if getattr(single, attr, None) != getattr(groups[0], attr, None):
                    raise Skip(f"its groups differ in {attr}; a GroupWhitening layer has one {attr}")
        ref = groups[0].running_mean
        mean = ref.new_zeros(G, d, 1)
        wm = ref.new_zeros(G, d, d)
        for g, (single, c) in enumerate(zip(groups, sizes)):
            mean[g, :c] = single.running_mean
            wm[g, :c, :c] = single.running_wm
        settings = groups[0]
    T = _iternorm_number(settings, "T", "a number of Newton steps")
    eps = _iternorm_number(settings, "eps", "a number")
    momentum = _iternorm_number(settings, "momentum", "a number")
    weight, bias = _iternorm_affine(layer, C)
    return {"C": C, "d": d, "G": G, "last": group_layout(C, d)[1], "T": T, "eps": eps, "momentum": momentum,
            "weight": weight, "bias": bias, "mean": mean, "wm": wm,
            "weight_requires_grad": weight is not None and layer.weight.requires_grad,
            "bias_requires_grad": bias is not None and layer.bias.requires_grad}


def _convert_one_iternorm(name: str, layer: nn.Module) -> GroupWhitening:
    if not name:
        raise Skip("the model itself is an IterNorm layer; put it in a container (e.g. nn.Sequential) "
                    "to convert it")
    changed = instance_changes(layer)
    if changed:
        raise Skip(changed)
    s = _iternorm_state(layer)
    option = {} if s["last"] == s["d"] else {"last_group": "smaller"}
    try:
        new = GroupWhitening(s["C"], s["d"], method="newton", T=s["T"], eps=s["eps"], momentum=s["momentum"],
                             affine=s["weight"] is not None, track_running_stats=True,
                             **option, **state_like(s["weight"], s["mean"]))
    except (TypeError, ValueError) as e:
        raise Skip(f"its settings do not make a GroupWhitening layer: {e}") from None
    # IterNorm's weight and bias are (1, C, 1, 1) or (1, C), GroupWhitening's (C,): new Parameters,
    # with the layer's requires_grad (and its device and dtype); the buffers on the device and in the
    # dtype of its own
    buffers_like(new, s["mean"])
    with torch.no_grad():
        if new.affine:
            new.weight.copy_(s["weight"])
            new.bias.copy_(s["bias"])
            new.weight.requires_grad_(s["weight_requires_grad"])
            new.bias.requires_grad_(s["bias_requires_grad"])
        # IterNorm's running_wm may be an expanded (stride-0) view of one matrix: copied, not shared.
        new.running_mean.copy_(s["mean"])
        new.running_wm.copy_(s["wm"])
    new.training = layer.training
    return new


def convert_iternorm(model: nn.Module, include=None, exclude=None) -> ConversionReport:
    """Replace the ``IterNorm`` layers of IterNorm-pytorch (Huang et al., CVPR 2019) in ``model`` in
    place by :class:`~sdecor.nn.GroupWhitening` layers that compute the same function.

    Both variants are recognised by class name and state, without importing that project:

    * ``iterative_normalization.IterNorm``: ``num_groups`` groups of ``num_channels`` channels,
      buffers ``running_mean`` (G, d, 1) and ``running_wm`` (G, d, d);
    * ``iterative_normalization_FlexGroup.IterNorm``: ``iterNorm_Groups``, a ModuleList of G =
      ceil(C / d) ``IterNorm_Single`` modules with ``running_mean`` (c, 1) and ``running_wm`` (c, c),
      the last one of c = C - (G - 1) d channels -> a GroupWhitening layer with
      ``last_group="smaller"`` when c < d.

    The new layer has ``method="newton"`` and the layer's ``T``, ``eps``, ``momentum`` and
    ``affine``; it takes over the weight and bias (stored by IterNorm as (1, C, 1, 1) or (1, C)),
    the running mean and the running whitening matrices, and the training mode, device and dtype
    (of the parameters and of the buffers each), and the parameters' requires_grad (new Parameter
    objects: the shapes differ), in the layer's place among its parent's children.
    Its training-mode output, its running-statistics update (``momentum`` as a float) and its
    eval-mode output are IterNorm's (up to rounding). ``num_batches_tracked``, which IterNorm does
    not have, starts at 0.

    A layer whose state does not have that layout, whose settings GroupWhitening does not accept
    (e.g. ``momentum`` outside [0, 1]), the model itself when it is an IterNorm layer, and a layer
    with hooks or a forward replaced on the instance are left as they are and reported. Everything is
    checked, and every new layer built, before the model is changed.

    Args:
        model: the network; changed in place.
        include, exclude: glob patterns over layer names, as in :func:`convert_whitening`.

    Returns:
        a :class:`ConversionReport` (``function="convert_iternorm"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    include = patterns(include, "include")
    exclude = patterns(exclude, "exclude")

    def is_iternorm(module):
        return type(module).__name__ == "IterNorm" and not isinstance(module, GroupWhitening)

    report = ConversionReport(function="convert_iternorm")
    swaps = []
    built = {}
    for name, layer in selected(model, include, exclude, is_iternorm):
        try:
            if id(layer) not in built:
                built[id(layer)] = _convert_one_iternorm(name, layer)
        except Skip as skip:
            report.skipped.append((name, f"{qualname(type(layer))}: {skip}"))
            continue
        new = built[id(layer)]
        variant = "flexible groups" if hasattr(layer, "iterNorm_Groups") else "even groups"
        last = group_layout(new.num_features, new.num_channels)[1]
        extra = f", last_group='smaller' (last group of {last})" if last != new.num_channels else ""
        C, d = new.num_features, new.num_channels
        report.replaced.append((name, f"IterNorm ({variant}) ({C}) -> GroupWhitening({C}, num_channels={d}, "
                                      f"method='newton', T={new.T}{extra})"))
        swaps.append((name, new))
    swap_in(model, swaps)
    return report
