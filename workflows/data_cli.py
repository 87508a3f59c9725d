"""``loupe data``: validate, convert and split manifests. Exit codes: 0 valid, 1 problems found, 2 unreadable input."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from loupe.core.errors import LoupeError

app = typer.Typer(help="Check and build manifests (path, labels 1/0/empty, group, split).", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


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
    from loupe.core.data.manifest import read_manifest, validate_manifest

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


def _adapters():
    import loupe.core.data.adapters  # noqa: F401 - registers the domain-neutral "folder" source
    from loupe.core.registry import ADAPTERS, discover_domains

    discover_domains()
    return ADAPTERS


@app.command()
def sources() -> None:
    """The dataset layouts `loupe data convert` knows, with the inputs each takes (domains register theirs)."""
    from rich.table import Table

    table = Table("source", "domain", "inputs", "what", title="manifest sources", title_justify="left")
    for e in _adapters().entries():
        table.add_row(e.name, e.domain, " ".join(e.meta.get("inputs", ())), e.meta.get("doc", ""))
    console.print(table)


@app.command()
def convert(
    source: str = typer.Argument(..., help="A dataset layout (`loupe data sources` lists them), e.g. folder."),
    inputs: list[Path] = typer.Argument(..., help="The layout's input files or folders, in the order it lists."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest to write (.csv or .parquet)."),
    uncertain: str = typer.Option("ignore", help="Sources with uncertain labels (-1): ones, zeros or ignore."),
) -> None:
    """Turn a public dataset layout into a manifest."""
    from loupe.core.data.manifest import write_manifest

    try:
        frame = _convert(source, inputs, uncertain)
    except (LoupeError, ValueError) as exc:
        _fail(exc if isinstance(exc, LoupeError) else LoupeError(str(exc)))
    write_manifest(frame, out)
    console.print(f"wrote {out} ({len(frame)} rows, {frame['group'].nunique()} groups)")


def _convert(source: str, inputs: list[Path], uncertain: str):
    entry = _adapters().entry(source)  # unknown → "did you mean", with the known sources
    needed = entry.meta.get("inputs", ("INPUT",))
    if len(inputs) != len(needed):
        raise LoupeError(f"{source} takes {len(needed)} input path(s) ({' '.join(needed)}), got {len(inputs)}")
    kwargs = {"uncertain": uncertain} if entry.meta.get("uncertain") else {}
    return entry.obj(*inputs, **kwargs)


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
    from loupe.core.data.manifest import read_manifest, write_manifest
    from loupe.core.data.splits import split_by_group

    try:
        frame = split_by_group(read_manifest(manifest), {"train": train, "val": val, "test": test}, seed=seed)
    except LoupeError as exc:
        _fail(exc)
    write_manifest(frame, out)
    counts = frame["split"].value_counts().to_dict()
    console.print(f"wrote {out}: {counts}")
