"""Baseline meta-sample selectors: random, uncertainty, certainty, CRAIG.

Every selector follows the contract of ``select_meta_samples``: it returns a 1-D
``np.ndarray`` of unique ``int64`` example indices, none of them in ``existing``, with
exactly ``budget`` entries (``budget`` may not exceed the number of examples outside
``existing``), in selection order (most preferred first).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pivotal._checks import check_finite_array, check_indices, check_int, check_key

__all__ = [
    "certainty_selection",
    "craig_selection",
    "predictive_entropy",
    "random_selection",
    "uncertainty_selection",
]


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _existing_mask(num_examples: int, existing) -> np.ndarray:
    """``(N,)`` bool, True for the indices in ``existing`` (repeats allowed)."""
    mask = np.zeros(num_examples, dtype=bool)
    mask[check_indices(existing, num_examples, "existing", unique=False)] = True
    return mask


def _check_budget(budget, available: int) -> int:
    budget = check_int(budget, "budget")
    if budget > available:
        raise ValueError(f"budget must lie in [1, {available}] (the examples not already in existing); got {budget}")
    return budget


def _check_probs(probs, atol: float = 1e-3) -> np.ndarray:
    values = np.asarray(probs, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise ValueError(f"probs must have shape (N, C) with N, C >= 1; got shape {values.shape}")
    check_finite_array(values, "probs")
    if values.min() < 0:
        raise ValueError(
            f"probs must be non-negative (softmax probabilities, not logits); got a minimum of {values.min()}"
        )
    sums = values.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > atol)
    if bad.size:
        raise ValueError(
            f"every row of probs must sum to 1 (within {atol}: softmax probabilities, not logits); "
            f"got {sums[bad[0]]} for row {bad[0]}"
        )
    return values


# ---------------------------------------------------------------------------
# Random / entropy baselines
# ---------------------------------------------------------------------------


def random_selection(num_examples: int, budget: int, key: jax.Array, *, existing=None) -> np.ndarray:
    """``budget`` indices drawn uniformly without replacement from ``[0, N) \\ existing``.

    Deterministic given ``key``.
    """
    num_examples = check_int(num_examples, "num_examples")
    check_key(key)
    taken = _existing_mask(num_examples, existing)
    candidates = np.flatnonzero(~taken)
    budget = _check_budget(budget, candidates.size)
    order = np.asarray(jax.random.choice(key, candidates.size, shape=(budget,), replace=False))
    return candidates[order].astype(np.int64)


def predictive_entropy(probs) -> np.ndarray:
    r"""``(N,)`` per-example entropy ``H_j = -sum_c p_jc log p_jc`` (``0 log 0 = 0``), in float64."""
    values = _check_probs(probs)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(values > 0, values * np.log(values), 0.0)
    return -terms.sum(axis=1)


def _rank_by_entropy(probs, budget, existing, *, highest: bool) -> np.ndarray:
    entropy = predictive_entropy(probs)
    taken = _existing_mask(entropy.shape[0], existing)
    budget = _check_budget(budget, int((~taken).sum()))
    # A stable sort keeps ties in index order; negate for "highest first".
    score = -entropy if highest else entropy
    order = np.argsort(score, kind="stable")
    order = order[~taken[order]]
    return order[:budget].astype(np.int64)


def uncertainty_selection(probs, budget: int, *, existing=None) -> np.ndarray:
    """The ``budget`` examples with the highest predictive entropy, highest first.

    Each example is scored by its own entropy ``-sum_c p_jc log p_jc`` (not a batch-mean
    loss). Ties go to the lower index.

    Args:
      probs: ``(N, C)`` predicted class probabilities (rows sum to 1).
      budget: how many to select.
      existing: indices never to return.
    """
    return _rank_by_entropy(probs, budget, existing, highest=True)


def certainty_selection(probs, budget: int, *, existing=None) -> np.ndarray:
    """The ``budget`` examples with the lowest predictive entropy, lowest first.

    Same scoring and tie rule as :func:`uncertainty_selection`.
    """
    return _rank_by_entropy(probs, budget, existing, highest=False)


# ---------------------------------------------------------------------------
# CRAIG: facility-location greedy
# ---------------------------------------------------------------------------


def _distances_to(rows: jax.Array, features: jax.Array, sq_norms: jax.Array) -> jax.Array:
    """``(b, N)`` Euclidean distances from ``rows`` (b, D) to every feature (N, D)."""
    d2 = jnp.sum(rows * rows, axis=1)[:, None] + sq_norms[None, :] - 2.0 * rows @ features.T
    return jnp.sqrt(jnp.maximum(d2, 0.0))


@functools.partial(jax.jit, static_argnames=("budget", "num_candidates", "block_size"))
def _facility_location_greedy(features, min_dist, available, key, *, budget, num_candidates, block_size):
    r"""Greedy maximisation of ``F(S) = sum_i max_{j in S} (c - d_ij)`` over one class.

    ``min_dist`` (N,) holds ``min_{j in S} d_ij`` for the facilities already open
    (``c`` where none is), so the marginal gain of ``j`` is
    ``sum_i max(0, min_dist_i - d_ij)``. Gains are computed for ``block_size``
    candidates at a time, so memory is O(block_size x N), never N x N.

    ``num_candidates=None``: exact greedy over every available example. Otherwise
    stochastic greedy (Mirzasoleiman et al. 2015): each step scores a uniform random
    subset of ``num_candidates`` available examples.
    """
    n = features.shape[0]
    sq_norms = jnp.sum(features * features, axis=1)

    def gains(candidates, min_dist):
        def gain_one(j):
            d = _distances_to(features[j][None, :], features, sq_norms)[0]
            return jnp.sum(jnp.maximum(min_dist - d, 0.0))

        return jax.lax.map(gain_one, candidates, batch_size=min(block_size, candidates.shape[0]))

    def step(t, state):
        chosen, min_dist, available = state
        if num_candidates is None:
            candidates = jnp.arange(n)
            scores = jnp.where(available, gains(candidates, min_dist), -jnp.inf)
        else:
            weights = available / jnp.sum(available)
            candidates = jax.random.choice(
                jax.random.fold_in(key, t), n, shape=(num_candidates,), replace=False, p=weights
            )
            # choice without replacement may still return p=0 entries once the
            # available pool is smaller than the subset; mask them.
            scores = jnp.where(available[candidates], gains(candidates, min_dist), -jnp.inf)
        # argmax returns the first maximum, so ties go to the lowest candidate position.
        j = candidates[jnp.argmax(scores)]
        d = _distances_to(features[j][None, :], features, sq_norms)[0]
        return chosen.at[t].set(j.astype(chosen.dtype)), jnp.minimum(min_dist, d), available.at[j].set(False)

    chosen = jnp.zeros((budget,), dtype=jnp.int32)
    chosen, _, _ = jax.lax.fori_loop(0, budget, step, (chosen, min_dist, available))
    return chosen


def _split_budget(budget: int, sizes: np.ndarray) -> np.ndarray:
    """Per-class budgets summing to ``budget``, each at most the class size.

    When ``budget >= number of non-empty classes`` every non-empty class first gets one
    example; the rest is split in proportion to the remaining class sizes by the
    largest-remainder method (ties to the lower class id).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    base = np.zeros_like(sizes)
    if budget >= int((sizes > 0).sum()):
        base = (sizes > 0).astype(np.int64)
    rest = budget - int(base.sum())
    room = sizes - base
    if rest == 0:
        return base
    # Integer arithmetic keeps exact ties exact (1.4 - 1 != 0.4 in floating point).
    extra, remainder = np.divmod(rest * room, room.sum())
    short = rest - int(extra.sum())
    order = np.lexsort((np.arange(sizes.size), -remainder))
    extra[order[:short]] += 1
    return base + extra


def craig_selection(
    features,
    budget: int,
    *,
    existing=None,
    classes=None,
    key: jax.Array | None = None,
    stochastic: bool | None = None,
    stochastic_threshold: int = 5000,
    epsilon: float = 0.01,
    block_size: int = 256,
) -> np.ndarray:
    r"""CRAIG (Mirzasoleiman et al. 2020): facility-location greedy on gradient features.

    Within each predicted class, greedily maximises the facility-location function

    .. math::
        F(S) = \sum_{i} \max_{j \in S} \big(c - \|g_i - g_j\|\big),

    over the class's examples ``i`` with ``g`` the last-layer gradient features (e.g.
    :func:`pivotal.features.rbc_features`). ``c`` is any constant ``>= max_{ij} d_ij``:
    the first pick maximises ``N c - sum_i d_ij`` and every later gain is
    ``sum_i max(0, min_{k in S} d_ik - d_ij)``, neither depending on ``c``, so the greedy
    choices are those of CRAIG's ``max_dist - d`` similarity. We use the
    triangle-inequality bound ``c = 2 max_i ||g_i - g_0|| + 1``, computable in O(N D).

    * Classes: ``classes`` (N,) are predicted labels; None = one class. The budget is
      split over classes (counting only examples outside ``existing``): one per
      non-empty class when ``budget`` allows it, the rest proportional to class size by
      largest remainder.
    * ``existing``: never returned, but they count as already-open facilities of their
      class, so new picks cover what they do not.
    * Memory: gains are computed ``block_size`` candidates at a time (O(block_size x N)),
      never as an N x N matrix. Time: each greedy step is O(candidates x N x D).
    * Exact greedy scores every available example; stochastic greedy scores a random
      subset of ``ceil((n / k) log(1 / epsilon))`` available examples per step (``n``
      class size, ``k`` class budget), an expected ``(1 - 1/e - epsilon)`` approximation.
      ``stochastic=None`` switches to it for classes with more than
      ``stochastic_threshold`` examples; it then needs ``key``.

    Returns:
      ``(budget,)`` unique int64 indices, class by class in increasing class id, each
      class in greedy order.
    """
    values = np.asarray(features)
    if values.ndim != 2 or values.shape[0] < 1:
        raise ValueError(f"features must have shape (N, D) with N >= 1; got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.floating):
        raise TypeError(f"features must be floating point; got dtype {values.dtype}")
    check_finite_array(values, "features")
    n = values.shape[0]
    taken = _existing_mask(n, existing)
    budget = _check_budget(budget, int((~taken).sum()))
    if classes is None:
        labels = np.zeros(n, dtype=np.int64)
    else:
        labels = np.asarray(classes)
        if labels.shape != (n,):
            raise ValueError(f"classes must have shape (N,) = ({n},); got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"classes must be integer predicted labels; got dtype {labels.dtype}")
    block_size = check_int(block_size, "block_size")
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must lie in (0, 1); got {epsilon}")
    if key is not None:
        check_key(key)

    class_ids = np.unique(labels)
    sizes = np.array([int(((labels == c) & ~taken).sum()) for c in class_ids])
    per_class = _split_budget(budget, sizes)

    picked = []
    for c, k, size in zip(class_ids, per_class, sizes):
        if k == 0:
            continue
        members = np.flatnonzero(labels == c)
        feats = jnp.asarray(values[members])
        use_stochastic = size > stochastic_threshold if stochastic is None else bool(stochastic)
        num_candidates = None
        if use_stochastic:
            if key is None:
                raise ValueError("key is required for stochastic greedy (large classes or stochastic=True)")
            num_candidates = min(int(size), math.ceil(size / k * math.log(1.0 / epsilon)))
        radius = jnp.max(jnp.linalg.norm(feats - feats[0], axis=1))
        ceiling = 2.0 * radius + 1.0
        min_dist = jnp.full((members.size,), ceiling, dtype=feats.dtype)
        seeds = np.flatnonzero(taken[members])
        if seeds.size:
            sq = jnp.sum(feats * feats, axis=1)
            for start in range(0, seeds.size, block_size):
                d = _distances_to(feats[seeds[start : start + block_size]], feats, sq)
                min_dist = jnp.minimum(min_dist, jnp.min(d, axis=0))
        class_key = jax.random.fold_in(key, int(c)) if key is not None else jax.random.PRNGKey(0)
        local = _facility_location_greedy(
            feats,
            min_dist,
            jnp.asarray(~taken[members]),
            class_key,
            budget=int(k),
            num_candidates=num_candidates,
            block_size=int(block_size),
        )
        picked.append(members[np.asarray(local)])
    return np.concatenate(picked).astype(np.int64)
