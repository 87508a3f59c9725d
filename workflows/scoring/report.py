"""Rich rendering of a scoring run: the live progress bar (throughput, ETA, failures) and the end summary."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from loupe.workflows.scoring.api import ScoreSummary

Callbacks = tuple[Callable[[int], None], Callable[[int, int], None]]


@contextlib.contextmanager
def progress_bar(console: Console, label: str = "scoring") -> Iterator[Callbacks]:
    """Yields ``(on_start(total), on_progress(n_inputs, n_failed))`` driving one rich progress bar."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]:>7.1f} img/s"),
        TextColumn("[red]{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    state: dict[str, int] = {}

    def on_start(total: int) -> None:
        state["task"] = progress.add_task(label, total=total, rate=0.0, failed=0)

    def on_progress(n: int, failed: int) -> None:
        task = state["task"]
        t = progress.tasks[task]
        progress.update(task, advance=n, failed=t.fields["failed"] + failed)
        progress.update(task, rate=t.completed / t.elapsed if t.elapsed else 0.0)

    with progress:
        yield on_start, on_progress


def render_summary(s: ScoreSummary, console: Console) -> None:
    """The end-of-run table: counts, throughput, where the table / maps / MLflow run are, first failures."""
    t = Table(title="scoring summary", title_justify="left", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("inputs", f"{s.inputs} ({s.not_images} other files skipped)" if s.not_images else str(s.inputs))
    t.add_row("this run", f"{s.scored_ok} ok, {s.scored_failed} failed, {s.resumed} already scored (resumed)")
    t.add_row("table rows", f"{s.rows_ok + s.rows_failed}: {s.rows_ok} ok, {s.rows_failed} failed")
    t.add_row("throughput", f"{s.images_per_s:.1f} inputs/s over {s.seconds:.1f} s")
    t.add_row("model", f"{s.model.get('model_name')} v{s.model.get('model_version')} ({s.model.get('model_source')})")
    t.add_row("weights sha256", str(s.model.get("weights_sha256", ""))[:16] + "…")
    t.add_row("predictions", str(s.out))
    if s.explain_dir:
        t.add_row("explanations", str(s.explain_dir))
    if s.run_id and s.tracking_uri and not s.tracking_uri.startswith("null"):
        t.add_row("MLflow run", f"{s.run_id} in {s.tracking_uri}")
    console.print(t)
    for path, status in s.failures:
        console.print(f"{path}: [red]{status}[/]", highlight=False, soft_wrap=True)
    extra = s.rows_failed - len(s.failures)
    if extra > 0:
        console.print(f"... and {extra} more failed rows (filter status != 'ok' in the table)")
