"""``loupe deid IN OUT``: de-identify a folder of DICOM / PNG / JPEG / TIFF before anything else reads it.

Exit codes: 0 every file de-identified, quarantined or skipped; 1 some files failed (the others are done; rerun
with ``--resume`` after fixing them); 2 usage error (no key, OUT not empty, paths overlapping).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loupe.core.errors import LoupeError

console = Console()
err = Console(stderr=True)


def command(
    in_dir: Path = typer.Argument(
        ..., help="Folder of files to de-identify (walked recursively; hidden files skipped)."
    ),
    out_dir: Path = typer.Argument(..., help="New or empty folder for the de-identified files and the reports."),
    key_file: Path | None = typer.Option(
        None, "--key-file", help="File holding your secret key (or set LOUPE_DEID_KEY); it is never written anywhere."
    ),
    map_path: Path | None = typer.Option(
        None, "--map", help="Write the input path → output name mapping here (outside IN and OUT; keep it private)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue an earlier run on OUT: skip the files it did."),
    retain_patient_characteristics: bool = typer.Option(
        False,
        "--retain-patient-characteristics",
        help="Keep patient sex, age (capped at 90 y), size and weight (Annex E option), e.g. for subgroup tables.",
    ),
) -> None:
    """De-identify IN into OUT: DICOM by the PS3.15 Annex E basic profile (dicognito pseudonyms keyed by your secret,
    dates shifted per patient, private tags removed), PNG/JPEG/TIFF metadata stripped with pixels kept exactly.
    Files that may show identity in their pixels go to OUT/quarantine.csv, not to OUT. Exit 1 if any file failed."""
    from loupe.workflows.deid import deidentify, load_key

    try:
        key = load_key(key_file)
        with _progress() as (on_start, on_file):
            summary = deidentify(
                in_dir,
                out_dir,
                key,
                map_path=map_path,
                resume=resume,
                retain_patient_characteristics=retain_patient_characteristics,
                on_start=on_start,
                on_file=on_file,
            )
    except LoupeError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _render(summary)
    raise typer.Exit(1 if summary["failed"] else 0)


@contextlib.contextmanager
def _progress() -> Iterator[tuple[Callable[[int], None], Callable[[str], None]]]:
    progress = Progress(
        TextColumn("[bold]de-identifying"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[yellow]{task.fields[quarantined]} quarantined"),
        TextColumn("[red]{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        console=err,
    )
    state: dict[str, int] = {}

    def on_start(total: int) -> None:
        state["task"] = progress.add_task("deid", total=total, quarantined=0, failed=0)

    def on_file(status: str) -> None:
        task = progress.tasks[state["task"]]
        bump = {s: task.fields[s] + (status == s) for s in ("quarantined", "failed")}
        progress.update(state["task"], advance=1, **bump)

    with progress:
        yield on_start, on_file


def _render(s: dict) -> None:
    """The summary; files are named by their output ids only (the --map file links them to the inputs)."""
    t = Table(title="de-identification", title_justify="left", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("files", f"{s['files']}: {s['ok']} written, {s['quarantined']} quarantined, {s['skipped']} skipped, "
              f"{s['failed']} failed ({s['resumed']} done by an earlier run)")  # fmt: skip
    t.add_row("output", s["out"])
    t.add_row("report", s["report"])
    if s["quarantined"]:
        t.add_row("quarantine", f"{s['quarantine']} (not written to OUT: check the pixels by hand)")
    if s["map"]:
        t.add_row("map", f"{s['map']} (links output names to inputs; keep it private)")
    if s["failed"]:
        shown = ", ".join(s["failed_ids"][:5]) + (" ..." if s["failed"] > 5 else "")
        t.add_row("[red]failed[/]", f"{shown}: reasons in the report; rerun with --resume after fixing them")
    console.print(t)
