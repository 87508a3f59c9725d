"""Frame sampling with OpenCV: the right frames at the right times, clear errors for clips that cannot be read, and
bounded work."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from loupe.core.errors import UnsupportedInputError
from loupe.domains.forensics import video
from loupe.domains.forensics.video import VideoInfo, probe, read_frames, sample_indices, sniff_video


def numbered_frames(n: int, size: int = 32) -> list[np.ndarray]:
    """Frame i is a flat grey of level i (so a decoded frame tells which one it is)."""
    return [np.full((size, size, 3), i, np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def numbered_clip(tmp_path_factory: pytest.TempPathFactory, clip_writer) -> Path:
    return clip_writer(tmp_path_factory.mktemp("v") / "numbered.avi", numbered_frames(250), fps=25.0)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x00\x00\x00\x1cftypisom\x00\x00\x02\x00", "mp4"),
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00", "mov"),
        (b"RIFF\xfc\x1a\x00\x00AVI LIST", "avi"),
        (b"\x1aE\xdf\xa3\x9fB\x86\x81\x01B\xf7\x81", "matroska"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", None),
        (b"", None),
    ],
)
def test_sniff_video_by_first_bytes(head: bytes, expected: str | None) -> None:
    assert sniff_video(head) == expected


def test_probe_states_size_rate_count_and_meta(numbered_clip: Path) -> None:
    info = probe(numbered_clip)
    assert (info.width, info.height, info.fps, info.frame_count, info.container) == (32, 32, 25.0, 250, "avi")
    assert info.duration_s == 10.0 and info.time_of(50) == 2.0
    meta = info.meta()
    assert meta["codec"] == "MJPG" and meta["duration_s"] == 10.0 and "path" not in meta


def test_even_and_timed_sampling() -> None:
    info = VideoInfo(64, 48, 25.0, 250)
    assert sample_indices(info, frames=5) == [25, 75, 125, 175, 225]  # the centre of each fifth
    assert sample_indices(info, frames=1) == [125]
    assert sample_indices(VideoInfo(64, 48, 25.0, 3), frames=8) == [0, 1, 2]  # a short clip: every frame once
    assert sample_indices(info, every_s=2.0) == [0, 50, 100, 150, 200]
    long = VideoInfo(64, 48, 25.0, 25 * 3600)  # an hour, one frame a second would be 3600: stretched to the bound
    got = sample_indices(long, every_s=1.0)
    assert len(got) == video.MAX_SAMPLES and got[0] == 0 and got[-1] < long.frame_count
    with pytest.raises(UnsupportedInputError, match=r"clip.avi: states no frame rate.*--option frames=N"):
        sample_indices(VideoInfo(64, 48, None, 100), every_s=1.0, path="clip.avi")


def test_read_frames_returns_the_frames_asked_for(numbered_clip: Path) -> None:
    # 3, 9: decoded forward; 240: more than SEEK_GAP ahead, reached by seeking; 249: the last frame
    wanted = [3, 9, 130, 240, 249]
    got = list(read_frames(numbered_clip, wanted))
    assert [i for i, _ in got] == wanted
    for i, frame in got:
        assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
        assert abs(float(frame.mean()) - i) < 3, (i, frame.mean())  # grey level i: the very frame i


def test_frames_past_the_end_or_the_decode_bound_are_reasons(numbered_clip: Path) -> None:
    got = dict(read_frames(numbered_clip, [5, 260]))
    assert isinstance(got[5], np.ndarray) and "could not be decoded" in got[260]
    bounded = dict(read_frames(numbered_clip, [2, 50, 90], max_decode=20))
    assert isinstance(bounded[2], np.ndarray)
    assert "bound of 20 decoded frames" in bounded[50] and "bound" in bounded[90]
    assert "over the 100 allowed" in dict(read_frames(numbered_clip, [0], max_pixels=100))[0]


def test_empty_clip_is_refused_naming_the_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    with pytest.raises(UnsupportedInputError, match=r"empty.mp4: the video file is empty \(0 bytes\); re-export"):
        probe(p)


@pytest.mark.realdata
def test_truncated_clip_is_refused_naming_the_file(tmp_path: Path, ffpp_real: list[Path]) -> None:
    data = ffpp_real[0].read_bytes()
    p = tmp_path / "cut.mp4"
    p.write_bytes(data[: len(data) // 2])  # FF++ clips keep their index (moov) at the end
    with pytest.raises(UnsupportedInputError) as err:
        probe(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: OpenCV (FFmpeg) cannot open this mp4 video: it is truncated or damaged")
    assert "re-export or re-download the clip" in msg


def test_garbage_is_refused_as_not_a_video(tmp_path: Path) -> None:
    p = tmp_path / "notes.mp4"
    p.write_bytes(b"these are notes, not a video " * 40)
    with pytest.raises(UnsupportedInputError, match=r"notes.mp4: OpenCV \(FFmpeg\) cannot open it as a video: its "
                       r"first bytes are not those of an MP4"):  # fmt: skip
        probe(p)
    with pytest.raises(UnsupportedInputError, match="does not exist"):
        probe(tmp_path / "missing.mp4")


def test_frames_too_large_are_refused_before_decoding(numbered_clip: Path, tmp_path: Path) -> None:
    p = shutil.copy(numbered_clip, tmp_path / "c.avi")
    with pytest.raises(UnsupportedInputError, match=r"c.avi: its frames are 32x32 pixels, more than the 1,000 allowed; "
                       r"downscale the clip"):  # fmt: skip
        probe(p, max_pixels=1000)
