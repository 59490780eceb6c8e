"""Benchmarks of ``pivotal`` against its peers.

    python -m benchmarks.run [--quick | --tiny] --out DIR [--only SECTION ...]

writes ``DIR/results.json`` (a flat dict of headline ratios plus nested details) and
``DIR/table.md`` (Markdown), and prints the table. ``--quick`` takes a few minutes on 2 CPU cores,
the full run under half an hour; ``--tiny`` only checks that everything runs (used by the tests).

Every timing is the median of repeated calls after a first call (tracing + compilation), wrapped
in ``jax.block_until_ready``; compile time is reported separately as the first call's excess over
the median. Functions that are compared are timed in interleaved rounds (a, b, a, b, ...), so that
load from other processes on a shared machine hits both alike: the ratios are what count.
Sections: :mod:`benchmarks.meta_step`, :mod:`benchmarks.features`, :mod:`benchmarks.kmeans`,
:mod:`benchmarks.scaling`, :mod:`benchmarks.throughput`; sizes and targets in
:mod:`benchmarks.config`, the table in :mod:`benchmarks.table`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from benchmarks.common import mnist5k
from benchmarks.config import CONFIGS, TARGETS, Config
from benchmarks.features import bench_features
from benchmarks.kmeans import bench_kmeans
from benchmarks.meta_step import bench_meta_step
from benchmarks.scaling import bench_scaling
from benchmarks.table import render_table, status
from benchmarks.throughput import bench_throughput


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


SECTIONS = ("meta_step", "features", "kmeans", "scaling", "throughput")


def headlines(details: dict) -> dict:
    """The flat headline ratios (``TARGETS``' names) of the sections that ran."""
    meta = details.get("meta_step", {})
    model = "lenet5" if "lenet5" in meta else next(iter(meta), None)
    feats, km, thr = (details.get(k) for k in ("features", "kmeans", "throughput"))
    return {
        "meta_step_ratio": meta[model]["ratio"] if model else None,
        "first_order_meta_step_ratio": meta[model]["first_order_ratio"] if model else None,
        "meta_step_ratio_model": model,
        "meta_step_ratio_by_model": {k: v["ratio"] for k, v in meta.items()},
        "gbc_over_rbc": feats["ratio"] if feats else None,
        "gbc_vs_loop_speedup": feats["loop"]["speedup_gbc"] if feats else None,
        "per_example_vs_batched": thr["versus_batched"]["ratio"] if thr else None,
        "kmeans_over_faiss": km["ratio_faiss"] if km else None,
        "kmeans_over_sklearn": km["ratio_sklearn"] if km else None,
    }


def cpu_model() -> str:
    """The CPU's model name, family/model and whether it has AVX-512: XLA:CPU's kernels, and
    so both timings and float rounding, differ between hosts that all say "2 CPUs"."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    fields = {}
    for line in info.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    avx512 = "avx512f" in fields.get("flags", "").split()
    return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model "
            f"{fields.get('model', '?')}, {'AVX-512' if avx512 else 'no AVX-512'})")


def run(cfg: Config, out_dir: str | os.PathLike, *, command: str = "", sections: Sequence[str] = SECTIONS) -> dict:
    """Runs the selected sections, writes ``results.json`` and ``table.md`` to ``out_dir``."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    details: dict[str, Any] = {}
    ds = mnist5k() if {"meta_step", "features", "throughput"} & set(sections) else None
    if "meta_step" in sections:
        details["meta_step"] = bench_meta_step(cfg, ds)
    if "features" in sections:
        details["features"] = bench_features(cfg, ds)
    if "kmeans" in sections:
        details["kmeans"] = bench_kmeans(cfg)
    if "scaling" in sections:
        details["scaling"] = bench_scaling(cfg)
    if "throughput" in sections:
        details["throughput"] = bench_throughput(cfg, ds)

    results = {
        **headlines(details),
        "targets": {k: f"{op} {t:g}" for k, (op, t) in TARGETS.items()},
        "mode": cfg.mode,
        "config": dataclasses.asdict(cfg),
        "command": command,
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax_version": jax.__version__,
            "jax_backend": jax.default_backend(),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "details": details,
    }
    results["status"] = {k: status(k, results.get(k)) for k in TARGETS}
    results["wall_s"] = time.perf_counter() - start
    results = _to_jsonable(results)
    table = render_table(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "table.md").write_text(table)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes, a few minutes on 2 cores")
    size.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds; used by the tests)")
    parser.add_argument("--out", required=True, help="output folder for results.json and table.md")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m benchmarks.run", *argv_list])
    run(CONFIGS[mode], args.out, command=command, sections=args.only)
    print((Path(args.out) / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
