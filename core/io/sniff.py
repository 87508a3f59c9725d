"""Tell a file's format from its first bytes, never from its name.

Clinical exports arrive as ``IM0001`` without an extension, PNGs renamed ``.dcm`` and JPEGs called ``.png``;
trusting the extension feeds the wrong decoder and produces a confusing error, or worse, a wrong image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from loupe.core.io.common import held_file, input_error, unreadable

Format = Literal["dicom", "dicom-no-preamble", "png", "jpeg", "tiff", "unknown"]

#: Formats `read_image` decodes; DICOM goes to `read_dicom`.
IMAGE_FORMATS: tuple[str, ...] = ("png", "jpeg", "tiff")
#: File extensions that claim one of the formats the readers handle (DICOM or an image).
IMAGE_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".png", ".jpg", ".jpeg", ".tif", ".tiff"})

_MAGIC: tuple[tuple[bytes, Format], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)


def sniff_bytes(head: bytes) -> Format:
    """The format of a file whose first (up to) 132 bytes are ``head``.

    DICOM Part 10 files carry ``DICM`` at byte 128 after a 128-byte preamble. Older exports without the preamble
    start directly with a (little- or big-endian) group 0x0002 (file meta) or 0x0008 (identifying) element; those are
    reported as ``"dicom-no-preamble"`` so that `read_dicom` knows to parse them without the header check.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if len(head) >= 8 and (_looks_like_element(head, little=True) or _looks_like_element(head, little=False)):
        return "dicom-no-preamble"
    return "unknown"


def _looks_like_element(head: bytes, *, little: bool) -> bool:
    """A group 0x0002 / 0x0008 tag with a small element number, then an explicit VR or a short implicit length."""
    order = "little" if little else "big"
    group, element = int.from_bytes(head[0:2], order), int.from_bytes(head[2:4], order)
    if group not in (0x0002, 0x0008) or element > 0x00FF:
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True  # explicit VR
    return little and head[6:8] == b"\x00\x00"  # implicit VR little endian: a 32-bit length below 65536


def sniff_format(path: str | Path) -> Format:
    """The format of the file at ``path`` from its content (its held bytes when `read_once` holds them); a missing
    or unreadable file is an error."""
    p = Path(path)
    held = held_file(p)
    try:
        if held is not None:
            head = held.data[:132]
        else:
            with p.open("rb") as fh:
                head = fh.read(132)
    except OSError as exc:
        raise unreadable(p, exc) from exc
    if not head:
        raise input_error(p, "the file is empty (0 bytes)", "re-export or re-download the file")
    return sniff_bytes(head)
