"""The paper's pipeline, one function per phase (Algorithm 2 with one or more rounds).

1. :func:`make_problem` -- dataset, imbalance and label noise.
2. :func:`train_meta` on ``M0`` random cleaned examples (the warm-up), caching a parameter
   snapshot per epoch and the best-validation epoch ``t*``.
3. :func:`select` ``M1`` more examples with a method, from snapshots after ``t*``.
4. Oracle cleaning: the selected examples get their ground-truth labels, join the meta set
   and leave the training pool (:func:`split_pool`).
5. :func:`train_meta` again with the ``M0 + M1`` meta examples; test accuracy at the
   best-validation epoch and the AUC of the learned weights against label cleanliness.

:func:`run_method` strings the phases together for one method and seed; the warm-up is
shared by every method of a seed. Every training run checkpoints each epoch (Orbax) and
resumes from its last checkpoint, so a killed run continues to the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import time
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import pivotal
from pivotal.selection import remaining_candidates
from experiments import checkpoint, models
from experiments import noise as noise_lib
from experiments.datasets import augment_cifar, load_dataset

METHODS = ("base", "random", "certain", "uncertain", "finetune", "ta-vaal", "craig", "rbc-k",
           "rbc", "gbc")
NOISES = ("none", "uniform", "adversarial", "file")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment. Defaults: the main job (MNIST-5k, 60 % adversarial noise, LeNet-5)."""

    dataset: str = "mnist5k"
    noise: str = "adversarial"
    rate: float = 0.6
    imbalance: Optional[float] = None  # long-tailed factor, None = balanced
    noise_file: Optional[str] = None
    noise_file_key: Optional[str] = None
    data_dir: Optional[str] = None
    model: str = "lenet5"
    budget: int = 20  # M0 + M1 cleaned examples in all
    warmup: int = 10  # M0, drawn at random; 0 = no warm-up (plain training, then one selection)
    rounds: int = 1  # selection rounds after the warm-up (Algorithm 2's loop)
    warmup_epochs: int = 20
    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    lr_milestones: tuple = ()  # epochs at which the learning rate is divided by 10
    rule: str = "direct"  # direct | l2rw | mwn
    weight_lr: float = 300.0
    weight_init: Any = "uniform"
    meta_batch_size: Optional[int] = None
    augment: bool = False
    num_snapshots: int = 5  # K snapshots after t*
    snapshot_every: Optional[int] = None  # keep a snapshot every k epochs (None: every epoch)
    gbc_layers: int = 5
    gbc_chunk_size: int = 16  # per-example gradient chunk; small chunks are fastest on XLA:CPU
    exclude_fraction: float = 0.5
    kmeans_iters: int = 200
    finetune_epochs: int = 20
    mesh: Optional[int] = None  # shard the example axis over this many devices ('data' axis)
    ta_vaal_steps: int = 400  # VAE/discriminator steps (the loss ranker gets 3/4 of them)
    chunk_size: int = 512
    diagnostics: bool = False  # rbc rows also report Theorem 1's D_j and Theorem 2's counts

    @property
    def label_aware(self) -> bool:
        """Label-aware features under pure imbalance; label-free under label noise."""
        return self.noise == "none"

    def validate(self) -> None:
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {list(NOISES)}, got {self.noise!r}")
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {self.rate}")
        if self.noise == "file" and not self.noise_file:
            raise ValueError("noise 'file' needs noise_file (--noise-file), a CIFAR-N style "
                             "label file")
        if self.imbalance is not None and self.imbalance < 1:
            raise ValueError(f"imbalance must be a factor >= 1, got {self.imbalance}")
        if self.noise == "none" and self.rate != 0:
            raise ValueError(f"rate must be 0 with noise 'none' (no label is changed), "
                             f"got {self.rate}")
        if self.noise != "file" and (self.noise_file or self.noise_file_key):
            raise ValueError(f"noise_file and noise_file_key need noise 'file', got noise "
                             f"{self.noise!r}")
        for name in ("lr", "weight_lr"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        if self.imbalance is not None and not math.isfinite(self.imbalance):
            raise ValueError(f"imbalance must be a finite factor >= 1, got {self.imbalance}")
        if self.budget <= 0:
            raise ValueError(f"budget must be positive, got {self.budget}")
        if not 0 <= self.warmup < self.budget:
            raise ValueError(f"warmup must be in [0, budget) so that something is selected; "
                             f"got warmup={self.warmup}, budget={self.budget}")
        if self.rounds < 1 or self.rounds > self.budget - self.warmup:
            raise ValueError(f"rounds must be in [1, budget - warmup], got {self.rounds}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {sorted(RULES)}, got {self.rule!r}")
        for name in ("warmup_epochs", "epochs", "batch_size", "num_snapshots", "gbc_layers",
                     "kmeans_iters", "finetune_epochs", "chunk_size", "ta_vaal_steps",
                     "gbc_chunk_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.mesh is not None:
            if self.mesh < 1 or self.mesh > jax.device_count():
                raise ValueError(f"mesh must be in [1, {jax.device_count()}] (the devices JAX "
                                 f"sees), got {self.mesh}")
            if self.batch_size % self.mesh:
                raise ValueError(f"batch_size {self.batch_size} must be divisible by the mesh "
                                 f"size {self.mesh}")
        if not 0.0 <= self.exclude_fraction < 1.0:
            raise ValueError(f"exclude_fraction must be in [0, 1), got {self.exclude_fraction}")

    def validate_methods(self, methods) -> None:
        """The checks that depend on the methods run with this config."""
        if "ta-vaal" in methods and self.warmup == 0:
            raise ValueError("ta-vaal learns from the labelled meta set: it needs a warm-up "
                             "(warmup > 0, --warmup)")


# Fields that do not change the warm-up run: configs differing only in these share it.
SELECTION_ONLY_FIELDS = ("budget", "rounds", "epochs", "num_snapshots", "gbc_layers",
                         "gbc_chunk_size", "exclude_fraction", "kmeans_iters", "finetune_epochs",
                         "ta_vaal_steps", "chunk_size", "diagnostics")


def warmup_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the fields that only matter after the warm-up reset to their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(ExperimentConfig)}
    return dataclasses.replace(cfg, **{name: defaults[name] for name in SELECTION_ONLY_FIELDS})


RULES = {
    "direct": lambda cfg: pivotal.direct_weights(weight_lr=cfg.weight_lr, init=cfg.weight_init),
    "l2rw": lambda cfg: pivotal.l2rw(),
    "mwn": lambda cfg: pivotal.meta_weight_net(),
}


# ----------------------------------------------------------------------------- data


class Problem(NamedTuple):
    """A noisy (and/or imbalanced) training set with its clean labels and eval splits."""

    name: str
    x_train: np.ndarray  # (N, ...)
    y_noisy: np.ndarray  # (N,) labels the learner sees
    y_clean: np.ndarray  # (N,) ground truth, used only by the cleaning oracle and metrics
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple
    noise_rate: float  # realised

    @property
    def is_clean(self) -> np.ndarray:
        return self.y_noisy == self.y_clean


def make_problem(cfg: ExperimentConfig, seed: int) -> Problem:
    """Load the dataset (split by ``seed``), subsample long-tailed, inject label noise."""
    data = load_dataset(cfg.dataset, seed=seed, data_dir=cfg.data_dir)
    x, y = data.x_train, data.y_train
    k = data.num_classes
    if cfg.imbalance is not None and cfg.imbalance > 1:
        kept = noise_lib.long_tailed(y, cfg.imbalance, k, seed=seed)
        x, y = x[kept], y[kept]
    if cfg.noise == "uniform":
        noisy = noise_lib.uniform(y, cfg.rate, k, seed=seed).labels
    elif cfg.noise == "adversarial":
        noisy = noise_lib.adversarial(y, cfg.rate, k, seed=seed).labels
    elif cfg.noise == "file":
        if cfg.imbalance is not None:
            raise ValueError("noise='file' cannot be combined with imbalance")
        labels = noise_lib.from_file(cfg.noise_file, key=cfg.noise_file_key, clean_labels=y)
        noisy = np.asarray(getattr(labels, "labels", labels))[data.train_index]
    else:
        noisy = y.copy()
    noisy = np.asarray(noisy, np.int32)
    return Problem(cfg.dataset, x, noisy, np.asarray(y, np.int32), data.x_val, data.y_val,
                   data.x_test, data.y_test, k, tuple(data.input_shape),
                   float(np.mean(noisy != y)))


def split_pool(problem: Problem, meta_indices: np.ndarray):
    """Oracle cleaning: meta examples carry ground-truth labels and leave the training pool.

    Returns ``(pool_indices (N - M,), meta_set {"x", "y"})``.
    """
    meta_indices = np.asarray(meta_indices, np.int64)
    if len(np.unique(meta_indices)) != len(meta_indices):
        raise ValueError("meta_indices must be unique")
    pool = np.setdiff1d(np.arange(len(problem.y_noisy)), meta_indices)
    meta = {"x": problem.x_train[meta_indices], "y": problem.y_clean[meta_indices]}
    return pool, meta


# ----------------------------------------------------------------------------- training


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


def accuracy(model: Model, params, model_state, x, y, chunk_size: int) -> float:
    logits = models.apply_in_chunks(lambda xb: model.predict(params, model_state, xb), x, chunk_size)
    return float(np.mean(np.argmax(logits, -1) == y))


def data_mesh(cfg: ExperimentConfig):
    """The 1-D ``data`` mesh of ``cfg.mesh`` devices, or None (single device)."""
    return None if cfg.mesh is None else pivotal.data_mesh(cfg.mesh)


@jax.jit
def _gather(x, y, idx):
    return {"x": x[idx], "y": y[idx], "index": idx}


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
    n = len(problem.y_noisy)
    labels = problem.y_noisy if train_labels is None else np.asarray(train_labels, np.int32)
    if meta_indices is not None:
        pool, meta = split_pool(problem, meta_indices)
        meta = jax.tree_util.tree_map(jnp.asarray, meta)
    else:
        pool, meta = np.arange(n), None
    if train_indices is not None:
        pool = np.asarray(train_indices, np.int64)
    batch_size = min(cfg.batch_size, len(pool))
    steps_per_epoch = max(1, len(pool) // batch_size)
    rule = RULES[cfg.rule](cfg) if meta is not None else pivotal.l2rw()
    trainer = _trainer(model, rule, cfg, steps_per_epoch)

    k_init, k_rule, k_data = jax.random.split(key, 3)
    if init_params is None:
        params, model_state = models.init_model(model.module, k_init, problem.input_shape)
    else:
        params, model_state = init_params
    state = trainer.init(params, k_rule, num_examples=n, model_state=model_state)
    mesh = data_mesh(cfg)
    if mesh is not None:
        # Parameters, optimizer and weight state replicated; each batch split over devices.
        # The meta set is tiny and drawn with replacement inside the step: replicated too.
        state = pivotal.replicate(state, mesh)
        meta = None if meta is None else pivotal.replicate(meta, mesh)
    track = {"best_val": np.float64(-1.0), "best_test": np.float64(0.0),
             "best_epoch": np.int64(-1), "epoch": np.int64(0)}
    best = (state.params, state.model_state, pivotal.example_weights(state))

    manager = checkpoint.Checkpointer(ckpt_dir) if ckpt_dir else None
    # A damaged last step: resume from the newest readable one, or start over (one warning).
    resumed = manager.restore_latest({"state": state, "best": best, "track": track}) \
        if manager is not None else None
    if resumed is not None:
        state, best, track = resumed[1]["state"], resumed[1]["best"], resumed[1]["track"]

    x_dev, y_dev = jnp.asarray(problem.x_train), jnp.asarray(labels)
    first = int(track["epoch"])
    bar = tqdm(range(first, epochs), desc=desc, leave=False, initial=first, total=epochs,
               disable=None)
    for epoch in bar:
        k_epoch = jax.random.fold_in(k_data, epoch)
        order = np.asarray(jax.random.permutation(jax.random.fold_in(k_epoch, 0), len(pool)))
        for s in range(steps_per_epoch):
            idx = jnp.asarray(pool[order[s * batch_size:(s + 1) * batch_size]])
            batch = _gather(x_dev, y_dev, idx)
            if mesh is not None:
                batch = pivotal.shard_examples(batch, mesh)
            k_step = jax.random.fold_in(k_epoch, s + 1)
            if cfg.augment:
                batch["x"] = augment_cifar(jax.random.fold_in(k_step, 1), batch["x"])
            if meta is None:
                state, metrics = trainer.plain_step(state, batch)
            else:
                state, metrics = trainer.step(state, batch, meta, k_step)
            try:
                pivotal.check_finite(metrics)
            except FloatingPointError as err:
                raise TrainingDiverged(desc, epoch, str(err)) from None
        val = accuracy(model, state.params, state.model_state, problem.x_val, problem.y_val,
                       cfg.chunk_size)
        if val > track["best_val"]:
            test = accuracy(model, state.params, state.model_state, problem.x_test,
                            problem.y_test, cfg.chunk_size)
            track.update(best_val=np.float64(val), best_test=np.float64(test),
                         best_epoch=np.int64(epoch))
            best = (state.params, state.model_state, pivotal.example_weights(state))
        track["epoch"] = np.int64(epoch + 1)
        bar.set_postfix(val=f"{val:.3f}", best=f"{float(track['best_val']):.3f}")
        if manager is not None:
            # Every ``snapshot_every``-th epoch, and always the last one (a run shorter
            # than ``snapshot_every`` still has a snapshot to select from).
            if keep_snapshots and (cfg.snapshot_every is None or epoch == epochs - 1
                                   or (epoch + 1) % cfg.snapshot_every == 0):
                manager.save_snapshot(epoch, state.params, state.model_state)
            manager.save(epoch + 1, {"state": state, "best": best, "track": track})
    weights = None if best[2] is None else np.asarray(best[2])
    return TrainOutcome(int(track["best_epoch"]), float(track["best_val"]),
                        float(track["best_test"]), best[0], best[1], weights,
                        time.perf_counter() - start, ckpt_dir if keep_snapshots else None, epochs)


def _trainer(model: Model, rule, cfg: ExperimentConfig, steps_per_epoch: int):
    key = (rule.name, cfg.weight_lr, str(cfg.weight_init), cfg.lr, cfg.momentum, cfg.nesterov,
           cfg.weight_decay, tuple(cfg.lr_milestones), cfg.meta_batch_size, steps_per_epoch)
    if key not in model.trainers:
        model.trainers[key] = pivotal.make_meta_step(
            model.loss_fn, rule, optimizer=_optimizer(cfg),
            learning_rate=_schedule(cfg, steps_per_epoch),
            meta_batch_size=cfg.meta_batch_size, has_state=model.has_state)
    return model.trainers[key]


def load_snapshots(outcome: TrainOutcome) -> Mapping[int, Any]:
    """``{epoch: (params, model_state)}``, loaded from disk lazily."""
    if outcome.snapshot_dir is None:
        raise ValueError("this run kept no snapshots (train_meta(..., keep_snapshots=True))")
    return checkpoint.Checkpointer(outcome.snapshot_dir).snapshots()


# ----------------------------------------------------------------------------- selection


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


def select(method: str, problem: Problem, model: Model, run: TrainOutcome,
           existing: np.ndarray, count: int, cfg: ExperimentConfig, key: jax.Array,
           info: Optional[dict] = None) -> np.ndarray:
    """``count`` new training indices (not in ``existing``) chosen by ``method``.

    ``info``: a dict that receives what the selection used (``snapshot_epochs`` for RBC/GBC;
    with ``cfg.diagnostics`` and RBC, :func:`theorem_statistics`).
    """
    info = {} if info is None else info
    n = len(problem.y_noisy)
    if method in ("random", "finetune"):
        return np.asarray(pivotal.random_selection(n, count, key, existing=existing))
    if method in ("certain", "uncertain"):
        probs = _probs(model, run.best_params, run.best_model_state, problem.x_train,
                       cfg.chunk_size)
        pick = pivotal.certainty_selection if method == "certain" else pivotal.uncertainty_selection
        return np.asarray(pick(probs, count, existing=existing))
    if method == "craig":
        forward = _forward(model, problem, run.best_params, run.best_model_state,
                           cfg.chunk_size)
        feats = _rbc_block(model, problem, run.best_params, run.best_model_state,
                           cfg.label_aware, cfg.chunk_size, forward=forward)
        return np.asarray(pivotal.craig_selection(feats, count, existing=existing,
                                                  classes=np.argmax(forward[1], -1), key=key))
    if method == "ta-vaal":
        from experiments.ta_vaal import ta_vaal_selection

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
    if method in ("rbc", "rbc-k", "gbc"):
        k_feat, k_sel = jax.random.split(key)
        feats, epochs = selection_features(method, problem, model, run, cfg, k_feat,
                                           return_epochs=True)
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
            picked = np.concatenate([picked, np.asarray(pivotal.select_meta_samples(
                feats, count - picked.size, k_call, existing=np.concatenate([existing, picked]),
                exclude_fraction=cfg.exclude_fraction, weighted=(method != "rbc-k"),
                max_iters=cfg.kmeans_iters, mesh=data_mesh(cfg)), np.int64)])
            calls += 1
        info["selection_calls"] = calls
        if cfg.diagnostics and method == "rbc" and not cfg.label_aware:
            info.update(theorem_statistics(problem, model, run, cfg, k_feat, feats,
                                           np.asarray(existing), picked))
        return picked
    raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")


# ----------------------------------------------------------------------------- one run


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
        run = train_meta(problem, model, cfg, k_final, meta_indices=None, epochs=cfg.epochs,
                         ckpt_dir=run_dir(work_dir, method), desc="base")
        meta = np.zeros(0, np.int64)
    else:
        meta, prev = warm if warm is not None else warmup_run(problem, model, cfg, seed, work_dir)
        extra = cfg.budget - cfg.warmup
        per_round = [extra // cfg.rounds + (r < extra % cfg.rounds) for r in range(cfg.rounds)]
        run = warm_run = prev
        for r, count in enumerate(per_round):
            t0 = time.perf_counter()
            k_sel = jax.random.fold_in(jax.random.fold_in(key, 4), r)
            info: dict = {}
            new = select(method, problem, model, prev, meta, count, cfg, k_sel, info)
            row["selection_seconds"] += time.perf_counter() - t0
            for name, value in info.items():  # one entry per round
                row.setdefault(name, []).append(value)
            meta = np.concatenate([meta, np.asarray(new, np.int64)])
            if method == "finetune":
                break
            last = r == cfg.rounds - 1
            run = train_meta(problem, model, cfg, k_final, meta_indices=meta, epochs=cfg.epochs,
                             ckpt_dir=run_dir(work_dir, method, r),
                             keep_snapshots=not last, desc=f"{method} r{r}")
            prev = run
            rounds.append((len(meta), run.test_accuracy))
        if method == "finetune":
            # Fine-tune the warm-up's best model on the cleaned meta set alone.
            run = train_meta(problem, model, cfg, k_final, meta_indices=None,
                             epochs=cfg.finetune_epochs, init_params=(prev.best_params,
                                                                      prev.best_model_state),
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
