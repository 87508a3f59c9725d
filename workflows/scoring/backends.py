"""Two ways to run the same scoring path: a local DataLoader with worker processes, or Ray Data actors.

Both yield batches of rows built by `BatchScorer`, so the tables they produce are the same. Neither keeps rows or
tensors beyond the batch in flight: memory stays flat over any number of inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset

from loupe.core.models import WeightSpec
from loupe.core.registry import DOMAINS
from loupe.workflows.scoring.engine import BatchScorer, collate_items, load_item
from loupe.workflows.scoring.table import rows_to_table

log = logging.getLogger(__name__)

SKIPPED = "__skipped__"  # status of a marker row the Ray actors return for inputs already scored


@dataclass(frozen=True)
class BatchResult:
    """One scored batch: its rows (skipped inputs have none) and how many inputs it covered."""

    rows: pa.Table | list[dict[str, Any]]
    n_inputs: int


# ------------------------------------------------------------------------------------------------------ local
class InputDataset(Dataset):
    """Paths → `Item`s; runs in DataLoader workers, so reading and preprocessing stay off the model's process."""

    def __init__(self, paths: list[str], domain: str, spec: WeightSpec, done: set[str]):
        # one UTF-8 buffer: no per-string objects whose refcounts would copy pages into every worker
        self.paths = np.array([p.encode("utf-8", "surrogateescape") for p in paths], dtype=np.bytes_)
        self.loader = DOMAINS.get(domain).load_input
        self.spec = spec
        self.done = frozenset(done)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        path = self.paths[i].decode("utf-8", "surrogateescape")
        return load_item(path, self.loader, self.spec, self.done)


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers decode and resize; the model's process keeps the cores for matmuls


def run_local(
    paths: list[str],
    scorer: BatchScorer,
    domain: str,
    done: set[str],
    batch_size: int,
    num_workers: int,
) -> Iterator[BatchResult]:
    """Score ``paths`` in order with a DataLoader (``num_workers`` processes); one result per batch."""
    ds = InputDataset(paths, domain, scorer.spec, done)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_items,
        worker_init_fn=_init_worker if num_workers else None,
        prefetch_factor=2 if num_workers else None,
        pin_memory=scorer.device.type == "cuda",
    )
    for items, images in loader:
        yield BatchResult(scorer(items, images), len(items))


# -------------------------------------------------------------------------------------------------------- ray
class RayScorer:
    """Ray Data callable class (one per actor): loads the model once, then scores batches of paths."""

    def __init__(
        self,
        model_dir: str,
        provenance: dict[str, str],
        domain: str,
        done: set[str],
        explain_dir: str | None,
        device: str,
        schema: pa.Schema,
    ):
        from loupe.core.models import load_model_dir
        from loupe.core.registry import discover_domains
        from loupe.workflows.scoring.model import Provenance

        discover_domains()
        torch.set_num_threads(1)
        model, spec = load_model_dir(model_dir)
        explainer = None
        if explain_dir:
            from loupe.workflows.scoring.explain import ViTGradCAM

            explainer = ViTGradCAM(model, spec, explain_dir, device)
        self.scorer = BatchScorer(model, spec, Provenance(**provenance), device, explainer)
        self.loader = DOMAINS.get(domain).load_input
        self.done = frozenset(done)
        self.schema = schema

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = [load_item(p, self.loader, self.scorer.spec, self.done) for p in batch.column("path").to_pylist()]
        skipped = [it for it in items if it.skipped]
        rows = self.scorer(*collate_items(items))
        rows += [{"path": it.path, "status": SKIPPED} for it in skipped]
        return rows_to_table(rows, self.schema)


@dataclass(frozen=True)
class RayOptions:
    actors: int = 2
    gpus_per_actor: float = 0.0
    address: str | None = None


def run_ray(
    paths: list[str],
    scorer: BatchScorer,
    model_dir: Path,
    domain: str,
    done: set[str],
    batch_size: int,
    schema: pa.Schema,
    explain_dir: Path | None,
    opts: RayOptions,
) -> Iterator[BatchResult]:
    """Score ``paths`` on Ray Data: ``map_batches`` over an actor pool, results streamed back in input order."""
    import ray

    if not ray.is_initialized():
        init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        ray.init(address=opts.address, **init) if opts.address else ray.init(num_cpus=max(opts.actors, 1), **init)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, -(-len(paths) // batch_size)))
    out = ds.map_batches(
        RayScorer,
        fn_constructor_kwargs={
            "model_dir": str(model_dir),
            "provenance": {k: v for k, v in scorer.base.items()},
            "domain": domain,
            "done": done,
            "explain_dir": str(explain_dir) if explain_dir else None,
            "device": "cuda" if opts.gpus_per_actor > 0 else "cpu",
            "schema": schema,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=opts.actors,
        num_cpus=1 if opts.gpus_per_actor == 0 else 0,
        num_gpus=opts.gpus_per_actor,
    )
    for table in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        n = table.num_rows
        keep = pc.not_equal(table.column("status"), SKIPPED)
        yield BatchResult(table.filter(keep), n)
