"""Section 5: time and memory against N, each size in a fresh subprocess
(:mod:`benchmarks.scaling_worker`) so that its peak resident memory is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks.config import Config, log


def worker(args: Sequence[str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scaling_worker", *args]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "command": " ".join(cmd)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def linearity(rows: list[dict], key: str = "time_s") -> float | None:
    """Slope of log(time) against log(N): 1 is linear."""
    ok = [r for r in rows if key in r and r[key] > 0]
    if len(ok) < 2:
        return None
    logn = np.log([r["n"] for r in ok])
    logt = np.log([r[key] for r in ok])
    return float(np.polyfit(logn, logt, 1)[0])


def bench_scaling(cfg: Config) -> dict:
    km_rows, gbc_rows = [], []
    for n in cfg.scale_sizes:
        km_rows.append(worker(["--what", "kmeans", "--n", str(n), "--repeats", str(cfg.scale_repeats),
                                "--iters", str(cfg.scale_km_iters), "--dim", str(cfg.scale_dim),
                                "--clusters", str(min(50, n // 4))]))
        gbc_rows.append(worker(["--what", "gbc", "--n", str(n), "--repeats", str(cfg.scale_repeats),
                                 "--chunk", str(cfg.scale_gbc_chunk)]))
        log(f"scaling N={n} done")
    return {
        "kmeans": km_rows,
        "gbc": gbc_rows,
        "kmeans_loglog_slope": linearity(km_rows, "time_per_iter_s"),
        "gbc_loglog_slope": linearity(gbc_rows),
        "memory_method": (
            "each size in a fresh subprocess; resident-set high-water mark (VmHWM, the counter behind "
            "ru_maxrss) reset via /proc/self/clear_refs right before the call; call_extra = peak "
            "during a steady-state call - resident set before it (inputs already resident, so "
            "excluded); XLA buffers are invisible to tracemalloc. A steady-state call reuses pages the "
            "allocator kept from the first call (so its extra can be below the output size); the "
            "first call's extra includes compilation, roughly constant in N"
        ),
        "gbc_model": "MLP 64-32-32-10 on synthetic inputs (GBC output is N x D, so D is kept small for N=200k)",
        "kmeans_setup": f"D={cfg.scale_dim}, M=50, tol=0, max_iters={cfg.scale_km_iters}, k-means++ seeding",
    }
