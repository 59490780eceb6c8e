"""Phase 3: choosing the examples to clean. :data:`SELECTORS` maps each method name to its
function; :func:`select` looks the method up and calls it.

Every selector reads the warm-up's (or the previous round's) :class:`TrainOutcome`: the
baselines its best parameters, RBC/GBC the features of ``K`` parameter snapshots after its
best-validation epoch ``t*`` (:func:`selection_features`). :func:`theorem_statistics` measures
the paper's Theorems 1-2 on the features RBC clustered.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pivotal
from pivotal.selection import remaining_candidates
from experiments import models
from experiments.config import METHODS, ExperimentConfig, config_mesh
from experiments.problem import Problem
from experiments.resources import phase
from experiments.ta_vaal import ta_vaal_selection
from experiments.training import Model, TrainOutcome, load_snapshots


def _probs(model: Model, params, model_state, x, chunk_size: int) -> np.ndarray:
    logits = models.apply_in_chunks(lambda xb: model.predict(params, model_state, xb), x,
                                    chunk_size)
    return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def _forward(model: Model, problem: Problem, params, model_state, chunk_size: int):
    """Penultimate features ``(N, D)`` and logits ``(N, C)`` of every training example."""
    return models.apply_in_chunks(lambda xb: model.features(params, model_state, xb),
                                  problem.x_train, chunk_size)


def _rbc_block(model: Model, problem: Problem, params, model_state, label_aware: bool,
               chunk_size: int, forward=None) -> jax.Array:
    h, logits = forward if forward is not None else _forward(model, problem, params,
                                                             model_state, chunk_size)
    labels = problem.y_noisy if label_aware else None
    return pivotal.rbc_features(jnp.asarray(h), jnp.asarray(logits), labels)


def _gbc_block(model: Model, problem: Problem, params, model_state, key, cfg) -> jax.Array:
    module = model.module

    def loss_fn(p, batch):
        variables = {"params": p, **(model_state or {})}
        logits = module.apply(variables, batch["x"], train=False)
        if cfg.label_aware:
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return pivotal.label_free_loss(logits)

    batch = {"x": jnp.asarray(problem.x_train), "y": jnp.asarray(problem.y_noisy)}
    return pivotal.gbc_features(loss_fn, params, batch, key, num_layers=cfg.gbc_layers,
                                chunk_size=cfg.gbc_chunk_size,
                                importance_chunk_size=cfg.chunk_size)


def selection_features(method: str, problem: Problem, model: Model, run: TrainOutcome,
                       cfg: ExperimentConfig, key: jax.Array, *, labels=None,
                       return_epochs: bool = False):
    """``(N, D)`` features of every training example from ``K`` snapshots after ``t*``.

    ``labels``: ``(N,)`` labels for label-aware RBC features (default: label-aware with the
    noisy labels only when ``cfg.label_aware``). With ``return_epochs``: ``(G, epochs)``.
    """
    snapshots = load_snapshots(run)

    def feature_fn(snapshot, k):
        params, model_state = snapshot
        if method == "gbc":
            return _gbc_block(model, problem, params, model_state, k, cfg)
        if labels is not None:
            h, logits = _forward(model, problem, params, model_state, cfg.chunk_size)
            return pivotal.rbc_features(jnp.asarray(h), jnp.asarray(logits), jnp.asarray(labels))
        return _rbc_block(model, problem, params, model_state, cfg.label_aware, cfg.chunk_size)

    # Only every ``snapshot_every``-th epoch was kept; draw among those after t*.
    return pivotal.history_features(feature_fn, snapshots, key, best_epoch=run.best_epoch,
                                    num_snapshots=cfg.num_snapshots, return_epochs=return_epochs)


def theorem_statistics(problem: Problem, model: Model, run: TrainOutcome, cfg: ExperimentConfig,
                       key: jax.Array, features, existing: np.ndarray,
                       selected: np.ndarray) -> dict:
    """The paper's Table 4 (Theorem 1's ``D_j``) and Table 5 (Theorem 2's stable examples).

    Both are measured on the candidates the K-means clustered (Algorithm 2 drops the examples
    close to the existing meta set), with the newly selected meta samples standing in for the
    centroids (Theorem 2's ``G_meta,i``). ``features``: the label-free RBC features that chose
    ``selected``; the label-aware ones come from the same snapshots (same ``key``), with the
    labels the learner sees, except the selected (cleaned) examples' ground truth.
    """
    candidates = remaining_candidates(features, existing=existing,
                                      exclude_fraction=cfg.exclude_fraction)
    labels = problem.y_noisy.copy()
    labels[selected] = problem.y_clean[selected]
    aware = selection_features("rbc", problem, model, run, cfg, key, labels=labels)
    free = jnp.asarray(features)
    stable = np.asarray(pivotal.stable_examples(free[candidates], aware[candidates],
                                                free[selected], aware[selected]))
    stats = {"stable_count": int(stable.sum()), "candidate_count": int(candidates.size)}
    # Label-free RBC rows are softmax (>= 0) outer ReLU features (>= 0): every inner product
    # is >= 0 and D_j = inf by construction. The label-aware rows (p - onehot(y)) mix signs.
    for prefix, G in (("d", free), ("d_aware", aware)):
        ratio = np.asarray(pivotal.theorem1_ratio(G[candidates], G[selected]))
        # inf sorts last; "lower" avoids interpolating between inf values (nan).
        stats.update({f"{prefix}_min": float(ratio.min()),
                      f"{prefix}_q05": float(np.quantile(ratio, 0.05, method="lower")),
                      f"{prefix}_median": float(np.quantile(ratio, 0.5, method="lower")),
                      f"{prefix}_inf_fraction": float(np.mean(np.isinf(ratio)))})
    return stats



def _random(method, problem, model, run, existing, count, cfg, key, info) -> np.ndarray:
    return np.asarray(pivotal.random_selection(len(problem.y_noisy), count, key,
                                               existing=existing))


def _entropy(method, problem, model, run, existing, count, cfg, key, info) -> np.ndarray:
    probs = _probs(model, run.best_params, run.best_model_state, problem.x_train,
                   cfg.chunk_size)
    pick = pivotal.certainty_selection if method == "certain" else pivotal.uncertainty_selection
    return np.asarray(pick(probs, count, existing=existing))


def _craig(method, problem, model, run, existing, count, cfg, key, info) -> np.ndarray:
    forward = _forward(model, problem, run.best_params, run.best_model_state,
                       cfg.chunk_size)
    feats = _rbc_block(model, problem, run.best_params, run.best_model_state,
                       cfg.label_aware, cfg.chunk_size, forward=forward)
    return np.asarray(pivotal.craig_selection(feats, count, existing=existing,
                                              classes=np.argmax(forward[1], -1), key=key))


def _ta_vaal(method, problem, model, run, existing, count, cfg, key, info) -> np.ndarray:
    if len(existing) == 0:
        raise ValueError("ta-vaal learns from the labelled meta set: it needs a warm-up "
                         "(warmup >= 1)")
    h, logits = _forward(model, problem, run.best_params, run.best_model_state,
                         cfg.chunk_size)
    existing = np.asarray(existing)
    meta_losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
        jnp.asarray(logits[existing]), jnp.asarray(problem.y_clean[existing])))
    pool_losses = None
    if cfg.label_aware:  # labels are trusted only without label noise
        pool_losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
            jnp.asarray(logits), jnp.asarray(problem.y_noisy)))
    return ta_vaal_selection(problem.x_train, h, pool_losses, existing, count, key,
                             labelled_losses=meta_losses, steps=cfg.ta_vaal_steps,
                             ranker_steps=max(1, 3 * cfg.ta_vaal_steps // 4))


def _clustering(method, problem, model, run, existing, count, cfg, key, info) -> np.ndarray:
    """RBC, RBC-K (unweighted K-means) and GBC: Algorithm 2 on snapshot features."""
    k_feat, k_sel = jax.random.split(key)
    with phase("features"):  # block: JAX's async dispatch would bill K-means for them
        feats, epochs = selection_features(method, problem, model, run, cfg, k_feat,
                                           return_epochs=True)
        jax.block_until_ready(feats)
    info["snapshot_epochs"] = [int(e) for e in epochs]
    # Empty K-means clusters leave select_meta_samples short of `count` (paper appendix:
    # rerun with fewer clusters). Every method must clean the same number of examples for
    # a fair comparison, so the shortfall is chosen by further Algorithm 2 steps on the same
    # features, each treating what is picked so far as existing meta samples.
    existing = np.asarray(existing, np.int64)
    picked = np.zeros(0, np.int64)
    calls = 0
    while picked.size < count:
        k_call = k_sel if calls == 0 else jax.random.fold_in(k_sel, calls)
        with phase("kmeans"):  # the seconds of all calls add up
            new = pivotal.select_meta_samples(
                feats, count - picked.size, k_call, existing=np.concatenate([existing, picked]),
                exclude_fraction=cfg.exclude_fraction, weighted=(method != "rbc-k"),
                max_iters=cfg.kmeans_iters, mesh=config_mesh(cfg))
        picked = np.concatenate([picked, np.asarray(new, np.int64)])
        calls += 1
    info["selection_calls"] = calls
    if cfg.diagnostics and method == "rbc" and not cfg.label_aware:
        info.update(theorem_statistics(problem, model, run, cfg, k_feat, feats,
                                       np.asarray(existing), picked))
    return picked


# Method name -> selector(method, problem, model, run, existing, count, cfg, key, info).
# "base" selects nothing (it trains on the noisy labels alone) and has no entry.
SELECTORS = {"random": _random, "finetune": _random, "certain": _entropy,
             "uncertain": _entropy, "craig": _craig, "ta-vaal": _ta_vaal,
             "rbc-k": _clustering, "rbc": _clustering, "gbc": _clustering}


def select(method: str, problem: Problem, model: Model, run: TrainOutcome,
           existing: np.ndarray, count: int, cfg: ExperimentConfig, key: jax.Array,
           info: Optional[dict] = None) -> np.ndarray:
    """``count`` new training indices (not in ``existing``) chosen by ``method``.

    ``info``: a dict that receives what the selection used (``snapshot_epochs`` for RBC/GBC;
    with ``cfg.diagnostics`` and RBC, :func:`theorem_statistics`).
    """
    info = {} if info is None else info
    if method not in SELECTORS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return SELECTORS[method](method, problem, model, run, existing, count, cfg, key, info)
