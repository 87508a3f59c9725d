"""``loupe bench``: the project's benchmarks, each reported as a ratio measured in one run, for any domain and model.

- ``scoring-memory``: peak RSS of ``loupe score`` over N small vs N large input folders, each in a fresh child
  process (``os.wait4`` gives that child's own peak, the largest of it and its DataLoader workers; a sampler adds
  the peak of the whole process tree summed). Flat memory means a ratio near 1.
- ``throughput``: inputs/s of the whole scoring path (read, preprocess, forward, write the table) vs the bare model
  forward on ready tensors of the same size and batch, in the same process.
- ``startup``: the fixed cost of a command — ``loupe --help``, and ``loupe score`` of one input (tracked and not)
  against a bare script that loads the same model, reads the same file and runs one forward — in fresh processes.

Without ``--model`` a benchmark scores a random-weight model of ``--arch`` (the pipeline is measured, not the
accuracy); inputs come from the domain's ``bench_inputs`` or, by default, grey PNG films.
"""

from __future__ import annotations

import os
import statistics
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


def bench_model(folder: Path, domain: str = "core", arch: str = "vit_micro_patch8", size: int = 64) -> Path:
    """A random-weight model folder of ``domain`` (benchmarks measure the pipeline, not accuracy)."""
    spec = WeightSpec(
        name=f"bench-{arch}",
        architecture=arch,
        input_size=(1, size, size),
        mean=(0.5,),
        std=(0.25,),
        label_names=("finding_a", "finding_b"),
        domain=domain,
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


def domain_inputs(domain: str, folder: Path, count: int = 16) -> list[Path]:
    """``count`` realistic inputs of ``domain`` (its ``bench_inputs``), else grey PNG films."""
    from loupe.core.registry import DOMAINS, discover_domains

    discover_domains()
    make = DOMAINS.get(domain).bench_inputs
    return make(folder, count) if make is not None else sample_films(folder, count)


def input_folder(folder: Path, sources: Sequence[Path], n: int) -> Path:
    """``n`` inputs as hard links cycling over ``sources`` (distinct paths, shared bytes: the pipeline is measured;
    copies where the sources sit on another file system). Not symlinks: scoring refuses links out of its root."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src, dst = sources[i % len(sources)], folder / f"in_{i:06d}{sources[i % len(sources)].suffix}"
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return folder


def _model_ref(root: Path, domain: str, model: str | None, arch: str, size: int) -> str:
    return model or f"local-dir:{bench_model(root / 'model', domain, arch, size)}"


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


def measure_score_run(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd`` as a child; its peak RSS (MiB, own + largest descendant via wait4) and peak tree sum (MiB)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
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


def _score_cmd(domain: str, inputs: Path, model: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loupe.workflows.cli", "score", domain, "--input", str(inputs), "--model", model,
            "--out", str(out), *extra]  # fmt: skip


def scoring_memory(
    sizes: Sequence[int] = (200, 2000),
    num_workers: int = 2,
    batch_size: int = 32,
    domain: str = "cxr",
    model: str | None = None,
    arch: str = "vit_micro_patch8",
) -> dict[str, Any]:
    """Peak RSS of ``loupe score DOMAIN`` for each input count in ``sizes``, and the ratio largest / smallest."""
    with tempfile.TemporaryDirectory(prefix="loupe-bench-") as tmp:
        root = Path(tmp)
        ref = _model_ref(root, domain, model, arch, 64)
        films = domain_inputs(domain, root / "films")
        runs = {}
        for n in sizes:
            folder = input_folder(root / f"in{n}", films, n)
            extra = ("--no-track", "--num-workers", str(num_workers), "--batch-size", str(batch_size))
            runs[n] = measure_score_run(_score_cmd(domain, folder, ref, root / f"p{n}.parquet", *extra))
    small, large = runs[min(sizes)], runs[max(sizes)]
    return {
        "domain": domain,
        "runs": {str(n): r for n, r in runs.items()},
        "ratio_peak_rss": large["peak_rss_mib"] / small["peak_rss_mib"],
        "ratio_peak_tree_rss": large["peak_tree_rss_mib"] / small["peak_tree_rss_mib"],
        "num_workers": num_workers,
        "batch_size": batch_size,
    }


def throughput(
    n: int = 512,
    arch: str = "vit_tiny_patch16",
    size: int = 224,
    batch_size: int = 32,
    num_workers: int | None = None,
    domain: str = "cxr",
    model: str | None = None,
    sources: Sequence[Path] | None = None,
) -> dict[str, Any]:
    """Inputs/s of the scoring path vs the bare forward, same model, batch size and process; ``sources``: the files
    the ``n`` inputs cycle over (default: the domain's `domain_inputs`)."""
    from loupe.workflows.scoring import ScoreOptions, resolve_model, score

    with tempfile.TemporaryDirectory(prefix="loupe-bench-") as tmp:
        root = Path(tmp)
        ref = _model_ref(root, domain, model, arch, size)
        inputs = input_folder(root / "in", sources or domain_inputs(domain, root / "films"), n)
        rm = resolve_model(ref, domain, _registry(ref))
        x = torch.randn(batch_size, *rm.spec.input_size)
        with torch.inference_mode():
            rm.model(x)  # warm-up
            t0 = time.perf_counter()
            for _ in range(-(-n // batch_size)):
                rm.model(x)
            bare = (-(-n // batch_size) * batch_size) / (time.perf_counter() - t0)
        opts = ScoreOptions(domain=domain, input=inputs, model=ref, out=root / "p.parquet", track=False,
                            batch_size=batch_size, num_workers=num_workers)  # fmt: skip
        s = score(opts)
        spec = rm.spec
        rm.close()
    return {
        "domain": domain,
        "inputs": n,
        "arch": spec.architecture,
        "input_size": list(spec.input_size),
        "batch_size": batch_size,
        "bare_forward_img_s": bare,
        "scoring_img_s": s.images_per_s,
        "ratio_scoring_over_bare": s.images_per_s / bare,
        "threads": torch.get_num_threads(),
    }


def _registry(ref: str):
    if ref.startswith(("models:/", "runs:/")):
        from loupe.core.tracking import make_tracker

        return make_tracker()
    return None


_BARE = """
import sys, torch
from loupe.core.io import read_any
from loupe.core.models import load_model_dir
from loupe.core.transforms import ModelInput
model, spec = load_model_dir(sys.argv[1])
img = read_any(sys.argv[2])
x = ModelInput(spec)(img.array, img.meta.get("bits_stored") or img.meta.get("bit_depth"))
with torch.inference_mode():
    model(x[None])
"""


def _wall(cmd: list[str], env: dict[str, str], repeats: int) -> float:
    """Median wall time (s) of ``cmd`` in fresh processes."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def startup(domain: str = "cxr", arch: str = "vit_micro_patch8", size: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Fixed costs in fresh processes (medians of ``repeats``): ``loupe --help``; the bare load + read + forward of
    a model; ``loupe score`` of one input with that model (``local-dir:``), tracked in a local MLflow store that
    already exists (its one-time creation is reported apart) and with ``--no-track``."""
    with tempfile.TemporaryDirectory(prefix="loupe-bench-") as tmp:
        root = Path(tmp)
        model = bench_model(root / "model", domain, arch, size)
        one = input_folder(root / "one", domain_inputs(domain, root / "films", 1), 1)
        env = {**os.environ, "LOUPE_HOME": str(root / "home"), "MLFLOW_TRACKING_URI": ""}
        env.pop("MLFLOW_TRACKING_URI")
        cli = [sys.executable, "-m", "loupe.workflows.cli"]
        score = _score_cmd(domain, one, f"local-dir:{model}", root / "p.parquet", "--overwrite")
        t0 = time.perf_counter()
        subprocess.run(score, env=env, capture_output=True, check=False)  # creates the store (one-time)
        first = time.perf_counter() - t0
        out = {
            "domain": domain,
            "repeats": repeats,
            "help_s": _wall([*cli, "--help"], env, repeats),
            "bare_load_forward_s": _wall(
                [sys.executable, "-c", _BARE, str(model), str(next(one.iterdir()))], env, repeats
            ),  # fmt: skip
            "score_one_tracked_s": _wall(score, env, repeats),
            "score_one_untracked_s": _wall([*score, "--no-track"], env, repeats),
            "first_tracked_run_s": first,
        }
    out["ratio_tracked_over_bare"] = out["score_one_tracked_s"] / out["bare_load_forward_s"]
    out["ratio_untracked_over_bare"] = out["score_one_untracked_s"] / out["bare_load_forward_s"]
    return out
