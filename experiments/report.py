"""Markdown tables of ``results.jsonl`` rows: mean +- std over seeds per method.

:func:`summarise` (test accuracy, weight AUC, times), :func:`summarise_rounds` (accuracy after
each selection round), :func:`summarise_theorems` (Theorems 1-2 statistics),
:func:`summarise_sweep` (accuracy per swept value); :func:`tables` puts the ones a preset's
rows have together, as written to ``OUT/table.md``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


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


def tables(configs: list, rows_by_label: dict, methods: Sequence[str], sweep=None) -> str:
    """Every table of a preset's run: per config (``(label, config)``) its summary, round and
    theorem tables, then the sweep's table."""
    parts = []
    for label, _ in configs:
        rows = rows_by_label[label]
        parts.append((f"### {label}\n\n" if label else "") + summarise(rows, methods))
        for extra in (summarise_rounds(rows, methods), summarise_theorems(rows)):
            if extra:
                parts.append(extra)
    if sweep is not None:
        parts.append(summarise_sweep(rows_by_label, methods, sweep[0]))
    return "\n".join(parts)
