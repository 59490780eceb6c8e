"""Named experiment settings: a config, the methods, the seeds, and the expected run time.

A preset may sweep one field over values (:func:`sweep_configs`: one config per value).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

from experiments.config import METHODS, ExperimentConfig


class Preset(NamedTuple):
    description: str
    minutes: Optional[float]  # expected wall time on 2 CPU cores (None: needs an accelerator)
    config: ExperimentConfig
    methods: tuple = METHODS
    seeds: int = 1
    plot: Optional[str] = None  # an extra figure: "fig1", "fig3", "table6" or "fig4"
    sweep: Optional[tuple] = None  # (field, values): one config per value, e.g. ("rate", ...)


PRESETS = {
    "default": Preset(
        "the main job: MNIST-5k, 60% adversarial noise (c -> c+1), LeNet-5, budget 20 "
        "(10 warm-up + 10 selected), all ten methods of the paper's Table 1, one seed",
        6.0,  # measured 5 min 9 s (README)
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


MAIN = PRESETS["default"].config  # MNIST-5k, LeNet-5, 60 % adversarial, budget 20 = 10 + 10
# Label noise at 80 % (the paper's Tables 3 and 8).
NOISE80 = dataclasses.replace(MAIN, rate=0.8)
# Long-tailed MNIST-5k: class c keeps 400 * 200^(-c/9) of its 400 training examples (class 9
# keeps 2, about 900 in all); MNIST-5k is the one embedded set with ten classes and enough
# examples per class for a factor of 200 to bite. Clean labels, so label-aware features.
# Batch 64 keeps ~14 steps per epoch on the ~900 examples (batch 256: 3); chosen on the
# warm-up's validation accuracy of seed 0 (0.73 with 64 against 0.65 with 256).
IMBALANCED = dataclasses.replace(MAIN, noise="none", rate=0.0, imbalance=200.0, batch_size=64)
# The sweeps below train 10 epochs (warm-up and final) instead of 20 to fit 30 minutes.
SHORT = dict(warmup_epochs=10, epochs=10, finetune_epochs=10)

# Stated minutes are measured wall times of the whole preset on 2 CPU cores: alone where
# docs/RESULTS.md says so, else with another preset running beside it (an upper bound).
PRESETS.update({
    "table1": Preset(
        "paper Table 1 (MNIST column): MNIST-5k, 60% adversarial noise, all ten methods, "
        "5 seeds (the default job over 5 seeds)", 25.0, MAIN, seeds=5),
    "table1-uniform": Preset(
        "paper Table 1 with uniform noise: MNIST-5k, 60% uniform noise, all ten methods, "
        "5 seeds", 25.0, dataclasses.replace(MAIN, noise="uniform"), seeds=5),
    "table2": Preset(
        "paper Table 2: long-tailed MNIST-5k (imbalance 200, clean labels, label-aware "
        "features), all ten methods, 5 seeds", 16.0, IMBALANCED, seeds=5),
    # lr 0.03: at 0.1 the meta re-weighting warm-up collapses to one class in several seeds
    # under noise + imbalance (best validation accuracy of the warm-ups, mean of seeds 0-4, at
    # imbalance 200 / 100: 0.256 / 0.312 at lr 0.1, 0.461 / 0.477 at 0.03, 0.391 / 0.384 at
    # 0.01; `python3 -m experiments.inspect_collapse --preset table9 --out ...`).
    "table9": Preset(
        "paper Table 9: long-tailed MNIST-5k (imbalance 200 and 100) + 40% uniform noise, "
        "lr 0.03, the paper's eight methods, 5 seeds", 18.0,
        dataclasses.replace(IMBALANCED, noise="uniform", rate=0.4, lr=0.03),
        methods=("base", "random", "uncertain", "certain", "finetune", "ta-vaal", "rbc", "gbc"),
        seeds=5, sweep=("imbalance", (200.0, 100.0))),
    "fig3": Preset(
        "paper Figure 3: MNIST-5k, adversarial noise at 20/40/60/80%, base / random / RBC / "
        "GBC, 10 epochs, 5 seeds; writes fig3.png", 27.0,
        dataclasses.replace(MAIN, **SHORT), methods=("base", "random", "rbc", "gbc"),
        seeds=5, sweep=("rate", (0.2, 0.4, 0.6, 0.8)), plot="fig3"),
    "table3": Preset(
        "paper Table 3: AUC of the learned weights (all / the 20% of the pool nearest the "
        "decision boundary), MNIST-5k 80% adversarial, random / RBC / GBC, 5 seeds", 17.0,
        NOISE80, methods=("random", "rbc", "gbc"), seeds=5),
    "table4-5": Preset(
        "paper Tables 4-5: Theorem 1's D_j statistics and Theorem 2's stable-example counts "
        "for RBC, MNIST-5k 60% uniform and adversarial noise, 5 seeds", 17.0,
        dataclasses.replace(MAIN, diagnostics=True), methods=("rbc",), seeds=5,
        sweep=("noise", ("uniform", "adversarial"))),
    "table6": Preset(
        "paper Table 6: 10 warm-up + 4 rounds of 10 selected meta examples (budget 50), "
        "MNIST-5k 60% adversarial, random / certain / RBC / GBC, 10 epochs, 5 seeds; writes "
        "rounds.png", 25.0,
        dataclasses.replace(MAIN, budget=50, rounds=4, **SHORT),
        methods=("random", "certain", "rbc", "gbc"), seeds=5, plot="table6"),
    "table8": Preset(
        "paper Table 8: RBC with K = 1, 2, 4, 8 snapshots, MNIST-5k 80% adversarial, a "
        "30-epoch warm-up (so that K epochs follow t*), 5 seeds", 15.0,
        dataclasses.replace(NOISE80, warmup_epochs=30), methods=("rbc",), seeds=5,
        sweep=("num_snapshots", (1, 2, 4, 8))),
    "table10": Preset(
        "paper Table 10: with (10 random + 10 selected) and without (20 selected from a "
        "plain noisy-label model) the warm-up, MNIST-5k 60% adversarial, certain / uncertain "
        "/ RBC / GBC, 10 epochs, 5 seeds", 26.0, dataclasses.replace(MAIN, **SHORT),
        methods=("certain", "uncertain", "rbc", "gbc"), seeds=5, sweep=("warmup", (10, 0))),
    "fig4": Preset(
        "paper Figure 4: t-SNE of RBC features with the weighted K-means centroids, "
        "long-tailed MNIST-5k (Table 2's setting), seed 0; writes fig4.png", 2.0,
        IMBALANCED, methods=("rbc",), seeds=1, plot="fig4"),
})

# The paper's own settings (Appendix D), for users with the data (tfds) and an accelerator.
# MNIST: LeNet-5, plain SGD at a constant 0.1, batch 4096 (the paper gives no epoch count:
# 100 here). CIFAR: ResNet-34, SGD lr 0.1, momentum 0.8, weight decay 5e-4, batch 128, lr / 10
# at epochs 80 and 90, 100 epochs, crop + flip augmentation. Snapshots every 20 epochs, K = 5,
# 5 GBC layers, 200 K-means iterations.
MNIST_FULL = ExperimentConfig(dataset="mnist", model="lenet5", lr=0.1, momentum=0.0,
                              batch_size=4096, warmup_epochs=100, epochs=100,
                              finetune_epochs=100, snapshot_every=20, budget=20, warmup=10)
CIFAR_FULL = ExperimentConfig(dataset="cifar10", model="resnet34", lr=0.1, momentum=0.8,
                              weight_decay=5e-4, batch_size=128, lr_milestones=(80, 90),
                              warmup_epochs=100, epochs=100, finetune_epochs=100,
                              augment=True, snapshot_every=20, budget=50, warmup=10,
                              chunk_size=256)
CIFAR100_FULL = dataclasses.replace(CIFAR_FULL, dataset="cifar100", budget=200, warmup=50)
NOISES = ("noise", ("uniform", "adversarial"))

PRESETS.update({
    "table1-full": Preset(
        "paper Table 1, MNIST column: full MNIST (tfds), 60% adversarial, LeNet-5 at the "
        "paper's settings, all methods (needs the data and an accelerator)", None,
        dataclasses.replace(MNIST_FULL, noise="adversarial", rate=0.6)),
    "table1-cifar10-full": Preset(
        "paper Table 1, CIFAR-10: 60% uniform and adversarial, ResNet-34 at the paper's "
        "settings, budget 50 (10 warm-up), all methods (needs the data and an accelerator)",
        None, dataclasses.replace(CIFAR_FULL, rate=0.6), sweep=NOISES),
    "table1-cifar100-full": Preset(
        "paper Table 1, CIFAR-100: 60% uniform and adversarial, ResNet-34, budget 200 (50 "
        "warm-up), all methods (needs the data and an accelerator)", None,
        dataclasses.replace(CIFAR100_FULL, rate=0.6), sweep=NOISES),
    "table2-cifar10-full": Preset(
        "paper Table 2, CIFAR-10 long-tailed (imbalance 200), ResNet-34, budget 50, all "
        "methods (needs the data and an accelerator)", None,
        dataclasses.replace(CIFAR_FULL, noise="none", rate=0.0, imbalance=200.0)),
    "table2-cifar100-full": Preset(
        "paper Table 2, CIFAR-100 long-tailed (imbalance 200), ResNet-34, budget 200, all "
        "methods (needs the data and an accelerator)", None,
        dataclasses.replace(CIFAR100_FULL, noise="none", rate=0.0, imbalance=200.0)),
})

# Full-size data on 2 CPU cores: Fashion-MNIST's 60,000 training images from the IDX files of
# Debian's dataset-fashion-mnist (or --data-dir), the main job's setting and hyper-parameters
# otherwise (LeNet-5, SGD lr 0.1, momentum 0.9, batch 256, 20 + 20 epochs, 60 % adversarial
# noise as in the paper's Table 1 MNIST column, budget 20 = 10 + 10). A 3 GB feature budget:
# at the default 4 GB GBC's sketch (1,024 columns per leaf, 3.0 GB at 60,000 rows) plus the
# candidates' rows Algorithm 2 clusters (half of them, 1.5 GB) peaked at 6.2 GB, over the
# 6 GB this preset is meant to fit; 3 GB gives the next sketch (512 per leaf, 1.7 GB).
# The first-order meta gradient: with the exact one (FASHION_EXACT) a meta run costs about two
# plain runs (the exact step is ~1.8-2.4 plain steps, README "Benchmarks"); the first-order step
# costs about one plain step, and on table1 (5 seeds, docs/RESULTS.md) it lost nothing
# measurable. A 2.5 GB feature budget: GBC's sketch plus the candidates' rows Algorithm 2
# clusters and what the earlier methods leave resident must stay under 6 GB (at 3 GB a one-
# snapshot warm-up took 4,096 columns per leaf and the preset peaked at 6.06 GB); measured on
# 81933f4 with five snapshots: 512 columns per leaf, 6,352 columns, peak 4.36 GB.
FASHION_EXACT = dataclasses.replace(MAIN, dataset="fashion_mnist", feature_memory_gb=3.0)
FASHION = dataclasses.replace(FASHION_EXACT, meta_gradient="first_order", feature_memory_gb=2.5)
# The paper's MNIST setting (MNIST_FULL: batch 4096, constant lr 0.1, no momentum, 100 epochs,
# snapshots every 20) on the four MNIST IDX files in --data-dir.
MNIST_IDX_FULL = dataclasses.replace(MNIST_FULL, noise="adversarial", rate=0.6)

PRESETS.update({
    # Measured: docs/RESULTS.md, "Full-size data" (alone on the 2 cores, resident memory of the
    # process tree sampled every 2 s).
    "fashion": Preset(
        "full Fashion-MNIST (60,000 training images, IDX files: apt-get install "
        "dataset-fashion-mnist or --data-dir), 60% adversarial noise, LeNet-5, budget 20 "
        "(10 warm-up + 10 selected), all ten methods, one seed, first-order meta gradient "
        "(measured: 17-28 min on two 2-core hosts, 4.4 GB peak memory)",
        30.0, FASHION),
    "fashion-exact": Preset(
        "the fashion preset with the exact meta gradient (paper Eq. 3; measured before "
        "LeNet-5's convolutions became matrix products: 84 min, 4.6 GB peak memory)", 85.0,
        FASHION_EXACT),
    "fashion-table1": Preset(
        "the fashion preset over 3 seeds (paper Table 1's setting on Fashion-MNIST; "
        "3 x fashion)", 90.0, FASHION, seeds=3),
    "mnist-idx-full": Preset(
        "paper Table 1, MNIST column, at the paper's settings (table1-full: batch 4096, "
        "100 epochs) on full MNIST from the four IDX files in --data-dir (needs the files "
        "and an accelerator)", None, MNIST_IDX_FULL),
})


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def with_overrides(config: ExperimentConfig, **overrides) -> ExperimentConfig:
    """The preset's config with the command line's explicit values on top."""
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def sweep_configs(cfg: ExperimentConfig, sweep) -> list[tuple[str, ExperimentConfig]]:
    """``[(label, config)]``: one per value of the preset's swept field (or just ``cfg``)."""
    if sweep is None:
        return [("", cfg)]
    name, values = sweep
    configs = [(f"{name}={v}", dataclasses.replace(cfg, **{name: v})) for v in values]
    for _, c in configs:
        c.validate()
    return configs
