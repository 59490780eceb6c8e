"""Tests for pivotal.selection (paper Algorithm 2, selection step)."""

import warnings

import jax
import numpy as np
import pytest

from pivotal.selection import remaining_candidates, select_meta_samples
from test_kmeans import planted_lines


@pytest.fixture(scope="module")
def data():
    return planted_lines(np.random.default_rng(0), 480, 12, 6, dtype=np.float32)


def test_planted_clusters_give_one_pick_per_cluster(data):
    X, labels = data
    idx = select_meta_samples(X, 6, jax.random.key(0))
    assert idx.dtype == np.int32
    assert sorted(labels[idx].tolist()) == list(range(6))
    # Each pick is the member best aligned with its planted line (|cos| close to 1).
    cos_to_line = []
    for j in idx:
        members = X[labels == labels[j]]
        u = members / np.linalg.norm(members, axis=1, keepdims=True)
        top = np.linalg.svd(u, full_matrices=False)[2][0]
        cos_to_line.append(abs(X[j] @ top) / np.linalg.norm(X[j]))
    assert min(cos_to_line) > 0.99


def test_unique_within_budget_and_disjoint_from_existing(data):
    X, _ = data
    existing = np.array([3, 17, 200, 401])
    for budget in (1, 5, 12):
        idx = select_meta_samples(X, budget, jax.random.key(budget), existing=existing)
        assert 1 <= idx.size <= budget
        assert np.unique(idx).size == idx.size
        assert not np.isin(idx, existing).any()
        assert ((idx >= 0) & (idx < X.shape[0])).all()


def test_same_key_same_result(data):
    X, _ = data
    a = select_meta_samples(X, 8, jax.random.key(3), existing=[1, 2])
    b = select_meta_samples(X, 8, jax.random.key(3), existing=[1, 2])
    np.testing.assert_array_equal(a, b)


def _kept_by_numpy(X, existing, fraction):
    """numpy recomputation of the candidates left after the S1 exclusion."""
    cand = np.setdiff1d(np.arange(X.shape[0]), existing)
    Xc, E = X[cand].astype(np.float64), X[existing].astype(np.float64)
    # S1: ||G_e|| |cos(G_j, G_e)| = |<G_j, G_e>| / ||G_j||, maximised over existing e.
    sim = (np.abs(Xc @ E.T) / np.linalg.norm(Xc, axis=1)[:, None]).max(axis=1)
    k = int(np.floor(fraction * cand.size))
    return np.sort(cand[np.argsort(-sim, kind="stable")[k:]]), sim


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.75])
def test_exclude_fraction_removes_exactly_the_most_similar(data, fraction):
    X, _ = data
    existing = np.random.default_rng(1).choice(X.shape[0], 10, replace=False)
    expected, sim = _kept_by_numpy(X, existing, fraction)
    assert np.unique(sim).size == sim.size  # no ties: "the most similar" is well defined
    kept = remaining_candidates(X, existing=existing, exclude_fraction=fraction)
    np.testing.assert_array_equal(kept, expected)
    # Selection only ever picks from the remaining candidates, and its budget check uses them.
    idx = select_meta_samples(X, 20, jax.random.key(0), existing=existing, exclude_fraction=fraction)
    assert np.isin(idx, kept).all()
    with pytest.raises(ValueError, match="budget"):
        select_meta_samples(X, kept.size + 1, jax.random.key(0), existing=existing,
                            exclude_fraction=fraction)


def test_exclusion_end_to_end_on_nearly_orthogonal_rows():
    # Row j >= 2 is mostly its own axis e_j plus a little of e_0 and e_1 (the existing rows), so
    # K-means with budget = #kept makes every kept row its own cluster and must return exactly
    # the kept set; which rows are kept depends only on the S1 exclusion.
    n = 24
    rng = np.random.default_rng(2)
    X = np.eye(n) * rng.uniform(1, 2, n)[:, None]
    X[2:, :2] = rng.uniform(0, 0.2, (n - 2, 2))
    X = X.astype(np.float32)
    existing = np.array([0, 1])
    expected, _ = _kept_by_numpy(X, existing, 0.5)
    idx = select_meta_samples(X, expected.size, jax.random.key(0), existing=existing)
    np.testing.assert_array_equal(np.sort(idx), expected)


def test_zero_rows_warn_and_are_never_picked(data):
    X, _ = data
    X = X.copy()
    X[[5, 6, 7]] = 0.0
    with pytest.warns(UserWarning, match="all-zero"):
        idx = select_meta_samples(X, 6, jax.random.key(0))
    assert not np.isin(idx, [5, 6, 7]).any()


def test_no_warning_without_zero_rows(data):
    X, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select_meta_samples(X, 6, jax.random.key(0))


def test_unweighted_path(data):
    X, labels = data
    idx = select_meta_samples(X, 6, jax.random.key(0), weighted=False)
    assert sorted(labels[idx].tolist()) == list(range(6))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(features=np.array([[1.0, np.nan], [0.0, 1.0]])), ValueError, "features contains NaN"),
        (dict(features=np.array([[1.0, np.inf], [0.0, 1.0]])), ValueError, "features contains NaN"),
        (dict(features=np.ones(4)), ValueError, "features must be a 2-D"),
        (dict(budget=0), ValueError, "budget"),
        (dict(budget=11), ValueError, "budget"),
        (dict(budget=1.5), TypeError, "budget"),
        (dict(existing=[0, 10]), ValueError, "existing"),
        (dict(existing=[-1]), ValueError, "existing"),
        (dict(existing=[2, 2]), ValueError, "existing"),
        (dict(existing=[0.0]), TypeError, "existing"),
        (dict(exclude_fraction=1.0), ValueError, "exclude_fraction"),
        (dict(exclude_fraction=-0.1), ValueError, "exclude_fraction"),
        (dict(key=None), TypeError, "key"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(kwargs, exc, match):
    args = dict(features=np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32), budget=2,
                key=jax.random.key(0))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        select_meta_samples(args.pop("features"), args.pop("budget"), args.pop("key"), **args)
