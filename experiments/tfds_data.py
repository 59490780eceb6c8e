"""The TFDS datasets (``mnist``, ``cifar10``, ``cifar100``) through ``tfds.data_source``:
array-record files read record by record, no TensorFlow.

:func:`load_tfds` reads the official train and test splits and cuts them with
:func:`~experiments.dataset_core.official_split`; when the data is not prepared, the
:class:`~experiments.dataset_core.DatasetNotFoundError` says how to prepare it.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

import numpy as np

from experiments.dataset_core import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                      MNIST_MEAN, MNIST_STD, Dataset, DatasetNotFoundError,
                                      normalise, official_split)

__all__ = ["load_tfds"]


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



def load_tfds(name: str, *, seed: int, data_dir=None, download: bool = False) -> Dataset:
    """Official train split; seeded random 10 % / 90 % of the test split -> val / test."""
    info = _TFDS_INFO[name]
    train = _read_tfds_split(info, "train", data_dir, download)
    test = _read_tfds_split(info, "test", data_dir, download)
    return official_split(
        name, train, test, seed=seed, num_classes=info.num_classes,
        prep=lambda images: normalise(images, 255.0, info.mean, info.std),
        metadata={"mean": info.mean, "std": info.std, "tfds_name": info.tfds_name})
