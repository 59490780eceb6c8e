"""Benchmarks of ``pivotal`` against its peers (issue 7).

    python -m benchmarks.run [--quick | --tiny] --out DIR

writes ``DIR/results.json`` (a flat dict of headline ratios plus nested details) and
``DIR/table.md`` (Markdown), and prints the table. ``--quick`` takes a few minutes on 2 CPU cores,
the full run under half an hour; ``--tiny`` only checks that everything runs (used by the tests).

Every timing is the median of repeated calls after a first call (tracing + compilation), wrapped
in ``jax.block_until_ready``; compile time is reported separately as the first call's excess over
the median. Functions that are compared are timed in interleaved rounds (a, b, a, b, ...), so that
load from other processes on a shared machine hits both alike: the ratios are what count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    clustered_features,
    fmt_bytes,
    fmt_s,
    time_call,
    time_side_by_side,
)

TARGETS = {
    "meta_step_ratio": ("<=", 3.0),
    "gbc_over_rbc": ("<=", 10.0),
    "gbc_vs_loop_speedup": (">=", 50.0),
    "kmeans_over_faiss": ("<=", 0.8),
    "kmeans_over_sklearn": ("<=", 0.8),
}


@dataclasses.dataclass(frozen=True)
class Config:
    mode: str
    # 1. meta step
    meta_models: tuple[str, ...] = ("lenet5", "mlp")
    meta_batch: int = 256
    meta_set: int = 20
    meta_repeats: int = 20
    # 2-3. features
    feat_n: int = 4000
    feat_snapshots: int = 4
    feat_steps_between: int = 10
    gbc_chunk: int = 16  # fastest measured on XLA:CPU for LeNet-5 (pivotal.features.RECOMMENDED_CHUNK_SIZE)
    feat_repeats: int = 3
    feat_warmup_rounds: int = 1
    loop_examples: int = 300
    # 4. k-means
    km_n: int = 50_000
    km_dim: int = 640
    km_clusters: int = 50
    km_iters: int = 50
    km_repeats: int = 3
    km_kpp: bool = True  # also time ours with its own k-means++ seeding
    # 5. scaling (subprocesses)
    scale_sizes: tuple[int, ...] = (10_000, 50_000, 200_000)
    scale_km_iters: int = 50
    scale_repeats: int = 2
    scale_gbc_chunk: int = 1024
    scale_dim: int = 640
    # 6. throughput
    lenet_n: int = 4096
    lenet_chunks: tuple[int, ...] = (1, 4, 8, 32, 128, 512)
    resnet_n: int = 32
    resnet_chunks: tuple[int, ...] = (4, 16)
    thr_repeats: int = 2


CONFIGS = {
    "full": Config(mode="full"),
    "quick": Config(
        mode="quick", meta_repeats=10, feat_snapshots=2, feat_repeats=2, feat_warmup_rounds=0,
        loop_examples=100, km_repeats=2, km_kpp=False, scale_sizes=(10_000, 50_000),
        scale_km_iters=20, scale_repeats=1, lenet_n=1024, lenet_chunks=(8, 256), resnet_n=2,
        resnet_chunks=(2,), thr_repeats=1,
    ),
    "tiny": Config(
        mode="tiny", meta_models=("mlp",), meta_batch=32, meta_set=4, meta_repeats=2,
        feat_n=64, feat_snapshots=1, feat_steps_between=1, gbc_chunk=32, feat_repeats=1,
        loop_examples=4, km_n=600, km_dim=16, km_clusters=5, km_iters=5, km_repeats=1, km_kpp=False,
        scale_sizes=(256, 512), scale_km_iters=3, scale_repeats=1, scale_gbc_chunk=64, scale_dim=16,
        lenet_n=16, lenet_chunks=(8,), resnet_n=0, resnet_chunks=(), thr_repeats=1,
    ),
}


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# data and models
# ------------------------------------------------------------------------------------------------


def _mnist(cfg: Config):
    from experiments.datasets import load_dataset

    return load_dataset("mnist5k", seed=0)


def _model(name: str, input_shape, **kwargs):
    from experiments.models import init_model, make_model

    module, has_state = make_model(name, 10, input_shape, **kwargs)
    params, state = init_model(module, jax.random.key(0), input_shape)
    return module, has_state, params, state


# ------------------------------------------------------------------------------------------------
# 1. meta re-weighting step vs plain step
# ------------------------------------------------------------------------------------------------


def bench_meta_step(cfg: Config, ds) -> dict:
    from experiments.models import cross_entropy_loss_fn
    from pivotal import direct_weights, make_meta_step

    rng = np.random.default_rng(0)
    n_train = len(ds.y_train)
    idx = rng.choice(n_train, cfg.meta_batch, replace=False)
    batch = {
        "x": jnp.asarray(ds.x_train[idx]),
        "y": jnp.asarray(ds.y_train[idx]),
        "index": jnp.asarray(idx, jnp.int32),
    }
    meta_set = {"x": jnp.asarray(ds.x_val[: cfg.meta_set]), "y": jnp.asarray(ds.y_val[: cfg.meta_set])}
    lr = 0.1
    out = {}
    for name in cfg.meta_models:
        module, _, params, _ = _model(name, ds.input_shape)
        loss_fn = cross_entropy_loss_fn(module, False)
        trainer = make_meta_step(loss_fn, direct_weights(weight_lr=cfg.meta_batch / lr), learning_rate=lr)
        state = trainer.init(params, jax.random.key(1), num_examples=n_train)
        key = jax.random.key(2)
        timings = time_side_by_side(
            {
                "meta": lambda: trainer.step(state, batch, meta_set, key),
                "plain": lambda: trainer.plain_step(state, batch),
            },
            repeats=cfg.meta_repeats,
        )
        out[name] = {
            "meta_step": timings["meta"],
            "plain_step": timings["plain"],
            "ratio": timings["meta"]["median_s"] / timings["plain"]["median_s"],
            "batch": cfg.meta_batch,
            "meta_set": cfg.meta_set,
            "rule": "direct_weights",
            "optimizer": "sgd (default)",
        }
        _log(f"meta step {name}: ratio {out[name]['ratio']:.2f}")
    return out


# ------------------------------------------------------------------------------------------------
# 2-3. RBC vs GBC features; GBC vs a per-example loop
# ------------------------------------------------------------------------------------------------


def _snapshots(cfg: Config, ds, module, params) -> list:
    """Parameter snapshots from a few plain SGD steps each (the values only steer GBC's layer draw)."""
    from experiments.models import cross_entropy_loss_fn
    from pivotal import l2rw, make_meta_step

    trainer = make_meta_step(cross_entropy_loss_fn(module, False), l2rw(), learning_rate=0.1)
    state = trainer.init(params, jax.random.key(3), num_examples=len(ds.y_train))
    rng = np.random.default_rng(1)
    snaps = []
    for _ in range(cfg.feat_snapshots):
        for _ in range(cfg.feat_steps_between):
            idx = rng.choice(len(ds.y_train), 256, replace=False)
            batch = {"x": ds.x_train[idx], "y": ds.y_train[idx], "index": idx.astype(np.int32)}
            state, _ = trainer.plain_step(state, batch)
        snaps.append(state.params)
    return snaps


def bench_features(cfg: Config, ds) -> dict:
    from experiments.models import features_fn
    from pivotal.features import (
        gbc_features,
        history_features,
        label_free_loss,
        layer_groups_of,
        per_example_grads,
        rbc_features,
    )

    module, _, params0, _ = _model("lenet5", ds.input_shape)
    snaps = _snapshots(cfg, ds, module, params0)
    n = min(cfg.feat_n, len(ds.y_train))
    x = jnp.asarray(ds.x_train[:n])
    batch = {"x": x}
    forward = features_fn(module, False)

    def lf_loss(p, b):  # label-free GBC loss (label noise setting)
        return label_free_loss(module.apply({"params": p}, b["x"]))

    def rbc_fn(p, key):
        del key
        h, logits = forward(p, None, x)
        return rbc_features(h, logits)

    def gbc_fn(p, key):
        return gbc_features(lf_loss, p, batch, key, num_layers=5, chunk_size=cfg.gbc_chunk)

    key = jax.random.key(4)
    timings = time_side_by_side(
        {
            "rbc": lambda: history_features(rbc_fn, snaps, key),
            "gbc": lambda: history_features(gbc_fn, snaps, key),
        },
        repeats=cfg.feat_repeats,
        warmup_rounds=cfg.feat_warmup_rounds,
    )
    rbc_dim = int(history_features(rbc_fn, snaps, key).shape[1])
    gbc_dim = int(history_features(gbc_fn, snaps, key).shape[1])
    # Breakdown of one GBC call: importance pass vs per-example pass.
    from pivotal import gbc as feat_mod

    params = snaps[-1]
    gkey = jax.random.key(5)
    feats, info = gbc_features(lf_loss, params, batch, gkey, num_layers=5, chunk_size=cfg.gbc_chunk,
                               return_info=True)
    imp = time_call(lambda: feat_mod._leaf_sq_norms_of_mean_grad(lf_loss, params, batch, cfg.gbc_chunk),
                    repeats=cfg.feat_repeats)
    rbc_res = {
        "time": timings["rbc"],
        "feature_dim": rbc_dim,
    }
    gbc_res = {
        "time": timings["gbc"],
        "feature_dim": gbc_dim,
        "chunk_size": cfg.gbc_chunk,
        "num_layers": 5,
        "importance_pass_median_s": imp["median_s"],
    }
    out = {
        "model": "lenet5",
        "n": n,
        "snapshots": len(snaps),
        "rbc": rbc_res,
        "gbc": gbc_res,
        "ratio": timings["gbc"]["median_s"] / timings["rbc"]["median_s"],
        "rbc_definition": "features_fn forward (penultimate + logits) on all N + rbc_features (label-free), per snapshot",
        "gbc_definition": "gbc_features(label_free_loss, num_layers=5) per snapshot (importance pass + per-example pass)",
    }
    _log(f"gbc/rbc: {out['ratio']:.1f}")

    # 3. the reference loop: one jitted single-example backward per example, full parameters (as
    # the PyTorch code does), then the drawn layers copied to the host and concatenated.
    groups = layer_groups_of(params)
    names = list(groups)
    leaf_ids, leaf_scales = [], []
    for block, scale in zip(info.blocks, info.scales):
        for i in groups[block]:
            leaf_ids.append(i)
            leaf_scales.append(float(scale))

    @jax.jit
    def grad_one(p, x1):
        return jax.grad(lambda q: lf_loss(q, {"x": x1})[0])(p)

    x_host = np.asarray(ds.x_train[:n])

    def loop(count):
        rows = []
        for j in range(count):
            g = jax.tree_util.tree_leaves(grad_one(params, x_host[j:j + 1]))
            rows.append(np.concatenate([s * np.ravel(np.asarray(g[i])) for i, s in zip(leaf_ids, leaf_scales)]))
        return np.stack(rows)

    count = min(cfg.loop_examples, n)
    loop_t = time_call(lambda: loop(count), repeats=1)
    ref = loop(min(count, 8))
    max_err = float(np.max(np.abs(ref - np.asarray(feats[: ref.shape[0]]))))
    scale_ref = float(np.max(np.abs(ref))) or 1.0
    ours = time_call(lambda: gbc_features(lf_loss, params, batch, gkey, num_layers=5, chunk_size=cfg.gbc_chunk),
                     repeats=cfg.feat_repeats)
    full = time_call(lambda: per_example_grads(lf_loss, params, batch, chunk_size=cfg.gbc_chunk),
                     repeats=cfg.feat_repeats)
    per_example = loop_t["median_s"] / count
    loop_total = per_example * n
    out["loop"] = {
        "examples_timed": count,
        "extrapolated": True,
        "note": f"loop timed on {count} of {n} examples, extrapolated linearly to N={n}",
        "per_example_s": per_example,
        "loop_total_s": loop_total,
        "loop_compile_s": loop_t["compile_s"],
        "ours_gbc": ours,
        "ours_per_example_grads_all_params": full,
        "speedup_gbc": loop_total / ours["median_s"],
        "speedup_per_example_grads": loop_total / full["median_s"],
        "max_abs_diff_vs_ours": max_err,
        "relative_diff_vs_ours": max_err / scale_ref,
        "drawn_blocks": list(info.blocks),
        "layers": names,
    }
    _log(f"gbc vs loop: {out['loop']['speedup_gbc']:.1f}x")
    return out


# ------------------------------------------------------------------------------------------------
# 4. k-means vs faiss and scikit-learn
# ------------------------------------------------------------------------------------------------


def _s2_objective(G: np.ndarray, assign: np.ndarray, ref: np.ndarray, m: int) -> dict:
    """Eq. 9 for a partition, defined the same for every method.

    The centroids are the S2 (sign-aligned) centroids of the method's partition,
    ``C_i = sum_{a_j=i} s_j G_j / sum_{a_j=i} ||G_j||`` with ``s_j = sign(<G_j, ref_{a_j}>)`` and
    ``ref`` the method's own centroids. ``partition``: ``sum_j |<G_j, C_{a_j}>|`` with the method's
    assignments; ``reassigned``: with assignments by our weighted rule ``argmax_i |<G_j, C_i>|``.
    """
    G64 = G.astype(np.float64)
    norms = np.linalg.norm(G64, axis=1)
    s = np.sign(np.einsum("nd,nd->n", G64, ref.astype(np.float64)[assign]))
    s[s == 0] = 1
    W = np.zeros((G.shape[0], m))
    W[np.arange(G.shape[0]), assign] = s
    den = np.bincount(assign, weights=norms, minlength=m)
    C = (W.T @ G64) / np.where(den > 0, den, 1)[:, None]
    scores = np.abs(G64 @ C.T)
    return {
        "partition": float(scores[np.arange(G.shape[0]), assign].sum()),
        "reassigned": float(scores.max(axis=1).sum()),
        "empty_clusters": int(np.sum(np.bincount(assign, minlength=m) == 0)),
    }


def bench_kmeans(cfg: Config) -> dict:
    import faiss
    from sklearn.cluster import KMeans

    from pivotal.kmeans import weighted_spherical_kmeans

    n, d, m, iters = cfg.km_n, cfg.km_dim, cfg.km_clusters, cfg.km_iters
    G = clustered_features(n, d, seed=0)
    norms = np.linalg.norm(G, axis=1).astype(np.float32)
    X = np.ascontiguousarray(G / norms[:, None])
    C0 = X[np.random.default_rng(7).choice(n, m, replace=False)].copy()
    Gj = jax.block_until_ready(jax.device_put(G))
    C0j = jnp.asarray(C0)
    key = jax.random.key(0)

    def ours():
        return weighted_spherical_kmeans(Gj, m, key, max_iters=iters, tol=0.0, init=C0j)

    def ours_kpp():
        return weighted_spherical_kmeans(Gj, m, key, max_iters=iters, tol=0.0)

    faiss_box = {}

    def run_faiss():
        km = faiss.Kmeans(d, m, niter=iters, spherical=True, max_points_per_centroid=n + 1,
                          min_points_per_centroid=1, seed=1234, verbose=False)
        km.train(X, weights=norms, init_centroids=C0)
        faiss_box["km"] = km
        return km.centroids

    sk_box = {}

    def run_sklearn():
        km = KMeans(n_clusters=m, max_iter=iters, n_init=1, tol=0.0, init=C0, algorithm="lloyd",
                    random_state=0)
        km.fit(X, sample_weight=norms)
        sk_box["km"] = km
        return km.cluster_centers_

    # The first call of each is its warm-up (it also compiles ours); no extra untimed round.
    timings = time_side_by_side(
        {"ours": ours, "faiss": run_faiss, "sklearn": run_sklearn}, repeats=cfg.km_repeats,
        warmup_rounds=0,
    )
    kpp = None
    if cfg.km_kpp:
        kpp = time_call(ours_kpp, repeats=cfg.km_repeats)
        kpp["num_iters"] = int(np.asarray(ours_kpp().num_iters))
    res = ours()
    ours_iters = int(np.asarray(res.num_iters))
    fkm, skm = faiss_box["km"], sk_box["km"]
    _, f_assign = fkm.index.search(X, 1)
    f_assign = f_assign[:, 0].astype(np.int64)
    iters_run = {"ours": ours_iters, "faiss": int(len(fkm.obj)), "sklearn": int(skm.n_iter_)}
    objectives = {
        "ours": _s2_objective(G, np.asarray(res.assignments).astype(np.int64), np.asarray(res.centroids), m),
        "faiss": _s2_objective(G, f_assign, fkm.centroids, m),
        "sklearn": _s2_objective(G, skm.labels_.astype(np.int64), skm.cluster_centers_, m),
    }
    objectives["ours"]["own"] = float(np.asarray(res.objective))
    objectives["faiss"]["own"] = float(np.abs(np.einsum("nd,nd->n", G, fkm.centroids[f_assign])).sum())
    objectives["sklearn"]["own"] = float(np.abs(np.einsum("nd,nd->n", G, skm.cluster_centers_[skm.labels_])).sum())
    out = {
        "n": n, "dim": d, "clusters": m, "iterations_requested": iters,
        "iterations_run": iters_run,
        "times": timings,
        "ours_kmeanspp_seeding": kpp,
        "per_iteration_s": {k: timings[k]["median_s"] / max(iters_run[k], 1) for k in timings},
        "ratio_faiss": timings["ours"]["median_s"] / timings["faiss"]["median_s"],
        "ratio_sklearn": timings["ours"]["median_s"] / timings["sklearn"]["median_s"],
        "objectives": objectives,
        "setup": (
            "synthetic clustered features (200 blobs in a 16-d subspace of R^640 + noise, log-normal "
            "norms); all three start from the same M random unit rows; faiss/sklearn get unit rows "
            "with weights ||G_j|| (faiss: spherical=True, max_points_per_centroid=N+1; sklearn: lloyd, "
            "tol=0, n_init=1); ours gets G itself, tol=0, max_iters=50, init=the same rows"
        ),
        "objective_definition": (
            "Eq. 9 with hard assignment, identical for all: S2 sign-aligned centroids of each "
            "method's final partition (signs from its own centroids); 'partition' sums |<G_j, C_a_j>| "
            "over its own assignments, 'reassigned' over argmax_i |<G_j, C_i>|; 'own' uses each "
            "method's raw centroids (faiss: unit norm, so not on the same scale)"
        ),
    }
    if iters_run["ours"] != iters:
        out["warning"] = f"ours ran {iters_run['ours']} iterations, not {iters} (converged early)"
    _log(f"kmeans: ours/faiss {out['ratio_faiss']:.2f}, ours/sklearn {out['ratio_sklearn']:.2f}, iters {iters_run}")
    return out


# ------------------------------------------------------------------------------------------------
# 5. scaling in N (subprocesses, for clean peak-memory readings)
# ------------------------------------------------------------------------------------------------


def _worker(args: Sequence[str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scaling_worker", *args]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "command": " ".join(cmd)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _linearity(rows: list[dict], key: str = "time_s") -> float | None:
    """Slope of log(time) against log(N): 1 is linear."""
    ok = [r for r in rows if key in r and r[key] > 0]
    if len(ok) < 2:
        return None
    logn = np.log([r["n"] for r in ok])
    logt = np.log([r[key] for r in ok])
    return float(np.polyfit(logn, logt, 1)[0])


def bench_scaling(cfg: Config) -> dict:
    km_rows, gbc_rows = [], []
    for n in cfg.scale_sizes:
        km_rows.append(_worker(["--what", "kmeans", "--n", str(n), "--repeats", str(cfg.scale_repeats),
                                "--iters", str(cfg.scale_km_iters), "--dim", str(cfg.scale_dim),
                                "--clusters", str(min(50, n // 4))]))
        gbc_rows.append(_worker(["--what", "gbc", "--n", str(n), "--repeats", str(cfg.scale_repeats),
                                 "--chunk", str(cfg.scale_gbc_chunk)]))
        _log(f"scaling N={n} done")
    return {
        "kmeans": km_rows,
        "gbc": gbc_rows,
        "kmeans_loglog_slope": _linearity(km_rows, "time_per_iter_s"),
        "gbc_loglog_slope": _linearity(gbc_rows),
        "memory_method": (
            "each size in a fresh subprocess; resident-set high-water mark (VmHWM, the counter behind "
            "ru_maxrss) reset via /proc/self/clear_refs right before the call; call_extra = peak "
            "during a steady-state call - resident set before it (inputs already resident, so "
            "excluded); XLA buffers are invisible to tracemalloc. A steady-state call reuses pages the "
            "allocator kept from the first call (so its extra can be below the output size); the "
            "first call's extra includes compilation, roughly constant in N"
        ),
        "gbc_model": "MLP 64-32-32-10 on synthetic inputs (GBC output is N x D, so D is kept small for N=200k)",
        "kmeans_setup": f"D={cfg.scale_dim}, M=50, tol=0, max_iters={cfg.scale_km_iters}, k-means++ seeding",
    }


# ------------------------------------------------------------------------------------------------
# 6. per-example gradient throughput
# ------------------------------------------------------------------------------------------------


def bench_throughput(cfg: Config, ds) -> dict:
    from experiments.models import frozen_loss_fn
    from pivotal.features import per_example_grads

    rows = []
    module, _, params, _ = _model("lenet5", ds.input_shape)
    loss = frozen_loss_fn(module, None)
    n = cfg.lenet_n
    reps = int(np.ceil(n / len(ds.y_train)))
    xs = np.concatenate([ds.x_train] * reps)[:n]
    ys = np.concatenate([ds.y_train] * reps)[:n]
    batch = {"x": jnp.asarray(xs), "y": jnp.asarray(ys)}
    for chunk in cfg.lenet_chunks:
        t = time_call(lambda: per_example_grads(loss, params, batch, chunk_size=chunk), repeats=cfg.thr_repeats)
        rows.append({"model": "lenet5", "input": "28x28x1", "n": n, "chunk_size": chunk,
                     "examples_per_s": n / t["median_s"], **t})
        _log(f"throughput lenet5 chunk {chunk}: {n / t['median_s']:.0f}/s")
    if cfg.resnet_n > 0:
        shape = (32, 32, 3)
        module, _, params, state = _model("resnet34", shape)
        loss = frozen_loss_fn(module, state)
        rn = cfg.resnet_n
        batch = {
            "x": jax.random.normal(jax.random.key(9), (rn, *shape), jnp.float32),
            "y": jnp.arange(rn, dtype=jnp.int32) % 10,
        }
        for chunk in cfg.resnet_chunks:
            t = time_call(lambda: per_example_grads(loss, params, batch, chunk_size=chunk), repeats=cfg.thr_repeats)
            rows.append({"model": "resnet34", "input": "32x32x3, frozen BatchNorm", "n": rn, "chunk_size": chunk,
                         "examples_per_s": rn / t["median_s"], **t})
            _log(f"throughput resnet34 chunk {chunk}: {rn / t['median_s']:.1f}/s")
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def _met(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    op, target = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return "met" if ok else "MISSED"


def render_table(results: dict) -> str:
    d = results["details"]
    lines = [f"# pivotal benchmarks ({results['mode']})", ""]
    m = results["machine"]
    lines.append(f"Machine: {m['cpu_count']} CPUs, {m['platform']}, jax {m['jax_version']} "
                 f"({m['jax_backend']}), load average at start {m['load_avg_start']}. "
                 f"Command: `{results['command']}`. Wall time {results['wall_s']:.0f} s.")
    lines += ["", "## Headline ratios", "", "| metric | value | target | status |", "|---|---|---|---|"]
    for key, (op, target) in TARGETS.items():
        v = results.get(key)
        vs = "-" if v is None else f"{v:.2f}"
        lines.append(f"| `{key}` | {vs} | {op} {target:g} | {_met(key, v)} |")

    if "meta_step" in d:
        lines += ["", "## 1. Meta re-weighting step vs plain step (MNIST-5k)", "",
                  "| model | batch | meta step | plain step | ratio | compile meta / plain |",
                  "|---|---|---|---|---|---|"]
        for name, r in d["meta_step"].items():
            lines.append(f"| {name} | {r['batch']} | {fmt_s(r['meta_step']['median_s'])} | "
                         f"{fmt_s(r['plain_step']['median_s'])} | {r['ratio']:.2f} | "
                         f"{fmt_s(r['meta_step']['compile_s'])} / {fmt_s(r['plain_step']['compile_s'])} |")
    if "features" in d:
        f = d["features"]
        lines += ["", f"## 2-3. Features (LeNet-5, N={f['n']}, K={f['snapshots']} snapshots)", "",
                  "| what | time | compile | feature dim |", "|---|---|---|---|",
                  f"| RBC (forward + rbc_features) | {fmt_s(f['rbc']['time']['median_s'])} | "
                  f"{fmt_s(f['rbc']['time']['compile_s'])} | {f['rbc']['feature_dim']} |",
                  f"| GBC (gbc_features, 5 layers, chunk {f['gbc']['chunk_size']}) | "
                  f"{fmt_s(f['gbc']['time']['median_s'])} | {fmt_s(f['gbc']['time']['compile_s'])} | "
                  f"{f['gbc']['feature_dim']} |"]
        lp = f["loop"]
        lines += ["", f"GBC vs reference loop (1 snapshot, N={f['n']}): {lp['note']}.", "",
                  "| what | time for N | speedup of ours |", "|---|---|---|",
                  f"| reference loop (jitted single-example grad, extrapolated) | {fmt_s(lp['loop_total_s'])} | - |",
                  f"| ours: gbc_features | {fmt_s(lp['ours_gbc']['median_s'])} | {lp['speedup_gbc']:.1f}x |",
                  f"| ours: per_example_grads, all parameters | "
                  f"{fmt_s(lp['ours_per_example_grads_all_params']['median_s'])} | "
                  f"{lp['speedup_per_example_grads']:.1f}x |",
                  "", f"Loop rows agree with ours: max relative difference {lp['relative_diff_vs_ours']:.1e}."]
    if "kmeans" in d:
        k = d["kmeans"]
        lines += ["", f"## 4. K-means (N={k['n']}, D={k['dim']}, M={k['clusters']}, "
                  f"{k['iterations_requested']} iterations)", "",
                  "| method | time | per iteration | iterations run | compile | Eq. 9 (S2 centroids, own partition) | Eq. 9 (reassigned) |",
                  "|---|---|---|---|---|---|---|"]
        for name in ("ours", "faiss", "sklearn"):
            t = k["times"][name]
            o = k["objectives"][name]
            lines.append(f"| {name} | {fmt_s(t['median_s'])} | {fmt_s(k['per_iteration_s'][name])} | "
                         f"{k['iterations_run'][name]} | {fmt_s(t['compile_s'])} | {o['partition']:.1f} | "
                         f"{o['reassigned']:.1f} |")
        kp = k["ours_kmeanspp_seeding"]
        if kp:
            lines += ["", f"Ours with its own k-means++ seeding instead of the shared init: "
                      f"{fmt_s(kp['median_s'])} ({kp['num_iters']} iterations)."]
        lines += ["", f"Setup: {k['setup']}.", "",
                  f"Objective: {k['objective_definition']}."]
        if "warning" in k:
            lines += ["", f"**Warning:** {k['warning']}."]
    if "scaling" in d:
        s = d["scaling"]
        lines += ["", "## 5. Scaling in N", "",
                  "| function | N | time | per iteration | compile | extra memory, steady call | extra memory, first call (incl. compile) | output | first-call extra - output |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in s["kmeans"]:
            if "error" in r:
                lines.append("| kmeans | ? | error | | | | | | |")
                continue
            lines.append(f"| weighted_spherical_kmeans | {r['n']} | {fmt_s(r['time_s'])} | "
                         f"{fmt_s(r['time_per_iter_s'])} | {fmt_s(r['compile_s'])} | "
                         f"{fmt_bytes(r['call_extra_bytes'])} | {fmt_bytes(r['first_call_extra_bytes'])} | "
                         f"{fmt_bytes(r['output_bytes'])} | "
                         f"{fmt_bytes(r['first_call_extra_bytes'] - r['output_bytes'])} |")
        for r in s["gbc"]:
            if "error" in r:
                lines.append("| gbc | ? | error | | | | | | |")
                continue
            lines.append(f"| gbc_features (D={r['feature_dim']}) | {r['n']} | {fmt_s(r['time_s'])} | - | "
                         f"{fmt_s(r['compile_s'])} | {fmt_bytes(r['call_extra_bytes'])} | "
                         f"{fmt_bytes(r['first_call_extra_bytes'])} | {fmt_bytes(r['output_bytes'])} | "
                         f"{fmt_bytes(r['first_call_extra_bytes'] - r['output_bytes'])} |")
        ks, gs = s["kmeans_loglog_slope"], s["gbc_loglog_slope"]
        lines += ["", f"log-log slope of time vs N (1 = linear): k-means per iteration "
                  f"{'-' if ks is None else f'{ks:.2f}'}, GBC {'-' if gs is None else f'{gs:.2f}'}.",
                  f"Memory: {s['memory_method']}. GBC model: {s['gbc_model']}. K-means: {s['kmeans_setup']}."]
    if "throughput" in d:
        lines += ["", "## 6. per_example_grads throughput", "",
                  "| model | input | N | chunk | examples/s | compile |", "|---|---|---|---|---|---|"]
        for r in d["throughput"]["rows"]:
            lines.append(f"| {r['model']} | {r['input']} | {r['n']} | {r['chunk_size']} | "
                         f"{r['examples_per_s']:.1f} | {fmt_s(r['compile_s'])} |")
    return "\n".join(lines) + "\n"


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


SECTIONS = ("meta_step", "features", "kmeans", "scaling", "throughput")


def run(cfg: Config, out_dir: str | os.PathLike, *, command: str = "", sections: Sequence[str] = SECTIONS) -> dict:
    """Runs the selected sections, writes ``results.json`` and ``table.md`` to ``out_dir``."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    details: dict[str, Any] = {}
    ds = _mnist(cfg) if {"meta_step", "features", "throughput"} & set(sections) else None
    if "meta_step" in sections:
        details["meta_step"] = bench_meta_step(cfg, ds)
    if "features" in sections:
        details["features"] = bench_features(cfg, ds)
    if "kmeans" in sections:
        details["kmeans"] = bench_kmeans(cfg)
    if "scaling" in sections:
        details["scaling"] = bench_scaling(cfg)
    if "throughput" in sections:
        details["throughput"] = bench_throughput(cfg, ds)

    meta = details.get("meta_step", {})
    headline_model = "lenet5" if "lenet5" in meta else next(iter(meta), None)
    results = {
        "meta_step_ratio": meta[headline_model]["ratio"] if headline_model else None,
        "meta_step_ratio_model": headline_model,
        "meta_step_ratio_by_model": {k: v["ratio"] for k, v in meta.items()},
        "gbc_over_rbc": details["features"]["ratio"] if "features" in details else None,
        "gbc_vs_loop_speedup": details["features"]["loop"]["speedup_gbc"] if "features" in details else None,
        "kmeans_over_faiss": details["kmeans"]["ratio_faiss"] if "kmeans" in details else None,
        "kmeans_over_sklearn": details["kmeans"]["ratio_sklearn"] if "kmeans" in details else None,
        "targets": {k: f"{op} {t:g}" for k, (op, t) in TARGETS.items()},
        "mode": cfg.mode,
        "config": dataclasses.asdict(cfg),
        "command": command,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax_version": jax.__version__,
            "jax_backend": jax.default_backend(),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "details": details,
    }
    results["status"] = {k: _met(k, results.get(k)) for k in TARGETS}
    results["wall_s"] = time.perf_counter() - start
    results = _to_jsonable(results)
    table = render_table(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "table.md").write_text(table)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes, a few minutes on 2 cores")
    size.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds; used by the tests)")
    parser.add_argument("--out", required=True, help="output folder for results.json and table.md")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m benchmarks.run", *argv_list])
    run(CONFIGS[mode], args.out, command=command, sections=args.only)
    print((Path(args.out) / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
