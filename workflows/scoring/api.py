"""`score`: one call from a folder or manifest to a predictions table, tracked as an MLflow run.

Library code: no printing. The CLI passes ``on_start`` / ``on_progress`` callbacks to draw its progress bar and
prints the returned `ScoreSummary`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from loupe.core.registry import DOMAINS, discover_domains
from loupe.core.tracking import NullTracker, Tracker, make_tracker
from loupe.workflows.scoring.backends import BatchResult, RayOptions, run_local, run_ray
from loupe.workflows.scoring.engine import BatchScorer
from loupe.workflows.scoring.inputs import InputList, collect_inputs
from loupe.workflows.scoring.model import ResolvedModel, resolve_model
from loupe.workflows.scoring.table import Mode, PartsTable, table_schema

log = logging.getLogger(__name__)

EXPERIMENT = "loupe-scoring"


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class ScoreOptions:
    """Everything `score` needs; mirrors ``loupe score``'s flags."""

    domain: str
    input: Path
    model: str
    out: Path
    mode: Mode = "new"
    backend: Literal["local", "ray"] = "local"
    batch_size: int = 32
    num_workers: int | None = None
    explain: bool = False
    device: str = "auto"
    ray: RayOptions = field(default_factory=RayOptions)
    track: bool = True
    tracking_uri: str | None = None
    experiment: str = EXPERIMENT
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class ScoreSummary:
    """What a scoring run did. ``rows_*`` count the final table; ``scored_*`` this run's work only."""

    out: Path
    inputs: int = 0
    not_images: int = 0
    resumed: int = 0
    scored_ok: int = 0
    scored_failed: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    seconds: float = 0.0
    run_id: str | None = None
    tracking_uri: str | None = None
    explain_dir: Path | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # first few (path, status)
    model: dict[str, str] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        n = self.scored_ok + self.scored_failed
        return n / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.rows_failed else 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _trackers(opts: ScoreOptions) -> tuple[Tracker | None, Tracker]:
    """(tracker for resolving models:/ URIs, tracker for logging the run)."""
    needs_registry = opts.model.startswith(("models:/", "runs:/"))
    real = make_tracker(opts.tracking_uri) if (opts.track or needs_registry) else None
    return real, (real if opts.track and real is not None else NullTracker())


def score(
    opts: ScoreOptions,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ScoreSummary:
    """Score every input of ``opts.input`` into ``opts.out``; see the module and `ScoreOptions`."""
    discover_domains()
    DOMAINS.get(opts.domain)  # unknown domain → UnknownNameError with suggestions
    registry, tracker = _trackers(opts)
    resolved = resolve_model(opts.model, opts.domain, registry)
    try:
        return _score_resolved(opts, resolved, tracker, on_start, on_progress)
    finally:
        resolved.close()


def _score_resolved(
    opts: ScoreOptions,
    rm: ResolvedModel,
    tracker: Tracker,
    on_start: Callable[[int], None] | None,
    on_progress: Callable[[int, int], None] | None,
) -> ScoreSummary:
    schema = table_schema(rm.spec.label_names)
    table = PartsTable(opts.out, schema)
    table.prepare(opts.mode)
    inputs = collect_inputs(opts.input, exclude=(table.parts_dir, table.explain_dir))
    done = table.done_keys(rm.provenance.weights_sha256, rm.provenance.preprocessing_hash)
    summary = ScoreSummary(out=table.out, inputs=len(inputs.paths), not_images=inputs.skipped)
    summary.model = rm.provenance.to_dict()
    summary.tracking_uri = getattr(tracker, "uri", None)
    if on_start:
        on_start(len(inputs.paths))
    tags = {"domain": opts.domain, "model": rm.provenance.model_name, "backend": opts.backend, **opts.tags}
    with tracker.run(f"score-{opts.domain}", experiment=opts.experiment, tags=tags) as run:
        summary.run_id = run.run_id
        run.log_params(_params(opts, rm, inputs, len(done)))
        t0 = time.perf_counter()
        for result in _batches(opts, rm, table, inputs.paths, done, schema):
            _commit(table, result, summary, on_progress)
        summary.seconds = time.perf_counter() - t0
        summary.rows_ok, summary.rows_failed = _finalize(table, inputs.paths)
        if opts.explain:
            summary.explain_dir = table.explain_dir
        run.log_metrics(_metrics(summary))
        run.log_artifact(table.out, "predictions")
    return summary


def _batches(
    opts: ScoreOptions, rm: ResolvedModel, table: PartsTable, paths: list[str], done: set[str], schema: pa.Schema
) -> Iterator[BatchResult]:
    device = _device(opts.device)
    explainer = None
    if opts.explain and opts.backend == "local":
        from loupe.workflows.scoring.explain import ViTGradCAM

        explainer = ViTGradCAM(rm.model, rm.spec, table.explain_dir, device)
    scorer = BatchScorer(rm.model, rm.spec, rm.provenance, device, explainer)
    if opts.backend == "ray":
        explain_dir = table.explain_dir if opts.explain else None
        return run_ray(paths, scorer, rm.model_dir, opts.domain, done, opts.batch_size, schema, explain_dir, opts.ray)
    workers = default_workers() if opts.num_workers is None else opts.num_workers
    return run_local(paths, scorer, opts.domain, done, opts.batch_size, workers)


def _commit(
    table: PartsTable, result: BatchResult, summary: ScoreSummary, on_progress: Callable[[int, int], None] | None
) -> None:
    """Write one batch as a part, then count it (a row is only counted once it is committed)."""
    rows = result.rows
    if isinstance(rows, pa.Table):
        statuses = rows.column("status").to_pylist()
        paths = rows.column("path").to_pylist()
        table.write_arrow(rows)
    else:
        statuses = [r["status"] for r in rows]
        paths = [r["path"] for r in rows]
        table.write_part(rows)
    failed = [(p, s) for p, s in zip(paths, statuses, strict=True) if s != "ok"]
    summary.scored_failed += len(failed)
    summary.scored_ok += len(statuses) - len(failed)
    summary.resumed += result.n_inputs - len(statuses)
    summary.failures += failed[: max(0, 10 - len(summary.failures))]
    if on_progress:
        on_progress(result.n_inputs, len(failed))


def _finalize(table: PartsTable, paths: list[str]) -> tuple[int, int]:
    table.finalize(set(paths))
    status = pq.read_table(table.out, columns=["status"]).column("status")
    ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    return ok, len(status) - ok


def _params(opts: ScoreOptions, rm: ResolvedModel, inputs: InputList, n_done: int) -> dict[str, Any]:
    return {
        **rm.provenance.to_dict(),
        "input": inputs.source,
        "out": str(opts.out),
        "backend": opts.backend,
        "batch_size": opts.batch_size,
        "num_workers": opts.num_workers if opts.num_workers is not None else default_workers(),
        "explain": opts.explain,
        "mode": opts.mode,
        "labels": list(rm.spec.label_names),
        "already_scored": n_done,
    }


def _metrics(s: ScoreSummary) -> dict[str, float]:
    return {
        "inputs": s.inputs,
        "not_images": s.not_images,
        "resumed": s.resumed,
        "scored_ok": s.scored_ok,
        "scored_failed": s.scored_failed,
        "rows_ok": s.rows_ok,
        "rows_failed": s.rows_failed,
        "seconds": s.seconds,
        "images_per_s": s.images_per_s,
    }
