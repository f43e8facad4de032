"""``--suite steps-cpu``: whole training steps of a real network, whitening and saliency objectives in place.

Every path is one training step of torchvision's ResNet-18 (10 classes, 32x32 inputs, batch 64, SGD
with lr 0.01 and momentum 0.9): forward, loss, backward, optimizer step, on the same batch. The
paths start from the same initial weights (one model built from the seed, copied):

* ``batchnorm``: cross-entropy, the model as torchvision builds it (BatchNorm2d);
* ``groupwhitening``: cross-entropy, every BatchNorm2d converted by
  ``sdecor.convert_whitening(model, num_channels=16)`` (GroupWhitening, newton T=5, each layer's eps);
* ``iternorm``: cross-entropy, IterNorm's algorithm on the layers that GroupWhitening replaces (groups
  of 16 channels, T=5, eps 1e-5): the naive IterNorm of :mod:`.baselines` with BatchNorm's affine
  parameters, autograd for the backward. It keeps no running statistics (the per-op baseline's
  training forward), so it does a little less work per layer than IterNorm's module;
* ``sgt``: a Saliency Guided Training step written in plain torch on the BatchNorm model: saliency
  |d logit_y / d x| by one backward of the model in eval mode (input gradient only), the 50 % lowest
  channel-mean saliencies of each sample masked (topk, scatter) and filled with uniform noise in the
  sample's per-channel [min, max] (:func:`.baselines.sgt_mask`), then
  CE(f(x), y) + KL(softmax f(x) || softmax f(x~)) (batchmean);
* ``saliencydecor``: ``sdecor.SaliencyDecor(model)`` with its defaults on the GroupWhitening model:
  mask_ratio 0.5 and the uniform fill (as the SGT step), lambda_consistency 1, and the decorrelation
  term (lambda_decor 0.1, decov, groups of 16) on the input of the last nn.Linear, which the SGT step
  does not have.

The GroupWhitening and SaliencyDecor steps are sdecor's paths, on the backend sdecor selects by itself;
the others are baselines. The targets (``--threads 2``, float32): the GroupWhitening step at most 1.1x
the BatchNorm step, the SaliencyDecor step at most 1.1x the SGT step; the SGT and SaliencyDecor steps
against the BatchNorm step are shown without a bound.

Check before timing (there is no reference output for a training step): every path takes one step
from the common initial weights and must give a finite loss, finite parameters, and change every
parameter; and the GroupWhitening step, which runs IterNorm's algorithm in sdecor's kernels, must agree
with the IterNorm step: the loss and every updated parameter within the float32 tolerance of
:func:`sdecor.testing.tol`. A path that fails is reported (``error``) and not timed. That first step
is also the warm-up; the paths are then timed round-robin with the CPU suites' interleaved timer
(:func:`.timing.time_cpu_interleaved`), each call one step on the same batch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import sdecor

from ..._optional import require
from . import baselines as bl

SUITE = "steps-cpu"
OP = "train_step"
MODE = "step"
PATHS = ("batchnorm", "groupwhitening", "iternorm", "sgt", "saliencydecor")


@dataclass(frozen=True)
class StepConfig:
    """What one training step is made of (the suite's values are the defaults)."""

    batch: int = 64
    classes: int = 10
    size: int = 32                  # input height and width
    channels: int = 3
    num_channels: int = 16          # group size d of GroupWhitening and IterNorm
    T: int = 5                      # IterNorm's Newton steps (GroupWhitening's default)
    eps: float = 1e-5               # IterNorm's eps (BatchNorm's, which convert_whitening keeps)
    lr: float = 0.01
    momentum: float = 0.9
    mask_ratio: float = 0.5         # SGT; SaliencyDecor's default is the same

    def describe(self) -> str:
        return (f"resnet18 {self.classes} classes, {self.batch}x{self.channels}x{self.size}x{self.size}, "
                f"SGD lr {self.lr:g} momentum {self.momentum:g}")


def _target(path: str, baseline: str, bound: float | None) -> dict:
    # a target of one path: its time / the baseline's (at most bound; None: shown without a target)
    return dict(mode=MODE, baseline=baseline, ratio="time", bound=bound, path=path)


TARGETS = (
    _target("groupwhitening", "batchnorm", 1.1),
    _target("saliencydecor", "sgt", 1.1),
    _target("sgt", "batchnorm", None),
    _target("saliencydecor", "batchnorm", None),
    _target("groupwhitening", "iternorm", None),
)

CHECK_TEXT = "checked: one step from the common weights gives a finite loss and finite, changed parameters"
AGREE_TEXT = "; its loss and updated parameters agree with the IterNorm step's (same algorithm)"


def require_torchvision():
    """torchvision (the ResNet-18 of the suite), or MissingDependencyError naming the extra."""
    return require("torchvision", "bench", "sdecor bench --suite steps-cpu (torchvision's ResNet-18)")


def resnet18(config: StepConfig) -> nn.Module:
    """torchvision's ResNet-18 with ``config.classes`` outputs, as torchvision builds it."""
    return require_torchvision().models.resnet18(num_classes=config.classes)


# ---------------------------------------------------------------------------------------------------
# the layers and losses of the baselines


class IterNormLayer(nn.Module):
    """IterNorm's training forward (:func:`.baselines.iternorm`) with a BatchNorm layer's affine
    parameters; batch statistics in every mode, no running statistics."""

    def __init__(self, bn: nn.Module, num_channels: int, T: int, eps: float):
        super().__init__()
        C = bn.num_features
        if C % num_channels:
            raise ValueError(f"IterNorm needs num_channels={num_channels} to divide C={C}")
        self.num_channels, self.T, self.eps = num_channels, T, eps
        self.weight = nn.Parameter(bn.weight.detach().clone() if bn.affine else torch.ones(C))
        self.bias = nn.Parameter(bn.bias.detach().clone() if bn.affine else torch.zeros(C))

    def forward(self, x):
        return bl.iternorm(x, self.num_channels, self.T, self.eps, self.weight, self.bias)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def input_saliency(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|d logit_y / d x| by one backward of ``model`` in eval mode, input gradient only (SGT's way,
    in plain torch); the model is back in training mode afterwards."""
    model.eval()
    try:
        xi = x.detach().requires_grad_(True)
        picked = model(xi).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(picked, xi)
    finally:
        model.train()
    return grad.abs()


def sgt_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, generator) -> torch.Tensor:
    """Saliency Guided Training's loss in plain torch: CE(f(x), y) + KL(softmax f(x) || softmax f(x~)),
    x~ the k least salient positions of each sample (channel mean) replaced by uniform noise in the
    per-channel [min, max] of the sample."""
    sal = input_saliency(model, x, y)
    x_masked, _ = bl.sgt_mask(x, sal, k, "mean", "uniform", generator=generator)
    logits = model(x)
    logits_masked = model(x_masked)
    kl = F.kl_div(F.log_softmax(logits_masked, dim=1), F.log_softmax(logits, dim=1), reduction="batchmean",
                  log_target=True)
    return F.cross_entropy(logits, y) + kl


# ---------------------------------------------------------------------------------------------------
# the paths


@dataclass
class StepPath:
    name: str
    kind: str                                 # "fast" (sdecor's) or "baseline"
    note: str
    model: nn.Module
    step: Callable[[], torch.Tensor]          # one training step; returns the loss, detached


def _sgd(model: nn.Module, config: StepConfig):
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)


def _ce_step(model, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def _loss_step(model, opt, loss_fn):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def inputs(config: StepConfig, device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch (x, y): standard normal images and uniform labels, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(config.batch, config.channels, config.size, config.size, generator=gen)
    y = torch.randint(0, config.classes, (config.batch,), generator=gen)
    return x.to(device), y.to(device)


def build_paths(config: StepConfig, device, seed: int, model_fn: Callable[[StepConfig], nn.Module] = resnet18,
                paths=PATHS) -> tuple[list[StepPath], tuple]:
    """The step of each path in ``paths``, every model a copy of one built from ``seed``; and (x, y)."""
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"unknown step paths {unknown}; choose from {PATHS}")
    device = torch.device(device)
    x, y = inputs(config, device, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        master = model_fn(config).to(device).train()
    k = math.floor(config.mask_ratio * config.size * config.size)

    def generator():
        return torch.Generator(device=device).manual_seed(seed + 1)

    def whitened():
        model = copy.deepcopy(master)
        report = sdecor.convert_whitening(model, num_channels=config.num_channels)
        return model, [name for name, _ in report.replaced]

    out = []
    for name in paths:
        if name == "batchnorm":
            model = copy.deepcopy(master)
            out.append(StepPath(name, "baseline", "cross-entropy step, BatchNorm2d (torchvision's ResNet-18)", model,
                                _ce_step(model, _sgd(model, config), x, y)))
        elif name == "groupwhitening":
            model, layers = whitened()
            out.append(StepPath(name, "fast", f"cross-entropy step, {len(layers)} BatchNorm2d converted by "
                                f"sdecor.convert_whitening(num_channels={config.num_channels})", model,
                                _ce_step(model, _sgd(model, config), x, y)))
        elif name == "iternorm":
            model = copy.deepcopy(master)
            _, layers = whitened()
            for layer in layers:
                _swap(model, layer, IterNormLayer(model.get_submodule(layer), config.num_channels, config.T,
                                                  config.eps).to(device))
            out.append(StepPath(name, "baseline", f"cross-entropy step, naive IterNorm (autograd, no running "
                                f"statistics) on the {len(layers)} layers GroupWhitening replaces", model,
                                _ce_step(model, _sgd(model, config), x, y)))
        elif name == "sgt":
            model = copy.deepcopy(master)
            gen = generator()
            out.append(StepPath(name, "baseline", f"Saliency Guided Training in torch, ratio {config.mask_ratio:g}, "
                                "uniform fill, CE + KL, BatchNorm2d", model,
                                _loss_step(model, _sgd(model, config), lambda m=model, g=gen: sgt_loss(m, x, y, k, g))))
        else:
            model, _ = whitened()
            objective = sdecor.SaliencyDecor(model, generator=generator())
            opt = _sgd(model, config)
            out.append(StepPath(name, "fast", f"sdecor.SaliencyDecor defaults (mask_ratio {objective.mask_ratio:g}, "
                                f"{objective.fill} fill, lambda_decor {objective.lambda_decor:g}), GroupWhitening",
                                model, _loss_step(model, opt, lambda o=objective: o(x, y).total)))
    return out, (x, y)


def check_step(path: StepPath) -> dict:
    """One step of ``path``: {'loss', 'params' (after the step), 'problem' (None when the loss is finite
    and every parameter finite and changed)}."""
    before = [p.detach().clone() for p in path.model.parameters()]
    loss = path.step()
    after = [p.detach().clone() for p in path.model.parameters()]
    problem = None
    if not bool(torch.isfinite(loss)):
        problem = f"the loss of the first step is {float(loss)}"
    elif not all(bool(torch.isfinite(p).all()) for p in after):
        problem = "a parameter is not finite after the first step"
    else:
        same = sum(bool(torch.equal(a, b)) for a, b in zip(after, before))
        if same:
            problem = f"{same} of {len(after)} parameter tensors did not change in the first step"
    return dict(loss=loss, params=after, problem=problem)


def agreement(a: dict, b: dict) -> dict:
    """harness.compare of two checked steps' losses and updated parameters, float32 tolerance."""
    from .harness import compare

    names = ["loss"] + [f"parameter {i}" for i in range(len(a["params"]))]
    return compare((a["loss"].reshape(1), *a["params"]), (b["loss"].reshape(1), *b["params"]), torch.float32,
                   names)


# ---------------------------------------------------------------------------------------------------
# the run


def _record(config: StepConfig, path: StepPath, status: str, **kw) -> dict:
    r = dict(op=OP, shape="resnet18-cifar10-b" + str(config.batch), shape_desc=config.describe(),
             params=dataclasses.asdict(config), dtype="float32", targets=[dict(t) for t in TARGETS], mode=MODE,
             impl=path.name, kind=path.kind, backend=None, note=path.note, checked=False, check=CHECK_TEXT,
             status=status, time_ms=None, p20_ms=None, p80_ms=None, reps=None, bytes=None, gbps=None,
             peak_mem_bytes=None, minor_faults=None, max_abs_err=None, err_ratio=None, reason="")
    r.update(kw)
    return r


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(settings, config: StepConfig = StepConfig(), model_fn=resnet18, paths=PATHS, log=_log) -> list[dict]:
    """Check, then time every path's training step round-robin; one record per path (op ``train_step``,
    mode ``step``), with speed-ups over the baselines and the suite's targets."""
    from .harness import STATUS_ERROR, STATUS_OK, add_speedups
    from .timing import time_cpu_interleaved, time_gpu

    device = torch.device(settings.device)
    log(f"[{SUITE}] {config.describe()} on {device.type}")
    seed = settings.seed + zlib.crc32(f"{OP}/{config.describe()}".encode())
    built, _ = build_paths(config, device, seed, model_fn, paths)
    records, ready, checks, agreed = [], [], {}, {}
    for path in built:
        try:
            checks[path.name] = check_step(path)
            problem = checks[path.name]["problem"]
        except Exception as exc:          # a path that fails is reported, and the others still run
            problem = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:300]
        if problem is not None:
            records.append(_record(config, path, STATUS_ERROR, reason=problem))
            log(f"    {path.name}: error, {problem}")
            continue
        ready.append(path)
    if "groupwhitening" in checks and "iternorm" in checks and all(
            checks[n]["problem"] is None for n in ("groupwhitening", "iternorm")):
        agree = agreement(checks["groupwhitening"], checks["iternorm"])
        errs = dict(max_abs_err=agree["max_abs_err"], err_ratio=agree["err_ratio"], checked=True,
                    check=CHECK_TEXT + AGREE_TEXT)
        gw = next(p for p in ready if p.name == "groupwhitening")
        if not agree["ok"]:
            ready.remove(gw)
            why = (f"disagrees with the IterNorm step at {agree['where']} (max |err| {agree['max_abs_err']:.3g}, "
                   f"{agree['err_ratio']:.3g}x the float32 tolerance)")
            records.append(_record(config, gw, "MISMATCH", reason=why, **errs))
            log(f"    groupwhitening: MISMATCH, {why}")
        else:
            agreed["groupwhitening"] = errs
    del checks                                # the parameter copies
    if ready:
        if device.type == "cuda":
            timed = [time_gpu(p.step, []) for p in ready]
        else:
            timed = time_cpu_interleaved([(p.step, []) for p in ready], settings.min_time, settings.min_reps)
        for path, t in zip(ready, timed):
            extra = agreed.get(path.name, {})
            records.append(_record(config, path, STATUS_OK, time_ms=t["median"] * 1e3, p20_ms=t["p20"] * 1e3,
                                   p80_ms=t["p80"] * 1e3, reps=t["reps"], peak_mem_bytes=t["peak_mem"],
                                   minor_faults=t["faults"], **extra))
        log("    " + MODE + ": " + ", ".join(f"{p.name} {t['median'] * 1e3:.3g} ms" for p, t in zip(ready, timed)))
    order = {name: i for i, name in enumerate(paths)}
    records.sort(key=lambda r: order[r["impl"]])
    add_speedups(records)
    return records
