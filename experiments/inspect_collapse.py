"""Why some long-tailed runs sit at chance level: a learning-rate probe and a look inside.

    python3 -m experiments.inspect_collapse --out results/table2

``--out`` is the folder of a finished run of ``--preset`` (default ``table2``). A preset that
sweeps a field gets one section per value.

1. Learning-rate probe: the warm-up run (``warmup`` random cleaned examples + meta re-weighting)
   of the preset's config at each ``--lrs`` value for seeds ``0 .. --seeds-1``, scored by its
   best validation accuracy (the only split used for tuning). The preset's own learning rate
   reads the preset's warm-ups; the others are checkpointed under ``OUT/work/lr-probe`` so a
   rerun resumes.
2. Inside the runs: every row of ``OUT/results.jsonl`` whose test accuracy is below
   ``--below`` is restored from its final checkpoint (no training) next to the best run of the
   same seed, and described at its best-validation epoch: the predicted classes on the
   validation set, the parameters' largest ``|p|`` and the learned weights over the pool.

Prints two markdown tables; writes nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import numpy as np

from experiments import checkpoint, models, pipeline
from experiments.config import ExperimentConfig, config_id
from experiments.presets import PRESETS, sweep_configs


def lr_probe(cfg: ExperimentConfig, lrs, seeds: int, out: str) -> list[str]:
    lines = ["| lr | " + " | ".join(f"seed {s}" for s in range(seeds)) + " | mean |",
             "|---" * (seeds + 2) + "|"]
    for lr in lrs:
        c = dataclasses.replace(cfg, lr=lr)
        vals = []
        for seed in range(seeds):
            problem = pipeline.make_problem(c, seed)
            model = pipeline.build_model(c, problem)
            # The preset's own learning rate reuses the preset's warm-up (no training).
            work = (pipeline.warmup_dir(out, c, seed) if lr == cfg.lr else
                    os.path.join(out, "work", "lr-probe", config_id(c), f"seed{seed}"))
            _, outcome = pipeline.warmup_run(problem, model, c, seed, work)
            vals.append(outcome.best_val_accuracy)
        lines.append(f"| {lr} | " + " | ".join(f"{v:.3f}" for v in vals)
                     + f" | {np.mean(vals):.3f} |")
    return lines


def final_outcome(cfg: ExperimentConfig, out: str, row: dict):
    """The finished final training run of ``row``, restored from its checkpoint."""
    seed, method = row["seed"], row["method"]
    problem = pipeline.make_problem(cfg, seed)
    model = pipeline.build_model(cfg, problem)
    meta = np.asarray(row["meta_indices"], np.int64)
    if method == "base":
        ckpt, meta_indices = pipeline.run_dir(pipeline.seed_dir(out, cfg, seed), method), None
    else:
        ckpt, meta_indices = pipeline.run_dir(pipeline.seed_dir(out, cfg, seed), method,
                                              cfg.rounds - 1), meta
    if checkpoint.latest_step(ckpt) != cfg.epochs:
        raise FileNotFoundError(f"no finished run in {ckpt}: run --preset first with this --out")
    outcome = pipeline.train_meta(problem, model, cfg, jax.random.PRNGKey(seed),
                                  meta_indices=meta_indices, epochs=cfg.epochs, ckpt_dir=ckpt,
                                  desc="restore")
    pool = np.setdiff1d(np.arange(len(problem.y_noisy)), meta)
    logits = models.apply_in_chunks(
        lambda xb: model.predict(outcome.best_params, outcome.best_model_state, xb),
        problem.x_val, cfg.chunk_size)
    counts = np.bincount(np.argmax(np.asarray(logits), -1), minlength=problem.num_classes)
    leaves = jax.tree_util.tree_leaves(outcome.best_params)
    max_abs = max(float(np.max(np.abs(np.asarray(p)))) for p in leaves)
    w = None if outcome.weights is None else np.asarray(outcome.weights)[pool]
    return counts, max_abs, w, outcome


def inside(cfg: ExperimentConfig, out: str, below: float) -> list[str]:
    rows = [r for r in checkpoint.read_jsonl(os.path.join(out, "results.jsonl"))
            if r["method"] != "finetune"  # fine-tuning trains on the meta set alone
            and r["config_id"] == config_id(cfg)]
    lines = ["| run | test acc. | best epoch | predicted classes (validation) | max abs param "
             "| weights: mean, fraction > 0 |", "|---|---|---|---|---|---|"]
    low = [r for r in rows if r["test_accuracy"] < below]
    if not low:
        return [f"No run below {100 * below:.0f}% test accuracy."]
    for seed in sorted({r["seed"] for r in low}):
        healthy = max((h for h in rows if h["seed"] == seed), key=lambda h: h["test_accuracy"])
        mine = sorted((r for r in low if r["seed"] == seed), key=lambda r: r["method"])
        for tag, row in [("collapsed", r) for r in mine] + [("best of seed", healthy)]:
            counts, max_abs, w, outcome = final_outcome(cfg, out, row)
            weights = "-" if w is None else f"{w.mean():.2f}, {(w > 0).mean():.2f}"
            lines.append(f"| {row['method']} seed {seed} ({tag}) | "
                         f"{100 * outcome.test_accuracy:.1f} | {outcome.best_epoch} | "
                         f"{counts.tolist()} | {max_abs:.2f} | {weights} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of a finished preset run")
    parser.add_argument("--preset", default="table2")
    parser.add_argument("--lrs", default="0.1,0.03,0.01")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--below", type=float, default=0.2)
    args = parser.parse_args(argv)
    try:
        if args.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {args.preset!r}")
        lrs = [float(v) for v in args.lrs.split(",")]
        if not lrs or min(lrs) <= 0:
            raise ValueError(f"--lrs must be positive numbers, got {args.lrs!r}")
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        if not os.path.isfile(os.path.join(args.out, "results.jsonl")):
            raise FileNotFoundError(f"--out {args.out!r} holds no results.jsonl: run "
                                    f"`python3 -m experiments.run --preset {args.preset} "
                                    f"--out {args.out}` first")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    preset = PRESETS[args.preset]
    for label, cfg in sweep_configs(preset.config, preset.sweep):
        if label:
            print(f"### {label}\n")
        print("\n".join(inside(cfg, args.out, args.below)))
        print()
        print("\n".join(lr_probe(cfg, lrs, args.seeds, args.out)))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
