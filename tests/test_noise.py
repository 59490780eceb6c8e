"""Tests for experiments.noise: injectors, imbalance, label files, validation."""

import numpy as np
import pytest

from experiments import noise

K = 10


def _balanced(per_class=500, num_classes=K, seed=0):
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def _binomial_tolerance(n, p, sigmas=4.0):
    return sigmas * np.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------- uniform

@pytest.mark.parametrize("rate", [0.2, 0.6, 0.8])
def test_uniform_rate_within_binomial_tolerance(rate):
    clean = _balanced()
    out = noise.uniform(clean, rate, K, seed=1)
    assert out.labels.dtype == np.int32 and out.labels.shape == clean.shape
    assert np.array_equal(out.is_noisy, out.labels != clean)
    assert out.rate == pytest.approx(out.is_noisy.mean())
    assert abs(out.rate - rate) < _binomial_tolerance(clean.size, rate)


def test_uniform_targets_are_uniform_over_other_classes():
    clean = np.zeros(20000, np.int64)
    out = noise.uniform(clean, 0.5, K, seed=2)
    targets = np.bincount(out.labels[out.is_noisy], minlength=K)
    assert targets[0] == 0
    share = targets[1:] / targets.sum()
    assert np.all(np.abs(share - 1 / 9) < _binomial_tolerance(targets.sum(), 1 / 9))


def test_uniform_include_true_shrinks_rate_by_k_minus_one_over_k():
    clean = _balanced()
    out = noise.uniform(clean, 0.6, K, seed=3, include_true=True)
    expected = 0.6 * (K - 1) / K
    assert abs(out.rate - expected) < _binomial_tolerance(clean.size, expected)


def test_uniform_zero_rate_and_determinism():
    clean = _balanced(50)
    assert noise.uniform(clean, 0.0, K, seed=0).rate == 0.0
    a, b, c = (noise.uniform(clean, 0.4, K, seed=s) for s in (7, 7, 8))
    assert np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


# ---------------------------------------------------------------- adversarial

@pytest.mark.parametrize("rate,n", [(0.6, 5000), (0.25, 999), (0.8, 10)])
def test_adversarial_rate_is_exact_and_default_map_is_next_class(rate, n):
    clean = _balanced(n // K + 1)[:n]
    out = noise.adversarial(clean, rate, K, seed=4)
    assert out.is_noisy.sum() == round(rate * n)
    assert out.rate == round(rate * n) / n
    hit = out.is_noisy
    assert np.array_equal(out.labels[hit], (clean[hit] + 1) % K)
    assert np.array_equal(out.labels[~hit], clean[~hit])


def test_adversarial_honours_custom_mapping():
    mapping = np.array([3, 0, 1, 2])
    clean = _balanced(100, num_classes=4)
    out = noise.adversarial(clean, 0.5, 4, seed=5, mapping=mapping)
    assert np.array_equal(out.labels[out.is_noisy], mapping[clean[out.is_noisy]])
    assert out.is_noisy.sum() == 200


def test_adversarial_determinism():
    clean = _balanced(30)
    a, b, c = (noise.adversarial(clean, 0.4, K, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.labels, b.labels) and not np.array_equal(a.labels, c.labels)


def test_adversarial_mapping_errors():
    clean = _balanced(5, num_classes=3)
    with pytest.raises(ValueError, match=r"mapping.*fixed points at classes \[1\]"):
        noise.adversarial(clean, 0.5, 3, seed=0, mapping=[2, 1, 0])
    with pytest.raises(ValueError, match=r"mapping must be an int array of shape \(3,\)"):
        noise.adversarial(clean, 0.5, 3, seed=0, mapping=[1, 0])
    with pytest.raises(ValueError, match="mapping values"):
        noise.adversarial(clean, 0.5, 3, seed=0, mapping=[1, 2, 3])


# ---------------------------------------------------------------- imbalance

def test_long_tailed_counts_profile():
    counts = noise.long_tailed_counts(5000, 200, 10)
    assert counts[0] == 5000 and counts[-1] == 25  # n_max / factor at the tail
    expected = np.floor(5000 * 200.0 ** (-np.arange(10) / 9) + 1e-9)
    assert np.array_equal(counts, expected)
    assert np.all(np.diff(counts) <= 0)
    assert noise.long_tailed_counts(10, 1e6, 3).tolist() == [10, 1, 1]  # never empty


@pytest.mark.parametrize("factor", [1, 10, 100])
def test_long_tailed_keeps_exact_counts(factor):
    clean = _balanced(500)
    kept = noise.long_tailed(clean, factor, K, seed=0)
    assert kept.dtype == np.int64 and np.all(np.diff(kept) > 0)
    expected = np.floor(500 * float(factor) ** (-np.arange(K) / (K - 1)) + 1e-9)
    assert np.array_equal(np.bincount(clean[kept], minlength=K), expected)


def test_long_tailed_largest_class_sets_n_max_and_small_classes_keep_all():
    clean = np.concatenate([np.full(100, 0), np.full(100, 1), np.full(3, 2)])
    kept = noise.long_tailed(clean, 4, 3, seed=0)
    # targets floor(100 * 4 ** (-c / 2)) = 100, 50, 25; class 2 has only 3.
    assert np.bincount(clean[kept], minlength=3).tolist() == [100, 50, 3]


def test_long_tailed_determinism():
    clean = _balanced(100)
    a, b, c = (noise.long_tailed(clean, 10, K, seed=s) for s in (3, 3, 4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_long_tailed_noisy_combines_imbalance_then_noise():
    clean = _balanced(500)
    out = noise.long_tailed_noisy(clean, 100, 0.4, K, seed=0)
    expected = np.floor(500 * 100.0 ** (-np.arange(K) / (K - 1)) + 1e-9)
    assert np.array_equal(np.bincount(clean[out.indices], minlength=K), expected)
    assert np.array_equal(out.noisy.is_noisy, out.noisy.labels != clean[out.indices])
    m = out.indices.size
    assert abs(out.noisy.rate - 0.4) < _binomial_tolerance(m, 0.4)
    # The kept subset does not depend on the noise settings.
    other = noise.long_tailed_noisy(clean, 100, 0.2, K, seed=0, noise="adversarial")
    assert np.array_equal(other.indices, out.indices)
    assert other.noisy.is_noisy.sum() == round(0.2 * m)
    with pytest.raises(ValueError, match=r"noise must be one of \['uniform', 'adversarial'\]"):
        noise.long_tailed_noisy(clean, 100, 0.4, K, seed=0, noise="pair")


# ---------------------------------------------------------------- files

def test_from_file_npz_round_trip(tmp_path):
    clean = _balanced(20)
    worse = noise.uniform(clean, 0.4, K, seed=0).labels
    path = tmp_path / "cifar10n.npz"
    np.savez(path, clean_label=clean, worse_label=worse, aggre_label=clean)
    out = noise.from_file(path, key="worse_label")
    assert np.array_equal(out.labels, worse)
    assert out.rate == pytest.approx(np.mean(worse != clean))
    with pytest.raises(ValueError, match=r"key must name one of \['aggre_label', 'clean_label'"):
        noise.from_file(path)
    with pytest.raises(ValueError, match="key must be one of"):
        noise.from_file(path, key="random_label9")


def test_from_file_csv_and_npy(tmp_path):
    clean = np.array([0, 1, 2, 2, 1])
    noisy = np.array([0, 2, 2, 0, 1])
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("clean_label,noisy_label\n" + "".join(
        f"{c},{n}\n" for c, n in zip(clean, noisy)))
    out = noise.from_file(csv_path, key="noisy_label")
    assert out.labels.tolist() == noisy.tolist() and out.rate == pytest.approx(0.4)
    bare = tmp_path / "bare.csv"
    bare.write_text("".join(f"{n}\n" for n in noisy))
    from_bare = noise.from_file(bare, clean_labels=clean, num_classes=3)
    assert from_bare.labels.tolist() == noisy.tolist()
    npy = tmp_path / "labels.npy"
    np.save(npy, noisy)
    from_npy = noise.from_file(npy, clean_labels=clean)
    assert from_npy.is_noisy.tolist() == [False, True, False, True, False]


def test_from_file_errors(tmp_path):
    clean = np.array([0, 1, 1])
    npy = tmp_path / "short.npy"
    np.save(npy, np.array([0, 1]))
    with pytest.raises(ValueError, match="length 2, clean_labels 3"):
        noise.from_file(npy, clean_labels=clean)
    with pytest.raises(ValueError, match="clean_labels is required"):
        noise.from_file(npy)
    big = tmp_path / "big.npy"
    np.save(big, np.array([0, 1, 5]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        noise.from_file(big, clean_labels=clean)
    with pytest.raises(ValueError, match=r"path must end in one of \['.npz', '.npy', '.csv'\]"):
        noise.from_file(tmp_path / "labels.pt", clean_labels=clean)
    with pytest.raises(FileNotFoundError):
        noise.from_file(tmp_path / "absent.npz", clean_labels=clean)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, "0.2", None])
def test_bad_rate_names_rate(rate):
    with pytest.raises(ValueError, match="rate must be a number in"):
        noise.uniform([0, 1], rate, 2, seed=0)
    with pytest.raises(ValueError, match="rate must be a number in"):
        noise.adversarial([0, 1], rate, 2, seed=0)


@pytest.mark.parametrize("factor", [0.5, 0, -3, float("inf")])
def test_bad_factor(factor):
    with pytest.raises(ValueError, match="factor must be a finite number >= 1"):
        noise.long_tailed([0, 1], factor, 2, seed=0)


@pytest.mark.parametrize("labels,match", [
    ([0, 3], r"labels must lie in \[0, 3\)"),
    ([-1, 0], r"labels must lie in \[0, 3\)"),
    ([[0, 1]], "labels must be 1-D"),
    ([0.5, 1.0], "labels must hold integers"),
])
def test_bad_labels(labels, match):
    for call in (lambda: noise.uniform(labels, 0.1, 3, seed=0),
                 lambda: noise.adversarial(labels, 0.1, 3, seed=0),
                 lambda: noise.long_tailed(labels, 2, 3, seed=0)):
        with pytest.raises(ValueError, match=match):
            call()


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        noise.uniform([0, 0], 0.1, 1, seed=0)
