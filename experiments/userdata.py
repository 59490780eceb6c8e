"""A user's own noisy data for the ``pivotal-clean`` workflow (issue 16): reading and hashing.

:func:`read_user_data` chooses the format by the path:

* a folder ``root/<class name>/*.png|jpg|jpeg`` (images further down a class folder
  belong to it too; hidden files and folders and other files are skipped): the folder
  names are the given, possibly noisy, labels and an image's id is its path relative
  to ``root`` with ``/`` separators, e.g. ``shirt/img00012.png``;
* ``.npz`` with ``x`` (N, ...), ``y`` (N,) integers or strings, optional ``ids`` and
  ``class_names`` (then integer ``y`` are indices into it);
* ``.csv`` with a header, a label column (``label`` unless ``label_column`` says
  otherwise), an optional ``id`` column and numeric feature columns (all the others).

Classes are the ``class_names`` given, else those of the .npz, else the sorted distinct
labels (numerically when every label is an integer, so ``10`` follows ``9``); a class
id is the index in that list. A label is matched as a class name first, then as an
integer class id (:func:`match_class`), in data files read against given classes as in
labels files. Ids are the .npz ``ids`` or CSV ``id`` column, else the 0-based row number.

``x`` is float32: images channels-last (1 channel when every image is grey, else 3,
grey ones replicated, alpha dropped), scaled to [0, 1]; then every kind is standardised
per channel (images; the last axis of an .npz ``x``) or per feature (tables) with the
data's own mean and std, kept in ``UserData.mean``/``std`` so that validation and test
files are standardised alike (``like=``). A constant channel keeps std 1.

Every problem with the input is one line, a :class:`UserDataError` naming the file and,
where it applies, the CSV line (1-based, header = line 1), the array entry or the image.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import os
import re
import zipfile
from collections.abc import Iterator, Sequence
from typing import Callable

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_LABEL_COLUMN", "ID_COLUMN", "IMAGE_ERRORS", "IMAGE_EXTENSIONS", "KINDS", "UserData",
    "UserDataError", "brief_list", "data_hash", "image_files", "iter_csv", "match_class",
    "parse_image_size", "read_user_data",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_LABEL_COLUMN = "label"
ID_COLUMN = "id"
KINDS = ("images", "array", "table")
# Pillow modes read as one grey channel; every other mode is converted to RGB.
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_DELIMITERS = (",", ";", "\t")  # spreadsheets in some locales save CSV with ";"
_CHUNK = 1 << 16  # pixels (or table rows) per step of the mean/std pass: small temporaries
# What Pillow raises for a bad image file: UnidentifiedImageError and truncation are
# OSErrors; an absurdly large image is a DecompressionBombError, which is not.
IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


class UserDataError(ValueError):
    """A problem with a user's data or labels file, as one line naming the file."""

    def __init__(self, message: str):
        # One line whatever a quoted value or a library's message holds.
        super().__init__(" ".join(str(message).splitlines()))


@dataclasses.dataclass(frozen=True, eq=False)
class UserData:
    """A user's data as read by :func:`read_user_data`.

    Attributes:
      x: float32 (N, ...) standardised examples; images are (N, H, W, C).
      y: int32 (N,) given (possibly noisy) class ids, indices into ``class_names``.
      ids: the N example ids, unique strings.
      class_names: the class names, a class id being an index.
      paths: absolute image paths (images only), else None.
      kind: "images", "array" (.npz) or "table" (.csv).
      source: the path read.
      content_hash: :func:`data_hash` of ``source`` when it was read.
      mean, std: float32 per-channel (or per-feature) statistics ``x`` was standardised
        with; raw values are ``x * std + mean``.
    """

    x: np.ndarray
    y: np.ndarray
    ids: tuple
    class_names: tuple
    paths: tuple | None
    kind: str
    source: str
    content_hash: str
    mean: np.ndarray
    std: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @functools.cached_property
    def index_of(self) -> dict:
        """{id: row index}."""
        return {ident: i for i, ident in enumerate(self.ids)}

    def given_label(self, i: int) -> str:
        """The class name example ``i`` carries."""
        return self.class_names[int(self.y[i])]


@dataclasses.dataclass
class _Raw:
    """What a format reader found, before classes are resolved and x standardised."""

    x: np.ndarray
    labels: list  # str per example
    ids: list
    where: Callable[[int], str]  # example index -> "line 5" / "entry 3" / image path
    own_classes: tuple | None = None  # the file's own class list (.npz class_names)
    paths: tuple | None = None


# ----------------------------------------------------------------------------- helpers


def brief_list(items: Sequence, limit: int = 8) -> str:
    """``a, b, c`` or ``a, b, ... (40 in all)``: a list short enough for one message."""
    shown = ", ".join(str(item) for item in list(items)[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def match_class(label: str, class_names: Sequence[str]) -> int | None:
    """The class id of ``label``: a class name first, then an integer id; None if neither."""
    label = str(label).strip()
    try:
        return list(class_names).index(label)
    except ValueError:
        pass
    if re.fullmatch(r"[+-]?\d+", label) and 0 <= int(label) < len(class_names):
        return int(label)
    return None


def parse_image_size(text: str) -> tuple:
    """``"32x48"`` (height x width) -> ``(32, 48)``; the ``--image-size`` flag's format."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise UserDataError(f"image size {text!r} is not HxW with positive integers, e.g. 32x32")
    return int(match[1]), int(match[2])


def _sort_labels(labels) -> list:
    """Distinct labels, sorted numerically when all are integers, else as strings."""
    distinct = set(labels)
    if all(re.fullmatch(r"[+-]?\d+", s) for s in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def iter_csv(path: str) -> Iterator:
    """Yields ``(line, fields)`` for each non-blank record of a CSV file, header included.

    ``line`` is the 1-based line the record starts on; fields are stripped. The delimiter
    is whichever of ``,`` ``;`` tab the first line holds most of (``,`` on a tie). A BOM
    (spreadsheets write one) is dropped.
    """
    reader = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
            f.seek(0)
            delimiter = max(_DELIMITERS, key=first.count)
            reader = csv.reader(f, delimiter=delimiter)
            line = 1
            for row in reader:
                if any(cell.strip() for cell in row):
                    yield line, [cell.strip() for cell in row]
                line = reader.line_num + 1
    except UnicodeDecodeError:
        raise UserDataError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as err:
        raise UserDataError(f"{path} line {reader.line_num if reader else 1}: {err}") from None
    except OSError as err:
        raise UserDataError(f"{path}: cannot read: {err.strerror or err}") from None


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def image_files(root: str) -> list:
    """Ids (paths relative to ``root``, ``/``-separated, sorted) of an image folder's images.

    Raises:
      UserDataError: an image lies in ``root`` itself, outside any class folder.
    """
    root = os.fspath(root)
    found = []
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        if name.startswith("."):
            continue
        if not os.path.isdir(full):
            if _is_image(name):
                raise UserDataError(f"{full}: image is not inside a class folder "
                                    f"(expected {root}/<class name>/{name})")
            continue
        for folder, subfolders, names in os.walk(full):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            rel = os.path.relpath(folder, root).replace(os.sep, "/")
            found += [f"{rel}/{n}" for n in names if _is_image(n)]
    return sorted(found)


def data_hash(path) -> str:
    """SHA-256 hex digest of a data file's bytes, or of an image folder's images.

    For a folder: over each image's relative path and the digest of its bytes, in sorted
    order, so renaming or moving an image between class folders changes it too. Files are
    streamed, never held in memory whole.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return _file_sha256(path).hexdigest()
    total = hashlib.sha256()
    for ident in image_files(path):
        image = _file_sha256(os.path.join(path, ident)).digest()
        total.update(ident.encode("utf-8") + b"\0" + image)
    return total.hexdigest()


def _file_sha256(path: str):
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            # hashlib.file_digest is Python 3.11+; the project still supports 3.10.
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise UserDataError(f"{path}: cannot read: {err.strerror or err}") from None
    return digest


# ----------------------------------------------------------------------------- images


def _image_header(path: str) -> tuple:
    """(size (W, H), mode) of an image, reading its header only."""
    try:
        with Image.open(path) as image:
            return image.size, image.mode
    except IMAGE_ERRORS as err:
        raise UserDataError(f"{path}: cannot read the image: {err}") from None


def _pixels(path: str, channels: int, size_hw: tuple) -> np.ndarray:
    """An image as float32 (H, W, channels) in [0, 1], resized to ``size_hw`` if needed."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I") or image.mode == "F":
                # 16-bit grey: Pillow's conversion to "L" would clip, so scale it here.
                scale = 1.0 if image.mode == "F" else 65535.0
                image, scale = Image.fromarray(np.asarray(image, np.float32) / scale), 1.0
            else:
                image, scale = image.convert("L" if channels == 1 else "RGB"), 255.0
            if image.size != (size_hw[1], size_hw[0]):
                image = image.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, np.float32) / scale
    except IMAGE_ERRORS as err:
        raise UserDataError(f"{path}: cannot read the image: {err}") from None
    array = array.reshape(size_hw[0], size_hw[1], -1)
    return np.repeat(array, channels, axis=-1) if array.shape[-1] != channels else array


def _read_image_folder(root: str, image_size, channels) -> _Raw:
    ids = image_files(root)
    if not ids:
        raise UserDataError(f"{root}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in class folders "
                            f"(expected {root}/<class name>/<image>)")
    paths = tuple(os.path.abspath(os.path.join(root, ident)) for ident in ids)
    headers = [_image_header(p) for p in paths]  # headers only: cheap, and finds bad files early
    if image_size is None:
        (w0, h0), _ = headers[0]
        for path, ((w, h), _) in zip(paths, headers):
            if (w, h) != (w0, h0):
                raise UserDataError(
                    f"{root}: images differ in size ({paths[0]} is {h0}x{w0}, {path} is {h}x{w}); "
                    "give an image size (--image-size HxW) to resize them all")
        image_size = (h0, w0)
    if channels is None:
        channels = 1 if all(mode in _GREY_MODES for _, mode in headers) else 3
    x = np.empty((len(paths), *image_size, channels), np.float32)  # allocated once
    for i, path in enumerate(paths):
        x[i] = _pixels(path, channels, image_size)
    labels = [ident.split("/", 1)[0] for ident in ids]
    return _Raw(x, labels, ids, where=lambda i: f"image {ids[i]}", paths=paths)


# ----------------------------------------------------------------------------- .npz


def _load_npz(path: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserDataError(f"{path}: cannot read the .npz file: {err}") from None


def _strings(array: np.ndarray, path: str, key: str) -> list:
    if array.dtype.kind == "S":
        return [item.decode("utf-8", "replace") for item in array.tolist()]
    if array.dtype.kind not in "UiuO":
        raise UserDataError(f"{path}: {key} holds {array.dtype} values, not strings or integers")
    return [str(item) for item in array.tolist()]


def _npz_labels(path: str, y: np.ndarray, own: tuple | None) -> list:
    """Labels as strings; integer ``y`` become class names when the file has them."""
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)  # integers saved as floats
    if y.dtype.kind in "iu" and own is not None:
        bad = np.flatnonzero((y < 0) | (y >= len(own)))
        if bad.size:
            raise UserDataError(f"{path}: y[{bad[0]}] = {y[bad[0]]} is not an index into its "
                                f"{len(own)} class_names")
        return [own[v] for v in y.tolist()]
    if y.dtype.kind not in "iuSU":
        raise UserDataError(f"{path}: y holds {y.dtype} values; it must hold integers or strings")
    return _strings(y, path, "y")


def _read_npz(path: str) -> _Raw:
    arrays = _load_npz(path)
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise UserDataError(f"{path}: no {' or '.join(missing)} array "
                            f"(it holds: {brief_list(sorted(arrays)) or 'nothing'})")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 0 or y.ndim != 1:
        raise UserDataError(f"{path}: x must be (N, ...) and y (N,); they are {x.shape} "
                            f"and {y.shape}")
    if len(x) != len(y):
        raise UserDataError(f"{path}: x has {len(x)} examples but y has {len(y)} labels")
    if len(y) == 0:
        raise UserDataError(f"{path}: no examples")
    if x.dtype.kind not in "biuf":
        raise UserDataError(f"{path}: x holds {x.dtype} values, not numbers")
    own = None
    if "class_names" in arrays:
        own = tuple(_strings(arrays["class_names"].reshape(-1), path, "class_names"))
        if len(set(own)) != len(own):
            raise UserDataError(f"{path}: class_names repeat a name ({brief_list(own)})")
    ids = [str(i) for i in range(len(y))]
    if "ids" in arrays:
        ids = _strings(arrays["ids"].reshape(-1), path, "ids")
        if len(ids) != len(y):
            raise UserDataError(f"{path}: ids has {len(ids)} entries but y has {len(y)}")
    # (N,) -> one feature; (N, H, W) -> grey images, channels-last like image folders.
    x = x.reshape(len(x), 1) if x.ndim == 1 else x[..., None] if x.ndim == 3 else x
    labels = _npz_labels(path, y, own)
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if not finite.all():
        i = int(np.argmin(finite))
        raise UserDataError(f"{path} entry {i} (id {ids[i]!r}): x holds a NaN or infinite value")
    return _Raw(x.astype(np.float32, copy=False), labels, ids,
                where=lambda i: f"entry {i} (id {ids[i]!r})", own_classes=own)


# ----------------------------------------------------------------------------- .csv


def _table_columns(path: str, header: list, line: int, label_column: str) -> tuple:
    """(label column, id column or None, feature columns) indices of a CSV header."""
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise UserDataError(f"{path} line {line}: column {repeated[0]!r} appears more than once")
    if label_column not in header:
        raise UserDataError(f"{path} line {line}: no label column {label_column!r} (columns: "
                            f"{brief_list(header)}); name it with --label-column")
    label = header.index(label_column)
    ident = header.index(ID_COLUMN) if ID_COLUMN in header and ID_COLUMN != label_column else None
    features = [j for j in range(len(header)) if j not in (label, ident)]
    if not features:
        raise UserDataError(f"{path} line {line}: no feature columns besides {label_column!r}")
    return label, ident, features


def _parse_features(path: str, line: int, row: list, header: list, features: list) -> list:
    values = []
    for j in features:
        try:
            value = float(row[j])
        except ValueError:
            value = None
        if value is None or not np.isfinite(value):
            raise UserDataError(f"{path} line {line}, column {header[j]!r}: {row[j]!r} is not "
                                "a finite number")
        values.append(value)
    return values


def _read_table(path: str, label_column: str) -> _Raw:
    records = iter_csv(path)
    header_line, header = next(records, (1, None))
    if header is None:
        raise UserDataError(f"{path}: empty file (expected a header line naming the columns)")
    n = sum(1 for _ in records)  # first pass counts, so that x is allocated once
    label, ident, features = _table_columns(path, header, header_line, label_column)
    x = np.empty((n, len(features)), np.float32)
    labels, ids, lines = [], [], []
    records = iter_csv(path)
    next(records)
    for k, (line, row) in enumerate(records):
        if len(row) != len(header):
            raise UserDataError(f"{path} line {line}: {len(row)} fields, but the header "
                                f"(line {header_line}) has {len(header)}")
        x[k] = _parse_features(path, line, row, header, features)
        if not row[label]:
            raise UserDataError(f"{path} line {line}: empty label (column {label_column!r})")
        if ident is not None and not row[ident]:
            raise UserDataError(f"{path} line {line}: empty id (column {ID_COLUMN!r})")
        labels.append(row[label])
        ids.append(row[ident] if ident is not None else str(k))
        lines.append(line)
    return _Raw(x, labels, ids, where=lambda i: f"line {lines[i]}")


# ----------------------------------------------------------------------------- classes, x


def _check_ids(path: str, raw: _Raw) -> None:
    first = {}
    for i, ident in enumerate(raw.ids):
        if not ident.strip():
            raise UserDataError(f"{path} {raw.where(i)}: empty id")
        if ident in first:
            raise UserDataError(f"{path} {raw.where(i)}: id {ident!r} repeats "
                                f"{raw.where(first[ident])}; ids must be unique")
        first[ident] = i


def _resolve_classes(path: str, raw: _Raw, class_names: tuple | None) -> tuple:
    """(class names, int32 class ids) of the examples' labels."""
    classes = class_names if class_names is not None else raw.own_classes
    if classes is None:
        classes = tuple(_sort_labels(raw.labels))
    lookup = {name: k for k, name in enumerate(classes)}
    y = np.empty(len(raw.labels), np.int32)
    for i, label in enumerate(raw.labels):
        k = lookup.get(label)
        k = match_class(label, classes) if k is None else k
        if k is None:
            whose = "the training data" if class_names is not None else "the file's class_names"
            raise UserDataError(f"{path} {raw.where(i)}: class {label!r} is not one of "
                                f"{whose} ({brief_list(classes)})")
        y[i] = k
    if class_names is None and len(np.unique(y)) < 2:
        raise UserDataError(f"{path}: all {len(y)} examples are of one class "
                            f"({classes[y[0]]!r}); at least two classes are needed")
    return classes, y


def _channel_stats(x: np.ndarray) -> tuple:
    """Per-channel (last axis) mean and std, in float64, a chunk of rows at a time."""
    flat = x.reshape(-1, x.shape[-1])
    count, mean, m2 = 0, np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
    for start in range(0, len(flat), _CHUNK):
        block = flat[start:start + _CHUNK].astype(np.float64)
        n, block_mean = len(block), block.mean(axis=0)
        delta, total = block_mean - mean, count + len(block)
        # Chan et al.'s pairwise update: no sum of squares to lose precision in.
        m2 += ((block - block_mean) ** 2).sum(axis=0) + delta**2 * count * n / total
        mean += delta * n / total
        count = total
    std = np.sqrt(m2 / count)
    return mean, np.where(std > 0, std, 1.0)  # a constant channel is left unscaled


def _standardise(path: str, x: np.ndarray, like) -> tuple:
    """Standardises ``x`` in place; returns the float32 (mean, std) used."""
    if like is None:
        mean, std = (s.astype(np.float32) for s in _channel_stats(x))
    else:
        if x.shape[1:] != like.x.shape[1:]:
            raise UserDataError(f"{path}: examples have shape {x.shape[1:]} but those of the "
                                f"training data ({like.source}) have {like.x.shape[1:]}")
        mean, std = like.mean, like.std
    x -= mean
    x /= std
    return mean, std


def _image_size(size) -> tuple:
    size = parse_image_size(size) if isinstance(size, str) else tuple(int(v) for v in size)
    if len(size) != 2 or min(size) < 1:
        raise UserDataError(f"image size {size} is not (height, width) with positive integers")
    return size


def _read_raw(path: str, label_column, image_size, channels) -> tuple:
    """(kind, _Raw) of a path, by its type."""
    if os.path.isdir(path):
        return "images", _read_image_folder(path, image_size, channels)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        return "array", _read_npz(path)
    if suffix == ".csv":
        return "table", _read_table(path, label_column or DEFAULT_LABEL_COLUMN)
    raise UserDataError(f"{path}: not an image folder, .npz or .csv file")


def read_user_data(path, *, label_column: str | None = None, image_size=None,
                   class_names: Sequence[str] | None = None, like: UserData | None = None
                   ) -> UserData:
    """Reads a user's image folder, .npz or .csv file (see the module docstring).

    Args:
      path: the folder or file.
      label_column: the CSV label column (default ``label``); ignored for other formats.
      image_size: (H, W) or ``"HxW"`` every image is resized to; without it an image
        folder's images must share one size. Ignored for .npz and .csv.
      class_names: read the labels against these classes (the training set's, for
        validation and test files); a label that is none of them is an error. Without
        it, the data must hold two classes or more.
      like: the training set's :class:`UserData`: its classes (unless ``class_names``),
        image size and channels (for images), and mean/std are used, and the examples
        must have its shape.

    Raises:
      UserDataError: anything wrong with the data, as one line naming the file.
    """
    path = os.fspath(path)
    channels = None
    if like is not None:
        class_names = like.class_names if class_names is None else class_names
        if like.x.ndim == 4:
            image_size = like.x.shape[1:3] if image_size is None else image_size
            channels = like.x.shape[3]
    if class_names is not None:
        class_names = tuple(str(name) for name in class_names)
        if len(class_names) < 2 or len(set(class_names)) != len(class_names):
            raise UserDataError(f"class_names must be two or more distinct names, not "
                                f"{brief_list(class_names)}")
    image_size = None if image_size is None else _image_size(image_size)
    if not os.path.exists(path):
        raise UserDataError(f"{path}: no such file or folder")
    content_hash = data_hash(path)  # before reading: a change while reading shows later
    kind, raw = _read_raw(path, label_column, image_size, channels)
    if not raw.labels:
        raise UserDataError(f"{path}: no examples")
    _check_ids(path, raw)
    classes, y = _resolve_classes(path, raw, class_names)
    mean, std = _standardise(path, raw.x, like)
    return UserData(x=raw.x, y=y, ids=tuple(raw.ids), class_names=tuple(classes),
                    paths=raw.paths, kind=kind, source=path, content_hash=content_hash,
                    mean=mean, std=std)
