"""What every reader returns, and the guards every reader shares.

A reader returns a `LoadedImage`: the pixels plus a metadata dict in which every decision taken on the pixels is
written down (``meta["pipeline"]``), so a wrongly windowed or inverted film can be traced from a predictions row
back to the step that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loupe.core.errors import UnsupportedInputError

#: Refuse images with more pixels than this (all frames and channels together) before anything is allocated:
#: 2^28 values is 1 GiB as float32, already far beyond any radiograph, slide tile or video frame we read whole.
MAX_PIXELS = 2**28


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
