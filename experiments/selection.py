"""Phase 3: choosing the examples to clean. :data:`SELECTORS` maps each method name to its
function; :func:`select` looks the method up and calls it.

Every selector reads the warm-up's (or the previous round's) :class:`TrainOutcome`: the
baselines its best parameters, RBC/GBC the features of ``K`` parameter snapshots after its
best-validation epoch ``t*`` (:func:`selection_features`). :func:`theorem_statistics` measures
the paper's Theorems 1-2 on the features RBC clustered.

The features are memory-bounded (:func:`plan_features`): before any is formed, the widths are
known (RBC from the model's shapes, GBC from the layer draw, :func:`pivotal.gbc.gbc_layer_draw`)
and ``cfg.feature_memory_gb`` decides whether the ``(N, D)`` float32 features are kept exact in
memory, sketched to fit (:data:`FEATURE_MODES`), or written to disk and clustered out of core.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import warnings
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pivotal
from pivotal.gbc import gbc_block_widths, gbc_layer_draw, leaf_sketch_widths
from pivotal.history import snapshot_key, spaced_snapshot_epochs
from pivotal.outofcore import kmeans_memmap, memmap_block_rows, open_features_memmap
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


def _gbc_args(model: Model, problem: Problem, model_state, cfg):
    """``(loss_fn, batch, options)`` of :func:`pivotal.gbc_features` for one snapshot."""
    module = model.module

    def loss_fn(p, batch):
        variables = {"params": p, **(model_state or {})}
        logits = module.apply(variables, batch["x"], train=False)
        if cfg.label_aware:
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return pivotal.label_free_loss(logits)

    batch = {"x": jnp.asarray(problem.x_train), "y": jnp.asarray(problem.y_noisy)}
    return loss_fn, batch, dict(num_layers=cfg.gbc_layers, chunk_size=cfg.gbc_chunk_size,
                                importance_chunk_size=cfg.chunk_size)


def _gbc_block(model: Model, problem: Problem, params, model_state, key, cfg,
               sketch_dim: Optional[int] = None) -> jax.Array:
    loss_fn, batch, options = _gbc_args(model, problem, model_state, cfg)
    if sketch_dim is not None:
        options["sketch_dim"] = sketch_dim
    return pivotal.gbc_features(loss_fn, params, batch, key, **options)


# ----------------------------------------------------------------------------------------------
# Memory-bounded features: which snapshots, how wide, in memory / sketched / on disk
# ----------------------------------------------------------------------------------------------

FEATURE_MODES = ("in_memory", "sketch", "out_of_core")
#: Sketch widths tried (at most ``k`` columns per parameter leaf), widest first. The last is the
#: floor: narrower sketches lose too much of the inner products (measured in the docs), so
#: features that do not fit at that width go to disk instead of being sketched further.
SKETCH_DIMS = tuple(2 ** p for p in range(16, 7, -1))  # 65536 ... 256
BYTES_PER_GB = 10 ** 9


class FeaturePlan(NamedTuple):
    """How the selection features of one method and run are formed."""

    mode: str  # one of FEATURE_MODES
    sketch_dim: Optional[int]  # columns per leaf of the sketch; None: exact gradients
    epochs: np.ndarray  # the snapshots, sorted
    widths: tuple  # columns of each snapshot's block

    @property
    def dim(self) -> int:
        """Columns clustered."""
        return int(sum(self.widths))


def choose_feature_mode(num_rows: int, width_of: Callable[[Optional[int]], int],
                        budget_bytes: float, itemsize: int = 4) -> tuple[str, Optional[int]]:
    """``(mode, sketch_dim)`` for ``(N, D)`` features of ``D = width_of(k)`` columns with sketch
    width ``k`` (``width_of(None)``: exact), under ``budget_bytes`` for the ``N D itemsize`` bytes.

    1. ``in_memory`` (k None): the exact features fit.
    2. ``sketch``: else the widest ``k`` of :data:`SKETCH_DIMS` whose features are narrower than
       the exact ones and fit.
    3. ``out_of_core``: else the features at the floor ``k = SKETCH_DIMS[-1]`` (exact, k None,
       when that is no narrower) on disk, K-means reading blocks that fit the budget.
    """
    exact = width_of(None)
    if num_rows * exact * itemsize <= budget_bytes:
        return "in_memory", None
    narrower = [k for k in SKETCH_DIMS if width_of(k) < exact]
    for k in narrower:
        if num_rows * width_of(k) * itemsize <= budget_bytes:
            return "sketch", k
    return "out_of_core", (narrower[-1] if narrower else None)


def _snapshot_epochs(run: TrainOutcome, cfg: ExperimentConfig, key, available) -> np.ndarray:
    """The snapshots :func:`pivotal.history_features` would use with ``key``: drawn after
    ``t*`` (``snapshot_every`` None, every epoch kept), else
    :func:`pivotal.history.spaced_snapshot_epochs` (the rolling set the run kept)."""
    if cfg.snapshot_every is None:
        return pivotal.sample_snapshot_epochs(available, run.best_epoch, cfg.num_snapshots,
                                              jax.random.split(key)[0])
    epochs = spaced_snapshot_epochs(run.num_epochs, run.best_epoch, cfg.num_snapshots,
                                    cfg.snapshot_every)
    missing = sorted(set(int(e) for e in epochs) - set(int(e) for e in available))
    if missing:
        raise ValueError(f"snapshots {missing} are not under {run.snapshot_dir} (kept "
                         f"{sorted(available)}): the run was kept by another snapshot rule; "
                         f"delete it to train it again")
    after = run.num_epochs - 1 - run.best_epoch
    if after < cfg.num_snapshots:
        warnings.warn(f"only {after} epochs follow the best epoch {run.best_epoch}; using the "
                      f"last {len(epochs)} epochs {epochs.tolist()} as snapshots", stacklevel=3)
    return epochs


def _rbc_width(num_classes: int, dim: int, sketch_dim: Optional[int]) -> int:
    """Columns of one snapshot's RBC features: the last layer's kernel ``(D, C)`` as one leaf."""
    return math.prod(leaf_sketch_widths((dim, num_classes), sketch_dim))


def plan_features(method: str, problem: Problem, model: Model, run: TrainOutcome,
                  cfg: ExperimentConfig, key: jax.Array, snapshots) -> FeaturePlan:
    """Which snapshots and how the features of ``method`` ("rbc", "rbc-k", "gbc") are formed,
    from their widths, before any is: RBC's from the model's shapes, GBC's from each snapshot's
    layer draw (:func:`pivotal.gbc.gbc_layer_draw`, the importance pass alone, with the key
    :func:`pivotal.history.snapshot_key` gives that snapshot)."""
    epochs = _snapshot_epochs(run, cfg, key, sorted(int(e) for e in snapshots))
    n = len(problem.y_noisy)
    budget = cfg.feature_memory_gb * BYTES_PER_GB
    if method != "gbc":
        h, _ = jax.eval_shape(lambda x: model.features(run.best_params, run.best_model_state, x),
                              jax.ShapeDtypeStruct((1,) + problem.x_train.shape[1:],
                                                   problem.x_train.dtype))
        width_of = lambda k: len(epochs) * _rbc_width(problem.num_classes, h.shape[1], k)
    else:
        blocks = []
        for t in epochs:
            params, model_state = snapshots[int(t)]
            loss_fn, batch, options = _gbc_args(model, problem, model_state, cfg)
            info = gbc_layer_draw(loss_fn, params, batch, snapshot_key(key, int(t)), **options)
            blocks.append((params, info.blocks))
        width_of = lambda k: sum(int(gbc_block_widths(p, b, sketch_dim=k).sum()) for p, b in blocks)
    mode, sketch_dim = choose_feature_mode(n, width_of, budget)
    if method != "gbc":
        widths = (_rbc_width(problem.num_classes, h.shape[1], sketch_dim),) * len(epochs)
    else:
        widths = tuple(int(gbc_block_widths(p, b, sketch_dim=sketch_dim).sum()) for p, b in blocks)
    return FeaturePlan(mode, sketch_dim, np.asarray(epochs, np.int64), widths)


def _rbc_fn(model: Model, problem: Problem, cfg: ExperimentConfig, plan: FeaturePlan, labels):
    """RBC ``feature_fn(snapshot, key)``: exact, or its projection sketch of the plan's width."""
    def feature_fn(snapshot, k):
        params, model_state = snapshot
        if plan.sketch_dim is None and labels is not None:
            h, logits = _forward(model, problem, params, model_state, cfg.chunk_size)
            return pivotal.rbc_features(jnp.asarray(h), jnp.asarray(logits), jnp.asarray(labels))
        if plan.sketch_dim is None:
            return _rbc_block(model, problem, params, model_state, cfg.label_aware,
                              cfg.chunk_size)
        h, logits = _forward(model, problem, params, model_state, cfg.chunk_size)
        y = labels if labels is not None else (problem.y_noisy if cfg.label_aware else None)
        k_dim, k_classes = leaf_sketch_widths((h.shape[1], problem.num_classes), plan.sketch_dim)
        return pivotal.sketch_rbc_features(jnp.asarray(h), jnp.asarray(logits),
                                           None if y is None else jnp.asarray(y), key=k,
                                           sketch_classes=k_classes, sketch_dim=k_dim)
    return feature_fn


@functools.partial(jax.jit, donate_argnums=(0,))
def _put_columns(out, block, start):
    return jax.lax.dynamic_update_slice(out, block.astype(out.dtype), (jnp.int32(0), start))


def _write_blocks(feature_fn, snapshots, key, plan: FeaturePlan, n: int, scratch):
    """The features of ``plan``, each snapshot's block written into one preallocated ``(N, D)``
    output as it is formed: a donated jax array of the blocks' dtype (in memory; a single block
    is returned as it is) or, out of core, a float32 ``.npy`` memmap in the folder ``scratch``.
    At most the output and one snapshot's block are held at once (concatenating would hold all
    blocks and their copy: twice the output)."""
    if plan.mode == "out_of_core":
        if scratch is None:
            raise ValueError("out-of-core features need a scratch folder (scratch=)")
        out = open_features_memmap(os.path.join(scratch, "features.npy"), (n, plan.dim))
    else:
        out = None
    start = 0
    for t, width in zip(plan.epochs, plan.widths):
        block = feature_fn(snapshots[int(t)], snapshot_key(key, int(t)))
        if block.shape != (n, width):
            raise ValueError(f"snapshot {int(t)}'s features have shape {block.shape}; its "
                             f"plan said ({n}, {width})")
        if plan.mode == "out_of_core":
            out[:, start:start + width] = np.asarray(block)  # a view of a CPU jax array
        elif len(plan.epochs) == 1:
            out = block
        else:
            if out is None:  # laid out (dtype, example sharding) as the blocks are
                out = jnp.zeros((n, plan.dim), block.dtype, device=block.sharding)
            out = _put_columns(out, block, jnp.int32(start))
        start += width
        del block
    if plan.mode == "out_of_core":
        out.flush()
    return out


def selection_features(method: str, problem: Problem, model: Model, run: TrainOutcome,
                       cfg: ExperimentConfig, key: jax.Array, *, labels=None,
                       return_epochs: bool = False, return_plan: bool = False, scratch=None):
    """``(N, D)`` features of every training example from ``K`` snapshots after ``t*``.

    ``labels``: ``(N,)`` labels for label-aware RBC features (default: label-aware with the
    noisy labels only when ``cfg.label_aware``). With ``return_epochs``: ``(G, epochs)``; with
    ``return_plan``: ``(G, plan)``, the :class:`FeaturePlan` (mode, sketch width, snapshots).
    In memory (exact: :func:`pivotal.history_features`' features, bit for bit, written block by
    block; or sketched) ``G`` is a jax array; out of core an ``np.memmap`` in the folder
    ``scratch``.
    """
    snapshots = load_snapshots(run)
    plan = plan_features(method, problem, model, run, cfg, key, snapshots)
    if method == "gbc":
        def feature_fn(snapshot, k):
            params, model_state = snapshot
            return _gbc_block(model, problem, params, model_state, k, cfg, plan.sketch_dim)
    else:
        feature_fn = _rbc_fn(model, problem, cfg, plan, labels)
    feats = _write_blocks(feature_fn, snapshots, key, plan, len(problem.y_noisy), scratch)
    if return_plan:
        return feats, plan
    return (feats, plan.epochs) if return_epochs else feats


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
    n, (dim, classes) = len(problem.y_noisy), (forward[0].shape[1], problem.num_classes)
    width_of = lambda k: _rbc_width(classes, dim, k)
    mode, sketch_dim = choose_feature_mode(n, width_of, cfg.feature_memory_gb * BYTES_PER_GB)
    if mode == "out_of_core":
        raise ValueError(f"craig keeps its ({n}, {width_of(sketch_dim)}) features in memory: "
                         f"raise --feature-memory-gb (now {cfg.feature_memory_gb:g})")
    if sketch_dim is None:
        feats = _rbc_block(model, problem, run.best_params, run.best_model_state,
                           cfg.label_aware, cfg.chunk_size, forward=forward)
    else:  # the projection sketch, with a key of its own (the greedy's stays as it was)
        k_dim, k_classes = leaf_sketch_widths((dim, classes), sketch_dim)
        labels = jnp.asarray(problem.y_noisy) if cfg.label_aware else None
        feats = pivotal.sketch_rbc_features(jnp.asarray(forward[0]), jnp.asarray(forward[1]),
                                            labels, key=jax.random.split(key)[1],
                                            sketch_classes=k_classes, sketch_dim=k_dim)
    info.update(feature_mode=mode, feature_dim=int(width_of(sketch_dim)), sketch_dim=sketch_dim)
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


class _Rows:
    """Rows ``rows`` of an on-disk ``(N, D)`` array, read on demand: the array-like
    :func:`pivotal.outofcore.kmeans_memmap` takes (``shape``, ``dtype``, row slicing)."""

    def __init__(self, G, rows: np.ndarray):
        self._G, self._rows = G, np.asarray(rows)
        self.shape, self.dtype = (self._rows.size, G.shape[1]), G.dtype

    def __getitem__(self, item):
        return np.asarray(self._G[self._rows[item]])


def _row_blocks(G, rows: int):
    for start in range(0, G.shape[0], rows):
        yield start, jnp.asarray(np.asarray(G[start:start + rows]))


def _select_out_of_core(G, count: int, key, existing: np.ndarray, cfg: ExperimentConfig,
                        weighted: bool) -> np.ndarray:
    """:func:`pivotal.select_meta_samples` (Algorithm 2) over an on-disk ``(N, D)`` array,
    reading row blocks that fit ``cfg.feature_memory_gb``: the same steps (zero rows and the
    ``exclude_fraction`` most S1-similar to ``existing`` dropped, weighted K-means by
    :func:`pivotal.outofcore.kmeans_memmap`, the largest ``|cos|`` per cluster), the same
    result up to float summation order and the K-means++ subsample."""
    n, dim = G.shape
    capacity = -(-count // 8) * 8
    rows = memmap_block_rows(dim, capacity, np.dtype(G.dtype).itemsize,
                             int(cfg.feature_memory_gb * BYTES_PER_GB))
    nonzero = np.concatenate([np.asarray(jnp.any(b != 0, axis=1)) for _, b in _row_blocks(G, rows)])
    taken = np.zeros(n, bool)
    taken[existing] = True
    if int((~nonzero & ~taken).sum()):
        warnings.warn(f"features has {int((~nonzero & ~taken).sum())} all-zero candidate rows; "
                      "they have no direction and are excluded from selection", stacklevel=3)
    candidates = np.flatnonzero(nonzero & ~taken)
    num_drop = math.floor(cfg.exclude_fraction * candidates.size) if existing.size else 0
    view = _Rows(G, candidates)
    if num_drop:
        meta = jnp.asarray(np.asarray(G[np.sort(existing)]))
        sim = np.concatenate([np.asarray(pivotal.assign_clusters(b, meta, weighted=True)[1])
                              for _, b in _row_blocks(view, rows)])
        candidates = np.sort(candidates[np.argsort(-sim, kind="stable")[num_drop:]])
        view = _Rows(G, candidates)
    result = kmeans_memmap(view, count, key, block_rows=rows, max_iters=cfg.kmeans_iters,
                           weighted=weighted, cluster_capacity=capacity)
    parts = [pivotal.assign_clusters(b, result.centroids, weighted=weighted)
             for _, b in _row_blocks(view, rows)]
    assign = np.concatenate([np.asarray(a) for a, _ in parts])
    sim = np.concatenate([np.asarray(v) for _, v in parts])
    if weighted:
        sim = sim / np.asarray(jnp.linalg.norm(result.centroids, axis=1))[assign]
    order = np.lexsort((np.arange(candidates.size), -sim, assign))
    first = np.ones(order.size, bool)
    first[1:] = assign[order][1:] != assign[order][:-1]
    return candidates[order[first]].astype(np.int32)


def _clustering(method, problem, model, run, existing, count, cfg, key, info) -> np.ndarray:
    """RBC, RBC-K (unweighted K-means) and GBC: Algorithm 2 on snapshot features."""
    k_feat, k_sel = jax.random.split(key)
    # Out-of-core features live beside the run's checkpoints and go with the selection.
    with tempfile.TemporaryDirectory(prefix="features-",
                                     dir=os.path.dirname(run.snapshot_dir)) as scratch:
        with phase("features"):  # block: JAX's async dispatch would bill K-means for them
            feats, plan = selection_features(method, problem, model, run, cfg, k_feat,
                                             return_plan=True, scratch=scratch)
            jax.block_until_ready(feats)
        info["snapshot_epochs"] = [int(e) for e in plan.epochs]
        info.update(feature_mode=plan.mode, feature_dim=plan.dim, sketch_dim=plan.sketch_dim)
        # Empty K-means clusters leave select_meta_samples short of `count` (paper appendix:
        # rerun with fewer clusters). Every method must clean the same number of examples for
        # a fair comparison, so the shortfall is chosen by further Algorithm 2 steps on the
        # same features, each treating what is picked so far as existing meta samples.
        existing = np.asarray(existing, np.int64)
        picked = np.zeros(0, np.int64)
        calls = 0
        while picked.size < count:
            k_call = k_sel if calls == 0 else jax.random.fold_in(k_sel, calls)
            known = np.concatenate([existing, picked])
            with phase("kmeans"):  # the seconds of all calls add up
                if plan.mode == "out_of_core":
                    new = _select_out_of_core(feats, count - picked.size, k_call, known, cfg,
                                              weighted=(method != "rbc-k"))
                else:
                    new = pivotal.select_meta_samples(
                        feats, count - picked.size, k_call, existing=known,
                        exclude_fraction=cfg.exclude_fraction, weighted=(method != "rbc-k"),
                        max_iters=cfg.kmeans_iters, mesh=config_mesh(cfg))
            picked = np.concatenate([picked, np.asarray(new, np.int64)])
            calls += 1
        info["selection_calls"] = calls
        if (cfg.diagnostics and method == "rbc" and not cfg.label_aware
                and plan.mode != "out_of_core"):
            info.update(theorem_statistics(problem, model, run, cfg, k_feat, feats,
                                           np.asarray(existing), picked))
        del feats  # the memmap's file goes with the folder
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
    ``feature_mode`` (one of :data:`FEATURE_MODES`), ``feature_dim`` (columns clustered) and
    ``sketch_dim`` (None: exact) for RBC/RBC-K/GBC/CRAIG, absent for the methods without
    features; with ``cfg.diagnostics`` and RBC, :func:`theorem_statistics`).
    """
    info = {} if info is None else info
    if method not in SELECTORS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return SELECTORS[method](method, problem, model, run, existing, count, cfg, key, info)
