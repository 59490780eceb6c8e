"""Command line: ``python -m experiments.run [--preset NAME] [--methods ...] [--seeds N] ...``.

Results are appended to ``OUT/results.jsonl`` (one row per method and seed) and summarised
in ``OUT/table.md``. Rerunning the same command with the same ``--out`` resumes: finished
rows are skipped and interrupted training continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
import warnings
from typing import Optional, Sequence

import numpy as np

from experiments import checkpoint, distributed, lock, results
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
_FINITE_FLAGS = ("rate", "imbalance", "lr", "weight_lr")


def _check_flags(args: argparse.Namespace) -> None:
    """Each explicit flag on its own, named as the user typed it."""
    for name, low in _INT_FLAGS.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name} must be an integer >= {low}, got {value}")
    for name in _FINITE_FLAGS:
        value = getattr(args, name)
        if value is not None and not np.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("lr", "weight_lr"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
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
                         noise=args.noise, rate=rate, imbalance=args.imbalance,
                         noise_file=args.noise_file, noise_file_key=args.noise_key,
                         model=args.model, budget=args.budget, warmup=args.warmup,
                         rounds=args.rounds, lr=args.lr, weight_lr=args.weight_lr,
                         epochs=epochs, mesh=mesh, warmup_epochs=epochs, finetune_epochs=epochs)
    if cfg.dataset not in dataset_names():
        raise ValueError(f"--dataset must be one of {list(dataset_names())}, got {cfg.dataset!r}")
    if cfg.model not in MODELS:
        raise ValueError(f"--model must be one of {sorted(MODELS)}, got {cfg.model!r}")
    cfg.validate()
    if preset.sweep is not None and getattr(args, preset.sweep[0], None) is not None:
        raise ValueError(f"--{preset.sweep[0].replace('_', '-')} conflicts with preset "
                         f"{args.preset!r}, which sweeps {preset.sweep[0]} over "
                         f"{list(preset.sweep[1])}")
    methods = _methods(args.methods, preset.methods)
    cfg.validate_methods(methods)
    seeds = preset.seeds if args.seeds is None else args.seeds
    return cfg, methods, seeds


def preflight(configs: list, out: str) -> None:
    """What can be checked before training: the data loads, the model fits it, the budget is
    smaller than the training set, ``OUT/results.jsonl`` is readable. ``ValueError`` if not."""
    from experiments import pipeline
    from experiments.datasets import DatasetNotFoundError

    results.load_rows(results.results_path(out))
    for _, cfg in configs:
        try:
            problem = pipeline.make_problem(cfg, 0)
        except DatasetNotFoundError as err:
            raise ValueError(f"--dataset {cfg.dataset}: {err}") from None
        except (OSError, KeyError) as err:  # e.g. an unreadable --noise-file
            raise ValueError(f"--dataset {cfg.dataset} / --noise {cfg.noise}: {err}") from None
        try:
            pipeline.build_model(cfg, problem)
        except ValueError as err:
            raise ValueError(f"--model {cfg.model} does not fit --dataset {cfg.dataset} "
                             f"(examples of shape {tuple(problem.input_shape)}): {err}") from None
        if cfg.budget >= len(problem.y_noisy):
            raise ValueError(f"--budget {cfg.budget} must be smaller than the training set "
                             f"({len(problem.y_noisy)} examples of {cfg.dataset})")


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


def _stat(values, scale: float = 100.0) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    values = np.asarray(values, float) * scale
    return f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def summarise(rows: list[dict], methods: Sequence[str]) -> str:
    """Markdown table: mean +- std per method of test accuracy and weight AUC (all examples and
    the ones nearest the decision boundary)."""
    lines = ["| method | seeds | test accuracy (%) | weight AUC (x100) | boundary AUC (x100) | "
             "selection s | train s |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        lines.append(
            f"| {m} | {len(mine)} | {_stat([r['test_accuracy'] for r in mine])} | "
            f"{_stat([r['weight_auc'] for r in mine])} | "
            f"{_stat([r.get('weight_auc_boundary') for r in mine])} | "
            f"{np.mean([r['selection_seconds'] for r in mine]):.1f} | "
            f"{np.mean([r['train_seconds'] for r in mine]):.1f} |")
    return "\n".join(lines) + "\n"


def summarise_rounds(rows: list[dict], methods: Sequence[str]) -> str:
    """Test accuracy (%) per method after each selection round, by meta-set size."""
    counts = sorted({c for r in rows for c in r.get("round_meta_count", [])})
    if len(counts) < 2:
        return ""
    lines = ["| method | " + " | ".join(f"{c} meta" for c in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for m in methods:
        mine = [r for r in rows if r["method"] == m and r.get("round_meta_count")]
        if not mine:
            continue
        cells = [_stat([dict(zip(r["round_meta_count"], r["round_test_accuracy"])).get(c)
                        for r in mine]) for c in counts]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarise_theorems(rows: list[dict]) -> str:
    """Theorem 1's ``D_j`` statistics and Theorem 2's stable counts (rows with diagnostics)."""
    mine = [r for r in rows if r.get("d_min")]
    if not mine:
        return ""

    def first(r, name):  # the first selection round's value
        return r[name][0]

    def cell(name, scale=1.0):
        values = [first(r, name) for r in mine]
        if any(np.isinf(values)):
            finite = [v for v in values if np.isfinite(v)]
            return f"inf in {len(values) - len(finite)} of {len(values)} seeds" + (
                f"; finite: {_stat(finite, scale)}" if finite else "")
        return _stat(values, scale)

    lines = ["| statistic (RBC, first selection; mean ± std over seeds) | label-free features "
             "(what RBC clusters) | label-aware features |", "|---|---|---|",
             f"| seeds | {len(mine)} | |"]
    for title, name, scale in (("minimum D_j (Theorem 1's D)", "min", 1.0),
                               ("5%-quantile of D_j", "q05", 1.0),
                               ("median D_j", "median", 1.0),
                               ("examples with D_j = inf (%)", "inf_fraction", 100.0)):
        lines.append(f"| {title} | {cell('d_' + name, scale)} | "
                     f"{cell('d_aware_' + name, scale)} |")
    lines += [f"| stable examples (Theorem 2) | {cell('stable_count')} | |",
              f"| candidates clustered | {cell('candidate_count')} | |",
              f"| stable fraction (%) | "
              f"{_stat([first(r, 'stable_count') / first(r, 'candidate_count') for r in mine])} | |"]
    return "\n".join(lines) + "\n"


def summarise_sweep(rows_by_label: dict, methods: Sequence[str], field: str) -> str:
    """Test accuracy (%) per method (rows) and sweep value (columns)."""
    labels = list(rows_by_label)
    lines = [f"| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for m in methods:
        cells = [_stat([r["test_accuracy"] for r in rows_by_label[lab] if r["method"] == m])
                 for lab in labels]
        if all(c == "-" for c in cells):
            continue
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return f"Test accuracy (%) by {field}:\n\n" + "\n".join(lines) + "\n"


def run(cfg: ExperimentConfig, methods: Sequence[str], seeds: int, out: str,
        outcomes: Optional[dict] = None) -> list[dict]:
    """Run (or resume) every method for seeds ``0..seeds-1``; returns this config's rows.

    Rows are appended to ``OUT/results.jsonl``; each training run checkpoints under
    ``OUT/work``. The warm-up of a seed lives under a key of the fields that shape it
    (:func:`experiments.pipeline.warmup_config`), so configs that differ only after the
    warm-up (e.g. the number of snapshots K) share it. ``outcomes``: filled with seed 0's final
    :class:`~experiments.pipeline.TrainOutcome` per method (for the figures).
    """
    from experiments import pipeline  # jax-heavy import only when running

    check_out(out)
    cid = config_id(cfg)
    path = results.results_path(out)
    done = {(r["method"], r["seed"]) for r in results.config_rows(out, cid)}
    outcomes = {} if outcomes is None else outcomes
    # Several processes (jax.distributed) share OUT: every one trains (and checkpoints, as
    # Orbax expects), only process 0 writes the rows.
    import jax

    primary = jax.process_index() == 0
    mine: list = []
    said: set = set()
    for seed in range(seeds):
        todo = [m for m in methods if (m, seed) not in done]
        if not todo:
            continue
        problem = pipeline.make_problem(cfg, seed)
        model = pipeline.build_model(cfg, problem)
        work = seed_dir(out, cfg, seed)
        warm = None
        for method in todo:
            t0 = time.perf_counter()
            try:
                with _once(said):
                    if method != "base" and warm is None:
                        warm = pipeline.warmup_run(problem, model, cfg, seed,
                                                   warmup_dir(out, cfg, seed))
                    row, outcome = pipeline.run_method(method, problem, model, cfg, seed, work,
                                                       warm, return_outcome=True)
            except pipeline.TrainingDiverged as err:
                raise Diverged(method, seed, err) from None
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
            print(f"seed {seed} {method:10s} test acc {100 * row['test_accuracy']:.2f}%  "
                  f"weight AUC {row['weight_auc'] if row['weight_auc'] is None else round(row['weight_auc'], 3)}",
                  flush=True)
    if not primary:  # process 0 may not have written its rows yet
        return [r for r in results.config_rows(out, cid) if (r["method"], r["seed"]) in done] \
            + mine
    return results.config_rows(out, cid)


class Diverged(RuntimeError):
    """A training run of ``method`` and ``seed`` reached non-finite values."""

    def __init__(self, method: str, seed: int, err: Exception):
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


def seed_dir(out: str, cfg: ExperimentConfig, seed: int) -> str:
    """The work folder of one config and seed under ``out`` (every method's checkpoints)."""
    return os.path.join(out, "work", config_id(cfg), f"seed{seed}")


def warmup_dir(out: str, cfg: ExperimentConfig, seed: int) -> str:
    from experiments.pipeline import warmup_config

    return os.path.join(out, "work", f"warmup-{config_id(warmup_config(cfg))}", f"seed{seed}")


def sweep_configs(cfg: ExperimentConfig, sweep) -> list[tuple[str, ExperimentConfig]]:
    """``[(label, config)]``: one per value of the preset's swept field (or just ``cfg``)."""
    if sweep is None:
        return [("", cfg)]
    name, values = sweep
    configs = [(f"{name}={v}", dataclasses.replace(cfg, **{name: v})) for v in values]
    for _, c in configs:
        c.validate()
    return configs


def run_all(configs: list, methods: Sequence[str], seeds: int, out: str, *,
            sweep=None, plot: Optional[str] = None) -> dict:
    """Every config of a preset, then ``OUT/table.md`` and the figures; ``{label: rows}``."""
    rows_by_label, outcomes = {}, {}
    for label, cfg in configs:
        if label:
            print(f"== {label}", flush=True)
        outcomes[label] = {}
        rows_by_label[label] = run(cfg, methods, seeds, out, outcomes=outcomes[label])
    parts = []
    for label, cfg in configs:
        rows = rows_by_label[label]
        parts.append((f"### {label}\n\n" if label else "") + summarise(rows, methods))
        for extra in (summarise_rounds(rows, methods), summarise_theorems(rows)):
            if extra:
                parts.append(extra)
    if sweep is not None:
        parts.append(summarise_sweep(rows_by_label, methods, sweep[0]))
    table = "\n".join(parts)
    print(table)
    import jax

    if jax.process_index() != 0:
        return rows_by_label
    checkpoint.write_text_atomic(os.path.join(out, "table.md"), table)
    write_plots(configs, methods, out, rows_by_label, plot, outcomes, sweep)
    return rows_by_label


def write_plots(configs: list, methods: Sequence[str], out: str, rows_by_label: dict,
                plot: Optional[str], outcomes: dict, sweep=None) -> None:
    """``OUT/methods.png`` (``methods-LABEL.png`` per swept value) and the preset's figure:
    ``fig1.png``, ``fig3.png`` (accuracy vs the swept noise rate), ``rounds.png`` (accuracy
    per round) or ``fig4.png`` (t-SNE of seed 0's RBC features and centroids)."""
    from experiments import plots

    for label, cfg in configs:
        name = f"methods-{label}.png" if label else "methods.png"
        plots.plot_method_bars(rows_by_label[label], os.path.join(out, name),
                               title=f"{cfg.dataset}, {cfg.noise} {cfg.rate:g}, budget "
                                     f"{cfg.budget}" + (f", {label}" if label else ""))
        print(f"wrote {os.path.join(out, name)}")
    if plot is None:
        return
    label, cfg = configs[0]
    if plot == "fig1":
        path = plot_fig1(cfg, methods, out, rows_by_label[label], outcomes[label])
    elif plot == "fig3":
        rows = [r for lab in rows_by_label for r in rows_by_label[lab]]
        path = plots.plot_noise_curve(rows, os.path.join(out, "fig3.png"), x=sweep[0],
                                      title=f"{cfg.dataset}, {cfg.noise} noise, budget "
                                            f"{cfg.budget}")
    elif plot == "table6":
        rows = [r for r in rows_by_label[label] if r.get("round_meta_count")]
        path = plots.plot_rounds(rows, os.path.join(out, "rounds.png"),
                                 title=f"{cfg.dataset}, {cfg.noise} {cfg.rate:g}: "
                                       f"{cfg.warmup} warm-up + {cfg.rounds} rounds")
    elif plot == "fig4":
        path = plot_fig4(cfg, out, rows_by_label[label])
    else:
        raise ValueError(f"unknown plot {plot!r}")
    if path:
        print(f"wrote {path}")


def plot_fig4(cfg: ExperimentConfig, out: str, rows: list[dict]) -> Optional[str]:
    """t-SNE of seed 0's RBC features (the snapshots its selection used), with the weighted
    K-means centroids of the candidates and the selected examples circled."""
    import jax

    import pivotal
    from experiments import pipeline, plots
    from pivotal.selection import remaining_candidates

    row = next((r for r in rows if r["method"] == "rbc" and r["seed"] == 0), None)
    if row is None:
        print("fig4.png skipped: no rbc row for seed 0", file=sys.stderr)
        return None
    problem = pipeline.make_problem(cfg, 0)
    model = pipeline.build_model(cfg, problem)
    meta0, warm = pipeline.warmup_run(problem, model, cfg, 0, warmup_dir(out, cfg, 0))
    # The same keys as run_method's first selection round.
    k_sel = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 4), 0)
    k_feat, k_means = jax.random.split(k_sel)
    feats = pipeline.selection_features("rbc", problem, model, warm, cfg, k_feat)
    candidates = remaining_candidates(feats, existing=meta0,
                                              exclude_fraction=cfg.exclude_fraction)
    selected = np.asarray(row["meta_indices"][len(meta0):len(meta0) + cfg.budget - cfg.warmup])
    result = pivotal.weighted_spherical_kmeans(feats[candidates], len(selected), k_means,
                                               max_iters=cfg.kmeans_iters)
    where = {int(c): i for i, c in enumerate(candidates)}
    return plots.plot_tsne(np.asarray(feats[candidates]), np.asarray(result.centroids),
                           os.path.join(out, "fig4.png"), labels=problem.y_clean[candidates],
                           selected=np.asarray([where[int(s)] for s in selected if int(s) in where]),
                           title=f"RBC features of {cfg.dataset} (seed 0, true labels), "
                                 f"{len(selected)} weighted K-means centroids (stars), "
                                 f"selected examples circled")


def plot_fig1(cfg: ExperimentConfig, methods: Sequence[str], out: str, rows: list[dict],
              outcomes: dict) -> Optional[str]:
    """Seed 0's decision regions and meta examples on the 2-D toy set (the paper's Fig. 1)."""
    from experiments import pipeline, plots

    problem = pipeline.make_problem(cfg, 0)
    if tuple(problem.input_shape) != (2,) or problem.num_classes != 2:
        print(f"fig1.png skipped: {cfg.dataset} is not a 2-D two-class set", file=sys.stderr)
        return None
    model = pipeline.build_model(cfg, problem)
    work = os.path.join(out, "work", config_id(cfg), "seed0")
    drawn = [m for m in plots.FIG1_METHODS if m in methods]
    results = []
    for method in drawn:
        row = next(r for r in rows if r["method"] == method and r["seed"] == 0)
        if method not in outcomes:  # a resumed run: reload from the checkpoints in work/
            warm = pipeline.warmup_run(problem, model, cfg, 0, warmup_dir(out, cfg, 0))
            _, outcomes[method] = pipeline.run_method(method, problem, model, cfg, 0, work,
                                                      warm, return_outcome=True)
        results.append((row, outcomes[method]))
    clean = plots.train_clean_classifier(problem, cfg, seed=0)
    return plots.plot_fig1(problem, results, os.path.join(out, "fig1.png"), methods=drawn,
                           predict=model.predict, clean=clean,
                           title=f"toy, {cfg.noise} noise {cfg.rate:g}, {cfg.budget} meta "
                                 f"examples ({cfg.warmup} random + {cfg.budget - cfg.warmup} "
                                 f"selected), seed 0; clean-data classifier test acc "
                                 f"{100 * clean.test_accuracy:.1f}%")


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
        check_out(args.out)
        with lock.FolderLock(args.out, flag="--out", group=distributed.run_group(args)):
            preflight(configs, args.out)
            preset = get_preset(args.preset)
            run_all(configs, methods, seeds, args.out, sweep=preset.sweep, plot=preset.plot)
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
