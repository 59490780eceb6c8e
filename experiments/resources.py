"""Wall time and peak resident memory by phase, for the rows and the scaling runner.

``with phase("features"): ...`` times the block and samples the resident set size (RSS) of
this process and all its descendants from ``/proc`` every ``interval`` seconds in a
background thread (once more on entry and on exit, so a short phase has a value too); the
block's seconds and peak go to the :class:`Recorder` of the innermost :func:`recording`
block. Outside any ``recording`` a phase costs nothing and records nothing, so library code
that runs a phase without the pipeline around it pays no sampling thread.

From a shell, ``python3 -m experiments.resources [--interval 2] [--json FILE] -- COMMAND ...``
runs ``COMMAND`` and reports its wall time and the peak RSS of its process tree (how the
README and docs/RESULTS.md measure whole runs; ``ulimit -v`` would break XLA's address-space
reservations, so memory is watched, not capped).

A phase that runs several times under one recorder (one per selection round) adds up its
seconds and keeps the largest peak. Memory is in GB = 1e9 bytes. The sampled peak can miss a
spike shorter than ``interval``; the kernel's own high-water mark (``VmHWM``) does not, but
it never goes down, so it cannot tell one phase from the next.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import os
import subprocess
import sys
import threading
import time
from typing import Iterator, Optional

__all__ = ["DEFAULT_INTERVAL", "Recorder", "TreeSampler", "measure_command", "phase", "recording",
           "tree_rss_bytes"]

DEFAULT_INTERVAL = 1.0  # seconds between samples: a few ms of /proc reads each
GB = 1e9
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (``/proc/<pid>/task/*/children``; [] when gone)."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(c) for c in f.read().split())
        except OSError:  # the thread ended meanwhile
            continue
    return kids


def _rss(pid: int) -> int:
    """Resident bytes of one process (``/proc/<pid>/statm``'s second field); 0 when gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_bytes(pid: Optional[int] = None) -> Optional[int]:
    """Resident bytes of ``pid`` (default: this process) and all its descendants.

    None where ``/proc`` is not there (not Linux). Pages shared between the processes are
    counted once per process, as ``ps`` and ``top`` do.
    """
    pid = os.getpid() if pid is None else pid
    if not os.path.isdir(f"/proc/{pid}"):
        return None
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss(p)
        todo.extend(_children(p))
    return total


class TreeSampler:
    """Samples :func:`tree_rss_bytes` of ``pid`` every ``interval`` s in a daemon thread.

    ``peak`` is the largest sample in bytes (None when ``/proc`` cannot be read). A context
    manager: sampling starts on entry and stops, with a last sample, on exit.
    """

    def __init__(self, pid: Optional[int] = None, interval: float = DEFAULT_INTERVAL):
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.pid, self.interval = pid, interval
        self.peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def sample(self) -> Optional[int]:
        value = tree_rss_bytes(self.pid)
        if value is not None and (self.peak is None or value > self.peak):
            self.peak = value
        return value

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "TreeSampler":
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Optional[int]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self.peak

    def __enter__(self) -> "TreeSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Recorder:
    """Seconds and peak bytes per phase name, in the order the phases first ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, Optional[int]] = {}

    def add(self, name: str, seconds: float, peak: Optional[int]) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)
        old = self.peak_bytes.get(name)
        self.peak_bytes[name] = peak if old is None else (old if peak is None else max(old, peak))

    def merge(self, other: "Recorder") -> None:
        for name, seconds in other.seconds.items():
            self.add(name, seconds, other.peak_bytes.get(name))

    def row(self) -> dict:
        """``{"phase_seconds": {name: s}, "phase_peak_rss_gb": {name: GB or None}}``."""
        return {"phase_seconds": {n: round(s, 3) for n, s in self.seconds.items()},
                "phase_peak_rss_gb": {n: None if b is None else round(b / GB, 3)
                                      for n, b in self.peak_bytes.items()}}


_CURRENT: contextvars.ContextVar[Optional[Recorder]] = contextvars.ContextVar(
    "experiments_resources_recorder", default=None)


@contextlib.contextmanager
def recording(recorder: Optional[Recorder] = None) -> Iterator[Recorder]:
    """Phases inside the block record into ``recorder`` (a new one by default), yielded."""
    recorder = Recorder() if recorder is None else recorder
    token = _CURRENT.set(recorder)
    try:
        yield recorder
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def phase(name: str, interval: float = DEFAULT_INTERVAL) -> Iterator[None]:
    """Times the block and samples the process tree's peak RSS into the current recorder.

    Recorded also when the block raises (the time spent until then).
    """
    recorder = _CURRENT.get()
    if recorder is None:
        yield
        return
    sampler = TreeSampler(interval=interval).start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - t0
        recorder.add(name, seconds, sampler.stop())


def measure_command(command, interval: float = DEFAULT_INTERVAL) -> dict:
    """Runs ``command`` (an argv list) to its end while sampling its process tree;
    ``{"command", "exit_code", "wall_seconds", "peak_rss_gb", "interval", "load_average_before"}``."""
    load = os.getloadavg()
    t0 = time.perf_counter()
    child = subprocess.Popen(list(command))
    with TreeSampler(child.pid, interval=interval) as sampler:
        code = child.wait()
    return {"command": list(command), "exit_code": code,
            "wall_seconds": round(time.perf_counter() - t0, 3),
            "peak_rss_gb": None if sampler.peak is None else round(sampler.peak / GB, 3),
            "interval": interval, "load_average_before": [round(x, 2) for x in load]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m experiments.resources",
        description="Run COMMAND; print its wall time and the peak resident memory of its "
                    "process tree (sampled every --interval seconds).",
        epilog="example: python3 -m experiments.resources --interval 2 --json fashion.json -- "
               "python3 -m experiments.run --preset fashion --out results/fashion")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between samples (2)")
    p.add_argument("--json", help="also write the measurement to this JSON file")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("a COMMAND is required after --")
    if not args.interval > 0:
        p.error(f"--interval must be > 0 seconds, got {args.interval}")
    record = measure_command(command, args.interval)
    print(f"exit {record['exit_code']}: {record['wall_seconds']:.1f} s wall, peak RSS of the "
          f"process tree {record['peak_rss_gb']} GB (sampled every {args.interval:g} s)",
          file=sys.stderr)
    if args.json:
        from experiments.checkpoint import write_text_atomic  # deferred: Orbax
        write_text_atomic(args.json, json.dumps(record, indent=1))
    return record["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
