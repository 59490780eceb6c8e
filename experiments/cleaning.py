"""Clean your own data (issue 16): the person-in-the-loop workflow behind ``pivotal-clean``.

Three steps on a work folder ``DIR``, each a function here and a subcommand of
:mod:`experiments.clean`:

* :func:`start` reads the data (an image folder, .npz or .csv; :mod:`experiments.userdata`),
  records its hash and the settings in ``DIR/state.json``, draws the ``M0`` random warm-up
  examples and writes ``DIR/round-0/to_label.csv`` (and ``to_label.png`` for images).
* :func:`next_round` reads the person's labels of the latest round, trains with meta
  re-weighting on every labelled example (the pipeline's warm-up, or a later round's
  training, keeping parameter snapshots) and selects the next round's examples with the
  method (the pipeline's :func:`~experiments.selection.select`); ``R`` rounds share the
  ``B - M0`` examples after the warm-up as :func:`~experiments.pipeline.run_method` does.
* :func:`finish` reads the last round's labels, runs the final meta re-weighting and writes
  ``weights.csv``, ``suspects.csv``, ``report.md`` and its plots (:mod:`experiments.clean_report`)
  and the model under ``DIR/model`` (Orbax).

The data are a :class:`~experiments.problem.Problem` whose ``y_noisy`` are the given labels
and whose ``y_clean`` holds the person's answers for the labelled examples and
:data:`UNKNOWN` (-1) for every other one: there is no ground truth, and the phases read
``y_clean`` of the meta set only.

Keys follow :func:`~experiments.pipeline.run_method` for the same seed: the warm-up draw
``fold_in(key, 1)``, the warm-up training ``fold_in(key, 2)``, later trainings
``fold_in(key, 3)``, round ``r``'s selection ``fold_in(fold_in(key, 4), r)``: the same
draws as the simulated cleaning of the pipeline (whose arrays differ: user data are
standardised on their own statistics). Each step checks everything
(the data's hash, the labels file, the round) before it trains or writes, under a
:class:`~experiments.lock.FolderLock`; ``state.json`` is replaced atomically last, so a
killed step leaves the previous state and its rerun resumes the training from its Orbax
checkpoints (kept under a hash of the labels) to the same selection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
from typing import Optional

import jax
import numpy as np
from tqdm.auto import tqdm

import pivotal
from experiments import checkpoint, labelfiles
from experiments.config import ExperimentConfig
from experiments.lock import FolderLock
from experiments.problem import Problem
from experiments.selection import SELECTORS, select
from experiments.training import Model, TrainOutcome, build_model, train_meta
from experiments.userdata import UserData, data_hash, parse_image_size, read_user_data

__all__ = ["CleaningError", "METHODS", "MODEL_CHOICES", "STATE_NAME", "UNKNOWN", "Sets",
           "finish", "load_model", "load_state", "next_round", "start", "user_problem"]

STATE_NAME = "state.json"
STATE_FORMAT = 1
UNKNOWN = -1  # y_clean of an example nobody labelled
# Methods that select examples to label; base cleans nothing and finetune learns no weights.
METHODS = tuple(m for m in SELECTORS if m != "finetune")
MODEL_CHOICES = ("auto", "mlp", "lenet5", "resnet34")
LENET_SIDE = 28  # --model auto: grey images are resized to at least this (LeNet-5's input)
# What start may find in DIR from a start killed before it wrote state.json.
_START_LEFTOVERS = frozenset({"round-0", ".lock", ".lock.guard"})


class CleaningError(ValueError):
    """A refused step: one line naming the flag, file or round; the work folder unchanged."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True)
class Sets:
    """The data of a work folder: training data, and the trusted validation / test sets."""

    train: UserData
    val: Optional[UserData]
    test: Optional[UserData]


# ----------------------------------------------------------------------------- state


def _state_path(work) -> str:
    return os.path.join(os.fspath(work), STATE_NAME)


def load_state(work) -> dict:
    """The work folder's state (``DIR/state.json``); :class:`CleaningError` if there is none."""
    path = _state_path(work)
    if not os.path.isfile(path):
        raise CleaningError(f"--work {os.fspath(work)!r} holds no pivotal-clean state "
                            f"({STATE_NAME}); run 'pivotal-clean start' first")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as err:
        raise CleaningError(f"{path}: cannot read the state: {err}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CleaningError(f"{path}: not a pivotal-clean state of format {STATE_FORMAT}")
    return state


def _save_state(work, state: dict) -> None:
    checkpoint.write_text_atomic(_state_path(work), json.dumps(state, indent=1) + "\n")


@contextlib.contextmanager
def _locked(work):
    with FolderLock(os.fspath(work), flag="--work"):
        yield


def _config(state: dict) -> ExperimentConfig:
    """The pipeline's config of a work folder (label noise: label-free features)."""
    t = state["training"]
    cfg = ExperimentConfig(dataset="user", noise="uniform", rate=0.0, model=state["model"],
                           budget=state["budget"], warmup=state["warmup"],
                           rounds=state["rounds"], warmup_epochs=t["epochs"],
                           epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"])
    return cfg


def _per_round(budget: int, warmup: int, rounds: int) -> list:
    extra = budget - warmup  # split as run_method splits it
    return [extra // rounds + (r < extra % rounds) for r in range(rounds)]


# ----------------------------------------------------------------------------- data


def _spatial(x: np.ndarray) -> Optional[tuple]:
    """(H, W, C) of image-like examples (channels 1 or 3), else None."""
    return tuple(x.shape[1:]) if x.ndim == 4 and x.shape[-1] in (1, 3) else None


def _resolve_model(model: str, data: UserData) -> str:
    if model != "auto":
        return model
    image = _spatial(data.x)
    if image is None:
        return "mlp"
    return "lenet5" if image[2] == 1 else "resnet34"


def _input_size(model: str, data: UserData, image_size) -> Optional[list]:
    """The (H, W) every image is brought to, or None (feature vectors, as read)."""
    image = _spatial(data.x)
    if image is None:
        return None
    if image_size is not None:
        return [int(v) for v in image_size]
    h, w = image[:2]
    if model == "lenet5":
        h, w = max(h, LENET_SIDE), max(w, LENET_SIDE)
    return [h, w]


def _resize(data: Optional[UserData], size) -> Optional[UserData]:
    """``data`` with its images resized to ``size`` (arrays from an .npz; folders are read
    at that size). Bilinear resizing is linear, so it commutes with the standardisation."""
    if data is None or size is None or tuple(data.x.shape[1:3]) == tuple(size):
        return data
    out = np.empty((len(data.x), *size, data.x.shape[-1]), np.float32)
    for s in range(0, len(out), 512):
        block = data.x[s:s + 512]
        out[s:s + 512] = np.asarray(jax.image.resize(
            block, (len(block), *size, block.shape[-1]), "bilinear"))
    return dataclasses.replace(data, x=out)


def _read(path: str, label_column, image_size, like=None) -> UserData:
    size = None if image_size is None else tuple(image_size)
    return read_user_data(path, label_column=label_column, image_size=size, like=like)


def _read_sets(state: dict) -> Sets:
    """Reads the training, validation and test data again, refusing any that changed."""
    d = state["data"]
    for role in ("data", "val", "test"):
        entry = state[role]
        if entry is not None and data_hash(entry["path"]) != entry["hash"]:
            raise CleaningError(f"--{role} {entry['path']}: changed since 'pivotal-clean start' "
                                f"(its hash differs); restore it or start a new --work folder")
    train = _read(d["path"], d["label_column"], d["read_size"])
    if len(train) != d["count"]:
        raise CleaningError(f"--data {d['path']}: its examples differ from those at start")
    sets = [_read(state[r]["path"], d["label_column"], None, like=train)
            if state[r] is not None else None for r in ("val", "test")]
    size = state["input_size"]
    return Sets(_resize(train, size), _resize(sets[0], size), _resize(sets[1], size))


def user_problem(sets: Sets, meta: np.ndarray, answers: np.ndarray) -> Problem:
    """The pipeline's :class:`Problem` of a user's data.

    ``y_noisy``: the given labels; ``y_clean``: the person's ``answers`` at ``meta``,
    :data:`UNKNOWN` elsewhere. Validation (model selection, the best epoch ``t*``) is the
    ``--val`` set, else the labelled examples themselves; test is ``--test``, else the
    validation set (the report then says test accuracy was not measured).
    """
    train = sets.train
    meta, answers = np.asarray(meta, np.int64), np.asarray(answers, np.int32)
    y_clean = np.full(len(train), UNKNOWN, np.int32)
    y_clean[meta] = answers
    y_clean.setflags(write=False)
    val = (sets.val.x, sets.val.y) if sets.val is not None else (train.x[meta], answers)
    test = (sets.test.x, sets.test.y) if sets.test is not None else val
    return Problem("user", train.x, train.y, y_clean, val[0], np.asarray(val[1], np.int32),
                   test[0], np.asarray(test[1], np.int32), train.num_classes,
                   tuple(train.x.shape[1:]), math.nan)


# ----------------------------------------------------------------------------- start


def _check_start(work: str, budget, warmup, rounds, method, model, seed) -> None:
    for name, value, low in (("--budget", budget, 2), ("--warmup", warmup, 1),
                             ("--rounds", rounds, 1), ("--seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise CleaningError(f"{name} must be an integer >= {low}, got {value!r}")
    if warmup >= budget:
        raise CleaningError(f"--warmup {warmup} must be smaller than --budget {budget} so that "
                            f"examples are left to select")
    if rounds > budget - warmup:
        raise CleaningError(f"--rounds {rounds} must be at most --budget - --warmup = "
                            f"{budget - warmup} (each round selects one example or more)")
    if method not in METHODS:
        raise CleaningError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if model not in MODEL_CHOICES:
        raise CleaningError(f"--model must be one of {', '.join(MODEL_CHOICES)}; got {model!r}")
    if os.path.isfile(_state_path(work)):
        raise CleaningError(f"--work {work!r} already holds a pivotal-clean state; continue it "
                            f"with 'pivotal-clean next' / 'finish' or choose another --work")
    if os.path.exists(work) and (not os.path.isdir(work)
                                 or set(os.listdir(work)) - _START_LEFTOVERS):
        raise CleaningError(f"--work {work!r} exists and is not empty; give a new or empty "
                            f"folder")


def _check_training(epochs, lr, batch_size) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise CleaningError(f"--epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise CleaningError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise CleaningError(f"--lr must be a positive finite number, got {lr!r}")


def _entry(data: Optional[UserData]) -> Optional[dict]:
    return None if data is None else {"path": os.path.abspath(data.source),
                                      "hash": data.content_hash, "count": len(data)}


def start(data, work, *, budget: int, warmup: int, val=None, test=None, method: str = "rbc",
          model: str = "auto", rounds: int = 1, seed: int = 0, label_column: str | None = None,
          image_size=None, epochs: int = 20, lr: float = 0.1, batch_size: int = 256) -> dict:
    """Starts a work folder: checks everything, draws the warm-up, writes round 0's files.

    Returns the state (as saved in ``DIR/state.json``). Refusals (:class:`CleaningError`,
    :class:`~experiments.userdata.UserDataError`) come before anything is written.
    """
    work = os.fspath(work)
    _check_start(work, budget, warmup, rounds, method, model, seed)
    _check_training(epochs, lr, batch_size)
    size = None if image_size is None else _parse_size(image_size)
    train = _read(os.fspath(data), label_column, size)
    if budget >= len(train):
        raise CleaningError(f"--budget {budget} must be smaller than the {len(train)} examples "
                            f"of --data {train.source}")
    resolved = _resolve_model(model, train)
    input_size = _input_size(resolved, train, size)
    read_size = input_size if train.kind == "images" else None
    if read_size is not None and list(train.x.shape[1:3]) != read_size:
        train = _read(os.fspath(data), label_column, read_size)
    sets = Sets(train, *(None if p is None else _read(os.fspath(p), label_column, None,
                                                      like=train) for p in (val, test)))
    sets = Sets(*(_resize(s, input_size) for s in (sets.train, sets.val, sets.test)))
    _check_model(resolved, sets.train)
    key = jax.random.PRNGKey(seed)
    meta0 = np.asarray(pivotal.random_selection(len(train), warmup, jax.random.fold_in(key, 1)))
    state = {
        "format": STATE_FORMAT,
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "data": {**_entry(train), "kind": train.kind, "label_column": label_column,
                 "read_size": read_size, "class_names": list(train.class_names)},
        "val": _entry(sets.val), "test": _entry(sets.test),
        "method": method, "model": resolved, "model_flag": model, "input_size": input_size,
        "seed": int(seed), "budget": int(budget), "warmup": int(warmup), "rounds": int(rounds),
        "per_round": _per_round(budget, warmup, rounds),
        "training": {"epochs": int(epochs), "lr": float(lr), "batch_size": int(batch_size)},
        "requested": [[int(i) for i in meta0]], "labels": [], "history": [],
        "finished": False,
    }
    with _locked(work):
        _check_start(work, budget, warmup, rounds, method, model, seed)  # raced by another?
        _write_round(work, 0, sets.train, meta0)
        _save_state(work, state)
    return state


def _parse_size(image_size) -> tuple:
    if isinstance(image_size, str):
        return parse_image_size(image_size)
    size = tuple(int(v) for v in image_size)
    if len(size) != 2 or min(size) < 1:
        raise CleaningError(f"--image-size must be HxW with positive integers, got {image_size}")
    return size


def _check_model(name: str, train: UserData) -> None:
    try:
        build_model(ExperimentConfig(model=name), _shape_only(train))
    except ValueError as err:
        raise CleaningError(f"--model {name} does not fit --data {train.source} (examples of "
                            f"shape {tuple(train.x.shape[1:])}): {err}; give --image-size "
                            f"or another --model") from None


def _shape_only(train: UserData) -> Problem:
    empty = np.zeros((0,), np.int32)
    return Problem("user", train.x[:0], empty, empty, train.x[:0], empty, train.x[:0], empty,
                   train.num_classes, tuple(train.x.shape[1:]), math.nan)


def _write_round(work: str, r: int, train: UserData, indices, predicted=None) -> None:
    """``round-r/to_label.csv``, and for images its contact sheet ``to_label.png``."""
    folder = os.path.join(work, f"round-{r}")
    labelfiles.write_to_label(os.path.join(folder, "to_label.csv"), train, indices,
                              predicted=predicted)
    if _spatial(train.x) is not None:
        labelfiles.write_contact_sheet(os.path.join(folder, "to_label.png"), train, indices)


# ----------------------------------------------------------------------------- next / finish


def _answers(state: dict, sets: Sets, labels_path, r: int) -> tuple:
    """(meta indices, answers) of rounds 0..r, round r's read from ``labels_path``."""
    requested = np.asarray(state["requested"][r], np.int64)
    answers = labelfiles.read_labels(os.fspath(labels_path), sets.train, requested)
    meta = np.concatenate([np.asarray(q, np.int64) for q in state["requested"][:r + 1]])
    given = [np.asarray(a, np.int32) for a in state["labels"][:r]] + [answers]
    return meta, np.concatenate(given), answers


def _labels_key(meta: np.ndarray, answers: np.ndarray) -> str:
    blob = json.dumps([meta.tolist(), answers.tolist()]).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _train(state: dict, problem: Problem, model: Model, meta, answers, work: str, r: int,
           *, final: bool) -> TrainOutcome:
    """The training after round ``r``'s labels: the warm-up (``r == 0``) or a later round."""
    cfg = _config(state)
    key = jax.random.PRNGKey(state["seed"])
    k_train = jax.random.fold_in(key, 2 if r == 0 else 3)
    name = ("final" if final else f"round-{r}") + "-" + _labels_key(meta, answers)
    epochs = cfg.warmup_epochs if r == 0 else cfg.epochs
    desc = "warm-up" if r == 0 else ("final" if final else f"round {r}")
    return train_meta(problem, model, cfg, k_train, meta_indices=meta, epochs=epochs,
                      ckpt_dir=os.path.join(work, "train", name), keep_snapshots=not final,
                      desc=desc)


def _begin(work, labels, *, final: bool) -> tuple:
    """Checks of next/finish done before training: (state, sets, r, meta, answers, round's)."""
    work = os.fspath(work)
    state = load_state(work)
    if state["finished"]:
        raise CleaningError(f"--work {work!r} is finished already (report.md, weights.csv, "
                            f"suspects.csv are there); start a new --work folder")
    r = len(state["labels"])  # the round whose labels come now
    if not final and r >= state["rounds"]:
        raise CleaningError(f"next: the budget is spent (round-{r} was the last of "
                            f"--rounds {state['rounds']}); run 'pivotal-clean finish --work "
                            f"{work} --labels FILE' with round-{r}'s labels")
    if final and r < state["rounds"]:
        raise CleaningError(f"finish: round-{r} is not the last round ({state['rounds']} "
                            f"selection rounds); run 'pivotal-clean next --work {work} "
                            f"--labels FILE' with round-{r}'s labels first")
    if labels is None or not os.path.isfile(os.fspath(labels)):
        raise CleaningError(f"--labels {labels}: no such file (round-{r}/to_label.csv with its "
                            f"'label' column filled in)")
    sets = _read_sets(state)
    meta, answers, current = _answers(state, sets, labels, r)
    return state, sets, r, meta, answers, current


def _record(state: dict, r: int, current, run: TrainOutcome, extra: dict) -> None:
    state["labels"].append([int(k) for k in current])
    state["history"].append({"round": r, "best_epoch": run.best_epoch,
                             "val_accuracy": run.best_val_accuracy,
                             "labelled": sum(len(q) for q in state["requested"][:r + 1]),
                             "train_seconds": round(run.seconds, 2), **extra})


def next_round(work, labels) -> dict:
    """Reads round ``r``'s labels, trains, selects round ``r + 1``; returns the new state.

    Refused (nothing changed) when the data changed, the labels file is bad, or the
    budget is spent (then :func:`finish`).
    """
    work = os.fspath(work)
    load_state(work)  # refuse before the lock would create the folder
    with _locked(work):
        state, sets, r, meta, answers, current = _begin(work, labels, final=False)
        problem = user_problem(sets, meta, answers)
        model = build_model(_config(state), problem)
        run = _train(state, problem, model, meta, answers, work, r, final=False)
        k_sel = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(state["seed"]), 4), r)
        info: dict = {}
        with tqdm(total=1, desc=f"select ({state['method']})", leave=False, disable=None) as bar:
            new = np.asarray(select(state["method"], problem, model, run, meta,
                                    state["per_round"][r], _config(state), k_sel, info),
                             np.int64)
            bar.update()
        predicted = _predict(model, run, sets.train.x[new], 512)
        _write_answers(work, r, sets.train, state["requested"][r], current)
        _write_round(work, r + 1, sets.train, new, predicted=predicted)
        _record(state, r, current, run, {k: v for k, v in info.items()
                                         if isinstance(v, (int, float, list))})
        state["requested"].append([int(i) for i in new])
        _save_state(work, state)
    return state


def _write_answers(work: str, r: int, train: UserData, requested, answers) -> None:
    """A copy of the person's answers of round ``r``, as ``round-r/labels.csv``."""
    labelfiles.write_table(os.path.join(work, f"round-{r}", "labels.csv"), ["id", "label"],
                           [(train.ids[i], train.class_names[int(k)])
                            for i, k in zip(requested, answers)])


def _predict(model: Model, run: TrainOutcome, x, chunk_size: int) -> np.ndarray:
    from experiments import models

    logits = models.apply_in_chunks(
        lambda xb: model.predict(run.best_params, run.best_model_state, xb), x, chunk_size)
    return np.argmax(logits, -1)


def finish(work, labels, *, base: bool = False) -> dict:
    """Reads the last round's labels, trains the final model, writes the outputs.

    ``base``: also train plainly on the given labels (the pipeline's ``base``) and report
    its test accuracy beside the meta re-weighted model's. Returns the report's numbers.
    """
    from experiments import clean_report

    work = os.fspath(work)
    load_state(work)
    with _locked(work):
        state, sets, r, meta, answers, current = _begin(work, labels, final=True)
        cfg = _config(state)
        problem = user_problem(sets, meta, answers)
        model = build_model(cfg, problem)
        run = _train(state, problem, model, meta, answers, work, r, final=True)
        base_run = None
        if base:
            base_run = train_meta(problem, model, cfg,
                                  jax.random.fold_in(jax.random.PRNGKey(state["seed"]), 3),
                                  meta_indices=None, epochs=cfg.epochs,
                                  ckpt_dir=os.path.join(work, "train", "base"), desc="base")
        _write_answers(work, r, sets.train, state["requested"][r], current)
        summary = clean_report.write_outputs(work, state, sets, problem, model, run, meta,
                                             answers, base_run=base_run,
                                             chunk_size=cfg.chunk_size)
        _save_model(work, state, sets.train, run)
        _record(state, r, current, run, {})
        state.update(finished=True, summary=summary)
        _save_state(work, state)
    return summary


# ----------------------------------------------------------------------------- the model


def _save_model(work: str, state: dict, train: UserData, run: TrainOutcome) -> None:
    """The final model under ``DIR/model`` (Orbax), with what is needed to use it."""
    target, tmp = os.path.join(work, "model"), os.path.join(work, ".model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {"model": state["model"], "num_classes": train.num_classes,
            "input_shape": list(train.x.shape[1:]), "class_names": list(train.class_names),
            "mean": np.asarray(train.mean).tolist(), "std": np.asarray(train.std).tolist(),
            "best_epoch": run.best_epoch}
    checkpoint.save(tmp, 0, {"params": run.best_params, "model_state": run.best_model_state},
                    meta)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def load_model(work) -> tuple:
    """``(predict, metadata)`` of a finished work folder's model.

    ``predict(x)`` takes standardised examples (``(x_raw - mean) / std`` as in
    ``metadata``) and returns logits; ``metadata`` holds ``class_names`` and the rest.
    """
    from experiments import models

    folder = os.path.join(os.fspath(work), "model")
    if not os.path.isdir(folder):
        raise CleaningError(f"{folder}: no model; run 'pivotal-clean finish' first")
    with checkpoint.Checkpointer(folder, read_only=True) as ckpt:
        meta = ckpt.metadata()
    module, has_state = models.make_model(meta["model"], meta["num_classes"],
                                          meta["input_shape"])
    like = models.init_model(module, jax.random.PRNGKey(0), meta["input_shape"])
    tree, _ = checkpoint.restore(folder, {"params": like[0], "model_state": like[1]})
    params, model_state = tree["params"], tree["model_state"]
    predict = models.predict_fn(module, has_state)
    return (lambda x: np.asarray(predict(params, model_state, x))), meta
