"""The configuration of one ``sdecor train`` run (:class:`TrainConfig`) and its checks.

Every field is checked before any work (:meth:`TrainConfig.check`); a bad one raises
:class:`ConfigError` naming the field. The demo builds its runs from the same class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import data as data_mod
from ..models import MODELS, NORMS, check_group_size

FILLS = ("zero", "mean", "uniform")

# --amp: the autocast dtype of the training steps (None: fp32, no autocast)
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything that defines one training run."""

    dataset: str = "digits"
    model: str = "tiny"
    norm: str = "auto"                  # "auto": whitening when lambda_decor > 0, else batch
    lambda_consistency: float = 0.0
    lambda_decor: float = 0.0
    mask_ratio: float = 0.5
    fill: str = "uniform"
    num_channels: int = 16
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    device: str = "cpu"
    seed: int = 0
    width: Optional[int] = None
    amp: str = "off"                    # "bf16" / "fp16": training steps under torch.autocast

    def resolved_norm(self) -> str:
        if self.norm == "auto":
            return "whitening" if self.lambda_decor > 0 else "batch"
        return self.norm

    def check(self) -> None:
        """Every field, before any work; raises :class:`ConfigError` (a ValueError) naming the field."""
        if self.dataset not in data_mod.DATASETS:
            raise ConfigError("dataset", f"dataset must be one of {data_mod.DATASETS}; got {self.dataset!r}")
        if self.model not in MODELS:
            raise ConfigError("model", f"model must be one of {tuple(MODELS)}; got {self.model!r}")
        if self.norm not in ("auto",) + NORMS:
            raise ConfigError("norm", f"norm must be one of {('auto',) + NORMS}; got {self.norm!r}")
        for name in ("lambda_consistency", "lambda_decor", "lr", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(name, f"{name} must be a finite number >= 0; got {value!r}")
        if self.lr <= 0:
            raise ConfigError("lr", f"lr must be > 0; got {self.lr!r}")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ConfigError("mask_ratio", f"mask_ratio must be in [0, 1]; got {self.mask_ratio!r}")
        if self.fill not in FILLS:
            raise ConfigError("fill", f"fill must be one of {FILLS}; got {self.fill!r}")
        for name in ("num_channels", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"{name} must be a positive int; got {value!r}")
        if self.batch_size < 2:
            raise ConfigError("batch_size", f"batch_size must be >= 2 (batch statistics); got {self.batch_size}")
        if self.width is not None and (isinstance(self.width, bool) or not isinstance(self.width, int)
                                       or self.width < 1):
            raise ConfigError("width", f"width must be a positive int (or None, the model's default); "
                                       f"got {self.width!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < MAX_SEED:
            raise ConfigError("seed", f"seed must be an int in [0, 2**63 - 1); got {self.seed!r}")
        try:
            check_device(self.device)
        except ValueError as err:
            raise ConfigError("device", str(err)) from None
        try:
            check_amp(self.amp, self.device)
        except ValueError as err:
            raise ConfigError("amp", str(err)) from None
        try:
            check_group_size(self.model, self.resolved_norm(), self.num_channels, self.width,
                             decorrelate=self.lambda_decor > 0)
        except ValueError as err:
            raise ConfigError("num_channels", str(err)) from None


class ConfigError(ValueError):
    """A field of :class:`TrainConfig` out of range; ``field`` names it (``sdecor train`` reports
    it as the option ``--field``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# torch seeds are 64-bit; the objective's generator takes seed + 1
MAX_SEED = 2 ** 63 - 1


def check_device(device) -> torch.device:
    """A device this machine can train on: cpu, or cuda[:index] / mps / xpu where available.

    Raises ValueError naming the device (cheap: no tensor is made, nothing is initialised but the
    driver query of torch.cuda.is_available()).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device; use cpu, cuda, cuda:<index>, mps or xpu") \
            from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: no MPS device is available")
        return dev
    if dev.type == "xpu":
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise ValueError(f"device {device!r}: no XPU device is available")
        return dev
    raise ValueError(f"device {device!r} cannot train a model here; use cpu, cuda, cuda:<index>, mps or xpu")


def check_amp(amp, device) -> None:
    """``amp`` one of AMP_DTYPES, with an autocast for ``device``'s type (a checked device). Raises
    ValueError naming amp."""
    if not isinstance(amp, str) or amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}; got {amp!r}")
    kind = torch.device(device).type
    if AMP_DTYPES[amp] is not None and not torch.amp.is_autocast_available(kind):
        raise ValueError(f"amp {amp!r}: torch.autocast has no {kind!r} device type; use --amp off")
