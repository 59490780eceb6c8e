"""The figures of ``pivotal-clean finish``'s report (issue 16), drawn with matplotlib.

* :func:`plot_weights_by_agreement`: histograms of the learned weights of the unlabelled
  examples, split by whether the given label agrees with the model's prediction;
* :func:`plot_weight_vs_loss`: each example's weight against its loss under the given
  label (the picture Meta-Weight-Net users draw: noisy labels sit at high loss, low weight);
* :func:`plot_suspect_table`: the top suspects as a table, for data without images (image
  data get a contact sheet, :func:`experiments.labelfiles.write_contact_sheet`).

Each writes one PNG atomically (:func:`experiments.checkpoint.write_bytes_atomic`).
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.checkpoint import write_bytes_atomic  # noqa: E402

__all__ = ["plot_suspect_table", "plot_weight_vs_loss", "plot_weights_by_agreement"]

AGREE, DISAGREE = "#1f77b4", "#d62728"


def _save(fig, path: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def plot_weights_by_agreement(path, weights, agrees) -> str:
    """Histograms (shared bins on [0, 1]) of ``weights`` where ``agrees`` and where not."""
    weights, agrees = np.asarray(weights, np.float64), np.asarray(agrees, bool)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bins = np.linspace(0.0, 1.0, 41)
    for mask, colour, name in ((agrees, AGREE, "given label = prediction"),
                               (~agrees, DISAGREE, "given label != prediction")):
        ax.hist(np.clip(weights[mask], 0, 1), bins=bins, color=colour, alpha=0.6,
                label=f"{name} ({int(mask.sum())})")
    ax.set_xlabel("learned weight")
    ax.set_ylabel("unlabelled examples")
    ax.set_title("Learned weights by agreement of the given label with the prediction")
    ax.legend()
    return _save(fig, str(path))


def plot_weight_vs_loss(path, weights, losses, agrees) -> str:
    """Scatter of ``weights`` against ``losses`` (log scale), coloured by ``agrees``."""
    weights, losses = np.asarray(weights, np.float64), np.asarray(losses, np.float64)
    agrees = np.asarray(agrees, bool)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    floor = max(float(np.min(losses[losses > 0])) if np.any(losses > 0) else 1e-6, 1e-6)
    for mask, colour, name in ((agrees, AGREE, "given label = prediction"),
                               (~agrees, DISAGREE, "given label != prediction")):
        ax.scatter(np.maximum(losses[mask], floor), weights[mask], s=6, alpha=0.5,
                   color=colour, label=name, linewidths=0)
    ax.set_xscale("log")
    ax.set_xlabel("loss of the given label (cross-entropy, final model)")
    ax.set_ylabel("learned weight")
    ax.set_title("Weight against loss")
    ax.legend(loc="best", markerscale=3)
    return _save(fig, str(path))


def plot_suspect_table(path, rows, columns) -> str:
    """The first rows of the suspects' table drawn as a figure (data without images)."""
    rows = [[str(v) for v in row] for row in rows]
    fig, ax = plt.subplots(figsize=(7.0, 0.3 * (len(rows) + 2)))
    ax.axis("off")
    if rows:
        table = ax.table(cellText=rows, colLabels=list(columns), loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
    ax.set_title(f"Top {len(rows)} suspects (most likely mislabelled first)")
    return _save(fig, str(path))
