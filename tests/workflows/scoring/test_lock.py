"""One writer per predictions table: a second `loupe score` on the same --out is refused (exit 2, naming the
holder), and a holder killed with SIGKILL leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def _score(root: Path, model_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "loupe.workflows.cli", "score", "cxr", "-i", str(root), "-m",
           f"local-dir:{model_dir}", "-o", str(out), "--no-track", "--num-workers", "0", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(
    inputs: tuple[Path, dict], model_dir: Path, tmp_path: Path
) -> None:
    root, files = inputs
    out = tmp_path / "p.parquet"
    # the holder forks a child (as DataLoader workers are forked) that outlives it: the lock must not pass to it
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, time; from pathlib import Path; from loupe.workflows.scoring.lock import output_lock\n"
        f"with output_lock(Path({str(out)!r})):\n"
        "    child = os.fork()\n"
        "    if child == 0:\n        time.sleep(600); os._exit(0)\n"
        "    print('held', child, flush=True); time.sleep(600)"
    )], stdout=subprocess.PIPE, text=True)  # fmt: skip
    child = 0
    try:
        word, child = holder.stdout.readline().split()
        assert word == "held"
        refused = _score(root, model_dir, out)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        message = " ".join((refused.stdout + refused.stderr).split())
        assert f"being written by another loupe score (pid {holder.pid} on" in message
        assert not out.exists() and not out.with_name(out.name + ".parts").exists()  # nothing of it was touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    t0 = time.monotonic()
    try:
        done = _score(root, model_dir, out)  # the kernel dropped the killed holder's lock; its live child has none
    finally:
        if child:
            os.kill(int(child), signal.SIGKILL)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    assert len(pd.read_parquet(out)) == len(files["good"]) + len(files["bad"])
    assert time.monotonic() - t0 < 120
