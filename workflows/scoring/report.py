"""Rich rendering of a scoring run: the live progress bar (throughput, ETA, failures) and the end summary."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from loupe.workflows.scoring.api import ScoreSummary

Callbacks = tuple[Callable[[int], None], Callable[[int, int, int], None]]


@contextlib.contextmanager
def progress_bar(console: Console, label: str = "scoring") -> Iterator[Callbacks]:
    """Yields ``(on_start(total), on_progress(n_inputs, n_failed, n_resumed))`` driving one rich progress bar.

    The rate counts inputs this run scored, not those an earlier run had scored (resumed inputs go by in
    milliseconds and would make the rate and the ETA lie).
    """
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]:>7.1f} inputs/s"),
        TextColumn("[red]{task.fields[failed]} failed"),
        TextColumn("[dim]{task.fields[resumed]} resumed"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TextColumn("{task.fields[eta]}"),
        console=console,
        transient=False,
    )
    state: dict[str, float] = {}

    def on_start(total: int) -> None:
        state["task"] = progress.add_task(label, total=total, rate=0.0, failed=0, resumed=0, eta="-")
        state["t0"], state["scored"] = time.perf_counter(), 0

    def on_progress(n: int, failed: int, resumed: int) -> None:
        task = int(state["task"])
        t = progress.tasks[task]
        state["scored"] += n - resumed
        elapsed = time.perf_counter() - state["t0"]
        rate = state["scored"] / elapsed if elapsed > 0 else 0.0
        left = (t.total or 0) - t.completed - n
        eta = f"{left / rate:.0f} s" if rate > 0 else "-"
        progress.update(task, advance=n, failed=t.fields["failed"] + failed, resumed=t.fields["resumed"] + resumed,
                        rate=rate, eta=eta)  # fmt: skip

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
    if s.units_out is not None:
        t.add_row("units", f"{s.units_ok} ok, {s.units_excluded} excluded by quality control, {s.units_failed} failed "
                  f"(this run) in {s.units_out}")  # fmt: skip
    t.add_row("throughput", f"{s.images_per_s:.1f} inputs/s over {s.seconds:.1f} s (inputs scored by this run)")
    if len(s.workers) > 1:
        t.add_row("scoring processes", f"{len(s.workers)} ({', '.join(f'{n} inputs' for n in s.workers.values())})")
    t.add_row("model", f"{s.model.get('model_name')} v{s.model.get('model_version')} ({s.model.get('model_source')})")
    t.add_row("weights sha256", str(s.model.get("weights_sha256", ""))[:16] + "…")
    t.add_row("predictions", str(s.out))
    if s.artifacts_dir:
        t.add_row("artifacts", f"{s.artifacts_dir} (masks, Grad-CAM maps and pictures)")
    if s.run_id and s.tracking_uri and not s.tracking_uri.startswith("null"):
        t.add_row("MLflow run", f"{s.run_id} in {s.tracking_uri}")
    console.print(t)
    for path, status in s.failures:
        console.print(f"{path}: [red]{status}[/]", highlight=False, soft_wrap=True)
    extra = s.rows_failed - len(s.failures)
    if extra > 0:
        console.print(f"... and {extra} more failed rows (filter status != 'ok' in the table)")
