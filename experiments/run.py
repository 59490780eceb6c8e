"""Command line: ``python -m experiments.run [--preset NAME] [--methods ...] [--seeds N] ...``.

Results are appended to ``OUT/results.jsonl`` (one row per method and seed) and summarised
in ``OUT/table.md``. Rerunning the same command with the same ``--out`` resumes: finished
rows are skipped and interrupted training continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from experiments import checkpoint
from experiments.datasets import dataset_names
from experiments.models import MODELS
from experiments.pipeline import METHODS, NOISES, ExperimentConfig
from experiments.presets import PRESETS, get_preset, with_overrides


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help="a named setting (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--dataset", help="dataset name: " + ", ".join(dataset_names()))
    p.add_argument("--data-dir", help="where downloaded datasets live (tfds data_dir, ...)")
    p.add_argument("--noise", help="label noise: " + ", ".join(NOISES))
    p.add_argument("--rate", type=float, help="noise rate in [0, 1)")
    p.add_argument("--imbalance", type=float, help="long-tailed imbalance factor (>= 1)")
    p.add_argument("--model", help="model: " + ", ".join(MODELS))
    p.add_argument("--methods", help="comma-separated methods: " + ",".join(METHODS))
    p.add_argument("--seeds", type=int, help="number of seeds (0, 1, ..., N-1)")
    p.add_argument("--budget", type=int, help="cleaned examples in all (warm-up included)")
    p.add_argument("--warmup", type=int, help="random cleaned examples of the warm-up")
    p.add_argument("--epochs", type=int, help="epochs of each training run")
    p.add_argument("--rounds", type=int, help="selection rounds after the warm-up")
    p.add_argument("--mesh", help="shard the example axis over devices, e.g. data=4")
    p.add_argument("--out", default="results", help="output directory (default: results)")
    return p.parse_args(argv)


def list_presets() -> str:
    lines = []
    for name, preset in PRESETS.items():
        lines.append(f"{name:12s} ~{preset.minutes:g} min  {preset.description}")
    return "\n".join(lines)


def resolve(args: argparse.Namespace):
    """Config, methods and seeds from the preset and the explicit flags; validated."""
    preset = get_preset(args.preset)
    epochs = args.epochs
    mesh = None
    if args.mesh is not None:
        name, _, size = args.mesh.partition("=")
        if name != "data" or not size.isdigit():
            raise ValueError(f"--mesh must look like data=N, got {args.mesh!r}")
        mesh = int(size)
    cfg = with_overrides(preset.config, dataset=args.dataset, data_dir=args.data_dir,
                         noise=args.noise, rate=args.rate, imbalance=args.imbalance,
                         model=args.model, budget=args.budget, warmup=args.warmup,
                         rounds=args.rounds, epochs=epochs, mesh=mesh,
                         warmup_epochs=epochs, finetune_epochs=epochs)
    if cfg.dataset not in dataset_names():
        raise ValueError(f"--dataset must be one of {list(dataset_names())}, got {cfg.dataset!r}")
    if cfg.model not in MODELS:
        raise ValueError(f"--model must be one of {sorted(MODELS)}, got {cfg.model!r}")
    cfg.validate()
    methods = preset.methods if args.methods is None else tuple(
        m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods must name some of {list(METHODS)}, got {unknown or methods}")
    seeds = preset.seeds if args.seeds is None else args.seeds
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    return cfg, methods, seeds


def config_id(cfg: ExperimentConfig) -> str:
    """Hash of the fields that differ from their defaults: stable when a field is added."""
    changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if getattr(cfg, f.name) != f.default}
    blob = json.dumps(changed, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def check_out(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--out {out!r} is not a writable directory: {err}") from None


def summarise(rows: list[dict], methods: Sequence[str]) -> str:
    """Markdown table: mean +- std per method of test accuracy and weight AUC."""
    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        values = np.asarray(values, float) * 100
        return f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    lines = ["| method | seeds | test accuracy (%) | weight AUC (x100) | selection s | train s |",
             "|---|---|---|---|---|---|"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        lines.append(
            f"| {m} | {len(mine)} | {stat([r['test_accuracy'] for r in mine])} | "
            f"{stat([r['weight_auc'] for r in mine])} | "
            f"{np.mean([r['selection_seconds'] for r in mine]):.1f} | "
            f"{np.mean([r['train_seconds'] for r in mine]):.1f} |")
    return "\n".join(lines) + "\n"


def run(cfg: ExperimentConfig, methods: Sequence[str], seeds: int, out: str,
        plot: Optional[str] = None) -> list[dict]:
    """Run (or resume) every method for seeds ``0..seeds-1``; returns this config's rows.

    After the table: ``OUT/methods.png`` (accuracy per method) and, with ``plot="fig1"``,
    ``OUT/fig1.png`` (seed 0's decision regions, see :mod:`experiments.plots`).
    """
    from experiments import pipeline  # jax-heavy import only when running

    check_out(out)
    cid = config_id(cfg)
    results = os.path.join(out, "results.jsonl")
    done = {(r["method"], r["seed"]) for r in checkpoint.read_jsonl(results)
            if r.get("config_id") == cid}
    outcomes: dict = {}  # seed 0's final TrainOutcome per method, for plot="fig1"
    for seed in range(seeds):
        todo = [m for m in methods if (m, seed) not in done]
        if not todo:
            continue
        problem = pipeline.make_problem(cfg, seed)
        if cfg.budget >= len(problem.y_noisy):
            raise ValueError(f"--budget {cfg.budget} must be smaller than the training set "
                             f"({len(problem.y_noisy)} examples)")
        model = pipeline.build_model(cfg, problem)
        work = os.path.join(out, "work", cid, f"seed{seed}")
        warm = None
        for method in todo:
            if method != "base" and warm is None:
                warm = pipeline.warmup_run(problem, model, cfg, seed, work)
            t0 = time.perf_counter()
            row, outcome = pipeline.run_method(method, problem, model, cfg, seed, work, warm,
                                               return_outcome=True)
            if seed == 0:
                outcomes[method] = outcome
            row.update(seed=seed, dataset=cfg.dataset, noise=cfg.noise, rate=cfg.rate,
                       imbalance=cfg.imbalance, model=cfg.model, budget=cfg.budget,
                       warmup=cfg.warmup, realised_noise_rate=problem.noise_rate,
                       config_id=cid, config=dataclasses.asdict(cfg),
                       wall_seconds=time.perf_counter() - t0)
            checkpoint.append_jsonl(results, row)
            print(f"seed {seed} {method:10s} test acc {100 * row['test_accuracy']:.2f}%  "
                  f"weight AUC {row['weight_auc'] if row['weight_auc'] is None else round(row['weight_auc'], 3)}",
                  flush=True)
    rows = [r for r in checkpoint.read_jsonl(results) if r.get("config_id") == cid]
    table = summarise(rows, methods)
    checkpoint.write_text_atomic(os.path.join(out, "table.md"), table)
    print(table)
    write_plots(cfg, methods, out, rows, plot, outcomes)
    return rows


def write_plots(cfg: ExperimentConfig, methods: Sequence[str], out: str, rows: list[dict],
                plot: Optional[str], outcomes: dict) -> None:
    """``OUT/methods.png`` always; ``OUT/fig1.png`` when ``plot == "fig1"``."""
    from experiments import pipeline, plots

    plots.plot_method_bars(rows, os.path.join(out, "methods.png"),
                           title=f"{cfg.dataset}, {cfg.noise} {cfg.rate:g}, budget {cfg.budget}")
    print(f"wrote {os.path.join(out, 'methods.png')}")
    if plot is None:
        return
    if plot != "fig1":
        raise ValueError(f"unknown plot {plot!r}")
    problem = pipeline.make_problem(cfg, 0)
    if tuple(problem.input_shape) != (2,) or problem.num_classes != 2:
        print(f"fig1.png skipped: {cfg.dataset} is not a 2-D two-class set", file=sys.stderr)
        return
    model = pipeline.build_model(cfg, problem)
    work = os.path.join(out, "work", config_id(cfg), "seed0")
    drawn = [m for m in plots.FIG1_METHODS if m in methods]
    results = []
    for method in drawn:
        row = next(r for r in rows if r["method"] == method and r["seed"] == 0)
        if method not in outcomes:  # a resumed run: reload from the checkpoints in work/
            warm = pipeline.warmup_run(problem, model, cfg, 0, work)
            _, outcomes[method] = pipeline.run_method(method, problem, model, cfg, 0, work,
                                                      warm, return_outcome=True)
        results.append((row, outcomes[method]))
    clean = plots.train_clean_classifier(problem, cfg, seed=0)
    path = plots.plot_fig1(problem, results, os.path.join(out, "fig1.png"), methods=drawn,
                           predict=model.predict, clean=clean,
                           title=f"toy, {cfg.noise} noise {cfg.rate:g}, {cfg.budget} meta "
                                 f"examples ({cfg.warmup} random + {cfg.budget - cfg.warmup} "
                                 f"selected), seed 0; clean-data classifier test acc "
                                 f"{100 * clean.test_accuracy:.1f}%")
    print(f"wrote {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.list_presets:
        print(list_presets())
        return 0
    try:
        cfg, methods, seeds = resolve(args)
        check_out(args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run(cfg, methods, seeds, args.out, plot=get_preset(args.preset).plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
