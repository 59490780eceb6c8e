"""Figures from the experiments: per-method accuracy bars and the paper's Figure 1 (toy set).

- :func:`plot_method_bars`: mean +- std test accuracy per method from ``results.jsonl`` rows.
- :func:`plot_fig1`: the 2-D toy set coloured by true label, the meta examples as stars, each
  method's learned decision regions (shaded) and the clean-data classifier (dotted black line,
  the p = 0.5 contour of a model trained on the clean labels); one panel per method.

Every PNG is written atomically: rendered to a temporary file in the target directory, then
moved over the target with ``os.replace``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from experiments.checkpoint import write_bytes_atomic

FIG1_METHODS = ("random", "rbc", "gbc")
LABEL_COLOURS = ("tab:blue", "tab:red")  # class 0 (lower corners), class 1 (upper corners)


def _save_atomic(fig, path: str) -> str:
    """Render ``fig`` to ``path`` (PNG) atomically (readers never see half a file)."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _method_order(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    from experiments.pipeline import METHODS

    present = {r["method"] for r in rows}
    known = [m for m in METHODS if m in present]
    return known + sorted(present - set(known))


def plot_method_bars(rows: Sequence[Mapping[str, Any]], path: str,
                     title: str | None = None) -> str:
    """One bar per method: mean test accuracy (%) over seeds; error bar = std when > 1 seed."""
    rows = [r for r in rows if r.get("test_accuracy") is not None]
    if not rows:
        raise ValueError("plot_method_bars needs at least one row with a test_accuracy")
    methods = _method_order(rows)
    accs = [100 * np.asarray([r["test_accuracy"] for r in rows if r["method"] == m], float)
            for m in methods]
    means = np.array([a.mean() for a in accs])
    errs = np.array([a.std() if len(a) > 1 else 0.0 for a in accs])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(methods) + 1.5), 3.5))
    pos = np.arange(len(methods))
    ax.bar(pos, means, color="tab:gray", edgecolor="black", linewidth=0.6,
           yerr=np.where(errs > 0, errs, np.nan) if (errs > 0).any() else None,
           capsize=4 if (errs > 0).any() else 0)
    for x, m, e, a in zip(pos, means, errs, accs):
        ax.text(x, m + e + 1, f"{m:.1f}\n(n={len(a)})", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(pos, methods, rotation=30 if len(methods) > 5 else 0)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, min(110, max(100, float(np.max(means + errs)) + 12)))
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save_atomic(fig, path)


# ----------------------------------------------------------------------------- Figure 1


def mlp_predict(hidden: Sequence[int] = (100, 100), num_classes: int = 2) -> Callable:
    """``predict(params, model_state, x) -> logits`` of the pipeline's MLP."""
    from experiments import models

    module, has_state = models.make_model("mlp", num_classes, (2,), hidden=tuple(hidden))
    return models.predict_fn(module, has_state)


def train_clean_classifier(problem, cfg, seed: int = 0):
    """The model of ``cfg`` trained on the CLEAN training labels (no meta set): its outcome."""
    import jax

    from experiments import pipeline

    model = pipeline.build_model(cfg, problem)
    return pipeline.train_meta(problem, model, cfg, jax.random.PRNGKey(10_000 + seed),
                               meta_indices=None, epochs=cfg.epochs,
                               train_labels=problem.y_clean, desc="clean")


def _params_of(item) -> tuple[Mapping[str, Any], Any, Any]:
    """``(row, params, model_state)`` from a row dict, a ``(row, outcome)`` pair, or a row with
    an ``"outcome"`` / ``"params"`` entry; params are None when the row carries none."""
    if isinstance(item, tuple) and len(item) == 2:
        row, outcome = item
    else:
        row, outcome = item, item.get("outcome")
    if outcome is not None:
        return row, outcome.best_params, outcome.best_model_state
    return row, row.get("params"), row.get("model_state")


def _probability_grid(predict, params, model_state, xx, yy) -> np.ndarray:
    grid = np.stack([xx.ravel(), yy.ravel()], -1).astype(np.float32)
    logits = np.asarray(predict(params, model_state, grid), np.float64)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return probs[:, 1].reshape(xx.shape)


def plot_fig1(problem, rows_or_results: Sequence[Any], path: str, *,
              methods: Sequence[str] = FIG1_METHODS, predict: Callable | None = None,
              clean: Any = None, resolution: int = 200, title: str | None = None) -> str:
    """A figure like the paper's Figure 1 for the 2-D toy set, one panel per method.

    Args:
      problem: the seed's :class:`experiments.pipeline.Problem` (toy: 2-D inputs, 2 classes).
      rows_or_results: per method, a ``results.jsonl`` row (needs ``method``,
        ``meta_indices``; optional ``test_accuracy``, ``outcome``/``params``) or a pair
        ``(row, outcome)`` as returned by ``run_method(..., return_outcome=True)``. Without
        parameters a panel shows no decision regions. The first entry per method is drawn.
      path: the PNG to write.
      methods: panels, in order; methods without an entry are skipped.
      predict: ``predict(params, model_state, x) -> logits``; default the pipeline's MLP.
      clean: the clean-data classifier, a TrainOutcome or ``(params, model_state)``; drawn as
        a dotted black p = 0.5 contour. None: not drawn.
    """
    if tuple(problem.input_shape) != (2,) or problem.num_classes != 2:
        raise ValueError("plot_fig1 needs a 2-D, two-class problem (the toy set), got input "
                         f"shape {problem.input_shape} with {problem.num_classes} classes")
    predict = predict or mlp_predict()
    by_method: dict[str, tuple] = {}
    for item in rows_or_results:
        row, params, state = _params_of(item)
        by_method.setdefault(row["method"], (row, params, state))
    panels = [m for m in methods if m in by_method]
    if not panels:
        raise ValueError(f"no rows for any of the methods {list(methods)}")

    x, y = np.asarray(problem.x_train), np.asarray(problem.y_clean)
    everything = np.concatenate([x, np.asarray(problem.x_test)])
    lo, hi = everything.min(0) - 0.4, everything.max(0) + 0.4
    xx, yy = np.meshgrid(np.linspace(lo[0], hi[0], resolution),
                         np.linspace(lo[1], hi[1], resolution))
    clean_p = None
    if clean is not None:
        c_params, c_state = ((clean.best_params, clean.best_model_state)
                             if hasattr(clean, "best_params") else clean)
        clean_p = _probability_grid(predict, c_params, c_state, xx, yy)

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, method in zip(axes[0], panels):
        row, params, state = by_method[method]
        if params is not None:
            p = _probability_grid(predict, params, state, xx, yy)
            ax.contourf(xx, yy, p, levels=[0.0, 0.5, 1.0], colors=LABEL_COLOURS, alpha=0.18)
            ax.contour(xx, yy, p, levels=[0.5], colors="dimgray", linewidths=1.0)
        if clean_p is not None:
            ax.contour(xx, yy, clean_p, levels=[0.5], colors="black", linewidths=1.6,
                       linestyles="dotted")
        for label in (0, 1):
            sel = y == label
            ax.scatter(x[sel, 0], x[sel, 1], s=7, c=LABEL_COLOURS[label], alpha=0.55,
                       linewidths=0, label=f"class {label}")
        meta = np.asarray(row.get("meta_indices", []), np.int64)
        if meta.size:
            ax.scatter(x[meta, 0], x[meta, 1], marker="*", s=260,
                       c=[LABEL_COLOURS[int(v)] for v in y[meta]], edgecolors="black",
                       linewidths=1.0, zorder=5, label="meta examples")
        acc = row.get("test_accuracy")
        name = "Random" if method == "random" else method.upper()
        ax.set_title(name if acc is None else f"{name}: test acc {100 * acc:.1f}%",
                     fontsize=11)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes[0][0].get_legend_handles_labels()
    if clean_p is not None:
        handles.append(plt.Line2D([], [], color="black", linestyle="dotted", linewidth=1.6))
        labels.append("clean-data classifier")
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9,
               frameon=False, bbox_to_anchor=(0.5, -0.04))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_atomic(fig, path)
