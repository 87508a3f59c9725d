"""Acceptance on real films: 621 NIH radiographs + corrupt files; SIGKILL half-way, --resume, same table."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

# 621 real films scored three times (30 s): the kill-and-resume mechanism is in the default suite through
# test_durability.py (three kills) and the pathology slide tests; this one runs with -m slow.
pytestmark = [pytest.mark.realdata, pytest.mark.slow]
N_FILMS = 621
#: The films are symlinked into a temporary folder: their real folder is named as an allowed root
NIH_IMAGES = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "cxr" / "nih14" / "images"


def _cmd(inputs: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "loupe.workflows.cli", "score", "cxr", "--input", str(inputs),
        "--model", f"local-dir:{model_dir}", "--out", str(out), "--no-track", "--batch-size", "16",
        "--num-workers", "1", "--allow-root", str(NIH_IMAGES), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def nih_folder(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 621 films (symlinked) plus four corrupt files, as a folder to walk."""
    films = sorted((shared_data / "cxr" / "nih14" / "images").glob("*.png"))
    assert len(films) == N_FILMS
    root = tmp_path_factory.mktemp("nih")
    for f in films:
        (root / f.name).symlink_to(f)
    (root / "broken").mkdir()
    (root / "broken" / "truncated.png").write_bytes(films[0].read_bytes()[:2000])
    (root / "broken" / "empty.png").write_bytes(b"")
    (root / "broken" / "not_dicom.dcm").write_bytes(b"\x00" * 300)
    (root / "broken" / "header_only.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI")
    return root


def _load(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path).sort_values("path").reset_index(drop=True)


def test_sigkill_then_resume_gives_the_uninterrupted_table(
    nih_folder: Path, model_dir: Path, tmp_path: Path, same_table
) -> None:
    full = tmp_path / "full.parquet"
    done = subprocess.run(_cmd(nih_folder, model_dir, full), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]  # some inputs failed, all others scored
    ref = _load(full)
    assert (ref.status == "ok").sum() == N_FILMS
    failed = ref[ref.status != "ok"]
    assert sorted(Path(p).name for p in failed.path) == [
        "empty.png",
        "header_only.dcm",
        "not_dicom.dcm",
        "truncated.png",
    ]

    out = tmp_path / "killed.parquet"
    parts = out.with_name(out.name + ".parts")
    proc = subprocess.Popen(_cmd(nih_folder, model_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list(parts.glob("part-*.parquet"))) < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed half-way"
    committed = pd.concat([pd.read_parquet(p) for p in parts.glob("part-*.parquet")])
    assert 0 < len(committed) < N_FILMS and not out.exists()

    resumed = subprocess.run(_cmd(nih_folder, model_dir, out, "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 1, resumed.stderr[-2000:]
    got = _load(out)
    assert not got.path.duplicated().any() and len(got) == len(ref) == N_FILMS + 4
    same_table(got, ref, atol=1e-6)
    # the resumed run skipped what was committed as ok (failed rows are retried)
    assert f"{(committed.status == 'ok').sum()} already scored" in resumed.stdout
