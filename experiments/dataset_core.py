"""What every dataset loader shares: the :class:`Dataset` type, :class:`DatasetNotFoundError`,
the normalisation constants, and the split helpers.

The sets that come as an official train/test pair (TFDS, IDX files, an image folder with
``train``/``val``) are split by one function, :func:`official_split`: train = the official
training images, validation = a seeded random 10 % of the official test split, test = the
other 90 % (as the paper's code does). The embedded sets use :func:`stratified_split` or
:func:`random_split` on one pool and :func:`assemble`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "Dataset",
    "DatasetNotFoundError",
    "VAL_FRACTION",
    "assemble",
    "normalise",
    "official_split",
    "random_split",
    "stratified_split",
    "stratified_take",
]

# Normalisation constants (mean, std per channel, on pixels scaled to [0, 1]).
# MNIST: the customary values, also used by the paper's code.
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
# CIFAR: the per-channel statistics of the official training images. (The
# often-copied std (0.2023, 0.1994, 0.2010) is a miscomputed value.)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
# ImageNet: the torchvision constants.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Fashion-MNIST: the mean and std of the 60,000 official training images scaled to [0, 1]
# (measured on Debian's dataset-fashion-mnist files: 0.28604, 0.35302).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)

# Share of the official test split that becomes the validation set.
VAL_FRACTION = 0.1


class DatasetNotFoundError(FileNotFoundError):
    """The files of a downloadable dataset are not where the loader looked."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A split dataset with clean labels.

    Attributes:
      name: registry name, e.g. ``"mnist5k"``.
      x_train, x_val, x_test: float32 ``(N_split, *input_shape)``; images are
        channels-last and normalised.
      y_train, y_val, y_test: int32 ``(N_split,)`` in ``[0, num_classes)``.
      num_classes: number of classes K.
      input_shape: per-example shape, e.g. ``(28, 28, 1)`` or ``(2,)``.
      train_index, val_index, test_index: int64 ``(N_split,)``: each example's
        position in its source. Embedded sets have one source (all examples),
        so the three are disjoint. TFDS sets: ``train_index`` indexes the
        official train split, ``val_index``/``test_index`` the official test
        split (CIFAR records are put back in the original file order, so
        CIFAR-N label files line up with ``train_index``).
      metadata: extra facts (normalisation constants, class names, ...).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    train_index: np.ndarray
    val_index: np.ndarray
    test_index: np.ndarray
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        for split in ("train", "val", "test"):
            _check_split(split, getattr(self, f"x_{split}"), getattr(self, f"y_{split}"),
                         getattr(self, f"{split}_index"), self.input_shape, self.num_classes)

    @property
    def splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{"train": (x, y), "val": (x, y), "test": (x, y)}``."""
        return {
            "train": (self.x_train, self.y_train),
            "val": (self.x_val, self.y_val),
            "test": (self.x_test, self.y_test),
        }


def _check_split(split, x, y, idx, input_shape, num_classes):
    """Raises ValueError unless one split has consistent shapes/dtypes/labels."""
    if x.dtype != np.float32 or x.shape[1:] != tuple(input_shape):
        raise ValueError(
            f"x_{split} must be float32 of shape (N, *{tuple(input_shape)}), "
            f"got {x.dtype} {x.shape}")
    if y.dtype != np.int32 or y.shape != (x.shape[0],):
        raise ValueError(
            f"y_{split} must be int32 of shape ({x.shape[0]},), got {y.dtype} {y.shape}")
    if idx.shape != (x.shape[0],):
        raise ValueError(f"{split}_index must have shape ({x.shape[0]},), got {idx.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"y_{split} must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")


def stratified_take(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Picks ``n`` positions of ``labels`` (N,) keeping class proportions.

    Each class gets the floor of its proportional quota; the few left-over
    places go to the classes with the largest fractional remainders (ties broken
    at random), so the total is exactly ``n``. Returns sorted positions (n,).
    """
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (n / labels.size)
    take = np.floor(quota).astype(np.int64)
    short = n - int(take.sum())
    if short:
        # Random jitter below 1e-9 only breaks exact ties in the remainder.
        order = np.argsort(-(quota - take) - 1e-9 * rng.random(classes.size), kind="stable")
        take[order[:short]] += 1
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)
    ]
    return np.sort(np.concatenate(picked))


def stratified_split(labels, n_val, n_test, rng):
    """Splits positions of ``labels`` (N,) into sorted (train, val, test) index arrays."""
    everything = np.arange(labels.size)
    test = stratified_take(labels, n_test, rng)
    rest = np.setdiff1d(everything, test)
    val = rest[stratified_take(labels[rest], n_val, rng)]
    train = np.setdiff1d(rest, val)
    return train, val, test


def random_split(n, sizes: Sequence[int], rng):
    """Splits ``range(n)`` at random into sorted index arrays of the given sizes."""
    perm = rng.permutation(n)
    bounds = np.cumsum([0, *sizes])
    return tuple(np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))


def normalise(pixels: np.ndarray, max_value: float, mean, std) -> np.ndarray:
    """float32 ``(pixels / max_value - mean) / std`` per channel (last axis).

    One float32 copy is made and then updated in place, so a CIFAR train set
    costs ~0.6 GB rather than a chain of temporaries.
    """
    x = np.asarray(pixels, dtype=np.float32) / np.float32(max_value)
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return x


def assemble(name, x, y, parts, num_classes, metadata) -> Dataset:
    """Builds a Dataset from one pool ``x`` (N, ...), ``y`` (N,) and (train, val, test) indices."""
    train, val, test = parts
    y = y.astype(np.int32)
    return Dataset(
        name=name,
        x_train=x[train], y_train=y[train],
        x_val=x[val], y_val=y[val],
        x_test=x[test], y_test=y[test],
        num_classes=num_classes,
        input_shape=tuple(x.shape[1:]),
        train_index=train.astype(np.int64),
        val_index=val.astype(np.int64),
        test_index=test.astype(np.int64),
        metadata=metadata,
    )



def official_split(name: str, train: tuple, test: tuple, *, seed: int, num_classes: int,
                   prep: Callable[[np.ndarray], np.ndarray], metadata: Mapping[str, Any]
                   ) -> Dataset:
    """A Dataset from an official train/test pair.

    Train = the whole official training split; the official test split is cut at random
    (``np.random.default_rng(seed)``) into validation = ``round(VAL_FRACTION * N_test)``
    examples and test = the rest. ``train_index`` is ``arange(N_train)``, ``val_index`` and
    ``test_index`` are positions in the official test split.

    Args:
      train, test: ``(images (N, ...), labels (N,))`` of each official split.
      prep: ``images -> float32`` normalised images, applied to the training images and to
        each of the two parts of the test split (an elementwise map, so cutting first saves
        one full-size copy).
    """
    train_x, train_y = train
    test_x, test_y = test
    n_val = round(VAL_FRACTION * len(test_y))
    val_idx, test_idx = random_split(len(test_y), (n_val, len(test_y) - n_val),
                                     np.random.default_rng(seed))
    return Dataset(
        name=name,
        x_train=prep(train_x), y_train=train_y.astype(np.int32),
        x_val=prep(test_x[val_idx]), y_val=test_y[val_idx].astype(np.int32),
        x_test=prep(test_x[test_idx]), y_test=test_y[test_idx].astype(np.int32),
        num_classes=num_classes,
        input_shape=tuple(train_x.shape[1:]),
        train_index=np.arange(len(train_y), dtype=np.int64),
        val_index=val_idx.astype(np.int64),
        test_index=test_idx.astype(np.int64),
        metadata=metadata,
    )
