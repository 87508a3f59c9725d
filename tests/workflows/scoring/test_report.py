"""What a person watching a scoring run sees: a rate that counts real work, and a clear word when interrupted."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from loupe.workflows.scoring.report import progress_bar


def test_the_rate_counts_only_inputs_this_run_scored(monkeypatch) -> None:
    clock = iter([100.0, 110.0])  # on_start at t=100, the progress call 10 s later
    monkeypatch.setattr("loupe.workflows.scoring.report.time.perf_counter", lambda: next(clock))
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    with progress_bar(console) as (on_start, on_progress):
        on_start(1000)
        on_progress(600, 1, 550)  # 600 inputs done, 550 of them resumed: 50 scored in 10 s
    shown = console.file.getvalue()
    assert "600/1000" in shown and "5.0 inputs/s" in shown and "550 resumed" in shown and "1 failed" in shown
    assert "ETA 80 s" in shown  # 400 left at 5 inputs/s, not at the 60 inputs/s the resumed rows suggest


def test_interrupted_scoring_says_what_was_kept_and_how_to_resume(tmp_path: Path, model_dir: Path) -> None:
    import numpy as np
    from PIL import Image

    root = tmp_path / "in"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(150):
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(root / f"f{i:03d}.png")
    out = tmp_path / "p.parquet"
    cmd = [
        sys.executable,
        "-m",
        "loupe.workflows.cli",
        "score",
        "cxr",
        "--input",
        str(root),
        "--model",
        f"local-dir:{model_dir}",
        "--out",
        str(out),
        "--no-track",
        "--batch-size",
        "4",
        "--num-workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    parts = out.with_name("p.parquet.parts")
    deadline = time.monotonic() + 120
    while len(list(parts.glob("part-*.parquet"))) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted:" in err and "are kept in" in err and str(parts) in err.replace("\n", "")
    assert f"--out {out} --resume" in err.replace("\n", "")
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
