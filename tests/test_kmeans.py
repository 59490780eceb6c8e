"""Tests for pivotal.kmeans (paper Algorithm 1, Eq. S1-S2)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pivotal import kmeans as K
from pivotal.kmeans import KMeansResult, assign_clusters, cluster_centroids, weighted_spherical_kmeans


def enable_x64():
    """float64 inside the block only (restored afterwards)."""
    return jax.enable_x64(True)


def planted_lines(rng, n, d, m, noise=0.05, dtype=np.float64):
    """Rows on m random lines through 0, with random norms and random signs, plus small noise."""
    dirs = rng.standard_normal((m, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    labels = rng.integers(0, m, n)
    norms = rng.uniform(0.1, 5.0, (n, 1))
    signs = rng.choice([-1.0, 1.0], (n, 1))
    X = dirs[labels] * norms * signs + noise * norms * rng.standard_normal((n, d)) / np.sqrt(d)
    return X.astype(dtype), labels


def is_relabeling(a, b):
    """True when partitions a and b are identical up to renaming the clusters."""
    pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist(), strict=True))
    return len(pairs) == len(set(np.asarray(a).tolist())) == len(set(np.asarray(b).tolist()))


def reference_lloyd(X, C, weighted, max_iters):
    """Plain numpy Algorithm 1 from given seeds, with the same stopping rule (tol = 0).

    Returns the centroids of the last assignment step, that assignment and the number of steps.
    """
    norms = np.linalg.norm(X, axis=1)
    prev, it = None, 0
    while True:
        cn = np.linalg.norm(C, axis=1, keepdims=True)
        dirs = C if weighted else C / np.where(cn > 0, cn, 1)
        dots = X @ dirs.T
        a = np.argmax(np.abs(dots), axis=1)
        s = np.where(dots[np.arange(len(X)), a] < 0, -1.0, 1.0)
        it += 1
        if (prev is not None and np.array_equal(a, prev)) or it >= max_iters:
            return C, a, it
        new = C.copy()  # an emptied cluster keeps its centroid
        for i in range(len(C)):
            mem = (a == i) & (norms > 0)
            if not mem.any():
                continue
            if weighted:
                new[i] = (s[mem, None] * X[mem]).sum(0) / norms[mem].sum()
            else:
                new[i] = (s[mem, None] * X[mem] / norms[mem, None]).mean(0)
        prev, C = a, new


@pytest.fixture(scope="module")
def planted64():
    # numpy float64; tests turn it into a jax array inside their own x64 block.
    return planted_lines(np.random.default_rng(0), 600, 16, 6)


def test_recovers_planted_lines_with_random_norms_and_signs(planted64):
    X, labels = planted64
    with enable_x64():
        res = weighted_spherical_kmeans(X, 6, jax.random.key(0))
    assert isinstance(res, KMeansResult)
    chex.assert_shape(res.centroids, (6, 16))
    chex.assert_shape(res.assignments, (600,))
    assert res.assignments.dtype == jnp.int32
    assert is_relabeling(res.assignments, labels)
    # Sign alignment: each centroid is (close to) a unit vector along its planted line. Without
    # s_j the +/- members would cancel and the norm would be far below 1.
    assert np.all(np.linalg.norm(np.asarray(res.centroids), axis=1) > 0.95)


def test_unweighted_path_recovers_planted_lines(planted64):
    X, labels = planted64
    with enable_x64():
        res = weighted_spherical_kmeans(X, 6, jax.random.key(0), weighted=False)
        C = np.asarray(res.centroids)
        Xn = np.asarray(X)
        cos = np.abs(Xn @ C.T) / np.linalg.norm(Xn, axis=1)[:, None] / np.linalg.norm(C, axis=1)
    assert is_relabeling(res.assignments, labels)
    np.testing.assert_array_equal(res.assignments, np.argmax(cos, axis=1))
    # Mean of sign-aligned unit vectors of a cluster.
    for i in range(C.shape[0]):
        mem = np.asarray(res.assignments) == i
        u = Xn[mem] / np.linalg.norm(Xn[mem], axis=1, keepdims=True)
        u *= np.where(u @ C[i] < 0, -1.0, 1.0)[:, None]
        # Centroids of the returned assignments agree with the returned ones after convergence.
        np.testing.assert_allclose(u.mean(0), C[i], atol=1e-10)


def test_objective_and_assignments_match_returned_centroids():
    # Unstructured data, so three steps do not converge and num_iters is exactly max_iters.
    X = np.random.default_rng(11).standard_normal((600, 16))
    with enable_x64():
        res = weighted_spherical_kmeans(X, 6, jax.random.key(1), max_iters=3, tol=0.0)
        Xn, C, a = np.asarray(X), np.asarray(res.centroids), np.asarray(res.assignments)
        dots = Xn @ C.T
        np.testing.assert_allclose(float(res.objective), np.abs(dots[np.arange(len(a)), a]).sum(), rtol=1e-12)
        # S1 argmax: ||C_i|| |cos(G_j, C_i)| = |<G_j, C_i>| / ||G_j||.
        s1 = np.abs(dots) / np.linalg.norm(Xn, axis=1)[:, None]
        np.testing.assert_array_equal(a, np.argmax(s1, axis=1))
    assert int(res.num_iters) == 3


@pytest.mark.parametrize("weighted", [True, False])
def test_matches_numpy_reference_from_same_seeds(weighted):
    # Same shapes and static configuration as the public calls above: one compiled program.
    rng = np.random.default_rng(3)
    with enable_x64():
        X, _ = planted_lines(rng, 600, 16, 6, noise=0.6)
        X = jnp.asarray(X)
        key = jax.random.key(7)
        static = K._static_config(600, 6, weighted, K.DEFAULT_BLOCK_SIZE)
        seed = jax.jit(K.seed_centroids, static_argnames=("capacity", "weighted", "sample_size"))
        seeds = seed(X, K._row_norms(X), key, 6, capacity=6, weighted=weighted,
                     sample_size=static["seed_sample"])
        C_ref, a_ref, it_ref = reference_lloyd(np.asarray(X), np.asarray(seeds), weighted, 50)
        out = K._kmeans_single(X, key, jnp.int32(6), jnp.int32(50), jnp.float64(0.0), **static)
    assert int(out[3]) == it_ref
    np.testing.assert_array_equal(out[1], a_ref)
    np.testing.assert_allclose(out[0], C_ref, atol=1e-12)


def test_incremental_and_full_updates_agree():
    rng = np.random.default_rng(4)
    with enable_x64():
        X = jnp.asarray(planted_lines(rng, 500, 8, 6, noise=1.0)[0])
        runs = [
            K._kmeans_single(X, jax.random.key(2), jnp.int32(6), jnp.int32(40), jnp.float64(0.0),
                             capacity=6, weighted=True,
                             block_size=128, sparse_tiers=tiers, seed_sample=500)
            for tiers in [(1,), (3, 30, 500)]  # always rebuild / patch after the first step
        ]
    for r in runs[1:]:
        np.testing.assert_array_equal(r[1], runs[0][1])
        np.testing.assert_allclose(r[0], runs[0][0], atol=1e-12)
        assert int(r[3]) == int(runs[0][3])


def test_block_size_does_not_change_result(planted64):
    X, _ = planted64
    with enable_x64():
        a = weighted_spherical_kmeans(X, 6, jax.random.key(5), block_size=600)
        b = weighted_spherical_kmeans(X, 6, jax.random.key(5), block_size=77)  # 600 = 7 * 77 + 61
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-12)


def test_same_key_same_result_float32():
    X, _ = planted_lines(np.random.default_rng(5), 600, 16, 6, noise=0.5, dtype=np.float32)
    r1 = weighted_spherical_kmeans(X, 6, jax.random.key(9))
    r2 = weighted_spherical_kmeans(X, 6, jax.random.key(9))
    assert r1.centroids.dtype == jnp.float32
    chex.assert_trees_all_equal(tuple(r1), tuple(r2))


def test_empty_clusters_trigger_restart_with_fewer():
    # Only 3 distinct lines: at most 3 clusters can be non-empty, so asking for 7 must restart.
    rng = np.random.default_rng(6)
    dirs = rng.standard_normal((3, 16))
    labels = rng.integers(0, 3, 600)
    X = dirs[labels] * rng.uniform(0.5, 2, (600, 1)) * rng.choice([-1.0, 1.0], (600, 1))
    res = weighted_spherical_kmeans(X.astype(np.float32), 7, jax.random.key(0))
    chex.assert_shape(res.centroids, (3, 16))
    counts = np.bincount(np.asarray(res.assignments), minlength=res.centroids.shape[0])
    assert np.all(counts > 0)
    assert is_relabeling(res.assignments, labels)


def test_no_empty_cluster_on_unstructured_data():
    X = np.random.default_rng(7).standard_normal((600, 16)).astype(np.float32)
    for m in (6, 40):
        res = weighted_spherical_kmeans(X, m, jax.random.key(1))
        m_out = res.centroids.shape[0]
        assert 1 <= m_out <= m
        assert np.all(np.bincount(np.asarray(res.assignments), minlength=m_out) > 0)


# A cluster that has two members after the first step and loses them in the second.
EMPTYING_X = np.array([[0.2, 0.1], [1.2, 1.0], [0.0, -0.5], [-0.3, -0.4], [-0.2, -1.6], [-0.5, -0.4]])
EMPTYING_INIT = np.array([[-0.2, -0.3], [0.7, -0.5], [-0.4, 0.5]])


def test_cluster_emptied_during_lloyd_keeps_centroid_and_is_counted():
    with enable_x64():
        X = jnp.asarray(EMPTYING_X)
        C, a, it = reference_lloyd(EMPTYING_X, EMPTYING_INIT.copy(), True, 50)
        out = K._kmeans_single(X, jax.random.key(0), jnp.int32(3), jnp.int32(50), jnp.float64(0.0),
                               jnp.asarray(EMPTYING_INIT),
                               **K._static_config(6, 3, True, K.DEFAULT_BLOCK_SIZE))
    assert np.bincount(a, minlength=3)[1] == 0
    np.testing.assert_array_equal(out[1], a)
    np.testing.assert_allclose(out[0], C, atol=1e-12)
    np.testing.assert_array_equal(out[4], np.bincount(a, minlength=3))


def test_cluster_emptied_during_lloyd_triggers_restart():
    with enable_x64():
        res = weighted_spherical_kmeans(jnp.asarray(EMPTYING_X), 3, jax.random.key(0),
                                        init=jnp.asarray(EMPTYING_INIT))
    chex.assert_shape(res.centroids, (2, 2))
    assert np.all(np.bincount(np.asarray(res.assignments), minlength=2) > 0)


def test_zero_rows_carry_no_weight(planted64):
    X, _ = planted64
    with enable_x64():
        Xz = jnp.concatenate([X, jnp.zeros((5, X.shape[1]))])
        a = weighted_spherical_kmeans(X, 6, jax.random.key(3), seed_sample_size=600)
        b = weighted_spherical_kmeans(Xz, 6, jax.random.key(3), seed_sample_size=605)
    np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-12)
    np.testing.assert_array_equal(a.assignments, b.assignments[:600])
    np.testing.assert_array_equal(b.assignments[600:], 0)
    np.testing.assert_allclose(a.objective, b.objective, rtol=1e-12)


def test_assign_clusters_matches_bruteforce():
    rng = np.random.default_rng(8)
    with enable_x64():
        X = rng.standard_normal((203, 9))
        X[5] = 0.0
        C = rng.standard_normal((4, 9)) * np.array([[0.1], [1.0], [3.0], [0.5]])
        for weighted in (True, False):
            a, sim = assign_clusters(jnp.asarray(X), jnp.asarray(C), weighted=weighted, block_size=50)
            xn = np.linalg.norm(X, axis=1)[:, None]
            cos = np.abs(X @ C.T) / np.where(xn > 0, xn, 1) / np.linalg.norm(C, axis=1)
            score = cos * np.linalg.norm(C, axis=1) if weighted else cos
            np.testing.assert_array_equal(a, np.argmax(score, axis=1))
            np.testing.assert_allclose(sim, score.max(axis=1), rtol=1e-12)
            assert int(a[5]) == 0 and float(sim[5]) == 0.0


@pytest.mark.parametrize("dtype,n,block", [(np.float32, 203, 50), (np.float32, 37, 64), (np.float64, 150, 16)])
def test_assign_rows_is_assign_clusters_of_the_gathered_rows(dtype, n, block):
    """Gathered block by block, bit for bit the same as on the (R, D) copy."""
    rng = np.random.default_rng(4)
    with enable_x64():
        X = rng.standard_normal((n, 11)).astype(dtype)
        X[3] = 0
        rows = np.sort(rng.choice(n, size=n * 2 // 3, replace=False))
        C = rng.standard_normal((5, 11)).astype(dtype)
        for weighted in (True, False):
            want = assign_clusters(jnp.asarray(X[rows]), jnp.asarray(C), weighted=weighted, block_size=block)
            got = K.assign_rows(jnp.asarray(X), jnp.asarray(rows), jnp.asarray(C), weighted=weighted,
                                block_size=block)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
            assert got[1].dtype == dtype


def test_cluster_centroids_matches_definition():
    rng = np.random.default_rng(9)
    with enable_x64():
        X = rng.standard_normal((50, 5))
        a = rng.integers(0, 3, 50)
        ref = rng.standard_normal((3, 5))
        C = np.asarray(cluster_centroids(jnp.asarray(X), jnp.asarray(a), 3, reference=jnp.asarray(ref),
                                         block_size=16))
        C_plain = np.asarray(cluster_centroids(jnp.asarray(X), jnp.asarray(a), 3, weighted=False))
    n = np.linalg.norm(X, axis=1)
    for i in range(3):
        m = a == i
        s = np.where(X[m] @ ref[i] < 0, -1.0, 1.0)
        np.testing.assert_allclose(C[i], (s[:, None] * X[m]).sum(0) / n[m].sum(), atol=1e-12)
        np.testing.assert_allclose(C_plain[i], (X[m] / n[m, None]).mean(0), atol=1e-12)


def test_memory_does_not_grow_with_n_beyond_data():
    # Compile only (no data): the temporaries must be O(N) scalars plus O(block x (M + D)), i.e.
    # nowhere near another copy of G (N x D) or an N x M similarity matrix.
    n, d, m = 200_000, 512, 50
    G = jax.ShapeDtypeStruct((n, d), jnp.float32)
    static = K._static_config(n, m, True, K.DEFAULT_BLOCK_SIZE)
    lowered = K._kmeans_single.lower(G, jax.random.key(0), jnp.int32(m), jnp.int32(200), jnp.float32(1e-4),
                                     **static)
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    block = static["block_size"]
    # A handful of length-N vectors, a few (block, D) / (block, M) / (M, D) buffers and the seeding
    # subsample. A copy of G alone would be n * d * 4 = 410 MB, an N x M matrix 40 MB.
    budget = 16 * 4 * n + 8 * 4 * block * (d + m) + 2 * 4 * static["seed_sample"] * d
    assert temp < budget, (temp, budget)
    assert temp < 0.05 * n * d * 4


@pytest.mark.slow
def test_scales_to_200k_by_512():
    X = jax.random.normal(jax.random.key(0), (200_000, 512), jnp.float32)
    res = weighted_spherical_kmeans(X, 50, jax.random.key(1), max_iters=10)
    chex.assert_shape(res.assignments, (200_000,))
    assert np.all(np.bincount(np.asarray(res.assignments), minlength=res.centroids.shape[0]) > 0)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(G=np.ones(5)), ValueError, "G must be a 2-D"),
        (dict(G=np.ones((5, 2), np.int32)), TypeError, "G must have a floating"),
        (dict(G=np.array([[1.0, np.nan], [1.0, 2.0]])), ValueError, "G contains NaN"),
        (dict(G=np.array([[1.0, np.inf], [1.0, 2.0]])), ValueError, "G contains NaN"),
        (dict(G=np.zeros((4, 2))), ValueError, "G must have at least one nonzero"),
        (dict(num_clusters=0), ValueError, "num_clusters"),
        (dict(num_clusters=11), ValueError, "num_clusters"),
        (dict(num_clusters=2.0), TypeError, "num_clusters"),
        (dict(max_iters=0), ValueError, "max_iters"),
        (dict(tol=-1.0), ValueError, "tol"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(key=None), TypeError, "key"),
        (dict(key=np.zeros(3, np.uint32)), TypeError, "key"),
        (dict(init=np.ones((3, 3))), ValueError, "init"),
        (dict(cluster_capacity=1), ValueError, "cluster_capacity"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(kwargs, exc, match):
    args = dict(G=np.ones((10, 3), np.float32), num_clusters=2, key=jax.random.key(0))
    args.update(kwargs)
    G, m, key = args.pop("G"), args.pop("num_clusters"), args.pop("key")
    with pytest.raises(exc, match=match):
        weighted_spherical_kmeans(G, m, key, **args)
