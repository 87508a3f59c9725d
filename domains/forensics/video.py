"""Video clips → sampled frames, with OpenCV's FFmpeg backend.

`probe` opens a clip and reads what its container states (size, frame rate, frame count) or raises
`UnsupportedInputError` naming the file, the problem and the fix (empty file, not a video OpenCV can open, no
frame that decodes, frames too large). `sample_indices` picks the frames to look at: ``frames`` evenly spread over
the clip (the centre of each of ``frames`` equal stretches) or one every ``every_s`` seconds. `read_frames` decodes
exactly those frames, in order, lazily, one at a time.

The work a hostile file can cause is bounded: at most `MAX_SAMPLES` frames are sampled, at most `MAX_DECODE` frames
are decoded per pass (decoding forward to a near frame, seeking to a far one), a frame over `MAX_FRAME_PIXELS`
pixels is refused before decoding (as stated) and after (as decoded), and OpenCV's open/read timeouts are set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loupe.core.io.common import input_error, unreadable

log = logging.getLogger(__name__)

#: Extensions that claim a video (so a damaged clip becomes a failed row instead of vanishing).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
#: Most frames one clip is sampled at (``frames`` above it is refused; ``every_s`` is stretched to fit).
MAX_SAMPLES = 256
#: Most frames decoded per pass over a clip (the frames between samples count: they are decoded to be skipped).
MAX_DECODE = 20_000
#: Largest frame accepted (width x height): 4096 x 4096, above 4K UHD.
MAX_FRAME_PIXELS = 4096 * 4096
#: A sample further ahead than this many frames is reached by seeking rather than by decoding every frame between.
SEEK_GAP = 100
#: Frame rates outside this range are treated as not stated (containers write 0, 1000 or NaN when they don't know).
_FPS_RANGE = (0.1, 480.0)
_TIMEOUT_MS = 10_000
_FIX = "re-export or re-download the clip (e.g. `ffmpeg -i in.mp4 -c:v libx264 out.mp4`)"

_CONTAINERS = (  # (offset, magic, container)
    (4, b"ftypqt", "mov"),
    (4, b"ftyp", "mp4"),
    (0, b"\x1a\x45\xdf\xa3", "matroska"),  # mkv and webm
)


def sniff_video(head: bytes) -> str | None:
    """The container a file's first bytes (up to 16) announce: ``mp4``, ``mov``, ``avi``, ``matroska``, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    for offset, magic, name in _CONTAINERS:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


@dataclass(frozen=True)
class VideoInfo:
    """What a clip states: frame size in pixels, frame rate (None when the container states none usable), frame
    count (as stated, or as counted when the container states none) and container (from the first bytes)."""

    width: int
    height: int
    fps: float | None
    frame_count: int
    container: str | None = None
    codec: str | None = None

    @property
    def duration_s(self) -> float | None:
        return round(self.frame_count / self.fps, 3) if self.fps else None

    def time_of(self, frame_index: int) -> float | None:
        """Seconds from the start to ``frame_index`` (None without a frame rate)."""
        return round(frame_index / self.fps, 4) if self.fps else None

    def meta(self) -> dict[str, Any]:
        """Non-identifying facts for the predictions row (no path, no container tags such as titles or dates)."""
        return {"source_format": "video", "container": self.container, "codec": self.codec, "width": self.width,
                "height": self.height, "fps": round(self.fps, 3) if self.fps else None,
                "frame_count": self.frame_count, "duration_s": self.duration_s}  # fmt: skip


def open_capture(path: str | Path) -> Any:
    """A `cv2.VideoCapture` on ``path`` through FFmpeg with open/read timeouts, or `UnsupportedInputError`."""
    import cv2

    p = Path(path)
    try:
        size = p.stat().st_size
        with p.open("rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise unreadable(p, exc) from exc
    if size == 0:
        raise input_error(p, "the video file is empty (0 bytes)", "re-export or re-download the clip")
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, _TIMEOUT_MS]
    cap = cv2.VideoCapture(str(p), cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        what = sniff_video(head)
        problem = (
            f"OpenCV (FFmpeg) cannot open this {what} video: it is truncated or damaged (an MP4 cut short loses the "
            f"index at its end), or its codec is not supported"
            if what
            else "OpenCV (FFmpeg) cannot open it as a video: its first bytes are not those of an MP4, MOV, AVI, MKV "
            "or WebM file, and FFmpeg does not recognise it either"
        )
        raise input_error(p, problem, _FIX)
    return cap


def probe(path: str | Path, max_pixels: int = MAX_FRAME_PIXELS) -> VideoInfo:
    """Open ``path``, check what it states and that its first frame decodes; see the module docstring."""
    import cv2

    p = Path(path)
    cap = open_capture(p)
    try:
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        _check_size(p, w, h, max_pixels)
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        fps = fps if math.isfinite(fps) and _FPS_RANGE[0] <= fps <= _FPS_RANGE[1] else None
        n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        n = int(n) if math.isfinite(n) and n > 0 else 0
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC) or 0)
        codec = "".join(chr((fourcc >> (8 * i)) & 0xFF) for i in range(4)).strip("\x00 ") or None
        ok, frame = cap.read()
        if not ok or frame is None:
            raise input_error(
                p, "opens as a video but not one frame decodes (damaged stream or unsupported codec)", _FIX
            )
        _check_size(p, frame.shape[1], frame.shape[0], max_pixels)
        if n == 0:  # the container states no frame count (some WebM/MKV): count, within the decode bound
            n = 1
            while n < MAX_DECODE and cap.grab():
                n += 1
            if n >= MAX_DECODE:
                log.warning("%s states no frame count; only its first %d frames are sampled", p.name, MAX_DECODE)
    finally:
        cap.release()
    with p.open("rb") as fh:
        container = sniff_video(fh.read(16))
    return VideoInfo(frame.shape[1], frame.shape[0], fps, n, container, codec)


def _check_size(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise input_error(path, f"the video states a frame of {width}x{height} pixels",
                          "re-export the clip; its header is damaged")  # fmt: skip
    if width * height > max_pixels:
        raise input_error(path, f"its frames are {width}x{height} pixels, more than the {max_pixels:,} allowed",
                          "downscale the clip first (e.g. `ffmpeg -i in -vf scale=-2:2160 out.mp4`)")  # fmt: skip


def sample_indices(
    info: VideoInfo, frames: int = 8, every_s: float | None = None, path: str | Path = "the clip"
) -> list[int]:
    """Frame indices to sample, increasing: ``frames`` evenly spread (the centre of each of ``frames`` equal
    stretches of the clip; fewer when the clip is shorter), or, with ``every_s``, one frame every ``every_s``
    seconds from the start (stretched so that at most `MAX_SAMPLES` frames are taken)."""
    n = info.frame_count
    if every_s is None:
        k = min(frames, n, MAX_SAMPLES)
        return sorted({min(n - 1, int((i + 0.5) * n / k)) for i in range(k)})
    if info.fps is None:
        raise input_error(path, "states no frame rate, so frames cannot be taken every_s seconds",
                          "sample a number of frames instead (--option frames=N)")  # fmt: skip
    step = every_s * info.fps
    if n / step > MAX_SAMPLES:
        log.warning("every_s=%g gives %d frames over %.0f s; stretched to %d frames", every_s, int(n / step),
                    n / info.fps, MAX_SAMPLES)  # fmt: skip
        step = n / MAX_SAMPLES
    return sorted({min(n - 1, round(i * step)) for i in range(max(1, math.ceil(n / step)))})


def read_frames(
    path: str | Path, indices: Sequence[int], max_pixels: int = MAX_FRAME_PIXELS, max_decode: int = MAX_DECODE
) -> Iterator[tuple[int, np.ndarray | str]]:
    """For each of ``indices`` (increasing): ``(frame_index, RGB uint8 [H, W, 3])``, or ``(frame_index, reason)``
    when that frame cannot be decoded (past the real end of a truncated stream, a damaged packet, over the decode
    bound). Opens the clip once and releases it when the iterator ends or is closed."""
    import cv2

    p = Path(path)
    cap = open_capture(p)
    pos, decoded = 0, 0  # pos: index of the next frame a grab() returns
    try:
        for target in indices:
            if target < pos or target - pos > SEEK_GAP:
                cap.set(cv2.CAP_PROP_POS_FRAMES, target)
                pos = target
            ok = True
            while ok and pos < target and decoded < max_decode:
                ok = cap.grab()
                pos, decoded = pos + 1, decoded + 1
            if decoded >= max_decode:
                yield target, f"not decoded: the bound of {max_decode} decoded frames per clip was reached"
                continue
            ok, frame = cap.read()
            pos, decoded = pos + 1, decoded + 1
            if not ok or frame is None:
                yield target, "frame could not be decoded (the stream ends early or is damaged there)"
                continue
            if frame.shape[0] * frame.shape[1] > max_pixels:
                yield target, f"frame of {frame.shape[1]}x{frame.shape[0]} pixels, over the {max_pixels:,} allowed"
                continue
            yield target, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
