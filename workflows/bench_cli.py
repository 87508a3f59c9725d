"""``loupe bench``: the project's benchmarks for any domain and model, each a ratio measured in one run."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Benchmarks, each reported as a ratio measured in one run.", no_args_is_help=True)
console = Console()

Domain = typer.Option("cxr", "--domain", help="Domain whose scoring path is measured (see `loupe models`).")
Model = typer.Option(None, "--model", help="A trained model (local-dir:, models:/...); default: random weights.")
AsJson = typer.Option(False, "--json", help="Print JSON only.")


@app.command("scoring-memory")
def scoring_memory(
    small: int = typer.Option(200, help="Inputs in the small run."),
    large: int = typer.Option(2000, help="Inputs in the large run."),
    num_workers: int = typer.Option(2, "--num-workers", min=0, help="DataLoader workers of each scoring run."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    domain: str = Domain,
    model: str | None = Model,
    as_json: bool = AsJson,
) -> None:
    """Peak RSS of `loupe score` on SMALL vs LARGE inputs (fresh child processes); flat memory ≈ ratio 1."""
    from loupe.workflows.bench import scoring_memory as run

    res = run((small, large), num_workers=num_workers, batch_size=batch_size, domain=domain, model=model)
    if as_json:
        console.print_json(json.dumps(res))
        return
    table = Table("inputs", "peak RSS (MiB)", "peak tree RSS (MiB)", "seconds", title=f"scoring memory ({domain})")
    for n, r in res["runs"].items():
        table.add_row(n, f"{r['peak_rss_mib']:.0f}", f"{r['peak_tree_rss_mib']:.0f}", f"{r['seconds']:.1f}")
    console.print(table)
    console.print(
        f"ratio {large}/{small}: peak RSS {res['ratio_peak_rss']:.3f}, peak tree RSS {res['ratio_peak_tree_rss']:.3f}"
    )


@app.command("throughput")
def throughput(
    n: int = typer.Option(512, "-n", help="Inputs to score."),
    arch: str = typer.Option("vit_tiny_patch16", help="Registered architecture (random weights) without --model."),
    size: int = typer.Option(224, help="Model input side in pixels, without --model."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    num_workers: int | None = typer.Option(None, "--num-workers", min=0),
    domain: str = Domain,
    model: str | None = Model,
    as_json: bool = AsJson,
) -> None:
    """Inputs/s of the scoring path (read → preprocess → forward → table) vs the bare model forward."""
    from loupe.workflows.bench import throughput as run

    res = run(n=n, arch=arch, size=size, batch_size=batch_size, num_workers=num_workers, domain=domain, model=model)
    if as_json:
        console.print_json(json.dumps(res))
        return
    console.print(
        f"{domain} {res['arch']} {res['input_size']}, batch {batch_size}: bare forward "
        f"{res['bare_forward_img_s']:.1f} img/s, scoring path {res['scoring_img_s']:.1f} img/s, "
        f"ratio {res['ratio_scoring_over_bare']:.3f}"
    )


@app.command("startup")
def startup(
    domain: str = Domain,
    repeats: int = typer.Option(3, min=1, help="Runs of each command (the median is reported)."),
    as_json: bool = AsJson,
) -> None:
    """Fixed cost of a command: `loupe --help`, and scoring one input (tracked / not) vs a bare load + forward."""
    from loupe.workflows.bench import startup as run

    res = run(domain=domain, repeats=repeats)
    if as_json:
        console.print_json(json.dumps(res))
        return
    table = Table("what", "seconds (median)", title=f"start-up ({domain}, fresh processes)")
    for key, what in (("help_s", "loupe --help"), ("bare_load_forward_s", "bare load + read + forward"),
                      ("score_one_tracked_s", "loupe score, one input, tracked"),
                      ("score_one_untracked_s", "loupe score, one input, --no-track"),
                      ("first_tracked_run_s", "first tracked run (creates the MLflow store)")):  # fmt: skip
        table.add_row(what, f"{res[key]:.2f}")
    console.print(table)
    console.print(
        f"ratio to the bare model: tracked {res['ratio_tracked_over_bare']:.2f}, "
        f"untracked {res['ratio_untracked_over_bare']:.2f}"
    )
