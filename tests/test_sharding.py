"""Sharded (4 host devices) results equal single-device results (issue 8).

The checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` set before jax is imported,
so they run in one subprocess: this file executed as a script (``python test_sharding.py worker``)
computes every comparison and prints one JSON line; the tests below assert on it. The module
imports nothing from jax at the top so that the pytest process is unaffected.
"""

from __future__ import annotations

import contextlib
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


def _collectives(hlo: str) -> dict:
    """Counts of the cross-device operations in compiled HLO text."""
    import re

    ops = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in ops}


@contextlib.contextmanager
def _recording(module, name: str, arg: str, position: int | None = None):
    """Records the ``arg`` every call of ``module.name`` receives (keyword, or at ``position``)."""
    seen: list = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(kwargs[arg] if arg in kwargs else args[position] if position is not None and
                    len(args) > position else None)
        return original(*args, **kwargs)

    setattr(module, name, spy)
    try:
        yield seen
    finally:
        setattr(module, name, original)


def _problem():
    """Keys, a small MLP (x (5) -> 16 tanh -> 3 classes), its loss, 64 training and 16 meta examples."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    keys = jax.random.split(jax.random.key(0), 4)
    params = {"l1": {"kernel": jax.random.normal(keys[0], (5, 16)) * 0.5, "bias": jnp.zeros(16)},
              "l2": {"kernel": jax.random.normal(keys[1], (16, 3)) * 0.5, "bias": jnp.zeros(3)}}

    def forward(p, b):
        h = jnp.tanh(b["x"] @ p["l1"]["kernel"] + p["l1"]["bias"])
        return h, h @ p["l2"]["kernel"] + p["l2"]["bias"]

    def loss_fn(p, b):
        _, z = forward(p, b)
        return jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, b["y"][:, None], 1)[:, 0]

    rng = np.random.RandomState(0)
    n, n_meta = 64, 16
    batch = {"x": rng.randn(n, 5).astype(np.float32), "y": (np.arange(n) % 3).astype(np.int32),
             "index": np.arange(n, dtype=np.int32)}
    meta = {"x": rng.randn(n_meta, 5).astype(np.float32), "y": (np.arange(n_meta) % 3).astype(np.int32),
            "index": np.arange(n_meta, dtype=np.int32)}
    return tuple(keys), params, forward, loss_fn, batch, meta


def _worker() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import PartitionSpec as P

    import pivotal
    from pivotal import features as F
    from pivotal import grads
    from pivotal import kmeans as K
    from pivotal import sharding as S
    from pivotal.kmeans import weighted_spherical_kmeans

    assert jax.device_count() == NUM_DEVICES, jax.devices()
    out: dict = {}
    mesh = S.data_mesh()
    data = P("data")
    (k1, k2, k3, k4), params, forward, loss_fn, batch, meta = _problem()
    n = batch["x"].shape[0]
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
    # The chunk loop of per_example_grads itself follows the batch's sharding: 16 rows per device,
    # chunks of 5 (the last one shifted back) and the un-vmapped strategy.
    out["grads_local_rel"], out["grads_local_sharded"] = 0.0, True
    for kw in ({"chunk_size": 5}, {"chunk_size": 4, "strategy": "map"}):
        with _recording(grads, "_grads_step", "placement", position=7) as placements:
            got = F.per_example_grads(loss_fn, params, sbatch, **kw)
        out["grads_local_sharded"] &= set(placements) == {(mesh, "data")}
        out["grads_local_rel"] = max(out["grads_local_rel"], _tree_rel(ref, got))
        out["grads_local_sharded"] &= all(_sharded_over(x, mesh, data) for x in jax.tree_util.tree_leaves(got))
    # One compiled chunk step: no collective, and its scratch memory is that of one chunk whatever N.
    out["grads_step_collectives"], out["grads_step_temp"] = [], []
    for rows in (64, 1024):
        b = S.shard_examples({"x": np.zeros((rows, 5), np.float32), "y": np.zeros((rows,), np.int32),
                              "index": np.zeros((rows,), np.int32)}, mesh)
        o = jax.tree_util.tree_map(
            lambda x, rows=rows: jnp.zeros((rows,) + x.shape, x.dtype, device=S.example_sharding(mesh)), params)
        compiled = grads._grads_step.lower(o, np.int32(0), S.replicate(params, mesh), b, loss_fn, 4, "vmap",
                                       S.example_placement(b)).compile()
        out["grads_step_collectives"].append(_collectives(compiled.as_text()))
        out["grads_step_temp"].append(int(compiled.memory_analysis().temp_size_in_bytes))

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
    got = F.history_features(F.make_rbc_feature_fn(forward, sbatch, chunk_size=5), snapshots, k1)
    out["rbc_chunked_rel"] = _rel(got, ref)
    out["rbc_chunked_sharded"] = _sharded_over(got, mesh, data)

    # --- GBC features with snapshot history
    gfn = lambda b: F.make_gbc_feature_fn(loss_fn, b, num_layers=3)  # noqa: E731
    ref = F.history_features(gfn(batch), snapshots, k2)
    got = F.history_features(gfn(sbatch), snapshots, k2)
    out["gbc_rel"] = _rel(got, ref)
    out["gbc_sharded"] = _sharded_over(got, mesh, data)
    # Chunked: per-shard importance sums (all-reduced) and per-shard per-example chunks.
    gfn = lambda b: F.make_gbc_feature_fn(loss_fn, b, num_layers=3, chunk_size=5, importance_chunk_size=6)
    got = F.history_features(gfn(sbatch), snapshots, k2)
    out["gbc_chunked_rel"] = max(_rel(got, ref), _rel(got, F.history_features(gfn(batch), snapshots, k2)))
    out["gbc_chunked_sharded"] = _sharded_over(got, mesh, data)

    # --- weighted spherical K-means on sharded G, GBC-like (mixed signs) and RBC-like features
    G = np.asarray(ref, np.float32)
    G = np.concatenate([G, -G[:32] * 0.5 + 0.01], axis=0)  # N = 96
    for weighted in (True, False):
        res = weighted_spherical_kmeans(G, 6, k3, weighted=weighted)
        sres = S.sharded_spherical_kmeans(S.shard_examples(G, mesh), 6, k3, mesh, weighted=weighted)
        with _recording(K, "_kmeans_single", "placement") as placements:
            gres = weighted_spherical_kmeans(S.shard_examples(G, mesh), 6, k3, weighted=weighted)
        tag = "w" if weighted else "u"
        out[f"kmeans_{tag}_dispatched"] = placements == [(mesh, "data")]
        out[f"kmeans_{tag}_rel"] = max(_rel(sres.centroids, res.centroids), _rel(sres.objective, res.objective),
                                       _rel(gres.centroids, res.centroids))
        out[f"kmeans_{tag}_assign_equal"] = bool(np.array_equal(np.asarray(sres.assignments), np.asarray(res.assignments))
                                                 and np.array_equal(np.asarray(gres.assignments), np.asarray(res.assignments)))
        out[f"kmeans_{tag}_iters_equal"] = int(sres.num_iters) == int(res.num_iters)
        out[f"kmeans_{tag}_assign_sharded"] = (_sharded_over(sres.assignments, mesh, data)
                                               and _sharded_over(gres.assignments, mesh, data))
        out[f"kmeans_{tag}_centroids_replicated"] = (sres.centroids.sharding.is_fully_replicated
                                                     and gres.centroids.sharding.is_fully_replicated
                                                     and len(gres.centroids.sharding.device_set) == NUM_DEVICES)
    # The compiled run on sharded rows: beyond the k-means++ subsample (4096 rows, replicated) no
    # row of G is gathered, only all-reduces of the (M, D) sums and of scalars.
    big = jax.ShapeDtypeStruct((16384, 8), jnp.float32, sharding=S.example_sharding(mesh))
    placement = (mesh, "data")
    compiled = K._kmeans_single.lower(big, k3, jnp.int32(6), jnp.int32(50), jnp.float32(1e-4), placement=placement,
                                      **K._static_config(16384, 6, True, 2048, shard_rows=4096)).compile()
    out["kmeans_collectives"] = _collectives(compiled.as_text())
    # assign_clusters / cluster_centroids follow the sharding of G as well.
    sG = S.shard_examples(G, mesh)
    a_ref, sim_ref = pivotal.assign_clusters(G, res.centroids)
    a_got, sim_got = pivotal.assign_clusters(sG, res.centroids)
    out["assign_equal"] = bool(np.array_equal(np.asarray(a_got), np.asarray(a_ref))) and _rel(sim_got, sim_ref) <= RTOL
    out["assign_sharded"] = _sharded_over(a_got, mesh, data) and _sharded_over(sim_got, mesh, data)
    c_ref = K.cluster_centroids(G, a_ref, res.centroids.shape[0], reference=res.centroids)
    c_got = K.cluster_centroids(sG, a_got, res.centroids.shape[0], reference=res.centroids)
    out["centroids_rel"] = _rel(c_got, c_ref)
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

    # --- one process: shard_process_local_examples is shard_examples
    local = S.shard_process_local_examples(batch, mesh)
    out["process_local_equal"] = all(
        np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding == b.sharding
        for a, b in zip(jax.tree_util.tree_leaves(local), jax.tree_util.tree_leaves(sbatch)))

    # --- RBC sketch shards row-wise
    sk = S.sketch_rbc_features(h, z, key=k1, sketch_classes=2, sketch_dim=8)
    ssk = S.sketch_rbc_features(sh_h, sh_z, key=k1, sketch_classes=2, sketch_dim=8)
    out["sketch_rel"] = _rel(ssk, sk)
    out["sketch_sharded"] = _sharded_over(ssk, mesh, data)
    return out


NUM_PROCESSES = 2
LOCAL_DEVICES = 2  # per process: 4 devices in all, two row blocks per process


def _multiprocess_worker(process_id: int, port: int) -> dict:
    """One of two processes on localhost: global arrays from process-local rows, checked against
    the same computation on this process's own device with all rows."""
    import argparse

    from experiments import distributed

    parser = distributed.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(NUM_PROCESSES),
                              "--process-id", str(process_id), "--init-timeout", "60"])
    assert distributed.initialize_from_args(args)

    import jax
    import numpy as np
    import optax

    import pivotal
    from pivotal import features as F
    from pivotal import sharding as S

    out: dict = {"process_index": jax.process_index(), "devices": jax.device_count(),
                 "local_devices": jax.local_device_count()}
    mesh = S.data_mesh()
    # Every process knows the whole data set here only to compute the reference; the sharded run
    # gets each process's own half.
    (k1, _, k3, k4), params, _, loss_fn, batch, meta = _problem()
    n = batch["x"].shape[0]

    def mine(tree):
        rows = tree["x"].shape[0] // NUM_PROCESSES
        return jax.tree_util.tree_map(lambda x: x[process_id * rows:(process_id + 1) * rows], tree)

    gbatch = S.shard_process_local_examples(mine(batch), mesh)
    gmeta = S.shard_process_local_examples(mine(meta), mesh)
    x = gbatch["x"]
    out["global_shape"] = list(x.shape)
    out["spans_processes"] = not x.is_fully_addressable and len(x.sharding.device_set) == jax.device_count()
    # The rows this process passed are the rows its devices hold.
    out["local_rows_own"] = all(
        np.array_equal(np.asarray(sh.data), batch["x"][sh.index]) and
        sh.index[0].start // (n // NUM_PROCESSES) == process_id for sh in x.addressable_shards)

    def local_rel(ref, got):
        """Largest relative error over the rows of ``got`` held by this process."""
        worst = 0.0
        for r, g in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
            r = np.asarray(r, np.float64)
            for sh in g.addressable_shards:
                worst = max(worst, float(np.max(np.abs(np.asarray(sh.data, np.float64) - r[sh.index]))
                                         / max(np.max(np.abs(r)), 1e-30)))
        return worst

    # --- per-example gradients: the chunk loop runs on each process's devices over their rows
    ref = F.per_example_grads(loss_fn, params, batch, chunk_size=5)
    got = F.per_example_grads(loss_fn, params, gbatch, chunk_size=5)
    out["grads_rel"] = local_rel(ref, got)
    out["grads_sharded"] = all(not g.is_fully_addressable for g in jax.tree_util.tree_leaves(got))

    # --- GBC features: importances summed over both processes
    ref = F.gbc_features(loss_fn, params, batch, k3, num_layers=3, chunk_size=5)
    got = F.gbc_features(loss_fn, params, gbatch, k3, num_layers=3, chunk_size=5)
    out["gbc_rel"] = local_rel(ref, got)

    # --- K-means and selection on features split over the processes
    G = np.concatenate([np.asarray(ref), -np.asarray(ref)[:32] * 0.5 + 0.01]).astype(np.float32)  # N = 96
    gG = S.shard_process_local_examples(mine({"x": G})["x"], mesh)
    res = pivotal.weighted_spherical_kmeans(G, 6, k4)
    gres = pivotal.weighted_spherical_kmeans(gG, 6, k4)
    out["kmeans_rel"] = max(_rel(gres.centroids, res.centroids), _rel(gres.objective, res.objective))
    out["kmeans_assign_equal"] = local_rel(res.assignments, gres.assignments) == 0.0
    out["kmeans_iters_equal"] = int(gres.num_iters) == int(res.num_iters)
    ref = pivotal.select_meta_samples(G, 5, k1, existing=np.array([0, 3]))
    got = pivotal.select_meta_samples(gG, 5, k1, existing=np.array([0, 3]))
    out["select_equal"] = bool(np.array_equal(ref, got))

    # --- three meta re-weighting steps, state replicated over both processes
    trainer = pivotal.make_meta_step(loss_fn, pivotal.direct_weights(weight_lr=50.0),
                                     optimizer=optax.sgd(1.0, momentum=0.9), learning_rate=0.1)
    ref_state = trainer.init(params, k3, num_examples=n)
    sh_state = S.replicate(ref_state, mesh)
    for i in range(3):
        ref_state, _ = trainer.step(ref_state, batch, meta, jax.random.fold_in(k4, i))
        sh_state, _ = trainer.step(sh_state, gbatch, gmeta, jax.random.fold_in(k4, i))
    out["step_rel"] = max(_rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(sh_state.params),
                                                     jax.tree_util.tree_leaves(ref_state.params)))
    jax.distributed.shutdown()
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _subprocess_env(num_devices: int) -> dict:
    """The environment of a worker: ``num_devices`` CPU devices, this checkout importable."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _result(stdout: str) -> dict:
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def multiprocess_results():
    env = _subprocess_env(LOCAL_DEVICES)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "process", str(i), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(NUM_PROCESSES)]
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=240)
            outputs.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for code, _, stderr in outputs:
        assert code == 0, stderr[-4000:]
    return [_result(stdout) for _, stdout, _ in outputs]


@pytest.fixture(scope="module")
def results():
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "worker"], env=_subprocess_env(NUM_DEVICES),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _result(proc.stdout)


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
    assert results["grads_local_rel"] <= RTOL and results["grads_local_sharded"]


def test_chunk_step_stays_on_its_shard(results):
    # Each device slices its own rows: no collective at all, and the scratch memory of one step
    # does not grow with N (the unsharded step on a sharded batch all-gathers the batch).
    for counts in results["grads_step_collectives"]:
        assert not any(counts.values()), counts
    small, large = results["grads_step_temp"]
    assert large == small, (small, large)


def test_rbc_features_match(results):
    assert results["forward_sharded"]
    assert results["rbc_rel"] <= RTOL and results["rbc_sharded"]
    assert results["rbc_history_rel"] <= RTOL and results["rbc_history_sharded"]
    assert results["rbc_chunked_rel"] <= RTOL and results["rbc_chunked_sharded"]


def test_gbc_features_match(results):
    assert results["gbc_rel"] <= RTOL and results["gbc_sharded"]
    assert results["gbc_chunked_rel"] <= RTOL and results["gbc_chunked_sharded"]


@pytest.mark.parametrize("tag", ["w", "u"])
def test_kmeans_matches(results, tag):
    assert results[f"kmeans_{tag}_rel"] <= RTOL
    assert results[f"kmeans_{tag}_assign_equal"]
    assert results[f"kmeans_{tag}_iters_equal"]
    assert results[f"kmeans_{tag}_assign_sharded"]
    assert results[f"kmeans_{tag}_dispatched"]  # the shard_map Lloyd loop, from G's sharding alone
    assert results[f"kmeans_{tag}_centroids_replicated"]


def test_kmeans_gathers_no_rows(results):
    counts = results["kmeans_collectives"]
    assert counts["all-gather"] == 0 and counts["all-to-all"] == 0, counts
    assert counts["all-reduce"] > 0, counts


def test_assign_clusters_and_centroids_sharded(results):
    assert results["assign_equal"] and results["assign_sharded"]
    assert results["centroids_rel"] <= RTOL


def test_process_local_examples_single_process(results):
    assert results["process_local_equal"]


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


@pytest.mark.slow
def test_two_processes_match_one(multiprocess_results):
    """Two processes on localhost (jax.distributed, gloo collectives on CPU), each holding half the
    rows: the same gradients, features, K-means, selection and training steps as one process."""
    assert [r["process_index"] for r in multiprocess_results] == list(range(NUM_PROCESSES))
    for r in multiprocess_results:
        assert r["devices"] == NUM_PROCESSES * LOCAL_DEVICES and r["local_devices"] == LOCAL_DEVICES
        assert r["global_shape"] == [64, 5] and r["spans_processes"] and r["local_rows_own"]
        assert r["grads_rel"] <= RTOL and r["grads_sharded"]
        assert r["gbc_rel"] <= RTOL
        assert r["kmeans_rel"] <= RTOL and r["kmeans_assign_equal"] and r["kmeans_iters_equal"]
        assert r["select_equal"]
        assert r["step_rel"] <= RTOL


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    print("RESULT " + json.dumps(_worker()), flush=True)
elif __name__ == "__main__" and sys.argv[1:2] == ["process"]:
    print("RESULT " + json.dumps(_multiprocess_worker(int(sys.argv[2]), int(sys.argv[3]))), flush=True)
