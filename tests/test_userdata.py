"""experiments/userdata.py: a user's image folder, .npz or .csv read into UserData.

Data are built in tmp_path from scikit-learn's 8x8 digits (0, 1, 2 only): PNGs in class
folders, the same as an .npz with string labels and ids, and small CSVs. Every bad input
of issue 16 is one case of a table, refused with a one-line UserDataError naming the file.
"""

import functools
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from experiments import userdata
from experiments.userdata import (UserData, UserDataError, data_hash, match_class,
                                  parse_image_size, read_user_data)

NAMES = ("zero", "one", "two")  # folder names; classes sort to one, two, zero


@functools.lru_cache(maxsize=1)
def digits():
    """30 digit images (uint8, 8x8; ten each of 0, 1, 2) and their digits."""
    data = load_digits()
    keep = np.concatenate([np.flatnonzero(data.target == d)[:10] for d in range(3)])
    return (data.images[keep] * 15).astype(np.uint8), data.target[keep]


def write_folder(root, images=None, targets=None):
    images, targets = digits() if images is None else (images, targets)
    for i, (image, target) in enumerate(zip(images, targets)):
        os.makedirs(root / NAMES[target], exist_ok=True)
        Image.fromarray(image).save(root / NAMES[target] / f"img{i:03d}.png")
    return root


def write_csv(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- image folders


def test_image_folder_arrays_classes_ids(tmp_path):
    images, targets = digits()
    data = read_user_data(write_folder(tmp_path / "train"))
    assert isinstance(data, UserData) and data.kind == "images" and len(data) == 30
    assert data.x.shape == (30, 8, 8, 1) and data.x.dtype == np.float32
    assert data.y.dtype == np.int32
    assert data.class_names == ("one", "two", "zero")
    assert data.ids[0] == "one/img010.png" and data.ids == tuple(sorted(data.ids))
    for i, ident in enumerate(data.ids):
        k = int(ident[-7:-4])
        assert data.given_label(i) == NAMES[targets[k]]
        np.testing.assert_allclose(data.x[i] * data.std + data.mean, images[k][..., None] / 255,
                                   atol=1e-5)
    assert data.paths[0] == str(tmp_path / "train" / "one" / "img010.png")
    np.testing.assert_allclose(data.x.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(data.x.std(), 1, atol=1e-4)
    assert data.mean.shape == data.std.shape == (1,)
    assert data.content_hash == data_hash(tmp_path / "train")
    assert data.index_of["two/img025.png"] == data.ids.index("two/img025.png")


@pytest.mark.parametrize("size", [(16, 12), "16x12", [16, 12]])
def test_image_size_resizes(tmp_path, size):
    data = read_user_data(write_folder(tmp_path), image_size=size)
    assert data.x.shape == (30, 16, 12, 1)


def test_mixed_sizes_resized_when_a_size_is_given(tmp_path):
    write_folder(tmp_path)
    Image.new("L", (20, 10), 255).save(tmp_path / "one" / "big.png")
    data = read_user_data(tmp_path, image_size=(8, 8))
    i = data.index_of["one/big.png"]
    np.testing.assert_allclose(data.x[i] * data.std + data.mean, 1.0, atol=1e-5)


def test_colour_modes_make_rgb_and_grey_is_replicated(tmp_path):
    write_folder(tmp_path)
    Image.new("RGBA", (8, 8), (255, 0, 0, 10)).save(tmp_path / "one" / "rgba.png")
    Image.new("P", (8, 8), 3).save(tmp_path / "two" / "palette.png")
    Image.new("RGB", (8, 8), (0, 128, 255)).save(tmp_path / "two" / "photo.jpg", quality=100)
    data = read_user_data(tmp_path)
    raw = data.x * data.std + data.mean
    assert data.x.shape == (33, 8, 8, 3) and data.mean.shape == (3,)
    red = np.broadcast_to([1, 0, 0], (8, 8, 3))
    np.testing.assert_allclose(raw[data.index_of["one/rgba.png"]], red, atol=1e-5)  # alpha dropped
    grey = raw[data.index_of["one/img010.png"]]
    np.testing.assert_allclose(grey[..., 0], grey[..., 2], atol=1e-5)
    np.testing.assert_allclose(raw[data.index_of["two/photo.jpg"]].mean((0, 1)),
                               [0, 128 / 255, 1], atol=0.02)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    for name, value in (("a", 1000), ("b", 65535)):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((4, 4), value, np.uint16)).save(tmp_path / name / "x.png")
    data = read_user_data(tmp_path)
    np.testing.assert_allclose((data.x * data.std + data.mean)[:, 0, 0, 0],
                               [1000 / 65535, 1], rtol=1e-4)


def test_subfolders_belong_to_their_class_and_other_files_are_skipped(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "one" / "more").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "one" / "more" / "deep.PNG")
    (tmp_path / "one" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / ".hidden" / "x.png")
    Image.new("L", (8, 8)).save(tmp_path / "two" / ".thumb.png")
    (tmp_path / "README.md").write_text("about the data")
    data = read_user_data(tmp_path)
    assert len(data) == 31 and data.class_names == ("one", "two", "zero")
    assert data.given_label(data.index_of["one/more/deep.PNG"]) == "one"


# ----------------------------------------------------------------------------- .npz and .csv


def test_npz_with_string_labels_and_ids_matches_the_folder(tmp_path):
    images, targets = digits()
    folder = read_user_data(write_folder(tmp_path / "f"))
    ids = [f"{NAMES[t]}/img{i:03d}.png" for i, t in enumerate(targets)]
    np.savez(tmp_path / "d.npz", x=images / 255, y=np.array(NAMES)[targets], ids=np.array(ids))
    data = read_user_data(tmp_path / "d.npz")
    assert data.kind == "array" and data.paths is None and data.ids == tuple(ids)
    assert data.class_names == folder.class_names
    assert data.x.shape == (30, 8, 8, 1)  # (N, H, W) gets a channel axis
    order = [folder.index_of[i] for i in ids]
    np.testing.assert_array_equal(data.y, folder.y[order])
    np.testing.assert_allclose(data.x, folder.x[order], atol=1e-4)


def test_npz_integer_labels_with_and_without_class_names(tmp_path):
    x = np.arange(12.0).reshape(6, 2)
    np.savez(tmp_path / "named.npz", x=x, y=[0, 1, 2, 2, 1, 0], class_names=["c", "a", "b"])
    named = read_user_data(tmp_path / "named.npz")
    assert named.class_names == ("c", "a", "b") and list(named.y) == [0, 1, 2, 2, 1, 0]
    assert named.ids == ("0", "1", "2", "3", "4", "5") and named.x.shape == (6, 2)
    np.savez(tmp_path / "plain.npz", x=np.arange(4), y=[10, 2, 9, 2])
    plain = read_user_data(tmp_path / "plain.npz")
    assert plain.class_names == ("2", "9", "10") and list(plain.y) == [2, 0, 1, 0]
    assert plain.x.shape == (4, 1)


def test_csv_features_label_and_id_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", "id,f1,label,f2\nr1,1,b,2\n\nr2,3.5,a,-4\nr3,5,b,1e1\n")
    data = read_user_data(path)
    assert data.kind == "table" and data.ids == ("r1", "r2", "r3") and data.paths is None
    assert data.class_names == ("a", "b") and list(data.y) == [1, 0, 1]
    raw = data.x * data.std + data.mean
    np.testing.assert_allclose(raw, [[1, 2], [3.5, -4], [5, 10]], rtol=1e-6)
    np.testing.assert_allclose(data.x.mean(0), 0, atol=1e-6)


def test_csv_label_column_row_ids_semicolons_and_bom(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("\ufeffa;klass\n1;x\n2;y\n2;y\n".encode("utf-8"))
    data = read_user_data(path, label_column="klass")
    assert data.ids == ("0", "1", "2") and data.class_names == ("x", "y")
    assert data.std[0] > 0 and data.x.shape == (3, 1)


def test_statistics_merged_over_chunks_match_numpy(tmp_path, monkeypatch):
    images, _ = digits()
    monkeypatch.setattr(userdata, "_CHUNK", 7)  # 1920 pixels in 275 uneven chunks
    data = read_user_data(write_folder(tmp_path))
    np.testing.assert_allclose(data.mean, [images.mean() / 255], rtol=1e-6)
    np.testing.assert_allclose(data.std, [images.std() / 255], rtol=1e-5)


def test_constant_feature_keeps_std_one(tmp_path):
    data = read_user_data(write_csv(tmp_path / "t.csv", "f,g,label\n1,7,a\n2,7,b\n"))
    assert data.std[1] == 1 and np.all(data.x[:, 1] == 0)


# ----------------------------------------------------------------------------- val/test files


def test_like_uses_the_training_classes_size_and_statistics(tmp_path):
    train = read_user_data(write_folder(tmp_path / "train"))
    images, targets = digits()
    (tmp_path / "val" / "one").mkdir(parents=True)
    bigger_rgb = Image.fromarray(images[12]).resize((16, 16)).convert("RGB")
    bigger_rgb.save(tmp_path / "val" / "one" / "a.png")
    val = read_user_data(tmp_path / "val", like=train)  # one class only: fine for a val set
    assert val.class_names == train.class_names and list(val.y) == [0]
    assert val.x.shape == (1, 8, 8, 1)
    np.testing.assert_array_equal(val.mean, train.mean)


def test_class_names_match_names_then_integer_ids(tmp_path):
    path = write_csv(tmp_path / "v.csv", "f,label\n1,b\n2,0\n3,2\n")
    data = read_user_data(path, class_names=["a", "b", "c"])
    assert list(data.y) == [1, 0, 2] and data.class_names == ("a", "b", "c")
    assert match_class("1", ["1", "0"]) == 0 and match_class("1", ["a", "b"]) == 1
    assert match_class("2", ["a", "b"]) is None and match_class("-1", ["a", "b"]) is None


def test_parse_image_size():
    assert parse_image_size("32x48") == (32, 48) and parse_image_size(" 7 X 9 ") == (7, 9)
    for bad in ("32", "0x4", "axb", "3x4x5"):
        with pytest.raises(UserDataError, match="HxW"):
            parse_image_size(bad)


# ----------------------------------------------------------------------------- content hash


def test_hash_changes_when_one_byte_changes(tmp_path):
    path = write_csv(tmp_path / "t.csv", "f,label\n1,a\n2,b\n")
    before = data_hash(path)
    assert before == data_hash(path) and len(before) == 64
    path.write_text("f,label\n1,a\n3,b\n")
    assert data_hash(path) != before


def test_folder_hash_sees_a_byte_a_rename_and_a_move(tmp_path):
    write_folder(tmp_path)
    before = data_hash(tmp_path)
    image = tmp_path / "one" / "img010.png"
    original = image.read_bytes()
    image.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert data_hash(tmp_path) != before
    image.write_bytes(original)
    assert data_hash(tmp_path) == before
    (tmp_path / "notes.txt").write_text("not data")
    assert data_hash(tmp_path) == before  # only the images count
    os.rename(image, tmp_path / "two" / "img010.png")
    assert data_hash(tmp_path) != before


# ----------------------------------------------------------------------------- bad input


def _npz(tmp_path, **arrays):
    np.savez(tmp_path / "d.npz", **arrays)
    return tmp_path / "d.npz"


def _folder_with(tmp_path, name, content):
    write_folder(tmp_path)
    target = tmp_path / "one" / name
    target.write_bytes(content(target) if callable(content) else content)
    return tmp_path


def _truncated_png(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), np.uint8)).save(path)
    return path.read_bytes()[:60]  # the header survives, the pixels do not


def _two_sizes(tmp_path):
    write_folder(tmp_path)
    Image.new("L", (9, 8)).save(tmp_path / "two" / "odd.png")
    return tmp_path


def _val_folder(tmp_path):
    write_folder(tmp_path / "train")
    (tmp_path / "val" / "eight").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "val" / "eight" / "a.png")
    return tmp_path / "val", {"class_names": NAMES}


def _one_image_in_root(tmp_path):
    write_folder(tmp_path)
    Image.new("L", (8, 8)).save(tmp_path / "stray.png")
    return tmp_path


X4 = np.zeros((4, 2))
BAD = {  # name: (build(tmp_path) -> path or (path, kwargs), words the message must hold)
    "one class in a folder": (
        lambda t: write_folder(t, *[a[digits()[1] == 1] for a in digits()]),
        ["one class", "'one'", "two classes"]),
    "one class in a csv": (lambda t: write_csv(t / "d.csv", "f,label\n1,a\n2,a\n"), ["one class"]),
    "unreadable image": (lambda t: _folder_with(t, "bad.png", b"not a png"),
                         ["bad.png", "cannot read the image"]),
    "truncated image": (lambda t: _folder_with(t, "cut.png", _truncated_png),
                        ["cut.png", "cannot read the image"]),
    "mixed sizes, no size": (_two_sizes, ["differ in size", "odd.png is 8x9", "--image-size"]),
    "non-numeric feature": (lambda t: write_csv(t / "d.csv", "f1,f2,label\n1,2,a\n3,abc,b\n"),
                            ["line 3, column 'f2'", "'abc' is not a finite number"]),
    "empty feature": (lambda t: write_csv(t / "d.csv", "f1,f2,label\n1,,a\n3,4,b\n"),
                      ["line 2, column 'f2'", "''"]),
    "nan feature": (lambda t: write_csv(t / "d.csv", "f1,label\n1,a\nnan,b\n"),
                    ["line 3", "'nan' is not a finite number"]),
    "missing label column": (lambda t: write_csv(t / "d.csv", "f1,target\n1,a\n2,b\n"),
                             ["line 1", "no label column 'label'", "f1, target", "--label-column"]),
    "missing named label column": (lambda t: (write_csv(t / "d.csv", "f1,label\n1,a\n2,b\n"),
                                              {"label_column": "cls"}), ["no label column 'cls'"]),
    "short csv row": (lambda t: write_csv(t / "d.csv", "f1,f2,label\n1,2,a\n3,b\n"),
                      ["line 3", "2 fields", "has 3"]),
    "empty csv label": (lambda t: write_csv(t / "d.csv", "f1,label\n1,a\n2, \n"),
                        ["line 3", "empty label"]),
    "no feature columns": (lambda t: write_csv(t / "d.csv", "id,label\nx,a\ny,b\n"),
                           ["no feature columns"]),
    "repeated csv id": (lambda t: write_csv(t / "d.csv", "id,f,label\nx,1,a\ny,2,b\n\nx,3,b\n"),
                        ["line 5", "id 'x' repeats line 2", "unique"]),
    "repeated csv column": (lambda t: write_csv(t / "d.csv", "f,f,label\n1,2,a\n"),
                            ["column 'f' appears more than once"]),
    "header only csv": (lambda t: write_csv(t / "d.csv", "f,label\n"), ["no examples"]),
    "empty csv": (lambda t: write_csv(t / "d.csv", "\n\n"), ["empty file"]),
    "npz without x": (lambda t: _npz(t, y=[0, 1]), ["no x array", "y"]),
    "npz without x or y": (lambda t: _npz(t, z=[0, 1]), ["no x or y array"]),
    "npz lengths differ": (lambda t: _npz(t, x=np.zeros((5, 2)), y=[0, 1, 0, 1]),
                           ["x has 5 examples but y has 4"]),
    "npz ids not unique": (lambda t: _npz(t, x=X4, y=[0, 1, 0, 1], ids=["a", "b", "c", "a"]),
                           ["entry 3 (id 'a')", "repeats entry 0"]),
    "npz ids wrong length": (lambda t: _npz(t, x=X4, y=[0, 1, 0, 1], ids=["a", "b"]),
                             ["ids has 2 entries but y has 4"]),
    "npz empty id": (lambda t: _npz(t, x=X4, y=[0, 1, 0, 1], ids=["a", "", "c", "d"]),
                     ["entry 1", "empty id"]),
    "npz nan x": (lambda t: _npz(t, x=np.array([[0.0], [np.nan], [1], [2]]), y=[0, 1, 0, 1]),
                  ["entry 1", "NaN or infinite"]),
    "npz float labels": (lambda t: _npz(t, x=X4, y=[0.5, 1, 0, 1]), ["integers or strings"]),
    "npz string x": (lambda t: _npz(t, x=np.array(["a", "b"]), y=[0, 1]), ["not numbers"]),
    "npz label beyond class_names": (
        lambda t: _npz(t, x=X4, y=[0, 1, 2, 1], class_names=["a", "b"]),
                                     ["y[2] = 2", "2 class_names"]),
    "npz label not in class_names": (
        lambda t: _npz(t, x=X4, y=["a", "b", "zz", "a"], class_names=["a", "b"]),
        ["entry 2", "class 'zz' is not one of the file's class_names"]),
    "npz empty": (lambda t: _npz(t, x=np.zeros((0, 2)), y=np.zeros(0, int)), ["no examples"]),
    "not an npz": (lambda t: write_csv(t / "d.npz", "just text"), ["cannot read the .npz file"]),
    "empty folder": (lambda t: (t / "none").mkdir() or t, ["no images", "<class name>"]),
    "image outside a class folder": (_one_image_in_root,
                                     ["stray.png", "not inside a class folder"]),
    "no such path": (lambda t: t / "missing.csv", ["no such file or folder"]),
    "unknown format": (lambda t: write_csv(t / "d.txt", "x"),
                       ["not an image folder, .npz or .csv"]),
    "val class not in training (folder)": (
        _val_folder, ["image eight/a.png", "class 'eight' is not one of the training data",
                      "(zero, one, two)"]),
    "val class not in training (csv)": (
        lambda t: (write_csv(t / "v.csv", "f,label\n1,a\n2,q\n"), {"class_names": ["a", "b"]}),
        ["line 3", "class 'q'"]),
    "val class not in training (npz)": (
        lambda t: (_npz(t, x=X4, y=["a", "b", "a", "c"]), {"class_names": ["a", "b"]}),
        ["entry 3 (id '3')", "class 'c'"]),
    "bad image size": (lambda t: (write_folder(t), {"image_size": "8"}), ["'8'", "HxW"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line(tmp_path, case):
    build, words = BAD[case]
    built = build(tmp_path)
    path, kwargs = built if isinstance(built, tuple) else (built, {})
    with pytest.raises(UserDataError) as info:
        read_user_data(path, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    if case != "bad image size":
        assert str(path) in message
    for word in words:
        assert word in message, (word, message)


def test_like_refuses_examples_of_another_shape(tmp_path):
    train = read_user_data(write_csv(tmp_path / "t.csv", "f,g,label\n1,2,a\n3,4,b\n"))
    val = write_csv(tmp_path / "v.csv", "f,label\n1,a\n")
    with pytest.raises(UserDataError, match=r"v.csv: examples have shape \(1,\) but .* \(2,\)"):
        read_user_data(val, like=train)
