"""Embedded datasets (digits, procedural shapes) and the torchvision loaders' folder handling."""

import math
import os
import struct

import numpy as np
import pytest
import torch

from sdecor.cli import data


def test_digits_split_and_range():
    ds = data.load_digits()
    assert ds.train.x.shape[1:] == (1, 8, 8) and ds.train.x.dtype == torch.float32
    assert len(ds.train.y) + len(ds.test.y) == 1797 and len(ds.test.y) == 449
    assert float(ds.train.x.min()) == 0.0 and float(ds.train.x.max()) == 1.0
    assert set(ds.train.y.tolist()) == set(range(10)) and ds.num_classes == 10
    assert ds.train.mask is None
    again = data.load_digits()
    assert torch.equal(ds.train.x, again.train.x) and torch.equal(ds.test.y, again.test.y)


def test_split_indices_disjoint_and_complete():
    tr, te = data.split_indices(10, 0.3, seed=1)
    assert len(te) == 3 and sorted(np.concatenate([tr, te]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="test_fraction"):
        data.split_indices(10, 1.0, seed=1)


def test_shapes_are_reproducible_and_seeded():
    a = data.make_shapes(n=12, seed=0)
    b = data.make_shapes(n=12, seed=0)
    c = data.make_shapes(n=12, seed=1)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    # integer draws of PCG64 are the same on every platform
    assert a[1].tolist() == [3, 2, 2, 1, 1, 0, 0, 0, 0, 3, 2, 3]


def test_shapes_content():
    images, labels, masks = data.make_shapes(n=200, size=24, seed=5)
    assert images.shape == (200, 3, 24, 24) and images.dtype == np.float32
    assert masks.shape == (200, 24, 24) and masks.dtype == bool
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(labels.tolist()) == set(range(len(data.SHAPE_CLASSES)))
    area = masks.reshape(200, -1).mean(1)
    assert (area > 0.02).all() and (area < 0.5).all()
    # inside its mask the object is one colour plus pixel noise; the image as a whole is not
    for i in range(20):
        inside = images[i][:, masks[i]]
        assert inside.std(axis=1).max() < 0.1
        assert images[i].reshape(3, -1).std(axis=1).max() > inside.std(axis=1).max()


def test_shape_masks_differ_by_class():
    # on a fine grid the areas approach the shapes' formulas: disk pi r^2, square (1.6 r)^2,
    # equilateral triangle of circumradius r 3 sqrt(3)/4 r^2, plus two 2r x 2r/3.5 bars less the overlap
    yy, xx = np.mgrid[0:200, 0:200].astype(float) + 0.5
    r = 70.0
    areas = [data.shape_mask(k, 100, 100, r, 0.3, yy, xx).sum() for k in range(len(data.SHAPE_CLASSES))]
    expected = [math.pi * r * r, (1.6 * r) ** 2, 3 * math.sqrt(3) / 4 * r * r,
                2 * (2 * r) * (2 * r / 3.5) - (2 * r / 3.5) ** 2]
    for got, want in zip(areas, expected):
        assert abs(got - want) / want < 0.02


def test_load_shapes_split_keeps_masks_aligned():
    ds = data.load_shapes(n=80)
    assert len(ds.train.y) == 60 and len(ds.test.y) == 20
    assert ds.train.mask.shape == (60, 24, 24) and ds.test.mask.dtype == torch.bool
    images, labels, masks = data.make_shapes(n=80)
    tr, te = data.split_indices(80, 0.25, seed=1)
    assert torch.equal(ds.test.x, torch.from_numpy(images[te]))
    assert torch.equal(ds.test.mask, torch.from_numpy(masks[te]))


def test_make_shapes_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n must be a positive int"):
        data.make_shapes(n=0)
    with pytest.raises(ValueError, match="size must be an int >= 16"):
        data.make_shapes(n=4, size=8)


@pytest.mark.parametrize("name, folder, first", [
    ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
    ("fashion-mnist", "FashionMNIST/raw", "train-images-idx3-ubyte"),
    ("cifar10", "cifar-10-batches-py", "data_batch_1"),
])
def test_torchvision_missing_folder_names_folder_and_files(tmp_path, name, folder, first):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_torchvision(name, tmp_path)
    msg = str(info.value)
    assert os.path.join(str(tmp_path), folder) in msg and first in msg and "--data-root" in msg
    assert isinstance(info.value, FileNotFoundError)


def write_idx(path, array, magic):
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic))
        for dim in array.shape:
            fh.write(struct.pack(">I", dim))
        fh.write(array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_mnist_from_local_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 7), ("t10k", 3)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 0x803)
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), 0x801)
    ds = data.load(name, str(tmp_path))
    assert ds.train.x.shape == (7, 1, 28, 28) and ds.test.x.shape == (3, 1, 28, 28)
    assert ds.train.y.dtype == torch.int64 and ds.num_classes == 10
    assert 0.0 <= float(ds.train.x.min()) and float(ds.train.x.max()) <= 1.0


def test_load_dispatch_errors():
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="--data-root"):
        data.load("mnist")
    with pytest.raises(ValueError, match="name must be one of"):
        data.load_torchvision("digits", ".")
