"""Out-of-core features (chunked memmap writes) and K-means over a memmap in host blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pivotal import features as F
from pivotal.kmeans import weighted_spherical_kmeans
from pivotal.outofcore import compute_features, kmeans_memmap, memmap_block_rows, write_features

RTOL = 1e-5


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _model():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (6, 12)) * 0.5, "w2": jax.random.normal(k2, (12, 4)) * 0.5}

    def forward(p, b):
        h = jnp.tanh(b["x"] @ p["w1"])
        return h, h @ p["w2"]

    rng = np.random.RandomState(0)
    batch = {"x": rng.randn(203, 6).astype(np.float32), "y": rng.randint(0, 4, 203).astype(np.int32)}
    return params, forward, batch


def test_write_features_matches_in_memory_with_history(tmp_path):
    params, forward, batch = _model()
    snapshots = [params, jax.tree_util.tree_map(lambda x: 0.8 * x, params)]
    fns = [lambda b, p=p: F.rbc_features(*forward(p, b), b["y"]) for p in snapshots]
    mm = write_features(fns, batch, tmp_path / "g.npy", chunk_size=64)  # 203 = 3 * 64 + 11
    assert isinstance(mm, np.memmap) and mm.shape == (203, 2 * 4 * 12)
    ref = F.history_features(lambda p, k: F.rbc_features(*forward(p, batch), batch["y"]), snapshots,
                             jax.random.key(1))
    assert _rel(mm, ref) <= RTOL
    again = np.load(tmp_path / "g.npy", mmap_mode="r")
    np.testing.assert_array_equal(again, mm)


def test_compute_features_spills_over_budget(tmp_path):
    params, forward, batch = _model()
    fn = lambda b: F.rbc_features(*forward(params, b))  # noqa: E731
    small = compute_features(fn, batch, chunk_size=50)
    assert isinstance(small, jax.Array)
    big = compute_features(fn, batch, chunk_size=50, memory_budget_bytes=1000, path=tmp_path / "f.npy")
    assert isinstance(big, np.memmap)
    assert _rel(big, small) <= RTOL
    with pytest.raises(ValueError, match="path="):
        compute_features(fn, batch, chunk_size=50, memory_budget_bytes=1000)


def _clustered(n, d, seed, signs=True):
    rng = np.random.RandomState(seed)
    centers = rng.randn(8, d)
    G = centers[rng.randint(0, 8, n)] + 0.4 * rng.randn(n, d)
    if signs:
        G *= rng.choice([-1.0, 1.0], size=(n, 1))
    G *= rng.uniform(0.2, 3.0, size=(n, 1))
    return G.astype(np.float32)


@pytest.mark.parametrize("weighted,seed_sample_size", [(True, None), (False, None), (True, 700)])
def test_kmeans_memmap_over_budget_matches_in_memory(tmp_path, weighted, seed_sample_size):
    n, d, m = 3000, 24, 7
    G = _clustered(n, d, 1)
    mm = np.lib.format.open_memmap(tmp_path / "G.npy", mode="w+", dtype=np.float32, shape=(n, d))
    mm[:] = G
    mm.flush()
    mm = np.load(tmp_path / "G.npy", mmap_mode="r")
    budget = 64 * 1024
    assert mm.nbytes > 4 * budget  # the array does not fit the device budget
    rows = memmap_block_rows(d, m, 4, budget)
    assert rows * d * 4 <= budget and rows < n
    key = jax.random.key(3)
    kw = dict(weighted=weighted, seed_sample_size=seed_sample_size)
    res = kmeans_memmap(mm, m, key, memory_budget_bytes=budget, **kw)
    ref = weighted_spherical_kmeans(np.array(mm), m, key, **kw)  # in-memory copy
    assert res.centroids.shape == ref.centroids.shape
    assert _rel(res.centroids, ref.centroids) <= RTOL
    assert _rel(res.objective, ref.objective) <= RTOL
    np.testing.assert_array_equal(res.assignments, np.asarray(ref.assignments))
    assert int(res.num_iters) == int(ref.num_iters)


def test_kmeans_memmap_block_size_invariant_and_errors(tmp_path):
    G = _clustered(500, 10, 2)
    key = jax.random.key(0)
    a = kmeans_memmap(G, 5, key, block_rows=37)
    b = kmeans_memmap(G, 5, key, block_rows=500)
    assert _rel(a.centroids, b.centroids) <= RTOL
    np.testing.assert_array_equal(a.assignments, b.assignments)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        kmeans_memmap(G, 5, key)
    with pytest.raises(ValueError, match="cannot hold"):
        kmeans_memmap(G, 5, key, memory_budget_bytes=100)
    bad = G.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kmeans_memmap(bad, 5, key, block_rows=64)
