"""Uploads are checked, stored by content inside the data folder, and never under the name they came with."""

from __future__ import annotations

from pathlib import Path

import pytest

from loupe.workflows.review.uploads import UploadError, store_upload


def test_an_image_is_stored_under_its_content_hash(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
    up = store_upload(tmp_path, "../../etc/Jane Doe.png", png)
    assert up.path.parent.parent == (tmp_path / "uploads").resolve() and up.path.name == "input.png"
    assert up.path.read_bytes() == png and up.kind == "png" and "Jane" not in str(up.path)
    assert store_upload(tmp_path, "again.png", png).path == up.path  # same bytes, same place


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("x.png", b"", "is empty"), ("notes.txt", b"hello world" * 20, "not a DICOM, PNG, JPEG or TIFF"),
     ("big.dcm", b"\x00" * 2048, "more than the 0 MiB")],
)  # fmt: skip
def test_bad_uploads_are_refused_with_the_reason(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    limit = 1024 if name == "big.dcm" else 2**20
    with pytest.raises(UploadError, match=message):
        store_upload(tmp_path, name, content, max_bytes=limit)
    assert not (tmp_path / "uploads").exists() or not any((tmp_path / "uploads").iterdir())


def test_a_domains_own_format_is_accepted_by_name_for_that_domain(tmp_path: Path) -> None:
    from loupe.core.registry import DOMAINS, discover_domains

    discover_domains()
    clip = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 300  # an MP4 header: not an image by content
    with pytest.raises(UploadError, match=r"nor one of this domain's formats \(.*\.mp4"):
        store_upload(tmp_path, "clip.txt", clip, suffixes=DOMAINS.get("forensics").input_suffixes)
    with pytest.raises(UploadError, match="not a DICOM, PNG, JPEG or TIFF"):
        store_upload(tmp_path, "clip.mp4", clip)  # a domain without clips (the default) refuses it
    up = store_upload(tmp_path, "Jane Doe interview.mp4", clip, suffixes=DOMAINS.get("forensics").input_suffixes)
    assert up.path.name == "input.mp4" and "Jane" not in str(up.path)
