"""``loupe demo``: the main job on embedded defaults, for every registered domain that brings a demo.

Per domain: its demo inputs (from installed packages) → its demo model, logged as an MLflow run tagged
``demo=true`` and registered as ``<domain>-demo@champion`` → batch scoring by ``models:/<domain>-demo@champion``
(with Grad-CAM overlays) into ``<out>/<domain>/predictions.parquet``, itself an MLflow run. A domain plugs in by
passing ``demo_inputs`` / ``demo_model`` to `register_domain`; nothing here names a domain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from loupe.core.domain import DomainInfo
from loupe.core.registry import DOMAINS, discover_domains
from loupe.core.tracking import Tracker, make_tracker
from loupe.workflows.scoring import ScoreOptions, ScoreSummary, score
from loupe.workflows.scoring.report import progress_bar, render_summary

EXPERIMENT = "loupe-demo"


@dataclass
class DemoResult:
    domain: str
    summary: ScoreSummary | None
    model_uri: str | None
    seconds: float
    note: str = ""


def run_demo(
    out: Path,
    console: Console,
    domains: list[str] | None = None,
    tracking_uri: str | None = None,
    fast: bool = False,
) -> list[DemoResult]:
    """Run every (or the named) domain's demo; returns one result per domain (``summary`` None: no demo)."""
    names = discover_domains()
    tracker = make_tracker(tracking_uri)
    results = []
    for name in domains or names:
        info: DomainInfo = DOMAINS.get(name)
        if info.demo_inputs is None or info.demo_model is None:
            results.append(DemoResult(name, None, None, 0.0, "no demo registered"))
            continue
        console.rule(f"[bold]{name}[/]: {info.description}")
        results.append(_one_domain(info, Path(out) / name, tracker, console, fast))
    _final_report(results, tracker.uri, console)
    return results


def _one_domain(info: DomainInfo, out: Path, tracker: Tracker, console: Console, fast: bool) -> DemoResult:
    t0 = time.perf_counter()
    inputs = info.demo_inputs(out / "inputs")
    console.print(f"inputs: {sum(1 for _ in inputs.iterdir())} files in {inputs}")
    tags = {"demo": "true", "domain": info.name}
    with console.status("building the demo model (pretrained weights if cached, else a small one trained now)"):
        with tracker.run(f"demo-model-{info.name}", experiment=EXPERIMENT, tags=tags) as run:
            model_dir = info.demo_model(out / "model", run=run, fast=fast)
            run.log_model_dir(model_dir)
    registered = f"{info.name}-demo"
    version = tracker.register_model(registered, run.run_id, alias="champion")
    uri = f"models:/{registered}@champion"
    console.print(f"model: {model_dir} → registered as {registered} v{version}, alias @champion")
    opts = ScoreOptions(
        domain=info.name,
        input=inputs,
        model=uri,
        out=out / "predictions.parquet",
        mode="overwrite",
        explain=True,
        tracking_uri=tracker.uri,
        experiment=EXPERIMENT,
        tags=tags,
        batch_size=8,
    )
    with progress_bar(console, f"scoring {info.name}") as (on_start, on_progress):
        summary = score(opts, on_start=on_start, on_progress=on_progress)
    render_summary(summary, console)
    return DemoResult(info.name, summary, uri, time.perf_counter() - t0)


def _final_report(results: list[DemoResult], uri: str, console: Console) -> None:
    console.rule("[bold]demo done")
    for r in results:
        if r.summary is None:
            console.print(f"{r.domain}: {r.note}")
            continue
        s = r.summary
        console.print(
            f"{r.domain}: {s.rows_ok} ok / {s.rows_failed} failed rows in {r.seconds:.0f} s "
            f"(failed rows are expected: the demo inputs include a corrupt file and may include images outside the "
            f"model's scope; each reason is listed above and in the status column)\n"
            f"  predictions: {s.out}\n  artifacts (Grad-CAM maps and pictures): {s.artifacts_dir}\n"
            f"  model: {r.model_uri}",
            highlight=False,
        )
    if uri.startswith("sqlite:///"):
        console.print(f"MLflow UI: [bold]mlflow ui --backend-store-uri {uri}[/]", highlight=False, soft_wrap=True)
    else:
        console.print(f"MLflow runs are in {uri}", highlight=False, soft_wrap=True)
    out = next((r.summary.out.parent.parent for r in results if r.summary is not None), None)
    if out is not None:
        console.print(f"Review the cases: [bold]loupe dashboard --data {out} --tracking-uri {uri}[/]",
                      highlight=False, soft_wrap=True)  # fmt: skip
