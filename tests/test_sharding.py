"""Sharded (4 host devices) results equal single-device results (issue 8).

The checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` set before jax is imported,
so they run in one subprocess: this file executed as a script (``python test_sharding.py worker``)
computes every comparison and prints one JSON line; the tests below assert on it. The module
imports nothing from jax at the top so that the pytest process is unaffected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

RTOL = 1e-5
NUM_DEVICES = 4


def _rel(a, b):
    import numpy as np

    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _tree_rel(a, b):
    import jax

    return max(_rel(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _sharded_over(x, mesh, spec):
    from jax.sharding import NamedSharding

    s = x.sharding
    return (isinstance(s, NamedSharding) and s.mesh == mesh and len(s.device_set) == NUM_DEVICES
            and tuple(s.spec)[:len(spec)] == tuple(spec) and all(e is None for e in tuple(s.spec)[len(spec):]))


def _worker() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P

    import pivotal
    from pivotal import features as F
    from pivotal import sharding as S
    from pivotal.kmeans import weighted_spherical_kmeans

    assert jax.device_count() == NUM_DEVICES, jax.devices()
    out: dict = {}
    mesh = S.data_mesh()
    data = P("data")

    # A small MLP: x (5) -> 16 tanh -> 3 classes.
    key = jax.random.key(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {"l1": {"kernel": jax.random.normal(k1, (5, 16)) * 0.5, "bias": jnp.zeros(16)},
              "l2": {"kernel": jax.random.normal(k2, (16, 3)) * 0.5, "bias": jnp.zeros(3)}}

    def forward(p, b):
        h = jnp.tanh(b["x"] @ p["l1"]["kernel"] + p["l1"]["bias"])
        return h, h @ p["l2"]["kernel"] + p["l2"]["bias"]

    def loss_fn(p, b):
        _, z = forward(p, b)
        return jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, b["y"][:, None], 1)[:, 0]

    rng = np.random.RandomState(0)
    n = 64
    batch = {"x": rng.randn(n, 5).astype(np.float32), "y": (np.arange(n) % 3).astype(np.int32),
             "index": np.arange(n, dtype=np.int32)}
    meta = {"x": rng.randn(16, 5).astype(np.float32), "y": (np.arange(16) % 3).astype(np.int32),
            "index": np.arange(16, dtype=np.int32)}
    sbatch = S.shard_examples(batch, mesh)
    smeta = S.shard_examples(meta, mesh)
    out["inputs_sharded"] = all(_sharded_over(x, mesh, data) for x in jax.tree_util.tree_leaves((sbatch, smeta)))

    # --- shard_examples validation
    try:
        S.shard_examples({"x": np.zeros((6, 2))}, mesh)
        out["indivisible_raises"] = False
    except ValueError as e:
        out["indivisible_raises"] = "divisible" in str(e)

    # --- meta re-weighting step (direct weights, momentum), batch + meta sharded, state replicated
    trainer = pivotal.make_meta_step(loss_fn, pivotal.direct_weights(weight_lr=50.0),
                                     optimizer=optax.sgd(1.0, momentum=0.9), learning_rate=0.1)
    state0 = trainer.init(params, k3, num_examples=n)
    ref_state, sh_state = state0, S.replicate(state0, mesh)
    for i in range(3):
        kk = jax.random.fold_in(k4, i)
        ref_state, ref_metrics = trainer.step(ref_state, batch, meta, kk)
        sh_state, sh_metrics = trainer.step(sh_state, sbatch, smeta, kk)
    out["step_rel"] = max(_tree_rel(ref_state, sh_state), _tree_rel(ref_metrics, sh_metrics))
    out["step_params_replicated"] = all(
        isinstance(x.sharding, jax.sharding.NamedSharding) and len(x.sharding.device_set) == NUM_DEVICES
        and x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(sh_state.params))
    out["step_weights_changed"] = bool(np.any(np.asarray(sh_state.rule_state.weights)
                                              != np.asarray(state0.rule_state.weights)))

    # --- per-example gradients: GSPMD unchunked, shard_map chunked
    ref = F.per_example_grads(loss_fn, params, batch)
    got = F.per_example_grads(loss_fn, params, sbatch)
    out["grads_rel"] = _tree_rel(ref, got)
    out["grads_sharded"] = all(_sharded_over(x, mesh, data) for x in jax.tree_util.tree_leaves(got))
    got = S.sharded_per_example_grads(loss_fn, params, sbatch, mesh, chunk_size=4)
    out["grads_chunked_rel"] = _tree_rel(ref, got)
    out["grads_chunked_sharded"] = all(_sharded_over(x, mesh, data) for x in jax.tree_util.tree_leaves(got))

    # --- RBC features (label-free and label-aware), and snapshot history of them
    h, z = forward(params, batch)
    sh_h, sh_z = jax.jit(forward)(params, sbatch)
    out["forward_sharded"] = _sharded_over(sh_h, mesh, data) and _sharded_over(sh_z, mesh, data)
    ref = F.rbc_features(h, z)
    got = F.rbc_features(sh_h, sh_z)
    ref_l = F.rbc_features(h, z, batch["y"])
    got_l = F.rbc_features(sh_h, sh_z, sbatch["y"])
    out["rbc_rel"] = max(_rel(got, ref), _rel(got_l, ref_l))
    out["rbc_sharded"] = _sharded_over(got, mesh, data) and _sharded_over(got_l, mesh, data)

    snapshots = [params, jax.tree_util.tree_map(lambda x: 0.9 * x + 0.01, params)]
    ref = F.history_features(F.make_rbc_feature_fn(forward, batch), snapshots, k1)
    got = F.history_features(F.make_rbc_feature_fn(forward, sbatch), snapshots, k1)
    out["rbc_history_rel"] = _rel(got, ref)
    out["rbc_history_sharded"] = _sharded_over(got, mesh, data)

    # --- GBC features with snapshot history
    gfn = lambda b: F.make_gbc_feature_fn(loss_fn, b, num_layers=3)  # noqa: E731
    ref = F.history_features(gfn(batch), snapshots, k2)
    got = F.history_features(gfn(sbatch), snapshots, k2)
    out["gbc_rel"] = _rel(got, ref)
    out["gbc_sharded"] = _sharded_over(got, mesh, data)

    # --- weighted spherical K-means on sharded G, GBC-like (mixed signs) and RBC-like features
    G = np.asarray(ref, np.float32)
    G = np.concatenate([G, -G[:32] * 0.5 + 0.01], axis=0)  # N = 96
    for weighted in (True, False):
        res = weighted_spherical_kmeans(G, 6, k3, weighted=weighted)
        sres = S.sharded_spherical_kmeans(S.shard_examples(G, mesh), 6, k3, mesh, weighted=weighted)
        gres = weighted_spherical_kmeans(S.shard_examples(G, mesh), 6, k3, weighted=weighted)
        tag = "w" if weighted else "u"
        out[f"kmeans_{tag}_rel"] = max(_rel(sres.centroids, res.centroids), _rel(sres.objective, res.objective),
                                       _rel(gres.centroids, res.centroids))
        out[f"kmeans_{tag}_assign_equal"] = bool(np.array_equal(np.asarray(sres.assignments), np.asarray(res.assignments))
                                                 and np.array_equal(np.asarray(gres.assignments), np.asarray(res.assignments)))
        out[f"kmeans_{tag}_iters_equal"] = int(sres.num_iters) == int(res.num_iters)
        out[f"kmeans_{tag}_assign_sharded"] = _sharded_over(sres.assignments, mesh, data)
        out[f"kmeans_{tag}_centroids_replicated"] = sres.centroids.sharding.is_fully_replicated
    # N not divisible by 4: zero padding inside, same result.
    res = weighted_spherical_kmeans(G[:90], 5, k2)
    sres = S.sharded_spherical_kmeans(G[:90], 5, k2, mesh)
    out["kmeans_pad_rel"] = _rel(sres.centroids, res.centroids)
    out["kmeans_pad_assign_equal"] = bool(np.array_equal(np.asarray(sres.assignments), np.asarray(res.assignments)))

    # --- select_meta_samples on sharded features (GSPMD)
    ref = pivotal.select_meta_samples(G, 5, k1, existing=np.array([0, 3]))
    got = pivotal.select_meta_samples(S.shard_examples(G, mesh), 5, k1, existing=np.array([0, 3]))
    out["select_equal"] = bool(np.array_equal(ref, got))
    got_mesh = pivotal.select_meta_samples(G, 5, k1, existing=np.array([0, 3]), mesh=mesh)
    out["select_mesh_equal"] = bool(np.array_equal(ref, got_mesh))

    # --- RBC sketch shards row-wise
    sk = S.sketch_rbc_features(h, z, key=k1, sketch_classes=2, sketch_dim=8)
    ssk = S.sketch_rbc_features(sh_h, sh_z, key=k1, sketch_classes=2, sketch_dim=8)
    out["sketch_rel"] = _rel(ssk, sk)
    out["sketch_sharded"] = _sharded_over(ssk, mesh, data)
    return out


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "worker"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_inputs_sharded(results):
    assert results["inputs_sharded"]
    assert results["indivisible_raises"]


def test_meta_step_matches(results):
    assert results["step_rel"] <= RTOL
    assert results["step_params_replicated"]
    assert results["step_weights_changed"]


def test_per_example_grads_match(results):
    assert results["grads_rel"] <= RTOL and results["grads_sharded"]
    assert results["grads_chunked_rel"] <= RTOL and results["grads_chunked_sharded"]


def test_rbc_features_match(results):
    assert results["forward_sharded"]
    assert results["rbc_rel"] <= RTOL and results["rbc_sharded"]
    assert results["rbc_history_rel"] <= RTOL and results["rbc_history_sharded"]


def test_gbc_features_match(results):
    assert results["gbc_rel"] <= RTOL and results["gbc_sharded"]


@pytest.mark.parametrize("tag", ["w", "u"])
def test_kmeans_matches(results, tag):
    assert results[f"kmeans_{tag}_rel"] <= RTOL
    assert results[f"kmeans_{tag}_assign_equal"]
    assert results[f"kmeans_{tag}_iters_equal"]
    assert results[f"kmeans_{tag}_assign_sharded"]
    assert results[f"kmeans_{tag}_centroids_replicated"]


def test_kmeans_padded(results):
    assert results["kmeans_pad_rel"] <= RTOL and results["kmeans_pad_assign_equal"]


def test_select_meta_samples_matches(results):
    assert results["select_equal"]
    assert results["select_mesh_equal"]  # the K-means sharded with shard_map


def test_sketch_sharded(results):
    assert results["sketch_rel"] <= RTOL and results["sketch_sharded"]


def test_sketch_inner_products():
    """Kronecker sketch: unbiased inner products, error shrinking with the sketch size."""
    import jax
    import numpy as np

    from pivotal import features as F
    from pivotal.sharding import sketch_rbc_features

    rng = np.random.RandomState(0)
    h = rng.randn(12, 200).astype(np.float32)
    z = rng.randn(12, 10).astype(np.float32)
    y = rng.randint(0, 10, 12).astype(np.int32)
    G = np.asarray(F.rbc_features(h, z, y), np.float64)
    gram = G @ G.T
    scale = np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    errs = {}
    for k_a, k_h in ((2, 8), (8, 64)):  # C x D = 2000 columns sketched to 16 and 512
        errs[(k_a, k_h)] = []
        mean = np.zeros_like(gram)
        reps = 200
        for r in range(reps):
            S = np.asarray(sketch_rbc_features(h, z, y, key=jax.random.key(r), sketch_classes=k_a, sketch_dim=k_h),
                           np.float64)
            assert S.shape == (12, k_a * k_h)
            est = S @ S.T
            mean += est / reps
            errs[(k_a, k_h)].append(np.mean(np.abs(est - gram) / scale))
        # Unbiased: the average over keys approaches the exact Gram (normalised by the norms).
        assert np.max(np.abs(mean - gram) / scale) < (0.4 if k_a == 2 else 0.15)  # ~4 standard errors over 200 keys
    small, large = np.mean(errs[(2, 8)]), np.mean(errs[(8, 64)])
    print("sketch mean |<S_i,S_j> - <G_i,G_j>| / (|G_i||G_j|):", small, large)
    assert large < 0.5 * small
    assert large < 0.3


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    print("RESULT " + json.dumps(_worker()), flush=True)
