"""Content identity: how a scoring run recognises a file it has already scored, cheaply, whatever its size.

A file up to `FULL_HASH_LIMIT` bytes is identified by the SHA-256 of all its bytes (``sha256:<hex>``). A larger
one (a multi-GB whole-slide image, a long video) would cost minutes to hash on every ``--resume``, so it gets a
*sampled* identity (``sampled:<hex>``): SHA-256 over its size, its modification time (ns), its first and last
MiB and 16 blocks of 64 KiB spread evenly between them. Any rewrite of the file changes the mtime and so the
identity; a same-size edit that keeps the mtime and misses every sampled block would not be seen, which is why
small files, where a full hash is cheap, always get one. Domains may supply a format's own identity instead
(``DomainInfo.content_identity``), e.g. a hash of a DICOM SOP Instance UID.

Each file is read once: `read_once` reads a file of up to `HOLD_LIMIT` bytes into memory, hashing it as it goes,
and while it is held `content_identity` takes the hash from there and the readers decode from the same bytes
(`loupe.core.io.common.open_source`) instead of reading the file a second time.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loupe.core.io.common import HeldFile, held_file, holding, input_error, unreadable

#: Files up to this size are hashed whole.
FULL_HASH_LIMIT = 256 * 2**20
_EDGE = 2**20  # bytes read at each end of a sampled file
_BLOCK = 64 * 2**10
_BLOCKS = 16
_CHUNK = 2**20
#: Files up to this size are held in memory between hashing and decoding (read once); larger ones (slides, videos,
#: huge uncompressed DICOM) are hashed as they stream and read again by their reader. 64 MiB per worker at most.
HOLD_LIMIT = 64 * 2**20


@dataclass(frozen=True)
class Identity:
    """``id``: the identity string stored in tables (``sha256:...`` / ``sampled:...`` / a domain's own scheme);
    ``sha256``: the full-content hash when it was computed (None for sampled identities); ``size`` in bytes."""

    id: str
    sha256: str | None
    size: int


def content_identity(path: str | Path, full_hash_limit: int = FULL_HASH_LIMIT) -> Identity:
    """The identity of the file at ``path`` (see the module docstring); unreadable files raise
    `UnsupportedInputError` naming the file and the fix."""
    p = Path(path)
    held = held_file(p)
    if held is not None and len(held.data) <= full_hash_limit:
        return Identity(f"sha256:{held.sha256}", held.sha256, len(held.data))
    try:
        st = p.stat()
        if not p.is_file():
            raise input_error(p, "is not a regular file", "pass image, DICOM, slide or video files only")
        if st.st_size <= full_hash_limit:
            digest = _full(p)
            return Identity(f"sha256:{digest}", digest, st.st_size)
        return Identity(f"sampled:{_sampled(p, st.st_size, st.st_mtime_ns)}", None, st.st_size)
    except OSError as exc:
        raise unreadable(p, exc) from exc


@contextmanager
def read_once(path: str | Path, limit: int = HOLD_LIMIT) -> Iterator[HeldFile | None]:
    """Hold the bytes of the regular file at ``path`` (when at most ``limit`` bytes) for as long as the block runs:
    `content_identity` and the readers inside it use them instead of reading the file again. Anything that is not
    a small regular file (a FIFO or device is never opened; a vanished or unreadable file is left for the reader
    to report by name) is not held, and the block runs as if there were no ``read_once``."""
    p = Path(path)
    held = None
    try:
        st = p.stat()
        if stat.S_ISREG(st.st_mode) and st.st_size <= limit:
            held = _read_held(p, st.st_size, limit)
    except OSError:
        held = None
    with holding(held):
        yield held


def _read_held(p: Path, size: int, limit: int) -> HeldFile | None:
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO swapped in after the stat cannot block
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = fh.read(size + 1)  # one buffer of the file's size; a byte more tells that it grew since the stat
    if len(data) != size or size > limit:  # changing while read: the normal path hashes it as it streams
        return None
    return HeldFile(os.fspath(p), data, hashlib.sha256(data).hexdigest())


def file_sha256(path: str | Path) -> str:
    """SHA-256 of all of a file's bytes (hex)."""
    return _full(Path(path))


def _full(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _sampled(p: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256(b"loupe-sampled-identity-v1")
    h.update(f"{size}:{mtime_ns}".encode())
    step = (size - 2 * _EDGE) // (_BLOCKS + 1)
    offsets = [(0, _EDGE)] + [(_EDGE + step * (i + 1), _BLOCK) for i in range(_BLOCKS)] + [(size - _EDGE, _EDGE)]
    with open(p, "rb") as fh:
        for offset, length in offsets:
            fh.seek(offset, os.SEEK_SET)
            h.update(fh.read(length))
    return h.hexdigest()
