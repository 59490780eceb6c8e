"""``OUT/results.jsonl``: the rows of finished runs, checked on reading, one per run.

A row is one (method, seed, config) run: a JSON object with at least ``method`` (a string),
``seed`` (an int), ``config_id`` (a string) and ``test_accuracy`` (a number in [0, 1]);
``weight_auc`` and ``weight_auc_boundary`` are numbers or null. :func:`load_rows` refuses a
file with any other line (naming the file and line), so a damaged file stops a run before it
trains, not in the middle of writing its table. Rows that repeat a (method, seed, config_id)
(two runs that shared a folder before it was locked, a line pasted twice) are dropped by
:func:`unique_rows`, keeping the first: a repeated row is the same run, never another seed.
:func:`check_out` checks, before any training, that ``OUT`` can be written at all.
"""

from __future__ import annotations

import math
import os
import sys

from experiments import checkpoint

RESULTS_NAME = "results.jsonl"
_REQUIRED = (("method", str, "a string"), ("seed", int, "an integer"),
             ("config_id", str, "a string"))
_OPTIONAL_NUMBERS = ("weight_auc", "weight_auc_boundary")


def results_path(out: str) -> str:
    return os.path.join(out, RESULTS_NAME)


def check_out(out: str) -> None:
    """``ValueError`` naming ``--out`` unless ``out`` is (or can be made) a writable folder."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--out {out!r} is not a writable directory: {err}") from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_row(row, where: str) -> None:
    """``ValueError`` naming ``where`` (``file:line``) unless ``row`` is a results row."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object (a results row), got a JSON "
                         f"{type(row).__name__}")
    for name, kind, text in _REQUIRED:
        if name not in row:
            raise ValueError(f"{where}: the row has no {name!r}")
        value = row[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: {name!r} must be {text}, got {value!r}")
    acc = row.get("test_accuracy")
    if not _number(acc) or not 0.0 <= acc <= 1.0:
        raise ValueError(f"{where}: 'test_accuracy' must be a number in [0, 1], got {acc!r}")
    for name in _OPTIONAL_NUMBERS:
        if row.get(name) is not None and not _number(row[name]):
            raise ValueError(f"{where}: {name!r} must be a number or null, got {row[name]!r}")


def load_rows(path) -> list[dict]:
    """Every row of ``path`` ([] when it does not exist), each checked by :func:`check_row`."""
    rows = []
    for number, row in checkpoint.read_jsonl(path, line_numbers=True):
        check_row(row, f"{path}:{number}")
        rows.append(row)
    return rows


def unique_rows(rows: list[dict]) -> tuple[list[dict], int]:
    """``(rows without repeats of a (method, seed, config_id), how many were dropped)``."""
    seen, kept = set(), []
    for row in rows:
        key = (row["method"], row["seed"], row["config_id"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def config_rows(out: str, cid: str) -> list[dict]:
    """The unique rows of config ``cid`` in ``OUT/results.jsonl``; says when it dropped repeats."""
    path = results_path(out)
    rows, dropped = unique_rows([r for r in load_rows(path) if r["config_id"] == cid])
    if dropped:
        print(f"note: {path}: dropped {dropped} repeated row(s) (same method, seed and "
              f"config); each run counts once", file=sys.stderr)
    return rows
