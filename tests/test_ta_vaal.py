"""TA-VAAL baseline: its three parts learn, and selection keeps the selector contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.ta_vaal import (
    normalised_rank,
    ranking_loss,
    ta_vaal_selection,
    train_ranker,
    train_vaal,
)

# Small enough that every jitted trainer compiles and runs in seconds on 2 cores.
N, SHAPE, D = 240, (8, 8, 1), 16
STEPS = 150


def _head_tail(values, k=15):
    return float(np.mean(values[:k])), float(np.mean(values[-k:]))


@pytest.fixture(scope="module")
def problem():
    """Two clusters of 8x8 "images"; the labelled set comes from the first only.

    The pool's second cluster is what a labelled-vs-unlabelled discriminator should find.
    """
    rng = np.random.default_rng(0)
    centres = np.stack([np.full(SHAPE, 1.0), np.full(SHAPE, -1.0)]).astype(np.float32)
    cluster = np.repeat([0, 1], N // 2)
    x = centres[cluster] + 0.5 * rng.normal(size=(N, *SHAPE)).astype(np.float32)
    h = rng.normal(size=(N, D)).astype(np.float32)
    # Loss-like targets, a monotone function of one direction of h: learnable ranks.
    losses = np.logaddexp(0.0, h @ rng.normal(size=D)).astype(np.float32)
    existing = rng.choice(N // 2, 12, replace=False)  # cluster 0 only
    return {"x": x, "h": h, "losses": losses, "existing": existing, "cluster": cluster}


def _select(p, key, **kw):
    kw.setdefault("labelled_losses", p["losses"][p["existing"]])
    kw.setdefault("steps", STEPS)
    kw.setdefault("ranker_steps", 100)
    kw.setdefault("batch_size", 32)
    return ta_vaal_selection(p["x"], p["h"], kw.pop("task_losses", None), p["existing"],
                             kw.pop("budget", 10), key, **kw)


@pytest.fixture(scope="module")
def selected(problem):
    return _select(problem, jax.random.key(0))


# ----------------------------------------------------------------------------- parts


def test_ranking_loss_values_and_ties():
    p_i, p_j = jnp.array([2.0, 0.0, 5.0]), jnp.array([0.0, 2.0, 1.0])
    t_i, t_j = jnp.array([1.0, 1.0, 3.0]), jnp.array([0.0, 0.0, 3.0])  # last pair tied
    # Margin: pair 1 ranked right beyond the margin (0), pair 2 wrong by 2 (1 + 2 = 3).
    assert float(ranking_loss(p_i, p_j, t_i, t_j, kind="margin")) == pytest.approx(1.5)
    expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(2.0))) / 2
    assert float(ranking_loss(p_i, p_j, t_i, t_j)) == pytest.approx(expected, rel=1e-5)
    assert float(ranking_loss(p_i, p_j, t_i, t_i)) == 0.0
    with pytest.raises(ValueError, match="kind"):
        ranking_loss(p_i, p_j, t_i, t_j, kind="hinge")


def test_normalised_rank():
    np.testing.assert_allclose(normalised_rank([3.0, -1.0, 7.0]), [0.5, 0.0, 1.0])


def test_ranker_loss_decreases_and_ranks_held_out(problem):
    h, t = problem["h"], problem["losses"]
    predict, losses = train_ranker([(h[:200], t[:200])], jax.random.key(1), steps=200,
                                   batch_size=64)
    first, last = _head_tail(losses)
    assert last < 0.6 * first
    pred = np.asarray(predict(jnp.asarray(h[200:])))
    spearman = np.corrcoef(normalised_rank(pred), normalised_rank(t[200:]))[0, 1]
    assert spearman > 0.5


def _vaal(problem, **kw):
    x, ex = problem["x"], problem["existing"]
    pool = np.setdiff1d(np.arange(N), ex)
    r = normalised_rank(problem["losses"])
    _, _, hist = train_vaal(x[ex], r[ex], x[pool], r[pool], jax.random.key(2), steps=STEPS,
                            batch_size=32, **kw)
    assert set(hist) == {"vae", "adversarial", "discriminator"}
    assert all(v.shape == (STEPS,) and np.all(np.isfinite(v)) for v in hist.values())
    return hist


def test_vae_and_discriminator_losses_decrease(problem):
    # Each part against a non-adversarial partner (adversary weight 0): the VAE's
    # reconstruction + KL and the discriminator's BCE must both fall. Under the min-max
    # game neither need fall monotonically (fooling a winning discriminator costs ELBO);
    # the game's outcome is tested through the selection below.
    hist = _vaal(problem, adversary_weight=0.0)
    first, last = _head_tail(hist["vae"])
    assert last < 0.7 * first
    d = hist["discriminator"]  # BCE on labelled + unlabelled, 2 log 2 at chance
    assert d[0] == pytest.approx(2 * np.log(2), abs=0.3)
    assert d[-15:].mean() < 0.8 * d[0]


def test_adversarial_game_runs(problem):
    hist = _vaal(problem)  # default adversary weight 1; same compiled trainer, traced weights
    assert hist["adversarial"][-15:].mean() > 0


# ----------------------------------------------------------------------------- selection


def test_selection_contract(problem, selected):
    assert selected.dtype == np.int64 and selected.shape == (10,)
    assert np.unique(selected).size == 10
    assert np.all((selected >= 0) & (selected < N))
    assert not np.isin(selected, problem["existing"]).any()


def test_selection_prefers_what_the_labelled_set_lacks(problem, selected):
    # Labelled examples all come from cluster 0; the discriminator should point at cluster 1.
    assert np.mean(problem["cluster"][selected] == 1) >= 0.8


def test_selection_is_deterministic_per_key(problem, selected):
    np.testing.assert_array_equal(_select(problem, jax.random.key(0)), selected)


@pytest.mark.slow
def test_subpool_limits_candidates_and_pool_losses_path(problem):
    # subpool == budget: the selection is the whole sub-pool; ranker on pool losses only.
    first = _select(problem, jax.random.key(3), subpool=10, labelled_losses=None,
                    task_losses=problem["losses"], ranking="margin")
    again = _select(problem, jax.random.key(4), subpool=10, labelled_losses=None,
                    task_losses=problem["losses"], ranking="margin")
    assert np.unique(first).size == 10 and not np.isin(first, problem["existing"]).any()
    assert set(first) != set(again)  # a different key draws a different sub-pool


@pytest.mark.parametrize(
    "change, name",
    [
        ({"budget": N}, "budget"),
        ({"budget": 0}, "budget"),
        ({"existing": np.array([0, N])}, "existing"),
        ({"existing": np.array([-1, 3])}, "existing"),
        ({"existing": np.array([], np.int64)}, "existing"),
        ({"existing": np.array([1, 1, 2])}, "existing"),
        ({"features_h": np.zeros((N - 1, D), np.float32)}, "features_h"),
        ({"task_losses": np.zeros(N - 1, np.float32)}, "task_losses"),
        ({"labelled_losses": np.zeros(3, np.float32)}, "labelled_losses"),
        ({"labelled_losses": None}, "labelled_losses"),
        ({"subpool": 5}, "subpool"),
        ({"steps": 0}, "steps"),
        ({"ranking": "hinge"}, "ranking"),
        ({"x": np.full((N, *SHAPE), np.nan, np.float32)}, "`x`"),
    ],
)
def test_bad_input_raises_naming_the_argument(problem, change, name):
    args = {"x": problem["x"], "features_h": problem["h"], "task_losses": None,
            "existing": problem["existing"], "budget": 10,
            "labelled_losses": problem["losses"][problem["existing"]]}
    args.update(change)
    if "existing" in change and "labelled_losses" not in change:
        args["labelled_losses"] = np.ones(len(change["existing"]), np.float32)
    with pytest.raises(ValueError, match=name):
        ta_vaal_selection(args.pop("x"), args.pop("features_h"), args.pop("task_losses"),
                          args.pop("existing"), args.pop("budget"), jax.random.key(0), **args)


def test_non_integer_budget_is_a_type_error(problem):
    with pytest.raises(TypeError, match="budget"):
        ta_vaal_selection(problem["x"], problem["h"], problem["losses"], problem["existing"],
                          2.0, jax.random.key(0))
