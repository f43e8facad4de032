"""Datasets for the demo and the ``train`` command, as in-memory tensors.

Two embedded sets need no download and are the same on every machine:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), scaled to
  [0, 1].
* ``shapes``: procedurally generated 24x24 RGB images (4000 by default) of one object (disk,
  square, triangle or plus) on a cluttered background, with the ground-truth object mask of every
  image. Generated from a seed with numpy's PCG64 generator, so a seed gives the same images
  everywhere.

Three torchvision sets are read from a local folder with download disabled: ``mnist``,
``fashion-mnist`` and ``cifar10``. A missing folder or file raises :class:`DatasetNotFoundError`,
naming the folder and the files expected in it; files that are not the dataset's raise
:class:`DatasetReadError`, naming the file and what is wrong with it.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import numpy as np
import torch

from .._optional import require

__all__ = [
    "Dataset",
    "Split",
    "DatasetNotFoundError",
    "DatasetReadError",
    "DATASETS",
    "EMBEDDED",
    "SHAPE_CLASSES",
    "load",
    "load_digits",
    "make_shapes",
    "load_shapes",
    "load_torchvision",
]

SHAPE_CLASSES = ("disk", "square", "triangle", "plus")
EMBEDDED = ("digits", "shapes")
TORCHVISION = ("mnist", "fashion-mnist", "cifar10")
DATASETS = EMBEDDED + TORCHVISION


class Split(NamedTuple):
    """Images x (N, C, H, W) float32 in [0, 1], labels y (N,) int64, object masks (N, H, W) bool or None."""

    x: torch.Tensor
    y: torch.Tensor
    mask: Optional[torch.Tensor] = None


class Dataset(NamedTuple):
    name: str
    train: Split
    test: Split
    classes: tuple
    description: str

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple:
        return tuple(self.train.x.shape[2:])


class DatasetNotFoundError(FileNotFoundError):
    """A torchvision dataset is not in the given folder (downloads are disabled)."""


class DatasetReadError(ValueError):
    """A torchvision dataset's files are in the folder but are not the dataset's (damaged, cut short,
    compressed, another dataset's); the message names the file and what is wrong with it."""


# ---------------------------------------------------------------------------------------------------
# embedded: scikit-learn digits


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random train/test split of range(n) (numpy PCG64, the same on every machine)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}")
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (bundled with scikit-learn), pixels scaled to [0, 1]."""
    sk_datasets = require("sklearn.datasets", "demo", "the digits dataset (bundled with scikit-learn)")
    digits = sk_datasets.load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)   # (1797, 1, 8, 8)
    y = torch.from_numpy(digits.target.astype(np.int64))
    tr, te = split_indices(len(y), test_fraction, seed)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return Dataset("digits", Split(x[tr], y[tr]), Split(x[te], y[te]), tuple(str(i) for i in range(10)),
                   "scikit-learn handwritten digits, 1x8x8")


# ---------------------------------------------------------------------------------------------------
# embedded: procedural shapes on clutter


def shape_mask(kind: int, cy: float, cx: float, r: float, angle: float, yy: np.ndarray,
               xx: np.ndarray) -> np.ndarray:
    """Boolean mask of one object on the pixel grid (yy, xx): centre (cy, cx), size r, rotation angle."""
    c, s = math.cos(angle), math.sin(angle)
    u = c * (xx - cx) + s * (yy - cy)          # object coordinates
    v = -s * (xx - cx) + c * (yy - cy)
    name = SHAPE_CLASSES[kind]
    if name == "disk":
        return u * u + v * v <= r * r
    if name == "square":
        h = 0.8 * r
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if name == "triangle":
        # equilateral triangle with circumradius r: inside all three half-planes
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = 2.0 * math.pi * k / 3.0 + math.pi / 2.0
            inside &= (u * math.cos(a) + v * math.sin(a)) >= -0.5 * r
        return inside
    # plus: two bars of half-width r/3.5
    w = r / 3.5
    return ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))


def make_shapes(n: int = 4000, size: int = 24, seed: int = 0, clutter: int = 6,
                noise: float = 0.06, max_rotation: float = 20.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate n RGB images (n, 3, size, size) float32 in [0, 1], labels (n,) and object masks.

    Every image: a smooth random colour gradient, ``clutter`` distractors (short thick strokes and
    small blobs in random colours, which are not any of the classes), one object of a random class
    from :data:`SHAPE_CLASSES` (random position, size, colour at least 0.35 away from the local
    background colour, and rotation within +-``max_rotation`` degrees), and Gaussian pixel noise.
    The mask is the object's pixels.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16 (pixels); got {size!r}")
    rng = np.random.Generator(np.random.PCG64(seed))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    images = np.empty((n, 3, size, size), dtype=np.float32)
    labels = rng.integers(0, len(SHAPE_CLASSES), size=n)
    masks = np.empty((n, size, size), dtype=bool)
    for i in range(n):
        # background: linear gradient between two colours along a random direction
        c0, c1 = rng.uniform(0.15, 0.85, size=3), rng.uniform(0.15, 0.85, size=3)
        theta = rng.uniform(0, 2 * math.pi)
        t = ((xx - size / 2) * math.cos(theta) + (yy - size / 2) * math.sin(theta)) / size + 0.5
        t = np.clip(t, 0.0, 1.0)
        img = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
        # distractors: strokes (thin rotated bars) and small blobs
        for _ in range(clutter):
            colour = rng.uniform(0.0, 1.0, size=3)
            py, px = rng.uniform(0, size, size=2)
            if rng.random() < 0.5:
                a = rng.uniform(0, math.pi)
                length, width = rng.uniform(3, 7), rng.uniform(0.6, 1.2)
                u = math.cos(a) * (xx - px) + math.sin(a) * (yy - py)
                v = -math.sin(a) * (xx - px) + math.cos(a) * (yy - py)
                m = (np.abs(u) <= length) & (np.abs(v) <= width)
            else:
                rad = rng.uniform(1.0, 2.2)
                m = (xx - px) ** 2 + (yy - py) ** 2 <= rad * rad
            img[:, m] = colour[:, None]
        # the object
        r = rng.uniform(0.2, 0.3) * size
        cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
        angle = math.radians(rng.uniform(-max_rotation, max_rotation))
        m = shape_mask(int(labels[i]), cy, cx, r, angle, yy, xx)
        local = img[:, m].mean(axis=1) if m.any() else img.mean(axis=(1, 2))
        colour = rng.uniform(0.0, 1.0, size=3)
        for _ in range(20):                      # keep the object visible against its background
            if np.abs(colour - local).max() >= 0.35:
                break
            colour = rng.uniform(0.0, 1.0, size=3)
        img[:, m] = colour[:, None]
        img += rng.normal(0.0, noise, size=img.shape)
        images[i] = np.clip(img, 0.0, 1.0)
        masks[i] = m
    return images, labels.astype(np.int64), masks


def load_shapes(n: int = 4000, size: int = 24, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """The procedural shapes set (see :func:`make_shapes`), split into train and test."""
    images, labels, masks = make_shapes(n, size, seed)
    x, y, m = torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(masks)
    tr, te = split_indices(n, test_fraction, seed + 1)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return Dataset("shapes", Split(x[tr], y[tr], m[tr]), Split(x[te], y[te], m[te]), SHAPE_CLASSES,
                   f"procedural shapes on clutter, 3x{size}x{size}, with object masks")


# ---------------------------------------------------------------------------------------------------
# torchvision, from a local folder


TV_FILES = {
    "mnist": ("MNIST/raw", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    "fashion-mnist": ("FashionMNIST/raw", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    "cifar10": ("cifar-10-batches-py", ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                        "data_batch_5", "test_batch", "batches.meta")),
}


def not_found_message(name: str, root: str) -> str:
    sub, files = TV_FILES[name]
    folder = os.path.join(os.path.abspath(root), sub)
    return (f"dataset {name!r} not found under --data-root {os.path.abspath(root)!r} (downloads are "
            f"disabled). Expected the folder {folder!r} holding: {', '.join(files)}"
            + (" (uncompressed idx files)" if name != "cifar10" else " (the Python version of CIFAR-10)")
            + ". Place the files there (e.g. download them once with torchvision's download=True "
              "on a machine with network access) or pass the right --data-root.")


def check_root(root) -> str:
    """``root`` as a folder path; DatasetNotFoundError naming it when it is missing or not a folder."""
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path; got {type(root).__name__}")
    root = os.fspath(root)
    if not os.path.lexists(root):
        raise DatasetNotFoundError(f"--data-root {root!r}: no such folder")
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"--data-root {root!r} is not a folder")
    return root


# the idx files of MNIST and Fashion-MNIST: unsigned bytes (type code 0x08), 3 dims (images) or 1 (labels)
IDX_UBYTE = 0x08


def check_idx_file(path: str, ndim: int) -> int:
    """The number of items of an idx file of unsigned bytes with ``ndim`` dims, after checking its
    header against its size; DatasetReadError naming the file and what is wrong otherwise."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(4 + 4 * ndim)
    if len(head) < 4 + 4 * ndim:
        raise DatasetReadError(f"{path}: {size} bytes, too short for an idx header ({4 + 4 * ndim} bytes)")
    if head[:2] != b"\0\0" or head[2] != IDX_UBYTE or head[3] != ndim:
        raise DatasetReadError(f"{path}: not an idx file of {ndim}-D unsigned bytes (it starts with "
                               f"{head[:4].hex()}, not 000008{ndim:02x}); is it compressed? sdecor reads the "
                               f"uncompressed files")
    dims = [int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    want = 4 + 4 * ndim + math.prod(dims)
    if size != want:
        raise DatasetReadError(f"{path}: {size} bytes, but its header ({'x'.join(map(str, dims))} bytes) "
                               f"makes {want}: the file is cut short or not an idx file")
    return dims[0]


def check_files(name: str, folder: str) -> None:
    """The dataset's files in ``folder`` are what torchvision reads: the idx headers of MNIST and
    Fashion-MNIST against their sizes, CIFAR-10's files against their MD5 sums. Raises
    DatasetReadError naming the file."""
    if name == "cifar10":
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import check_integrity

        for fname, md5 in CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]:
            path = os.path.join(folder, fname)
            if not check_integrity(path, md5):
                raise DatasetReadError(f"{path}: not the CIFAR-10 file of that name (its MD5 sum differs): "
                                       f"the file is damaged or another one")
        return
    for split in ("train", "t10k"):
        images = check_idx_file(os.path.join(folder, f"{split}-images-idx3-ubyte"), 3)
        labels_path = os.path.join(folder, f"{split}-labels-idx1-ubyte")
        labels = check_idx_file(labels_path, 1)
        if labels != images:
            raise DatasetReadError(f"{labels_path}: {labels} labels for the {images} images of "
                                   f"{split}-images-idx3-ubyte")


def check_split(split: Split, num_classes: int, where: str, minimum: int) -> None:
    """At least ``minimum`` images, one label each, every label a class index."""
    n = split.x.shape[0]
    if n < minimum:
        raise DatasetReadError(f"{where}: {n} images; training needs at least {minimum}")
    if split.y.shape != (n,):
        raise DatasetReadError(f"{where}: {tuple(split.y.shape)} labels for {n} images")
    if n and not (0 <= int(split.y.min()) and int(split.y.max()) < num_classes):
        bad = int(split.y.min()) if int(split.y.min()) < 0 else int(split.y.max())
        raise DatasetReadError(f"{where}: label {bad} is not a class index in [0, {num_classes})")


def load_torchvision(name: str, root: str) -> Dataset:
    """MNIST, FashionMNIST or CIFAR-10 from ``root`` (torchvision's folder layout; no download).

    A missing folder or file raises :class:`DatasetNotFoundError`; files that are there but are not
    the dataset's (damaged, cut short, compressed, another dataset's) raise
    :class:`DatasetReadError` naming the file and what is wrong with it.
    """
    if name not in TORCHVISION:
        raise ValueError(f"name must be one of {TORCHVISION}; got {name!r}")
    torchvision = require("torchvision", "demo", f"the {name} dataset (read with torchvision)")
    root = check_root(root)
    sub, files = TV_FILES[name]
    folder = os.path.join(os.path.abspath(root), sub)
    if not all(os.path.isfile(os.path.join(folder, f)) for f in files):
        raise DatasetNotFoundError(not_found_message(name, root))
    try:
        check_files(name, folder)
    except OSError as err:
        raise DatasetReadError(f"{getattr(err, 'filename', None) or folder}: cannot be read: {err.strerror or err}") \
            from None
    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        splits = [cls(root, train=train, download=False) for train in (True, False)]
    except Exception as err:                     # noqa: BLE001 - any failure of the reader is the files'
        text = " ".join(str(err).split())[:200]
        raise DatasetReadError(f"{folder}: torchvision could not read the {name} files there "
                               f"({type(err).__name__}{': ' + text if text else ''})") from None
    out = []
    for ds, which in zip(splits, ("train", "test")):
        data = torch.as_tensor(np.asarray(ds.data))
        if data.dim() == 3:                                  # (N, H, W) uint8
            x = data.unsqueeze(1).float() / 255.0
        elif data.dim() == 4 and data.shape[-1] == 3:        # (N, H, W, 3) uint8
            x = data.permute(0, 3, 1, 2).float() / 255.0
        else:
            raise DatasetReadError(f"{folder}: the {which} images are {tuple(data.shape)}, not (N, H, W) or "
                                   f"(N, H, W, 3)")
        split = Split(x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))
        check_split(split, len(splits[0].classes), f"{folder}: the {which} split", 2 if which == "train" else 1)
        out.append(split)
    classes = tuple(str(c) for c in splits[0].classes)
    shape = "x".join(str(s) for s in out[0].x.shape[1:])
    return Dataset(name, out[0], out[1], classes, f"torchvision {cls.__name__}, {shape}")


def load(name: str, root: Optional[str] = None, seed: int = 0) -> Dataset:
    """Load a dataset by name: one of :data:`DATASETS` (``root`` is needed for torchvision ones)."""
    if name == "digits":
        return load_digits(seed=seed)
    if name == "shapes":
        return load_shapes(seed=seed)
    if name in TORCHVISION:
        if root is None:
            raise ValueError(f"dataset {name!r} is read from a local folder: give its root (--data-root)")
        return load_torchvision(name, root)
    raise ValueError(f"dataset must be one of {DATASETS}; got {name!r}")
