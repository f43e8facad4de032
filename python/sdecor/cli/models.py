"""Small CNNs for the demo and the ``train`` command.

Every model takes ``norm``: ``"batch"`` puts a BatchNorm2d after each convolution, ``"whitening"`` a
:class:`sdecor.nn.GroupWhitening` (groups of ``num_channels`` channels) in the same places. The
classifier is a single ``nn.Linear`` on globally pooled features, so the SaliencyDecor objective's
default decorrelation layer (the input of the last ``nn.Linear``) is the pooled feature vector.

Models (:data:`MODELS`):

* ``tiny``:   conv 16 - pool - conv 32 - pool - conv 32, global average pool, linear (8x8 to 32x32 inputs).
* ``small``:  conv 32 - conv 32 - pool - conv 64 - conv 64 - pool - conv 64, global pool, linear.
* ``resnet8``: a 3-stage residual network (16, 32, 64 channels, one basic block per stage).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .._checks import divisors

__all__ = ["MODELS", "NORMS", "build_model", "check_group_size", "layer_channels", "make_norm", "TinyCNN",
           "SmallCNN", "ResNet8"]

NORMS = ("batch", "whitening")


def make_norm(norm: str, channels: int, num_channels: int = 16) -> nn.Module:
    """BatchNorm2d(channels) or GroupWhitening(channels, num_channels) (groups of min(d, channels))."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "whitening":
        from ..nn import GroupWhitening

        return GroupWhitening(channels, num_channels=min(num_channels, channels))
    raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")


def conv_block(cin: int, cout: int, norm: str, num_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         make_norm(norm, cout, num_channels), nn.ReLU(inplace=True))


class TinyCNN(nn.Module):
    # channels of the norm layers and of the classifier's input, as multiples of width
    NORM_WIDTHS = (1, 2, 2)
    FEATURE_WIDTH = 2

    def __init__(self, in_channels: int, num_classes: int, norm: str = "batch", num_channels: int = 16,
                 width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_block(in_channels, w, norm, num_channels),
            nn.MaxPool2d(2),
            conv_block(w, 2 * w, norm, num_channels),
            nn.MaxPool2d(2),
            conv_block(2 * w, 2 * w, norm, num_channels),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    NORM_WIDTHS = (1, 1, 2, 2, 2)
    FEATURE_WIDTH = 2

    def __init__(self, in_channels: int, num_classes: int, norm: str = "batch", num_channels: int = 16,
                 width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_block(in_channels, w, norm, num_channels),
            conv_block(w, w, norm, num_channels),
            nn.MaxPool2d(2),
            conv_block(w, 2 * w, norm, num_channels),
            conv_block(2 * w, 2 * w, norm, num_channels),
            nn.MaxPool2d(2),
            conv_block(2 * w, 2 * w, norm, num_channels),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, num_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, cout, num_channels)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, cout, num_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          make_norm(norm, cout, num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet8(nn.Module):
    NORM_WIDTHS = (1, 1, 1, 2, 2, 2, 4, 4, 4)         # stem; block 1; blocks 2 and 3 with their shortcut
    FEATURE_WIDTH = 4

    def __init__(self, in_channels: int, num_classes: int, norm: str = "batch", num_channels: int = 16,
                 width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_block(in_channels, w, norm, num_channels),
            BasicBlock(w, w, 1, norm, num_channels),
            BasicBlock(w, 2 * w, 2, norm, num_channels),
            BasicBlock(2 * w, 4 * w, 2, norm, num_channels),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS = {"tiny": TinyCNN, "small": SmallCNN, "resnet8": ResNet8}


def build_model(name: str, in_channels: int, num_classes: int, norm: str = "batch",
                num_channels: int = 16, width=None) -> nn.Module:
    """Build one of :data:`MODELS` by name."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}; got {name!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes),
                       ("num_channels", num_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int; got {value!r}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"width must be a positive int or None (the model's default); got {width!r}")
    kwargs = {} if width is None else {"width": width}
    return MODELS[name](in_channels, num_classes, norm=norm, num_channels=num_channels, **kwargs)


def layer_channels(name: str, width=None) -> tuple[tuple[int, ...], int]:
    """(channels of each norm layer, channels of the classifier's input) of model ``name``, without
    building it (width None: the model's default)."""
    cls = MODELS[name]
    width = default_width(name) if width is None else width
    return tuple(k * width for k in cls.NORM_WIDTHS), cls.FEATURE_WIDTH * width


def default_width(name: str) -> int:
    return inspect.signature(MODELS[name]).parameters["width"].default


def check_group_size(name: str, norm: str, num_channels: int, width=None, decorrelate: bool = False) -> None:
    """ValueError naming num_channels where groups of ``num_channels`` do not fit model ``name``.

    Whitening norm layers of c channels take groups of min(num_channels, c) (:func:`make_norm`), so
    that must divide c; with ``decorrelate`` the classifier's input (SaliencyDecor's default layer)
    is split into groups of num_channels, so that must divide its channel count. Checked from the
    channel layout alone, before any weight is allocated.
    """
    norms, features = layer_channels(name, width)
    what = f"model {name!r} (width {default_width(name) if width is None else width})"
    if norm == "whitening":
        for c in norms:
            if c % min(num_channels, c):
                raise ValueError(f"num_channels={num_channels} does not divide the {c} channels of a whitening "
                                 f"layer of {what}; group sizes that fit it: {divisors(c)} or >= {c}")
    if decorrelate and features % num_channels:
        raise ValueError(f"num_channels={num_channels} does not divide the {features} channels of the "
                         f"decorrelated classifier input of {what}; group sizes that fit it: {divisors(features)}")
