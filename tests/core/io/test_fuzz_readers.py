"""Mutated real files (truncated, flipped bytes, absurd dimensions) only ever raise LoupeError, in bounded memory."""

from __future__ import annotations

import resource
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
import skimage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loupe.core.errors import LoupeError
from loupe.core.io import read_any, read_dicom, read_image

DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
SEEDS = {
    "ct": DICOM_DIR / "CT_small.dcm",  # native, signed, rescaled
    "j2k": DICOM_DIR / "MR_small_jp2klossless.dcm",  # compressed
    "rle": DICOM_DIR / "MR_small_RLE.dcm",
    "png": Path(skimage.__file__).parent / "data" / "microaneurysms.png",  # real retina photograph
}
FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
MAX_RSS_GROWTH_KIB = 1024 * 1024  # 1 GiB: far below what one absurd allocation would take


@pytest.fixture(scope="module")
def rss_guard():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert growth < MAX_RSS_GROWTH_KIB, f"peak memory grew by {growth / 1024:.0f} MiB while fuzzing"


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in flips:
        out[pos % len(out)] = value
    return bytes(out)


def _png_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR width/height with a valid CRC, so the decoder trusts the absurd size."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def _dicom_with_size(data: bytes, rows: int, cols: int) -> bytes:
    for tag, value in ((b"\x28\x00\x10\x00", rows), (b"\x28\x00\x11\x00", cols)):
        at = data.find(tag)
        if at >= 0:
            # explicit VR: tag, 'US', 2-byte length, value; implicit VR: tag, 4-byte length, value
            offset = at + 8
            data = data[:offset] + struct.pack("<H", value) + data[offset + 2 :]
    return data


def _assert_only_loupe_errors(path: Path, data: bytes, reader) -> None:
    path.write_bytes(data)
    try:
        reader(path)
    except LoupeError:
        pass


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(
        st.just("flip"), st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=12)
    ),
    st.tuples(st.just("size"), st.tuples(st.integers(0, 65535), st.integers(0, 65535))),
)


def _mutate(kind: str, data: bytes, arg, is_png: bool) -> bytes:
    if kind == "truncate":
        return data[: int(len(data) * arg)]
    if kind == "flip":
        return _flip(data, arg)
    width, height = arg
    return _png_with_size(data, width * 1000, height) if is_png else _dicom_with_size(data, height, width)


@pytest.mark.parametrize("seed", ["ct", "j2k", "rle"])
@FUZZ
@given(change=mutation)
def test_mutated_dicom_only_raises_loupe_errors(tmp_path: Path, rss_guard, seed: str, change) -> None:
    data = _mutate(change[0], SEEDS[seed].read_bytes(), change[1], is_png=False)
    _assert_only_loupe_errors(tmp_path / "fuzz.dcm", data, read_dicom)


@FUZZ
@given(change=mutation)
def test_mutated_png_only_raises_loupe_errors(tmp_path: Path, rss_guard, change) -> None:
    data = _mutate(change[0], SEEDS["png"].read_bytes(), change[1], is_png=True)
    _assert_only_loupe_errors(tmp_path / "fuzz.png", data, read_image)


@FUZZ
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00"]))
def test_random_bytes_behind_any_magic_only_raise_loupe_errors(tmp_path: Path, rss_guard, data: bytes, prefix) -> None:
    _assert_only_loupe_errors(tmp_path / "noise", prefix + data, read_any)


def test_absurd_png_size_is_refused_not_allocated(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_size(SEEDS["png"].read_bytes(), 60000, 60000))
    with pytest.raises(LoupeError, match="decompression bomb|more than the limit"):
        read_image(path)
