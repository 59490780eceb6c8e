"""Every figure of the experiments: the plotting functions (rows or arrays in, a PNG out) and
the figures of a run (:func:`write_plots`, what the command line writes under ``OUT``).

- :func:`plot_method_bars`: mean +- std test accuracy per method from ``results.jsonl`` rows.
- :func:`plot_fig1`: the 2-D toy set coloured by true label, the meta examples as stars, each
  method's learned decision regions (shaded) and the clean-data classifier (dotted black line,
  the p = 0.5 contour of a model trained on the clean labels); one panel per method.
- :func:`plot_noise_curve`: the paper's Figure 3, test accuracy vs noise rate, one line per
  method (mean over seeds, shaded +- std band).
- :func:`plot_rounds`: the paper's Table 6 as a figure, test accuracy vs meta-set size as meta
  examples are added round by round (mean +- std over seeds).
- :func:`plot_tsne`: the paper's Figure 4, a t-SNE of the per-example RBC features and the
  K-means centroids under the sign-invariant distance ``1 - |cos|``
  (:func:`abs_cosine_distance`), the selected meta examples circled.
- :func:`plot_scaling`: wall time and peak memory per phase vs training-set size, log-log.

:func:`write_plots` draws ``OUT/methods.png`` and the preset's figure; :func:`write_fig1` and
:func:`write_fig4` first recompute what their figure needs (seed 0's final models, the RBC
features of its warm-up) from the checkpoints of the run.

Every plotting function checks its input first and raises ``ValueError`` naming the offending
argument before any heavy work (t-SNE, rendering).

Every PNG is written atomically: rendered to a temporary file in the target directory, then
moved over the target with ``os.replace``.
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import pivotal
from pivotal.selection import remaining_candidates
from experiments import models, pipeline
from experiments.checkpoint import write_bytes_atomic
from experiments.config import METHODS, ExperimentConfig
from experiments.selection import selection_features
from experiments.training import build_model, train_meta

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
    module, has_state = models.make_model("mlp", num_classes, (2,), hidden=tuple(hidden))
    return models.predict_fn(module, has_state)


def train_clean_classifier(problem, cfg, seed: int = 0):
    """The model of ``cfg`` trained on the CLEAN training labels (no meta set): its outcome."""
    model = build_model(cfg, problem)
    return train_meta(problem, model, cfg, jax.random.PRNGKey(10_000 + seed),
                      meta_indices=None, epochs=cfg.epochs, train_labels=problem.y_clean,
                      desc="clean")


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


# ----------------------------------------------------------------------------- row checks


def _checked_rows(rows: Sequence[Mapping[str, Any]], keys: Sequence[str],
                  func: str) -> list[Mapping[str, Any]]:
    """``rows`` as a list after checking it is a non-empty sequence of mappings with ``keys``."""
    if isinstance(rows, (str, bytes, Mapping)):
        raise ValueError(f"{func}: rows must be a sequence of dicts, got {type(rows).__name__}")
    rows = list(rows)
    if not rows:
        raise ValueError(f"{func}: rows is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{func}: rows[{i}] is a {type(row).__name__}, not a dict")
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{func}: rows[{i}] lacks the key(s) {missing}")
    return rows


def _finite_number(value: Any, where: str, func: str) -> float:
    """``value`` as a float; ValueError naming ``where`` unless it is a finite real number."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{func}: {where} must be a finite number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{func}: {where} must be a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{func}: {where} must be a finite number, got {value!r}")
    return number


def _first_appearance(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The methods of ``rows`` in order of first appearance."""
    return list(dict.fromkeys(r["method"] for r in rows))


def _mean_std_line(ax, xs: np.ndarray, samples: Sequence[np.ndarray], label: str,
                   marker: str | None = None) -> None:
    """A line through the means of ``samples`` (one array per x) with a shaded +- std band."""
    means = np.array([s.mean() for s in samples])
    stds = np.array([s.std() for s in samples])
    (line,) = ax.plot(xs, means, marker=marker, markersize=5, linewidth=1.6, label=label)
    ax.fill_between(xs, means - stds, means + stds, color=line.get_color(), alpha=0.2,
                    linewidth=0)


# ----------------------------------------------------------------------------- Figure 3


def plot_noise_curve(rows: Sequence[Mapping[str, Any]], path: str, *, x: str = "rate",
                     title: str | None = None) -> str:
    """Test accuracy vs noise rate (the paper's Figure 3); returns ``path``.

    Args:
      rows: ``results.jsonl`` rows, each with ``method``, ``seed``, ``test_accuracy`` (a
        fraction) and the ``x`` key (a fraction, e.g. the noise rate).
      path: the PNG to write.
      x: the row key on the x axis; its values are shown in percent.
      title: optional axes title.

    One line per method (in order of first appearance): at each x value, the mean over the
    rows (seeds) with a shaded +- std band (population std, as in :func:`plot_method_bars`).
    """
    func = "plot_noise_curve"
    if not isinstance(x, str) or not x:
        raise ValueError(f"{func}: x must be a non-empty row key, got {x!r}")
    rows = _checked_rows(rows, ("method", "seed", "test_accuracy", x), func)
    points: dict[str, dict[float, list[float]]] = {}
    seeds: dict[str, set] = {}
    for i, row in enumerate(rows):
        xv = _finite_number(row[x], f"rows[{i}][{x!r}] (the x key)", func)
        acc = _finite_number(row["test_accuracy"], f"rows[{i}]['test_accuracy']", func)
        points.setdefault(row["method"], {}).setdefault(xv, []).append(acc)
        seeds.setdefault(row["method"], set()).add(row["seed"])

    return _accuracy_lines(rows, points, seeds, path, x_scale=100.0, title=title,
                           xlabel="noise rate (%)" if x == "rate" else f"{x} (%)")


def _accuracy_lines(rows, points, seeds, path: str, *, x_scale: float, xlabel: str,
                    title) -> str:
    """One mean +- std line of test accuracy (%) per method over ``points[method][x]``."""
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for method in _first_appearance(rows):
        by_x = points[method]
        xs = np.array(sorted(by_x))
        samples = [100 * np.asarray(by_x[v], float) for v in xs]
        _mean_std_line(ax, x_scale * xs, samples, f"{method} (n={len(seeds[method])})",
                       marker="o")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_atomic(fig, path)


# ----------------------------------------------------------------------------- Table 6


def plot_rounds(rows: Sequence[Mapping[str, Any]], path: str, *,
                title: str | None = None) -> str:
    """Test accuracy as meta examples are added round by round (the paper's Table 6).

    Args:
      rows: rows with ``method``, ``seed``, ``round_meta_count`` (the meta-set size after each
        round, ints) and ``round_test_accuracy`` (the test accuracy after each round,
        fractions; the same length).
      path: the PNG to write.
      title: optional axes title.

    One line per method (in order of first appearance) with a marker per meta-set size: the
    mean over the seeds that reached that size, with a shaded +- std band. Returns ``path``.
    """
    func = "plot_rounds"
    keys = ("method", "seed", "round_meta_count", "round_test_accuracy")
    rows = _checked_rows(rows, keys, func)
    points: dict[str, dict[int, list[float]]] = {}
    seeds: dict[str, set] = {}
    for i, row in enumerate(rows):
        counts, accs = row["round_meta_count"], row["round_test_accuracy"]
        for key, seq in (("round_meta_count", counts), ("round_test_accuracy", accs)):
            if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence) or not seq:
                raise ValueError(f"{func}: rows[{i}][{key!r}] must be a non-empty list, "
                                 f"got {seq!r}")
        if len(counts) != len(accs):
            raise ValueError(f"{func}: rows[{i}] has {len(counts)} round_meta_count entries "
                             f"but {len(accs)} round_test_accuracy entries")
        for j, (count, acc) in enumerate(zip(counts, accs)):
            c = _finite_number(count, f"rows[{i}]['round_meta_count'][{j}]", func)
            if c != int(c) or c < 0:
                raise ValueError(f"{func}: rows[{i}]['round_meta_count'][{j}] must be a "
                                 f"non-negative int, got {count!r}")
            a = _finite_number(acc, f"rows[{i}]['round_test_accuracy'][{j}]", func)
            points.setdefault(row["method"], {}).setdefault(int(c), []).append(a)
        seeds.setdefault(row["method"], set()).add(row["seed"])

    return _accuracy_lines(rows, points, seeds, path, x_scale=1.0, xlabel="meta-set size",
                           title=title)


# ----------------------------------------------------------------------------- Figure 4


def abs_cosine_distance(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Pairwise sign-invariant distance ``1 - |cos|`` between the rows of ``a`` and ``b``.

    Rows are L2-normalised first; a zero row has cosine 0 with everything (distance 1), except
    that with ``b`` None (the square matrix of ``a`` against itself) the diagonal is exactly 0.
    The result lies in [0, 1], and a row and its negation are at distance 0.
    """
    def unit(m):
        m = np.asarray(m, np.float64)
        if m.ndim != 2:
            raise ValueError(f"abs_cosine_distance needs 2-D arrays, got shape {m.shape}")
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        return m / np.where(norms > 0, norms, 1.0)

    ua = unit(a)
    ub = ua if b is None else unit(b)
    if ua.shape[1] != ub.shape[1]:
        raise ValueError(f"abs_cosine_distance: a has {ua.shape[1]} columns, b has "
                         f"{ub.shape[1]}")
    dist = np.clip(1.0 - np.abs(ua @ ub.T), 0.0, 1.0)
    if b is None:
        dist = 0.5 * (dist + dist.T)  # exactly symmetric despite rounding
        np.fill_diagonal(dist, 0.0)
    return dist


def tsne_perplexity(n_points: int) -> float:
    """The perplexity used for ``n_points`` embedded points: ``min(30, (n_points - 1) / 3)``.

    sklearn's default 30, lowered for small sets since the perplexity must stay below the
    number of points (about three perplexities of neighbours are used per point).
    """
    return float(min(30.0, (n_points - 1) / 3.0))


def plot_tsne(features: np.ndarray, centroids: np.ndarray, path: str, *,
              labels: np.ndarray | None = None, selected: Sequence[int] | None = None,
              max_points: int = 2000, seed: int = 0, title: str | None = None) -> str:
    """A t-SNE map of the RBC features and the K-means centroids (the paper's Figure 4).

    Args:
      features: ``(N, D)`` per-example features (the RBC gradient features).
      centroids: ``(M, D)`` K-means centroids in the same space.
      path: the PNG to write.
      labels: optional ``(N,)`` integer labels colouring the points (a qualitative colormap
        with a legend for up to 20 classes, a colorbar beyond).
      selected: optional indices into ``features`` of the chosen meta examples, drawn as
        red-edged circles; they are always embedded.
      max_points: when N exceeds it, a random subset of ``max_points`` examples (a numpy
        Generator seeded with ``seed``; all ``selected`` ones kept, so the subset is larger
        when there are more of those) is embedded, plus all centroids.
      seed: seeds the subset and the t-SNE (``random_state``).
      title: optional axes title.

    The geometry is spherical and sign-invariant, so the embedding uses
    ``metric="precomputed"`` on :func:`abs_cosine_distance` (``1 - |cos|`` between the
    L2-normalised rows; zero rows are at distance 1 from everything else) with
    ``init="random"``, and perplexity :func:`tsne_perplexity` of the number of embedded points
    (sklearn requires it below that number). Returns ``path``.
    """
    features, centroids, labels, selected = _checked_tsne_inputs(
        features, centroids, labels, selected, max_points)
    n = features.shape[0]
    subset = _tsne_subset(n, selected, max_points, seed)
    ex, cen = _embed(features[subset], centroids, seed)
    m = centroids.shape[0]

    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    _scatter_by_label(fig, ax, ex, None if labels is None else labels[subset],
                      None if labels is None else np.unique(labels))
    if selected is not None and selected.size:
        where = np.searchsorted(subset, selected)  # every selected index is in the subset
        ax.scatter(ex[where, 0], ex[where, 1], s=55, facecolors="none", edgecolors="red",
                   linewidths=1.3, zorder=4, label="selected (meta)")
    ax.scatter(cen[:, 0], cen[:, 1], marker="*", s=280, c="black", edgecolors="white",
               linewidths=0.8, zorder=5, label="centroids")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    shown = f"{subset.size} of {n}" if subset.size < n else f"{n}"
    ax.set_title((f"{title}\n" if title else "") + f"t-SNE (1 - |cos|) of {shown} examples, "
                 f"{m} centroids", fontsize=9)
    n_entries = len(ax.get_legend_handles_labels()[1])
    ax.legend(fontsize=7, loc="best", ncol=2 if n_entries > 8 else 1)
    return _save_atomic(fig, path)


def _checked_tsne_inputs(features, centroids, labels, selected, max_points):
    """``(features, centroids, labels, selected)`` as arrays (labels int64, selected sorted
    unique int64), after the checks of :func:`plot_tsne`; ValueError naming the argument."""
    func = "plot_tsne"
    features = np.asarray(features)
    centroids = np.asarray(centroids)
    if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"{func}: features must be a non-empty (N, D) array, got shape "
                         f"{features.shape}")
    if not np.issubdtype(features.dtype, np.number) or not np.isfinite(features).all():
        raise ValueError(f"{func}: features must be finite numbers")
    n, d = features.shape
    if centroids.ndim != 2 or centroids.shape[0] < 1 or centroids.shape[1] != d:
        raise ValueError(f"{func}: centroids must be a non-empty (M, {d}) array matching "
                         f"features, got shape {centroids.shape}")
    if not np.issubdtype(centroids.dtype, np.number) or not np.isfinite(centroids).all():
        raise ValueError(f"{func}: centroids must be finite numbers")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"{func}: labels must have shape ({n},) like features, got "
                             f"{labels.shape}")
        if labels.dtype.kind not in "iub" and not (
                labels.dtype.kind == "f" and np.all(np.isfinite(labels))
                and np.all(labels == np.round(labels))):
            raise ValueError(f"{func}: labels must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
    if selected is not None:
        sel = np.asarray(selected)
        if sel.size and (sel.ndim != 1 or sel.dtype.kind not in "iu"):
            raise ValueError(f"{func}: selected must be a 1-D sequence of int indices, got "
                             f"shape {sel.shape} dtype {sel.dtype}")
        sel = sel.astype(np.int64).reshape(-1)
        if sel.size and (sel.min() < 0 or sel.max() >= n):
            raise ValueError(f"{func}: selected indices must lie in [0, {n}), got "
                             f"[{sel.min()}, {sel.max()}]")
        selected = np.unique(sel)
    if isinstance(max_points, (bool, np.bool_)) or not isinstance(max_points,
                                                                  (int, np.integer)):
        raise ValueError(f"{func}: max_points must be an int, got {max_points!r}")
    if max_points < 1:
        raise ValueError(f"{func}: max_points must be >= 1, got {max_points}")
    return features, centroids, labels, selected


def _tsne_subset(n: int, selected, max_points: int, seed: int) -> np.ndarray:
    """The examples to embed (sorted indices into the features): all of them, or, beyond
    ``max_points``, every selected one plus a seeded random draw of the rest."""
    rng = np.random.default_rng(seed)
    if n > max_points:
        keep = selected if selected is not None else np.zeros(0, np.int64)
        rest = np.setdiff1d(np.arange(n), keep)
        fill = max(0, max_points - keep.size)
        return np.union1d(keep, rng.choice(rest, size=min(fill, rest.size), replace=False))
    return np.arange(n)


def _embed(examples: np.ndarray, centroids: np.ndarray, seed: int):
    """``(examples, centroids)`` in 2-D: one t-SNE of both under :func:`abs_cosine_distance`."""
    n_points = examples.shape[0] + centroids.shape[0]
    if n_points < 2:
        raise ValueError("plot_tsne: need at least 2 points (features + centroids) to embed")

    from sklearn.manifold import TSNE

    points = np.concatenate([examples, centroids]).astype(np.float64)
    dist = abs_cosine_distance(points)
    tsne = TSNE(n_components=2, metric="precomputed", init="random", random_state=seed,
                perplexity=tsne_perplexity(n_points))
    emb = tsne.fit_transform(dist)
    return emb[:examples.shape[0]], emb[examples.shape[0]:]


def _scatter_by_label(fig, ax, ex: np.ndarray, sub_labels, classes) -> None:
    """The embedded examples: grey without labels, one colour per class up to 20 classes (a
    legend), a colorbar beyond."""
    if sub_labels is None:
        ax.scatter(ex[:, 0], ex[:, 1], s=6, c="tab:gray", alpha=0.6, linewidths=0,
                   label="examples")
    elif classes.size <= 20:
        cmap = plt.get_cmap("tab10" if classes.size <= 10 else "tab20")
        for k, cls in enumerate(classes):
            mask = sub_labels == cls
            if mask.any():
                ax.scatter(ex[mask, 0], ex[mask, 1], s=6, color=cmap(k), alpha=0.7,
                           linewidths=0, label=f"class {cls}")
    else:
        sc = ax.scatter(ex[:, 0], ex[:, 1], s=6, c=sub_labels, cmap="tab20", alpha=0.7,
                        linewidths=0)
        fig.colorbar(sc, ax=ax, label="label", shrink=0.8)


def plot_scaling(series: Mapping[str, Sequence[tuple]], path: str, *, title: str = "") -> str:
    """Wall time and peak resident memory vs training-set size N, log-log, one line per phase.

    ``series``: ``{label: [(N, seconds, peak GB or None), ...]}``; a grey dotted line of slope
    1 (time proportional to N) through each panel's smallest-N points marks linear growth.
    """
    if not series or any(not points for points in series.values()):
        raise ValueError("series must map each phase label to a non-empty list of points")
    for label, points in series.items():
        for point in points:
            if len(point) != 3 or not point[0] > 0 or not point[1] >= 0:
                raise ValueError(f"series[{label!r}] points must be (N > 0, seconds >= 0, "
                                 f"peak GB), got {point!r}")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, col, ylabel in ((axes[0], 1, "wall time (s)"), (axes[1], 2, "peak RSS (GB)")):
        firsts = []
        for label, points in series.items():
            pts = sorted(p for p in points if p[col] is not None and p[col] > 0)
            if pts:
                ax.plot([p[0] for p in pts], [p[col] for p in pts], "o-", label=label)
                firsts.append(pts[0])
        if firsts:
            n0 = min(p[0] for p in firsts)
            ns = np.array([n0, max(p[0] for pts in series.values() for p in pts)], float)
            for p in firsts:
                ax.plot(ns, p[col] * ns / p[0], ":", color="grey", linewidth=0.8)
        ax.set(xscale="log", yscale="log", xlabel="training examples N", ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "phases vs N (dotted: proportional to N)")
    return _save_atomic(fig, path)


# ----------------------------------------------------------------------------- a run's figures


def write_plots(configs: list, methods: Sequence[str], out: str, rows_by_label: dict,
                plot: Optional[str], outcomes: dict, sweep=None) -> None:
    """``OUT/methods.png`` (``methods-LABEL.png`` per swept value) and the preset's figure:
    ``fig1.png``, ``fig3.png`` (accuracy vs the swept noise rate), ``rounds.png`` (accuracy
    per round) or ``fig4.png`` (t-SNE of seed 0's RBC features and centroids)."""
    for label, cfg in configs:
        name = f"methods-{label}.png" if label else "methods.png"
        plot_method_bars(rows_by_label[label], os.path.join(out, name),
                         title=f"{cfg.dataset}, {cfg.noise} {cfg.rate:g}, budget "
                               f"{cfg.budget}" + (f", {label}" if label else ""))
        print(f"wrote {os.path.join(out, name)}")
    if plot is None:
        return
    label, cfg = configs[0]
    if plot == "fig1":
        path = write_fig1(cfg, methods, out, rows_by_label[label], outcomes[label])
    elif plot == "fig3":
        rows = [r for lab in rows_by_label for r in rows_by_label[lab]]
        path = plot_noise_curve(rows, os.path.join(out, "fig3.png"), x=sweep[0],
                                title=f"{cfg.dataset}, {cfg.noise} noise, budget "
                                      f"{cfg.budget}")
    elif plot == "table6":
        rows = [r for r in rows_by_label[label] if r.get("round_meta_count")]
        path = plot_rounds(rows, os.path.join(out, "rounds.png"),
                           title=f"{cfg.dataset}, {cfg.noise} {cfg.rate:g}: "
                                 f"{cfg.warmup} warm-up + {cfg.rounds} rounds")
    elif plot == "fig4":
        path = write_fig4(cfg, out, rows_by_label[label])
    else:
        raise ValueError(f"unknown plot {plot!r}")
    if path:
        print(f"wrote {path}")


def write_fig4(cfg: ExperimentConfig, out: str, rows: list[dict]) -> Optional[str]:
    """``OUT/fig4.png``: t-SNE of seed 0's RBC features (the snapshots its selection used),
    with the weighted K-means centroids of the candidates and the selected examples circled.
    The features are recomputed from the warm-up's checkpoints in ``OUT/work``."""
    row = next((r for r in rows if r["method"] == "rbc" and r["seed"] == 0), None)
    if row is None:
        print("fig4.png skipped: no rbc row for seed 0", file=sys.stderr)
        return None
    problem = pipeline.make_problem(cfg, 0)
    model = build_model(cfg, problem)
    meta0, warm = pipeline.warmup_run(problem, model, cfg, 0, pipeline.warmup_dir(out, cfg, 0))
    # The same keys as run_method's first selection round.
    k_sel = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 4), 0)
    k_feat, k_means = jax.random.split(k_sel)
    feats = selection_features("rbc", problem, model, warm, cfg, k_feat)
    candidates = remaining_candidates(feats, existing=meta0,
                                      exclude_fraction=cfg.exclude_fraction)
    selected = np.asarray(row["meta_indices"][len(meta0):len(meta0) + cfg.budget - cfg.warmup])
    result = pivotal.weighted_spherical_kmeans(feats[candidates], len(selected), k_means,
                                               max_iters=cfg.kmeans_iters)
    where = {int(c): i for i, c in enumerate(candidates)}
    return plot_tsne(np.asarray(feats[candidates]), np.asarray(result.centroids),
                     os.path.join(out, "fig4.png"), labels=problem.y_clean[candidates],
                     selected=np.asarray([where[int(s)] for s in selected if int(s) in where]),
                     title=f"RBC features of {cfg.dataset} (seed 0, true labels), "
                           f"{len(selected)} weighted K-means centroids (stars), "
                           f"selected examples circled")


def write_fig1(cfg: ExperimentConfig, methods: Sequence[str], out: str, rows: list[dict],
               outcomes: dict) -> Optional[str]:
    """``OUT/fig1.png``: seed 0's decision regions and meta examples on the 2-D toy set (the
    paper's Fig. 1). ``outcomes``: seed 0's final runs by method; a method without one (a
    resumed run) is restored from its checkpoints in ``OUT/work``."""
    problem = pipeline.make_problem(cfg, 0)
    if tuple(problem.input_shape) != (2,) or problem.num_classes != 2:
        print(f"fig1.png skipped: {cfg.dataset} is not a 2-D two-class set", file=sys.stderr)
        return None
    model = build_model(cfg, problem)
    work = pipeline.seed_dir(out, cfg, 0)
    drawn = [m for m in FIG1_METHODS if m in methods]
    drawn_runs = []
    for method in drawn:
        row = next(r for r in rows if r["method"] == method and r["seed"] == 0)
        if method not in outcomes:  # a resumed run: reload from the checkpoints in work/
            warm = pipeline.warmup_run(problem, model, cfg, 0, pipeline.warmup_dir(out, cfg, 0))
            _, outcomes[method] = pipeline.run_method(method, problem, model, cfg, 0, work,
                                                      warm, return_outcome=True)
        drawn_runs.append((row, outcomes[method]))
    clean = train_clean_classifier(problem, cfg, seed=0)
    return plot_fig1(problem, drawn_runs, os.path.join(out, "fig1.png"), methods=drawn,
                     predict=model.predict, clean=clean,
                     title=f"toy, {cfg.noise} noise {cfg.rate:g}, {cfg.budget} meta "
                           f"examples ({cfg.warmup} random + {cfg.budget - cfg.warmup} "
                           f"selected), seed 0; clean-data classifier test acc "
                           f"{100 * clean.test_accuracy:.1f}%")
