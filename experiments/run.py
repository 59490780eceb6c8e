"""Command line: ``python -m experiments.run [--preset NAME] [--methods ...] [--seeds N] ...``.

Results are appended to ``OUT/results.jsonl`` (one row per method and seed) and summarised
in ``OUT/table.md``. Rerunning the same command with the same ``--out`` resumes: finished
rows are skipped and interrupted training continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import jax

from experiments import checkpoint, distributed, lock, plots, report, results
from experiments.config import METHODS, NOISES
from experiments.datasets import DatasetNotFoundError, dataset_names
from experiments.models import MODELS
from experiments.pipeline import Diverged, Problem, build_model, make_problem, run
from experiments.presets import PRESETS, get_preset, sweep_configs, with_overrides


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help="a named setting (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--dataset", help="dataset name: " + ", ".join(dataset_names()))
    p.add_argument("--data-dir", help="where downloaded datasets live (tfds data_dir, ...)")
    p.add_argument("--train-size", type=int, help="train on a seeded stratified subsample of "
                                                  "this many examples of the training split")
    p.add_argument("--noise", help="label noise: " + ", ".join(NOISES))
    p.add_argument("--noise-file", help="with --noise file: a CIFAR-N style label file "
                                        "(.npy, or .npz / .pt with --noise-key)")
    p.add_argument("--noise-key", help="with --noise file: the key of the labels in the file")
    p.add_argument("--rate", type=float, help="noise rate in [0, 1)")
    p.add_argument("--imbalance", type=float, help="long-tailed imbalance factor (>= 1)")
    p.add_argument("--model", help="model: " + ", ".join(MODELS))
    p.add_argument("--methods", help="comma-separated methods: " + ",".join(METHODS))
    p.add_argument("--seeds", type=int, help="number of seeds (0, 1, ..., N-1)")
    p.add_argument("--budget", type=int, help="cleaned examples in all (warm-up included)")
    p.add_argument("--warmup", type=int, help="random cleaned examples of the warm-up")
    p.add_argument("--epochs", type=int, help="epochs of each training run")
    p.add_argument("--rounds", type=int, help="selection rounds after the warm-up")
    p.add_argument("--lr", type=float, help="learning rate of the model's SGD")
    p.add_argument("--weight-lr", type=float, help="learning rate of the per-example weights")
    p.add_argument("--mesh", help="shard the example axis over devices, e.g. data=4")
    p.add_argument("--feature-memory-gb", type=float,
                   help="memory for the (N, D) float32 selection features (default 4): exact "
                        "when they fit, else sketched, else on disk")
    p.add_argument("--meta-gradient", help="weight gradient of the meta step: exact (default, "
                                           "Eq. 3) or first_order (last layer, at theta)")
    p.add_argument("--out", default="results", help="output directory (default: results)")
    distributed.add_arguments(p)
    return p.parse_args(argv)


def list_presets() -> str:
    lines = []
    for name, preset in PRESETS.items():
        time = "accelerator" if preset.minutes is None else f"~{preset.minutes:g} min"
        lines.append(f"{name:21s} {time:>11s}  {preset.description}")
    return "\n".join(lines)


# Integer flags and the smallest value each takes.
_INT_FLAGS = {"seeds": 1, "budget": 1, "warmup": 0, "epochs": 1, "rounds": 1}
# The flag that sets each config field: ExperimentConfig.validate names these in its errors.
FIELD_FLAGS = {"dataset": "--dataset", "data_dir": "--data-dir", "noise": "--noise",
               "noise_file": "--noise-file", "noise_file_key": "--noise-key", "rate": "--rate",
               "imbalance": "--imbalance", "model": "--model", "budget": "--budget",
               "warmup": "--warmup", "rounds": "--rounds", "lr": "--lr",
               "weight_lr": "--weight-lr", "epochs": "--epochs", "warmup_epochs": "--epochs",
               "finetune_epochs": "--epochs", "mesh": "--mesh", "train_size": "--train-size",
               "feature_memory_gb": "--feature-memory-gb", "meta_gradient": "--meta-gradient"}


def _check_flags(args: argparse.Namespace) -> None:
    """The flags that are no config field or whose advice names other flags; the config's
    own checks are :meth:`ExperimentConfig.validate`'s, called with ``FIELD_FLAGS``."""
    for name, low in _INT_FLAGS.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name} must be an integer >= {low}, got {value}")
    if args.noise == "none" and args.rate not in (None, 0.0):
        raise ValueError(f"--rate {args.rate:g} needs a noise model: --noise none changes no "
                         f"label (use --noise uniform or adversarial)")
    if (args.noise_file or args.noise_key) and args.noise not in ("file", None):
        raise ValueError(f"--noise-file and --noise-key go with --noise file, got --noise "
                         f"{args.noise}")

def _methods(text: Optional[str], default: tuple) -> tuple:
    if text is None:
        return default
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods must name some of {list(METHODS)}, got {unknown or methods}")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise ValueError(f"--methods names {', '.join(repeated)} more than once; each method "
                         f"runs once per seed")
    return methods


def resolve(args: argparse.Namespace):
    """Config, methods and seeds from the preset and the explicit flags; validated."""
    preset = get_preset(args.preset)
    _check_flags(args)
    epochs = args.epochs
    mesh = None
    if args.mesh is not None:
        name, _, size = args.mesh.partition("=")
        if name != "data" or not size.isdigit():
            raise ValueError(f"--mesh must look like data=N, got {args.mesh!r}")
        mesh = int(size)
    rate = 0.0 if args.noise == "none" and args.rate is None else args.rate
    cfg = with_overrides(preset.config, dataset=args.dataset, data_dir=args.data_dir,
                         train_size=args.train_size,
                         noise=args.noise, rate=rate, imbalance=args.imbalance,
                         noise_file=args.noise_file, noise_file_key=args.noise_key,
                         model=args.model, budget=args.budget, warmup=args.warmup,
                         rounds=args.rounds, lr=args.lr, weight_lr=args.weight_lr,
                         epochs=epochs, mesh=mesh, warmup_epochs=epochs, finetune_epochs=epochs,
                         feature_memory_gb=args.feature_memory_gb,
                         meta_gradient=args.meta_gradient)
    if cfg.dataset not in dataset_names():
        raise ValueError(f"--dataset must be one of {list(dataset_names())}, got {cfg.dataset!r}")
    if cfg.model not in MODELS:
        raise ValueError(f"--model must be one of {sorted(MODELS)}, got {cfg.model!r}")
    cfg.validate(FIELD_FLAGS)
    if preset.sweep is not None and getattr(args, preset.sweep[0], None) is not None:
        raise ValueError(f"--{preset.sweep[0].replace('_', '-')} conflicts with preset "
                         f"{args.preset!r}, which sweeps {preset.sweep[0]} over "
                         f"{list(preset.sweep[1])}")
    methods = _methods(args.methods, preset.methods)
    cfg.validate_methods(methods)
    seeds = preset.seeds if args.seeds is None else args.seeds
    return cfg, methods, seeds


def preflight(configs: list, out: str) -> Problem:
    """What can be checked before training: the data loads, the model fits it, the budget is
    smaller than the training set, ``OUT/results.jsonl`` is readable. ``ValueError`` if not.

    Returns the first config's seed-0 problem, the one the run starts with (loaded once).
    """
    results.load_rows(results.results_path(out))
    first = None
    for _, cfg in configs:
        try:
            problem = make_problem(cfg, 0)
        except DatasetNotFoundError as err:
            raise ValueError(f"--dataset {cfg.dataset}: {err}") from None
        except (OSError, KeyError) as err:  # e.g. an unreadable --noise-file
            raise ValueError(f"--dataset {cfg.dataset} / --noise {cfg.noise}: {err}") from None
        try:
            build_model(cfg, problem)
        except ValueError as err:
            raise ValueError(f"--model {cfg.model} does not fit --dataset {cfg.dataset} "
                             f"(examples of shape {tuple(problem.input_shape)}): {err}") from None
        if cfg.budget >= len(problem.y_noisy):
            raise ValueError(f"--budget {cfg.budget} must be smaller than the training set "
                             f"({len(problem.y_noisy)} examples of {cfg.dataset})")
        first = problem if first is None else first
    return first


def run_all(configs: list, methods: Sequence[str], seeds: int, out: str, *,
            sweep=None, plot: Optional[str] = None, problem0: Optional[Problem] = None) -> dict:
    """Every config of a preset, then ``OUT/table.md`` and the figures; ``{label: rows}``.

    ``problem0``: the first config's seed-0 problem when already loaded (:func:`preflight`).
    """
    rows_by_label, outcomes = {}, {}
    for i, (label, cfg) in enumerate(configs):
        if label:
            print(f"== {label}", flush=True)
        outcomes[label] = {}
        loaded = {0: problem0} if i == 0 and problem0 is not None else None
        rows_by_label[label] = run(cfg, methods, seeds, out, outcomes=outcomes[label],
                                   problems=loaded)
    table = report.tables(configs, rows_by_label, methods, sweep)
    print(table)
    if jax.process_index() != 0:
        return rows_by_label
    checkpoint.write_text_atomic(os.path.join(out, "table.md"), table)
    plots.write_plots(configs, methods, out, rows_by_label, plot, outcomes, sweep)
    return rows_by_label


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:  # before any other JAX call
        distributed.initialize_from_args(args)
    except ValueError as err:
        return _error(err, 2)
    if args.list_presets:
        print(list_presets())
        return 0
    try:
        cfg, methods, seeds = resolve(args)
        configs = sweep_configs(cfg, get_preset(args.preset).sweep)
        results.check_out(args.out)
        with lock.FolderLock(args.out, flag="--out", group=distributed.run_group(args)):
            problem0 = preflight(configs, args.out)
            preset = get_preset(args.preset)
            run_all(configs, methods, seeds, args.out, sweep=preset.sweep, plot=preset.plot,
                    problem0=problem0)
    except ValueError as err:
        return _error(err, 2)
    except Diverged as err:
        return _error(err, 1)
    return 0


def _error(err: Exception, code: int) -> int:
    """One line on stderr, however many lines the message had; returns ``code``."""
    print("error: " + " ".join(str(err).split()), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
