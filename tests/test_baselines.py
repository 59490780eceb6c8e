"""Tests for pivotal.baselines: random, entropy-ranked and CRAIG selectors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pivotal.baselines import (
    certainty_selection,
    craig_selection,
    predictive_entropy,
    random_selection,
    uncertainty_selection,
)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def assert_valid_selection(indices, num_examples, budget, existing=()):
    assert isinstance(indices, np.ndarray) and indices.ndim == 1
    assert np.issubdtype(indices.dtype, np.integer)
    assert indices.size == budget
    assert np.unique(indices).size == indices.size
    assert indices.min() >= 0 and indices.max() < num_examples
    assert not set(indices.tolist()) & set(np.asarray(existing).tolist())


def random_probs(n, c, seed=0):
    logits = 3.0 * jax.random.normal(jax.random.PRNGKey(seed), (n, c))
    return np.asarray(jax.nn.softmax(logits), dtype=np.float64)


# ---------------------------------------------------------------------------
# random
# ---------------------------------------------------------------------------


def test_random_selection():
    key = jax.random.PRNGKey(0)
    existing = np.array([0, 3, 5, 7])
    picks = random_selection(20, 10, key, existing=existing)
    assert_valid_selection(picks, 20, 10, existing)
    np.testing.assert_array_equal(picks, random_selection(20, 10, key, existing=existing))
    assert not np.array_equal(picks, random_selection(20, 10, jax.random.PRNGKey(1), existing=existing))
    # Taking every remaining example is allowed and returns exactly the complement.
    everything = random_selection(20, 16, key, existing=existing)
    assert set(everything.tolist()) == set(range(20)) - set(existing.tolist())
    # Roughly uniform: each of 10 candidates picked ~ half the time in 400 draws of 5.
    counts = np.bincount(np.concatenate([random_selection(10, 5, k) for k in jax.random.split(key, 400)]), minlength=10)
    assert counts.min() > 150 and counts.max() < 250


# ---------------------------------------------------------------------------
# uncertainty / certainty
# ---------------------------------------------------------------------------


def test_predictive_entropy_is_per_example():
    probs = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    np.testing.assert_allclose(predictive_entropy(probs), [0.0, np.log(3), np.log(2)], atol=1e-12)


def test_uncertainty_and_certainty_order():
    probs = random_probs(30, 5)
    entropy = -(probs * np.log(probs)).sum(axis=1)
    existing = np.argsort(-entropy)[:2]  # the two most uncertain are already taken
    unc = uncertainty_selection(probs, 6, existing=existing)
    assert_valid_selection(unc, 30, 6, existing)
    np.testing.assert_array_equal(unc, np.argsort(-entropy)[2:8])
    cer = certainty_selection(probs, 6, existing=existing)
    assert_valid_selection(cer, 30, 6, existing)
    np.testing.assert_array_equal(cer, np.argsort(entropy)[:6])
    assert np.all(np.diff(entropy[unc]) <= 0) and np.all(np.diff(entropy[cer]) >= 0)


def test_entropy_ties_go_to_lower_index():
    probs = np.full((5, 2), 0.5)
    probs[2] = [0.9, 0.1]
    np.testing.assert_array_equal(uncertainty_selection(probs, 3), [0, 1, 3])
    np.testing.assert_array_equal(certainty_selection(probs, 2), [2, 0])


def test_probability_validation():
    good = random_probs(4, 3)
    with pytest.raises(ValueError, match="probs"):
        uncertainty_selection(good[0], 1)
    with pytest.raises(ValueError, match="sum to 1"):
        uncertainty_selection(good * 2, 1)
    with pytest.raises(ValueError, match="not logits"):
        certainty_selection(np.log(good), 1)  # log-probabilities / logits
    with pytest.raises(ValueError, match="non-negative"):
        certainty_selection(np.array([[1.5, -0.5]]), 1)
    with pytest.raises(ValueError, match="NaN"):
        certainty_selection(np.array([[np.nan, 1.0]]), 1)


@pytest.mark.parametrize(
    "call",
    [
        lambda b, e: random_selection(6, b, jax.random.PRNGKey(0), existing=e),
        lambda b, e: uncertainty_selection(random_probs(6, 3), b, existing=e),
        lambda b, e: certainty_selection(random_probs(6, 3), b, existing=e),
        lambda b, e: craig_selection(np.asarray(random_probs(6, 3)), b, existing=e),
    ],
    ids=["random", "uncertainty", "certainty", "craig"],
)
def test_budget_and_existing_validation(call):
    with pytest.raises(ValueError, match="budget"):
        call(0, None)
    with pytest.raises(ValueError, match="budget"):
        call(-1, None)
    with pytest.raises(ValueError, match="budget"):
        call(7, None)
    with pytest.raises(ValueError, match="budget"):
        call(5, [0, 1])  # only 4 left
    with pytest.raises(TypeError, match="budget"):
        call(2.0, None)
    with pytest.raises(ValueError, match="existing"):
        call(1, [6])
    with pytest.raises(ValueError, match="existing"):
        call(1, [-1])
    with pytest.raises(TypeError, match="existing"):
        call(1, [0.5])
    assert_valid_selection(call(4, [0, 1]), 6, 4, [0, 1])


# ---------------------------------------------------------------------------
# CRAIG
# ---------------------------------------------------------------------------


def dense_facility_location_greedy(features, budget, seeds=()):
    """Reference: CRAIG's greedy with the dense similarity max_dist - ||g_i - g_j||."""
    diff = features[:, None, :] - features[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    sim = dist.max() - dist
    seeds = list(seeds)
    cover = sim[:, seeds].max(axis=1) if seeds else np.zeros(len(features))
    chosen = []
    for _ in range(budget):
        gains = np.maximum(sim - cover[:, None], 0.0).sum(axis=0)
        gains[seeds + chosen] = -np.inf
        j = int(np.argmax(gains))
        chosen.append(j)
        cover = np.maximum(cover, sim[:, j])
    return np.array(chosen)


def facility_location_value(features, selected):
    dist = np.linalg.norm(features[:, None, :] - features[None, selected, :], axis=-1)
    return -dist.min(axis=1).sum()  # equals F(S) up to the constant N * max_dist


def test_craig_matches_dense_greedy_single_class(x64):
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (40, 5), dtype=jnp.float64))
    picks = craig_selection(g, 7, block_size=8)
    assert_valid_selection(picks, 40, 7)
    np.testing.assert_array_equal(picks, dense_facility_location_greedy(g, 7))


def test_craig_existing_seeds_the_greedy(x64):
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (30, 4), dtype=jnp.float64))
    existing = [3, 17]
    picks = craig_selection(g, 5, existing=existing)
    assert_valid_selection(picks, 30, 5, existing)
    np.testing.assert_array_equal(picks, dense_facility_location_greedy(g, 5, seeds=existing))
    assert not np.array_equal(picks, dense_facility_location_greedy(g, 5))  # seeding changed the picks


def test_craig_per_class_matches_dense_greedy(x64):
    key_g, key_c = jax.random.split(jax.random.PRNGKey(2))
    g = np.asarray(jax.random.normal(key_g, (40, 6), dtype=jnp.float64))
    classes = np.repeat([0, 1, 2], [20, 12, 8])
    classes = np.asarray(jax.random.permutation(key_c, classes))
    existing = np.flatnonzero(classes == 0)[:2]
    picks = craig_selection(g, 6, classes=classes, existing=existing)
    assert_valid_selection(picks, 40, 6, existing)
    # Available sizes 18, 12, 8: one each, then 3 more split over 17, 11, 7 by largest
    # remainder (1.46, 0.94, 0.62 -> 1 + the two largest remainders) = 2, 2, 2.
    expected = []
    for c, k in zip([0, 1, 2], [2, 2, 2]):
        members = np.flatnonzero(classes == c)
        seeds = [int(np.flatnonzero(members == e)[0]) for e in existing if classes[e] == c]
        expected.append(members[dense_facility_location_greedy(g[members], k, seeds=seeds)])
    np.testing.assert_array_equal(picks, np.concatenate(expected))


def test_craig_budget_split_is_proportional():
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (100, 3)))
    classes = np.repeat([0, 1, 2, 3], [70, 20, 9, 1])
    picks = craig_selection(g, 10, classes=classes)
    assert_valid_selection(picks, 100, 10)
    # One per class, then 6 over rooms 69, 19, 8, 0: quotas 4.31, 1.19, 0.5, 0 -> floors
    # 4, 1, 0, 0 and the one left over to the largest remainder (class 2).
    np.testing.assert_array_equal(np.bincount(classes[picks], minlength=4), [5, 2, 2, 1])
    # Fewer picks than classes: no minimum, largest classes first.
    picks = craig_selection(g, 2, classes=classes)
    np.testing.assert_array_equal(np.bincount(classes[picks], minlength=4), [2, 0, 0, 0])


def test_craig_stochastic_full_candidate_set_equals_exact(x64):
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (30, 4), dtype=jnp.float64))
    # epsilon tiny -> candidate subsets hold every available example -> exact greedy.
    picks = craig_selection(g, 4, stochastic=True, epsilon=1e-12, key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(picks, dense_facility_location_greedy(g, 4))


def test_craig_stochastic_large_n_is_deterministic_and_near_greedy():
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (1500, 8)))
    key = jax.random.PRNGKey(1)
    picks = craig_selection(g, 10, key=key, stochastic_threshold=1000)
    assert_valid_selection(picks, 1500, 10)
    np.testing.assert_array_equal(picks, craig_selection(g, 10, key=key, stochastic_threshold=1000))
    exact = craig_selection(g, 10, stochastic=False)
    rand = random_selection(1500, 10, key)
    value = lambda s: facility_location_value(g, s)
    # Facility-location gain over the empty set is what (1 - 1/e - eps) bounds; compare
    # gains relative to the one-point baseline "cover by the best single example".
    assert value(picks) > value(rand)
    base = value(exact[:1])
    assert (value(picks) - base) >= 0.8 * (value(exact) - base)
    with pytest.raises(ValueError, match="key"):
        craig_selection(g, 10, stochastic_threshold=1000)


def test_craig_input_validation():
    g = np.ones((5, 2))
    with pytest.raises(ValueError, match="features"):
        craig_selection(np.ones(5), 1)
    with pytest.raises(ValueError, match="NaN"):
        craig_selection(np.array([[np.nan, 0.0], [1.0, 1.0]]), 1)
    with pytest.raises(TypeError, match="features"):
        craig_selection(np.ones((5, 2), dtype=int), 1)
    with pytest.raises(ValueError, match="classes"):
        craig_selection(g, 1, classes=np.zeros(4, dtype=int))
    with pytest.raises(TypeError, match="classes"):
        craig_selection(g, 1, classes=np.zeros(5))
    # Duplicate points: still unique picks.
    assert_valid_selection(craig_selection(g, 5), 5, 5)
