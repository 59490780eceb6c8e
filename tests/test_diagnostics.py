"""Tests for pivotal.diagnostics (Eq. 8-9, Theorem 1 / Table 4, Theorem 2 / Table 5)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pivotal.diagnostics import mco_objective, msso_objective, stable_examples, theorem1_ratio
from pivotal.kmeans import cluster_centroids, weighted_spherical_kmeans


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_msso_matches_definition(x64):
    rng = np.random.default_rng(0)
    G, meta = rng.standard_normal((57, 6)), rng.standard_normal((4, 6))
    expected = sum(abs(sum(G[j] @ meta[i] for i in range(4))) for j in range(57))
    np.testing.assert_allclose(msso_objective(jnp.asarray(G), jnp.asarray(meta)), expected, rtol=1e-12)


def test_mco_matches_definition(x64):
    rng = np.random.default_rng(1)
    G, C = rng.standard_normal((57, 6)), rng.standard_normal((4, 6))
    expected = np.abs(G @ C.T).sum()
    np.testing.assert_allclose(mco_objective(G, C, block_size=10), expected, rtol=1e-12)
    np.testing.assert_allclose(mco_objective(G, C), expected, rtol=1e-12)


def test_kmeans_objective_is_own_centroid_term_of_mco(x64):
    rng = np.random.default_rng(2)
    G = jnp.asarray(rng.standard_normal((300, 8)))
    res = weighted_spherical_kmeans(G, 5, jax.random.key(0))
    a = np.asarray(res.assignments)
    dots = np.asarray(G) @ np.asarray(res.centroids).T
    own = np.abs(dots[np.arange(300), a]).sum()
    np.testing.assert_allclose(res.objective, own, rtol=1e-12)
    # MCO sums |<G_j, C_i>| over every centroid, so it bounds the own-centroid objective.
    assert float(mco_objective(G, res.centroids)) > float(res.objective)


def _ratio_numpy(G, C):
    dots = G @ C.T
    pos = np.where(dots > 0, dots, 0).sum(1)
    neg = -np.where(dots < 0, dots, 0).sum(1)
    hi, lo = np.maximum(pos, neg), np.minimum(pos, neg)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(lo > 0, hi / lo, np.inf)


def test_theorem1_ratio_matches_definition(x64):
    rng = np.random.default_rng(3)
    G, C = rng.standard_normal((41, 5)), rng.standard_normal((6, 5))
    G[7] = 0.0  # no terms at all
    C_pos = np.abs(C)
    G[8] = np.abs(G[8])  # all terms positive against C_pos
    r = np.asarray(theorem1_ratio(G, C, block_size=16))
    chex.assert_shape(r, (41,))
    np.testing.assert_allclose(r, _ratio_numpy(G, C), rtol=1e-12)
    assert np.all(r >= 1)
    assert np.isinf(r[7])
    assert np.isinf(np.asarray(theorem1_ratio(G, C_pos))[8])


def _theorem1_lower_bound(D):
    return 1.0 if np.isinf(D) else (D - 1) / (D + 1)


def test_theorem1_bound_holds_on_random_data(x64):
    rng = np.random.default_rng(4)
    informative = 0
    for _ in range(8):
        # A shared direction plus noise makes one sign dominate for most examples, so D is
        # usually well above 1 and the bound says something.
        base = rng.standard_normal(10)
        base /= np.linalg.norm(base)
        G = 3.0 * base + 0.6 * rng.standard_normal((200, 10))
        C = base + 0.8 * rng.standard_normal((4, 10)) * 3 / np.sqrt(10)
        D = float(np.min(theorem1_ratio(G, C)))
        ratio = float(msso_objective(G, C) / mco_objective(G, C))
        assert _theorem1_lower_bound(D) <= ratio + 1e-12
        assert ratio <= 1 + 1e-12
        informative += 1.5 < D < np.inf
    assert informative >= 2


def test_theorem1_bound_is_tight_when_all_ratios_are_equal(x64):
    # Positive rescalings of one vector share D_j, and then MSSO / MCO = (D - 1) / (D + 1).
    rng = np.random.default_rng(5)
    g, C = rng.standard_normal(7), rng.standard_normal((5, 7))
    G = rng.uniform(0.5, 3.0, (9, 1)) * g
    r = np.asarray(theorem1_ratio(G, C))
    np.testing.assert_allclose(r, r[0], rtol=1e-12)
    assert np.isfinite(r[0]) and r[0] > 1
    np.testing.assert_allclose(float(msso_objective(G, C) / mco_objective(G, C)), (r[0] - 1) / (r[0] + 1),
                               rtol=1e-12)


def test_stable_examples_matches_numpy_assignment_comparison(x64):
    rng = np.random.default_rng(6)
    free = rng.standard_normal((120, 6))
    # Label-aware features: the label-free part minus a one-hot-like label term, as in Eq. S15.
    aware = free - 0.8 * np.eye(6)[rng.integers(0, 6, 120)]
    meta = np.array([3, 50, 77, 101])
    mask = np.asarray(stable_examples(free, aware, free[meta], aware[meta], block_size=32))

    def s1_argmax(G, C):
        return np.argmax(np.abs(G @ C.T), axis=1)  # ||G_j|| does not change the argmax over i

    expected = s1_argmax(free, free[meta]) == s1_argmax(aware, aware[meta])
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)
    assert 0 < mask.sum() < 120  # the construction has both kinds
    assert mask[meta].all()  # a meta sample is nearest to itself in both spaces


def test_stable_examples_all_stable_when_labels_add_nothing(x64):
    rng = np.random.default_rng(7)
    G = rng.standard_normal((90, 5))
    res = weighted_spherical_kmeans(jnp.asarray(G), 4, jax.random.key(0))
    # Same space, and the label-aware centroids carried over with cluster_centroids.
    C_aware = cluster_centroids(G, res.assignments, res.centroids.shape[0], reference=res.centroids)
    assert bool(np.all(stable_examples(G, 3.0 * G, res.centroids, C_aware)))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda G, C: msso_objective(G, C[:, :2]), "meta_features must have as many columns"),
        (lambda G, C: mco_objective(G[:, 0], C), "features must be a 2-D"),
        (lambda G, C: theorem1_ratio(G, np.full_like(C, np.nan)), "centroids contains NaN"),
        (lambda G, C: stable_examples(G, G[:5], C, C), "label_aware_features must have one row"),
        (lambda G, C: stable_examples(G, G, C, C[:2]), "label_aware_centroids must have one row"),
        (lambda G, C: stable_examples(G, G[:, :2], C, C), "label_aware_centroids must have 2 columns"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(call, match):
    rng = np.random.default_rng(8)
    G, C = rng.standard_normal((10, 3)).astype(np.float32), rng.standard_normal((3, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        call(G, C)
