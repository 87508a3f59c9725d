"""``loupe bench``: the project's benchmarks, each reported as a ratio measured in one run.

- ``scoring-memory``: peak RSS of ``loupe score`` over N small vs N large input folders, each in a fresh child
  process (``os.wait4`` gives that child's own peak, the largest of it and its DataLoader workers; a sampler adds
  the peak of the whole process tree summed). Flat memory means a ratio near 1.
- ``throughput``: images/s of the whole scoring path (read, preprocess, forward, write the table) vs the bare model
  forward on ready tensors of the same size and batch, in the same process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loupe.core.models import WeightSpec, build_model, save_model


def bench_model(folder: Path, arch: str = "vit_micro_patch8", size: int = 64) -> Path:
    """A random-weight CXR model folder (benchmarks measure the pipeline, not accuracy)."""
    spec = WeightSpec(
        name=f"bench-{arch}",
        architecture=arch,
        input_size=(1, size, size),
        mean=(0.5,),
        std=(0.25,),
        label_names=("Effusion", "Pneumonia"),
        domain="cxr",
        description="benchmark model with random weights",
    )
    torch.manual_seed(0)
    model, _ = build_model(spec)
    return save_model(model.eval(), spec, folder)


def sample_films(folder: Path, count: int = 16, side: int = 512) -> list[Path]:
    """``count`` distinct 8-bit grey PNGs of ``side``² pixels (smooth structure plus noise, like a film)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = []
    for i in range(count):
        base = 128 + 90 * np.sin(6 * xx + i) * np.cos(4 * yy - i) + rng.normal(0, 12, (side, side))
        p = folder / f"film_{i:03d}.png"
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(p, compress_level=1)
        out.append(p)
    return out


def input_folder(folder: Path, sources: Sequence[Path], n: int) -> Path:
    """``n`` inputs as symlinks cycling over ``sources`` (distinct paths, shared bytes: the pipeline is measured)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"in_{i:06d}{sources[i % len(sources)].suffix}").symlink_to(sources[i % len(sources)])
    return folder


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def measure_score_run(cmd: list[str]) -> dict[str, float]:
    """Run ``cmd`` as a child; its peak RSS (MiB, own + largest descendant via wait4) and peak tree sum (MiB)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"tree": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["tree"] = max(peak["tree"], _tree_rss(proc.pid))
            stop.wait(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"benchmark child failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return {
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "peak_tree_rss_mib": peak["tree"] / 2**20,
        "seconds": time.perf_counter() - t0,
    }


def scoring_memory(sizes: Sequence[int] = (200, 2000), num_workers: int = 2, batch_size: int = 32) -> dict[str, Any]:
    """Peak RSS of ``loupe score`` for each input count in ``sizes``, and the ratio largest / smallest."""
    with tempfile.TemporaryDirectory(prefix="loupe-bench-") as tmp:
        root = Path(tmp)
        model = bench_model(root / "model")
        films = sample_films(root / "films")
        runs = {}
        for n in sizes:
            folder = input_folder(root / f"in{n}", films, n)
            cmd = [
                sys.executable, "-m", "loupe.workflows.cli", "score", "cxr", "--input", str(folder),
                "--model", f"local-dir:{model}", "--out", str(root / f"p{n}.parquet"), "--no-track",
                "--num-workers", str(num_workers), "--batch-size", str(batch_size),
            ]  # fmt: skip
            runs[n] = measure_score_run(cmd)
    small, large = runs[min(sizes)], runs[max(sizes)]
    return {
        "runs": {str(n): r for n, r in runs.items()},
        "ratio_peak_rss": large["peak_rss_mib"] / small["peak_rss_mib"],
        "ratio_peak_tree_rss": large["peak_tree_rss_mib"] / small["peak_tree_rss_mib"],
        "num_workers": num_workers,
        "batch_size": batch_size,
    }


def throughput(
    n: int = 512, arch: str = "vit_tiny_patch16", size: int = 224, batch_size: int = 32, num_workers: int | None = None
) -> dict[str, Any]:
    """Images/s of the scoring path vs the bare forward, same model, batch size and process."""
    from loupe.core.models import load_model_dir
    from loupe.workflows.scoring import ScoreOptions, score

    with tempfile.TemporaryDirectory(prefix="loupe-bench-") as tmp:
        root = Path(tmp)
        folder = bench_model(root / "model", arch, size)
        inputs = input_folder(root / "in", sample_films(root / "films"), n)
        model, spec = load_model_dir(folder)
        x = torch.randn(batch_size, *spec.input_size)
        with torch.inference_mode():
            model(x)  # warm-up
            t0 = time.perf_counter()
            for _ in range(-(-n // batch_size)):
                model(x)
            bare = (-(-n // batch_size) * batch_size) / (time.perf_counter() - t0)
        opts = ScoreOptions(
            domain="cxr",
            input=inputs,
            model=f"local-dir:{folder}",
            out=root / "p.parquet",
            track=False,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        s = score(opts)
    return {
        "inputs": n,
        "arch": arch,
        "input_size": list(spec.input_size),
        "batch_size": batch_size,
        "bare_forward_img_s": bare,
        "scoring_img_s": s.images_per_s,
        "ratio_scoring_over_bare": s.images_per_s / bare,
        "threads": torch.get_num_threads(),
    }
