"""What an experiment is: :class:`ExperimentConfig` (data, no behaviour beyond its checks) and
the tables that give its names a meaning: ``METHODS``, ``NOISES``, ``RULES``.

Everything else in the experiments layer reads a config; nothing here trains or loads data.
:func:`config_id` names a config on disk, :func:`warmup_config` the part of it that shapes the
warm-up (configs that differ only after the warm-up share it), :func:`config_mesh` the devices
it runs on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from typing import Any, Mapping, Optional

import jax

import pivotal

METHODS = ("base", "random", "certain", "uncertain", "finetune", "ta-vaal", "craig", "rbc-k",
           "rbc", "gbc")
NOISES = ("none", "uniform", "adversarial", "file")

# Reweighting rule name -> the rule for a config (the pivotal object the trainer accepts).
RULES = {
    "direct": lambda cfg: pivotal.direct_weights(weight_lr=cfg.weight_lr, init=cfg.weight_init),
    "l2rw": lambda cfg: pivotal.l2rw(),
    "mwn": lambda cfg: pivotal.meta_weight_net(),
}


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
    train_size: Optional[int] = None  # a seeded stratified subsample of the training split
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
    # The weight gradient: "exact" (Eq. 3 through the lookahead) or "first_order" (the
    # last-layer, taken-at-theta approximation of pivotal.first_order_forward).
    meta_gradient: str = "exact"
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
    # Bound (GB = 1e9 bytes) on the (N, D) float32 selection features: exact in memory when they
    # fit, else sketched, else on disk (experiments.selection.choose_feature_mode).
    feature_memory_gb: float = 4.0

    @property
    def label_aware(self) -> bool:
        """Label-aware features under pure imbalance; label-free under label noise."""
        return self.noise == "none"

    def validate(self, flags: Optional[Mapping[str, str]] = None) -> None:
        """``ValueError`` for the first bad field.

        ``flags``: what to call a field in the message (the command line passes its flag names,
        e.g. ``{"lr": "--lr"}``); fields not in it, or all without it, go by their own names.
        """
        def name(field: str) -> str:
            return field if flags is None else flags.get(field, field)

        for field in ("rate", "imbalance", "lr", "weight_lr", "feature_memory_gb"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, numbers.Real)
                                          and math.isfinite(value)):
                raise ValueError(f"{name(field)} must be a finite number, got {value}")
        for field in ("lr", "weight_lr", "feature_memory_gb"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{name(field)} must be positive, got {getattr(self, field)}")
        if self.noise not in NOISES:
            raise ValueError(f"{name('noise')} must be one of {list(NOISES)}, got {self.noise!r}")
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"{name('rate')} must be in [0, 1), got {self.rate}")
        if self.noise == "file" and not self.noise_file:
            raise ValueError("noise 'file' needs noise_file (--noise-file), a CIFAR-N style "
                             "label file")
        if self.imbalance is not None and self.imbalance < 1:
            raise ValueError(f"{name('imbalance')} must be a factor >= 1, got {self.imbalance}")
        if self.noise == "none" and self.rate != 0:
            raise ValueError(f"{name('rate')} must be 0 with noise 'none' (no label is changed), "
                             f"got {self.rate}")
        if self.noise != "file" and (self.noise_file or self.noise_file_key):
            raise ValueError(f"noise_file and noise_file_key need noise 'file', got noise "
                             f"{self.noise!r}")
        if self.train_size is not None and (isinstance(self.train_size, bool) or not isinstance(
                self.train_size, numbers.Integral) or self.train_size < 1):
            raise ValueError(f"{name('train_size')} must be a positive integer (examples kept "
                             f"of the training split), got {self.train_size!r}")
        if self.budget <= 0:
            raise ValueError(f"{name('budget')} must be positive, got {self.budget}")
        if not 0 <= self.warmup < self.budget:
            raise ValueError(f"{name('warmup')} must be in [0, budget) so that something is "
                             f"selected; got warmup={self.warmup}, budget={self.budget}")
        if self.rounds < 1 or self.rounds > self.budget - self.warmup:
            raise ValueError(f"{name('rounds')} must be in [1, budget - warmup], got "
                             f"{self.rounds}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {sorted(RULES)}, got {self.rule!r}")
        if self.meta_gradient not in pivotal.META_GRADIENTS:
            raise ValueError(f"{name('meta_gradient')} must be one of "
                             f"{list(pivotal.META_GRADIENTS)}, got {self.meta_gradient!r}")
        for field in ("warmup_epochs", "epochs", "batch_size", "num_snapshots", "gbc_layers",
                      "kmeans_iters", "finetune_epochs", "chunk_size", "ta_vaal_steps",
                      "gbc_chunk_size"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"{name(field)} must be a positive integer, got "
                                 f"{getattr(self, field)}")
        if self.mesh is not None:
            if self.mesh < 1 or self.mesh > jax.device_count():
                raise ValueError(f"{name('mesh')} must be in [1, {jax.device_count()}] (the "
                                 f"devices JAX sees), got {self.mesh}")
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
                         "ta_vaal_steps", "chunk_size", "diagnostics", "feature_memory_gb")


def warmup_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the fields that only matter after the warm-up reset to their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(ExperimentConfig)}
    # With snapshot_every the warm-up keeps only the snapshots K needs (snapshots_to_keep).
    fields = [name for name in SELECTION_ONLY_FIELDS
              if not (name == "num_snapshots" and cfg.snapshot_every is not None)]
    return dataclasses.replace(cfg, **{name: defaults[name] for name in fields})


def config_id(cfg: ExperimentConfig) -> str:
    """Hash of the fields that differ from their defaults: stable when a field is added."""
    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if getattr(cfg, f.name) != f.default}
    blob = json.dumps(changed, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def config_mesh(cfg: ExperimentConfig):
    """The 1-D ``data`` mesh of ``cfg.mesh`` devices, or None (single device)."""
    return None if cfg.mesh is None else pivotal.data_mesh(cfg.mesh)
