"""One writer per predictions table: ``<out>.lock``, held with an exclusive POSIX record lock for the whole run.

Two ``loupe score`` runs on the same ``--out`` (a ``--resume`` beside an ``--overwrite``, two terminals) would number
their parts alike and finalize each other's rows away; the second is refused instead, naming the first. The kernel
drops the lock when its process ends, however it ends (SIGKILL included), so a crashed run never leaves a stale
lock behind; the small file itself stays and is reused. A POSIX lock (``lockf``), not ``flock``: it belongs to
the process alone, so reader processes forked from it (DataLoader workers, which may outlive a killed parent for a
moment) never hold it and never block the ``--resume`` that follows.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loupe.core.errors import ConfigError

_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


@contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold ``<out>.lock`` for the body; another holder → `ConfigError` (exit 2) saying who holds it."""
    path = lock_path(Path(out))
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    with _HELD_LOCK:  # POSIX locks do not exclude threads of one process (the dashboard): a set does
        if key in _HELD:
            raise ConfigError(f"--out {out} is being written by another scoring run of this process; wait for it "
                              "to finish, or write to another --out")  # fmt: skip
        _HELD.add(key)
    try:
        yield from _locked(path, out)
    finally:
        with _HELD_LOCK:
            _HELD.discard(key)


def _locked(path: Path, out: Path) -> Iterator[Path]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: another process holds it
            raise ConfigError(f"--out {out} is being written by another loupe score ({_holder(fd)}); wait for it to "
                              "finish, or write to another --out") from None  # fmt: skip
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": dt.datetime.now(dt.UTC).isoformat()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        who = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {who['pid']} on {who['host']}, since {who['since'][:19]} UTC"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
