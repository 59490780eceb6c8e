"""The paper's pipeline (Algorithm 2 with one or more rounds): its phases, strung together.

The phases' code lives in problem.py, training.py and selection.py; their names are
importable from here too.

1. :func:`~experiments.problem.make_problem` -- dataset, imbalance and label noise.
2. :func:`warmup_run`: :func:`~experiments.training.train_meta` on ``M0`` random cleaned
   examples, caching a parameter snapshot per epoch and the best-validation epoch ``t*``.
3. :func:`~experiments.selection.select` ``M1`` more examples with a method, from snapshots
   after ``t*``.
4. Oracle cleaning: the selected examples get their ground-truth labels, join the meta set
   and leave the training pool (:func:`~experiments.problem.split_pool`).
5. ``train_meta`` again with the ``M0 + M1`` meta examples; test accuracy at the
   best-validation epoch and the AUC of the learned weights against label cleanliness.

:func:`run_method` strings the phases together for one method and seed; the warm-up is
shared by every method of a seed. :func:`run` does it for every method and seed of a config,
appending rows to ``OUT/results.jsonl`` and skipping the finished ones. :func:`seed_dir`,
:func:`warmup_dir` and :func:`run_dir` are the one place for the checkpoint layout under
``OUT/work``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

import pivotal
from experiments import checkpoint, models, resources, results
from experiments.config import METHODS, ExperimentConfig, config_id, warmup_config
from experiments.problem import Problem, make_problem, split_pool
from experiments.selection import select
from experiments.training import (Model, TrainingDiverged, TrainOutcome, build_model,
                                  load_snapshots, train_meta)

# The phases' names, importable from here as before the pipeline was split into modules.
__all__ = ["ExperimentConfig", "METHODS", "Problem", "make_problem", "split_pool", "Model",
           "build_model", "TrainOutcome", "TrainingDiverged", "train_meta", "load_snapshots",
           "select", "warmup_run", "run_method", "run", "weight_auc", "boundary_subset",
           "run_dir", "seed_dir", "warmup_dir", "Diverged"]


def weight_auc(weights: Optional[np.ndarray], problem: Problem, pool: np.ndarray) -> Optional[float]:
    """ROC AUC of the learned weights as a score for 'label is clean', over the pool."""
    if weights is None:
        return None
    clean = problem.is_clean[pool]
    if clean.all() or not clean.any():
        return None  # undefined without both classes (e.g. pure imbalance)
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(clean, np.asarray(weights)[pool]))


def warmup_run(problem: Problem, model: Model, cfg: ExperimentConfig, seed: int,
               work_dir: str) -> tuple[np.ndarray, TrainOutcome]:
    """Phase 1: ``M0`` random examples cleaned, meta re-weighting with snapshots.

    ``cfg.warmup == 0`` (the paper's "without pre-training", Table 10): no example is cleaned
    yet; the model is trained plainly on the noisy labels and the whole budget is selected
    from its snapshots. The run lives in ``work_dir/warmup`` (checkpointed, resumable).
    """
    key = jax.random.PRNGKey(seed)
    if cfg.warmup == 0:
        meta0 = np.zeros(0, np.int64)
    else:
        meta0 = np.asarray(pivotal.random_selection(len(problem.y_noisy), cfg.warmup,
                                                    jax.random.fold_in(key, 1)))
    run = train_meta(problem, model, cfg, jax.random.fold_in(key, 2),
                     meta_indices=meta0 if meta0.size else None, epochs=cfg.warmup_epochs,
                     ckpt_dir=os.path.join(work_dir, "warmup"), keep_snapshots=True,
                     desc="warm-up")
    return meta0, run


BOUNDARY_COUNT, BOUNDARY_FRACTION = 1000, 0.2


def boundary_subset(model: Model, problem: Problem, params, model_state, pool: np.ndarray,
                    chunk_size: int) -> np.ndarray:
    """The ``min(1000, 20 % of the pool)`` pool examples nearest the decision boundary.

    Distances are the first-order margins (:func:`experiments.models.margin_distance_fn`)
    under ``params``; the paper's Table 3 reports the weight AUC on the 1,000 nearest.
    """
    distance = models.margin_distance_fn(model.module, model.has_state)
    d = models.apply_in_chunks(lambda xb: distance(params, model_state, xb),
                               problem.x_train[pool], chunk_size)
    count = max(1, min(BOUNDARY_COUNT, int(BOUNDARY_FRACTION * len(pool))))
    return pool[np.argsort(np.abs(d), kind="stable")[:count]]


def run_dir(work_dir: str, method: str, r: Optional[int] = None) -> str:
    """Where :func:`run_method` checkpoints ``method``'s training of round ``r`` (``None``: the
    single run of ``base`` and ``finetune``)."""
    return os.path.join(work_dir, method, "final" if r is None else f"round{r}")


def seed_dir(out: str, cfg: ExperimentConfig, seed: int) -> str:
    """The work folder of one config and seed under ``out`` (every method's checkpoints)."""
    return os.path.join(out, "work", config_id(cfg), f"seed{seed}")


def warmup_dir(out: str, cfg: ExperimentConfig, seed: int) -> str:
    """The warm-up's folder: keyed by :func:`~experiments.config.warmup_config`, so configs
    that differ only after the warm-up share it."""
    return os.path.join(out, "work", f"warmup-{config_id(warmup_config(cfg))}", f"seed{seed}")


def run_method(method: str, problem: Problem, model: Model, cfg: ExperimentConfig, seed: int,
               work_dir: str, warm: Optional[tuple] = None, *, return_outcome: bool = False):
    """Phases 2-5 for one method (phase 1 is ``warm``, shared by the methods of a seed).

    Returns the result row; with ``return_outcome=True`` the pair ``(row, outcome)``, where
    ``outcome`` is the final :class:`TrainOutcome` (its ``best_params`` draw the decision
    regions of :func:`experiments.plots.plot_fig1`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    key = jax.random.PRNGKey(seed)
    k_final = jax.random.fold_in(key, 3)  # the same for every method: a fair comparison
    row: dict[str, Any] = {"method": method, "selection_seconds": 0.0}
    rounds: list = []  # (meta-set size, test accuracy) after each round's training

    if method == "base":
        with resources.phase("final_training"):
            run = train_meta(problem, model, cfg, k_final, meta_indices=None, epochs=cfg.epochs,
                             ckpt_dir=run_dir(work_dir, method), desc="base")
        meta = np.zeros(0, np.int64)
    else:
        if warm is None:
            with resources.phase("warmup"):
                warm = warmup_run(problem, model, cfg, seed, work_dir)
        meta, prev = warm
        extra = cfg.budget - cfg.warmup
        per_round = [extra // cfg.rounds + (r < extra % cfg.rounds) for r in range(cfg.rounds)]
        run = warm_run = prev
        for r, count in enumerate(per_round):
            t0 = time.perf_counter()
            k_sel = jax.random.fold_in(jax.random.fold_in(key, 4), r)
            info: dict = {}
            with resources.phase("selection"):  # selection.py times features and K-means
                new = select(method, problem, model, prev, meta, count, cfg, k_sel, info)
            row["selection_seconds"] += time.perf_counter() - t0
            for name, value in info.items():  # one entry per round
                row.setdefault(name, []).append(value)
            meta = np.concatenate([meta, np.asarray(new, np.int64)])
            if method == "finetune":
                break
            last = r == cfg.rounds - 1
            with resources.phase("final_training"):
                run = train_meta(problem, model, cfg, k_final, meta_indices=meta,
                                 epochs=cfg.epochs, ckpt_dir=run_dir(work_dir, method, r),
                                 keep_snapshots=not last, desc=f"{method} r{r}")
            prev = run
            rounds.append((len(meta), run.test_accuracy))
        if method == "finetune":
            # Fine-tune the warm-up's best model on the cleaned meta set alone.
            with resources.phase("final_training"):
                run = train_meta(problem, model, cfg, k_final, meta_indices=None,
                                 epochs=cfg.finetune_epochs,
                                 init_params=(prev.best_params, prev.best_model_state),
                                 train_indices=meta, train_labels=problem.y_clean,
                                 ckpt_dir=run_dir(work_dir, method), desc="finetune")
    pool = np.setdiff1d(np.arange(len(problem.y_noisy)), meta)
    boundary_auc = None
    if run.weights is not None and method != "base":
        # Nearest the boundary of the warm-up's model: one example set for every method.
        near = boundary_subset(model, problem, warm_run.best_params, warm_run.best_model_state,
                               pool, cfg.chunk_size)
        boundary_auc = weight_auc(run.weights, problem, near)
    row.update(
        test_accuracy=run.test_accuracy,
        best_val_accuracy=run.best_val_accuracy,
        best_epoch=run.best_epoch,
        weight_auc=weight_auc(run.weights, problem, pool),
        weight_auc_boundary=boundary_auc,
        round_meta_count=[m for m, _ in rounds],
        round_test_accuracy=[a for _, a in rounds],
        meta_indices=[int(i) for i in meta],
        meta_noisy_before_cleaning=int(np.sum(~problem.is_clean[meta])),
        train_seconds=run.seconds,
    )
    return (row, run) if return_outcome else row


def run(cfg: ExperimentConfig, methods: Sequence[str], seeds: int, out: str,
        outcomes: Optional[dict] = None, *,
        problems: Optional[Mapping[int, Problem]] = None) -> list[dict]:
    """Run (or resume) every method for seeds ``0..seeds-1``; returns this config's rows.

    Rows are appended to ``OUT/results.jsonl``; each training run checkpoints under
    ``OUT/work``. The warm-up of a seed lives under a key of the fields that shape it
    (:func:`warmup_dir`), so configs that differ only after the warm-up (e.g. the number of
    snapshots K) share it. ``outcomes``: filled with seed 0's final :class:`TrainOutcome` per
    method (for the figures). ``problems``: ``{seed: make_problem(cfg, seed)}`` already
    loaded (the command line's preflight loads seed 0); the other seeds are loaded here.

    Each row's ``phase_seconds`` and ``phase_peak_rss_gb`` (:mod:`experiments.resources`):
    ``warmup`` (run once per seed in this process; every non-base row of the seed carries
    it), ``selection`` (with ``features`` and ``kmeans`` inside it for RBC/RBC-K/GBC) and
    ``final_training`` (every training after the selection, summed over the rounds).
    """
    results.check_out(out)
    cid = config_id(cfg)
    path = results.results_path(out)
    done = {(r["method"], r["seed"]) for r in results.config_rows(out, cid)}
    outcomes = {} if outcomes is None else outcomes
    problems = {} if problems is None else problems
    # Several processes (jax.distributed) share OUT: every one trains (and checkpoints, as
    # Orbax expects), only process 0 writes the rows.
    primary = jax.process_index() == 0
    mine: list = []
    said: set = set()
    for seed in range(seeds):
        todo = [m for m in methods if (m, seed) not in done]
        if not todo:
            continue
        problem = problems[seed] if seed in problems else make_problem(cfg, seed)
        model = build_model(cfg, problem)
        work = seed_dir(out, cfg, seed)
        warm = None
        warm_phases = resources.Recorder()  # the warm-up's, shared by the seed's methods
        for method in todo:
            t0 = time.perf_counter()
            try:
                with _once(said), resources.recording() as own:
                    if method != "base" and warm is None:
                        with resources.recording(warm_phases), resources.phase("warmup"):
                            warm = warmup_run(problem, model, cfg, seed,
                                              warmup_dir(out, cfg, seed))
                    row, outcome = run_method(method, problem, model, cfg, seed, work, warm,
                                              return_outcome=True)
            except TrainingDiverged as err:
                raise Diverged(method, seed, err) from None
            phases = resources.Recorder()
            if method != "base":
                phases.merge(warm_phases)
            phases.merge(own)
            row.update(phases.row())
            if seed == 0:
                outcomes[method] = outcome
            row.update(seed=seed, dataset=cfg.dataset, noise=cfg.noise, rate=cfg.rate,
                       imbalance=cfg.imbalance, model=cfg.model, budget=cfg.budget,
                       warmup=cfg.warmup, realised_noise_rate=problem.noise_rate,
                       num_snapshots=cfg.num_snapshots, config_id=cid,
                       config=dataclasses.asdict(cfg), wall_seconds=time.perf_counter() - t0)
            mine.append(row)
            if primary:
                checkpoint.append_jsonl(path, row)
            auc = row["weight_auc"]
            print(f"seed {seed} {method:10s} test acc {100 * row['test_accuracy']:.2f}%  "
                  f"weight AUC {auc if auc is None else round(auc, 3)}", flush=True)
    if not primary:  # process 0 may not have written its rows yet
        return [r for r in results.config_rows(out, cid) if (r["method"], r["seed"]) in done] \
            + mine
    return results.config_rows(out, cid)


class Diverged(RuntimeError):
    """A training run of ``method`` and ``seed`` reached non-finite values."""

    def __init__(self, method: str, seed: int, err: TrainingDiverged):
        super().__init__(f"method {method}, seed {seed}: {err.desc} diverged in epoch "
                         f"{err.epoch} (non-finite loss, weight or parameter); no row was "
                         f"written and the checkpoints of earlier epochs are kept. Try a "
                         f"smaller --lr or --weight-lr")


@contextlib.contextmanager
def _once(said: set):
    """Shows each distinct warning once per :func:`run`: the methods of a seed share the
    warm-up, so e.g. its snapshot fallback would be repeated by every method (the rows'
    ``snapshot_epochs`` record what each used)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            new = [w for w in caught if (str(w.message), w.category) not in said]
    for w in new:
        said.add((str(w.message), w.category))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
