"""``loupe data``: validate, convert and split manifests. Exit codes: 0 valid, 1 problems found, 2 unreadable input."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from loupe.core.data import adapters
from loupe.core.data.manifest import read_manifest, validate_manifest, write_manifest
from loupe.core.data.splits import split_by_group
from loupe.core.errors import LoupeError

app = typer.Typer(help="Check and build manifests (path, labels 1/0/empty, group, split).", no_args_is_help=True)
console = Console()
err = Console(stderr=True)
SOURCES = ("nih", "chexpert", "mimic", "folder")


def _fail(exc: LoupeError) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def validate(
    manifest: Path = typer.Argument(..., help="CSV or Parquet manifest."),
    root: Path | None = typer.Option(
        None, "--root", help="Folder the paths are relative to (default: the manifest's)."
    ),
    labels: list[str] | None = typer.Option(
        None, "--labels", help="Expected label columns (repeat, or comma-separate)."
    ),
    no_files: bool = typer.Option(False, "--no-files", help="Skip checking that every file exists."),
) -> None:
    """Report every problem in MANIFEST at once: missing files, bad label values, duplicates, leaked groups."""
    try:
        frame = read_manifest(manifest)
    except LoupeError as exc:
        _fail(exc)
    expected = [n.strip() for item in labels or [] for n in item.split(",") if n.strip()] or None
    base = root if root is not None else manifest.parent
    problems = validate_manifest(frame, root=base, labels=expected, check_files=not no_files)
    if not problems:
        console.print(f"[green]valid[/]: {manifest} ({len(frame)} rows)")
        return
    console.print(f"[bold red]{len(problems)} problem(s)[/] in {manifest} ({len(frame)} rows):", highlight=False)
    for p in problems:
        console.print(f"  [bold]{escape(p.where)}[/]: {escape(p.message)}; [dim]{escape(p.fix)}[/]", soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def convert(
    source: str = typer.Argument(..., help=f"Layout to convert: {', '.join(SOURCES)}."),
    inputs: list[Path] = typer.Argument(
        ..., help="nih: Data_Entry CSV; chexpert: train.csv; mimic: METADATA CHEXPERT; folder: ROOT."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest to write (.csv or .parquet)."),
    uncertain: str = typer.Option("ignore", help="CheXpert / MIMIC -1 labels: ones, zeros or ignore (unknown)."),
) -> None:
    """Turn a public dataset layout into a manifest."""
    try:
        frame = _convert(source, inputs, uncertain)
    except (LoupeError, ValueError) as exc:
        _fail(LoupeError(str(exc)))
    write_manifest(frame, out)
    console.print(f"wrote {out} ({len(frame)} rows, {frame['group'].nunique()} groups)")


def _convert(source: str, inputs: list[Path], uncertain: str):
    needed = {"nih": 1, "chexpert": 1, "mimic": 2, "folder": 1}
    if source not in needed:
        raise LoupeError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    if len(inputs) != needed[source]:
        raise LoupeError(f"{source} takes {needed[source]} input path(s), got {len(inputs)}")
    if source == "nih":
        return adapters.nih_chestxray14(inputs[0])
    if source == "chexpert":
        return adapters.chexpert(inputs[0], uncertain=uncertain)
    if source == "mimic":
        return adapters.mimic_cxr_jpg(inputs[0], inputs[1], uncertain=uncertain)
    return adapters.folder_per_class(inputs[0])


@app.command()
def split(
    manifest: Path = typer.Argument(..., help="CSV or Parquet manifest with a group column."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest to write, with a split column."),
    train: float = typer.Option(0.7, help="Share of images for training."),
    val: float = typer.Option(0.1, help="Share of images for validation."),
    test: float = typer.Option(0.2, help="Share of images for testing."),
    seed: int = typer.Option(0, help="Seed of the (reproducible) group shuffle."),
) -> None:
    """Split MANIFEST into train / val / test by group (patient, slide, video), stratified by rarest label."""
    try:
        frame = split_by_group(read_manifest(manifest), {"train": train, "val": val, "test": test}, seed=seed)
    except LoupeError as exc:
        _fail(exc)
    write_manifest(frame, out)
    counts = frame["split"].value_counts().to_dict()
    console.print(f"wrote {out}: {counts}")
