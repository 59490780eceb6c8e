"""What ``pivotal-clean finish`` writes (issue 16): the suspects' ranking, the tables, the report.

* ``weights.csv``: one row per unlabelled example: ``id``, ``weight`` (the learned
  per-example weight of the final meta re-weighting, at its best-validation epoch),
  ``given_label``, ``predicted_label`` (the final model's), ``loss`` (its cross-entropy
  under the given label).
* ``suspects.csv``: ``rank`` then the same columns, most likely mislabelled first
  (:func:`rank_suspects`).
* ``report.md`` with ``weights_by_agreement.png``, ``weight_vs_loss.png`` and
  ``suspects.png`` (a contact sheet of the top suspects for image data, else a table).

The ranking, :func:`rank_suspects`: the examples whose given label disagrees with the final
model's prediction first; within each group by learned weight ascending (meta re-weighting
drives the weight of an example whose gradient disagrees with the cleaned meta set's towards
0); equal weights (many reach the lower clip 1e-7) by the loss of the given label, highest
first. Disagreement comes first because the weights of examples the training visited
little still carry their random initial value (U[0, 1)): on the scikit-learn digits with
40 % noise (MLP, 10 epochs) weight alone ranked the top 40 % at 0.68 precision, disagreement
then weight at 0.93.
"""

from __future__ import annotations

import math
import os

import numpy as np
import optax
import jax.numpy as jnp
from tqdm.auto import tqdm

from experiments import checkpoint, clean_plots, labelfiles, models

__all__ = ["SUSPECT_SHEET", "TOP_FRACTION", "predict_pool", "rank_suspects", "write_outputs",
           "wilson_interval"]

TOP_FRACTION = 0.1  # the report counts disagreements among the top 10 % of suspects
SUSPECT_SHEET = 50  # images on suspects.png
TABLE_ROWS = 20  # suspects listed in report.md


def rank_suspects(weights, agrees, losses) -> np.ndarray:
    """Positions in suspect order: disagreeing with the prediction first, then weight
    ascending, then loss descending (``np.lexsort`` sorts by its last key first)."""
    return np.lexsort((-np.asarray(losses, np.float64), np.asarray(weights, np.float64),
                       np.asarray(agrees, bool)))


def predict_pool(model, run, x, labels, chunk_size: int, desc: str = "predict") -> tuple:
    """``(predicted class ids, loss of ``labels``)`` of every row of ``x``, with a progress
    bar over the chunks."""
    predicted = np.empty(len(x), np.int32)
    losses = np.empty(len(x), np.float64)
    for s in tqdm(range(0, len(x), chunk_size), desc=desc, leave=False, disable=None):
        logits = models.apply_in_chunks(
            lambda xb: model.predict(run.best_params, run.best_model_state, xb),
            x[s:s + chunk_size], chunk_size)
        predicted[s:s + chunk_size] = np.argmax(logits, -1)
        losses[s:s + chunk_size] = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
            jnp.asarray(logits, jnp.float32), jnp.asarray(labels[s:s + chunk_size])))
    return predicted, losses


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple:
    """The Wilson score interval of a binomial proportion (95 % by default)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _tables(work: str, train, pool, weights, predicted, losses) -> tuple:
    """Writes weights.csv and suspects.csv; returns (order, rows of suspects.csv)."""
    agrees = predicted == train.y[pool]
    names = train.class_names

    def row(j):
        i = pool[j]
        return [train.ids[i], f"{weights[j]:.6g}", names[train.y[i]], names[predicted[j]],
                f"{losses[j]:.6g}"]

    columns = ["id", "weight", "given_label", "predicted_label", "loss"]
    labelfiles.write_table(os.path.join(work, "weights.csv"), columns,
                           (row(j) for j in range(len(pool))))
    order = rank_suspects(weights, agrees, losses)
    rows = [[k + 1] + row(j) for k, j in enumerate(order)]
    labelfiles.write_table(os.path.join(work, "suspects.csv"), ["rank"] + columns, rows)
    return order, rows, agrees


def _plots(work: str, train, pool, order, rows, weights, predicted, losses, agrees) -> None:
    clean_plots.plot_weights_by_agreement(os.path.join(work, "weights_by_agreement.png"),
                                          weights, agrees)
    clean_plots.plot_weight_vs_loss(os.path.join(work, "weight_vs_loss.png"), weights, losses,
                                    agrees)
    top = order[:SUSPECT_SHEET]
    path = os.path.join(work, "suspects.png")
    if train.x.ndim == 4 and train.x.shape[-1] in (1, 3):
        notes = [f"pred {train.class_names[int(predicted[j])]}, w {weights[j]:.2g}"
                 for j in top]
        labelfiles.write_contact_sheet(path, train, pool[top], notes=notes,
                                       per_sheet=SUSPECT_SHEET)
    else:
        clean_plots.plot_suspect_table(path, [r[:5] for r in rows[:TABLE_ROWS]],
                                       ["rank", "id", "weight", "given", "predicted"])


def write_outputs(work, state: dict, sets, problem, model, run, meta, answers, *,
                  base_run=None, chunk_size: int = 512) -> dict:
    """Writes the tables, plots and ``report.md`` of a finished work folder; returns its
    numbers (also kept in the state as ``summary``)."""
    work, train = os.fspath(work), sets.train
    pool = np.setdiff1d(np.arange(len(train)), np.asarray(meta, np.int64))
    predicted, losses = predict_pool(model, run, train.x[pool], train.y[pool], chunk_size)
    weights = np.asarray(run.weights, np.float64)[pool]
    order, rows, agrees = _tables(work, train, pool, weights, predicted, losses)
    _plots(work, train, pool, order, rows, weights, predicted, losses, agrees)
    top = max(1, int(round(TOP_FRACTION * len(pool))))
    given = train.y[np.asarray(meta, np.int64)]
    warm = len(state["requested"][0])
    changed0 = int(np.sum(given[:warm] != np.asarray(answers)[:warm]))
    summary = {
        "unlabelled": int(len(pool)), "labelled": int(len(meta)),
        "labelled_changed": int(np.sum(given != np.asarray(answers))),
        "warmup_changed": changed0, "warmup_noise_interval": list(wilson_interval(changed0,
                                                                                  warm)),
        "disagree": int(np.sum(~agrees)), "top_count": top,
        "top_disagree": int(np.sum(~agrees[order[:top]])),
        "best_epoch": run.best_epoch, "epochs": run.num_epochs,
        "val_accuracy": run.best_val_accuracy if sets.val is not None else None,
        "meta_accuracy": None if sets.val is not None else run.best_val_accuracy,
        "test_accuracy": run.test_accuracy if sets.test is not None else None,
        "base_test_accuracy": (base_run.test_accuracy if base_run is not None
                               and sets.test is not None else None),
        "train_seconds": run.seconds,
    }
    text = report_text(state, summary, rows[:TABLE_ROWS])
    checkpoint.write_text_atomic(os.path.join(work, "report.md"), text)
    return summary


def _pct(value) -> str:
    return "not measured" if value is None else f"{100 * value:.2f} %"


def report_text(state: dict, s: dict, rows: list) -> str:
    """``report.md``: what was done, what was measured and what could not be, the plots."""
    d = state["data"]
    lo, hi = s["warmup_noise_interval"]
    val = (f"the best epoch ({s['best_epoch'] + 1} of {s['epochs']}) by accuracy on --val "
           f"{state['val']['path']} ({_pct(s['val_accuracy'])})" if state["val"] else
           f"no --val was given, so the epoch ({s['best_epoch'] + 1} of {s['epochs']}) is the "
           f"one of the highest accuracy on the {s['labelled']} labelled examples themselves "
           f"({_pct(s['meta_accuracy'])}, earliest on ties). They also steer the weights, so "
           f"this is no unbiased estimate of accuracy, and no held-out validation accuracy "
           f"could be measured; give --val for one")
    lines = [
        "# pivotal-clean report", "",
        f"Data: `{d['path']}` ({d['kind']}, {d['count']} examples, "
        f"{len(d['class_names'])} classes: {', '.join(d['class_names'][:20])}"
        f"{', ...' if len(d['class_names']) > 20 else ''}).",
        f"Method `{state['method']}`, model `{state['model']}`, seed {state['seed']}, "
        f"{state['warmup']} random warm-up examples then {state['rounds']} selection "
        f"round(s) of {', '.join(map(str, state['per_round']))}: {s['labelled']} labelled "
        f"examples in all, {s['unlabelled']} left unlabelled.", "",
        "## Measured", "",
        f"- Test accuracy (final model): {_pct(s['test_accuracy'])}"
        + ("" if state["test"] else " (no --test given)."),
        *([f"- Test accuracy of plain training on the given labels (`base`): "
           f"{_pct(s['base_test_accuracy'])}"] if s["base_test_accuracy"] is not None else []),
        f"- Model selection: {val}.",
        f"- Of the {s['labelled']} labelled examples, {s['labelled_changed']} had a given label "
        f"you changed; of the {state['warmup']} random warm-up ones {s['warmup_changed']}: an "
        f"estimated noise rate of {_pct(s['warmup_changed'] / max(1, state['warmup']))} "
        f"(95 % Wilson interval {_pct(lo)} to {_pct(hi)}; the later rounds are chosen, "
        f"not random, and say nothing about the rate).",
        f"- The final model's prediction disagrees with the given label on {s['disagree']} of "
        f"the {s['unlabelled']} unlabelled examples; on {s['top_disagree']} of the top "
        f"{s['top_count']} suspects (10 %).", "",
        "## How suspects are ranked", "",
        "`suspects.csv` lists every unlabelled example, most likely mislabelled first: "
        "those whose given label disagrees with the final model's prediction first; within "
        "each group by the learned weight, ascending (meta re-weighting pushes the weight "
        "of an example whose gradient disagrees with that of your labelled examples towards "
        "0; examples the training visited little keep part of their random initial weight, "
        "which is why disagreement comes first); equal weights (many reach the floor 1e-7) "
        "by the loss of the given label, highest first. `weights.csv` holds the same rows "
        "in the data's order.", "",
        "## Plots", "",
        "Learned weights, split by whether the given label agrees with the prediction:", "",
        "![weights by agreement](weights_by_agreement.png)", "",
        "Weight against the loss of the given label:", "", "![weight vs loss](weight_vs_loss.png)",
        "", "The top suspects:", "", "![suspects](suspects.png)", "",
        f"## Top {len(rows)} suspects", "",
        "| rank | id | weight | given | predicted | loss |", "|---:|---|---:|---|---|---:|",
        *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} |" for r in rows], "",
    ]
    return "\n".join(lines)
