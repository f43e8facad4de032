"""Decorrelation loss and the SaliencyDecor objective.

``decorrelation_loss`` goes through group_cov (:mod:`sdecor.ops.cov`), so it runs on whichever
backend group_cov selects (the Triton statistics kernel, with gradients, on CUDA tensors). With a
process group of several ranks it works on the global batch instead, from float64 moments summed
over the ranks (:mod:`sdecor.ops.cov_sync`, plain torch ops).

``SaliencyDecor`` (docs/design.md, "Semantics", SaliencyDecor objective):

    saliency = |d logit_y / d x|                      (eval mode, one backward, no parameter grads)
    x~       = topk_mask(x, saliency, ratio, fill)    (detached: the least salient positions replaced)
    total    = CE(f(x), y) + lambda_c KL(softmax f(x) || softmax f(x~)) (batchmean)
               + lambda_d * sum over layers of decorrelation_loss(features, num_channels, kind)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from ._decorrelation import decorrelation, decorrelation_per_group
from ._precision import no_autocast, stats_dtype
from .masking import saliency as input_saliency
from .ops import cov_sync
from .ops.cov import run_group_cov
from .ops.topk import topk_mask


@no_autocast
def decorrelation_loss(x: torch.Tensor, num_channels: int, kind: str = "decov",
                       last_group: str = "even", process_group=None) -> torch.Tensor:
    """Mean over groups of the decov or corr penalty of the group covariance (uses group_cov).

    last_group="smaller": d need not divide C; the last group of r = C - (G - 1) d channels is a
    group of its own (its penalty over its r channels, "corr" normalised by r (r - 1)), and the mean
    is over all G groups.

    process_group: None (the default) computes the loss of this process's x alone. A
    torch.distributed ProcessGroup of world size W > 1 (e.g. ``torch.distributed.group.WORLD``)
    computes it on the global batch: each group's mean and covariance are those of the
    concatenation of every rank's x (ranks may hold different batch sizes, 0 included; at least 2
    values per channel over all ranks together), the loss is the same number on every rank, and the
    gradient on each rank is the gradient of that loss w.r.t. the rank's own x. Every rank of the
    group must call it, in the same order, with the same C, num_channels, kind and last_group;
    where they differ, or a rank's arguments fail their checks, every rank raises the same
    ValueError. Only statistics travel (:mod:`sdecor.ops.cov_sync`): per call one all_reduce of a
    header of 6 W integers (every rank's C, num_channels, kind, last_group and sample count), and
    one all_reduce of G (d + d^2) float64 numbers (each group's sum x and sum x x^T; for
    kind="corr" on float64 input one more of G exponents); the backward communicates nothing.
    The statistics are accumulated in float64, and the loss is returned in float32 (float64 for
    float64 input) as without a group. A rank that never calls leaves the others waiting until the
    process group's timeout (``init_process_group(timeout=...)``, ``new_group(timeout=...)``),
    which then raises there. World size 1: the single-process computation, no communication."""
    if cov_sync.world_size(process_group) > 1:
        return _global_decorrelation(x, num_channels, kind, last_group, process_group)
    _checks.check_decor_args(num_channels, kind)
    _checks.check_input(x)
    _checks.check_groups(num_channels, x.shape[1], last_group)
    if kind == "corr":
        _checks.check_corr_groups(num_channels, x.shape[1])
    _checks.check_training_samples(x)
    return decorrelation(x, num_channels, kind, run_group_cov)


@no_autocast
def _global_decorrelation(x, num_channels, kind: str, last_group: str, group,
                          grad_scale: float = 1.0) -> torch.Tensor:
    """decorrelation_loss on the concatenation of all ranks' x (:mod:`sdecor.ops.cov_sync`); the
    gradient w.r.t. this rank's x is that of the loss times ``grad_scale``."""
    # A rank whose arguments fail their checks still joins the header exchange, so that the others
    # raise too rather than wait in the next collective.
    try:
        _checks.check_decor_args(num_channels, kind)
        _checks.check_input(x)
        _checks.check_groups(num_channels, x.shape[1], last_group)
        if kind == "corr":
            _checks.check_corr_groups(num_channels, x.shape[1])
        failed = None
    except (TypeError, ValueError) as err:
        failed = err
    table = cov_sync.exchange_header(cov_sync.header_row(failed is None, x, num_channels, kind, last_group),
                                     group, x)
    if failed is not None:
        raise failed
    n = cov_sync.check_header(table, "decorrelation_loss")
    covs = cov_sync.global_cov(cov_sync.parts(x, num_channels), n, group,
                               common_scale=kind == "corr" and x.dtype == torch.float64, grad_scale=grad_scale)
    loss = torch.cat([decorrelation_per_group(cov, kind) for cov in covs]).mean()
    return loss.to(stats_dtype(x.dtype))


def _snapshot(model: nn.Module, generator) -> tuple:
    """Every buffer of model as (module, name, tensor, copy), and the generator with its state."""
    with torch.no_grad():
        buffers = [(m, name, b, b.clone()) for m in model.modules() for name, b in m._buffers.items()
                   if b is not None]
    return buffers, generator, None if generator is None else generator.get_state()


def _restore(saved: tuple) -> None:
    """Put back what :func:`_snapshot` saw, in place (a buffer a module re-assigned is re-attached)."""
    buffers, generator, state = saved
    with torch.no_grad():
        for m, name, b, copy in buffers:
            m._buffers[name] = b
            b.copy_(copy)
    if generator is not None:
        generator.set_state(state)


class _Terms(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor
    consistency: torch.Tensor
    decorrelation: torch.Tensor


class SaliencyDecorTerms(_Terms):
    """``(total, ce, consistency, decorrelation)``, scalar tensors; ``total`` is what to backward.

    Also carries, as attributes (not tuple fields): ``saliency`` (|d logit_y / d x|, shaped like x,
    detached), ``x_masked`` (the masked input x~, detached), ``mask`` (bool, True = replaced; (N, *S))
    and ``logits`` / ``logits_masked`` (f(x) and f(x~), with their graphs).
    """

    def __new__(cls, total, ce, consistency, decorrelation, *, saliency=None, x_masked=None, mask=None,
                logits=None, logits_masked=None):
        self = super().__new__(cls, total, ce, consistency, decorrelation)
        self.saliency, self.x_masked, self.mask = saliency, x_masked, mask
        self.logits, self.logits_masked = logits, logits_masked
        return self


# lambda_decor default: decov sums squared off-diagonal covariances, which for unnormalized
# features of a few hundred channels is of the order of CE or larger at initialization; 0.1 keeps
# the term a regularizer next to CE and the consistency term rather than the dominant objective.
DEFAULT_LAMBDA_DECOR = 0.1


class SaliencyDecor(nn.Module):
    """The SaliencyDecor training objective around a classifier ``model`` (returns logits (N, K)).

    ``loss(x, y)`` (also ``forward``) returns :class:`SaliencyDecorTerms`. Arguments:

    - ``mask_ratio`` in [0, 1]: fraction of positions (per sample, channels share the mask) of
      lowest saliency replaced in x~; ``fill`` one of "zero", "constant" (0.0), "mean", "uniform"
      (the default; "baseline" needs a per-batch tensor and is not offered); ``generator`` drives
      the uniform fill.
    - ``lambda_consistency``, ``lambda_decor``, finite numbers >= 0, weigh the KL and decorrelation terms
      (default lambda_decor = 0.1, see DEFAULT_LAMBDA_DECOR).
    - ``decor_layers``: None = the input of the last ``nn.Linear`` of ``model``; else a list of
      submodule names or submodules whose *input* features (N, C, *S) are decorrelated (a forward
      pre-hook during the clean forward only). C must be divisible by ``num_channels`` (checked here
      for the default layer when lambda_decor > 0, else in the forward).
    - ``kind``: "decov" (default) or "corr" (see decorrelation_loss).
    - ``process_group``: None (the default) computes each decorrelation term on this process's
      features alone. A torch.distributed ProcessGroup computes it on the global batch, as
      ``decorrelation_loss(..., process_group=process_group)`` does: the covariance of every rank's
      features together, the same value D on every rank (one header and one statistics
      all_reduce per decorrelated layer and step; every rank must call the objective in the same
      order, as DDP requires anyway). CE and KL stay means over this rank's batch.

    Scaling under DistributedDataParallel (DDP averages the parameter gradients over the W ranks):
    ``decorrelation`` and ``total`` hold the value D, but the backward carries W times its gradient
    w.r.t. this rank's features, W dD/dx_r (as if each rank's loss held the W ranks' copies of D,
    the convention of SyncBatchNorm). The mean over the ranks of W dD/dx_r dx_r/dtheta is dD/dtheta,
    while that of the CE and KL gradients is the gradient of their global batch means when the ranks
    hold equal batch sizes; so one DDP step equals the single-process step on the concatenated batch
    (with unequal sizes the CE and KL terms weigh each rank's samples by 1 / (W N_r) instead). The
    reported terms, and their mean over the ranks, keep the single-process values. At world size 1
    the objective is the single-process one exactly.
    """

    def __init__(self, model: nn.Module, mask_ratio: float = 0.5, fill: str = "uniform",
                 lambda_consistency: float = 1.0, lambda_decor: float = DEFAULT_LAMBDA_DECOR,
                 decor_layers=None, num_channels: int = 16, *, kind: str = "decov", generator=None,
                 process_group=None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not _checks.is_number(mask_ratio) or not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be a number in [0, 1]; got {mask_ratio!r}")
        fills = tuple(f for f in _checks.FILLS if f != "baseline")
        if fill not in fills:
            raise ValueError(f"fill must be one of {fills}; got {fill!r}")
        for name, v in (("lambda_consistency", lambda_consistency), ("lambda_decor", lambda_decor)):
            _checks.check_finite_nonneg(v, name)
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int; got {num_channels!r}")
        _checks.check_decor_args(num_channels, kind)
        _checks.check_generator(generator)
        if process_group is not None:
            _checks.check_process_group(process_group)
        self.model = model
        self.mask_ratio, self.fill = float(mask_ratio), fill
        self.lambda_consistency, self.lambda_decor = float(lambda_consistency), float(lambda_decor)
        self.num_channels, self.kind, self.generator = num_channels, kind, generator
        self.process_group = process_group
        self.decor_layers = self._resolve_layers(model, decor_layers)
        if decor_layers is None and self.lambda_decor > 0:        # with lambda_decor = 0 nothing is grouped
            C = self.decor_layers[0][1].in_features
            if C % num_channels:
                raise ValueError(
                    f"the input of the last nn.Linear ({self.decor_layers[0][0]!r}) has C={C} features, "
                    f"not divisible by num_channels={num_channels}; valid group sizes are {_checks.divisors(C)}")

    @staticmethod
    def _resolve_layers(model: nn.Module, decor_layers) -> list[tuple[str, nn.Module]]:
        names = {id(m): n for n, m in model.named_modules()}
        if decor_layers is None:
            linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError("decor_layers=None decorrelates the input of the last nn.Linear, but "
                                 "model has no nn.Linear; name the layers in decor_layers")
            return [linears[-1]]
        if isinstance(decor_layers, (str, nn.Module)):
            decor_layers = [decor_layers]
        try:
            decor_layers = list(decor_layers)
        except TypeError:
            raise TypeError(f"decor_layers must be None or a list of module names or modules; got "
                            f"{type(decor_layers).__name__}") from None
        out = []
        for layer in decor_layers:
            if isinstance(layer, str):
                try:
                    out.append((layer, model.get_submodule(layer)))
                except AttributeError:
                    raise ValueError(f"decor_layers: model has no submodule named {layer!r}") from None
            elif isinstance(layer, nn.Module):
                if id(layer) not in names:
                    raise ValueError(f"decor_layers: {type(layer).__name__} module is not a submodule of model")
                out.append((names[id(layer)], layer))
            else:
                raise TypeError(f"decor_layers entries must be module names or modules; got "
                                f"{type(layer).__name__}")
        if not out:
            raise ValueError("decor_layers must name at least one layer (or be None)")
        return out

    def _capture(self, name: str, feats: list):
        """The forward pre-hook of a decor layer: checks its input's channel count and keeps it."""
        d = self.num_channels

        def hook(module, args):
            f = args[0] if args else None
            if not isinstance(f, torch.Tensor) or f.dim() < 2 or f.shape[1] % d:
                C = f.shape[1] if isinstance(f, torch.Tensor) and f.dim() >= 2 else None
                raise ValueError(
                    f"decor layer {name!r}: input features of shape "
                    f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__} have C={C} "
                    f"channels, not divisible by num_channels={d}"
                    + (f"; valid group sizes are {_checks.divisors(C)}" if C else ""))
            feats.append((name, f))
        return hook

    def _decorrelation(self, feats: list[tuple[str, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
        total = like.new_zeros(())
        world = cov_sync.world_size(self.process_group)
        for name, f in feats:
            if world > 1:      # the global term, W times its gradient (see the class docstring)
                term = _global_decorrelation(f, self.num_channels, self.kind, "even", self.process_group,
                                             grad_scale=float(world))
            else:
                term = decorrelation_loss(f, self.num_channels, self.kind)
            total = total + term.to(total.dtype)
        return total

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> SaliencyDecorTerms:
        """Total loss and every term for the batch (x, y); see the class docstring.

        A term whose weight is 0 is not computed and reported as 0: with lambda_consistency = 0 the
        saliency pass and the masked forward are skipped (they would only cost time and feed masked
        batches into the norm layers' running statistics; ``saliency``, ``x_masked``, ``mask`` and
        ``logits_masked`` are then None), with lambda_decor = 0 the decorrelation loss.

        An error leaves the model as it was: x and y (an integer tensor (N,) on x's device) are
        checked before any forward; what only the forward reveals (a decor layer's channel count,
        labels beyond the logits' classes on CPU) raises after the norm layers have updated their
        running statistics, so every buffer of the model, and the generator's state, are put back
        before the error propagates.
        """
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"x must be a torch.Tensor (N, ...); got {getattr(x, 'shape', type(x).__name__)}")
        _checks.check_labels(y, x)
        if self.lambda_consistency > 0:
            _checks.check_input(x, "x", min_dim=2, max_dim=5)
        # A copy of every buffer per call is what makes "an error changes nothing" hold for any
        # model; for the tiny CNN (9 buffers) it took 40 us next to a 25 ms training step (1 thread).
        saved = _snapshot(self.model, self.generator)
        try:
            return self._loss(x, y)
        except BaseException:
            _restore(saved)
            raise

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> SaliencyDecorTerms:
        masking = self.lambda_consistency > 0
        if masking:
            sal = input_saliency(self.model, x, y)
            x_masked, mask = topk_mask(x.detach(), sal, ratio=self.mask_ratio, fill=self.fill,
                                       generator=self.generator)
            x_masked = x_masked.detach()
        else:
            sal = x_masked = mask = None

        feats: list[tuple[str, torch.Tensor]] = []
        handles = [module.register_forward_pre_hook(self._capture(name, feats))
                   for name, module in (self.decor_layers if self.lambda_decor > 0 else ())]
        try:
            logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"model(x) must return logits of shape (N, num_classes); got {got}")
        _checks.check_label_range(y, logits.shape[1])
        ce = F.cross_entropy(logits, y.long())
        if masking:
            logits_masked = self.model(x_masked)
            # KL(softmax f(x) || softmax f(x~)), batchmean
            consistency = F.kl_div(F.log_softmax(logits_masked, dim=1), F.log_softmax(logits, dim=1),
                                   reduction="batchmean", log_target=True)
        else:
            logits_masked, consistency = None, ce.new_zeros(())
        decor = self._decorrelation(feats, ce)
        total = ce + self.lambda_consistency * consistency + self.lambda_decor * decor
        return SaliencyDecorTerms(total, ce, consistency, decor, saliency=sal, x_masked=x_masked,
                                  mask=mask, logits=logits, logits_masked=logits_masked)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SaliencyDecorTerms:
        return self.loss(x, y)

    def extra_repr(self) -> str:
        layers = [n for n, _ in self.decor_layers]
        return (f"mask_ratio={self.mask_ratio}, fill={self.fill!r}, lambda_consistency="
                f"{self.lambda_consistency}, lambda_decor={self.lambda_decor}, decor_layers={layers}, "
                f"num_channels={self.num_channels}, kind={self.kind!r}")
