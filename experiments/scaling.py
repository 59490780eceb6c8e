"""Scaling in N: ``python3 -m experiments.scaling --sizes 5000,15000,30000,60000 --methods rbc,gbc
--out results/scaling``.

Runs the main job (``--preset``, default ``fashion``: Fashion-MNIST, LeNet-5, 60 % adversarial
noise) once per training-set size N, each in a process of its own
(``python -m experiments.run --train-size N --seeds 1 --out OUT/nN ...``), so that each peak
belongs to one size. While a size runs, the resident memory of the child's process tree is
sampled from outside (:class:`experiments.resources.TreeSampler`); the phases inside it
(warm-up training, features, K-means, final training) come from its rows' ``phase_seconds``
and ``phase_peak_rss_gb``.

Writes ``OUT/scaling.json`` (every number), ``OUT/scaling.md`` (a table: size, method, phase,
seconds, peak GB, and per phase the fitted exponent b of ``seconds ~ N^b``: 1 is linear) and
``OUT/scaling.png`` (log-log). Flags it does not know go to ``experiments.run`` unchanged
(``--data-dir``, ``--epochs``, ``--feature-memory-gb``, ...). A size whose folder holds a
finished measurement (``OUT/nN/scaling-run.json``) is not run again; a size that fails stops
the runner (exit 1, or 2 when the child refused its input) after writing what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np

from experiments import checkpoint, resources, results
from experiments.config import METHODS
from experiments.presets import get_preset

# Phase keys of the rows, in pipeline order, and how the table names them.
PHASES = (("warmup", "warm-up training"), ("features", "features"), ("kmeans", "K-means"),
          ("selection", "selection (all)"), ("final_training", "final training"))
RUN_FILE = "scaling-run.json"


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(prog="python -m experiments.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="5000,15000,30000,60000",
                   help="comma-separated training-set sizes (--train-size of each run)")
    p.add_argument("--methods", default="rbc,gbc", help="comma-separated methods")
    p.add_argument("--preset", default="fashion", help="the experiments.run preset")
    p.add_argument("--interval", type=float, default=resources.DEFAULT_INTERVAL,
                   help="seconds between RSS samples of the child's process tree")
    p.add_argument("--out", default="results/scaling", help="output directory")
    return p.parse_known_args(argv)


def _sizes(text: str) -> tuple:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--sizes must name positive integers, got {text!r}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"--sizes names a size more than once: {text!r}")
    return tuple(sorted(sizes))


def _methods(text: str) -> tuple:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise ValueError(f"--methods must name distinct methods of {list(METHODS)}, got "
                         f"{text!r}")
    return methods


def size_dir(out: str, size: int) -> str:
    return os.path.join(out, f"n{size}")


def child_command(size: int, methods: Sequence[str], preset: str, out: str,
                  extra: Sequence[str]) -> list:
    """The ``experiments.run`` command line of one size."""
    return [sys.executable, "-m", "experiments.run", "--preset", preset, "--train-size",
            str(size), "--methods", ",".join(methods), "--seeds", "1", "--out",
            size_dir(out, size), *extra]


def _rows(folder: str, size: int, methods: Sequence[str]) -> list:
    """The rows of one size's run, reduced to what the report needs."""
    kept = []
    for row in results.load_rows(results.results_path(folder)):
        if row.get("config", {}).get("train_size") == size and row["method"] in methods:
            kept.append({k: row.get(k) for k in ("method", "test_accuracy", "phase_seconds",
                                                 "phase_peak_rss_gb", "feature_mode",
                                                 "wall_seconds")})
    return kept


def measure(size: int, methods: Sequence[str], preset: str, out: str, extra: Sequence[str],
            interval: float) -> dict:
    """Runs one size in a child process (or reuses its finished measurement)."""
    folder = size_dir(out, size)
    done = os.path.join(folder, RUN_FILE)
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    command = child_command(size, methods, preset, out, extra)
    print(f"== N = {size}: {' '.join(command[1:])}", flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with open(os.path.join(folder, "stderr.log"), "w") as err:
        child = subprocess.Popen(command, stderr=err, env=dict(os.environ,
                                                               PYTHONUNBUFFERED="1"))
        with resources.TreeSampler(child.pid, interval=interval) as sampler:
            code = child.wait()
    record = {"size": size, "exit_code": code, "wall_seconds": time.perf_counter() - t0,
              "peak_rss_gb": None if sampler.peak is None else sampler.peak / resources.GB,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "cpu_count": os.cpu_count(), "interval": interval, "command": command[1:],
              "rows": _rows(folder, size, methods) if code == 0 else []}
    if code == 0:
        checkpoint.write_text_atomic(done, json.dumps(record, indent=1))
    return record


def table_rows(records: Sequence[dict]) -> list:
    """``(label, size, seconds, peak GB)`` per phase and size; the warm-up once per size."""
    out = []
    for rec in records:
        out.append(("whole run (outside)", rec["size"], rec["wall_seconds"], rec["peak_rss_gb"]))
        warm_done = False
        for row in rec["rows"]:
            seconds, peaks = row.get("phase_seconds") or {}, row.get("phase_peak_rss_gb") or {}
            for key, name in PHASES:
                if key not in seconds or (key == "warmup" and warm_done):
                    continue
                label = name if key == "warmup" else f"{row['method']} {name}"
                warm_done = warm_done or key == "warmup"
                out.append((label, rec["size"], seconds[key], peaks.get(key)))
    return out


def exponent(points: Sequence[tuple]) -> Optional[float]:
    """Slope b of the least-squares line ``log y = a + b log N`` (None with < 2 points)."""
    pts = [(n, y) for n, y in points if y is not None and y > 0]
    if len({n for n, _ in pts}) < 2:
        return None
    n, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(n, y, 1)[0])


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(records: Sequence[dict], title: str) -> str:
    """``scaling.md``: the table by phase then size, then the fitted exponents."""
    rows = table_rows(records)
    labels = list(dict.fromkeys(r[0] for r in rows))
    lines = [f"# {title}", "", "| phase | N | seconds | peak RSS (GB) |", "|---|---:|---:|---:|"]
    for label in labels:
        for _, size, sec, gb in (r for r in rows if r[0] == label):
            lines.append(f"| {label} | {size} | {sec:.1f} | {_fmt(gb, '.2f')} |")
    lines += ["", "Fitted exponent b of value ~ N^b (1 = linear in N):", "",
              "| phase | b (seconds) | b (peak RSS) |", "|---|---:|---:|"]
    for label in labels:
        mine = [r for r in rows if r[0] == label]
        b_sec = exponent([(r[1], r[2]) for r in mine])
        b_gb = exponent([(r[1], r[3]) for r in mine])
        lines.append(f"| {label} | {_fmt(b_sec, '.2f')} | {_fmt(b_gb, '.2f')} |")
    loads = [rec["load_average_before"][0] for rec in records]
    lines += ["", f"{records[0]['cpu_count']} CPUs; 1-minute load average when each size "
                  f"started: {', '.join(f'{x:.1f}' for x in loads)}. Peaks are the largest "
                  f"RSS sample of the process tree (every {records[0]['interval']:g} s; "
                  f"the phases' from inside the run, every {resources.DEFAULT_INTERVAL:g} s)."]
    return "\n".join(lines) + "\n"


def write_report(records: Sequence[dict], out: str, title: str) -> None:
    from experiments import plots  # deferred: matplotlib and the whole pipeline

    checkpoint.write_text_atomic(os.path.join(out, "scaling.json"),
                                 json.dumps(list(records), indent=1))
    checkpoint.write_text_atomic(os.path.join(out, "scaling.md"), report(records, title))
    series: dict = {}
    for label, size, sec, gb in table_rows(records):
        if "selection (all)" not in label:  # features + K-means already show it
            series.setdefault(label, []).append((size, sec, gb))
    plots.plot_scaling(series, os.path.join(out, "scaling.png"), title=title)
    print(f"wrote {os.path.join(out, 'scaling.md')} and scaling.png", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, extra = parse_args(argv)
    try:
        sizes, methods = _sizes(args.sizes), _methods(args.methods)
        get_preset(args.preset)
        if not args.interval > 0:
            raise ValueError(f"--interval must be > 0 seconds, got {args.interval}")
        bad = [a for a in extra if a.split("=")[0] in ("--train-size", "--seeds", "--out",
                                                       "--methods", "--preset")]
        if bad:
            raise ValueError(f"{bad[0]} is set by the runner (use --sizes, --methods, "
                             f"--preset, --out)")
        results.check_out(args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    title = f"{args.preset}: {','.join(methods)} by training-set size"
    records, failed = [], None
    for size in sizes:
        rec = measure(size, methods, args.preset, args.out, extra, args.interval)
        if rec["exit_code"] != 0:
            failed = rec
            break
        records.append(rec)
    if records:
        write_report(records, args.out, title)
    if failed is not None:
        log = os.path.join(size_dir(args.out, failed["size"]), "stderr.log")
        with open(log) as f:
            last = ([line.strip() for line in f if line.strip()] or ["(no message)"])[-1]
        print(f"error: N = {failed['size']}: experiments.run exited with code "
              f"{failed['exit_code']}: {last} (log: {log})", file=sys.stderr)
        return 2 if failed["exit_code"] == 2 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
