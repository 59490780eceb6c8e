"""The files a person reads and fills in during ``pivotal-clean`` (issue 16).

* :func:`write_to_label` writes ``round-K/to_label.csv``: columns ``id``, ``given_label``
  (the class name the data carries), ``predicted_label`` (when predictions are given),
  an empty ``label`` for the person, ``path`` (absolute image path, image data only),
  then any extra columns, one row per requested example in the order requested.
* :func:`write_contact_sheet` draws those examples' images on white sheets, each with
  its id and given label under it, every image scaled so its longer side is ``tile``
  pixels (128: small images are enlarged with nearest-neighbour so their pixels stay
  sharp). A sheet holds at most ``per_sheet`` images in rows of ``columns``;
  ``to_label.png`` is the first, ``to_label-2.png``... the next ones.
* :func:`read_labels` reads the filled-in file back (any CSV with ``id`` and ``label``
  columns; other columns are ignored) and checks it all: every requested id labelled
  once, nothing else, every label a class (a name, else an integer id). Each problem is
  one :class:`~experiments.userdata.UserDataError` line naming the file and line.
* :func:`write_table` is the atomic CSV writer all of these files go through: a temporary
  file in the same folder, then ``os.replace``, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import math
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from experiments.userdata import (IMAGE_ERRORS, UserData, UserDataError, brief_list, iter_csv,
                                  match_class)

__all__ = ["read_labels", "sheet_geometry", "sheet_paths", "write_contact_sheet",
           "write_table", "write_to_label"]

TILE, COLUMNS, PER_SHEET = 128, 10, 100
PAD, FONT_SIZE, TEXT_LINES = 6, 12, 2


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _replacing(path: str, binary: bool = False):
    """A file object whose contents replace ``path`` only once the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Named like this rather than by tempfile so the file gets the umask's permissions.
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        with (open(tmp, "xb") if binary else open(tmp, "x", newline="", encoding="utf-8")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_table(path, header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """Writes a CSV file atomically; returns its path.

    Raises:
      ValueError: a row has more or fewer fields than the header (nothing is written).
    """
    path, header = os.fspath(path), list(header)
    with _replacing(path) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for k, row in enumerate(rows):
            row = list(row)
            if len(row) != len(header):
                raise ValueError(f"{path}: row {k} has {len(row)} fields, the header {len(header)}")
            writer.writerow(row)
    return path


def _indices(data: UserData, indices) -> np.ndarray:
    """``indices`` as a checked int array: 1-D, within the data, none repeated."""
    array = np.asarray(indices)
    if array.size == 0:
        return np.zeros(0, np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"indices must be a 1-D integer array, not {array.dtype} {array.shape}")
    if array.min() < 0 or array.max() >= len(data):
        raise ValueError(f"indices must lie in [0, {len(data)}); got {array.min()}..{array.max()}")
    if len(np.unique(array)) != len(array):
        raise ValueError("indices repeat an example")
    return array.astype(np.int64)


def write_to_label(path_csv, data: UserData, indices, *, predicted=None,
                   extra: Mapping[str, Sequence] | None = None) -> str:
    """Writes the ``to_label.csv`` a person fills in (columns in the module docstring).

    Args:
      predicted: optional class ids aligned with ``indices``, written as names.
      extra: optional more columns, {name: values aligned with ``indices``}.
    """
    indices, extra = _indices(data, indices), dict(extra or {})
    columns = {"id": [data.ids[i] for i in indices],
               "given_label": [data.given_label(i) for i in indices]}
    if predicted is not None:
        columns["predicted_label"] = [data.class_names[int(k)] for k in np.asarray(predicted)]
    columns["label"] = [""] * len(indices)
    if data.paths is not None:
        columns["path"] = [data.paths[i] for i in indices]
    clash = sorted(set(columns) & set(extra))
    if clash:
        raise ValueError(f"extra columns {clash} clash with the standard ones")
    columns.update(extra)
    lengths = {name: len(values) for name, values in columns.items()}
    if set(lengths.values()) - {len(indices)}:
        raise ValueError(f"columns differ in length from the {len(indices)} indices: {lengths}")
    return write_table(path_csv, list(columns), zip(*columns.values()))


# ----------------------------------------------------------------------------- contact sheet


def sheet_geometry(count: int, tile: int = TILE, columns: int = COLUMNS,
                   text_lines: int = TEXT_LINES) -> tuple:
    """(columns, rows, cell width, cell height) of a sheet of ``count`` images."""
    cols = max(1, min(columns, count))
    cell_w = tile + 2 * PAD
    cell_h = tile + 3 * PAD + text_lines * (FONT_SIZE + 4)
    return cols, math.ceil(count / cols), cell_w, cell_h


def sheet_paths(path_png, count: int, per_sheet: int = PER_SHEET) -> list:
    """The sheet files for ``count`` images: ``path_png``, then ``stem-2.png``, ..."""
    stem, ext = os.path.splitext(os.fspath(path_png))
    sheets = max(1, math.ceil(count / per_sheet))
    return [os.fspath(path_png)] + [f"{stem}-{k}{ext}" for k in range(2, sheets + 1)]


def _display_image(data: UserData, i: int) -> Image.Image:
    """Example ``i`` as an RGB image: its file, else its array (min-max scaled)."""
    if data.paths is not None:
        try:
            with Image.open(data.paths[i]) as image:
                return image.convert("RGB")
        except IMAGE_ERRORS as err:
            raise UserDataError(f"{data.paths[i]}: cannot read the image: {err}") from None
    if data.x.ndim != 4 or data.x.shape[-1] not in (1, 3):
        raise ValueError(f"a contact sheet needs images; {data.source} holds "
                         f"{data.x.shape[1:]} examples")
    raw = data.x[i] * data.std + data.mean
    low, high = float(raw.min()), float(raw.max())
    scaled = (raw - low) / (high - low) if high > low else np.zeros_like(raw)
    pixels = np.round(scaled * 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("RGB")


def _fit(text: str, font, width: int) -> str:
    """``text``, its middle cut to ``...`` if it is wider than ``width`` pixels."""
    cut = text
    for keep in range(len(text), 0, -1):
        # Keep more of the end: file names differ in their numbers, not their folder.
        head = keep // 3
        cut = text if keep == len(text) else f"{text[:head]}...{text[len(text) - keep + head:]}"
        if font.getlength(cut) <= width:
            break
    return cut


def _scaled(image: Image.Image, tile: int) -> Image.Image:
    scale = tile / max(image.size)
    size = tuple(max(1, round(side * scale)) for side in image.size)
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return image.resize(size, resample)


def _draw_sheet(data: UserData, indices, tile: int, columns: int, notes=None) -> Image.Image:
    lines_per = TEXT_LINES + (notes is not None)
    cols, rows, cell_w, cell_h = sheet_geometry(len(indices), tile, columns, lines_per)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=FONT_SIZE)
    for k, i in enumerate(indices):
        left, top = (k % cols) * cell_w, (k // cols) * cell_h
        image = _scaled(_display_image(data, int(i)), tile)
        sheet.paste(image, (left + PAD + (tile - image.width) // 2,
                            top + PAD + (tile - image.height) // 2))
        lines = (data.ids[i], f"given: {data.given_label(i)}") + (
            () if notes is None else (str(notes[k]),))
        for n, text in enumerate(lines):
            draw.text((left + PAD, top + tile + 2 * PAD + n * (FONT_SIZE + 4)),
                      _fit(text, font, cell_w - 2 * PAD), fill="black", font=font)
    return sheet


def write_contact_sheet(path_png, data: UserData, indices, *, tile: int = TILE,
                        columns: int = COLUMNS, per_sheet: int = PER_SHEET,
                        notes: Sequence[str] | None = None) -> list:
    """Draws the requested examples on PNG contact sheets; returns the files written.

    ``notes``: an optional third caption line per image (aligned with ``indices``), e.g.
    the prediction and learned weight on the sheet of suspects.

    ``path_png`` holds the first ``per_sheet`` images, ``<stem>-2.png`` the next, ...;
    sheets of that pattern left over from a longer earlier list are removed.

    Raises:
      ValueError: the data are not images (a table, or flat arrays).
      UserDataError: an image file cannot be read any more.
    """
    indices = _indices(data, indices)
    if notes is not None and len(notes) != len(indices):
        raise ValueError(f"notes has {len(notes)} entries for {len(indices)} indices")
    if indices.size == 0:
        return []
    paths = sheet_paths(path_png, len(indices), per_sheet)
    for k, path in enumerate(paths):
        part = slice(k * per_sheet, (k + 1) * per_sheet)
        sheet = _draw_sheet(data, indices[part], tile, columns,
                            None if notes is None else list(notes)[part])
        with _replacing(path, binary=True) as f:
            sheet.save(f, format="PNG")
    stem, ext = os.path.splitext(os.fspath(path_png))
    stale = len(paths) + 1
    while os.path.exists(f"{stem}-{stale}{ext}"):
        os.unlink(f"{stem}-{stale}{ext}")
        stale += 1
    return paths


# ----------------------------------------------------------------------------- reading


def _label_columns(path: str, line: int, header: list) -> tuple:
    """(id column, label column) of a labels file's header, case-insensitively."""
    names = [name.lower() for name in header]
    found = []
    for wanted in ("id", "label"):
        if names.count(wanted) != 1:
            problem = "no" if wanted not in names else "more than one"
            raise UserDataError(f"{path} line {line}: {problem} {wanted!r} column; the first line "
                                f"must be a header with 'id' and 'label' columns (it has: "
                                f"{brief_list(header)})")
        found.append(names.index(wanted))
    return tuple(found)


def _class_of(path: str, line: int, label: str, classes: tuple) -> int:
    k = match_class(label, classes)
    if k is None:
        close = difflib.get_close_matches(label, classes, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserDataError(f"{path} line {line}: label {label!r} is not a class (classes: "
                            f"{brief_list(classes)}, or their ids 0-{len(classes) - 1}){hint}")
    return k


def read_labels(path_csv, data: UserData, requested_indices) -> np.ndarray:
    """Reads a person's labels: int32 class ids aligned with ``requested_indices``.

    Raises:
      UserDataError: (one line naming the file, and the line where one applies) the file
        cannot be read or has no ``id``/``label`` header, a row's id is empty, repeated or
        not requested, a label is empty or no class, or a requested id is missing.
    """
    path = os.fspath(path_csv)
    requested = _indices(data, requested_indices)
    wanted = {data.ids[i]: k for k, i in enumerate(requested)}
    labels = np.full(len(requested), -1, np.int32)
    seen = {}  # id -> line
    records = iter_csv(path)
    line, header = next(records, (1, None))
    if header is None:
        raise UserDataError(f"{path}: empty file (expected a header with 'id' and 'label')")
    id_col, label_col = _label_columns(path, line, header)
    for line, row in records:
        ident = row[id_col] if id_col < len(row) else ""
        label = row[label_col] if label_col < len(row) else ""
        if not ident:
            raise UserDataError(f"{path} line {line}: empty id")
        if ident in seen:
            raise UserDataError(f"{path} line {line}: id {ident!r} repeats line {seen[ident]}")
        if ident not in wanted:
            why = "in this round" if ident in data.index_of else f"(it is not in {data.source})"
            raise UserDataError(f"{path} line {line}: id {ident!r} was not asked for {why}")
        if not label:
            raise UserDataError(f"{path} line {line}: id {ident!r} has no label")
        labels[wanted[ident]] = _class_of(path, line, label, data.class_names)
        seen[ident] = line
    missing = [data.ids[i] for i, k in zip(requested, labels) if k < 0]
    if missing:
        raise UserDataError(f"{path}: no label for {len(missing)} of the {len(requested)} "
                            f"requested ids: {brief_list(missing, 5)}")
    return labels
