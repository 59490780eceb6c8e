"""--train-size: a seeded, stratified subsample of the training split, checked before training."""

import dataclasses

import numpy as np
import pytest

from experiments import run
from experiments.config import ExperimentConfig
from experiments.problem import make_problem, subsample
from test_idx import write_set


def _labels():
    return np.repeat(np.arange(4), [40, 30, 20, 10])  # 100 labels, uneven classes


@pytest.mark.parametrize("size, counts", [(50, [20, 15, 10, 5]), (10, [4, 3, 2, 1]),
                                          (100, [40, 30, 20, 10])])
def test_subsample_keeps_class_shares(size, counts):
    kept = subsample(_labels(), size, seed=0)
    assert kept.size == size and np.all(np.diff(kept) > 0)
    assert np.bincount(_labels()[kept], minlength=4).tolist() == counts


def test_subsample_same_seed_same_subsample():
    a, b, c = (subsample(_labels(), 30, seed=s) for s in (4, 4, 5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_subsample_larger_than_the_split_is_an_error():
    with pytest.raises(ValueError, match=r"--train-size\) 101 must be at most the 100"):
        subsample(_labels(), 101, seed=0, dataset="x")


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_validate_names_the_flag(value):
    cfg = ExperimentConfig(train_size=value)
    with pytest.raises(ValueError, match="--train-size must be a positive integer"):
        cfg.validate({"train_size": "--train-size"})


@pytest.fixture()
def fashion_dir(tmp_path):
    write_set(tmp_path, n_train=200, n_test=20, size=(28, 28))
    return str(tmp_path)


def test_problem_is_the_subsample_then_the_noise(fashion_dir):
    cfg = ExperimentConfig(dataset="fashion_mnist", data_dir=fashion_dir, train_size=50)
    full = make_problem(dataclasses.replace(cfg, train_size=None), seed=1)
    p, again = make_problem(cfg, seed=1), make_problem(cfg, seed=1)
    assert len(p.y_noisy) == 50 and np.bincount(p.y_clean).tolist() == [5] * 10
    np.testing.assert_array_equal(p.x_train, again.x_train)
    np.testing.assert_array_equal(p.y_noisy, again.y_noisy)
    # The examples kept are training examples with their clean labels; noise comes after.
    kept = subsample(full.y_clean, 50, seed=1)
    np.testing.assert_array_equal(p.x_train, full.x_train[kept])
    np.testing.assert_array_equal(p.y_clean, full.y_clean[kept])
    assert abs(p.noise_rate - cfg.rate) <= 0.1
    # The evaluation splits are untouched; the whole split as train_size changes nothing.
    np.testing.assert_array_equal(p.x_test, full.x_test)
    whole = make_problem(dataclasses.replace(cfg, train_size=200), seed=1)
    np.testing.assert_array_equal(whole.y_noisy, full.y_noisy)


@pytest.mark.parametrize("size, words", [
    ("201", "--train-size) 201 must be at most the 200 examples"),
    ("0", "--train-size must be a positive integer")])
def test_cli_refuses_a_bad_train_size_before_training(fashion_dir, tmp_path, capsys, size,
                                                      words):
    code = run.main(["--preset", "fashion", "--data-dir", fashion_dir, "--train-size", size,
                     "--methods", "random", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and words in err
    assert len(err.strip().splitlines()) == 1
