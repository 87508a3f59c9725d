"""`score`: one call from a folder or manifest to a predictions table (and a unit table), tracked in MLflow.

Library code: no printing. The CLI passes ``on_start`` / ``on_progress`` callbacks to draw its progress bar and
prints the returned `ScoreSummary`; an interrupted run raises `ScoringInterrupted` with what was kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow.compute as pc
import pyarrow.parquet as pq

from loupe.core.distributed import pick_device
from loupe.core.domain import DomainInfo
from loupe.core.errors import LoupeError
from loupe.core.io.sniff import IMAGE_SUFFIXES
from loupe.core.registry import DOMAINS, discover_domains
from loupe.core.tracking import NullTracker, Tracker, make_tracker
from loupe.workflows.scoring.backends import BatchResult, RayOptions, build_engine, run_local, run_ray
from loupe.workflows.scoring.inputs import InputList, collect_inputs
from loupe.workflows.scoring.lock import output_lock
from loupe.workflows.scoring.model import ResolvedModel, apply_inference_mode, resolve_model
from loupe.workflows.scoring.produce import Producer
from loupe.workflows.scoring.table import Mode, PartsTable, table_schema, unit_schema

log = logging.getLogger(__name__)

EXPERIMENT = "loupe-scoring"
Progress = Callable[[int, int, int], None]  # (inputs done, of them failed, of them resumed)


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
    options: dict[str, Any] = field(default_factory=dict)  # unit options over the model's (`--option key=value`)
    inference_mode: str | None = None  # fp32 / bf16 / int8 / ...+compile / ...+tome8 / auto; None: the spec's
    allow_roots: tuple[Path, ...] = ()  # folders besides the input root that inputs may resolve into (`--allow-root`)
    path_key: bytes | None = None  # set (`--pseudonymise-paths`): tables record keyed pseudonyms, not file names


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
    units_ok: int = 0
    units_failed: int = 0
    units_excluded: int = 0  # left out by the domain's quality control (background, pen, blur, no face)
    seconds: float = 0.0
    run_id: str | None = None
    tracking_uri: str | None = None
    units_out: Path | None = None
    artifacts_dir: Path | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # first few (path, status)
    model: dict[str, str] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)  # scoring process (host:pid) → inputs it covered

    @property
    def images_per_s(self) -> float:
        """Inputs scored per second by this run (inputs an earlier run had scored are not counted)."""
        n = self.scored_ok + self.scored_failed
        return n / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.rows_failed else 0


class ScoringInterrupted(LoupeError):
    """Ctrl-C / SIGTERM during scoring; ``summary`` says what was committed before it."""

    def __init__(self, summary: ScoreSummary, parts_dir: Path):
        self.summary, self.parts_dir = summary, parts_dir
        done = summary.scored_ok + summary.scored_failed
        super().__init__(
            f"interrupted: {done} inputs scored by this run are kept in {parts_dir} "
            f"({summary.resumed} more were already scored); run the same command with --resume to finish"
        )


def _trackers(opts: ScoreOptions) -> tuple[Tracker | None, Tracker]:
    """(tracker for resolving models:/ URIs, tracker for logging the run); MLflow is set up only when needed."""
    needs_registry = opts.model.startswith(("models:/", "runs:/"))
    real = make_tracker(opts.tracking_uri) if (opts.track or needs_registry) else None
    return real, (real if opts.track and real is not None else NullTracker())


def score(
    opts: ScoreOptions,
    on_start: Callable[[int], None] | None = None,
    on_progress: Progress | None = None,
    resolved: ResolvedModel | None = None,
):
    """Score every input of ``opts.input`` into ``opts.out``; see the module and `ScoreOptions`.

    ``resolved``: the model ``opts.model`` names, already loaded (a long-lived caller such as the dashboard keeps
    it); it is not closed here.
    """
    discover_domains()
    info: DomainInfo = DOMAINS.get(opts.domain)  # unknown domain → UnknownNameError with suggestions
    suffixes = IMAGE_SUFFIXES | {s.lower() for s in info.input_suffixes}
    out = Path(opts.out).expanduser().resolve()
    exclude = [out.with_name(out.name + s) for s in (".parts", ".artifacts", ".explain")]
    inputs = collect_inputs(opts.input, exclude=exclude, suffixes=suffixes)  # no inputs: usage error, at once
    if opts.path_key is not None:
        inputs = replace(inputs, path_key=opts.path_key)
    with output_lock(out):  # one writer per table: a second run on the same --out is refused, not interleaved
        PartsTable(out, table_schema((), _root_label(inputs))).check(opts.mode)  # refused before the model is loaded
        registry, tracker = _trackers(opts)
        if resolved is not None:
            return _score_resolved(opts, info, inputs, _in_mode(opts, resolved, inputs), tracker, on_start, on_progress)
        resolved = resolve_model(opts.model, opts.domain, registry)
        try:
            return _score_resolved(opts, info, inputs, _in_mode(opts, resolved, inputs), tracker, on_start, on_progress)
        finally:
            resolved.close()


def _in_mode(opts: ScoreOptions, rm: ResolvedModel, inputs: InputList) -> ResolvedModel:
    """``rm`` run in the requested inference mode, on the device that will score (Ray actors: CPU or CUDA)."""
    device = ("cuda" if opts.ray.gpus_per_actor else "cpu") if opts.backend == "ray" else str(pick_device(opts.device))
    return apply_inference_mode(rm, opts.inference_mode, inputs.paths, device)


def _score_resolved(
    opts: ScoreOptions,
    info: DomainInfo,
    inputs: InputList,
    rm: ResolvedModel,
    tracker: Tracker,
    on_start: Callable[[int], None] | None,
    on_progress: Progress | None,
) -> ScoreSummary:
    root = _root_label(inputs)
    labels = rm.spec.label_names
    table = PartsTable(opts.out, table_schema(labels, root), unit_schema(labels, root) if info.unit_table else None)
    table.prepare(opts.mode)
    if opts.options:  # the run cuts units otherwise than the model's spec says: that is other preprocessing
        rm.provenance = replace(rm.provenance, preprocessing_hash=rm.spec.preprocessing_hash(opts.options))
    provenance = {**rm.provenance.to_dict(), "aggregation": rm.spec.aggregation}
    done = table.done_keys(provenance)
    summary = ScoreSummary(out=table.out, inputs=len(inputs.paths), not_images=inputs.skipped)
    summary.model = rm.provenance.to_dict()
    summary.tracking_uri = getattr(tracker, "uri", None)
    if on_start:
        on_start(len(inputs.paths))
    tags = {"domain": opts.domain, "model": rm.provenance.model_name, "backend": opts.backend, **opts.tags}
    try:
        with tracker.run(f"score-{opts.domain}", experiment=opts.experiment, tags=tags) as run:
            summary.run_id = run.run_id
            run.log_params(_params(opts, rm, inputs, len(done)))
            t0 = time.perf_counter()
            for result in _batches(opts, info, rm, table, inputs, done):
                _commit(table, result, summary, on_progress)
            summary.seconds = time.perf_counter() - t0
            _finalize(table, inputs, summary)
            run.log_metrics(_metrics(summary))
            run.log_artifact(table.out, "predictions")
            if summary.units_out is not None:
                run.log_artifact(summary.units_out, "predictions")
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (a scheduler stopping the job, see the CLI)
        raise ScoringInterrupted(summary, table.parts_dir) from None
    return summary


def _batches(
    opts: ScoreOptions, info: DomainInfo, rm: ResolvedModel, table: PartsTable, inputs: InputList, done: set[str]
) -> Iterator[BatchResult]:
    schemas = (table.schema, table.unit_schema)
    provenance = {**rm.provenance.to_dict(), "out_name": table.out.name}
    roots = tuple(str(Path(r).expanduser().resolve()) for r in (inputs.root, *opts.allow_roots))
    producer = {"root": str(inputs.root), "done": frozenset(done), "batch_size": opts.batch_size,
                "options": tuple(sorted(opts.options.items())), "roots": roots,
                "path_key": opts.path_key}  # fmt: skip
    if opts.backend == "ray":
        ray_kwargs = {"model_dir": str(rm.model_dir), "provenance": provenance, "domain": opts.domain,
                      "producer": producer, "explain": opts.explain, "table_dir": str(table.out.parent),
                      "inference_mode": str(rm.spec.inference.get("mode", "fp32"))}  # fmt: skip
        return run_ray(inputs.paths, ray_kwargs, opts.batch_size, schemas, opts.ray)
    device = pick_device(opts.device)
    scorer, assembler = build_engine(rm.model, rm.spec, provenance, device, opts.explain, table.out.parent,
                                     info.unit_table)  # fmt: skip
    prod = Producer(read_units=info.read_units, identity=info.content_identity, spec=rm.spec,
                    meta_keys=info.meta_keys, **producer)  # fmt: skip
    workers = default_workers() if opts.num_workers is None else opts.num_workers
    return run_local(inputs.paths, prod, scorer, assembler, schemas, workers)


def _commit(table: PartsTable, result: BatchResult, summary: ScoreSummary, on_progress: Progress | None) -> None:
    """Write one batch as a part, then count it (a row is only counted once it is committed)."""
    table.write(result.batch)
    files = result.batch.files
    statuses, paths = files.column("status").to_pylist(), files.column("path").to_pylist()
    failed = [(p, s) for p, s in zip(paths, statuses, strict=True) if s != "ok"]
    summary.scored_failed += len(failed)
    summary.scored_ok += len(statuses) - len(failed)
    summary.resumed += result.n_resumed
    summary.failures += failed[: max(0, 10 - len(summary.failures))]
    if result.worker:
        summary.workers[result.worker] = summary.workers.get(result.worker, 0) + result.n_inputs
    if result.batch.units is not None:
        status = result.batch.units.column("status")
        n_ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
        n_excluded = int(pc.sum(pc.starts_with(status, "excluded")).as_py() or 0)
        summary.units_ok += n_ok
        summary.units_excluded += n_excluded
        summary.units_failed += result.batch.units.num_rows - n_ok - n_excluded
    if on_progress:
        on_progress(result.n_inputs, len(failed), result.n_resumed)


def _finalize(table: PartsTable, inputs: InputList, summary: ScoreSummary) -> None:
    table.finalize({inputs.relative(p) for p in inputs.paths})
    status = pq.read_table(table.out, columns=["status"]).column("status")
    summary.rows_ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    summary.rows_failed = len(status) - summary.rows_ok
    if table.unit_schema is not None and table.units_out.is_file():
        summary.units_out = table.units_out
    if table.artifacts_dir.is_dir():
        summary.artifacts_dir = table.artifacts_dir


def _root_label(inputs: InputList) -> str:
    """The input root as the tables' metadata records it (where the dashboard finds the source files): its path,
    or with pseudonymised paths a keyed pseudonym of it (the folder may be named after the patient)."""
    if inputs.path_key is None:
        return str(inputs.root)
    from loupe.workflows.scoring.inputs import pseudonym

    return "pseudonymised:" + pseudonym(str(inputs.root), inputs.path_key)


def _anonymous(text: str) -> str:
    """A stable short name for a path that must not be logged (a folder may be named after a patient)."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def _params(opts: ScoreOptions, rm: ResolvedModel, inputs: InputList, n_done: int) -> dict[str, Any]:
    source = rm.provenance.model_source
    if source.startswith(("local-dir:", "file:")):  # a folder of the user's, by name only
        source = f"{source.partition(':')[0]}:…/{Path(source.partition(':')[2]).name}"
    return {
        **rm.provenance.to_dict(),
        "model_source": source,
        "aggregation": rm.spec.aggregation,
        "input_kind": inputs.kind,
        "input_id": _anonymous(str(inputs.root)),
        "out_name": Path(opts.out).name,
        "backend": opts.backend,
        "batch_size": opts.batch_size,
        "num_workers": opts.num_workers if opts.num_workers is not None else default_workers(),
        "explain": opts.explain,
        "mode": opts.mode,
        "inference_mode": str(rm.spec.inference.get("mode", "fp32")),
        "labels": list(rm.spec.label_names),
        "already_scored": n_done,
        **{f"option.{k}": v for k, v in opts.options.items()},
    }


def _metrics(s: ScoreSummary) -> dict[str, float]:
    out = {
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
    if s.units_out is not None:
        out |= {"units_ok": s.units_ok, "units_failed": s.units_failed, "units_excluded": s.units_excluded}
    return out
