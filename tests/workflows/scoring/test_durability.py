"""Scoring under SIGKILL at random points, again and again, then --resume: the final table is the uninterrupted
one (no duplicate, no missing row); a truncated or empty part file is reported by name, never a traceback."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from loupe.core.errors import ConfigError
from loupe.workflows.scoring import ScoreOptions, score

N = 60


def _films(root: Path) -> Path:
    rng = np.random.default_rng(3)
    root.mkdir()
    for i in range(N):
        Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(root / f"film_{i:03d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    return root


def _cmd(root: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loupe.workflows.cli", "score", "cxr", "--input", str(root), "--model",
            f"local-dir:{model_dir}", "--out", str(out), "--no-track", "--batch-size", "2", "--num-workers", "1",
            *extra]  # fmt: skip


def test_repeated_sigkill_then_resume_gives_the_uninterrupted_table(
    tmp_path: Path, model_dir: Path, same_table
) -> None:
    root = _films(tmp_path / "in")
    ref = tmp_path / "ref.parquet"
    score(ScoreOptions(domain="cxr", input=root, model=f"local-dir:{model_dir}", out=ref, track=False,
                       batch_size=2, num_workers=0))  # fmt: skip
    out = tmp_path / "p.parquet"
    parts = out.with_name(out.name + ".parts")
    rng = random.Random(11)
    kills = 0
    for round_ in range(3):
        extra = ("--resume",) if round_ else ()
        proc = subprocess.Popen(_cmd(root, model_dir, out, *extra), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        target = len(list(parts.glob("part-*.parquet"))) + rng.randint(1, 6)
        deadline = time.monotonic() + 120
        while len(list(parts.glob("part-*.parquet"))) < target and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))  # anywhere: between parts, inside a write, before a rename
        proc.send_signal(signal.SIGKILL)
        kills += proc.wait(timeout=30) == -signal.SIGKILL
    assert kills >= 2, "the runs finished before they could be killed"
    done = subprocess.run(_cmd(root, model_dir, out, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]  # broken.png failed, the rest scored
    a = pd.read_parquet(out).sort_values("path").reset_index(drop=True)
    b = pd.read_parquet(ref).sort_values("path").reset_index(drop=True)
    assert len(a) == N + 1 and not a.path.duplicated().any()
    same_table(a, b, atol=1e-6, skip=("artifacts", "scored_at", "read_ms", "worker"))


def test_a_damaged_part_is_reported_by_name(tmp_path: Path, model_dir: Path) -> None:
    root = _films(tmp_path / "in")
    out = tmp_path / "p.parquet"
    parts = out.with_name(out.name + ".parts")
    proc = subprocess.Popen(_cmd(root, model_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.parquet"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    victims = sorted(parts.glob("part-*.parquet"))[1:3]
    originals = [v.read_bytes() for v in victims]
    for victim, data, damaged in zip(victims, originals, (originals[0][: len(originals[0]) // 2], b""), strict=True):
        victim.write_bytes(damaged)  # a truncated part, then an empty one
        with pytest.raises(ConfigError) as err:
            score(ScoreOptions(domain="cxr", input=root, model=f"local-dir:{model_dir}", out=out, mode="resume",
                               track=False, num_workers=0))  # fmt: skip
        msg = str(err.value)
        assert str(victim) in msg and "cannot be read" in msg and "--overwrite" in msg
        assert victim.read_bytes() == damaged  # reported, left as it was: not rebuilt, not dropped
        cli = subprocess.run(_cmd(root, model_dir, out, "--resume"), capture_output=True, text=True, timeout=120)
        assert cli.returncode == 2 and victim.name in cli.stdout + cli.stderr
        assert "Traceback" not in cli.stdout + cli.stderr
        victim.write_bytes(data)
