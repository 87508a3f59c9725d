"""Two ways to run the same scoring path: a local DataLoader with worker processes, or Ray Data actors.

Both read with `produce_packets`, forward with `Scorer` and build rows with `Assembler`, so the tables they
produce are the same. Neither keeps rows or tensors beyond the batch in flight: memory stays flat over any
number of inputs, and over any number of units in one file.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from loupe.workflows.scoring.engine import Assembler, Scorer
from loupe.workflows.scoring.produce import FileRecord, Packet, Producer, produce_packets
from loupe.workflows.scoring.table import Batch, rows_to_table

log = logging.getLogger(__name__)

SKIPPED = "__skipped__"  # status of a marker row the Ray actors return for inputs already scored
UNITS = "__units__"  # column of the Ray actors' tables: each file's unit rows as Arrow IPC bytes
WORKER = "__worker__"  # column of the Ray actors' tables: which actor process scored the batch


def worker_id() -> str:
    """This process as ``host:pid`` (which process did a batch's work)."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class BatchResult:
    """One scored batch: its rows (skipped inputs have none), how many inputs it covered and how many of them an
    earlier run had already scored."""

    batch: Batch
    n_inputs: int
    n_resumed: int
    worker: str = ""


def score_packet(packet: Packet, scorer: Scorer, assembler: Assembler) -> tuple[list[dict], list[dict]]:
    out = scorer(packet.images) if packet.images is not None else None
    return assembler.add(packet, out)


# ------------------------------------------------------------------------------------------------------ local
#: Bounds on reading one untrusted input in a DataLoader worker: its memory beyond what the worker holds at start
#: (an allocation past it is a MemoryError, so a failed row, never the OOM killer taking the batch) and its time.
READ_MEMORY_MIB = int(os.environ.get("LOUPE_READ_MEMORY_MIB", "1536"))
READ_SECONDS = float(os.environ.get("LOUPE_READ_SECONDS", "300"))


class PacketStream(IterableDataset):
    """Packets of the paths assigned to this DataLoader worker (worker k of W takes files k, k+W, ...).

    ``slots``: shared memory where worker k writes its pid and the index (in ``paths``) of the file it is reading,
    so the main process can name the file a dead worker was on."""

    def __init__(self, paths: list[str], producer: Producer, slots: Any = None):
        # one UTF-8 buffer: no per-string objects whose refcounts would copy pages into every worker
        self.paths = np.array([p.encode("utf-8", "surrogateescape") for p in paths], dtype=np.bytes_)
        self.producer, self.slots = producer, slots

    def __iter__(self) -> Iterator[Packet]:
        info = get_worker_info()
        mine = self.paths if info is None else self.paths[info.id :: info.num_workers]
        paths = [p.decode("utf-8", "surrogateescape") for p in mine]
        if info is None or self.slots is None:
            return produce_packets(self.producer, paths)
        slots, k, n = self.slots, info.id, info.num_workers
        slots[2 * k] = os.getpid()

        def on_file(i: int) -> None:
            slots[2 * k + 1] = k + i * n

        return produce_packets(self.producer, paths, on_file=on_file, time_limit=READ_SECONDS)


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers decode and resize; the model's process keeps the cores for matmuls
    limit_memory(READ_MEMORY_MIB)


def limit_memory(mib: int) -> None:
    """Cap this process's data segment (heap and anonymous mappings: where decoders allocate) at what it uses now
    plus ``mib``; 0 leaves it alone."""
    import resource

    if mib <= 0:
        return
    used = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmData:"):
                used = int(line.split()[1]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = used + mib * 2**20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft == resource.RLIM_INFINITY or limit < soft:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def _as_is(packet: Packet) -> Packet:
    return packet


def run_local(
    paths: list[str],
    producer: Producer,
    scorer: Scorer,
    assembler: Assembler,
    schemas: tuple[pa.Schema, pa.Schema | None],
    num_workers: int,
) -> Iterator[BatchResult]:
    """Score ``paths`` with a DataLoader (``num_workers`` processes); one result per packet.

    A worker that dies (a decoder crash, a signal) does not end the batch: the file it was reading becomes a failed
    row and a new loader goes on with the files no row covers yet (files other workers had half-read start again)."""
    pending = list(paths)
    with _no_sigchld_raise(num_workers):
        while pending:
            slots = multiprocessing.Array("q", [-1] * (2 * max(num_workers, 1)), lock=False) if num_workers else None
            loader = DataLoader(
                PacketStream(pending, producer, slots),
                batch_size=None,
                num_workers=num_workers,
                collate_fn=_as_is,
                worker_init_fn=_init_worker if num_workers else None,
                prefetch_factor=2 if num_workers else None,
                pin_memory=scorer.device.type == "cuda",
            )
            finished: set[str] = set()
            it = iter(loader)
            try:
                for packet in it:
                    files, units = score_packet(packet, scorer, assembler)
                    finished.update(f.path for f in packet.files)
                    yield _result(files, units, packet, schemas)
                return
            except (RuntimeError, ConnectionError, EOFError) as exc:  # a worker dying mid-transfer resets the pipe
                dead = _dead_worker_files(exc, slots, pending, it)
                if not dead:
                    raise
            for i, reason in dead.items():
                rec = producer.recorded(pending[i])
                log.warning("%s: the reader process died while reading it (%s); recorded as failed", rec, reason)
                assembler.discard(rec)
                why = f"failed: the reader died while reading this file ({reason}): a decoder crash or a hostile file"
                packet = Packet(files=[FileRecord(path=rec, status=why)])
                files, units = score_packet(packet, scorer, assembler)
                finished.add(rec)
                yield _result(files, units, packet, schemas)
            pending = [p for p in pending if producer.recorded(p) not in finished]


@contextlib.contextmanager
def _no_sigchld_raise(num_workers: int) -> Iterator[None]:
    """While scoring, a dying reader must surface inside the loader's own ``next`` (where `run_local` turns it into a
    failed row), not from torch's SIGCHLD handler, which raises wherever the main thread happens to be (writing a
    part). Torch then finds dead workers by its own polling. Restored afterwards."""
    import threading

    from torch.utils.data._utils import signal_handling

    if not num_workers or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous, was_set = signal.getsignal(signal.SIGCHLD), signal_handling._SIGCHLD_handler_set
    signal_handling._SIGCHLD_handler_set = True  # torch installs none while this is set
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous if previous is not None else signal.SIG_DFL)
        signal_handling._SIGCHLD_handler_set = was_set


def _dead_worker_files(exc: Exception, slots: Any, pending: list[str], it: Any = None) -> dict[int, str]:
    """{index in ``pending``: why} for the files that DataLoader workers named in ``exc`` were reading when they
    died; empty when ``exc`` is not a worker's death."""
    msg = str(exc)
    workers = list(getattr(it, "_workers", ()))
    for w in workers:
        w.join(timeout=2)  # a dead worker's exit status, when the error came from the broken pipe first
    died = {w.pid for w in workers if w.exitcode not in (None, 0, -signal.SIGTERM)}  # SIGTERM: torch's own shutdown
    if slots is None or ("DataLoader worker" not in msg and not died):
        return {}
    m = re.search(r"pid\(?s?\)? ([\d, ]+)", msg)
    pids = {int(p) for p in m[1].replace(",", " ").split()} if m else died
    sig = re.search(r"killed by signal: ([^.]+)", msg)
    reason = f"killed by signal {sig[1].strip()}" if sig else "it exited unexpectedly"
    codes = {w.pid: w.exitcode for w in getattr(it, "_workers", ()) if getattr(w, "exitcode", None)}
    for pid, code in codes.items():  # the polling path's message has no signal: the worker's exit code does
        if pid in pids and not sig and code < 0:
            reason = f"killed by signal {signal.Signals(-code).name}"
    out = {}
    for k in range(len(slots) // 2):
        pid, i = slots[2 * k], slots[2 * k + 1]
        if pid in pids and 0 <= i < len(pending):
            out[i] = reason
    return out


def _result(files: list[dict], units: list[dict], packet: Packet, schemas) -> BatchResult:
    file_schema, unit_schema = schemas
    unit_table = rows_to_table(units, unit_schema) if units and unit_schema is not None else None
    resumed = sum(1 for f in packet.files if f.skipped)
    return BatchResult(Batch(rows_to_table(files, file_schema), unit_table), packet.n_inputs, resumed, worker_id())


# -------------------------------------------------------------------------------------------------------- ray
class RayScorer:
    """Ray Data callable class (one per actor): loads the model once, then scores batches of paths whole."""

    def __init__(self, model_dir: str, provenance: dict[str, str], domain: str, producer: dict[str, Any],
                 explain: bool, table_dir: str, device: str, schemas: tuple[pa.Schema, pa.Schema | None],
                 inference_mode: str = "fp32"):  # fmt: skip
        from loupe.core.models import load_model_dir
        from loupe.core.models.inference import with_mode
        from loupe.core.registry import DOMAINS, discover_domains

        discover_domains()
        torch.set_num_threads(1)
        model, spec = load_model_dir(model_dir)
        model = with_mode(model, inference_mode, spec, device)  # the mode the driver resolved (auto included)
        info = DOMAINS.get(domain)
        self.producer = Producer(read_units=info.read_units, identity=info.content_identity, spec=spec,
                                 meta_keys=info.meta_keys, **producer)  # fmt: skip
        self.scorer, self.assembler = build_engine(model, spec, provenance, device, explain, Path(table_dir),
                                                   info.unit_table)  # fmt: skip
        self.schemas = schemas

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = batch.column("path").to_pylist()
        file_schema, unit_schema = self.schemas
        rows: list[dict[str, Any]] = []
        for packet in produce_packets(self.producer, paths):
            files, units = score_packet(packet, self.scorer, self.assembler)
            for f in files:
                mine = [u for u in units if u["path"] == f["path"]]
                f[UNITS] = _ipc(rows_to_table(mine, unit_schema)) if mine and unit_schema is not None else None
            rows += files
            rows += [{"path": f.path, "status": SKIPPED} for f in packet.files if f.skipped]
        me = worker_id()
        for r in rows:
            r[WORKER] = me
        return rows_to_table(
            rows, file_schema.append(pa.field(UNITS, pa.binary())).append(pa.field(WORKER, pa.string()))
        )


def build_engine(model, spec, provenance, device, explain: bool, table_dir: Path, keep_units: bool):
    """The `Scorer` and `Assembler` of one scoring process (the driver or a Ray actor)."""
    explainer = None
    if explain:
        from loupe.core.models.inference import full_token_model
        from loupe.workflows.scoring.explain import ViTGradCAM

        explainer = ViTGradCAM(full_token_model(model), spec, device)  # fp32, every token: a map per patch
    scorer = Scorer(model, spec, device, explainer)
    artifacts_dir = table_dir / f"{provenance['out_name']}.artifacts"
    base = {k: v for k, v in provenance.items() if k != "out_name"}
    assembler = Assembler(spec, base, model=scorer.model, table_dir=table_dir, artifacts_dir=artifacts_dir,
                          keep_units=keep_units, explainer=explainer)  # fmt: skip
    return scorer, assembler


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


@dataclass(frozen=True)
class RayOptions:
    actors: int = 2
    gpus_per_actor: float = 0.0
    address: str | None = None


def run_ray(
    paths: list[str],
    ray_kwargs: dict[str, Any],
    batch_size: int,
    schemas: tuple[pa.Schema, pa.Schema | None],
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
        fn_constructor_kwargs={**ray_kwargs, "schemas": schemas, "device": "cuda" if opts.gpus_per_actor else "cpu"},
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=opts.actors,
        num_cpus=1 if opts.gpus_per_actor == 0 else 0,
        num_gpus=opts.gpus_per_actor,
    )
    file_schema, unit_schema = schemas
    for table in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        n = table.num_rows
        skipped = pc.equal(table.column("status"), SKIPPED)
        kept = table.filter(pc.invert(skipped))
        blobs = [b for b in kept.column(UNITS).to_pylist() if b]
        units = pa.concat_tables([_from_ipc(b) for b in blobs]) if blobs and unit_schema is not None else None
        worker = table.column(WORKER)[0].as_py() if n else ""
        files = kept.drop_columns([UNITS, WORKER]).select(file_schema.names).cast(file_schema)
        yield BatchResult(Batch(files, units), n, n - kept.num_rows, worker)
