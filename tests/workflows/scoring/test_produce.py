"""A failed file's status line: the reason, never the folders above the input (they may name a patient)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from loupe.core.errors import LoupeError
from loupe.core.io import read_any
from loupe.workflows.scoring.produce import failure_reason


def test_a_decoders_message_naming_the_file_keeps_only_its_name(tmp_path: Path) -> None:
    folder = tmp_path / "Doe_Jane_1961"
    folder.mkdir()
    bad = folder / "slide.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 60)  # a TIFF header and nothing a decoder can use
    try:
        read_any(bad)
    except LoupeError as exc:
        reason = failure_reason(exc, str(bad))
    else:
        raise AssertionError("a header-only TIFF was read")
    assert "Doe_Jane" not in reason and str(tmp_path) not in reason
    try:
        Image.open(bad)
    except UnidentifiedImageError as exc:  # PIL's own message holds the full path
        assert str(bad) in str(exc)
        reason = failure_reason(exc, str(bad))
    assert reason.startswith("UnidentifiedImageError") and "slide.tif" in reason and "Doe_Jane" not in reason
