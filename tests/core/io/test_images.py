from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loupe.core.errors import UnsupportedInputError
from loupe.core.io import read_any, read_image, sniff_bytes, sniff_format

RNG = np.random.default_rng(0)
GRAY8 = RNG.integers(0, 256, (6, 4), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (6, 4), dtype=np.uint16)
RGB8 = RNG.integers(0, 256, (6, 4, 3), dtype=np.uint8)
RGBA8 = RNG.integers(0, 256, (6, 4, 4), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
@pytest.mark.parametrize(
    ("array", "bit_depth", "color"),
    [(GRAY8, 8, "gray"), (GRAY16, 16, "gray"), (RGB8, 8, "rgb"), (RGBA8, 8, "rgba")],
)
def test_lossless_formats_round_trip_native_dtype(
    tmp_path: Path, fmt: str, array: np.ndarray, bit_depth: int, color: str
) -> None:
    path = tmp_path / f"img.{fmt}"
    Image.fromarray(array).save(path)
    img = read_image(path)
    np.testing.assert_array_equal(img.array, array)
    assert img.array.dtype == array.dtype
    assert img.meta["bit_depth"] == bit_depth and img.meta["color"] == color and img.meta["source_format"] == fmt
    assert img.meta["original_size"] == (6, 4) and img.meta["pipeline"] == []


def test_palette_gray_becomes_gray_and_color_becomes_rgb(tmp_path: Path) -> None:
    Image.fromarray(GRAY8).convert("P").save(tmp_path / "gray.png")
    Image.fromarray(RGB8).quantize(8).save(tmp_path / "color.png")
    gray, color = read_image(tmp_path / "gray.png"), read_image(tmp_path / "color.png")
    assert gray.array.ndim == 2 and "gray palette" in gray.meta["pipeline"][0]
    assert color.array.shape == (6, 4, 3) and color.meta["mode"] == "P"


@pytest.mark.parametrize(("orientation", "shape"), [(1, (6, 4)), (3, (6, 4)), (6, (4, 6)), (8, (4, 6))])
def test_exif_orientation_applied_and_recorded(tmp_path: Path, orientation: int, shape: tuple[int, int]) -> None:
    im = Image.fromarray(RGB8)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    img = read_image(tmp_path / "photo.jpg")
    assert img.array.shape[:2] == shape and img.meta["exif_orientation"] == orientation
    assert img.meta["orientation_applied"] is (orientation != 1)
    assert read_image(tmp_path / "photo.jpg", apply_exif=False).array.shape[:2] == (6, 4)


def test_rotation_180_really_rotates(tmp_path: Path) -> None:
    im = Image.fromarray(GRAY8)
    exif = im.getexif()
    exif[0x0112] = 3
    im.save(tmp_path / "r.tiff", exif=exif)
    np.testing.assert_array_equal(read_image(tmp_path / "r.tiff").array, GRAY8[::-1, ::-1])


def test_sniffs_by_content_not_extension(tmp_path: Path) -> None:
    Image.fromarray(GRAY8).save(tmp_path / "film.dcm", format="PNG")
    assert sniff_format(tmp_path / "film.dcm") == "png"
    assert read_any(tmp_path / "film.dcm").meta["source_format"] == "png"
    assert sniff_bytes(b"\0" * 128 + b"DICM") == "dicom"
    assert sniff_bytes(b"hello world") == "unknown"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"just text, not an image", "not a PNG, JPEG, TIFF or DICOM"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "cannot be decoded as PNG"),
        (b"\0" * 128 + b"DICM" + b"\0" * 8, "is a DICOM file"),
    ],
)
def test_bad_files_raise_unsupported_input_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(UnsupportedInputError, match=message) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedInputError, match="does not exist"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(UnsupportedInputError, match="is a folder"):
        read_any(tmp_path)


def test_truncated_png_says_truncated(tmp_path: Path) -> None:
    Image.fromarray(RGB8.repeat(20, 0).repeat(20, 1)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsupportedInputError, match="truncated"):
        read_image(tmp_path / "cut.png")


def test_pixel_limit_refuses_before_decoding(tmp_path: Path) -> None:
    Image.fromarray(GRAY8).save(tmp_path / "small.png")
    with pytest.raises(UnsupportedInputError, match="more than the limit of 10"):
        read_image(tmp_path / "small.png", max_pixels=10)


@pytest.mark.realdata
def test_reads_a_real_nih_film(shared_data: Path) -> None:
    path = next((shared_data / "cxr" / "nih14" / "images").glob("*.png"))
    img = read_image(path)
    assert img.array.dtype == np.uint8 and img.array.shape[:2] == (512, 512)


def _png16(path: Path, array: np.ndarray, sbit: int | None = None) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if sbit is not None:
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(array.astype(np.uint16)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize(
    ("sbit", "top", "bits", "source"),
    [(12, 4095, 12, "sBIT"), (None, 4095, 12, "data range"), (None, 1000, 10, "data range"), (None, 65535, 16, "")],
)
def test_16_bit_png_with_fewer_significant_bits(tmp_path: Path, sbit, top: int, bits: int, source: str) -> None:
    """CR/DX exports store 10-14-bit data in 16-bit PNGs: dividing by 65535 would make every film near-black."""
    array = np.linspace(0, top, 24).reshape(6, 4)
    img = read_image(_png16(tmp_path / "film.png", array, sbit))
    assert img.meta["bit_depth"] == bits and img.meta["container_bit_depth"] == 16
    assert source in img.meta["bit_depth_source"]
    assert (f"{bits} significant bits" in " ".join(img.meta["pipeline"])) == (bits != 16)


def test_12_bit_data_in_a_16_bit_png_scores_as_the_8_bit_film(tmp_path: Path) -> None:
    from loupe.core.models import WeightSpec
    from loupe.core.units import single_image_units

    def standard_loader(path, spec):
        fu = single_image_units(path, spec)
        return next(iter(fu.units)).image, fu.meta

    spec = WeightSpec(name="t", architecture="vit_micro_patch8", input_size=(1, 32, 32), mean=(0.5,), std=(0.25,))
    film8 = np.linspace(0, 255, 64 * 64).reshape(64, 64).round().astype(np.uint8)
    Image.fromarray(film8).save(tmp_path / "film8.png")
    _png16(tmp_path / "film12.png", film8.astype(np.uint32) * 4095 // 255)
    x8, _ = standard_loader(tmp_path / "film8.png", spec)
    x12, meta = standard_loader(tmp_path / "film12.png", spec)
    torch.testing.assert_close(x12, x8, atol=0.02, rtol=0)
    assert meta["bit_depth"] == 12
