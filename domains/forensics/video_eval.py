"""Video-level evaluation of a trained detector (``forensics.video_eval``) and the FaceForensics++ / DFDC layout.

Each labelled clip goes through the unit pipeline that ``loupe score forensics`` runs (`units.read_units`: frame
sampling → face crops, optionally aligned → the spec's preprocessing), the model scores every face unit, and the
unit scores become the clip's score by each of ``aggregations`` (``mean``, ``max``, ``topk:K``, as
`loupe.core.models.heads.aggregate_scores` computes them for scoring). A clip that fails (no face in any sampled
frame, does not decode, missing) is a failed row, counted and left out of the metrics.

Per aggregation: video AUROC with a percentile bootstrap CI (by ``group``: the source video, so a real clip and the
fakes made from it are drawn together), AP, accuracy at 0.5 and at the model's stored threshold, EER; the same per
generator (that generator's fakes against every real clip); and face-level AUROC (each face labelled by its clip)
as the comparison. Everything goes to MLflow: the figures as metrics, the per-clip and per-face scores and the
metrics tables as CSV artifacts. With few clips (fewer than `FEW_CLIPS`, or fewer than `FEW_PER_CLASS` of a
class) the run says so: each swapped real/fake pair moves the AUROC by 1 / (reals x fakes).

`faces_videos` turns the FaceForensics++ folder layout (``original_sequences/<source>/<compression>/videos`` real,
``manipulated_sequences/<method>/<compression>/videos/<target>_<source>.mp4`` fake, the method its generator) and
DFDC parts (``metadata.json`` beside the clips) into a manifest ``path, label, group, generator``
(``loupe data convert faces_videos FOLDER -o clips.csv``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from loupe.core.errors import ConfigError, LoupeError
from loupe.core.models.classifier import load_model_dir
from loupe.core.models.heads import aggregate_scores, model_outputs, to_scores
from loupe.core.recipes import Recipe, RunConfig, register_recipe
from loupe.core.registry import ADAPTERS
from loupe.core.units import Unit
from loupe.domains.forensics.data import label_key
from loupe.domains.forensics.models import LABEL
from loupe.domains.forensics.robustness import detection_metrics
from loupe.domains.forensics.units import ForensicsOptions, read_units
from loupe.domains.forensics.video import VIDEO_SUFFIXES

log = logging.getLogger(__name__)

#: Below this many scored clips, or this many of either class, the figures are flagged as a smoke test.
FEW_CLIPS, FEW_PER_CLASS = 30, 10
_AGGREGATIONS = ("mean", "max")


# --------------------------------------------------------------------------------------------------- the layout
def faces_videos(folder: str | Path) -> pd.DataFrame:
    """FaceForensics++ and DFDC clips under ``folder`` → manifest ``path`` (relative to ``folder``), ``label``
    (real / fake), ``group`` (FF++: the target video id, shared by the real clip and the fakes made on it; DFDC:
    the original clip's name) and ``generator`` (FF++ method, ``dfdc``; empty for real clips). DFDC clips listed in
    a ``metadata.json`` but absent are left out with a warning; clips in neither layout are left out too."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder; pass the folder holding ffpp/ and/or dfdc part folders")
    rows = [_ffpp_row(root, p) for p in sorted(root.rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES]
    rows = [r for r in rows if r is not None]
    for meta in sorted(root.rglob("metadata.json")):
        rows += _dfdc_rows(root, meta)
    if not rows:
        raise ConfigError(f"{root}: no FaceForensics++ (original_sequences / manipulated_sequences) or DFDC "
                          "(metadata.json) clips found; write a manifest path,label[,group,generator]")  # fmt: skip
    frame = pd.DataFrame(rows).drop_duplicates("path").reset_index(drop=True)
    clips = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES}
    left = sorted(clips - set(frame["path"]))
    if left:
        log.warning("%s: %d clip(s) in neither layout are left out (e.g. %s)", root, len(left), left[0])
    return frame


def _ffpp_row(root: Path, p: Path) -> dict[str, str] | None:
    parts = p.relative_to(root).parts
    if "original_sequences" in parts:
        return {"path": p.relative_to(root).as_posix(), "label": "real", "group": p.stem, "generator": ""}
    if "manipulated_sequences" in parts:
        i = parts.index("manipulated_sequences")
        method = parts[i + 1] if i + 1 < len(parts) - 1 else "unknown"
        return {"path": p.relative_to(root).as_posix(), "label": "fake", "group": p.stem.split("_")[0],
                "generator": method}  # fmt: skip
    return None


def _dfdc_rows(root: Path, meta: Path) -> list[dict[str, str]]:
    try:
        listed = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{meta}: not readable JSON ({exc}); DFDC's metadata.json maps clip name → "
                          '{"label": "FAKE"|"REAL", "original": ...}') from None  # fmt: skip
    rows, missing = [], []
    for name, entry in listed.items():
        clip = meta.parent / name
        if not clip.is_file():
            missing.append(name)
            continue
        label = str(entry.get("label", "")).strip().lower()
        if label not in ("fake", "real"):
            raise ConfigError(f"{meta}: clip {name!r} has label {entry.get('label')!r}; expected FAKE or REAL")
        original = Path(str(entry.get("original") or name)).stem
        rows.append({"path": clip.relative_to(root).as_posix(), "label": label, "group": original,
                     "generator": "dfdc" if label == "fake" else ""})  # fmt: skip
    if missing:
        log.warning("%s lists %d clip(s) that are not there (e.g. %s); left out", meta, len(missing), missing[0])
    return rows


ADAPTERS.register("faces_videos", faces_videos, domain="forensics", inputs=("FOLDER",),
                  doc="FaceForensics++ original / manipulated_sequences and DFDC parts (metadata.json)")  # fmt: skip


# ----------------------------------------------------------------------------------------------- scoring clips
@dataclass
class ClipResult:
    """One clip: ``status`` (``ok`` or ``failed: reason``), its face units' fake scores ``[N]`` with their frame
    indices and rotations (``align=true``; else None), the units not scored, and the file's unit metadata."""

    status: str
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    frames: list[int | None] = field(default_factory=list)
    rotations: list[float | None] = field(default_factory=list)
    units_not_scored: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@torch.inference_mode()
def score_clip(model: torch.nn.Module, spec, path: Path, options: dict[str, Any], device="cpu",
               batch_size: int = 32) -> ClipResult:  # fmt: skip
    """``path`` read into units as ``loupe score forensics`` reads it (the spec's unit options, then ``options``
    over them) and each ok unit scored as it arrives, ``batch_size`` at a time (the spec's task: the sigmoid of the
    logits for a binary detector). Any error reading the clip is its failed status, as in a scoring table."""

    def flush(batch: list[torch.Tensor]) -> None:
        logits = model_outputs(model, torch.stack(batch).to(device))["logits"].cpu()
        scores.append(to_scores(logits, spec.task)[:, 0].double())
        batch.clear()

    scores: list[torch.Tensor] = []
    batch: list[torch.Tensor] = []
    frames, turns, other = [], [], 0
    try:
        fu = read_units(path, spec, {**spec.unit_options, **options})
        spec.check_scope(fu.meta, path)
        for u in fu.units:
            if not isinstance(u, Unit):
                other += 1
                continue
            batch.append(u.image)
            frames.append(u.info.frame_index)
            turns.append(u.info.meta.get("rotation_deg"))
            if len(batch) == batch_size:
                flush(batch)
        if batch:
            flush(batch)
    except Exception as exc:  # noqa: BLE001 - a bad clip is a failed row, never the end of the evaluation
        msg = str(exc) if isinstance(exc, LoupeError) else f"{type(exc).__name__}: {exc}"
        return ClipResult(f"failed: {msg.removeprefix(f'{path}: ').replace(str(path), path.name)}")
    if not scores:
        return ClipResult(f"failed: no unit could be scored ({other} failed or left out)", units_not_scored=other)
    return ClipResult("ok", torch.cat(scores).numpy(), frames, turns, other, dict(fu.meta))


def clip_scores(scores: np.ndarray, aggregations: tuple[str, ...]) -> dict[str, float]:
    """A clip's fake score ``{aggregation: score}`` from its unit scores ``[N]``."""
    t = torch.as_tensor(scores, dtype=torch.float64)[:, None]  # [N, 1]
    return {a: float(aggregate_scores(t, a)[0]) for a in aggregations}


def check_aggregation(name: str) -> str | None:
    """Why ``name`` is not a video aggregation (``mean``, ``max``, ``topk:K`` with K >= 1), or None."""
    if name in _AGGREGATIONS:
        return None
    k = name.removeprefix("topk:")
    if name.startswith("topk:") and k.isdigit() and int(k) >= 1:
        return None
    return f"aggregation {name!r}: expected mean, max or topk:K (K a whole number >= 1)"


# --------------------------------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class VideoData:
    """``manifest``: a CSV/Parquet with ``path, label[, group, generator]`` (paths relative to its folder unless
    ``root`` says otherwise), or with ``layout: faces_videos`` the FF++ / DFDC folder itself (`faces_videos`)."""

    manifest: str = "../shared/data/faces/videos"
    layout: str = "faces_videos"
    root: str = ""
    fake_values: tuple[str, ...] = ("1", "fake")
    real_values: tuple[str, ...] = ("0", "real")

    def problems(self) -> list[str]:
        ok = self.layout in ("manifest", "faces_videos")
        return [] if ok else [f"layout: expected manifest or faces_videos, got {self.layout!r}"]


@dataclass(frozen=True)
class VideoEvalModel:
    """``source``: a Loupe model folder (``local-dir:/path``) or an MLflow URI (``models:/NAME@alias``,
    ``runs:/ID/model``); ``threshold``: the operating threshold on clip scores (< 0: the model's stored one)."""

    source: str = ""
    threshold: float = -1.0

    def problems(self) -> list[str]:
        if not self.source:
            return ["source is required: local-dir:/path/to/model, models:/NAME@alias or runs:/ID/model"]
        if not self.source.startswith(("local-dir:", "models:/", "runs:/")):
            return [f"source {self.source!r}: expected local-dir:/path, models:/NAME@alias or runs:/ID/model"]
        return [] if self.threshold < 1.0 else [f"threshold must be below 1 (< 0: stored), got {self.threshold}"]


@dataclass(frozen=True)
class VideoEvalConfig:
    """``unit_options``: over the model's own, as ``loupe score forensics --option key=value`` (frames, every_s,
    max_faces, margin, min_face, align); ``aggregations``: clip scores from face scores, the first one the
    headline."""

    run: RunConfig = field(default_factory=lambda: RunConfig(experiment="forensics-video"))
    data: VideoData = field(default_factory=VideoData)
    model: VideoEvalModel = field(default_factory=VideoEvalModel)
    unit_options: dict[str, Any] = field(default_factory=dict)
    aggregations: tuple[str, ...] = ("mean", "max", "topk:3")
    batch_size: int = 32
    n_boot: int = 1000
    alpha: float = 0.05

    def problems(self) -> list[str]:
        out = [p for a in self.aggregations if (p := check_aggregation(a))]
        if not self.aggregations:
            out.append("aggregations: name at least one of mean, max, topk:K")
        try:
            ForensicsOptions.from_options(self.unit_options)
        except ConfigError as exc:
            out += [f"unit_options: {p}" for p in (exc.problems or [str(exc)])]
        if self.batch_size < 1 or self.n_boot < 1 or not 0 < self.alpha < 1:
            out.append("batch_size and n_boot must be >= 1, alpha in (0, 1)")
        return out


def load_video_manifest(data: VideoData) -> tuple[pd.DataFrame, Path]:
    """The clips ``path, Fake (1.0 / 0.0), group, generator`` and the folder their paths are relative to."""
    from loupe.core.data import read_manifest

    src = Path(data.manifest)
    if data.layout == "faces_videos":
        frame, root = faces_videos(src), Path(data.root) if data.root else src
    else:
        if not src.is_file():
            raise ConfigError(f"data.manifest {str(src)!r} does not exist; pass a CSV/Parquet with path,label"
                              "[,group,generator], or data.layout=faces_videos with the clips' folder")  # fmt: skip
        frame, root = read_manifest(src), Path(data.root) if data.root else src.parent
    missing = [c for c in ("path", "label") if c not in frame.columns]
    if missing:
        raise ConfigError(f"manifest {src} lacks column(s) {missing}; it needs path,label[,group,generator]")
    keys = frame["label"].map(label_key)
    fake, real = {v.lower() for v in data.fake_values}, {v.lower() for v in data.real_values}
    unknown = sorted(set(keys) - fake - real)
    if unknown:
        raise ConfigError(f"manifest {src}: label values {unknown} are neither fake {sorted(fake)} nor real "
                          f"{sorted(real)}; map them with data.fake_values / data.real_values")  # fmt: skip
    out = pd.DataFrame({"path": frame["path"].astype(str), LABEL: keys.isin(fake).astype(float).to_numpy()})
    out["group"] = frame["group"].astype(str) if "group" in frame.columns else out["path"]
    out["generator"] = frame["generator"].fillna("").astype(str) if "generator" in frame.columns else ""
    return out, root


# --------------------------------------------------------------------------------------------------- the recipe
@register_recipe("forensics.video_eval", domain="forensics")
class VideoEvalRecipe(Recipe):
    """Video-level AUROC (bootstrap CI by source video), AP, accuracy, EER of a trained detector on labelled clips."""

    config_cls = VideoEvalConfig

    def setup(self) -> None:
        from loupe.core.distributed import pick_device

        self.device = pick_device(self.cfg.run.device)
        self.out = self.output_dir(self.cfg.run.name or "forensics_video_eval")
        self._tmp = tempfile.TemporaryDirectory(prefix="loupe-video-")
        src = self.cfg.model.source
        path = Path(src.removeprefix("local-dir:")) if src.startswith("local-dir:") else None
        if path is None:
            path = self.tracker.resolve_model_uri(src, Path(self._tmp.name))
        self.model, self.spec = load_model_dir(path)
        self.model.to(self.device).eval()
        if LABEL not in self.spec.label_names:
            raise ConfigError(f"model {self.spec.name!r} predicts {list(self.spec.label_names)}, not {LABEL!r}: "
                              "video evaluation needs a real (0) / fake (1) detector")  # fmt: skip
        self.clips, self.root = load_video_manifest(self.cfg.data)
        t = self.cfg.model.threshold
        self.threshold = t if t >= 0 else float(self.spec.thresholds.get(LABEL, 0.5))

    def cleanup(self) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            tmp.cleanup()

    def score_all(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Per clip (its status, counts and a score per aggregation) and per scored face unit."""
        cfg, rows, units = self.cfg, [], []
        for c in self.clips.itertuples(index=False):
            t0 = time.perf_counter()
            r = score_clip(self.model, self.spec, self.root / c.path, cfg.unit_options, self.device, cfg.batch_size)
            row = {
                "path": c.path,
                LABEL: c.Fake,
                "group": c.group,
                "generator": c.generator,
                "status": r.status,
                "faces_scored": len(r.scores),
                "units_not_scored": r.units_not_scored,
                "frames_with_face": r.meta.get("frames_with_face"),
                "faces_with_eyes": r.meta.get("faces_with_eyes"),
                "seconds": round(time.perf_counter() - t0, 2),
            }
            if r.status == "ok":
                row |= {f"score_{a}": s for a, s in clip_scores(r.scores, cfg.aggregations).items()}
                units += [
                    {
                        "path": c.path,
                        LABEL: c.Fake,
                        "group": c.group,
                        "frame_index": fi,
                        "rotation_deg": turn,
                        "score": float(s),
                    }
                    for fi, turn, s in zip(r.frames, r.rotations, r.scores, strict=True)
                ]
            log.info("%s: %s, %d faces", c.path, r.status, len(r.scores))
            rows.append(row)
        cols = ["path", LABEL, "group", "frame_index", "rotation_deg", "score"]
        return pd.DataFrame(rows), pd.DataFrame(units, columns=cols)

    def metrics(self, clips: pd.DataFrame, faces: pd.DataFrame) -> pd.DataFrame:
        """One row per (level, aggregation, generator): `detection_metrics` of the scored clips (faces)."""
        ok = clips[clips["status"] == "ok"]
        cfg, rows = self.cfg, []

        def add(level: str, agg: str, gen: str, t: pd.DataFrame, col: str) -> None:
            y = t[LABEL].to_numpy()
            if len(set(y)) < 2:
                return
            m = detection_metrics(y, t[col].to_numpy(), self.threshold, n_boot=cfg.n_boot, alpha=cfg.alpha,
                                  groups=t["group"].to_numpy(), seed=cfg.run.seed)  # fmt: skip
            rows.append({"level": level, "aggregation": agg, "generator": gen, **m})

        gens = sorted(g for g in ok.loc[ok[LABEL] == 1, "generator"].unique() if g)
        for agg in cfg.aggregations:
            add("video", agg, "all", ok, f"score_{agg}")
            for g in gens:
                add("video", agg, g, ok[(ok[LABEL] == 0) | (ok["generator"] == g)], f"score_{agg}")
        add("face", "none", "all", faces, "score")
        if not rows:
            raise ConfigError(f"the scored clips hold one class only ({len(ok)} of {len(clips)} clips scored); "
                              "video AUROC needs real and fake clips that score")  # fmt: skip
        return pd.DataFrame(rows)

    def evaluate(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.time()
        clips, faces = self.score_all()
        table = self.metrics(clips, faces)
        ok = clips[clips["status"] == "ok"]
        n_real, n_fake = int((ok[LABEL] == 0).sum()), int((ok[LABEL] == 1).sum())
        few = len(ok) < FEW_CLIPS or min(n_real, n_fake) < FEW_PER_CLASS
        note = (f"only {len(ok)} clips scored ({n_real} real, {n_fake} fake): one swapped real/fake pair moves the "
                f"AUROC by {1 / max(1, n_real * n_fake):.3f} and the bootstrap CI is wide; a smoke figure, not a "
                "benchmark") if few else ""  # fmt: skip
        if few:
            log.warning(note)
        head = table[(table["level"] == "video") & (table["generator"] == "all")].set_index("aggregation")
        metrics = {f"video_{_key(a)}_{k}": float(head.loc[a, k]) for a in head.index
                   for k in ("auroc", "ci_low", "ci_high", "ap", "accuracy_05", "accuracy", "eer")}  # fmt: skip
        for r in table[(table["level"] == "video") & (table["generator"] != "all")].itertuples():
            metrics[f"video_{_key(r.aggregation)}_{_key(r.generator)}_auroc"] = float(r.auroc)
        face = table[table["level"] == "face"]
        if len(face):
            metrics |= {f"face_{k}": float(face.iloc[0][k]) for k in ("auroc", "ci_low", "ci_high", "ap")}
        metrics |= {"n_clips": float(len(clips)), "n_clips_scored": float(len(ok)), "n_real": float(n_real),
                    "n_fake": float(n_fake), "n_faces": float(len(faces)), "threshold": self.threshold,
                    "wall_seconds": round(time.time() - t0, 1)}  # fmt: skip
        work = self.out / "video"
        work.mkdir(parents=True, exist_ok=True)
        with self.tracked_run() as run:
            run.set_tags({"model_source": cfg.model.source, "model_name": self.spec.name,
                          "spec_aggregation": self.spec.aggregation, "small_sample": str(few).lower()})  # fmt: skip
            run.log_metrics(metrics)
            for name, frame in (("clip_scores", clips), ("face_scores", faces), ("video_metrics", table)):
                frame.to_csv(work / f"{name}.csv", index=False)
                run.log_artifact(work / f"{name}.csv", "video")
            return {"run_id": run.run_id, "metrics": metrics, "note": note, "table": table.to_dict("records"),
                    "clips": clips.to_dict("records"), "out": str(work)}  # fmt: skip


def _key(name: str) -> str:
    return "".join(ch if ch.isalnum() else "" for ch in name.lower())
