"""One run per folder: a lock file recording who holds a work folder.

``with FolderLock(path, flag="--out"):`` creates ``path/.lock`` holding the holder's host, pid,
process start time, command line and an optional ``group``; a second :class:`FolderLock` on the
same folder raises :class:`FolderInUse` (a ``ValueError``) with one line naming the holder. The
lock is released (the file removed) when the ``with`` block ends, however it ends. A holder that
died without releasing (``kill -9``, a crash) leaves a stale lock: on the same host it is
recognised (no process with that pid, or one that started at another time: a reused pid) and
taken over; a lock held from another host cannot be checked from here and is refused.

The processes of one multi-process run (``jax.distributed``) share a folder by passing the same
``group`` (e.g. the coordinator address and the process count): the first one to arrive creates
the lock, the others join it without owning it (only the creator removes it).

Creation is atomic: the record is written to a private file, then hard-linked to ``.lock``
(``link`` fails when the name exists, on local and network file systems alike), so a reader
never sees half a record. Breaking a stale lock happens under an ``flock`` on ``.lock.guard``
so that two newcomers cannot both break it and both win.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Optional

LOCK_NAME = ".lock"


class FolderInUse(ValueError):
    """The folder is locked by another live run."""


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux ``/proc``), ``None`` if
    unknown; a pid reused by a later process has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(record: dict) -> bool:
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    started = record.get("start_time")
    now = _start_time(pid)
    return started is None or now is None or started == now


def _describe(record: dict) -> str:
    when = record.get("started", "?")
    command = record.get("command", "")
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started {when}"
            + (f": {command}" if command else ""))


class FolderLock:
    """Holds ``directory/.lock`` while the ``with`` block runs; see the module docstring.

    ``flag`` names the folder in messages (``--out``, ``--work``). ``group``: processes passing
    the same non-empty string share the lock (one multi-process run).
    """

    def __init__(self, directory, *, flag: str = "folder", group: Optional[str] = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.flag = flag
        self.group = group or None
        self.owner = False
        self._record = {
            "host": socket.gethostname(), "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join(getattr(sys, "orig_argv", sys.argv))[:300],
            "group": self.group,
        }

    def acquire(self) -> "FolderLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._try_create():
                self.owner = True
                return self
            holder = self._read()
            if holder is None:
                continue  # released between our two calls: try again
            if self.group is not None and holder.get("group") == self.group:
                return self  # a fellow process of the same run holds it
            if not self._break_if_stale(holder):
                raise FolderInUse(
                    f"{self.flag} {str(self.directory)!r} is in use by another run "
                    f"({_describe(holder)}); wait for it to finish or choose another "
                    f"{self.flag}")
        raise FolderInUse(f"{self.flag} {str(self.directory)!r}: could not take its lock "
                          f"{self.path} (it keeps changing hands)")

    def release(self) -> None:
        if not self.owner:
            return
        self.owner = False
        holder = self._read()
        if holder is not None and holder.get("pid") == self._record["pid"] and \
                holder.get("start_time") == self._record["start_time"] and \
                holder.get("host") == self._record["host"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _try_create(self) -> bool:
        tmp = self.directory / f"{LOCK_NAME}.{self._record['host']}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self._record))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _read(self) -> Optional[dict]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        # A lock file that is not our record (hand-made, damaged): treat as a dead holder.
        return record if isinstance(record, dict) else {"host": socket.gethostname(), "pid": -1}

    def _break_if_stale(self, holder: dict) -> bool:
        """Removes ``holder``'s lock when it is dead on this host; ``True`` if removed."""
        if holder.get("host") != socket.gethostname() or _alive(holder):
            return False
        guard = self.directory / f"{LOCK_NAME}.guard"
        with open(guard, "a") as g:
            fcntl.flock(g, fcntl.LOCK_EX)
            try:
                if self._read() == holder:  # nobody broke it and re-took it meanwhile
                    self.path.unlink()
                    print(f"note: {self.flag} {str(self.directory)!r} was locked by a run that "
                          f"is gone ({_describe(holder)}); taking it over", file=sys.stderr)
            finally:
                fcntl.flock(g, fcntl.LOCK_UN)
        return True
