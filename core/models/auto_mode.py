"""``--mode auto``: measure a model's inference modes (`loupe.core.models.inference`) on this machine and keep the
fastest that stays accurate, cached per machine and weights.

`choose_mode` runs every available mode against fp32 on a set of model inputs — interleaved rounds, so a busy
machine slows every mode alike — and keeps the fastest whose accuracy cost is within the tolerance (AUROC drop when
the inputs have labels, else the share of decisions that flip) and that is at least ``min_speedup`` times faster
than fp32: ``auto`` never picks a mode slower than fp32. The winner is then tried on ONNX Runtime (``+ort``) and
compiled. `auto_mode` caches the choice per (CPU flags, device, torch version, weights SHA-256, tolerance) in
``<data dir>/cache/``.

A model folder may store the inputs ``auto`` checks accuracy on: `save_validation_set` writes
``validation.safetensors`` (model inputs ``[N, C, H, W]`` exactly as the spec prepares them, labels ``[N, K]``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loupe.core.errors import ConfigError
from loupe.core.models import inference as inf  # capability checks by module: tests and callers may swap them
from loupe.core.models.heads import model_outputs, to_scores
from loupe.core.models.inference import (
    ORT_PRECISIONS,
    PRECISIONS,
    REFERENCE,
    InferenceMode,
    InferenceModel,
    cpu_name,
    mode_problems,
    spec_tome,
)
from loupe.core.models.spec import WeightSpec
from loupe.core.models.tome import ToMeConfig, merging_problems

log = logging.getLogger(__name__)

VALIDATION_FILE = "validation.safetensors"
DEFAULT_TOLERANCE = 0.005


# -------------------------------------------------------------------------------------------------- validation
def save_validation_set(folder: str | Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    """Store model inputs ``[N, C, H, W]`` (prepared as the spec says) and labels ``[N, K]`` (1 / 0 / NaN) in a
    model folder, for ``--mode auto`` to check each mode's accuracy on."""
    from safetensors.torch import save_file

    if images.ndim != 4:
        raise ConfigError(f"validation images must be model inputs [N, C, H, W], got shape {tuple(images.shape)}")
    tensors = {"images": images.detach().float().contiguous().cpu()}
    if labels is not None:
        lab = labels.detach().float().reshape(len(images), -1).contiguous().cpu()
        tensors["labels"] = lab
    out = Path(folder) / VALIDATION_FILE
    save_file(tensors, str(out))
    return out


def load_validation_set(folder: str | Path, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The validation set a model folder stores (`save_validation_set`), or None when it stores none."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(folder) / VALIDATION_FILE
    if not p.is_file():
        return None
    try:
        t = load_file(str(p))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{p}: not a readable safetensors file ({exc}); re-write it with save_validation_set or "
                          f"delete it") from None  # fmt: skip
    images, labels = t.get("images"), t.get("labels")
    expected = tuple(spec.input_size)
    if images is None or images.ndim != 4 or tuple(images.shape[1:]) != expected:
        got = None if images is None else tuple(images.shape)
        raise ConfigError(f"{p}: 'images' must be model inputs [N, {', '.join(map(str, expected))}], got {got}; "
                          f"re-write it with save_validation_set")  # fmt: skip
    if labels is not None and labels.shape != (len(images), spec.num_outputs):
        raise ConfigError(f"{p}: 'labels' must be [N, {spec.num_outputs}] (one column per label of the spec), got "
                          f"{tuple(labels.shape)}; re-write it with save_validation_set")  # fmt: skip
    return images, labels


# ------------------------------------------------------------------------------------------------------ choosing
@dataclass
class Trial:
    """One mode measured against fp32 on the same inputs."""

    mode: str
    seconds_per_batch: float = float("nan")
    speedup: float = float("nan")
    agreement: float = float("nan")  # share of decisions (per image and label) equal to fp32's
    max_score_diff: float = float("nan")
    auroc: float | None = None
    auroc_drop: float | None = None
    accurate: bool = False
    note: str = ""


@dataclass
class AutoChoice:
    """What ``auto`` picked on this machine, and every measurement behind it."""

    mode: str
    tolerance: float
    trials: list[Trial] = field(default_factory=list)
    evidence: str = ""  # what the accuracy was checked on
    cached: bool = False
    key: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "tolerance": self.tolerance, "evidence": self.evidence, "key": self.key,
                "trials": [asdict(t) for t in self.trials]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoChoice:
        trials = [Trial(**t) for t in d.get("trials", [])]
        return cls(d["mode"], float(d["tolerance"]), trials, d.get("evidence", ""), True, d.get("key", ""))


def candidate_modes(model: nn.Module, spec: WeightSpec, device: str | torch.device = "cpu",
                    tome_r: Sequence[int] = (4, 8),
                    ort: bool = False) -> tuple[list[InferenceMode], dict[str, str]]:  # fmt: skip
    """Eager modes ``auto`` tries here (every available precision, each with and without token merging; with
    ``ort``, ``int8+ort`` likewise where ONNX Runtime can run), and the modes left out with the reason."""
    tomes: list[ToMeConfig | None] = [None]
    skipped: dict[str, str] = {}
    stored = spec.inference.get("tome_r")
    merge_cfgs = [spec_tome(spec, "tome")] if stored else [ToMeConfig(r=int(r)) for r in tome_r]
    problems = merging_problems(model)
    if problems:
        skipped["tome"] = problems[0]
    else:
        tomes += merge_cfgs
    out = []
    kinds = [(p, False) for p in PRECISIONS] + ([("int8", True)] if ort else [])
    for precision, on_ort in kinds:
        for tome in tomes:
            m = InferenceMode(precision, False, tome, on_ort)
            reasons = mode_problems(m, device, model)
            if reasons:
                skipped[str(m)] = reasons[0]
            else:
                out.append(m)
    return out, skipped


def scores_of(model: nn.Module, images: torch.Tensor, task: str, batch_size: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([to_scores(model_outputs(model, b)["logits"], task) for b in images.split(batch_size)])


def decisions(scores: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    if spec.task == "multiclass":
        return scores.argmax(-1, keepdim=True)
    thr = torch.tensor([float(spec.thresholds.get(lb, 0.5)) for lb in spec.label_names] or [0.5])
    return scores >= thr


def macro_auroc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Mean AUROC over the labels whose known values hold both classes (NaN if none)."""
    from loupe.core.metrics import auroc

    y, s = labels.numpy(), scores.double().numpy()
    vals = [auroc(y[:, k], s[:, k]) for k in range(y.shape[1])]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def time_per_call(run: Callable[[], Any], min_seconds: float) -> float:
    """Seconds per call of ``run``, over as many calls as fill ``min_seconds`` (at least one)."""
    n, t0 = 0, time.perf_counter()
    while True:
        run()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return elapsed / n


def interleaved_times(
    runs: dict[str, Callable[[], Any]], repeats: int, min_seconds: float, *, warm: bool = True, grad: bool = False
) -> dict[str, float]:
    """Median seconds per call of each of ``runs``, measured in ``repeats`` interleaved rounds (every run once per
    round, so load from other processes slows all alike); ``warm``: call each once first; ``grad``: autograd on."""
    with contextlib.nullcontext() if grad else torch.inference_mode():
        if warm:
            for run in runs.values():
                run()
        samples: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for k, run in runs.items():
                samples[k].append(time_per_call(run, min_seconds))
    return {k: statistics.median(v) for k, v in samples.items()}


def choose_mode(
    model: nn.Module,
    spec: WeightSpec,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    tolerance: float = DEFAULT_TOLERANCE,
    candidates: Sequence[InferenceMode] | None = None,
    try_compile: bool = True,
    try_ort: bool = False,
    batch_size: int = 16,
    repeats: int = 3,
    min_seconds: float = 0.2,
    min_speedup: float = 1.1,
) -> AutoChoice:
    """Measure every candidate against fp32 on ``images`` (model inputs ``[N, C, H, W]``; ``labels`` ``[N, K]``
    optional) and pick the fastest accurate one that is ``min_speedup`` times faster than fp32 (else fp32).

    Accurate: AUROC drop vs fp32 ≤ ``tolerance`` when ``labels`` are given, else the share of decisions (at the
    spec's thresholds) that differ from fp32's ≤ ``tolerance``. Then, when ``try_compile``, the winner is tried
    compiled and kept compiled if that is accurate and 5 % faster still. ``try_ort`` (`auto_mode` turns it on): before
    that, the winner run by ONNX Runtime (``+ort``: one export) likewise.
    """
    dev = torch.device(device)
    model = model.to(dev).eval()
    images = images.to(dev)
    skipped: dict[str, str] = {}
    if candidates is None:
        candidates, skipped = candidate_modes(model, spec, dev)
    cands = [m for m in candidates if not m.is_reference]
    ref_scores = scores_of(model, images, spec.task, batch_size)
    ref_auc = macro_auroc(labels, ref_scores) if labels is not None else None
    batch = images[:batch_size] if len(images) >= batch_size else images.repeat(-(-batch_size // len(images)), 1, 1, 1)
    batch = batch[:batch_size]
    trials = {REFERENCE: Trial(REFERENCE, agreement=1.0, max_score_diff=0.0, auroc=ref_auc,
                               auroc_drop=0.0 if ref_auc is not None else None, accurate=True)}  # fmt: skip
    built = {REFERENCE: model}
    for m in cands:
        trials[str(m)], built[str(m)] = _accuracy(m, model, spec, images, labels, ref_scores, ref_auc, dev,
                                                  tolerance, batch_size)  # fmt: skip
    _timed(trials, built, batch, repeats, min_seconds)
    best = _best(trials, min_speedup)

    def challenge(variant: InferenceMode, problem: str | None) -> None:
        """Time ``variant`` of the winner against it; it wins if accurate and 5 % faster still."""
        nonlocal best
        name = str(variant)
        if problem:
            skipped[name] = problem
            return
        trials[name], built[name] = _accuracy(variant, model, spec, images, labels, ref_scores, ref_auc, dev,
                                              tolerance, batch_size)  # fmt: skip
        _timed(trials, {k: built[k] for k in (REFERENCE, best, name)}, batch, repeats, min_seconds)
        if trials[name].accurate and trials[name].speedup >= 1.05 * trials[best].speedup:
            best = name

    mode = InferenceMode.parse(best)
    if try_ort and best != REFERENCE and not mode.compile and mode.precision in ORT_PRECISIONS:
        on_ort = InferenceMode(mode.precision, False, mode.tome, ort=True)  # one export, not one per candidate
        challenge(on_ort, next(iter(mode_problems(on_ort, dev, model)), None))
    mode = InferenceMode.parse(best)
    if try_compile and best != REFERENCE and not mode.compile and not mode.ort:
        challenge(InferenceMode(mode.precision, True, mode.tome), inf.compile_problem(dev.type))
    for name, reason in skipped.items():
        trials.setdefault(name, Trial(name, note=f"not available: {reason}"))
    check = " with labels (AUROC drop)" if labels is not None else " (decision agreement)"
    evidence = f"{len(images)} inputs{check}"
    log.info("inference mode auto: %s (%s)", best, ", ".join(f"{t.mode} {t.speedup:.2f}x" for t in trials.values()))
    return AutoChoice(best, tolerance, list(trials.values()), evidence)


def _accuracy(mode, model, spec, images, labels, ref_scores, ref_auc, dev, tolerance, batch_size):
    try:
        wrapped = InferenceModel(model, mode, dev).eval()
        scores = scores_of(wrapped, images, spec.task, batch_size)
    except Exception as exc:  # noqa: BLE001 - a mode that fails here is not chosen; the reason is kept
        log.warning("inference mode %s failed while measured: %s", mode, exc)
        return Trial(str(mode), note=f"failed: {type(exc).__name__}: {str(exc)[:200]}"), None
    agree = float((decisions(scores, spec) == decisions(ref_scores, spec)).float().mean())
    t = Trial(str(mode), agreement=agree, max_score_diff=float((scores - ref_scores).abs().max()))
    if labels is not None and ref_auc is not None and np.isfinite(ref_auc):
        t.auroc = macro_auroc(labels, scores)
        t.auroc_drop = ref_auc - t.auroc
        t.accurate = bool(t.auroc_drop <= tolerance)
    else:
        t.accurate = bool(1.0 - agree <= tolerance)
    if not t.accurate:
        t.note = "outside the tolerance"
    return t, wrapped


def _timed(trials: dict[str, Trial], built: dict[str, nn.Module | None], batch, repeats, min_seconds) -> None:
    runs = {k: functools.partial(m, batch) for k, m in built.items() if m is not None and trials[k].accurate}
    times = interleaved_times(runs, repeats, min_seconds)
    for k, s in times.items():
        trials[k].seconds_per_batch = s
        trials[k].speedup = times[REFERENCE] / s


def _best(trials: dict[str, Trial], min_speedup: float) -> str:
    fast = [t for t in trials.values() if t.accurate and np.isfinite(t.speedup) and t.speedup >= min_speedup]
    return max(fast, key=lambda t: t.speedup).mode if fast else REFERENCE


# ------------------------------------------------------------------------------------------------------- caching
def mode_cache_path() -> Path:
    """``<data dir>/cache/inference_modes.json``: the choices ``auto`` made on this machine."""
    from loupe.core.paths import data_dir

    return data_dir() / "cache" / "inference_modes.json"


def cache_key(weights_sha256: str, device: str | torch.device, tolerance: float) -> str:
    dev = torch.device(device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    blob = {"cpu_flags": sorted(inf.cpu_flags()), "device": f"{dev.type}:{where}", "torch": torch.__version__,
            "weights": weights_sha256, "tolerance": tolerance}  # fmt: skip
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s is unreadable (%s); the inference modes will be measured again", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def auto_mode(
    model: nn.Module,
    spec: WeightSpec,
    inputs: Callable[[], tuple[torch.Tensor, torch.Tensor | None, str]],
    *,
    weights_sha256: str,
    device: str | torch.device = "cpu",
    tolerance: float | None = None,
    cache: Path | None = None,
    refresh: bool = False,
    **choose_kwargs: Any,
) -> AutoChoice:
    """`choose_mode`, measured once per (CPU flags, device, torch version, weights, tolerance) and cached; the
    winner is also tried on ONNX Runtime (``+ort``) unless ``try_ort=False`` is passed.

    ``inputs()`` returns (images, labels or None, where they came from); it is called only on a cache miss.
    """
    tol = float(spec.inference.get("tolerance", DEFAULT_TOLERANCE) if tolerance is None else tolerance)
    path = cache or mode_cache_path()
    key = cache_key(weights_sha256, device, tol)
    entry = _read_cache(path).get(key)
    if entry and not refresh:
        try:
            cached = InferenceMode.parse(entry["mode"], spec)
            problems = mode_problems(cached, device, model) if cached.ort else []  # onnxruntime uninstalled since
            if not problems:
                return AutoChoice.from_dict(entry)
            log.warning("the cached choice %s cannot run any more (%s); measuring again", cached, problems[0])
        except (ConfigError, KeyError, TypeError, ValueError):
            log.warning("%s holds a bad entry for this model; measuring again", path)
    images, labels, where = inputs()
    choose_kwargs.setdefault("try_ort", True)
    choice = choose_mode(model, spec, images, labels, device=device, tolerance=tol, **choose_kwargs)
    choice.key, choice.evidence = key, f"{choice.evidence} from {where}"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_cache(path)
    data[key] = {**choice.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": spec.name}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)
    return choice


def _json_default(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return float(v)
    return str(v)
