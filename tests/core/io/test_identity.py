"""Content identity: full hashes for ordinary files, a cheap sampled identity for huge ones, clear errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from loupe.core.errors import UnsupportedInputError
from loupe.core.io.identity import content_identity


def test_small_files_are_identified_by_all_their_bytes(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    p.write_bytes(b"\x89PNG" + bytes(range(256)) * 10)
    ident = content_identity(p)
    assert ident.id == f"sha256:{hashlib.sha256(p.read_bytes()).hexdigest()}" and ident.sha256 == ident.id[7:]
    copy = tmp_path / "b.png"
    copy.write_bytes(p.read_bytes())
    assert content_identity(copy).id == ident.id  # same bytes, same identity, wherever they are


def test_large_files_get_a_sampled_identity_that_sees_edits_and_rewrites(tmp_path: Path) -> None:
    p = tmp_path / "slide.svs"
    size = 12 * 2**20
    p.write_bytes(os.urandom(size))
    limit = 2**20  # pretend 1 MiB is "large" so the test stays small
    first = content_identity(p, full_hash_limit=limit)
    assert first.id.startswith("sampled:") and first.sha256 is None and first.size == size
    assert content_identity(p, full_hash_limit=limit) == first  # stable
    stat = p.stat()
    with open(p, "r+b") as fh:  # change a byte in the first sampled block, keep size and mtime
        fh.seek(10)
        fh.write(b"\xff" if p.read_bytes()[10] != 255 else b"\x00")
    os.utime(p, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = content_identity(p, full_hash_limit=limit)
    assert edited.id != first.id
    os.utime(p, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten (new mtime), same bytes
    assert content_identity(p, full_hash_limit=limit).id != edited.id


@pytest.mark.parametrize(
    ("make", "message"),
    [(lambda p: None, "does not exist"), (lambda p: p.mkdir(), "is not a regular file")],
)
def test_unreadable_inputs_name_the_problem(tmp_path: Path, make, message: str) -> None:
    p = tmp_path / "x.dcm"
    make(p)
    with pytest.raises(UnsupportedInputError, match=message) as err:
        content_identity(p)
    assert str(p) in str(err.value) and "Errno" not in str(err.value)
