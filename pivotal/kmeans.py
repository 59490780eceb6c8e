"""Weighted spherical K-means (paper Algorithm 1, Eq. S1-S2).

The paper approximates its meta-sample search objective by the M-clustering objective (Eq. 9-10)

    MCO = max_C  sum_j sum_i |<G_j, C_i>| = max_C sum_j ||G_j|| sum_i ||C_i|| |cos(G_j, C_i)|,

and solves it with a K-means variant whose similarity is the centroid-norm-weighted absolute cosine
(Eq. S1) and whose update is the norm-weighted mean of the sign-aligned members (Eq. S2):

    assignment:  a_j = argmax_i ||C_i|| |cos(G_j, C_i)|   (= argmax_i |<G_j, C_i>|)
    update:      C_i = sum_{j: a_j = i} s_j G_j / sum_{j: a_j = i} ||G_j||,
                 s_j = sign(<G_j, C_i>)  (+1 where the inner product is exactly 0).

Because the similarity uses |cos|, G and -G are the same point; without the sign s_j two members of
opposite sign would cancel in the update (the paper's S2 omits s_j: all-positive RBC features never
meet the problem, GBC features do). With ``weighted=False`` (the RBC-K ablation) the assignment is
``argmax_i |cos(G_j, C_i)|`` and the centroid is the mean of the sign-aligned unit vectors.

Zero rows (``||G_j|| = 0``) carry no weight anywhere: they add nothing to any centroid, do not count
as members when deciding whether a cluster is empty, and add 0 to the objective. Their assignment is
the argmax of an all-zero row, i.e. cluster 0.

The Lloyd iterations are in :mod:`pivotal.lloyd`; this module holds the k-means++ seeding, the
empty-cluster restarts and the user-facing functions.

Memory: every pass over the data walks row blocks of ``block_size`` rows, so besides the data and a
few length-N vectors only O(block_size x M + M x D) is live; no N x M x D (or N x M) array is built.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pivotal._checks import as_features, check_choice, check_int, check_key, check_real, value_range
from pivotal._placement import example_placement, num_shards, pad_examples, per_shard, place_examples, replicate
from pivotal._rows import blocked_rows
from pivotal._rows import row_norms as _row_norms
from pivotal.elkan import elkan_loop
from pivotal.lloyd import (  # lloyd_pass and cluster_mass: also importable from here, as before
    assign_block,
    blocked_cluster_sums,
    cluster_mass,
    lloyd_loop,
    lloyd_pass,
    member_weights,
    search_directions,
    sparse_tier_sizes,
)

__all__ = [
    "KMeansResult",
    "weighted_spherical_kmeans",
    "assign_clusters",
    "cluster_centroids",
    "DEFAULT_BLOCK_SIZE",
]
DEFAULT_BLOCK_SIZE = 2048
# The Lloyd loops: the plain one, and the one that skips rows by bounds (same results).
ALGORITHMS = {"lloyd": lloyd_loop, "elkan": elkan_loop}
# k-means++ seeding reads its input once per seed; drawing from a uniform subsample of this many rows
# per cluster (at least _SEED_MIN_POINTS) keeps it a small fraction of the Lloyd iterations.
_SEED_POINTS_PER_CLUSTER = 64
_SEED_MIN_POINTS = 4096


class KMeansResult(NamedTuple):
    """Output of :func:`weighted_spherical_kmeans`.

    Attributes:
      centroids: ``(M, D)`` cluster centroids; every cluster has at least one nonzero member.
      assignments: ``(N,)`` int32, ``assignments[j]`` is the cluster of row j under the returned
        centroids (S1 argmax, or |cos| argmax when ``weighted=False``).
      objective: scalar, ``sum_j |<G_j, C_{a_j}>|`` for the returned centroids and assignments.
      num_iters: scalar int32, assignment steps run by the final (accepted) restart.
    """

    centroids: jax.Array
    assignments: jax.Array
    objective: jax.Array
    num_iters: jax.Array


# ----------------------------------------------------------------------------------------------
# Exact rescaling of extreme features
# ----------------------------------------------------------------------------------------------


# max |x| rather than any(x != 0): XLA:CPU fuses abs into a max-reduction but materialises the
# (N, D) boolean (see pivotal._checks.check_finite_array).
_any_nonzero = jax.jit(lambda x: jnp.max(jnp.abs(x)) > 0)
_max_abs = jax.jit(lambda x: jnp.max(jnp.abs(x)))
_nonzero_rows = jax.jit(lambda x: jnp.sum(jnp.max(jnp.abs(x), axis=1) > 0))
# Headroom, in powers of two, below the largest float exponent for the sums of squares (norms,
# k-means++ weights and their cumulative sum, S1 similarities) of N x D rows.
_OVERFLOW_MARGIN = 28


def _rescale_exponent(max_abs: float, size: int, dtype) -> int:
    """``e`` such that features of largest magnitude ``max_abs`` need rescaling by ``2**-e``, or 0.

    Squared norms and the sums built from them (``<= N D max_abs**2``) must stay finite, and the
    squares of the largest entries must stay normal numbers. Inside that range (float32: about
    ``1e-13 <= max_abs``, ``max_abs**2 N D <= 2**100``) nothing is rescaled, so ordinary
    features are used bit for bit as given.
    """
    if max_abs == 0:
        return 0
    info = jnp.finfo(dtype)
    exponent = int(np.frexp(max_abs)[1])  # max_abs = f 2**exponent, 0.5 <= f < 1
    too_big = 2 * exponent + math.ceil(math.log2(max(size, 1))) > info.maxexp - _OVERFLOW_MARGIN
    too_small = exponent < info.minexp // 3
    return exponent if (too_big or too_small) else 0


def scale_pow2(x: jax.Array, exponent: int) -> jax.Array:
    """``x * 2**exponent``, exact (no rounding) while the results stay normal numbers."""
    while exponent:
        step = max(-100, min(100, exponent))  # 2**step is representable in float32
        x = x * jnp.asarray(2.0 ** step, x.dtype)
        exponent -= step
    return x


def as_scaled_features(G, name: str) -> tuple[jax.Array, int]:
    """:func:`pivotal._checks.as_features`, then rows rescaled by a common power of two when their magnitude
    would overflow (or underflow) the squared norms: returns ``(G * 2**-e, e)``.

    Spherical K-means and the selection depend on the rows only up to one common positive
    factor (assignments, centroids, k-means++ draws and the selection order are invariant; the
    objective scales by it), and a power of two scales exactly, so the result is that of exact
    arithmetic on the given rows. ``e == 0`` (the input untouched) unless the features are
    extreme, e.g. entries around 1e18 in float32, whose squared norms are inf. Raises
    ``ValueError`` naming ``name`` when the rows span so many orders of magnitude that some
    nonzero row would vanish after the rescaling. A traced ``G`` is returned as is (``e = 0``).
    """
    G = as_features(G, name, finite=False)
    if isinstance(G, jax.core.Tracer):
        return G, 0
    max_abs = float(_max_abs(G))
    if not math.isfinite(max_abs):
        raise ValueError(f"{name} contains NaN or inf values")
    exponent = _rescale_exponent(max_abs, G.shape[0] * G.shape[1], G.dtype)
    if not exponent:
        return G, 0
    scaled = scale_pow2(G, -exponent)
    before, after = int(_nonzero_rows(G)), int(jnp.sum(_row_norms(scaled) > 0))
    if after < before:
        raise ValueError(
            f"{name} spans too many orders of magnitude for {G.dtype}: its largest entry is "
            f"{max_abs:.3g}, and after rescaling the rows by 2**{-exponent} (to keep squared norms "
            f"finite) {before - after} nonzero rows have zero norm. Use float64 or rescale the "
            "rows (only their directions and relative norms matter)")
    return scaled, exponent



# ----------------------------------------------------------------------------------------------
# Public helpers
# ----------------------------------------------------------------------------------------------


def _assign_fn(centroids, weighted):
    directions = search_directions(centroids, weighted)

    def fn(Gb, nb):
        a, d = assign_block(Gb, directions)
        # |<G_j, dir_i>| / ||G_j|| is S1 for dir = C (weighted) and |cos| for dir = C / ||C||;
        # zero rows have similarity 0.
        return a, jnp.abs(d) / jnp.where(nb > 0, nb, 1)

    return fn


@functools.partial(jax.jit, static_argnames=("weighted", "block_size", "placement"))
def _assign_clusters(G, centroids, *, weighted, block_size, placement=None):
    def local(G, centroids):
        return blocked_rows(_assign_fn(centroids, weighted), G, (_row_norms(G),), block_size)

    return per_shard(local, placement, (True, False), (True, True))(G, centroids)


@functools.partial(jax.jit, static_argnames=("weighted", "block_size"))
def assign_rows(G, rows, centroids, *, weighted, block_size):
    """:func:`assign_clusters` of ``G[rows]`` (unsharded ``G``), gathered block by block: the
    same values without the ``(len(rows), D)`` copy."""
    norms = _row_norms(G)[rows]
    return blocked_rows(_assign_fn(centroids, weighted), G, (norms,), block_size, rows=rows)


def assign_clusters(G, centroids, *, weighted: bool = True, block_size: int = DEFAULT_BLOCK_SIZE):
    """Nearest centroid of every row under the (weighted) absolute-cosine similarity.

    Args:
      G: ``(N, D)`` float features.
      centroids: ``(M, D)`` float centroids (any vectors: cluster centroids or meta-sample features).
      weighted: ``True`` for S1, ``sim_ji = ||C_i|| |cos(G_j, C_i)|``; ``False`` for ``|cos(G_j, C_i)|``.
      block_size: rows per block; memory is ``O(block_size x M)`` besides the inputs.

    Row-wise: on example-sharded ``G`` (see :func:`pivotal.sharding.example_placement`) every
    device assigns its own rows and the outputs come back sharded the same way.

    Returns:
      ``(assignments (N,) int32, similarity (N,))`` with ``assignments[j] = argmax_i sim_ji``
      (lowest index on ties) and ``similarity[j] = max_i sim_ji``. Zero rows get cluster 0 and
      similarity 0; zero centroids have similarity 0 to everything.
    """
    G = as_features(G, "G")
    centroids = as_features(centroids, "centroids")
    if centroids.shape[1] != G.shape[1]:
        raise ValueError(
            f"centroids must have the same number of columns as G ({G.shape[1]}); "
            f"got shape {tuple(centroids.shape)}"
        )
    block_size = check_int(block_size, "block_size")
    dtype = jnp.result_type(G.dtype, centroids.dtype)
    return _assign_clusters(G.astype(dtype), centroids.astype(dtype), weighted=bool(weighted),
                            block_size=block_size, placement=example_placement(G))


@functools.partial(jax.jit, static_argnames=("num_clusters", "weighted", "block_size", "placement"))
def _cluster_centroids(G, assignments, reference, *, num_clusters, weighted, block_size, placement=None):
    def local(G, assignments, reference):
        norms = _row_norms(G)
        if reference is None:
            signs = jnp.ones_like(norms)
        else:
            def fn(Gb, ab):
                d = jnp.sum(Gb * reference[ab], axis=1)
                return jnp.where(d < 0, -1, 1).astype(G.dtype)

            signs = blocked_rows(fn, G, (assignments,), block_size)
        scale, mass = member_weights(norms, signs, weighted)
        sums = (blocked_cluster_sums(G, assignments, scale, num_clusters, block_size),
                jax.ops.segment_sum(mass, assignments, num_clusters))
        return sums if placement is None else jax.lax.psum(sums, placement[1])

    num, den = per_shard(local, placement, (True, True, False), (False, False))(G, assignments, reference)
    return num / jnp.where(den > 0, den, 1)[:, None]


def cluster_centroids(G, assignments, num_clusters: int, *, reference=None, weighted: bool = True,
                      block_size: int = DEFAULT_BLOCK_SIZE):
    """Centroids of given clusters by the (sign-aligned) S2 update.

    ``C_i = sum_{j: a_j = i} s_j G_j / sum_{j: a_j = i} ||G_j||`` (``weighted=True``) or
    ``C_i = mean_{j: a_j = i, G_j != 0} s_j G_j / ||G_j||`` (``weighted=False``), where
    ``s_j = sign(<G_j, reference_{a_j}>)`` (+1 on 0) and ``s_j = 1`` when ``reference is None``
    (the paper's literal S2). Empty clusters get a zero centroid.

    Useful to carry clusters found in one feature space into another one (e.g. the label-aware
    counterpart of label-free clusters, see :func:`pivotal.diagnostics.stable_examples`).
    On example-sharded ``G`` the sums run per shard and are all-reduced.

    Args:
      G: ``(N, D)`` features.
      assignments: ``(N,)`` integer cluster ids in ``[0, num_clusters)``.
      num_clusters: M.
      reference: optional ``(M, D)`` directions fixing each member's sign.
      weighted, block_size: as in :func:`weighted_spherical_kmeans`.

    Returns:
      ``(M, D)`` centroids.
    """
    G = as_features(G, "G")
    num_clusters = check_int(num_clusters, "num_clusters")
    assignments = _as_assignments(assignments, G.shape[0], num_clusters)
    if reference is not None:
        reference = as_features(reference, "reference")
        if reference.shape != (num_clusters, G.shape[1]):
            raise ValueError(
                f"reference must have shape ({num_clusters}, {G.shape[1]}); got {tuple(reference.shape)}"
            )
        reference = reference.astype(G.dtype)
    block_size = check_int(block_size, "block_size")
    placement = example_placement(G)
    if placement is not None:
        assignments = place_examples(assignments, placement)
    return _cluster_centroids(G, assignments, reference, num_clusters=num_clusters,
                              weighted=bool(weighted), block_size=block_size, placement=placement)


def _as_assignments(assignments, n: int, num_clusters: int) -> jax.Array:
    if not hasattr(assignments, "dtype"):
        assignments = np.asarray(assignments)
    if assignments.shape != (n,):
        raise ValueError(f"assignments must have shape ({n},); got {tuple(assignments.shape)}")
    if not jnp.issubdtype(assignments.dtype, jnp.integer):
        raise TypeError(f"assignments must have an integer dtype; got {assignments.dtype}")
    assignments = jnp.asarray(assignments, jnp.int32)
    bounds = value_range(assignments)
    if bounds is not None and (bounds[0] < 0 or bounds[1] >= num_clusters):
        raise ValueError(f"assignments must lie in [0, {num_clusters}); got values in [{bounds[0]}, {bounds[1]}]")
    return assignments


# ----------------------------------------------------------------------------------------------
# Seeding
# ----------------------------------------------------------------------------------------------


def _draw(uniforms, weights):
    """Indices drawn with probability proportional to ``weights`` (>= 0), one per U[0, 1) entry."""
    cdf = jnp.cumsum(weights)
    u = uniforms.astype(weights.dtype) * cdf[-1]
    # The count of cdf entries <= u is searchsorted(side="right"): it never lands on a
    # zero-weight row (its cdf step is flat). A dense compare compiles faster than a search.
    idx = jnp.sum(cdf[None, :] <= u[:, None], axis=1)
    return jnp.minimum(idx, weights.shape[0] - 1)


def seed_centroids(G, norms, key, num_seeds, *, capacity: int, weighted: bool, sample_size: int,
                   num_rows: int | None = None):
    """Greedy k-means++ in the sign-invariant (weighted) cosine geometry; seeds ``(capacity, D)``.

    The squared distance of G_j to the line through a unit seed u is ``||G_j||^2 (1 - cos^2)``.
    Candidates are drawn with probability proportional to ``w_j min_u (1 - cos^2(G_j, u))`` with
    ``w_j = ||G_j||^2`` (weighted) or ``1[G_j != 0]`` (unweighted); as in scikit-learn's greedy
    k-means++, ``2 + ln M`` candidates are drawn per seed and the one that lowers the potential
    ``sum_j w_j min_u (1 - cos^2)`` most is kept (robust against a single unlucky draw). The first
    seed is drawn proportional to ``w_j``. Everything runs on a uniform subsample of
    ``sample_size`` rows. Seeds are unit vectors, the scale of a one-member S2 centroid. When no
    row is left off the chosen lines, the remaining seeds are zero vectors: they never win an
    assignment, so the empty-cluster restart drops them. Rows ``num_seeds..capacity-1``
    (``num_seeds`` may be traced) are zero as well.

    ``num_rows`` (default: all rows) says that only the first ``num_rows`` rows are examples and
    the rest zero padding (e.g. to a multiple of the device count): the random draws are then
    those of ``G[:num_rows]``, and so are the seeds (zero rows have no weight).
    """
    n = G.shape[0] if num_rows is None else num_rows
    trials = 2 + int(math.log(capacity))
    # All randomness from one draw: each jax.random call compiles its own copy of the PRNG.
    shuffle = n if sample_size < n else 0
    u = jax.random.uniform(key, (shuffle + capacity * trials,), jnp.float32)
    draws = u[shuffle:].reshape(capacity, trials)
    if sample_size < n:
        rows = jnp.sort(jnp.argsort(u[:n])[:sample_size])
        X, xn = G[rows], norms[rows]
    else:
        X, xn = G, norms
    nonzero = xn > 0
    w = jnp.where(nonzero, jnp.square(xn) if weighted else 1, 0).astype(G.dtype)
    safe = jnp.where(nonzero, xn, 1)
    # Below this sin^2 a row counts as lying on a chosen line (float noise of cos(G, G) ~ 1).
    same_line = 64 * jnp.finfo(G.dtype).eps

    def sin2(U):  # (S, L) squared sines between sample rows and unit directions U (L, D)
        d = 1 - jnp.square((X @ U.T) / safe[:, None])
        return jnp.where(d > same_line, d, 0)

    first = _draw(draws[0, :1], w)[0]
    u0 = X[first] / safe[first]
    seeds = jnp.zeros((capacity, G.shape[1]), G.dtype).at[0].set(jnp.where(num_seeds > 0, u0, 0))
    dist = sin2(u0[None])[:, 0]

    def body(i, carry):
        seeds, dist = carry
        probs = w * dist
        cand = _draw(draws[i], probs)
        U = X[cand] / safe[cand][:, None]
        new_dist = jnp.minimum(dist[:, None], sin2(U))  # (S, L)
        best = jnp.argmin(w @ new_dist)
        keep = (jnp.sum(probs) > 0) & (i < num_seeds)
        seeds = seeds.at[i].set(jnp.where(keep, U[best], 0))
        return seeds, jnp.where(keep, new_dist[:, best], dist)

    seeds, _ = jax.lax.fori_loop(1, capacity, body, (seeds, dist))
    return seeds


# ----------------------------------------------------------------------------------------------
# One run, and the restarts
# ----------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=("capacity", "weighted", "block_size", "sparse_tiers", "seed_sample", "num_rows", "placement",
                     "algorithm"),
)
def _kmeans_single(G, key, num_clusters, max_iters, tol, init=None, *, capacity, weighted, block_size,
                   sparse_tiers, seed_sample, num_rows=None, placement=None, algorithm="lloyd"):
    """One run of Algorithm 1; returns ``(centroids, assignments, objective, iters, member_counts)``.

    Shapes are those of ``capacity`` clusters, of which the first ``num_clusters`` (traced) are
    used: the others have zero centroids, which never win an assignment. The empty-cluster
    restarts therefore reuse one compiled program. ``init`` ``(capacity, D)``, when given, replaces
    the k-means++ seeds; ``num_rows`` is that of :func:`seed_centroids` (zero padding after it).
    ``algorithm`` names the Lloyd loop (:data:`ALGORITHMS`).

    ``placement = (mesh, axis)``: ``G`` is split over ``axis`` (``N`` divisible by its devices)
    and the Lloyd loop runs per shard (:func:`pivotal.lloyd.lloyd_loop` under ``shard_map``;
    ``block_size`` and ``sparse_tiers`` then refer to the rows of one shard). The seeding reads only its subsample
    and is partitioned by XLA. The assignments come back sharded, the rest replicated.
    """
    m = capacity
    norms = _row_norms(G)
    if init is None:
        seeds = seed_centroids(G, norms, key, num_clusters, capacity=m, weighted=weighted,
                               sample_size=seed_sample, num_rows=num_rows)
    else:
        seeds = jnp.where((jnp.arange(m) < num_clusters)[:, None], init.astype(G.dtype), 0)
    lloyd = functools.partial(ALGORITHMS[algorithm], weighted=weighted, block_size=block_size,
                              sparse_tiers=sparse_tiers, axis=None if placement is None else placement[1])
    lloyd = per_shard(lloyd, placement, (True, True, False, False, False), (False, True, False, False, False))
    return lloyd(G, norms, seeds, max_iters, tol)


def seed_sample(n: int, capacity: int, seed_sample_size=None) -> int:
    """Rows the k-means++ seeding looks at: ``seed_sample_size``, else ``max(4096, 64 M)``."""
    sample = seed_sample_size or max(_SEED_MIN_POINTS, _SEED_POINTS_PER_CLUSTER * capacity)
    return min(n, max(sample, capacity))


def _static_config(n: int, capacity: int, weighted: bool, block_size: int, seed_sample_size=None, *,
                   shard_rows: int | None = None, algorithm: str = "lloyd") -> dict:
    """The static arguments of ``_kmeans_single`` that :func:`weighted_spherical_kmeans` uses.

    ``n`` examples; ``shard_rows``: rows per shard when the Lloyd loop runs sharded (the blocks and
    the incremental-update buffers are those of one shard).
    """
    rows = n if shard_rows is None else shard_rows
    return dict(capacity=capacity, weighted=bool(weighted), block_size=min(block_size, rows),
                sparse_tiers=sparse_tier_sizes(rows, block_size),
                seed_sample=seed_sample(n, capacity, seed_sample_size), algorithm=algorithm)


def _kmeans_placement(G, mesh, mesh_axis):
    """Where the Lloyd loop runs: ``(mesh, mesh_axis)`` when a mesh is given, else the example
    sharding of ``G`` (None: one device, or not evenly split)."""
    if mesh is None:
        return example_placement(G)
    placement = (mesh, mesh_axis)
    num_shards(placement)  # validates the mesh and the axis
    return placement


def restart_on_empty(run: Callable, key, num_clusters: int, init=None):
    """The empty-cluster restarts of the paper's appendix: rerun with ``M - M_empty`` clusters until
    no cluster is empty; returns ``(result, M)`` of the accepted run.

    ``run(run_key, m, init) -> (result, members)`` is one K-means run with ``m`` clusters, where
    ``members[i]`` counts the nonzero rows of cluster ``i``. Attempt ``a`` uses ``key`` itself
    (``a = 0``), then ``fold_in(key, a)``; a warm start ``init`` keeps the initial centroids of
    the clusters that were non-empty, in order.
    """
    m = num_clusters
    attempt = 0
    while True:
        run_key = key if attempt == 0 else jax.random.fold_in(key, attempt)
        result, members = run(run_key, m, init)
        empty = np.asarray(members)[:m] == 0
        if not empty.any():
            return result, m
        # Every nonzero row lands in some cluster, so m stays >= 1.
        if init is not None:
            kept = init[:m][~empty]
            init = jnp.zeros_like(init).at[: kept.shape[0]].set(kept)
        m -= int(empty.sum())
        attempt += 1


def weighted_spherical_kmeans(
    G,
    num_clusters: int,
    key,
    *,
    max_iters: int = 200,
    tol: float = 1e-4,
    weighted: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    seed_sample_size: int | None = None,
    init=None,
    cluster_capacity: int | None = None,
    mesh=None,
    mesh_axis="data",
    algorithm: str = "lloyd",
) -> KMeansResult:
    """Weighted spherical K-means, paper Algorithm 1, with the empty-cluster restarts of Alg. 2.

    Maximises ``sum_j ||G_j|| ||C_{a_j}|| |cos(G_j, C_{a_j})| = sum_j |<G_j, C_{a_j}>|`` by
    alternating

    * assignment (S1): ``a_j = argmax_i ||C_i|| |cos(G_j, C_i)|`` (``weighted=False``:
      ``argmax_i |cos(G_j, C_i)|``), lowest index on ties;
    * update (S2, sign-aligned): ``C_i = sum_{j in i} s_j G_j / sum_{j in i} ||G_j||`` with
      ``s_j = sign(<G_j, C_i>)`` (``weighted=False``: ``C_i = mean_{j in i} s_j G_j / ||G_j||``).

    Seeds come from k-means++ in the same sign-invariant geometry (see ``seed_centroids``). The
    loop stops when no assignment changes, when the objective changes by at most ``tol`` relative,
    or after ``max_iters`` assignment steps; it runs in one ``lax.while_loop`` under ``jit``,
    compiled once per (N, D, M, dtype, options). A cluster that loses all its members keeps its
    centroid and may win members back. If ``M_empty`` clusters are still empty at the end, the
    whole run restarts with ``M - M_empty`` clusters (fresh key) until none is empty, so the result
    may have fewer than ``num_clusters`` centroids.

    Zero rows carry no weight: they never make a cluster non-empty and add 0 to every sum.

    Sharded: when ``G`` is split over devices on its leading axis (a ``NamedSharding``, see
    :func:`pivotal.sharding.shard_examples`), or when ``mesh`` is given, the Lloyd loop runs per
    shard under ``shard_map``: each device assigns its own rows and keeps their partial S2 sums,
    and only the ``(M, D)`` numerators, ``(M,)`` denominators and member counts, the objective and
    the count of moved rows are all-reduced per step, so G is never gathered. Same seeds, same
    stopping rule, same restarts: the result equals the single-device one up to float summation
    order, with ``assignments`` sharded like the rows and the rest replicated.

    Args:
      G: ``(N, D)`` finite float features (float32 or float64; computation stays in that dtype).
      num_clusters: M, ``1 <= M <= N``.
      key: a ``jax.random`` key; same inputs and key give the same result.
      max_iters: maximum number of assignment steps per run.
      tol: relative objective change below which the run stops (0 disables the test).
      weighted: S1/S2 (True) or the unweighted RBC-K ablation (False).
      block_size: rows per block of every pass over the data.
      seed_sample_size: rows of the uniform subsample k-means++ draws from; default
        ``min(N, max(4096, 64 M))``.
      init: optional ``(M, D)`` initial centroids replacing the k-means++ seeds (a warm start). A
        restart after empty clusters then starts from the initial centroids of the clusters that
        were non-empty.
      cluster_capacity: compile for this many clusters (``>= num_clusters``; default
        ``num_clusters``), the surplus held at zero. Calls with different ``num_clusters`` but the
        same capacity share one compiled program; the result depends on the capacity only through
        the seeding's random draws.
      algorithm: ``"lloyd"`` scores every row against every centroid in every step; ``"elkan"``
        (:mod:`pivotal.elkan`) keeps per-row bounds and scores only the rows whose assignment
        may change, with the same assignments, centroids and iteration count (the objective
        equal up to float summation order, which in rare near-ties at ``tol`` could end a run
        one step apart), faster once few rows move, at the cost of an ``(N, M)`` array of bounds.

    Returns:
      :class:`KMeansResult`; its ``assignments`` and ``objective`` are those of the returned
      ``centroids``.
    """
    # Extreme magnitudes are rescaled by a power of two (exact); the objective is scaled back.
    G, exponent = as_scaled_features(G, "G")
    n = G.shape[0]
    num_clusters = check_int(num_clusters, "num_clusters")
    if num_clusters > n:
        raise ValueError(f"num_clusters must satisfy 1 <= num_clusters <= N = {n}; got {num_clusters}")
    max_iters = check_int(max_iters, "max_iters")
    check_real(tol, "tol", positive=False)
    block_size = check_int(block_size, "block_size")
    seed_sample_size = check_int(seed_sample_size, "seed_sample_size", allow_none=True)
    check_choice(algorithm, "algorithm", tuple(ALGORITHMS))
    check_key(key)
    if init is not None:
        init = as_features(init, "init")
        if init.shape != (num_clusters, G.shape[1]):
            raise ValueError(f"init must have shape ({num_clusters}, {G.shape[1]}); got {tuple(init.shape)}")
        init = init.astype(G.dtype)
    capacity = (num_clusters if cluster_capacity is None
                else check_int(cluster_capacity, "cluster_capacity", low=num_clusters))
    placement = _kmeans_placement(G, mesh, mesh_axis)
    if not bool(_any_nonzero(G)):
        raise ValueError("G must have at least one nonzero row")

    shards = 1 if placement is None else num_shards(placement)
    G, _ = pad_examples(G, shards)
    if placement is not None:
        G = place_examples(G, placement)
        key, init = replicate((key, init), placement[0])
    static = _static_config(n, capacity, weighted, block_size, seed_sample_size,
                            shard_rows=None if placement is None else G.shape[0] // shards, algorithm=algorithm)
    padded = G.shape[0] != n
    if init is not None and capacity > num_clusters:
        init = jnp.concatenate([init, jnp.zeros((capacity - num_clusters, G.shape[1]), G.dtype)])

    def run(run_key, m, init):
        *result, members = _kmeans_single(
            G, run_key, jnp.asarray(m, jnp.int32), jnp.asarray(max_iters, jnp.int32),
            jnp.asarray(tol, G.dtype), init, num_rows=n if padded else None, placement=placement, **static
        )
        return result, members

    (centroids, assignments, objective, iters), m = restart_on_empty(run, key, num_clusters, init)
    if m < capacity:
        centroids = centroids[:m]
    if padded:
        assignments = assignments[:n]
    if exponent:
        objective = scale_pow2(objective, exponent)
    return KMeansResult(centroids, assignments, objective, iters)
