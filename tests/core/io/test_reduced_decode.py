"""Reduced-resolution decoding, decode budgets and read-once, on real files (pydicom-data's JPEG 2000 chest CR, the
shared data's chest DICOM transcoded to JPEG 2000) and crafted ones (a 16000² J2K, a 9400² PNG)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless

from loupe.core.errors import UnsupportedInputError
from loupe.core.io import DecodeTarget, j2k, read_any, read_dicom, read_image
from loupe.core.io.common import box_reduce, reduced
from loupe.core.io.identity import content_identity, read_once
from loupe.core.models import WeightSpec, build_model
from loupe.core.models.heads import model_outputs, to_scores
from loupe.core.transforms import ModelInput

T224 = DecodeTarget((224, 224))
CHEST_J2K = "RG1_J2KR.dcm"  # a real CR chest film, 1955 x 1841, 15-bit, lossless JPEG 2000, 4.2 MB


def _testfile(name: str) -> Path:
    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return Path(p)


def _best_of(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@pytest.fixture(scope="module")
def scorer():
    """A random-weight 224 px grey ViT-S/16 whose head gives unit-scale logits (scores in the sigmoid's steep part,
    where input changes show, not saturated at 0 or 1)."""
    torch.manual_seed(0)
    spec = WeightSpec(name="t", architecture="vit_small_patch16", task="binary", input_size=(1, 224, 224),
                      mean=(0.5,), std=(0.25,), label_names=("A",))  # fmt: skip
    model, _ = build_model(spec)
    torch.nn.init.normal_(model.head.weight, std=model.head.weight.shape[1] ** -0.5)
    torch.nn.init.zeros_(model.head.bias)
    model.eval()
    prep = ModelInput(spec)

    def run(img) -> tuple[float, torch.Tensor]:
        x = prep(img.array, img.meta.get("bits_stored") or img.meta.get("bit_depth"))
        with torch.inference_mode():
            return float(to_scores(model_outputs(model, x[None])["logits"], spec.task)[0, 0]), x

    return run


# ------------------------------------------------------------------------------------------------ the level rule
@pytest.mark.parametrize(
    ("rows", "cols", "size", "resize", "level"),
    [
        (1955, 1841, (224, 224), "squash", 3),  # 245 x 231: the power of 2 just above 224
        (1024, 1024, (224, 224), "squash", 2),  # 256
        (512, 512, (224, 224), "shorter_side_crop", 1),
        (448, 448, (224, 224), "squash", 1),  # exactly twice
        (447, 448, (224, 224), "squash", 1),  # 224 x 224 after rounding up, as the codecs round
        (446, 448, (224, 224), "squash", 0),  # 223 rows at 1/2: never below the target
        (16000, 16000, (224, 224), "squash", 6),  # 250
        (4000, 1000, (224, 224), "squash", 2),  # the shorter side decides
        (2000, 2000, (224, 224), "center_crop", 0),  # the pixels as they are
        (200, 200, (224, 224), "squash", 0),
    ],
)
def test_reduction_is_the_level_just_above_the_model_input(rows, cols, size, resize, level) -> None:
    got = DecodeTarget(size, resize).reduction(rows, cols)
    assert got == level
    if level:
        assert reduced(rows, level) >= size[0] and reduced(cols, level) >= size[1]
        assert reduced(rows, level + 1) < size[0] or reduced(cols, level + 1) < size[1]


def test_box_reduce_averages_blocks_and_keeps_the_dtype() -> None:
    a = np.arange(5 * 6, dtype=np.uint16).reshape(5, 6) * 100
    out = box_reduce(a, 1)
    assert out.dtype == np.uint16 and out.shape == (3, 3)
    assert out[0, 0] == round((0 + 100 + 600 + 700) / 4)
    assert out[2, 2] == round((2800 + 2900) / 2)  # the last, partial row of blocks averages real pixels only
    rgb = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(box_reduce(rgb, 2)[1, 0], rgb[4:8, 0:4].mean(axis=(0, 1)), rtol=1e-6)


# ----------------------------------------------------------------------------------------------- JPEG 2000 (DICOM)
@pytest.mark.parametrize("name", [CHEST_J2K, "RG3_J2KR.dcm", "MR2_J2KR.dcm", "693_J2KI.dcm", "JPEG2000.dcm"])
def test_openjpeg_binding_at_full_resolution_equals_pydicom(name: str) -> None:
    assert j2k.available(), "Pillow ships OpenJPEG; reduced JPEG 2000 decoding needs it"
    ds = pydicom.dcmread(_testfile(name))
    frame = next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    comps, head = j2k.decode(frame, 0)
    full = ds.pixel_array
    assert (head.rows, head.columns) == full.shape[-2:]
    np.testing.assert_array_equal(comps[0], full if full.ndim == 2 else full[0])


def test_j2k_resolution_level_is_the_block_average_of_the_full_image() -> None:
    ds = pydicom.dcmread(_testfile(CHEST_J2K))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    full = ds.pixel_array.astype(np.float64)
    comps, _ = j2k.decode(frame, 3)
    low = comps[0].astype(np.float64)
    assert low.shape == (reduced(1955, 3), reduced(1841, 3)) == (245, 231)  # rounded up, as OpenJPEG does
    ref = box_reduce(full, 3)
    assert np.corrcoef(low.ravel(), ref.ravel())[0, 1] > 0.99
    assert np.median(np.abs(low - ref)) < 0.01 * (full.max() - full.min())


def test_j2k_chest_film_to_224_is_5x_faster_and_scores_within_001(scorer) -> None:
    path = _testfile(CHEST_J2K)
    full, small = read_dicom(path), read_dicom(path, target=T224)
    assert small.array.shape == (245, 231) and small.meta["decode_scale"] == 1 / 8
    assert full.meta["decode_scale"] == 1.0 and full.array.shape == (1955, 1841)
    assert any("JPEG 2000 resolution level" in s and "1955x1841 -> 245x231" in s for s in small.meta["pipeline"])
    ratio = _best_of(lambda: read_dicom(path)) / _best_of(lambda: read_dicom(path, target=T224))
    assert ratio >= 5, f"reduced decode only {ratio:.1f}x faster"
    (s_full, x_full), (s_small, x_small) = scorer(full), scorer(small)
    assert 0.1 < s_full < 0.9 and abs(s_full - s_small) < 0.01, (s_full, s_small)
    assert float((x_full - x_small).abs().mean()) * 0.25 < 0.01  # model inputs agree to 1 % of the 0..1 range


@pytest.fixture(scope="module")
def transcoded_chest(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The shared data's real chest CR (JPEG baseline, 1024²) and the same pixels re-encoded as lossless J2K."""
    from openjpeg.utils import encode_array

    src = next((shared_data / "cxr" / "dicom").glob("1.2.276*.dcm"))
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array
    cs = encode_array(arr, bits_stored=int(ds.BitsStored), photometric_interpretation=2, codec_format=0)
    ds.PixelData = encapsulate([cs])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.WindowCenter, ds.WindowWidth = 128, 256  # what min..max shows for this full-range 8-bit film, made explicit
    out = tmp_path_factory.mktemp("j2k") / "chest_j2k.dcm"
    ds.save_as(out, enforce_file_format=True)
    return src, out


def test_transcoded_real_chest_j2k_decodes_reduced_with_the_same_score(transcoded_chest, scorer) -> None:
    src, j2k_path = transcoded_chest
    original, full, small = read_dicom(src), read_dicom(j2k_path), read_dicom(j2k_path, target=T224)
    np.testing.assert_allclose(full.array, original.array, atol=1e-6)  # lossless, same display
    assert small.array.shape == (256, 256) and small.meta["decode_scale"] == 0.25
    ratio = _best_of(lambda: read_dicom(j2k_path)) / _best_of(lambda: read_dicom(j2k_path, target=T224))
    assert ratio >= 3, f"reduced decode only {ratio:.1f}x faster on a 1024² film"
    assert abs(scorer(full)[0] - scorer(small)[0]) < 0.01


def test_images_without_a_voi_window_are_decoded_in_full(shared_data: Path) -> None:
    """Min..max display over a reduced image would shift every intensity: such films keep full resolution."""
    src = next((shared_data / "cxr" / "dicom").glob("1.2.276*.dcm"))
    img = read_dicom(src, target=T224)
    assert img.meta["decode_scale"] == 1.0 and img.array.shape == (1024, 1024)
    assert any("no VOI window or LUT" in s for s in img.meta["pipeline"])


# ------------------------------------------------------------------------------------------------- bombs, budgets
_BOMB = """
import sys, numpy as np, pydicom
from openjpeg.utils import encode_array
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid
cs = encode_array(np.full((16000, 16000), 100, np.uint8), bits_stored=8, photometric_interpretation=2,
                  codec_format=0, compression_ratios=[1000])
ds = Dataset()
ds.file_meta = FileMetaDataset()
ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "CR", "MONOCHROME2", 1
ds.Rows = ds.Columns = 16000
ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
ds.WindowCenter, ds.WindowWidth = 128, 256
ds.PixelData = encapsulate([cs])
ds["PixelData"].VR = "OB"
ds.save_as(sys.argv[1], enforce_file_format=True)
"""

_READ = """
import json, sys, time
from loupe.core.io import DecodeTarget, read_any
if len(sys.argv) > 3:  # make the file here, so that its pixels never sit in the test process
    from PIL import Image
    Image.new("RGB", (int(sys.argv[3]),) * 2, (90, 120, 30)).save(sys.argv[1], compress_level=9)
t0 = time.perf_counter()
try:
    img = read_any(sys.argv[1], target=DecodeTarget((224, 224)) if sys.argv[2] == "224" else None)
    res = {"shape": list(img.array.shape), "scale": img.meta["decode_scale"], "pipeline": img.meta["pipeline"]}
except Exception as exc:
    res = {"error": type(exc).__name__, "message": str(exc)}
res["seconds"] = time.perf_counter() - t0
# VmHWM: this program's own peak (ru_maxrss would carry the forking test process's peak across exec)
res["peak_mib"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps(res))
"""


def _read_in_child(path: Path, target: str, *make: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _READ, str(path), target, *make], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def j2k_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "j2k_16000.dcm"
    subprocess.run([sys.executable, "-c", _BOMB, str(path)], check=True, timeout=240)  # ~8 s, 1.8 GB, in a child
    return path


def test_16000_square_j2k_is_decoded_reduced_or_refused_never_in_full(j2k_bomb: Path) -> None:
    assert j2k_bomb.stat().st_size < 16_000  # a few KB on disk; 256 M pixels, ~9 GB through a full render
    small = _read_in_child(j2k_bomb, "224")
    assert "error" not in small, small
    assert small["shape"] == [500, 500] and small["scale"] == 1 / 32  # 5 wavelet levels: 16000 / 32
    assert small["peak_mib"] < 600 and small["seconds"] < 20, small
    full = _read_in_child(j2k_bomb, "none")
    assert full["error"] == "UnsupportedInputError" and full["peak_mib"] < 600, full
    assert "j2k_16000.dcm" in full["message"] and "decode budget" in full["message"]
    assert "model of smaller input size" in full["message"]  # says how to get it scored


def test_9400_square_png_stays_small_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb_9400.png"
    small = _read_in_child(path, "224", "9400")  # 87 KB on disk
    assert small["shape"] == [294, 294, 3] and small["scale"] == 1 / 32, small
    assert small["peak_mib"] < 600, small  # Pillow's 353 MB RGBX image, then 1/32 of it
    assert any("averaging after decoding" in s for s in small["pipeline"])
    full = _read_in_child(path, "none")  # decoded whole it would be 0.6 GB here and GBs through the transforms
    assert full["error"] == "UnsupportedInputError" and "decode budget" in full["message"], full


def test_decode_budget_refuses_by_name_before_decoding(tmp_path: Path) -> None:
    path = _testfile(CHEST_J2K)
    with pytest.raises(UnsupportedInputError, match=r"RG1_J2KR\.dcm: decoding the 1955x1841 .*decode budget of 1 MiB"):
        read_dicom(path, decode_budget=2**20)
    assert read_dicom(path, target=T224, decode_budget=8 * 2**20).array.shape == (245, 231)  # fits reduced
    png = tmp_path / "big.png"
    Image.fromarray(np.zeros((600, 800), np.uint8)).save(png)
    with pytest.raises(UnsupportedInputError, match=r"big\.png: decoding the 800x600 image needs about"):
        read_image(png, decode_budget=2**18)


def test_pillow_guard_switched_off_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(UnsupportedInputError, match=r"a\.png: Pillow's decompression-bomb limit is switched off"):
        read_image(path)


# --------------------------------------------------------------------------------------------------- JPEG / PNG
def _film(side: int) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side] / side
    base = 128 + 90 * np.sin(6 * xx) * np.cos(4 * yy) + np.random.default_rng(0).normal(0, 6, (side, side))
    return np.clip(base, 0, 255).astype(np.uint8)


def test_jpeg_uses_dct_scaling_and_matches_the_full_decode(tmp_path: Path, scorer) -> None:
    path = tmp_path / "film.jpg"
    Image.fromarray(_film(2048)).save(path, quality=92)
    full, small = read_image(path), read_image(path, target=T224)
    assert small.array.shape == (256, 256) and small.meta["decode_scale"] == 1 / 8
    assert any("JPEG DCT scaling, 2048x2048 -> 256x256" in s for s in small.meta["pipeline"])
    ref = box_reduce(full.array, 3).astype(float)
    assert np.abs(small.array.astype(float) - ref).mean() < 2.0  # grey levels of 255
    # no timing bar here: libjpeg still entropy-decodes every coefficient (most of the time at quality 92, 1.2-1.8x
    # measured); it skips the inverse DCT of 63 in 64 pixels and never allocates the full image
    assert abs(scorer(full)[0] - scorer(small)[0]) < 0.01


def test_rotated_jpeg_is_reduced_on_its_displayed_axes(tmp_path: Path) -> None:
    im = Image.fromarray(_film(2048)[:, :1024])  # 2048 rows x 1024 columns as stored
    exif = im.getexif()
    exif[0x0112] = 6  # shown rotated: 1024 rows x 2048 columns
    im.save(tmp_path / "r.jpg", exif=exif, quality=90)
    img = read_image(tmp_path / "r.jpg", target=DecodeTarget((224, 900)))
    # shown 1024 x 2048 for (224, 900): 1/2 (the columns cannot halve twice); the stored axes would allow none
    assert img.array.shape == (512, 1024) and img.meta["decode_scale"] == 1 / 2


def test_rotated_png_never_goes_below_the_target_on_its_displayed_axes(tmp_path: Path) -> None:
    im = Image.fromarray(_film(2048)[:, :1024])  # 2048 rows x 1024 columns as stored, shown 1024 x 2048
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.png", exif=exif)
    img = read_image(tmp_path / "r.png", target=DecodeTarget((900, 224)))
    assert img.meta["orientation_applied"] and img.array.shape == (1024, 2048)  # halving would give 512 < 900 rows
    img = read_image(tmp_path / "r.png", target=DecodeTarget((224, 224)))
    assert img.array.shape == (256, 512) and img.meta["decode_scale"] == 1 / 4


def test_16_bit_png_keeps_its_significant_bits_when_averaged(tmp_path: Path) -> None:
    a = np.full((1024, 1024), 800, np.uint16)
    a[10, 10] = 4095  # one bright pixel makes it 12-bit data; averaging alone would hide it (10 bits)
    path = tmp_path / "film16.png"
    Image.fromarray(a).save(path)
    img = read_image(path, target=T224)
    assert img.array.shape == (256, 256) and img.array.dtype == np.uint16
    assert img.meta["bit_depth"] == 12 and img.array.max() < 1024


def test_center_crop_models_get_every_pixel(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    Image.fromarray(_film(1024)).save(path)
    img = read_any(path, target=DecodeTarget((224, 224), "center_crop"))
    assert img.array.shape == (1024, 1024) and img.meta["decode_scale"] == 1.0


# --------------------------------------------------------------------------------------------------- read once
def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_identity_and_decode_read_the_file_once() -> None:
    path = _testfile(CHEST_J2K)
    size = path.stat().st_size
    read_dicom(path, target=T224)  # warm imports and caches
    before = _rchar()
    content_identity(path)
    read_dicom(path, target=T224)
    twice = _rchar() - before
    before = _rchar()
    with read_once(path) as held:
        ident = content_identity(path)
        img = read_dicom(path, target=T224)
    once = _rchar() - before
    assert held is not None and ident.sha256 == held.sha256 and img.array.shape == (245, 231)
    assert twice > 1.9 * size and once < 1.1 * size, (twice / size, once / size)


def test_read_once_never_opens_what_is_not_a_small_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with read_once(fifo) as held:  # would block forever if opened
        assert held is None
    with pytest.raises(UnsupportedInputError, match="not a regular file"):
        content_identity(fifo)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * 4096)
    with read_once(big, limit=1024) as held:
        assert held is None
        assert content_identity(big).size == 4096  # hashed from the file as before


def test_held_bytes_are_what_the_readers_decode(tmp_path: Path) -> None:
    """A file replaced after it was read once is decoded as it was hashed (identity and pixels agree)."""
    path = tmp_path / "film.png"
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    with read_once(path):
        Image.fromarray(np.full((32, 32), 200, np.uint8)).save(path)
        assert int(read_image(path).array[0, 0]) == 7
