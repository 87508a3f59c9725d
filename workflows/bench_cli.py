"""``loupe bench``: the project's benchmarks for any domain and model, each a ratio measured in one run."""

from __future__ import annotations

import json
from pathlib import Path

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


@app.command("speed")
def speed(
    arch: list[str] = typer.Option(None, "--arch", help="timm ViT architecture(s) [vit_small/vit_base_patch16_224]."),
    mode: list[str] = typer.Option(None, "--mode", help="Inference modes to measure [fp32, bf16, int8, +tome, ...]."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    repeats: int = typer.Option(3, min=1, help="Interleaved timing rounds (the median is reported)."),
    model: str | None = typer.Option(None, "--model", help="Suite-trained model folder (local-dir:) for accuracy."),
    eval_manifest: Path | None = typer.Option(None, "--eval-manifest", help="Real evaluation manifest (CSV/Parquet)."),
    eval_split: str | None = typer.Option("test", "--eval-split", help="Rows of this split, when it has splits."),
    eval_limit: int = typer.Option(512, "--eval-limit", min=1, help="At most this many evaluation rows."),
    tolerance: float = typer.Option(0.005, min=0.0, max=0.1, help="AUROC drop a mode may cost to count accurate."),
    mae: bool = typer.Option(True, "--mae/--no-mae", help="Measure MAE pretraining steps at mask ratio 0.9."),
    mae_arch: str | None = typer.Option(None, "--mae-arch", help="MAE encoder [vit_base_patch16_224]."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads [torch's default]."),
    quick: bool = typer.Option(False, "--quick", help="A seconds-long smoke run (tiny ViT, 64 px)."),
    io: bool = typer.Option(
        False,
        "--io",
        help="Add the input-pipeline sections: end-to-end scoring of real NIH PNGs vs model-only, "
        "JPEG 2000 reduced vs full decoding, memory over 50 batches (needs ../shared/data; minutes).",
    ),
    as_json: bool = AsJson,
) -> None:
    """Img/s, GFLOPS vs the GEMM peak, peak memory and accuracy cost of each inference mode vs plain timm fp32."""
    import torch

    from loupe.core.errors import LoupeError
    from loupe.workflows.bench_speed import SpeedOptions, register_section, run_speed

    if io:
        from loupe.workflows import bench_io

        register_section("input_pipeline", lambda _opts: bench_io.io_sections_in_child(quick))

    over = {k: v for k, v in {"archs": tuple(arch or ()), "modes": tuple(mode or ()), "mae_arch": mae_arch}.items()
            if v}  # fmt: skip
    common = dict(model=model, eval_manifest=eval_manifest, eval_split=eval_split, eval_limit=eval_limit,
                  tolerance=tolerance, mae=mae, **over)  # fmt: skip
    if not quick:
        common |= {"batch_size": batch_size, "repeats": repeats}
    opts = SpeedOptions.quick_options(**common) if quick else SpeedOptions(**common)
    err = Console(stderr=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        res = run_speed(opts, on_section=lambda name: err.print(f"[dim]bench speed: {name}…[/]", highlight=False))
    except LoupeError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        torch.set_num_threads(before)
    if as_json:
        console.print_json(json.dumps(res, default=str))
        return
    render_speed(res)


def _cells(r: dict) -> list[str]:
    """One mode's row; a mode that did not run shows dashes and why."""
    fmt = {"img_s": "{:.2f}", "speedup_vs_timm": "{:.2f}", "gflop_per_img": "{:.2f}", "achieved_gflops": "{:.0f}",
           "fraction_of_peak": "{:.0%}", "peak_rise_mib": "{:.0f}"}  # fmt: skip
    return [f.format(r[k]) if r[k] == r[k] else "–" for k, f in fmt.items()] + [r["note"][:70]]


def render_speed(res: dict) -> None:
    """The speed benchmark as rich tables (every figure also in ``--json``)."""
    m, g = res["machine"], res["gemm"]
    console.print(f"[bold]{m['cpu']}[/], {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}; "
                  f"ISA: {' '.join(m['instruction_sets'])}; load {m['load_average'][0]:.1f}→"
                  f"{m['load_average_after'][0]:.1f}", highlight=False)  # fmt: skip
    console.print(f"GEMM peak ({g['size']}³) at the start: fp32 {g['fp32_gflops']:.0f}, bf16 {g['bf16_gflops']:.0f} "
                  f"({'native' if g['bf16_native'] else 'emulated'}), int8 {g['int8_gflops']:.0f} GFLOPS",
                  highlight=False)  # fmt: skip
    for mod in res["models"]:
        p = mod["gemm_gflops"]
        console.print(f"{mod['arch']}: GEMM peak in its rounds fp32 {p['fp32']:.0f}, bf16 {p['bf16']:.0f}, int8 "
                      f"{p['int8']:.0f} GFLOPS", highlight=False)  # fmt: skip
        t = Table(title=f"{mod['arch']} {mod['img_size']}px, batch {mod['batch_size']}")
        t.add_column("mode", no_wrap=True)
        for col in ("img/s", "× timm", "GFLOP/img", "GFLOPS", "of peak", "peak MiB", "note"):
            t.add_column(col)
        for name, r in mod["modes"].items():
            t.add_row(name, *_cells(r))
        console.print(t)
        for tm in mod["tome"]:
            console.print(f"  {tm['mode']} vs {tm['versus']}: speed-up {tm['speedup']:.2f}, FLOP cut "
                          f"{tm['flop_cut']:.2f}, speed-up / FLOP cut {tm['speedup_over_flop_cut']:.2f}",
                          highlight=False)  # fmt: skip
    if "accuracy" in res:
        a = res["accuracy"]
        t = Table("mode", "AUROC", "drop", "agreement", title=f"accuracy: {a['model']} on {a['images']} images")
        for name, r in a["modes"].items():
            t.add_row(name, *(f"{r[k]:.4f}" if k in r else r.get("note", "")[:50]
                              for k in ("auroc", "auroc_drop", "agreement")))  # fmt: skip
        console.print(t)
    for arch, f in res["fastest_accurate"].items():
        what = f"{f['mode']} at {f['speedup_vs_timm']:.2f}× timm (AUROC drop {f['auroc_drop']:.4f})" if f["mode"] else \
            f["note"]  # fmt: skip
        console.print(f"fastest accurate mode, {arch}: {what}", highlight=False)
    if "mae" in res:
        mae = res["mae"]
        for name, d in mae["decoders"].items():
            console.print(f"MAE {mae['encoder']} mask {mae['mask_ratio']} decoder {name}: step / full-token step "
                          f"measured {d['measured_step_ratio']:.3f}, FLOP-predicted {d['flop_predicted_ratio']:.3f} "
                          f"(measured / predicted {d['measured_over_predicted']:.2f})", highlight=False)  # fmt: skip
    for name, section in res.get("extra", {}).items():
        console.print(f"[bold]{name}[/]")
        console.print_json(json.dumps(section, default=str))
    console.print(f"[dim]{res['seconds']:.0f} s[/]")
