"""The ``loupe`` command line (typer + rich). Exit codes: 0 ok, 1 some inputs failed, 2 usage / config error."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from loupe.core.errors import ConfigError, LoupeError, WeightsNotFoundError
from loupe.core.registry import DOMAINS, LABEL_SETS, MODELS, PRESETS, RECIPES, WEIGHTS, discover_domains

app = typer.Typer(
    name="loupe",
    help="Loupe: take a closer look at medical and forensic images with vision transformers. "
    "`loupe models` lists the domains installed (and what each registers).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
weights_app = typer.Typer(help="List, fetch and import model weights (the offline cache).", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
console = Console(stderr=False)
err = Console(stderr=True)

TrackingUri = typer.Option(
    None, "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the local SQLite store)."
)


def _fail(exc: LoupeError) -> None:
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details (INFO) to stderr.")) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


models_app = typer.Typer(help="What is registered, and the MLflow model registry (register, alias, list).")
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models_cmd(
    ctx: typer.Context,
    domain: str | None = typer.Option(None, help="Only this domain."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """List the registered domains, models, label sets, presets, recipes and weight tags."""
    if ctx.invoked_subcommand is not None:
        return
    discover_domains()
    registries = {"model": MODELS, "label set": LABEL_SETS, "preset": PRESETS, "recipe": RECIPES, "weight tag": WEIGHTS}
    if as_json:
        out = {k: [e.name for e in r.entries() if domain in (None, e.domain)] for k, r in registries.items()}
        out["domain"] = DOMAINS.names()
        console.print_json(json.dumps(out))
        return
    console.print(f"[bold]Domains:[/] {', '.join(DOMAINS.names()) or '(none)'}")
    for kind, reg in registries.items():
        table = Table(title=f"{kind}s", title_justify="left")
        table.add_column("name")
        table.add_column("domain")
        table.add_column("details", overflow="fold")
        for e in reg.entries():
            if domain in (None, e.domain):
                details = ", ".join(f"{k}={v}" for k, v in e.meta.items() if k != "doc") or e.meta.get("doc", "")
                table.add_row(e.name, e.domain, str(details))
        console.print(table)


@models_app.command("register")
def models_register(
    run_id: str = typer.Option(..., "--run-id", help="MLflow run whose 'model' artifact is registered."),
    name: str = typer.Option(..., "--name", help="Registered model name."),
    alias: str | None = typer.Option(None, "--alias", help="Point this alias (e.g. champion) at the new version."),
    tracking_uri: str | None = TrackingUri,
) -> None:
    """Register a run's model folder as a new version of NAME (optionally setting an alias)."""
    from loupe.core.tracking import make_tracker

    try:
        version = make_tracker(tracking_uri).register_model(name, run_id, alias=alias)
    except LoupeError as exc:
        _fail(exc)
    except Exception as exc:  # noqa: BLE001 - the store's own errors (unknown run id) are usage errors here
        _fail(LoupeError(f"could not register run {run_id!r} as {name!r}: {exc}"))
    suffix = f" with alias @{alias}; score it with --model models:/{name}@{alias}" if alias else ""
    console.print(f"[green]registered[/] {name} version {version}{suffix}")


@models_app.command("alias")
def models_alias(
    name: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Argument(..., help="Version the alias points to."),
    alias: str = typer.Argument(..., help="Alias, e.g. champion or challenger."),
    tracking_uri: str | None = TrackingUri,
) -> None:
    """Point ALIAS of model NAME at VERSION (e.g. promote a challenger to champion)."""
    from loupe.core.tracking import make_tracker

    try:
        make_tracker(tracking_uri).set_alias(name, version, alias)
    except Exception as exc:  # noqa: BLE001 - unknown name / version from the store is a usage error
        _fail(exc if isinstance(exc, LoupeError) else LoupeError(f"could not set {name}@{alias} → {version}: {exc}"))
    console.print(f"[green]{name}@{alias}[/] → version {version}")


@models_app.command("registered")
def models_registered(
    tracking_uri: str | None = TrackingUri,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the models in the MLflow registry with their versions and aliases."""
    from loupe.core.tracking import make_tracker

    try:
        rows = make_tracker(tracking_uri).registered_models()
    except LoupeError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("name", "version", "aliases", "run id", title="registered models", title_justify="left")
    for r in rows:
        table.add_row(r["name"], r["version"], ", ".join(f"@{a}" for a in r["aliases"]), r["run_id"])
    console.print(table if rows else "no registered models (register one with `loupe models register`)")


@app.command("validate")
def validate_cmd(
    cfg: Path = typer.Argument(..., help="Recipe YAML."), overrides: list[str] = typer.Argument(None)
) -> None:
    """Check a recipe config without running it; prints the resolved config."""
    from loupe.core.config import to_dict
    from loupe.core.recipes import load_recipe

    try:
        cls, conf = load_recipe(cfg, overrides or [])
    except LoupeError as exc:
        _fail(exc)
    console.print(f"[green]valid[/] {cls.name} config")
    console.print_json(json.dumps(to_dict(conf)))


def _run_recipe(mode: str, cfg: Path, overrides: list[str], tracking_uri: str | None) -> None:
    from loupe.core.recipes import load_recipe
    from loupe.core.tracking import make_tracker

    try:
        cls, conf = load_recipe(cfg, overrides)
        tracker = make_tracker(tracking_uri or conf.run.tracking_uri, enabled=conf.run.track)
        result = cls(conf, tracker).run(mode)
    except LoupeError as exc:
        _fail(exc)
    console.print_json(json.dumps(result, default=str))


@app.command("train")
def train_cmd(
    cfg: Path,
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. train.epochs=3"),
    tracking_uri: str | None = TrackingUri,
) -> None:
    """Run a recipe's training, tracked in MLflow."""
    _run_recipe("train", cfg, overrides or [], tracking_uri)


@app.command("evaluate")
def evaluate_cmd(
    cfg: Path, overrides: list[str] = typer.Argument(None), tracking_uri: str | None = TrackingUri
) -> None:
    """Run a recipe's evaluation, tracked in MLflow."""
    _run_recipe("evaluate", cfg, overrides or [], tracking_uri)


def _path_key(key_file: Path | None) -> bytes:
    """The key of `--pseudonymise-paths`, derived from the user's de-identification secret."""
    import hashlib
    import hmac

    from loupe.workflows.deid import load_key

    try:
        secret = load_key(key_file)
    except LoupeError as exc:
        _fail(exc)
    return hmac.new(secret, b"loupe-score/v1/path-key", hashlib.sha256).digest()


@app.command("score")
def score_cmd(
    domain: str = typer.Argument(..., help="Domain of the inputs (see `loupe models`), e.g. cxr."),
    input_path: Path = typer.Option(..., "--input", "-i", help="Folder (walked recursively) or manifest CSV/Parquet."),
    model: str = typer.Option(
        ..., "--model", "-m", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, local-dir:PATH, or a tag."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Predictions table (Parquet) to write."),
    resume: bool = typer.Option(False, "--resume", help="Keep what an earlier run scored; score only the rest."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing table and start again."),
    backend: str = typer.Option("local", "--backend", help="local (DataLoader workers) or ray (Ray Data actors)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Inputs per batch (and per committed part)."),
    num_workers: int | None = typer.Option(None, "--num-workers", min=0, help="Reader processes [min(4, cpus)]."),
    explain: bool = typer.Option(False, "--explain", help="Save Grad-CAM maps and pictures beside the table."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    inference_mode: str | None = typer.Option(
        None,
        "--mode",
        help="How the model runs: fp32, bf16, int8, ...+compile, ...+tome8 (token merging), or auto (fastest mode "
        "within the model's accuracy tolerance, measured once on this machine) [the spec's inference.mode, else fp32].",
    ),
    ray_actors: int = typer.Option(2, "--ray-actors", min=1, help="Ray backend: number of scoring actors."),
    ray_gpus: float = typer.Option(0.0, "--ray-gpus", min=0.0, help="Ray backend: GPUs per actor (0 = CPU actors)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray backend: cluster address (auto, ...)."),
    track: bool = typer.Option(True, "--track/--no-track", help="Log the run (table, counts) to MLflow."),
    tracking_uri: str | None = TrackingUri,
    option: list[str] = typer.Option(
        None,
        "--option",
        help="Unit option over the model's, key=value (e.g. slide_mpp=0.25 for slides that state none, tile_mpp=0.5).",
    ),
    allow_root: list[Path] = typer.Option(
        None, "--allow-root", help="A folder besides --input's that inputs (links, manifest paths) may lead into."
    ),
    pseudonymise_paths: bool = typer.Option(
        False,
        "--pseudonymise-paths",
        help="Record keyed pseudonyms instead of file names (key: --key-file / "
        "LOUPE_DEID_KEY, as for `loupe deid`); the dashboard then cannot open the source files.",
    ),
    key_file: Path | None = typer.Option(None, "--key-file", help="Secret key file for --pseudonymise-paths."),
) -> None:
    """Score every input under --input into one predictions row each (and unit rows where the domain has units).
    Exit 1 if any input failed."""
    from loupe.workflows.scoring import RayOptions, ScoreOptions, ScoringInterrupted, score
    from loupe.workflows.scoring.report import progress_bar, render_summary

    if resume and overwrite:
        _fail(ConfigError("--resume and --overwrite contradict each other; pick one"))
    if backend not in ("local", "ray"):
        _fail(ConfigError(f"--backend {backend!r} is unknown; use local or ray"))
    from loupe.core.config import apply_overrides

    try:
        options = apply_overrides({}, list(option or []))
    except LoupeError as exc:
        _fail(exc)
    opts = ScoreOptions(
        domain=domain,
        input=input_path,
        model=model,
        out=out,
        mode="resume" if resume else "overwrite" if overwrite else "new",
        allow_roots=tuple(allow_root or ()),
        path_key=_path_key(key_file) if pseudonymise_paths else None,
        backend=backend,  # type: ignore[arg-type]
        batch_size=batch_size,
        num_workers=num_workers,
        explain=explain,
        device=device,
        ray=RayOptions(actors=ray_actors, gpus_per_actor=ray_gpus, address=ray_address),
        track=track,
        tracking_uri=tracking_uri,
        options=options,
        inference_mode=inference_mode,
    )
    try:
        with progress_bar(err) as (on_start, on_progress):
            summary = score(opts, on_start=on_start, on_progress=on_progress)
    except ScoringInterrupted as exc:
        again = f"loupe score {domain} --input {input_path} --model {model} --out {out} --resume"
        err.print(f"[bold yellow]{exc}[/]\n  {again}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except LoupeError as exc:
        _fail(exc)
    render_summary(summary, console)
    raise typer.Exit(summary.exit_code)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("loupe-demo"), help="Folder for the demo's inputs, model and predictions."),
    domain: list[str] = typer.Option(None, help="Only these domains (default: every registered domain)."),
    fast: bool = typer.Option(False, "--fast", help="Train any demo model for a few steps only (smoke test)."),
    tracking_uri: str | None = TrackingUri,
) -> None:
    """The main job on embedded defaults: sample inputs, a small model, scoring, runs in the local MLflow store."""
    from loupe.workflows.demo import run_demo

    names = discover_domains()
    console.print(f"[bold]Registered domains:[/] {', '.join(names) or '(none)'}")
    try:
        results = run_demo(out, console, domains=domain or None, tracking_uri=tracking_uri, fast=fast)
    except LoupeError as exc:
        _fail(exc)
    if not any(r.summary is not None for r in results):
        _fail(ConfigError("no registered domain brings a demo (DomainInfo.demo_inputs / demo_model)"))


@app.command("dashboard")
def dashboard_cmd(
    data: Path | None = typer.Option(
        None, "--data", help="Folder of predictions tables; the review store and uploads live there [./loupe-demo]."
    ),
    tracking_uri: str | None = TrackingUri,
    port: int = typer.Option(8501, "--port", min=1, max=65535, help="Port to serve on (localhost)."),
    address: str = typer.Option("127.0.0.1", "--address", help="Interface to listen on."),
) -> None:
    """The review dashboard (Streamlit): queue, case view, decisions, agreement and export, experiments, uploads."""
    import importlib.util
    import subprocess

    from loupe.workflows.review.uploads import MAX_UPLOAD_BYTES

    spec = importlib.util.find_spec("loupe.apps")  # located, not imported: apps sits above workflows
    if spec is None or not spec.submodule_search_locations:
        _fail(ConfigError("the dashboard (loupe.apps) is not installed; reinstall with pip install -e ."))
    app_path = Path(next(iter(spec.submodule_search_locations))) / "dashboard.py"
    args = [a for k, v in (("--data", data), ("--tracking-uri", tracking_uri)) if v for a in (k, str(v))]
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.port", str(port), "--server.address",
           address, "--server.headless", "true", "--server.maxUploadSize", str(MAX_UPLOAD_BYTES // 2**20),
           "--browser.gatherUsageStats", "false", "--", *args]  # fmt: skip
    console.print(f"Loupe dashboard on [bold]http://{address}:{port}[/] (Ctrl-C stops it)", highlight=False)
    raise typer.Exit(subprocess.call(cmd))


@weights_app.command("list")
def weights_list() -> None:
    """Registered weight tags and whether each is in the local cache."""
    from loupe.core.models.weights import tag_path

    discover_domains()
    table = Table("tag", "domain", "cached", "path")
    for e in WEIGHTS.entries():
        p = tag_path(e.name)
        table.add_row(e.name, e.domain, "yes" if p.is_file() else "no", str(p))
    console.print(table)


@weights_app.command("fetch")
def weights_fetch(source: str = typer.Argument(..., help="hf-hub:org/repo[/file] or tag:NAME")) -> None:
    """Download weights into the cache (needs a network)."""
    from loupe.core.models.weights import resolve_source

    try:
        if source.startswith("tag:"):
            spec = WEIGHTS.get(source.removeprefix("tag:"))
            upstream = getattr(spec, "source", None)
            if not upstream or upstream.startswith("tag:"):
                raise ConfigError(
                    f"tag {source!r} has no upstream source to fetch; import a file with `loupe weights import`"
                )
            path = resolve_source(upstream)
            _import(path, source.removeprefix("tag:"))
        else:
            path = resolve_source(source)
        console.print(f"[green]cached[/] {source} → {path}")
    except (LoupeError, WeightsNotFoundError) as exc:
        _fail(exc)


def _import(path: Path, tag: str) -> Path:
    import shutil

    from loupe.core.models.weights import find_weights_file, load_state_dict, tag_path

    dst = tag_path(tag)  # refuses a tag that is not a plain name before anything is read or written
    src = find_weights_file(Path(path))
    if dst.exists():
        raise ConfigError(f"{dst} already exists; remove it first if you mean to replace the cached weights of {tag!r}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix == ".safetensors":
        shutil.copy2(src, dst)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in load_state_dict(src).items()}, str(dst))
    return dst


@weights_app.command("import")
def weights_import(path: Path, tag: str = typer.Option(..., help="Tag to file the weights under.")) -> None:
    """Copy a local weights file (converted to safetensors) into the cache under a tag."""
    try:
        dst = _import(path, tag)
    except LoupeError as exc:
        _fail(exc)
    console.print(f"[green]imported[/] {path} → {dst}")


def _mount_optional() -> None:
    """Sub-apps that live in their own modules (``loupe data``, ``loupe score``, ...)."""
    import importlib

    for module, name in (("loupe.workflows.data_cli", "data"), ("loupe.workflows.bench_cli", "bench")):
        try:
            sub = importlib.import_module(module)
        except ImportError:
            continue
        app.add_typer(sub.app, name=name)
    from loupe.workflows.deid_cli import command as deid_command

    app.command("deid")(deid_command)


_mount_optional()


def main() -> None:
    import signal

    # SIGTERM (a scheduler stopping the job) unwinds like Ctrl-C, so open MLflow runs are closed as KILLED
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        app()
    except LoupeError as exc:  # anything that escaped a command is still a clear, non-traceback error
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
