"""Bad library inputs get a ValueError naming the argument (issue "Library inputs accepted
silently"): learning rates, out-of-range batch indices, features of extreme magnitude."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pivotal
from pivotal import direct_weights, make_meta_step, meta_weight_net, weight_gradient


def loss_fn(params, batch):
    logits = batch["x"] @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def _data(key, n):
    x = jax.random.normal(key, (n, 4))
    return {"x": x, "y": jnp.argmax(x[:, :3], axis=1), "index": jnp.arange(n)}


PARAMS = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}
TRAIN = _data(jax.random.PRNGKey(1), 8)
META = {k: v for k, v in _data(jax.random.PRNGKey(2), 4).items() if k != "index"}


def _weight_gradient(inner_lr):
    return weight_gradient(loss_fn, PARAMS, TRAIN, jnp.ones(8), META, inner_lr=inner_lr)


def _meta_step(**kwargs):
    return make_meta_step(loss_fn, pivotal.l2rw(), **kwargs)


POSITIVE = "must be a positive finite number; got "
BAD_INPUTS = [
    # (function, kwargs, expected message)
    (_weight_gradient, {"inner_lr": -0.1}, r"inner_lr " + POSITIVE + r"-0\.1"),
    (_weight_gradient, {"inner_lr": float("nan")}, r"inner_lr " + POSITIVE + "nan"),
    (_weight_gradient, {"inner_lr": float("inf")}, r"inner_lr " + POSITIVE + "inf"),
    (_weight_gradient, {"inner_lr": 0.0}, r"inner_lr " + POSITIVE + r"0\.0"),
    (_weight_gradient, {"inner_lr": "big"}, r"inner_lr " + POSITIVE + "'big'"),
    (_weight_gradient, {"inner_lr": np.float32(-1.0)}, r"inner_lr " + POSITIVE),
    (_weight_gradient, {"inner_lr": jnp.asarray(-1.0)}, r"inner_lr " + POSITIVE),
    (direct_weights, {"weight_lr": -1}, r"weight_lr " + POSITIVE + "-1"),
    (direct_weights, {"weight_lr": "big"}, r"weight_lr " + POSITIVE + "'big'"),
    (direct_weights, {"weight_lr": float("nan")}, r"weight_lr " + POSITIVE + "nan"),
    (direct_weights, {"weight_lr": True}, r"weight_lr " + POSITIVE + "True"),
    (direct_weights, {"weight_lr": None}, r"weight_lr " + POSITIVE + "None"),
    (_meta_step, {"learning_rate": -0.1}, r"learning_rate " + POSITIVE + r"-0\.1"),
    (_meta_step, {"learning_rate": float("nan")}, r"learning_rate " + POSITIVE + "nan"),
    (_meta_step, {"learning_rate": "big"}, r"learning_rate " + POSITIVE + "'big'"),
    (_meta_step, {"learning_rate": 0}, r"learning_rate " + POSITIVE + "0"),
    (_meta_step, {"meta_batch_size": "big"}, r"meta_batch_size must be a positive integer; got 'big'"),
    (_meta_step, {"meta_batch_size": 2.5}, r"meta_batch_size must be a positive integer; got 2\.5"),
    (_meta_step, {"meta_batch_size": 0}, r"meta_batch_size must be a positive integer; got 0"),
    (meta_weight_net, {"hidden": "big"}, r"hidden must be a positive integer; got 'big'"),
    (meta_weight_net, {"hidden": 0}, r"hidden must be a positive integer; got 0"),
]


@pytest.mark.parametrize("fn, kwargs, message", BAD_INPUTS,
                         ids=[f"{f.__name__}-{k}" for f, k, _ in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_the_argument(fn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fn(**kwargs)


@pytest.mark.parametrize("value", [0.1, 3, np.float32(0.5), np.float64(2.0), jnp.asarray(0.2)])
def test_good_learning_rates_accepted(value):
    assert _weight_gradient(value).shape == (8,)
    direct_weights(weight_lr=value)
    _meta_step(learning_rate=value)
    _meta_step(learning_rate=optax.constant_schedule(value))  # a schedule is not checked


def test_traced_inner_lr_is_not_value_checked():
    # Inside jit the value is unknown: only the shape is checked, the value is the caller's.
    out = jax.jit(_weight_gradient)(jnp.asarray(0.1))
    np.testing.assert_allclose(out, _weight_gradient(0.1), rtol=1e-6)


# --------------------------------------------------------------------------- batch['index']


def _direct_setup(n=8):
    trainer = make_meta_step(loss_fn, direct_weights(weight_lr=10.0, init=0.5), learning_rate=0.1)
    state = trainer.init(PARAMS, jax.random.PRNGKey(0), num_examples=n)
    return trainer, state


@pytest.mark.parametrize("bad", [-1, 8, 100])
@pytest.mark.parametrize("as_array", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
def test_out_of_range_index_raises_and_changes_no_weight(bad, as_array):
    trainer, state = _direct_setup()
    index = np.arange(8)
    index[3] = bad
    batch = dict(TRAIN, index=as_array(index))
    before = np.asarray(pivotal.example_weights(state))
    with pytest.raises(ValueError, match=re.escape("batch['index'] must hold positions in [0, 8)")):
        trainer.step(state, batch, META, jax.random.PRNGKey(3))
    # Without the check the step would have moved example N-1's weight (index -1 wraps) or
    # dropped the update (index >= N): the state is untouched because the step never ran.
    np.testing.assert_array_equal(np.asarray(pivotal.example_weights(state)), before)


def test_out_of_range_index_changed_the_wrong_weight_without_the_check():
    """What the check prevents: index -1 silently updates example N-1 (here: 7)."""
    trainer = make_meta_step(loss_fn, direct_weights(weight_lr=1e3, init=0.5), learning_rate=0.5,
                             check_index=False)
    state = trainer.init(PARAMS, jax.random.PRNGKey(0), num_examples=16)
    batch = {"x": TRAIN["x"][:2], "y": TRAIN["y"][:2], "index": jnp.asarray([0, -1])}
    new, _ = trainer.step(state, batch, META, jax.random.PRNGKey(3))
    changed = np.flatnonzero(np.asarray(pivotal.example_weights(new))
                             != np.asarray(pivotal.example_weights(state)))
    assert 15 in changed


def test_in_range_index_steps_and_matches_unchecked():
    trainer, state = _direct_setup()
    unchecked = make_meta_step(loss_fn, direct_weights(weight_lr=10.0, init=0.5), learning_rate=0.1,
                               check_index=False)
    for index in (np.arange(8), jnp.arange(8)):
        batch = dict(TRAIN, index=index)
        a, _ = trainer.step(state, batch, META, jax.random.PRNGKey(3))
        b, _ = unchecked.step(state, batch, META, jax.random.PRNGKey(3))
        np.testing.assert_array_equal(a.rule_state.weights, b.rule_state.weights)


def test_index_not_checked_for_rules_that_ignore_it():
    trainer = _meta_step(learning_rate=0.1)
    state = trainer.init(PARAMS, jax.random.PRNGKey(0), num_examples=8)
    trainer.step(state, dict(TRAIN, index=np.arange(8) + 100), META, jax.random.PRNGKey(3))


# --------------------------------------------------------------------------- extreme features


def _blobs(n=200, d=64, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d))
    return (centres[rng.integers(0, 6, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("shape", [(400, 8), (40, 400), (200, 64)])
def test_select_meta_samples_on_huge_finite_features_returns_full_count(shape):
    G = _blobs(*shape) * np.float32(1e18)
    assert np.isfinite(G).all()
    picks = pivotal.select_meta_samples(G, 5, jax.random.key(0))
    assert len(picks) == 5 and len(np.unique(picks)) == 5
    result = pivotal.weighted_spherical_kmeans(G, 5, jax.random.key(0))
    assert result.centroids.shape[0] == 5
    assert np.isfinite(float(result.objective)) and float(result.objective) > 0


@pytest.mark.parametrize("exponent", [60, 100, -60])
def test_power_of_two_scaled_features_give_identical_selection(exponent):
    """Rescaling is by a power of two, so huge (or tiny) features select exactly what the
    ordinary ones do, and the K-means objective scales by the same factor."""
    G = _blobs()
    big = (G.astype(np.float64) * 2.0 ** exponent).astype(np.float32)
    key = jax.random.key(3)
    np.testing.assert_array_equal(pivotal.select_meta_samples(big, 7, key),
                                  pivotal.select_meta_samples(G, 7, key))
    existing = np.arange(5)
    np.testing.assert_array_equal(pivotal.select_meta_samples(big, 7, key, existing=existing),
                                  pivotal.select_meta_samples(G, 7, key, existing=existing))
    a = pivotal.weighted_spherical_kmeans(big, 7, key)
    b = pivotal.weighted_spherical_kmeans(G, 7, key)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert float(a.objective) == float(b.objective) * 2.0 ** exponent


def test_ordinary_features_are_not_rescaled():
    from pivotal.kmeans import as_scaled_features as _as_scaled_features

    G = _blobs()
    for scale in (1e-10, 1.0, 1e9):
        scaled, exponent = _as_scaled_features(G * np.float32(scale), "features")
        assert exponent == 0
        np.testing.assert_array_equal(np.asarray(scaled), G * np.float32(scale))


def test_features_spanning_too_many_magnitudes_refused():
    G = _blobs(20, 8)
    G[0] *= np.float32(1e30)  # the rest vanish once row 0 is brought to ~1
    G[1:] *= np.float32(1e-20)
    with pytest.raises(ValueError, match="features spans too many orders of magnitude"):
        pivotal.select_meta_samples(G, 3, jax.random.key(0))


def test_step_inside_callers_jit_skips_the_index_check():
    # A traced index has no value to check on the host: the step still compiles and runs.
    trainer, state = _direct_setup()
    new, metrics = jax.jit(trainer.step)(state, TRAIN, META, jax.random.PRNGKey(3))
    ref, _ = trainer.step(state, TRAIN, META, jax.random.PRNGKey(3))
    np.testing.assert_allclose(new.rule_state.weights, ref.rule_state.weights, rtol=1e-6)
