"""Content identity: how a scoring run recognises a file it has already scored, cheaply, whatever its size.

A file up to `FULL_HASH_LIMIT` bytes is identified by the SHA-256 of all its bytes (``sha256:<hex>``). A larger
one (a multi-GB whole-slide image, a long video) would cost minutes to hash on every ``--resume``, so it gets a
*sampled* identity (``sampled:<hex>``): SHA-256 over its size, its modification time (ns), its first and last
MiB and 16 blocks of 64 KiB spread evenly between them. Any rewrite of the file changes the mtime and so the
identity; a same-size edit that keeps the mtime and misses every sampled block would not be seen, which is why
small files, where a full hash is cheap, always get one. Domains may supply a format's own identity instead
(``DomainInfo.content_identity``), e.g. a hash of a DICOM SOP Instance UID.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from loupe.core.io.common import input_error, unreadable

#: Files up to this size are hashed whole.
FULL_HASH_LIMIT = 256 * 2**20
_EDGE = 2**20  # bytes read at each end of a sampled file
_BLOCK = 64 * 2**10
_BLOCKS = 16
_CHUNK = 2**20


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
