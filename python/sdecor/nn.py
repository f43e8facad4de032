"""Modules: :class:`GroupWhitening`, a drop-in replacement for BatchNorm that whitens groups of channels,
:class:`SyncGroupWhitening`, the same with statistics synchronised over torch.distributed,
:class:`SaliencyMasker` (top-k saliency masking) and :class:`SaliencyDecor` (the training objective)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import _checks
from ._layout import channel_mask
from .masking import SaliencyMasker
from .objective import SaliencyDecor
from .ops import whiten, whiten_sync

__all__ = ["GroupWhitening", "SyncGroupWhitening", "GroupWhiteningAct", "SyncGroupWhiteningAct",
           "SaliencyMasker", "SaliencyDecor"]


class GroupWhitening(nn.Module):
    r"""Group-wise whitening of the channels, with running statistics and an affine map (IterNorm).

    ``num_channels`` is the group size d, the number of channels in each group (IterNorm's meaning),
    not a channel total: the opposite of ``torch.nn.GroupNorm(num_groups, num_channels)``, whose
    ``num_channels`` is the channel count C (here ``num_features``) and ``num_groups`` the number of
    groups G (here G = C / d). ``GroupNorm(4, 64)`` makes 4 groups of 16 channels; the same grouping
    here is ``GroupWhitening(64, num_channels=16)``.

    The C = ``num_features`` channels are split into G = C / d groups of d = ``num_channels``
    contiguous channels; d must divide C unless ``last_group="smaller"`` (IterNorm's flexible
    groups): then G = ceil(C / d) and the last group holds the r = C - (G - 1) d remaining channels
    and is whitened as a group of its own (its mean, its r x r covariance, Se = cov + eps I_r; with
    r = d, i.e. d dividing C, this is exactly ``"even"``). For input x of shape (N, C, *S) (0 to 3
    trailing dims) and each group g,

    .. math:: y_g = \mathrm{weight}_g \odot W_g (x_g - \mu_g) + \mathrm{bias}_g

    where in training mode :math:`\mu_g` and :math:`W_g = f(\Sigma_g + \epsilon I)` come from the
    batch (:math:`\Sigma_g` the biased covariance over the m = N * prod(S) samples; f the exact ZCA
    :math:`\Sigma^{-1/2}` for ``method="zca"``, T Newton-Schulz steps for ``method="newton"``) and
    in eval mode from the running estimates, updated in training as
    ``running <- (1 - momentum) * running + momentum * batch`` for the mean and for W
    (``momentum=None``: the cumulative average over all batches seen, like BatchNorm).

    Buffers (IterNorm's names and shapes): ``running_mean`` (G, d, 1), ``running_wm`` (G, d, d),
    initially the identity, and ``num_batches_tracked``. A smaller last group keeps its values in
    ``running_mean[-1, :r]`` and ``running_wm[-1, :r, :r]``; every padding entry is 0 (also
    initially: the identity of its r channels only). Parameters ``weight`` and ``bias`` have
    shape (C,) like BatchNorm's; IterNorm's (1, C, 1, 1) / (1, C) shapes are accepted by
    ``load_state_dict``. With ``track_running_stats=False`` there are no buffers and batch
    statistics are used in eval mode as well.

    Statistics are computed in float32 for float16 / bfloat16 / float32 inputs (float64 for float64),
    also under torch.autocast; the output has the input's dtype, as BatchNorm's (under bf16 autocast
    an fp32 input gives an fp32 output, a bf16 input a bf16 one). ``eps`` is a finite number > 0; ``dtype`` (of the parameters
    and buffers) None or a floating-point dtype.
    """

    _version = 1

    def __init__(self, num_features: int, num_channels: int = 16, *, method: str = "newton", T: int = 5,
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, last_group: str = "even", device=None, dtype=None):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int; got {num_features!r}")
        G = _checks.check_groups(num_channels, num_features, last_group)
        _checks.check_whitening_args(method, eps, T)
        _checks.check_float_dtype(dtype)
        if momentum is not None and (not _checks.is_number(momentum) or not 0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be a number in [0, 1] or None (cumulative average); "
                             f"got {momentum!r}")
        _checks.check_bool(affine, "affine")
        _checks.check_bool(track_running_stats, "track_running_stats")
        _checks.check_device(device)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.num_channels = num_channels
        self.num_groups = G
        self.last_group = last_group
        self.method = method
        self.T = T
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            d = num_channels
            self.register_buffer("running_mean", torch.zeros(G, d, 1, **factory))
            self.register_buffer("running_wm", self._initial_wm(factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_wm", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # the option of layers made before it existed (unpickled whole modules)
    last_group = "even"

    def _initial_wm(self, factory: dict) -> torch.Tensor:
        """The identity of every group's own channels (G, d, d): zeros in the padding of a smaller
        last group."""
        return torch.diag_embed(channel_mask(self.num_groups, self.num_channels, self.num_features,
                                             factory["dtype"] or torch.get_default_dtype(), factory["device"]))

    def reset_running_stats(self) -> None:
        """Running mean 0, running whitening matrices the identity (of each group's own channels),
        no batches tracked."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_wm.copy_(self._initial_wm({"device": self.running_wm.device,
                                                    "dtype": self.running_wm.dtype}))
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, num_channels={self.num_channels}, method={self.method!r}, "
                f"T={self.T}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}"
                + (f", last_group={self.last_group!r}" if self.last_group != "even" else ""))

    def _state(self) -> tuple:
        """(name, tensor or None) of the parameters and buffers the forward reads or updates."""
        return (("weight", self.weight), ("bias", self.bias), ("running_mean", self.running_mean),
                ("running_wm", self.running_wm), ("num_batches_tracked", self.num_batches_tracked))

    def _check_input(self, x: torch.Tensor) -> None:
        """The input, and the layer's parameters and buffers against it (their device, their dtypes)."""
        _checks.check_module_input(x, self.num_features, type(self).__name__)
        _checks.check_state(type(self).__name__, self._state(), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The options were checked in __init__; the input is checked here, once, before any work.
        self._check_input(x)
        if self.training or not self.track_running_stats:
            _checks.check_training_samples(x)
            y, mean, wm = whiten.run_train(x, self.num_channels, self.method, self.eps, self.T,
                                           self.weight, self.bias)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, wm)
            return y
        return whiten.run_eval(x, self.running_mean, self.running_wm, self.weight, self.bias)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, wm: torch.Tensor) -> None:
        """running <- running + factor * (batch - running); factor = momentum, or 1 / batches seen."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = self.num_batches_tracked.to(self.running_mean.dtype).reciprocal()
        else:
            factor = self.momentum
        self.running_mean.lerp_(mean.unsqueeze(-1).to(self.running_mean.dtype), factor)
        self.running_wm.lerp_(wm.to(self.running_wm.dtype), factor)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # IterNorm stores weight and bias as (1, C, 1, 1) or (1, C); accept any shape holding C values
        # with C along one dim, and take them as (C,).
        for name in ("weight", "bias"):
            key = prefix + name
            t = state_dict.get(key)
            if (isinstance(t, torch.Tensor) and t.dim() > 1 and t.numel() == self.num_features
                    and max(t.shape) == self.num_features):
                state_dict[key] = t.reshape(self.num_features)
        # IterNorm checkpoints have no batch counter: start it at 0 as BatchNorm does for old ones.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict and (prefix + "running_wm") in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long, device=self.num_batches_tracked.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class SyncGroupWhitening(GroupWhitening):
    r"""GroupWhitening whose training statistics are those of all processes of a torch.distributed
    process group together (as :class:`torch.nn.SyncBatchNorm` is to BatchNorm).

    Same arguments, parameters, buffers and state_dict as :class:`GroupWhitening`, plus
    ``process_group`` (None: the default group, ``torch.distributed.group.WORLD``; else a
    torch.distributed ProcessGroup, checked here).

    In training mode with an initialised process group of world size > 1, each group's mean and
    covariance are those of the union of the ranks' samples, weighted by count (ranks may hold
    different batch sizes, 0 included). Every rank computes the same W and the same running
    statistics, and the outputs and gradients equal those of GroupWhitening on the concatenated
    batch in one process with the loss summed over the ranks (DDP then averages the parameter
    gradients over the ranks). Cost per layer and step: one all_gather in the forward and one
    all_reduce in the backward, O(G d^2) numbers each, whatever the batch size
    (:mod:`sdecor.ops.whiten_sync`).

    In eval mode, at world size 1 or without an initialised process group there is no
    communication, and the layer is GroupWhitening exactly.

    Every rank must call the layer in the same order (as with SyncBatchNorm and DDP), with inputs of
    the same dtype. The input is checked before any collective, so that bad input fails on every
    rank alike; a rank that fails or stops in the middle of a step leaves the others waiting in
    their next collective until the process group's timeout (``init_process_group(timeout=...)``).
    With fewer than 2 samples on all ranks together the running statistics are left as they are.
    A backward with ``create_graph=True`` raises (use GroupWhitening for higher-order gradients).

    ``convert_sync_whitening`` converts a model's GroupWhitening layers; ``revert_sync_whitening``
    converts them back for single-process use.
    """

    def __init__(self, num_features: int, num_channels: int = 16, *, method: str = "newton", T: int = 5,
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, last_group: str = "even", process_group=None, device=None,
                 dtype=None):
        super().__init__(num_features, num_channels, method=method, T=T, eps=eps, momentum=momentum,
                         affine=affine, track_running_stats=track_running_stats, last_group=last_group,
                         device=device, dtype=dtype)
        if process_group is not None:
            _checks.check_process_group(process_group)
        self.process_group = process_group

    def _sync_world_size(self) -> int:
        """The number of processes whose statistics are combined: 1 (no communication) in eval mode
        or without an initialised process group."""
        if not self.training or not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._sync_world_size() <= 1:
            return super().forward(x)
        # Checked here, before the collective: bad input fails on every rank alike.
        self._check_input(x)
        y, mean, wm, count = whiten_sync.run_train_sync(x, self.num_channels, self.method, self.eps, self.T,
                                                        self.weight, self.bias, self.process_group)
        if self.track_running_stats:
            self._update_running_stats_where(mean, wm, count >= 2)
        return y

    @torch.no_grad()
    def _update_running_stats_where(self, mean: torch.Tensor, wm: torch.Tensor, valid: torch.Tensor) -> None:
        """:meth:`GroupWhitening._update_running_stats` where ``valid`` (a 0-dim bool tensor, read
        on the device only) holds; nothing changes where it does not."""
        self.num_batches_tracked.add_(valid.to(self.num_batches_tracked.dtype))
        dtype = self.running_mean.dtype
        if self.momentum is None:
            factor = self.num_batches_tracked.to(dtype).reciprocal()
        else:
            factor = torch.full((), self.momentum, dtype=dtype, device=self.running_mean.device)
        factor = torch.where(valid, factor, torch.zeros_like(factor))
        self.running_mean.lerp_(mean.unsqueeze(-1).to(dtype), factor)
        self.running_wm.lerp_(wm.to(self.running_wm.dtype), factor.to(self.running_wm.dtype))

    @classmethod
    def convert_sync_whitening(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every :class:`GroupWhitening` of ``module`` by a SyncGroupWhitening (in place) and
        return the module, or the replacement when ``module`` itself is one.

        The new layers share the old ones' parameters and buffers (the same tensors, so an optimizer
        built before still updates them; requires_grad, device and dtype with them), their options,
        their training mode (the flag alone: drop and act keep their own) and their places among
        their parents' children. Layers that already are SyncGroupWhitening are left as they are.
        """
        if process_group is not None:
            _checks.check_process_group(process_group)
        return _swap(module, GroupWhitening, cls, {"process_group": process_group}, exclude=cls)

    @classmethod
    def revert_sync_whitening(cls, module: nn.Module) -> nn.Module:
        """The way back: replace every SyncGroupWhitening of ``module`` by a :class:`GroupWhitening`
        sharing its parameters and buffers (in place; returns the module or the root's replacement)."""
        return _swap(module, cls, GroupWhitening, {}, exclude=None)


def _swap(module: nn.Module, source: type, target: type, extra: dict, exclude) -> nn.Module:
    """Replace the ``source`` layers (not ``exclude`` ones) of a module tree by ``target`` layers
    sharing their parameters and buffers; each layer reachable under several names is replaced once."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    done: dict[int, nn.Module] = {}

    def convert(layer: nn.Module) -> nn.Module:
        if not isinstance(layer, source) or (exclude is not None and isinstance(layer, exclude)):
            return layer
        if id(layer) in done:
            return done[id(layer)]
        kind = _act_variant(layer, target)
        new = kind.__new__(kind)
        nn.Module.__init__(new)
        for key in ("num_features", "num_channels", "num_groups", "last_group", "method", "T", "eps", "momentum",
                    "affine", "track_running_stats"):
            setattr(new, key, getattr(layer, key))
        for key, value in extra.items():
            setattr(new, key, value)
        for name, p in layer._parameters.items():
            new.register_parameter(name, p)
        for name, b in layer._buffers.items():
            new.register_buffer(name, b, persistent=name not in layer._non_persistent_buffers_set)
        for name, child in layer._modules.items():     # drop and act of the *Act layers
            new.add_module(name, child)
        new.training = layer.training                   # the flag alone: drop and act keep their modes
        done[id(layer)] = new
        return new

    def walk(parent: nn.Module) -> None:
        for name, child in parent._modules.items():
            if child is None:
                continue
            new = convert(child)
            if new is not child:
                parent._modules[name] = new
            else:
                walk(child)

    root = convert(module)
    if root is module:
        walk(module)
    return root


def _drop_act_module(module, name: str) -> nn.Module:
    if module is None:
        return nn.Identity()
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module or None; got {type(module).__name__}")
    return module


class _ActTail:
    """The tail of the *Act layers: ``drop`` then ``act`` after the whitening layer's own forward
    (cooperative: the class after this one in the MRO is the whitening layer)."""

    def __init__(self, num_features: int, num_channels: int = 16, *, drop: nn.Module | None = None,
                 act: nn.Module | None = None, **kwargs):
        super().__init__(num_features, num_channels, **kwargs)
        self.drop = _drop_act_module(drop, "drop")
        self.act = _drop_act_module(act, "act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class GroupWhiteningAct(_ActTail, GroupWhitening):
    r""":class:`GroupWhitening` followed by two modules, ``drop`` then ``act``:
    ``forward(x) = act(drop(GroupWhitening.forward(x)))``.

    The whitening counterpart of timm's ``BatchNormAct2d`` (BatchNorm, then dropout or DropBlock,
    then an activation, in one layer), which :func:`~sdecor.convert_whitening` turns into this
    layer, keeping the very ``drop`` and ``act`` modules of the BatchNorm layer.

    Args:
        num_features, num_channels, and the keyword arguments of :class:`GroupWhitening`.
        drop: a module applied to the whitened output (None: ``nn.Identity()``).
        act: a module applied after ``drop`` (None: ``nn.Identity()``).

    Parameters and buffers are GroupWhitening's; ``drop`` and ``act`` are submodules, so their
    state, if any, appears in the state_dict under ``drop.`` and ``act.`` as in timm's layer.
    """


class SyncGroupWhiteningAct(_ActTail, SyncGroupWhitening):
    r""":class:`SyncGroupWhitening` followed by ``drop`` then ``act``, as :class:`GroupWhiteningAct`
    is to :class:`GroupWhitening` (the whitening counterpart of timm's ``SyncBatchNormAct``).

    ``SyncGroupWhitening.convert_sync_whitening`` turns a GroupWhiteningAct into this layer and
    ``revert_sync_whitening`` turns it back, with the same ``drop`` and ``act`` modules.
    """


def _act_variant(layer: nn.Module, target: type) -> type:
    """The class :func:`_swap` builds for ``layer``: ``target``, or its *Act variant when ``layer``
    applies drop and act after whitening (so that the (a)synchronous twin keeps them)."""
    if isinstance(layer, (GroupWhiteningAct, SyncGroupWhiteningAct)):
        return SyncGroupWhiteningAct if issubclass(target, SyncGroupWhitening) else GroupWhiteningAct
    return target
