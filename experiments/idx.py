"""IDX files: the format MNIST and Fashion-MNIST are distributed in.

An IDX file is a 4-byte magic number ``00 00 <type> <ndim>``, then ``ndim``
big-endian uint32 dimensions, then the values in row-major order, big-endian.
The four files of a set are ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
gzipped (``.gz``) or not; some mirrors write ``train-images.idx3-ubyte``.

:func:`read_idx` checks the magic number, the dimensions and that the file
holds exactly the values they announce, so a truncated download is an error
naming the file rather than a silently short dataset.
"""

from __future__ import annotations

import gzip
import os
from typing import NamedTuple

import numpy as np

__all__ = ["IdxFiles", "find_idx_files", "read_idx", "read_idx_set"]

# Type byte of the magic number -> big-endian numpy dtype.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxFiles(NamedTuple):
    """Paths of the four IDX files of a train/test set."""

    train_images: str
    train_labels: str
    test_images: str
    test_labels: str


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (gzipped when its name ends in ``.gz``) into a numpy array.

    Returns the array in native byte order with the file's dimensions.

    Raises:
      ValueError: the magic number is not an IDX one, or the file holds fewer
        or more bytes than its dimensions announce (the message names the file).
    """
    path = os.fspath(path)
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError) as err:  # a gzip stream cut short raises EOFError
        raise ValueError(f"{path}: not a readable IDX file ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: IDX header announces {ndim} dimension(s) but is cut short")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path}: IDX file of shape {shape} should hold {expected} bytes, holds "
            f"{len(data)} ({'truncated' if len(data) < expected else 'trailing data'})")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_one(data_dir: str, split: str, kind: str, ndim: int) -> str | None:
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            path = os.path.join(data_dir, f"{split}-{kind}{sep}idx{ndim}-ubyte{suffix}")
            if os.path.isfile(path):
                return path
    return None


def find_idx_files(data_dir: str | os.PathLike) -> IdxFiles | None:
    """The four IDX files in ``data_dir``, or None when any of them is missing."""
    data_dir = os.fspath(data_dir)
    found = [_find_one(data_dir, split, kind, ndim)
             for split in ("train", "t10k") for kind, ndim in (("images", 3), ("labels", 1))]
    return None if None in found else IdxFiles(*found)


def _images_and_labels(images_path: str, labels_path: str, num_classes: int):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images of shape (N, H, W), "
                         f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: expected {images.shape[0]} labels (one per image "
                         f"of {os.path.basename(images_path)}), got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{labels_path}: labels must lie in [0, {num_classes}), "
                         f"got [{labels.min()}, {labels.max()}]")
    return images[..., None], labels.astype(np.int64)


def read_idx_set(files: IdxFiles, num_classes: int = 10):
    """Reads a set's four files: ``(train_x, train_y, test_x, test_y)``.

    Images come back uint8 ``(N, H, W, 1)``, labels int64 ``(N,)``; images and
    labels of a split must agree in count, labels lie in ``[0, num_classes)``.
    """
    train_x, train_y = _images_and_labels(files.train_images, files.train_labels, num_classes)
    test_x, test_y = _images_and_labels(files.test_images, files.test_labels, num_classes)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(f"{files.test_images}: images of shape {test_x.shape[1:3]} do not "
                         f"match the training images' {train_x.shape[1:3]}")
    return train_x, train_y, test_x, test_y
