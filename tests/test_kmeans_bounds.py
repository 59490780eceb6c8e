"""The bounded Lloyd loop (pivotal.elkan, ``algorithm="elkan"``) gives the plain loop's results.

Same assignments, centroids and iteration count bit for bit (the sums are refreshed by the same
code with the same decisions); the objective to float summation order. A second table checks
that the bounds skip work where they should, and that a skipped row really keeps its cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pivotal import kmeans as K
from pivotal.elkan import elkan_loop, rounding_margin
from pivotal.kmeans import weighted_spherical_kmeans
from tests.test_kmeans import EMPTYING_INIT, EMPTYING_X, planted_lines


def _data(kind, n, d, m, dtype, seed):
    rng = np.random.default_rng(seed)
    if kind == "random":
        X = rng.standard_normal((n, d))
    elif kind == "lines":
        X = planted_lines(rng, n, d, m, noise=0.8)[0]
    elif kind == "zero_rows":
        X = planted_lines(rng, n, d, m, noise=0.8)[0]
        X[rng.choice(n, n // 10, replace=False)] = 0.0
    elif kind == "duplicates":  # exact ties between rows, and rows equal to -rows
        base = rng.standard_normal((n // 4, d))
        X = np.concatenate([base, base, -base, 2 * base])
    else:
        raise ValueError(kind)
    return X.astype(dtype)


# (name, data kind, n, d, m, dtype, weighted, extra keyword arguments of weighted_spherical_kmeans);
# every case compiles two K-means programs, so most of the table runs with the slow tests.
SLOW = pytest.mark.slow
CASES = [
    ("f64-weighted", "lines", 1500, 16, 8, np.float64, True, {}),
    ("f32-unweighted", "random", 2000, 12, 7, np.float32, False, {}),
    ("f32-duplicate-rows", "duplicates", 1600, 8, 5, np.float32, True, {}),
    pytest.param("f64-unweighted", "lines", 1500, 16, 8, np.float64, False, {}, marks=SLOW),
    pytest.param("f32-weighted", "lines", 3000, 24, 10, np.float32, True, {}, marks=SLOW),
    pytest.param("f32-random-small-blocks", "random", 2000, 12, 9, np.float32, True, dict(block_size=300), marks=SLOW),
    pytest.param("f64-zero-rows", "zero_rows", 1200, 10, 6, np.float64, True, {}, marks=SLOW),
    pytest.param("f64-tol0-maxiters", "random", 900, 6, 5, np.float64, True, dict(tol=0.0, max_iters=25), marks=SLOW),
    pytest.param("f32-capacity", "lines", 1000, 8, 4, np.float32, True, dict(cluster_capacity=7), marks=SLOW),
    pytest.param("f32-many-clusters", "random", 1000, 8, 60, np.float32, True, {}, marks=SLOW),
]


def _case_id(case):
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("name, kind, n, d, m, dtype, weighted, kwargs", CASES, ids=[_case_id(c) for c in CASES])
def test_elkan_equals_plain_lloyd(name, kind, n, d, m, dtype, weighted, kwargs):
    X = _data(kind, n, d, m, dtype, seed=len(name))
    with jax.enable_x64(dtype == np.float64):
        runs = {alg: weighted_spherical_kmeans(X, m, jax.random.key(3), weighted=weighted, algorithm=alg, **kwargs)
                for alg in ("lloyd", "elkan")}
    plain, fast = runs["lloyd"], runs["elkan"]
    np.testing.assert_array_equal(fast.assignments, plain.assignments)
    np.testing.assert_array_equal(fast.centroids, plain.centroids)
    assert int(fast.num_iters) == int(plain.num_iters)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(float(fast.objective), float(plain.objective), rtol=rtol)


def test_elkan_with_init_and_emptied_cluster_restart():
    # A cluster empties during the Lloyd loop: same restart, same result.
    with jax.enable_x64(True):
        runs = [weighted_spherical_kmeans(jnp.asarray(EMPTYING_X), 3, jax.random.key(0),
                                          init=jnp.asarray(EMPTYING_INIT), algorithm=alg)
                for alg in ("lloyd", "elkan")]
    assert runs[0].centroids.shape == runs[1].centroids.shape == (2, 2)
    np.testing.assert_array_equal(runs[1].assignments, runs[0].assignments)
    np.testing.assert_array_equal(runs[1].centroids, runs[0].centroids)


def _run_loop(X, m, *, weighted=True, max_iters=200, tol=1e-4, key=0):
    n = X.shape[0]
    static = K._static_config(n, m, weighted, K.DEFAULT_BLOCK_SIZE)
    seeds = jax.jit(K.seed_centroids, static_argnames=("capacity", "weighted", "sample_size"))(
        X, K._row_norms(X), jax.random.key(key), m, capacity=m, weighted=weighted, sample_size=static["seed_sample"])
    loop = jax.jit(lambda X, seeds: elkan_loop(X, K._row_norms(X), seeds, max_iters, tol, weighted=weighted,
                                               block_size=static["block_size"], sparse_tiers=static["sparse_tiers"],
                                               with_stats=True))
    return loop(X, seeds)


# (name, data, clusters, expected: the bounds skip at least this fraction of the row scorings)
# (measured: 0.59 and 0.49 of the scorings are done)
SKIP_CASES = [
    ("noisy lines", lambda: planted_lines(np.random.default_rng(1), 8000, 32, 10, noise=2.0)[0], 10, 0.3),
    pytest.param("unstructured, 40 steps", lambda: np.random.default_rng(2).standard_normal((8000, 16)), 8, 0.2,
                 marks=SLOW),
]


@pytest.mark.parametrize("name, make, m, skipped", SKIP_CASES, ids=[_case_id(c) for c in SKIP_CASES])
def test_bounds_skip_work(name, make, m, skipped):
    X = jnp.asarray(make().astype(np.float32))
    *_, iters, _, scored = _run_loop(X, m, max_iters=40, tol=0.0)
    fraction = int(scored) / (int(iters) * X.shape[0])
    assert int(iters) > 2
    assert fraction <= 1 - skipped, fraction


def test_rounding_margin_covers_a_dot_products_error():
    # The margin per unit ||x|| ||e|| must exceed the observed rounding of float32 dot products
    # against a float64 reference, and grow with the steps whose bound updates it covers.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 640)).astype(np.float32)
    e = rng.standard_normal((50, 640)).astype(np.float32)
    err = np.abs(np.asarray(jnp.asarray(x) @ jnp.asarray(e).T, np.float64) - x.astype(np.float64) @ e.T.astype(np.float64))
    scale = np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(e, axis=1)[None, :]
    tau0 = float(rounding_margin(jnp.float32, 640, jnp.int32(0)))
    assert np.max(err / scale) < tau0 / 4  # each side of the test gets a quarter
    assert float(rounding_margin(jnp.float32, 640, jnp.int32(100))) > tau0


def test_bad_algorithm_names_the_argument():
    with pytest.raises(ValueError, match="algorithm must be one of"):
        weighted_spherical_kmeans(np.ones((10, 3), np.float32), 2, jax.random.key(0), algorithm="hamerly")


_SHARDED = textwrap.dedent("""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np
    from pivotal import data_mesh
    from pivotal.kmeans import weighted_spherical_kmeans
    from tests.test_kmeans import planted_lines
    X = planted_lines(np.random.default_rng(5), 4000, 16, 8, noise=0.8)[0].astype(np.float32)
    one = weighted_spherical_kmeans(X, 8, jax.random.key(1))
    two = weighted_spherical_kmeans(X, 8, jax.random.key(1), mesh=data_mesh(2), algorithm="elkan")
    print(json.dumps({"devices": jax.device_count(),
                      "same_assignments": bool(np.array_equal(one.assignments, two.assignments)),
                      "iters": [int(one.num_iters), int(two.num_iters)],
                      "centroid_diff": float(np.max(np.abs(np.asarray(one.centroids) - np.asarray(two.centroids)))),
                      "objective_rel": float(abs(one.objective - two.objective) / one.objective)}))
""")


@pytest.mark.slow
def test_elkan_sharded_matches_single_device_plain():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, cwd=root, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    assert out["same_assignments"] and out["iters"][0] == out["iters"][1]
    assert out["centroid_diff"] < 1e-5 and out["objective_rel"] < 1e-5
