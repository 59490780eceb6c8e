"""Training runs: meta re-weighting (or plain training) of a model on a :class:`Problem`.

:func:`train_meta` is the whole run, strung from parts kept apart as in the Flax examples:

- :func:`training_pool`: the examples trained on, their labels and the cleaned meta set;
- :func:`init_state`: the trainer's state (fresh or given parameters), replicated on a mesh;
- :func:`restore`: the newest readable checkpoint of the run, or the start;
- :func:`train_epoch`: one epoch of meta steps (the library's compiled ``trainer.step``);
- :func:`evaluate`: validation accuracy, and test accuracy at a new best epoch;
- :func:`save_epoch`: the epoch's checkpoint and, for selection, its parameter snapshot.

Every run checkpoints each epoch (Orbax) and resumes from its last checkpoint, so a killed
run continues to the same numbers.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import pivotal
from pivotal.history import snapshots_to_keep
from experiments import checkpoint, models
from experiments.config import RULES, ExperimentConfig, config_mesh
from experiments.datasets import augment_cifar
from experiments.problem import Problem, split_pool


class TrainingDiverged(FloatingPointError):
    """A training run reached non-finite values; the checkpoints of earlier epochs are kept."""

    def __init__(self, desc: str, epoch: int, detail: str):
        super().__init__(f"{desc} diverged in epoch {epoch}: {detail}")
        self.desc, self.epoch = desc, epoch


class TrainOutcome(NamedTuple):
    best_epoch: int
    best_val_accuracy: float
    test_accuracy: float  # at the best-validation epoch
    best_params: Any
    best_model_state: Any
    weights: Optional[np.ndarray]  # (N,) direct weights at the best epoch, None otherwise
    seconds: float
    snapshot_dir: Optional[str]
    num_epochs: int


class Model(NamedTuple):
    module: Any
    has_state: bool
    loss_fn: Any
    predict: Any
    features: Any
    # One compiled meta step per training configuration, shared by the methods of a run (see
    # _trainer); held here rather than in a module global so that it lives as long as the model.
    trainers: dict


class EpochData(NamedTuple):
    """What every epoch of one run reads."""

    x: jax.Array  # (N, ...) every training example, on device
    y: jax.Array  # (N,) the labels the learner sees
    pool: np.ndarray  # the indices trained on
    batch_size: int
    steps_per_epoch: int
    meta: Optional[dict]  # the cleaned meta set; None: plain training
    mesh: Any  # None: one device


def build_model(cfg: ExperimentConfig, problem: Problem) -> Model:
    module, has_state = models.make_model(cfg.model, problem.num_classes, problem.input_shape)
    return Model(module, has_state, models.cross_entropy_loss_fn(module, has_state),
                 models.predict_fn(module, has_state), models.features_fn(module, has_state),
                 trainers={})


def _optimizer(cfg: ExperimentConfig):
    sgd = optax.sgd(1.0, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    if cfg.weight_decay:
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay), sgd)
    return sgd


def _schedule(cfg: ExperimentConfig, steps_per_epoch: int):
    if not cfg.lr_milestones:
        return cfg.lr
    return optax.piecewise_constant_schedule(
        cfg.lr, {int(m) * steps_per_epoch: 0.1 for m in cfg.lr_milestones})


def _trainer(model: Model, rule, cfg: ExperimentConfig, steps_per_epoch: int):
    key = (rule.name, cfg.weight_lr, str(cfg.weight_init), cfg.lr, cfg.momentum, cfg.nesterov,
           cfg.weight_decay, tuple(cfg.lr_milestones), cfg.meta_batch_size, steps_per_epoch,
           cfg.meta_gradient)
    if key not in model.trainers:
        model.trainers[key] = pivotal.make_meta_step(
            model.loss_fn, rule, optimizer=_optimizer(cfg),
            learning_rate=_schedule(cfg, steps_per_epoch),
            meta_batch_size=cfg.meta_batch_size, has_state=model.has_state,
            meta_gradient=cfg.meta_gradient)
    return model.trainers[key]


def accuracy(model: Model, params, model_state, x, y, chunk_size: int) -> float:
    logits = models.apply_in_chunks(lambda xb: model.predict(params, model_state, xb), x, chunk_size)
    return float(np.mean(np.argmax(logits, -1) == y))


@jax.jit
def _gather(x, y, idx):
    return {"x": x[idx], "y": y[idx], "index": idx}


def training_pool(problem: Problem, meta_indices: Optional[np.ndarray],
                  train_indices: Optional[np.ndarray], train_labels: Optional[np.ndarray]):
    """``(pool, meta, labels)``: the indices trained on (every example outside the meta set,
    or ``train_indices``), the cleaned meta set on device (None without ``meta_indices``) and
    the labels the learner sees (``train_labels``, default the noisy ones)."""
    labels = problem.y_noisy if train_labels is None else np.asarray(train_labels, np.int32)
    if meta_indices is not None:
        pool, meta = split_pool(problem, meta_indices)
        meta = jax.tree_util.tree_map(jnp.asarray, meta)
    else:
        pool, meta = np.arange(len(problem.y_noisy)), None
    if train_indices is not None:
        pool = np.asarray(train_indices, np.int64)
    return pool, meta, labels


def init_state(trainer, model: Model, problem: Problem, init_params, k_init, k_rule,
               meta: Optional[dict], mesh):
    """``(state, meta)``: the trainer's initial state from ``init_params`` (``(params,
    model_state)``; None: fresh from ``k_init``), both replicated over ``mesh``."""
    if init_params is None:
        params, model_state = models.init_model(model.module, k_init, problem.input_shape)
    else:
        params, model_state = init_params
    state = trainer.init(params, k_rule, num_examples=len(problem.y_noisy),
                         model_state=model_state)
    if mesh is not None:
        # Parameters, optimizer and weight state replicated; each batch split over devices.
        # The meta set is tiny and drawn with replacement inside the step: replicated too.
        state = pivotal.replicate(state, mesh)
        meta = None if meta is None else pivotal.replicate(meta, mesh)
    return state, meta


def restore(manager: Optional[checkpoint.Checkpointer], state):
    """``(state, best, track)`` from the newest readable checkpoint, or those of the start.

    ``best``: ``(params, model_state, example weights)`` at the best-validation epoch so far;
    ``track``: the best validation and test accuracy, the best epoch, the next epoch.
    """
    track = {"best_val": np.float64(-1.0), "best_test": np.float64(0.0),
             "best_epoch": np.int64(-1), "epoch": np.int64(0)}
    best = (state.params, state.model_state, pivotal.example_weights(state))
    # A damaged last step: resume from the newest readable one, or start over (one warning).
    resumed = manager.restore_latest({"state": state, "best": best, "track": track}) \
        if manager is not None else None
    if resumed is not None:
        state, best, track = resumed[1]["state"], resumed[1]["best"], resumed[1]["track"]
    return state, best, track


def train_epoch(trainer, state, data: EpochData, k_data, epoch: int, cfg: ExperimentConfig,
                desc: str):
    """One epoch: a seeded permutation of the pool, ``data.steps_per_epoch`` steps."""
    k_epoch = jax.random.fold_in(k_data, epoch)
    order = np.asarray(jax.random.permutation(jax.random.fold_in(k_epoch, 0), len(data.pool)))
    for s in range(data.steps_per_epoch):
        idx = jnp.asarray(data.pool[order[s * data.batch_size:(s + 1) * data.batch_size]])
        batch = _gather(data.x, data.y, idx)
        if data.mesh is not None:
            batch = pivotal.shard_examples(batch, data.mesh)
        k_step = jax.random.fold_in(k_epoch, s + 1)
        if cfg.augment:
            batch["x"] = augment_cifar(jax.random.fold_in(k_step, 1), batch["x"])
        if data.meta is None:
            state, metrics = trainer.plain_step(state, batch)
        else:
            state, metrics = trainer.step(state, batch, data.meta, k_step)
        try:
            pivotal.check_finite(metrics)
        except FloatingPointError as err:
            raise TrainingDiverged(desc, epoch, str(err)) from None
    return state


def evaluate(model: Model, problem: Problem, state, best, track: dict, epoch: int,
             chunk_size: int):
    """``(val, best)`` after ``epoch``: validation accuracy; at a new best one, ``track`` gets
    the test accuracy and ``best`` the state's parameters and weights."""
    val = accuracy(model, state.params, state.model_state, problem.x_val, problem.y_val,
                   chunk_size)
    if val > track["best_val"]:
        test = accuracy(model, state.params, state.model_state, problem.x_test,
                        problem.y_test, chunk_size)
        track.update(best_val=np.float64(val), best_test=np.float64(test),
                     best_epoch=np.int64(epoch))
        best = (state.params, state.model_state, pivotal.example_weights(state))
    return val, best


def save_epoch(manager: checkpoint.Checkpointer, state, best, track: dict, epoch: int,
               epochs: int, keep_snapshots: bool, cfg: ExperimentConfig) -> None:
    """The checkpoint after ``epoch``; with ``keep_snapshots`` its parameters as a snapshot.

    ``snapshot_every`` None: every epoch's snapshot is kept. Otherwise the rolling set of
    :func:`pivotal.history.snapshots_to_keep` (at most ``2 K`` on disk): the snapshot is saved
    when the set holds ``epoch``, and the snapshots the set no longer holds are dropped after
    the checkpoint, so a run killed in between resumes with a superset.
    """
    if keep_snapshots and cfg.snapshot_every is None:
        manager.save_snapshot(epoch, state.params, state.model_state)
    keep = None
    if keep_snapshots and cfg.snapshot_every is not None:
        keep = snapshots_to_keep(epochs, int(track["best_epoch"]), epoch, cfg.num_snapshots,
                                 cfg.snapshot_every)
        if epoch in keep:
            manager.save_snapshot(epoch, state.params, state.model_state)
    manager.save(epoch + 1, {"state": state, "best": best, "track": track})
    if keep is not None:
        manager.drop_snapshots(set(manager.snapshots()) - set(int(e) for e in keep))


def train_meta(
    problem: Problem,
    model: Model,
    cfg: ExperimentConfig,
    key: jax.Array,
    *,
    meta_indices: Optional[np.ndarray],
    epochs: int,
    ckpt_dir: Optional[str] = None,
    keep_snapshots: bool = False,
    init_params=None,
    train_indices: Optional[np.ndarray] = None,
    train_labels: Optional[np.ndarray] = None,
    desc: str = "train",
) -> TrainOutcome:
    """Meta re-weighting (``meta_indices`` given) or plain training (``None``) for ``epochs``.

    The training pool is every example outside the meta set (or ``train_indices``), with the
    labels the learner sees (``train_labels``, default the noisy ones). Each epoch: a seeded
    permutation, ``floor(|pool| / batch_size)`` steps (at least one), validation and test
    accuracy; the result is read at the best-validation epoch. ``ckpt_dir``: checkpoint per
    epoch and resume; ``keep_snapshots``: also keep every epoch's parameters there for
    selection (:func:`load_snapshots`).
    """
    start = time.perf_counter()
    pool, meta, labels = training_pool(problem, meta_indices, train_indices, train_labels)
    batch_size = min(cfg.batch_size, len(pool))
    steps_per_epoch = max(1, len(pool) // batch_size)
    rule = RULES[cfg.rule](cfg) if meta is not None else pivotal.l2rw()
    trainer = _trainer(model, rule, cfg, steps_per_epoch)

    k_init, k_rule, k_data = jax.random.split(key, 3)
    mesh = config_mesh(cfg)
    state, meta = init_state(trainer, model, problem, init_params, k_init, k_rule, meta, mesh)
    manager = checkpoint.Checkpointer(ckpt_dir) if ckpt_dir else None
    state, best, track = restore(manager, state)

    data = EpochData(jnp.asarray(problem.x_train), jnp.asarray(labels), pool, batch_size,
                     steps_per_epoch, meta, mesh)
    first = int(track["epoch"])
    bar = tqdm(range(first, epochs), desc=desc, leave=False, initial=first, total=epochs,
               disable=None)
    for epoch in bar:
        state = train_epoch(trainer, state, data, k_data, epoch, cfg, desc)
        val, best = evaluate(model, problem, state, best, track, epoch, cfg.chunk_size)
        track["epoch"] = np.int64(epoch + 1)
        bar.set_postfix(val=f"{val:.3f}", best=f"{float(track['best_val']):.3f}")
        if manager is not None:
            save_epoch(manager, state, best, track, epoch, epochs, keep_snapshots, cfg)
    weights = None if best[2] is None else np.asarray(best[2])
    return TrainOutcome(int(track["best_epoch"]), float(track["best_val"]),
                        float(track["best_test"]), best[0], best[1], weights,
                        time.perf_counter() - start, ckpt_dir if keep_snapshots else None, epochs)


def load_snapshots(outcome: TrainOutcome) -> Mapping[int, Any]:
    """``{epoch: (params, model_state)}``, loaded from disk lazily."""
    if outcome.snapshot_dir is None:
        raise ValueError("this run kept no snapshots (train_meta(..., keep_snapshots=True))")
    return checkpoint.Checkpointer(outcome.snapshot_dir).snapshots()
