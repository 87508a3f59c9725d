"""The input pipeline's benchmarks: does reading keep up with the model, do reduced decodes pay, does memory stay flat.

Each function returns a dict of figures measured in one run (ratios, so that a busy machine shifts both sides):

- `e2e_vs_model`: inputs/s of ``loupe score`` over real NIH ChestX-ray14 PNGs against the bare forward of the same
  model on ready tensors (`loupe.workflows.bench.throughput`), for ViT-S/16 and ViT-B/16, and the same comparison
  in CPU seconds per image (`cpu_per_image`), which a busy shared machine hardly moves;
- `j2k_reduced_vs_full`: a real JPEG 2000 chest CR (pydicom-data ``RG1_J2KR``, and the shared chest film transcoded
  to JPEG 2000) read for a 224 px model at its reduced resolution level vs in full: time ratio and the change of
  the model's score (a random-weight ViT; with ``trained``, also the suite's demo model, trained for seconds);
- `read_once`: bytes read from disk per input by identity + decoding, before (hash, then decode) and after
  (`loupe.core.io.identity.read_once`), and the time of each;
- `memory_over_batches`: the process tree's peak RSS batch by batch over 50 consecutive scoring batches.

`io_sections(quick)` runs them all (``quick``: small models and counts, for CI) for ``loupe bench speed``.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from loupe.core.paths import shared_data_dir

CHEST_J2K = "RG1_J2KR.dcm"  # pydicom-data: a CR chest film, 1955 x 1841, 15-bit, lossless JPEG 2000 (4.2 MB)


def nih_pngs(limit: int | None = None) -> list[Path]:
    """The shared data's NIH ChestX-ray14 films (512² 8-bit PNG); a clear error when the folder is absent."""
    data = shared_data_dir()
    folder = data / "cxr" / "nih14" / "images" if data else None
    files = sorted(folder.glob("*.png")) if folder is not None and folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            "the NIH ChestX-ray14 films are not there (shared/data/cxr/nih14/images beside the checkout); "
            "set LOUPE_SHARED_DATA to the folder that holds cxr/nih14"
        )
    return files[:limit] if limit else files


# ------------------------------------------------------------------------------------------ end to end vs model
def e2e_vs_model(
    archs: Sequence[str] = ("vit_small_patch16", "vit_base_patch16"),
    n: int = 256,
    batch_size: int = 32,
    num_workers: int | None = None,
    model: str | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Scoring real NIH PNGs end to end vs the bare forward, per architecture (random weights, 224 px, grey), or
    for ``model`` (a trained one) alone. ``ratio_scoring_over_bare`` is the share of model-only throughput kept;
    with ``repeats`` > 1 each measurement is repeated and the median ratio reported (on a shared machine a busy
    spell can fall on either side of one ratio)."""
    from loupe.workflows.bench import throughput

    sources = nih_pngs(64)
    runs = {}
    for arch in [model] if model else archs:
        kw = {"model": model} if model else {"arch": arch}
        tries = [throughput(n=n, size=224, batch_size=batch_size, num_workers=num_workers, domain="cxr",
                            sources=sources, **kw) for _ in range(repeats)]  # fmt: skip
        ratios = sorted(t["ratio_scoring_over_bare"] for t in tries)
        runs[arch] = {**tries[0], "ratios": ratios, "median_ratio": ratios[len(ratios) // 2]}
        for k in ("bare_forward_img_s", "scoring_img_s") if repeats > 1 else ():
            runs[arch][k] = sorted(t[k] for t in tries)[repeats // 2]
    cpu = {arch: cpu_per_image(arch) for arch in ([] if model else archs)}
    return {"inputs": "NIH ChestX-ray14 PNG, 512² 8-bit", "runs": runs, "cpu": cpu,
            "worst_ratio": min(r["median_ratio"] for r in runs.values()),
            "worst_cpu_bound_ratio": min((c["cpu_bound_ratio"] for c in cpu.values()), default=None)}  # fmt: skip


def cpu_per_image(arch: str = "vit_small_patch16", n_read: int = 64, batches: int = 2, batch_size: int = 32) -> dict:
    """CPU seconds per image of the reading side (identity, decode, preprocessing: `produce_packets` in this process
    with one torch thread, as a DataLoader worker runs it) and of the bare forward (this process's threads), and the
    share of a CPU-bound machine's throughput the model keeps: model / (model + reading). CPU time hardly moves
    when other jobs share the machine, where wall-clock ratios can swing by 2x."""
    from loupe.core.io.identity import content_identity
    from loupe.core.models import build_model, load_model_dir
    from loupe.core.units import single_image_units
    from loupe.workflows.bench import bench_model
    from loupe.workflows.scoring.produce import Producer, produce_packets

    files = nih_pngs(n_read)
    with tempfile.TemporaryDirectory(prefix="loupe-bench-cpu-") as tmp:
        _, spec = load_model_dir(bench_model(Path(tmp) / "m", "cxr", arch, 224))

    prod = Producer(root=str(files[0].parent), read_units=single_image_units, identity=content_identity, spec=spec,
                    batch_size=batch_size)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        list(produce_packets(prod, [str(f) for f in files[:4]]))  # warm
        c0 = time.process_time()
        packets = list(produce_packets(prod, [str(f) for f in files]))
        read = (time.process_time() - c0) / len(files)
    finally:
        torch.set_num_threads(threads)
    assert sum(p.images.shape[0] for p in packets if p.images is not None) == len(files)
    model, _ = build_model(spec)
    x = torch.randn(batch_size, *spec.input_size)
    with torch.inference_mode():
        model.eval()(x)
        c0 = time.process_time()
        for _ in range(batches):
            model(x)
        forward = (time.process_time() - c0) / (batches * batch_size)
    return {"arch": arch, "read_cpu_s_per_image": read, "forward_cpu_s_per_image": forward,
            "cpu_bound_ratio": forward / (forward + read), "threads": threads}  # fmt: skip


# ---------------------------------------------------------------------------------------- JPEG 2000 reduced decode
def _best_of(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _scorer(spec, model) -> Callable[[Any], float]:
    from loupe.core.models.heads import model_outputs, to_scores
    from loupe.core.transforms import ModelInput

    prep = ModelInput(spec)

    def run(img) -> float:
        x = prep(img.array if img.array.ndim == 2 else img.array[0], img.meta.get("bits_stored"))
        with torch.inference_mode():
            return float(to_scores(model_outputs(model, x[None])["logits"], spec.task)[0].max())

    return run


def _random_scorer(arch: str) -> tuple[Any, Callable[[Any], float]]:
    from loupe.core.models import WeightSpec, build_model

    torch.manual_seed(0)
    spec = WeightSpec(name=f"bench-{arch}", architecture=arch, task="binary", input_size=(1, 224, 224),
                      mean=(0.5,), std=(0.25,), label_names=("finding",))  # fmt: skip
    model, _ = build_model(spec)
    # unit-scale logits: scores in the sigmoid's steep part, where input changes show (not saturated at 0 or 1)
    torch.nn.init.normal_(model.head.weight, std=model.head.weight.shape[1] ** -0.5)
    torch.nn.init.zeros_(model.head.bias)
    return spec, _scorer(spec, model.eval())


def j2k_files(folder: Path) -> dict[str, Path]:
    """Real JPEG 2000 chest DICOM: pydicom-data's ``RG1_J2KR`` and, when the shared data is there, its SIIM chest
    film (JPEG baseline, 1024²) re-encoded losslessly as JPEG 2000 (with the window its min..max display means)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    out = {}
    p = get_testdata_file(CHEST_J2K, download=False)
    if p:
        out["RG1_J2KR"] = Path(p)  # CR chest, 1955 x 1841, 15-bit, lossless
    data = shared_data_dir()
    src = next((data / "cxr" / "dicom").glob("1.2.276*.dcm"), None) if data else None
    if src is not None:
        from openjpeg.utils import encode_array

        ds = pydicom.dcmread(src)
        cs = encode_array(ds.pixel_array, bits_stored=int(ds.BitsStored), photometric_interpretation=2,
                          codec_format=0)  # fmt: skip
        ds.PixelData, ds.file_meta.TransferSyntaxUID = encapsulate([cs]), JPEG2000Lossless
        ds.WindowCenter, ds.WindowWidth = 128, 256
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / "siim_chest_j2k.dcm", enforce_file_format=True)
        out["SIIM_chest_as_J2K"] = folder / "siim_chest_j2k.dcm"  # 1024 x 1024, 8-bit, lossless
    if not out:
        raise FileNotFoundError("no JPEG 2000 chest DICOM: pip install pydicom-data")
    return out


def j2k_reduced_vs_full(arch: str = "vit_small_patch16", repeats: int = 5, trained: bool = False) -> dict[str, Any]:
    """Reading each `j2k_files` film for a 224 px model (reduced) vs in full: best-of-``repeats`` seconds, their
    ratio, the decode scale, and the score change of a random-weight ``arch`` (and of the demo model when
    ``trained``, at its own input size)."""
    from loupe.core.io import DecodeTarget, read_dicom

    spec, score = _random_scorer(arch)
    target = DecodeTarget.for_model(spec.input_size, spec.resize_mode)
    demo = _demo_scorer() if trained else None
    out: dict[str, Any] = {"model": f"{arch} (random weights, unit-scale logits), 224 px", "files": {}}
    with tempfile.TemporaryDirectory(prefix="loupe-bench-j2k-") as tmp:
        for name, path in j2k_files(Path(tmp)).items():
            full, small = read_dicom(path), read_dicom(path, target=target)
            t_full = _best_of(lambda p=path: read_dicom(p), repeats)
            t_small = _best_of(lambda p=path: read_dicom(p, target=target), repeats)
            row = {"full_s": t_full, "reduced_s": t_small, "speedup": t_full / t_small,
                   "decode_scale": small.meta["decode_scale"], "reduced_shape": list(small.array.shape),
                   "full_shape": list(full.array.shape), "score_full": score(full),
                   "score_reduced": score(small)}  # fmt: skip
            row["score_change"] = abs(row["score_full"] - row["score_reduced"])
            if demo is not None:
                dspec, dscore = demo
                dsmall = read_dicom(path, target=DecodeTarget.for_model(dspec.input_size, dspec.resize_mode))
                row["demo_model"] = {"decode_scale": dsmall.meta["decode_scale"],
                                     "score_change": abs(dscore(full) - dscore(dsmall))}  # fmt: skip
            out["files"][name] = row
    rows = out["files"].values()
    out["chest_film_speedup"] = out["files"].get("RG1_J2KR", {}).get("speedup")  # the full-size film
    out["min_speedup"] = min(r["speedup"] for r in rows)
    out["max_score_change"] = max(r["score_change"] for r in rows)
    if trained:
        out["demo_model"] = demo[0].description
        out["max_score_change_demo_model"] = max(r["demo_model"]["score_change"] for r in rows)
    return out


def _demo_scorer() -> tuple[Any, Callable[[Any], float]]:
    """The suite's CXR demo model (a small ViT trained for seconds on PneumoniaMNIST), as (spec, scorer)."""
    from loupe.core.models import load_model_dir
    from loupe.domains.cxr.demo import demo_model

    with tempfile.TemporaryDirectory(prefix="loupe-bench-demo-") as tmp:
        model, spec = load_model_dir(demo_model(Path(tmp), fast=True))
    return spec, _scorer(spec, model.eval())


# ----------------------------------------------------------------------------------------------------- read once
def _rchar() -> int | None:
    try:
        with open("/proc/self/io") as fh:
            return int(next(line for line in fh if line.startswith("rchar:")).split()[1])
    except (OSError, StopIteration):
        return None


def read_once(files: Sequence[Path] | None = None, repeats: int = 3) -> dict[str, Any]:
    """Bytes read (``/proc/self/io`` rchar, Linux) and seconds per input for identity + decoding: hashing, then
    decoding from the file (before) vs one read that both hash and decode take (after)."""
    from loupe.core.io import DecodeTarget, read_any
    from loupe.core.io.identity import content_identity
    from loupe.core.io.identity import read_once as hold

    files = list(files) if files is not None else _read_once_files()
    target = DecodeTarget((224, 224))
    size = sum(f.stat().st_size for f in files)

    def before() -> None:
        for f in files:
            content_identity(f)
            read_any(f, target=target)

    def after() -> None:
        for f in files:
            with hold(f):
                content_identity(f)
                read_any(f, target=target)

    res: dict[str, Any] = {"files": len(files), "bytes": size}
    for name, fn in (("before", before), ("after", after)):
        fn()  # warm
        r0 = _rchar()
        fn()
        r1 = _rchar()
        ratio = (r1 - r0) / size if r0 is not None and r1 is not None else None
        res[name] = {"seconds_per_file": _best_of(fn, repeats) / len(files), "bytes_read_over_size": ratio}
    res["time_ratio_after_over_before"] = res["after"]["seconds_per_file"] / res["before"]["seconds_per_file"]
    return res


def _read_once_files() -> list[Path]:
    from pydicom.data import get_testdata_file

    files = nih_pngs(32)
    p = get_testdata_file(CHEST_J2K, download=False)
    return files + ([Path(p)] if p else [])


# ------------------------------------------------------------------------------------------- memory over batches
def memory_over_batches(
    batches: int = 50,
    batch_size: int = 16,
    arch: str = "vit_tiny_patch16",
    size: int = 224,
    num_workers: int = 2,
) -> dict[str, Any]:
    """Score ``batches`` x ``batch_size`` NIH PNGs in this process (DataLoader with ``num_workers``), sampling the
    process tree's RSS every 20 ms; per batch, the peak since the previous one. ``growth``: the peak of the last
    10 batches over the peak of batches 6-15 (after warm-up), minus 1."""
    from loupe.workflows.bench import _tree_rss, bench_model, input_folder
    from loupe.workflows.scoring import ScoreOptions, score

    peaks: list[int] = []
    state = {"peak": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            state["peak"] = max(state["peak"], _tree_rss(os.getpid()))
            stop.wait(0.02)

    def on_batch(_done: int, _failed: int, _resumed: int) -> None:
        peaks.append(max(state["peak"], _tree_rss(os.getpid())))
        state["peak"] = 0

    with tempfile.TemporaryDirectory(prefix="loupe-bench-mem-") as tmp:
        root = Path(tmp)
        model = bench_model(root / "model", "cxr", arch, size)
        inputs = input_folder(root / "in", nih_pngs(64), batches * batch_size)
        opts = ScoreOptions(domain="cxr", input=inputs, model=f"local-dir:{model}", out=root / "p.parquet",
                            track=False, batch_size=batch_size, num_workers=num_workers)  # fmt: skip
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            summary = score(opts, on_progress=on_batch)
        finally:
            stop.set()
            sampler.join()
    mib = [p / 2**20 for p in peaks]
    base = max(mib[5:15] or mib)
    last = max(mib[-10:])
    return {"batches": len(mib), "batch_size": batch_size, "arch": arch, "input_size": size,
            "num_workers": num_workers, "rows_ok": summary.rows_ok, "peak_tree_rss_mib": mib,
            "baseline_peak_mib": base, "last10_peak_mib": last, "growth": last / base - 1.0}  # fmt: skip


# ------------------------------------------------------------------------------------------------------- all of it
def io_sections(quick: bool) -> dict[str, Any]:
    """Every input-pipeline figure for ``loupe bench speed``; ``quick``: small models and counts (CI), else the
    acceptance settings (ViT-S/16 and ViT-B/16, 50 batches of 16 at 224 px, the demo model's score change)."""
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if quick:
        out["e2e_vs_model"] = e2e_vs_model(archs=("vit_tiny_patch16",), n=64, batch_size=16)
        out["j2k_reduced_vs_full"] = j2k_reduced_vs_full(arch="vit_micro_patch8", repeats=2)
        out["read_once"] = read_once(repeats=1)
        out["memory_over_batches"] = memory_over_batches(batch_size=4, arch="vit_micro_patch8", size=64)
    else:
        out["e2e_vs_model"] = e2e_vs_model(n=128, repeats=3)
        out["j2k_reduced_vs_full"] = j2k_reduced_vs_full(trained=True)
        out["read_once"] = read_once()
        out["memory_over_batches"] = memory_over_batches()
    out["acceptance"] = {
        "e2e_at_least_90pct_of_model_only": out["e2e_vs_model"]["worst_ratio"] >= 0.9,
        "e2e_cpu_bound_at_least_90pct": (out["e2e_vs_model"]["worst_cpu_bound_ratio"] or 0) >= 0.9,
        "j2k_reduced_at_least_5x_faster": (out["j2k_reduced_vs_full"]["chest_film_speedup"] or 0) >= 5,
        "j2k_score_change_below_0.01": out["j2k_reduced_vs_full"]["max_score_change"] < 0.01,
        "memory_growth_below_5pct": out["memory_over_batches"]["growth"] < 0.05,
    }
    return out


def io_sections_in_child(quick: bool, timeout_s: float = 3600) -> dict[str, Any]:
    """`io_sections` in a fresh Python process, as a user's scoring run starts: inside ``loupe bench speed`` the
    sections before it leave the process holding many models (GBs), and every DataLoader worker forked from it, and
    the machine's memory, would pay for that (measured here: end-to-end 0.81 of model-only in-process)."""
    import json
    import subprocess
    import sys

    code = "import json, sys; from loupe.workflows.bench_io import io_sections; " \
           f"json.dump(io_sections({bool(quick)}), sys.stdout, default=str)"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"the input-pipeline benchmark's process failed ({done.returncode}): {done.stderr[-1500:]}")
    return json.loads(done.stdout)


__all__ = [
    "cpu_per_image",
    "e2e_vs_model",
    "io_sections",
    "io_sections_in_child",
    "j2k_reduced_vs_full",
    "memory_over_batches",
    "nih_pngs",
    "read_once",
]
