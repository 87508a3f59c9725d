"""Strip every piece of metadata from a PNG, JPEG or TIFF and keep its pixels bit for bit (for `loupe deid`).

- **PNG**: the chunks are rewritten. Kept: the image structure and colour meaning (IHDR, PLTE, tRNS, sBIT, gAMA,
  cHRM, sRGB, cICP, pHYs) and the pixel stream, decompressed and recompressed (bounded by the header's size, which
  also drops anything hidden after the zlib stream). Gone: text chunks (tEXt, zTXt, iTXt), eXIf, iCCP, tIME,
  private and animation chunks, and bytes after IEND.
- **JPEG**: the segments are copied without re-encoding: the entropy-coded data, tables and frame headers are kept
  byte for byte, so the decoded pixels are identical. Gone: APP1 (EXIF, XMP), APP2 (ICC, MPF), APP13 (IPTC /
  Photoshop), every other APPn but a thumbnail-less JFIF and the Adobe colour-transform marker, comments, and
  bytes after EOI (appended images).
- **TIFF**: decoded and re-encoded losslessly (deflate) by Pillow from fresh images, so no tag of the original is
  carried over but the structure (size, mode, palette) and the resolution. Every page is kept.

An EXIF orientation other than 1 is written back as a minimal EXIF block holding that one tag, so viewers (and
`loupe.core.io.read_image`) show the image as before. The pixels of the result are compared with the input's
(every frame, decoded by Pillow) before anything is returned.
"""

from __future__ import annotations

import io
import zlib
from collections import Counter

import numpy as np
from PIL import Image, ImageSequence

from loupe.core.errors import UnsupportedInputError
from loupe.core.io.common import MAX_PIXELS

IMAGE_SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif"}
_ORIENTATION = 0x0112

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_KEEP = frozenset({b"IHDR", b"PLTE", b"tRNS", b"sBIT", b"gAMA", b"cHRM", b"sRGB", b"cICP", b"pHYs"})
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}

_JPEG_KEEP = frozenset({*range(0xC0, 0xC8), *range(0xC9, 0xD0), 0xDB, 0xDD, 0xDC, 0xDE, 0xDF, 0xF7, 0xF8})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})

#: TIFF tags that describe the image itself; any other tag of the input is reported as removed.
_TIFF_STRUCTURE = frozenset({254, 256, 257, 258, 259, 262, 266, 273, 274, 277, 278, 279, 282, 283, 284, 296, 317,
                             320, 322, 323, 324, 325, 338, 339, 347, 529, 530, 531, 532})  # fmt: skip


def strip_image(data: bytes, fmt: str) -> tuple[bytes, Counter]:
    """``(clean file bytes, what was removed by kind)`` for the PNG / JPEG / TIFF file content ``data``."""
    strip = {"png": _strip_png, "jpeg": _strip_jpeg, "tiff": _strip_tiff}[fmt]
    orientation = _orientation(data)
    clean, removed = strip(data, orientation)
    _check_same_pixels(data, clean, fmt)
    return clean, removed


def _orientation(data: bytes) -> int:
    try:
        with Image.open(io.BytesIO(data)) as im:
            value = im.getexif().get(_ORIENTATION)
    except Exception:  # noqa: BLE001 - unreadable EXIF: no orientation to keep; the pixel check still decides
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def _minimal_exif(orientation: int) -> bytes:
    """``b"Exif\\0\\0"`` + a TIFF header with one IFD entry: the orientation."""
    exif = Image.Exif()
    exif[_ORIENTATION] = orientation
    return exif.tobytes()


def _bad(problem: str, fix: str = "re-export the file") -> UnsupportedInputError:
    return UnsupportedInputError(f"{problem}; {fix}")


# ---------------------------------------------------------------- PNG


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def _strip_png(data: bytes, orientation: int) -> tuple[bytes, Counter]:
    if not data.startswith(_PNG_SIGNATURE):
        raise _bad("the PNG signature is damaged")
    kept, idat, removed, pos, header = [], [], Counter(), 8, b""
    while True:
        if pos + 12 > len(data):
            raise _bad("the PNG ends before its IEND chunk (truncated)")
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        body, crc = data[pos + 8 : pos + 8 + length], data[pos + 8 + length : pos + 12 + length]
        if len(crc) < 4 or zlib.crc32(kind + body).to_bytes(4, "big") != crc:
            raise _bad(f"PNG chunk {kind!r} is truncated or fails its CRC")
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        if kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif kind in _PNG_KEEP:
            kept.append(_png_chunk(kind, body))
        else:
            removed[kind.decode("latin-1")] += 1
    if pos < len(data):
        removed["bytes after IEND"] += len(data) - pos
    if len(header) != 13 or not idat:
        raise _bad("the PNG has no valid IHDR or no image data")
    raw = _inflate_bounded(b"".join(idat), _png_raw_limit(header))
    if orientation != 1:
        kept.append(_png_chunk(b"eXIf", _minimal_exif(orientation)[6:]))
    body = _png_chunk(b"IDAT", zlib.compress(raw, 6))
    return _PNG_SIGNATURE + b"".join(kept) + body + _png_chunk(b"IEND", b""), removed


def _png_raw_limit(header: bytes) -> int:
    """The largest decompressed size the header allows (Adam7 adds at most a filter byte per row and pass)."""
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, color = header[8], header[9]
    channels = _PNG_CHANNELS.get(color)
    if channels is None or width == 0 or height == 0:
        raise _bad(f"the PNG header is invalid ({width}x{height}, colour type {color})")
    if width * height * channels > MAX_PIXELS:
        raise _bad(f"the PNG header declares {width}x{height}x{channels} values, over {MAX_PIXELS:,}",
                   "the header is corrupt or the image must be tiled")  # fmt: skip
    row = (width * channels * depth + 7) // 8 + 1
    return height * row + 8 * (height + 8) + 64


def _inflate_bounded(stream: bytes, limit: int) -> bytes:
    d = zlib.decompressobj()
    try:
        raw = d.decompress(stream, limit + 1)
    except zlib.error as exc:
        raise _bad(f"the PNG image data does not decompress ({exc})") from None
    if len(raw) > limit:
        raise _bad("the PNG image data inflates beyond what its header declares (a decompression bomb?)")
    if not d.eof:
        raise _bad("the PNG image data is truncated")
    return raw


# ---------------------------------------------------------------- JPEG


def _strip_jpeg(data: bytes, orientation: int) -> tuple[bytes, Counter]:
    if not data.startswith(b"\xff\xd8"):
        raise _bad("the JPEG does not start with SOI")
    head, body, removed, pos = [b"\xff\xd8"], [], Counter(), 2
    while True:
        if pos >= len(data) or data[pos] != 0xFF:
            raise _bad("the JPEG is truncated or a segment is damaged (no marker where one must be)")
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1
        if pos >= len(data):
            raise _bad("the JPEG ends inside a marker")
        marker, pos = data[pos], pos + 1
        if marker == 0xD9:
            break
        if marker in _JPEG_STANDALONE:
            body.append(bytes((0xFF, marker)))
            continue
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > len(data):
            raise _bad(f"JPEG segment 0x{marker:02X} is truncated")
        payload, segment = data[pos + 2 : pos + length], bytes((0xFF, marker)) + data[pos : pos + length]
        pos += length
        if marker == 0xDA:
            end = _entropy_end(data, pos)
            body.append(segment + data[pos:end])
            pos = end
        elif marker in _JPEG_KEEP or (marker == 0xEE and payload.startswith(b"Adobe") and length <= 16):
            body.append(segment)
        elif marker == 0xE0 and payload.startswith(b"JFIF\0") and len(payload) >= 14:
            head.append(b"\xff\xe0\x00\x10" + payload[:12] + b"\x00\x00")  # the same JFIF header, no thumbnail
            removed["JFIF thumbnail"] += payload[12] * payload[13] > 0
        else:
            removed[_jpeg_segment_name(marker, payload)] += 1
    if pos < len(data):
        removed["bytes after EOI"] += len(data) - pos
    if orientation != 1:
        exif = _minimal_exif(orientation)
        head.append(b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif)
    return b"".join(head) + b"".join(body) + b"\xff\xd9", +removed


def _entropy_end(data: bytes, pos: int) -> int:
    """Where the entropy-coded data starting at ``pos`` ends: the next marker that is not a stuffed 0xFF00 or RSTn."""
    while True:
        i = data.find(b"\xff", pos)
        if i < 0 or i + 1 >= len(data):
            raise _bad("the JPEG is truncated inside its image data")
        nxt = data[i + 1]
        if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
            pos = i + 2
        else:
            return i


def _jpeg_segment_name(marker: int, payload: bytes) -> str:
    if marker == 0xFE:
        return "COM"
    for prefix, name in ((b"Exif\0", "EXIF"), (b"http://ns.adobe.com/xap", "XMP"), (b"ICC_PROFILE", "ICC"),
                         (b"MPF", "MPF"), (b"Photoshop", "IPTC/Photoshop"), (b"JFXX", "JFXX thumbnail")):  # fmt: skip
        if payload.startswith(prefix):
            return name
    return f"APP{marker - 0xE0}" if 0xE0 <= marker <= 0xEF else f"marker 0x{marker:02X}"


# ---------------------------------------------------------------- TIFF


def _strip_tiff(data: bytes, orientation: int) -> tuple[bytes, Counter]:
    removed: Counter = Counter()
    frames: list[Image.Image] = []
    with Image.open(io.BytesIO(data), formats=["TIFF"]) as im:
        total = 0
        for page in ImageSequence.Iterator(im):
            width, height = page.size
            total += width * height * len(page.getbands())
            if total > MAX_PIXELS:
                raise _bad(f"the TIFF's pages hold over {MAX_PIXELS:,} values (a whole slide?)",
                           "loupe deid handles images, not slide pyramids; de-identify slides with the scanner's "
                           "tool")  # fmt: skip
            for tag in page.tag_v2:
                if tag not in _TIFF_STRUCTURE:
                    removed[f"tag {tag}"] += 1
            frames.append(_fresh(page))
        info = {t: im.tag_v2[t] for t in (282, 283, 296) if t in im.tag_v2}
    if orientation != 1:
        info[274] = orientation
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:], compression="tiff_adobe_deflate",
                   tiffinfo=info)  # fmt: skip
    return buf.getvalue(), Counter({"TIFF tags": sum(removed.values())}) if removed else Counter()


def _fresh(page: Image.Image) -> Image.Image:
    """A new image with the page's pixels (and palette) only: nothing of the file's tags or info comes along."""
    page.load()
    fresh = Image.frombytes(page.mode, page.size, page.tobytes())
    if page.mode == "P":
        fresh.putpalette(page.getpalette() or [])
    return fresh


# ---------------------------------------------------------------- the pixel check


def _check_same_pixels(before: bytes, after: bytes, fmt: str) -> None:
    """Refuse the result unless every frame decodes to the same mode, size and values as the input."""
    try:
        old, new = _frames(before, fmt), _frames(after, fmt)
    except UnsupportedInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a decoder failure on the input or the result: the file fails
        raise _bad(f"the {fmt.upper()} cannot be decoded to check its pixels ({type(exc).__name__})") from None
    if len(old) != len(new) or any(not _same(a, b) for a, b in zip(old, new, strict=True)):
        raise _bad(f"the {fmt.upper()} written would not hold the same pixels as the input, so it was not written",
                   "convert the file to PNG and run again")  # fmt: skip


def _same(a: tuple[str, np.ndarray], b: tuple[str, np.ndarray]) -> bool:
    """Same mode (byte order aside), shape and values."""
    mode_a, mode_b = (m.replace("I;16B", "I;16").replace("I;16L", "I;16") for m in (a[0], b[0]))
    return mode_a == mode_b and a[1].shape == b[1].shape and np.array_equal(a[1], b[1])


def _frames(data: bytes, fmt: str) -> list[tuple[str, np.ndarray]]:
    with Image.open(io.BytesIO(data), formats=[{"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}[fmt]]) as im:
        return [(page.mode, np.asarray(page.copy())) for page in ImageSequence.Iterator(im)]
