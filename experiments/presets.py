"""Named experiment settings: a config, the methods, the seeds, and the expected run time."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from experiments.pipeline import METHODS, ExperimentConfig


class Preset(NamedTuple):
    description: str
    minutes: float  # expected wall time on 2 CPU cores, measured (see docs/RESULTS.md)
    config: ExperimentConfig
    methods: tuple = METHODS
    seeds: int = 1


PRESETS = {
    "default": Preset(
        "the main job: MNIST-5k, 60% adversarial noise (c -> c+1), LeNet-5, budget 20 "
        "(10 warm-up + 10 selected), all nine methods, one seed",
        10.0,
        ExperimentConfig(),
    ),
    "smoke": Preset(
        "every method end to end on the sklearn digits with an MLP, a few epochs (a test)",
        1.5,
        ExperimentConfig(dataset="digits", model="mlp", warmup_epochs=3, epochs=3,
                         finetune_epochs=3, batch_size=128, budget=14, warmup=10,
                         num_snapshots=2, kmeans_iters=20, weight_lr=300.0, ta_vaal_steps=50),
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def with_overrides(config: ExperimentConfig, **overrides) -> ExperimentConfig:
    """The preset's config with the command line's explicit values on top."""
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
