"""The reading side of scoring: files → units → packets of at most ``batch_size`` model inputs.

`produce_packets` runs where the data is read (a DataLoader worker, a Ray actor) and never raises for a bad
input: a file that cannot be identified, read or preprocessed becomes a failed `FileRecord`, a unit that cannot
be read a failed `UnitRecord`, and the next file goes on. A file's `FileRecord` travels in the packet that holds
its last unit, so whoever consumes packets in order knows, on seeing it, that all of the file's units have
arrived. Units of consecutive files share packets (one chest film per unit, 32 films per forward), and a slide's
thousands of tiles stream through many packets: memory is bounded by one packet, never by a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loupe.core.errors import LoupeError
from loupe.core.io import safe_meta
from loupe.core.io.identity import Identity, read_once
from loupe.core.models import WeightSpec
from loupe.core.units import FileUnits, Unit, UnitFailure, UnitInfo


@dataclass
class UnitRecord:
    """One unit's place and status; its image (when ok) is the next row of the packet's ``images``."""

    file: str  # the file's recorded path
    info: UnitInfo
    status: str = "ok"


@dataclass
class FileRecord:
    """One finished file: identity, status and metadata; ``skipped`` when an earlier run already scored it."""

    path: str  # recorded path (relative to the input root)
    content_id: str | None = None
    content_sha256: str | None = None
    status: str = "ok"
    meta_json: str | None = None
    frame: dict[str, Any] | None = None
    read_ms: float = 0.0
    n_units: int = 0
    skipped: bool = False
    artifacts: list[Any] = field(default_factory=list)  # FileArtifact made by the reader


@dataclass
class Packet:
    """``starts``: recorded path → ``{"content_id", "frame"}`` of files whose units begin here (what unit results
    need before their file ends); ``units`` in order, their ok images stacked in ``images``; ``files``: the files
    that end here."""

    starts: dict[str, dict[str, Any]] = field(default_factory=dict)
    units: list[UnitRecord] = field(default_factory=list)
    images: torch.Tensor | None = None  # [n_ok, C, H, W], in the order of the ok units
    files: list[FileRecord] = field(default_factory=list)

    @property
    def n_inputs(self) -> int:
        return len(self.files)


def failure_reason(exc: BaseException, path: str = "", shown: str | None = None) -> str:
    """One line for a ``status`` column: a LoupeError's own message (minus the path the row already has), else the
    exception type and message; the file's full path anywhere in it is cut to its name (or to ``shown``, the
    pseudonym a run with pseudonymised paths records, so the name never reaches the table)."""
    msg = str(exc) if isinstance(exc, LoupeError) else f"{type(exc).__name__}: {exc}"
    if path:  # a decoder's own message may name the file again: never a folder above the input (issue: no leaks)
        name = Path(path).name
        msg = msg.removeprefix(f"{path}: ").replace(str(path), shown or name)
        if shown is not None and name:
            msg = msg.replace(name, shown).replace(Path(path).stem, shown)
    from loupe.workflows.scoring.inputs import utf8_text

    return utf8_text(" ".join(msg.split()))[:500]


class InputOutsideRoot(LoupeError):
    """An input path that leads out of the folders the user named."""


@dataclass(frozen=True)
class Producer:
    """Everything `produce_packets` needs, picklable (it travels to worker processes and Ray actors)."""

    root: str
    read_units: Callable[[Path, WeightSpec], FileUnits]
    identity: Callable[[Path], Identity]
    spec: WeightSpec
    done: frozenset[str] = frozenset()
    batch_size: int = 32
    meta_keys: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()  # the run's unit options over the spec's (key, value) pairs
    roots: tuple[str, ...] = ()  # resolved folders an input may live in (the input root + --allow-root); () = any
    path_key: bytes | None = None  # set: paths are recorded (and named in reasons) as keyed pseudonyms

    def recorded(self, path: str) -> str:
        from loupe.workflows.scoring.inputs import recorded_path

        return recorded_path(path, self.root, self.path_key)


def produce_packets(
    producer: Producer, paths: Sequence[str], on_file: Callable[[int], None] | None = None, time_limit: float = 0.0
) -> Iterator[Packet]:
    """Packets over ``paths`` (absolute) in order; see the module docstring. ``on_file(i)`` is told before the
    i-th file is opened (a worker's "what am I reading", for when it dies); ``time_limit`` > 0 bounds each file's
    reading in seconds (the main thread's SIGALRM: use it only in processes that own it, like DataLoader workers)."""
    buf = _Buffer(producer.batch_size)
    for i, path in enumerate(paths):
        if on_file is not None:
            on_file(i)
        yield from _one_file(producer, path, buf, time_limit)
        if len(buf.packet.files) >= producer.batch_size:  # files without model work still get committed
            yield buf.flush()
    if buf.packet.files or buf.packet.units:
        yield buf.flush()


class _Buffer:
    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.packet, self.images = Packet(), []

    def add_unit(self, record: UnitRecord, image: torch.Tensor | None) -> Packet | None:
        self.packet.units.append(record)
        if image is not None:
            self.images.append(image)
        return self.flush() if len(self.images) >= self.batch_size else None

    def flush(self) -> Packet:
        packet = self.packet
        packet.images = torch.stack(self.images) if self.images else None
        self.packet, self.images = Packet(), []
        return packet


class ReadTimeout(LoupeError):
    """Reading one input took longer than the run allows (a hostile or pathological file)."""


@contextlib.contextmanager
def _deadline(seconds: float, limit: float) -> Iterator[None]:
    """Raise `ReadTimeout` in this (main) thread if the block runs past ``seconds``; 0 = no limit. The clock only
    runs inside the block: time a worker waits to hand a packet on does not count against the file."""
    if seconds <= 0:
        yield
        return

    def _expired(signum: int, frame: object) -> None:
        raise ReadTimeout(f"reading took longer than {limit:g} s, the limit for one file; it was stopped")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _one_file(producer: Producer, path: str, buf: _Buffer, time_limit: float = 0.0) -> Iterator[Packet]:
    rec = FileRecord(path=producer.recorded(path))
    busy = 0.0
    t0 = time.perf_counter()
    left = time_limit  # seconds of reading this file may still use (0 = unbounded)
    try:
        with _deadline(left, time_limit), contextlib.ExitStack() as held:
            confine(Path(path), producer.roots)
            held.enter_context(read_once(Path(path)))  # identity and decoding take the same bytes: read once
            ident = producer.identity(Path(path))
            rec.content_id, rec.content_sha256 = ident.id, ident.sha256
            if f"{rec.path}\0{ident.id}" in producer.done:
                rec.skipped = True
                buf.packet.files.append(rec)
                return
            options = {**producer.spec.unit_options, **dict(producer.options)}
            fu = producer.read_units(Path(path), producer.spec, options)
            rec.meta_json = json.dumps(safe_meta(fu.meta, producer.meta_keys), sort_keys=True, default=str,
                                       separators=(",", ":"))  # fmt: skip
            rec.frame, rec.artifacts = fu.frame, list(fu.artifacts)
            producer.spec.check_scope(fu.meta, path)  # before any unit is taken (and preprocessed)
            buf.packet.starts[rec.path] = {"content_id": rec.content_id, "frame": fu.frame}
        units = iter(fu.units)
        busy += time.perf_counter() - t0
        left = max(time_limit - busy, 1e-3) if time_limit > 0 else 0.0
        while True:
            t1 = time.perf_counter()
            try:
                with _deadline(left, time_limit):
                    unit = next(units)
            except StopIteration:
                busy += time.perf_counter() - t1
                break
            record, image = _unit(producer, rec.path, unit)
            rec.n_units += 1
            busy += time.perf_counter() - t1
            left = max(time_limit - busy, 1e-3) if time_limit > 0 else 0.0
            full = buf.add_unit(record, image)
            if full is not None:
                yield full
        if rec.n_units == 0:
            rec.status = "failed: the file gave no units to score (nothing the model could look at)"
    except Exception as exc:  # noqa: BLE001 - a bad input is a row, never the end of the batch
        shown = rec.path if producer.path_key is not None else None
        rec.status = f"failed: {failure_reason(exc, path, shown)}"
        busy = time.perf_counter() - t0
    rec.read_ms = busy * 1000.0
    buf.packet.files.append(rec)


def confine(path: Path, roots: Sequence[str]) -> None:
    """Refuse an input that resolves (through symlinks or ``..``) outside every root the user named: a link in a
    shared folder or a manifest line must not make the batch read, hash and record another folder's files."""
    if not roots:
        return
    real = os.path.realpath(path)
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        raise InputOutsideRoot(
            "resolves outside the input root (a symlink or manifest path leading elsewhere); it was not "
            "read. Copy the file under the input folder, or name its folder with --allow-root DIR"
        )


def _unit(producer: Producer, file: str, unit: Unit | UnitFailure) -> tuple[UnitRecord, torch.Tensor | None]:
    if isinstance(unit, UnitFailure):
        return UnitRecord(file, unit.info, f"{unit.status}: {' '.join(unit.reason.split())[:500]}"), None
    expected = tuple(producer.spec.input_size)
    if tuple(unit.image.shape) != expected:
        reason = f"failed: preprocessing produced shape {tuple(unit.image.shape)}, the model expects {expected}"
        return UnitRecord(file, unit.info, reason), None
    return UnitRecord(file, unit.info), unit.image.float().contiguous()
