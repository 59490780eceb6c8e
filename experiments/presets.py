"""Named experiment settings: a config, the methods, the seeds, and the expected run time."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

from experiments.pipeline import METHODS, ExperimentConfig


class Preset(NamedTuple):
    description: str
    minutes: float  # expected wall time on 2 CPU cores, measured (see docs/RESULTS.md)
    config: ExperimentConfig
    methods: tuple = METHODS
    seeds: int = 1
    plot: Optional[str] = None  # an extra figure written after the table, e.g. "fig1"


PRESETS = {
    "default": Preset(
        "the main job: MNIST-5k, 60% adversarial noise (c -> c+1), LeNet-5, budget 20 "
        "(10 warm-up + 10 selected), all ten methods of the paper's Table 1, one seed",
        5.0,  # measured 4 min 40 s (README)
        ExperimentConfig(),
    ),
    "smoke": Preset(
        "every method end to end on the sklearn digits with an MLP, a few epochs (a test)",
        1.0,  # measured 39 s inside the test run
        ExperimentConfig(dataset="digits", model="mlp", warmup_epochs=3, epochs=3,
                         finetune_epochs=3, batch_size=128, budget=14, warmup=10,
                         num_snapshots=2, kmeans_iters=20, weight_lr=300.0, ta_vaal_steps=50),
    ),
    # The paper's Figure 1: the 2-D toy set (600 train / 160 val / 240 test, 1 % base noise),
    # 60 % uniform noise on the training labels (two classes: uniform = flip), the default MLP
    # with two hidden layers of 100, and 6 cleaned meta examples in all: 2 random ones for the
    # warm-up (the fewest that can cover both classes) + 4 selected by each method. Writes
    # OUT/fig1.png (seed 0's regions and meta examples) next to OUT/methods.png.
    # Measured: 3 min 5 s wall for the 5 seeds on 2 CPU cores (fig1.png included).
    "fig1": Preset(
        "paper Figure 1: 2-D toy (four Gaussians), 60% uniform noise (flips), MLP 100-100, "
        "6 meta examples (2 random warm-up + 4 selected), random / RBC / GBC, 5 seeds; "
        "writes fig1.png",
        4.0,
        ExperimentConfig(dataset="toy", noise="uniform", rate=0.6, model="mlp", budget=6,
                         warmup=2, warmup_epochs=30, epochs=30, batch_size=100, lr=0.1,
                         weight_lr=300.0, num_snapshots=5, kmeans_iters=200),
        methods=("random", "rbc", "gbc"),
        seeds=5,
        plot="fig1",
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def with_overrides(config: ExperimentConfig, **overrides) -> ExperimentConfig:
    """The preset's config with the command line's explicit values on top."""
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
