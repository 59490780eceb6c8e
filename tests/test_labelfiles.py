"""experiments/labelfiles.py: to_label.csv, the contact sheets, and a person's labels read back.

The data are scikit-learn digits written as PNGs in class folders (and a small CSV);
every bad labels file is one case of a table, refused with a one-line UserDataError
naming the file and the line.
"""

import csv
import functools
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from experiments.labelfiles import (COLUMNS, TILE, read_labels, sheet_geometry, write_contact_sheet,
                                    write_table, write_to_label)
from experiments.userdata import UserDataError, read_user_data

NAMES = ("zero", "one", "two")


@functools.lru_cache(maxsize=1)
def digits():
    data = load_digits()
    keep = np.concatenate([np.flatnonzero(data.target == d)[:10] for d in range(3)])
    return (data.images[keep] * 15).astype(np.uint8), data.target[keep]


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "data"
    for i, (image, target) in enumerate(zip(*digits())):
        os.makedirs(root / NAMES[target], exist_ok=True)
        Image.fromarray(image).save(root / NAMES[target] / f"img{i:03d}.png")
    return read_user_data(root)  # classes: one, two, zero


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("f,label\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in range(6)))
    return read_user_data(path)


def rows_of(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def fill(path, out, labels, header=None, order=None):
    """A person's answers: ``to_label.csv`` with ``label`` filled in, rows in ``order``."""
    rows = rows_of(path)
    header = header or rows[0]
    body = rows[1:]
    for row, label in zip(body, labels):
        row[rows[0].index("label")] = label
    body = [body[k] for k in order] if order is not None else body
    write_table(out, header, body)
    return out


# ----------------------------------------------------------------------------- writing


def test_to_label_csv_for_images(tmp_path, images):
    wanted = [5, 0, 17]
    path = write_to_label(tmp_path / "round-1" / "to_label.csv", images, wanted)
    rows = rows_of(path)
    assert rows[0] == ["id", "given_label", "label", "path"]
    assert [r[0] for r in rows[1:]] == [images.ids[i] for i in wanted]
    assert [r[1] for r in rows[1:]] == [images.given_label(i) for i in wanted]
    assert all(r[2] == "" for r in rows[1:])
    assert all(os.path.isabs(r[3]) and os.path.isfile(r[3]) for r in rows[1:])
    assert os.listdir(tmp_path / "round-1") == ["to_label.csv"]  # no temporary file left


def test_to_label_csv_for_a_table_with_predictions_and_extra_columns(tmp_path, table):
    path = write_to_label(tmp_path / "to_label.csv", table, [3, 0], predicted=[0, 0],
                          extra={"score": [0.5, 0.25]})
    assert rows_of(path) == [["id", "given_label", "predicted_label", "label", "score"],
                             ["3", "b", "a", "", "0.5"], ["0", "a", "a", "", "0.25"]]


@pytest.mark.parametrize("indices, words", [([0, 0], "repeat"), ([99], "lie in"),
                                            ([[1]], "1-D"), ([0.5], "integer")])
def test_bad_indices_are_refused(tmp_path, table, indices, words):
    with pytest.raises(ValueError, match=words):
        write_to_label(tmp_path / "x.csv", table, indices)


def test_write_table_is_atomic_and_quotes(tmp_path):
    path = tmp_path / "weights.csv"
    write_table(path, ["id", "weight"], [["a,b", 0.5], ['say "hi"', 1]])
    assert rows_of(path) == [["id", "weight"], ["a,b", "0.5"], ['say "hi"', "1"]]
    with pytest.raises(ValueError, match="row 1 has 1 fields"):
        write_table(path, ["id", "weight"], [["c", 2], ["d"]])
    assert rows_of(path)[1] == ["a,b", "0.5"]  # the old file stands
    assert os.listdir(tmp_path) == ["weights.csv"]


# ----------------------------------------------------------------------------- contact sheet


def test_contact_sheet_is_a_png_of_the_right_size(tmp_path, images):
    wanted = list(range(23))
    [path] = write_contact_sheet(tmp_path / "to_label.png", images, wanted)
    cols, rows, cell_w, cell_h = sheet_geometry(23)
    assert (cols, rows) == (COLUMNS, 3) and TILE >= 96
    with Image.open(path) as sheet:
        assert sheet.format == "PNG" and sheet.size == (cols * cell_w, rows * cell_h)
        pixels = np.asarray(sheet.convert("L"))
    assert pixels.min() < 50  # digits and text are drawn on the white
    # The 8x8 first image fills its tile: enlarged x16 with nearest-neighbour.
    left = (cell_w - TILE) // 2
    tile = pixels[left:left + TILE, left:left + TILE]
    original = Image.open(images.paths[0]).convert("L")
    np.testing.assert_array_equal(tile, np.asarray(original.resize((TILE, TILE), Image.NEAREST)))
    assert np.all(pixels[-cell_h:, -cell_w:] == 255)  # 7 empty cells end the last row


def test_many_images_make_several_sheets_and_stale_ones_go(tmp_path, images):
    sheet = tmp_path / "round-1" / "to_label.png"
    paths = write_contact_sheet(sheet, images, range(25), per_sheet=10)
    assert [os.path.basename(p) for p in paths] == ["to_label.png", "to_label-2.png",
                                                    "to_label-3.png"]
    with Image.open(paths[2]) as last:
        assert last.size[1] == sheet_geometry(5)[3]
    assert write_contact_sheet(sheet, images, range(5), per_sheet=10) == [str(sheet)]
    assert os.listdir(tmp_path / "round-1") == ["to_label.png"]


def test_contact_sheet_of_array_images_and_refusal_for_tables(tmp_path, table):
    images, targets = digits()
    np.savez(tmp_path / "d.npz", x=images, y=np.array(NAMES)[targets])
    [path] = write_contact_sheet(tmp_path / "s.png", read_user_data(tmp_path / "d.npz"), [0, 1])
    with Image.open(path) as sheet:
        assert sheet.size == (2 * sheet_geometry(2)[2], sheet_geometry(2)[3])
    with pytest.raises(ValueError, match="needs images"):
        write_contact_sheet(tmp_path / "t.png", table, [0])


# ----------------------------------------------------------------------------- reading labels


def test_labels_by_name_and_by_integer_id_align_with_the_request(tmp_path, images):
    wanted = [5, 0, 17, 29]
    asked = write_to_label(tmp_path / "to_label.csv", images, wanted)
    answers = fill(asked, tmp_path / "answers.csv", ["zero", "1", "two", "0"], order=[3, 1, 0, 2])
    labels = read_labels(answers, images, wanted)
    assert labels.dtype == np.int32 and list(labels) == [2, 1, 1, 0]  # one, two, zero


def test_a_plain_two_column_file_works(tmp_path, table):
    path = tmp_path / "labels.csv"
    path.write_text("id,label\n4,b\n\n1,a\n")
    assert list(read_labels(path, table, [1, 4])) == [0, 1]


def test_other_columns_header_case_semicolons_and_bom_are_fine(tmp_path, table):
    path = tmp_path / "labels.csv"
    path.write_bytes("\ufeffnote;Label;ID\nsure;b;2\n;a;5\n".encode("utf-8"))
    assert list(read_labels(path, table, [5, 2])) == [0, 1]


BAD = {  # name: (labels file body after the header "id,label", requested, words)
    "missing requested id": ("0,a\n", [0, 1, 3], ["no label for 2 of the 3 requested ids: 1, 3"]),
    "repeated id": ("0,a\n1,b\n\n0,b\n", [0, 1], ["line 5", "id '0' repeats line 2"]),
    "id not asked for": ("0,a\n2,a\n", [0], ["line 3", "id '2' was not asked for in this round"]),
    "id not in the data": ("0,a\nzz,a\n", [0], ["line 3", "id 'zz' was not asked for",
                                                "not in"]),
    "empty label": ("0,a\n1,\n", [0, 1], ["line 3", "id '1' has no label"]),
    "missing label field": ("0\n", [0], ["line 2", "id '0' has no label"]),
    "empty id": ("0,a\n,b\n", [0], ["line 3", "empty id"]),
    "unknown class": ("0,bb\n", [0], ["line 2", "label 'bb' is not a class", "a, b",
                                      "ids 0-1", "did you mean 'b'?"]),
    "class id out of range": ("0,2\n", [0], ["line 2", "label '2' is not a class"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_labels_file_is_one_clear_line(tmp_path, table, case):
    body, requested, words = BAD[case]
    path = tmp_path / "labels.csv"
    path.write_text("id,label\n" + body)
    with pytest.raises(UserDataError) as info:
        read_labels(path, table, requested)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("text, words", [
    ("", ["empty file"]),
    ("id,answer\n0,a\n", ["line 1", "no 'label' column", "id, answer"]),
    ("label,label,id\n", ["more than one 'label' column"]),
    ("0,a\n", ["no 'id' column", "header"]),
])
def test_bad_labels_header(tmp_path, table, text, words):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(UserDataError) as info:
        read_labels(path, table, [0])
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_missing_labels_file(tmp_path, table):
    with pytest.raises(UserDataError, match="nope.csv: cannot read"):
        read_labels(tmp_path / "nope.csv", table, [0])
