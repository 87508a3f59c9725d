"""What every reader returns, and the guards every reader shares.

A reader returns a `LoadedImage`: the pixels plus a metadata dict in which every decision taken on the pixels is
written down (``meta["pipeline"]``), so a wrongly windowed or inverted film can be traced from a predictions row
back to the step that produced it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from loupe.core.errors import UnsupportedInputError

#: Refuse images with more pixels than this (all frames and channels together) before anything is allocated:
#: 2^28 values is 1 GiB as float32, already far beyond any radiograph, slide tile or video frame we read whole.
MAX_PIXELS = 2**28

#: The most memory one decode may take, in bytes: the codec's output at the chosen reduction plus the reader's
#: working copies (a DICOM is rendered in float64). A file whose decode needs more is refused by name, or decoded at
#: a reduced resolution when the caller says how many pixels the model needs (`DecodeTarget`). 1 GiB keeps a batch
#: of any inputs under ~2 GiB with a worker or two, and holds every real radiograph (a 4300 x 3500 DR film needs
#: ~0.5 GiB rendered), mammogram and 48-megapixel photo.
DECODE_BUDGET = 2**30

#: Pillow's own decompression-bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`, checked when a file is opened) is a second
#: line behind `check_pixel_count` and stays at Pillow's default (warn above it, refuse above twice it): the readers
#: never change it, and refuse to decode where something in the process switched it off (`check_pillow_guard`).
PILLOW_BOMB_PIXELS = 89_478_485


@dataclass(frozen=True)
class LoadedImage:
    """Pixels read from one file and what was done to them.

    ``array`` is channels-last: ``[H, W]``, ``[H, W, C]``, or with frames first ``[F, H, W]`` / ``[F, H, W, C]``.
    ``meta`` always has ``path``, ``source_format``, ``original_size`` (rows, columns as stored), ``frames``,
    ``intensity`` (the value convention of ``array``) and ``pipeline`` (each pixel decision, in order); the
    readers document their other keys.
    """

    array: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def input_error(path: str | Path, problem: str, fix: str) -> UnsupportedInputError:
    """An `UnsupportedInputError` whose message names the file, the problem and the fix, in that order."""
    return UnsupportedInputError(f"{path}: {problem}; {fix}")


def is_decoder_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a decoder rejecting bad data (to be reported as `UnsupportedInputError`).

    Any `Exception` qualifies, and so do panics of Rust codecs (pyo3's ``PanicException``, e.g. pylibjpeg-rle on a
    corrupt segment), which derive from `BaseException`; interrupts and exits never do.
    """
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def check_pixel_count(path: str | Path, dims: tuple[int, ...], what: str, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse absurd or negative dimensions before any pixel buffer is allocated.

    ``dims`` are the sizes that multiply into the number of values (rows, columns, frames, samples).
    """
    if any(int(d) <= 0 for d in dims):
        raise input_error(path, f"{what} has a zero or negative dimension {tuple(dims)}", "re-export the file")
    total = int(np.prod([int(d) for d in dims], dtype=object))
    if total > max_pixels:
        raise input_error(
            path,
            f"{what} declares {total:,} pixel values {tuple(dims)}, more than the limit of {max_pixels:,}",
            "the header is corrupt or the image must be tiled (raise max_pixels only if the size is real)",
        )


def check_decode_budget(
    path: str | Path, nbytes: int, what: str, budget: int = DECODE_BUDGET, fix: str | None = None
) -> None:
    """Refuse a decode that would take more than ``budget`` bytes (``nbytes``: the reader's estimate of its peak)
    before anything is allocated; ``what`` names the decode (size, scale) in the message."""
    if nbytes > budget:
        raise input_error(
            path,
            f"decoding {what} needs about {_gib(nbytes)} of memory, more than the decode budget of {_gib(budget)}",
            fix
            or "score it with a model of smaller input size (it is then decoded at a reduced resolution), "
            "or raise decode_budget only if the machine has the memory",
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def check_pillow_guard(path: str | Path) -> None:
    """Refuse to decode with Pillow when its decompression-bomb guard was switched off in this process (some
    libraries set ``PIL.Image.MAX_IMAGE_PIXELS = None``); the readers never switch it off themselves."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is None:
        raise input_error(
            path,
            "Pillow's decompression-bomb limit is switched off in this process (PIL.Image.MAX_IMAGE_PIXELS = None), "
            "so an image file cannot be decoded safely",
            f"do not set PIL.Image.MAX_IMAGE_PIXELS to None; leave Pillow's default ({PILLOW_BOMB_PIXELS:,})",
        )


# ----------------------------------------------------------------------------------------- reduced decoding
@dataclass(frozen=True)
class DecodeTarget:
    """What a model needs of an image, so that a reader can decode fewer pixels than the file holds.

    ``size``: the model input (rows, columns) in pixels; ``resize``: how the image is brought to it (the weight
    spec's ``resize_mode``). ``squash`` and ``shorter_side_crop`` only ever shrink an image larger than ``size``, so
    a codec may decode it at 1/2, 1/4, ... of its resolution as long as both sides stay at least ``size``;
    ``center_crop`` looks at the pixels as they are (a forensic detector reads their statistics) and is never
    reduced.
    """

    size: tuple[int, int]
    resize: str = "squash"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or any(int(s) < 1 for s in self.size):
            raise ValueError(f"DecodeTarget size must be two positive sides (rows, columns), got {self.size}")

    @classmethod
    def for_model(cls, input_size: tuple[int, ...], resize_mode: str) -> DecodeTarget:
        """The target of a weight spec's ``input_size`` (channels, rows, columns) and ``resize_mode``."""
        return cls((int(input_size[-2]), int(input_size[-1])), resize_mode)

    def reduction(self, rows: int, columns: int, max_level: int = 16) -> int:
        """The reduction level ``k`` (decode at 1/2^k) for a ``rows`` x ``columns`` image: the largest
        ``k <= max_level`` whose reduced sides (rounded up, as codecs round) still cover the target on both axes,
        i.e. the power-of-2 level just above what the model needs, never more; 0 when the image is not larger."""
        if self.resize == "center_crop":
            return 0
        k = 0
        while k < max_level and reduced(rows, k + 1) >= self.size[0] and reduced(columns, k + 1) >= self.size[1]:
            k += 1
        return k

    def swapped(self) -> DecodeTarget:
        """The target on an image stored rotated by 90 degrees (EXIF orientations 5-8)."""
        return DecodeTarget((self.size[1], self.size[0]), self.resize)


def reduced(side: int, level: int) -> int:
    """A side of ``side`` pixels at reduction level ``level``: ceil(side / 2^level), as JPEG 2000 and JPEG round."""
    return -(-int(side) // (1 << level))


def box_reduce(array: Any, level: int) -> Any:
    """``array`` ``[H, W, ...]`` averaged over 2^level x 2^level blocks (the last partial block over what it has),
    same dtype (integers rounded): what a codec without reduced decoding gives at that level."""
    import numpy as np

    if level <= 0:
        return array
    f = 1 << level
    a = np.asarray(array)
    h, w = a.shape[:2]
    ph, pw = reduced(h, level) * f - h, reduced(w, level) * f - w
    work = a.astype(np.float32)
    if ph or pw:  # pad by edge replication so edge blocks average only real pixels' values
        work = np.pad(work, [(0, ph), (0, pw)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    out = work.reshape(work.shape[0] // f, f, work.shape[1] // f, f, *a.shape[2:]).mean(axis=(1, 3))
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(a.dtype)
    return out.astype(a.dtype)


def decode_step(kind: str, level: int, original: tuple[int, int], got: tuple[int, int], target: DecodeTarget) -> str:
    """The ``pipeline`` line of a reduced decode: how, by how much, from and to what size, for what model input."""
    return (
        f"decode: reduced 1/{1 << level} by {kind}, {original[0]}x{original[1]} -> {got[0]}x{got[1]} "
        f"for a {target.size[0]}x{target.size[1]} model input ({target.resize})"
    )


# ------------------------------------------------------------------------------------------ read each file once
@dataclass(frozen=True)
class HeldFile:
    """A file's bytes, read once, with their SHA-256: identity and decoding both take them from here."""

    path: str
    data: bytes
    sha256: str


_HELD: ContextVar[HeldFile | None] = ContextVar("loupe_held_file", default=None)


@contextmanager
def holding(held: HeldFile | None) -> Iterator[HeldFile | None]:
    """While inside, `held_bytes` / `open_source` serve ``held``'s path from memory (see
    `loupe.core.io.identity.read_once`, which makes the `HeldFile`)."""
    token = _HELD.set(held)
    try:
        yield held
    finally:
        _HELD.reset(token)


def held_file(path: str | Path) -> HeldFile | None:
    """The held bytes of ``path`` when `holding` them, else None."""
    held = _HELD.get()
    return held if held is not None and held.path == os.fspath(Path(path)) else None


def open_source(path: str | Path) -> BinaryIO:
    """A binary stream of the file at ``path``: its held bytes when there are some, else the file itself."""
    held = held_file(path)
    return io.BytesIO(held.data) if held is not None else open(path, "rb")  # noqa: SIM115 - the caller closes it


def file_size(path: str | Path) -> int:
    """The size of the file at ``path`` in bytes (of its held bytes when held)."""
    held = held_file(path)
    return len(held.data) if held is not None else Path(path).stat().st_size


def unreadable(path: str | Path, exc: OSError) -> UnsupportedInputError:
    """The `UnsupportedInputError` for a file the OS would not hand over (missing, a folder, no permission, I/O)."""
    if isinstance(exc, FileNotFoundError):
        problem, fix = (
            "the file does not exist",
            "check the path (a manifest's relative paths are read from its folder)",
        )
    elif isinstance(exc, IsADirectoryError):
        problem, fix = "is a folder, not a file", "pass the files inside it"
    elif isinstance(exc, PermissionError):
        problem, fix = "cannot be read (permission denied)", "check the file's permissions"
    else:
        problem, fix = f"cannot be read ({exc.strerror or exc})", "check the disk and the path"
    return input_error(path, problem, fix)
