"""The datasets of the paper's recipe, held on the training device, for ``train.py``.

CIFAR-10, CIFAR-100 and SVHN come through torchvision (downloaded where there is a network);
MNIST and Fashion-MNIST through :mod:`mnist`, offline. Each is split and normalised as in the
paper's official code (github.com/yueatsprograms/Stochastic_Depth):

- CIFAR: a random 45,000 / 5,000 train / validation split of the 50,000 training images;
  SVHN: 400 images per class from ``train`` and 200 per class from ``extra`` for validation
  (6,000), the rest of both (598,388) for training; MNIST-like sets: 55,000 / 5,000.
- Normalisation: subtract the mean image of the training split (per pixel and channel) and
  divide by the standard deviation of all its values (one number).
- Augmentation (CIFAR): shift each image by up to 4 pixels in each direction, filling with
  zeros (after normalisation, so with the mean), and flip half of them horizontally.

Images stay in their stored dtype (uint8 for the torchvision sets) on the device, and each
batch is normalised and augmented there by :class:`Preprocess`, so no loader process is
needed and the GPU sets the pace.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

import mnist
from mnist import LabelledImages

__all__ = [
    "DATASETS",
    "DatasetUnavailableError",
    "LabelledImages",
    "Preprocess",
    "Splits",
    "load_splits",
    "normalisation",
    "random_translate_flip",
]

Augmentation = Literal["translate-flip", "translate", "none"]

DATASETS = ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist")
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "mnist": 10, "fashion-mnist": 10}
_HOW_TO_GET = {
    "cifar10": "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it there, "
    "so that {root}/cifar-10-batches-py/ holds data_batch_1..5, test_batch and batches.meta",
    "cifar100": "download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it there, "
    "so that {root}/cifar-100-python/ holds train, test and meta",
    "svhn": "download train_32x32.mat, extra_32x32.mat and test_32x32.mat from "
    "http://ufldl.stanford.edu/housenumbers/ into {root}",
}


class DatasetUnavailableError(FileNotFoundError):
    """A dataset is not on disk and could not (or may not) be downloaded; says how to get it."""


@dataclass
class Splits:
    """Train, validation and test images and labels of one dataset (CPU tensors, NCHW)."""

    train: LabelledImages
    val: LabelledImages
    test: LabelledImages
    num_classes: int


def load_splits(
    name: str,
    root: str | Path | None = None,
    *,
    val_size: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> Splits:
    """Load a dataset and split off the validation set as the paper's code does.

    Parameters
    ----------
    name : {"cifar10", "cifar100", "svhn", "mnist", "fashion-mnist"}
        The dataset.
    root : str or Path, optional
        Where its files are (or go). Defaults: ``data/`` next to this module for the
        torchvision sets, the vendored copy for MNIST, Debian's folder for Fashion-MNIST.
    val_size : int, optional
        Validation images taken from the training set. Defaults to the paper's (5,000; SVHN:
        6,000, drawn per class as above; for SVHN any other size is drawn at random).
        0 means no validation set.
    seed : int
        Seed of the random split; every process of a distributed run must use the same.
    download : bool
        Fetch a missing torchvision dataset (needs a network).

    Raises
    ------
    DatasetUnavailableError
        When the files are missing (and could not be downloaded); says how to get them.
    ValueError
        For an unknown name or a validation set as large as the training set.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    generator = torch.Generator().manual_seed(seed)
    if name in ("mnist", "fashion-mnist"):
        loader = mnist.load_mnist if name == "mnist" else mnist.load_fashion_mnist
        try:
            pool, test = loader() if root is None else loader(root)
        except FileNotFoundError as error:
            hint = "apt-get install dataset-fashion-mnist (Debian/Ubuntu), or pass --data-dir" if name == "fashion-mnist" else "pass --data-dir"
            raise DatasetUnavailableError(f"{error}; {hint}") from None
        val_size = 5000 if val_size is None else val_size
        train, val = _random_split(pool, val_size, generator)
        return Splits(train, val, test, 10)

    root = Path(root) if root is not None else Path(__file__).resolve().parent / "data"
    if name == "svhn":
        train_part, extra_part, test = (_torchvision_split(name, root, split, download) for split in ("train", "extra", "test"))
        if val_size is None:
            (train_a, val_a), (train_b, val_b) = (_per_class_split(part, k, generator) for part, k in ((train_part, 400), (extra_part, 200)))
            train, val = _concat(train_a, train_b), _concat(val_a, val_b)
        else:
            train, val = _random_split(_concat(train_part, extra_part), val_size, generator)
        return Splits(train, val, test, 10)

    pool, test = (_torchvision_split(name, root, split, download) for split in ("train", "test"))
    train, val = _random_split(pool, 5000 if val_size is None else val_size, generator)
    return Splits(train, val, test, _NUM_CLASSES[name])


def _torchvision_split(name: str, root: Path, split: str, download: bool) -> LabelledImages:
    """One split of a torchvision dataset as uint8 NCHW images and int64 labels."""
    import torchvision  # slow to import; only these datasets need it

    def make(download: bool):
        if name == "svhn":
            return torchvision.datasets.SVHN(root, split=split, download=download)
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        return cls(root, train=split == "train", download=download)

    try:
        dataset = make(download=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        if not download:
            raise DatasetUnavailableError(
                f"{name} ({split}) is not in {root} (or a file fails torchvision's checksum) and downloading is off; "
                f"{_HOW_TO_GET[name].format(root=root)}, or run with a network and without --no-download"
            ) from None
        try:
            dataset = make(download=True)
        except Exception as error:  # no network, a proxy, a full disk...: say what to do instead
            raise DatasetUnavailableError(
                f"{name} ({split}) is not in {root} and could not be downloaded ({type(error).__name__}: {error}); "
                f"on a machine with a network, {_HOW_TO_GET[name].format(root=root)}"
            ) from None
    if name == "svhn":
        images, labels = torch.from_numpy(dataset.data), torch.as_tensor(dataset.labels)
    else:
        images, labels = torch.from_numpy(dataset.data).permute(0, 3, 1, 2), torch.as_tensor(dataset.targets)
    return LabelledImages(images.contiguous(), labels.long())


def _random_split(pool: LabelledImages, val_size: int, generator: torch.Generator) -> tuple[LabelledImages, LabelledImages]:
    if not 0 <= val_size < len(pool.labels):
        raise ValueError(f"val_size must be in [0, {len(pool.labels)}) for this training set, got {val_size}")
    order = torch.randperm(len(pool.labels), generator=generator)
    val, train = order[:val_size], order[val_size:]
    return LabelledImages(pool.images[train], pool.labels[train]), LabelledImages(pool.images[val], pool.labels[val])


def _per_class_split(pool: LabelledImages, per_class: int, generator: torch.Generator) -> tuple[LabelledImages, LabelledImages]:
    """``per_class`` random images of every class for validation, the rest for training."""
    val_indices = []
    for label in pool.labels.unique():
        members = (pool.labels == label).nonzero().squeeze(1)
        if len(members) <= per_class:
            raise ValueError(f"class {label.item()} has {len(members)} images, cannot hold out {per_class}")
        val_indices.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    val = torch.cat(val_indices)
    is_train = torch.ones(len(pool.labels), dtype=torch.bool)
    is_train[val] = False
    return LabelledImages(pool.images[is_train], pool.labels[is_train]), LabelledImages(pool.images[val], pool.labels[val])


def _concat(a: LabelledImages, b: LabelledImages) -> LabelledImages:
    return LabelledImages(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]))


def random_translate_flip(images: Tensor, max_shift: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Shift each image by up to `max_shift` pixels per axis (zero fill), and flip half of them.

    As the paper's code: each image gets its own shift ``(dy, dx)``, both uniform in
    ``[-max_shift, max_shift]``, and with `flip` a horizontal flip with probability 1/2.

    Parameters
    ----------
    images : torch.Tensor
        A batch, shape (N, C, H, W), any float dtype and memory format.
    max_shift : int
        Largest shift in pixels.
    flip : bool
        Also flip horizontally at random.
    generator : torch.Generator
        On the images' device; it alone decides the shifts and flips.

    Returns
    -------
    torch.Tensor
        The augmented batch, same shape.
    """
    n, _, height, width = images.shape
    device = images.device
    shifts = torch.randint(-max_shift, max_shift + 1, (2, n, 1), device=device, generator=generator)
    padded = F.pad(images, (max_shift,) * 4)
    # Output pixel (i, j) reads input pixel (i - dy, j - dx), i.e. padded (i - dy + s, j - dx + s).
    rows = torch.arange(height, device=device) - shifts[0] + max_shift  # (N, H)
    cols = torch.arange(width, device=device) - shifts[1] + max_shift  # (N, W)
    if flip:
        flipped = torch.rand(n, 1, device=device, generator=generator) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    samples = torch.arange(n, device=device)[:, None, None]
    # Advanced indices around a slice put their dimensions first: (N, H, W, C).
    out = padded[samples, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


class Preprocess:
    """Turn a batch of stored images into network inputs, on their device.

    Normalises (subtracts `mean_image`, divides by `std`), augments when given a generator,
    and hands out the batch in channels_last memory format if asked.

    Parameters
    ----------
    mean_image : torch.Tensor
        (C, H, W), subtracted from every image.
    std : float
        Every image is divided by it after the subtraction.
    augmentation : {"translate-flip", "translate", "none"}
        What a call with a generator does: shifts of up to 4 pixels, with or without random
        horizontal flips (see :func:`random_translate_flip`), or nothing.
    channels_last : bool
        Return channels_last batches (faster convolutions on recent GPUs).
    """

    def __init__(
        self, mean_image: Tensor, std: float, augmentation: Augmentation = "none", channels_last: bool = False
    ) -> None:
        if augmentation not in ("translate-flip", "translate", "none"):
            raise ValueError(f"unknown augmentation {augmentation!r}: expected 'translate-flip', 'translate' or 'none'")
        self.mean_image = mean_image.float()
        self.std = float(std)
        self.augmentation = augmentation
        self.channels_last = channels_last

    def __call__(self, images: Tensor, augment_with: torch.Generator | None = None) -> Tensor:
        if self.mean_image.device != images.device:
            self.mean_image = self.mean_image.to(images.device)
        images = (images.float() - self.mean_image) / self.std
        if augment_with is not None and self.augmentation != "none":
            images = random_translate_flip(images, 4, self.augmentation == "translate-flip", augment_with)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


def normalisation(train: LabelledImages) -> tuple[Tensor, float]:
    """The paper's normalisation constants: the training split's mean image and overall std."""
    total = torch.zeros(train.images.shape[1:], dtype=torch.float64)
    total_of_squares = 0.0
    for chunk in train.images.split(10_000):  # SVHN in float64 at once would need 15 GB
        chunk = chunk.double()
        total += chunk.sum(0)
        total_of_squares += chunk.square().sum().item()
    count = len(train.images)
    mean_image = total / count
    mean = mean_image.mean().item()
    variance = total_of_squares / (count * mean_image.numel()) - mean**2
    return mean_image.float(), variance**0.5
