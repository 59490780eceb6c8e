"""Several processes (hosts) in one run: command-line flags and ``jax.distributed.initialize``.

Every process of a multi-process run starts the same command with its own ``--process-id``;
process 0 also serves as the coordinator at ``--coordinator HOST:PORT`` (an address the others
can reach, a free port on process 0's host). After :func:`initialize_from_args`, ``jax.devices()``
lists every process's devices, so ``pivotal.data_mesh()`` spans them all and the example-sharded
library functions run over all of them (see ``docs/SCALING.md``).

Use it in a command line in two calls::

    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    args = parser.parse_args()
    distributed.initialize_from_args(args)   # first, before anything else touches JAX

Without any of the flags (and without the environment variables below) nothing happens: the run
is a single process, as before. ``--coordinator auto`` leaves everything to JAX's cluster
auto-detection (SLURM, Open MPI, Cloud TPU, ...). On CPU, JAX 0.10 runs the cross-process
collectives over gloo (``jax_cpu_collectives_implementation``, its default).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import jax

__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "add_arguments", "describe",
           "initialize_from_args", "main", "parse_coordinator", "run_group", "selection_demo"]

# The coordinator variable is JAX's own (jax.distributed.initialize reads it too); the other two
# follow its naming.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
AUTO = "auto"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--coordinator``, ``--num-processes``, ``--process-id`` and ``--init-timeout``.

    Defaults come from the environment variables ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (none: single process). Values are checked by
    :func:`initialize_from_args`, so flags and variables get the same errors. Returns ``parser``.
    """
    group = parser.add_argument_group("multi-process (several hosts)")
    group.add_argument("--coordinator", metavar="HOST:PORT", default=os.environ.get(ENV_COORDINATOR),
                       help="address of process 0, reachable by every process, e.g. 10.0.0.1:1234 "
                            f"('auto': detect the cluster; default ${ENV_COORDINATOR})")
    group.add_argument("--num-processes", metavar="N", default=os.environ.get(ENV_NUM_PROCESSES),
                       help=f"number of processes in the run (default ${ENV_NUM_PROCESSES})")
    group.add_argument("--process-id", metavar="I", default=os.environ.get(ENV_PROCESS_ID),
                       help=f"this process's index in [0, N) (default ${ENV_PROCESS_ID})")
    group.add_argument("--init-timeout", metavar="SECONDS", type=int, default=300,
                       help="how long to wait for every process to join (default 300)")
    return parser


def parse_coordinator(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``"HOST:PORT"`` (IPv6 as ``"[::1]:1234"``); ``ValueError`` otherwise."""
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"--coordinator must look like HOST:PORT, e.g. 10.0.0.1:1234, got {address!r}")
    host, _, port = address.rpartition(":")
    if not host or host == "[]" or host.startswith("[") != host.endswith("]"):
        raise ValueError(f"--coordinator must name a host before ':PORT', got {address!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--coordinator port must be an integer in [1, 65535], got {port!r} in {address!r}")
    return host, int(port)


def _as_count(value, flag: str, low: int) -> int:
    text = str(value).strip()
    if not text.lstrip("-").isdigit() or int(text) < low:
        raise ValueError(f"{flag} must be an integer >= {low}, got {value!r}")
    return int(text)


def initialize_from_args(args: argparse.Namespace) -> bool:
    """Calls ``jax.distributed.initialize`` when the flags ask for several processes.

    * none of ``--coordinator``, ``--num-processes``, ``--process-id`` set: does nothing and
      returns False (a single-process run);
    * ``--coordinator auto``: ``jax.distributed.initialize()`` with JAX's cluster auto-detection
      (``--num-processes``/``--process-id``, when given, override what it detects);
    * otherwise all three are required: ``jax.distributed.initialize(coordinator_address=HOST:PORT,
      num_processes=N, process_id=I)``.

    Raises ``ValueError`` naming the flag for a missing or malformed value (an address without a
    port, a port outside [1, 65535], N < 1, I outside [0, N)) before contacting anyone. Must run
    before any other JAX computation in the process (JAX raises otherwise). Returns True once
    initialized.
    """
    coordinator = getattr(args, "coordinator", None)
    num_processes = getattr(args, "num_processes", None)
    process_id = getattr(args, "process_id", None)
    timeout = getattr(args, "init_timeout", 300)
    if coordinator is None and num_processes is None and process_id is None:
        return False
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1:
        raise ValueError(f"--init-timeout must be a positive number of seconds, got {timeout!r}")
    num = None if num_processes is None else _as_count(num_processes, "--num-processes", 1)
    pid = None if process_id is None else _as_count(process_id, "--process-id", 0)
    if num is not None and pid is not None and pid >= num:
        raise ValueError(f"--process-id must lie in [0, --num-processes={num}), got {pid}")
    if coordinator == AUTO:
        jax.distributed.initialize(num_processes=num, process_id=pid, initialization_timeout=timeout)
        return True
    missing = [flag for flag, value in (("--coordinator", coordinator), ("--num-processes", num),
                                        ("--process-id", pid)) if value is None]
    if missing:
        raise ValueError(f"a multi-process run needs --coordinator, --num-processes and --process-id "
                         f"(or --coordinator auto); missing {', '.join(missing)}")
    parse_coordinator(coordinator)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid,
                               initialization_timeout=timeout)
    return True


def run_group(args: argparse.Namespace) -> Optional[str]:
    """A name shared by the processes of one multi-process run and by no other live run (the
    coordinator's address, which only one run can serve at a time, and the process count);
    ``None`` in a single-process run. The processes of a run share their ``--out`` lock by it
    (:class:`experiments.lock.FolderLock`'s ``group``)."""
    if jax.process_count() == 1:
        return None
    address = getattr(args, "coordinator", None)
    if address in (None, AUTO):
        from jax._src import distributed as jax_distributed  # the address auto-detection found

        address = getattr(jax_distributed.global_state, "coordinator_address", None) or AUTO
    return f"jax.distributed {address} x{jax.process_count()}"


def describe() -> Optional[str]:
    """One line about this process in a multi-process run, or None in a single-process one."""
    if jax.process_count() == 1:
        return None
    return (f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local "
            f"devices, {jax.device_count()} in all")


# ---------------------------------------------------------------------------------------------
# A self-contained check: python -m experiments.distributed --coordinator ... --process-id I
# ---------------------------------------------------------------------------------------------


def _demo_problem(process: int, rows: int, dim: int, classes: int):
    """``(params, loss_fn, local rows)``: a 2-layer tanh MLP (the same in every process) and this
    process's own ``rows`` random examples (a seed of their own)."""
    import jax.numpy as jnp
    import numpy as np

    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"hidden": {"kernel": jax.random.normal(k1, (dim, 32)) / np.sqrt(dim), "bias": jnp.zeros(32)},
              "out": {"kernel": jax.random.normal(k2, (32, classes)) / np.sqrt(32), "bias": jnp.zeros(classes)}}

    def loss_fn(p, b):
        z = jnp.tanh(b["x"] @ p["hidden"]["kernel"] + p["hidden"]["bias"]) @ p["out"]["kernel"] + p["out"]["bias"]
        return jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, b["y"][:, None], 1)[:, 0]

    rng = np.random.default_rng(1000 + process)
    local = {"x": rng.standard_normal((rows, dim)).astype(np.float32),
             "y": rng.integers(0, classes, rows).astype(np.int32)}
    return params, loss_fn, local


def selection_demo(rows_per_process: int = 4096, dim: int = 64, classes: int = 10, budget: int = 20,
                   chunk_size: int = 256, verify: bool = False) -> dict:
    """GBC features and meta-sample selection over every process's devices, from process-local rows.

    Every process holds only its own ``rows_per_process`` examples; the features stay split over
    all devices of all processes, the K-means all-reduces its centroid sums across processes, and
    every process gets the same selected indices (global row numbers: process ``p``'s rows are
    ``p * rows_per_process ...``). With ``verify`` each process also rebuilds every process's rows
    and runs the same selection on its own first device alone, which must give the same indices.
    """
    import time

    import numpy as np

    import pivotal
    from pivotal import sharding

    mesh = pivotal.data_mesh()
    params, loss_fn, local = _demo_problem(jax.process_index(), rows_per_process, dim, classes)
    batch = sharding.shard_process_local_examples(local, mesh)
    key = jax.random.key(1)
    start = time.perf_counter()
    features = jax.block_until_ready(pivotal.gbc_features(loss_fn, params, batch, key, num_layers=2,
                                                          chunk_size=chunk_size))
    features_s = time.perf_counter() - start
    start = time.perf_counter()
    picks = pivotal.select_meta_samples(features, budget, key)
    select_s = time.perf_counter() - start
    report = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
              "examples": int(features.shape[0]), "feature_dim": int(features.shape[1]),
              "features_sharded": sharding.example_placement(features) is not None,
              "features_s": round(features_s, 2), "selection_s": round(select_s, 2), "selected": picks.tolist()}
    if verify:
        parts = [_demo_problem(p, rows_per_process, dim, classes)[2] for p in range(jax.process_count())]
        every = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        alone = pivotal.gbc_features(loss_fn, params, every, key, num_layers=2, chunk_size=chunk_size)
        report["matches_one_device"] = bool(np.array_equal(pivotal.select_meta_samples(alone, budget, key), picks))
    return report


def main(argv=None) -> int:
    """``python -m experiments.distributed [flags]``: :func:`selection_demo`, one JSON line per process."""
    import json

    parser = argparse.ArgumentParser(prog="python -m experiments.distributed", description=main.__doc__)
    add_arguments(parser)
    parser.add_argument("--rows-per-process", type=int, default=4096, help="examples each process holds")
    parser.add_argument("--budget", type=int, default=20, help="meta samples to select")
    parser.add_argument("--verify", action="store_true", help="also run on one device and compare")
    args = parser.parse_args(argv)
    try:
        initialize_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(selection_demo(args.rows_per_process, budget=args.budget, verify=args.verify)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
