"""torchrun / DDP helpers: set up from the environment, shard data, keep tracking and saving on rank 0.

Under ``torchrun --nproc_per_node N`` the environment carries ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address; `init_from_env` opens the process group (gloo on CPU, nccl on CUDA) and pins the local GPU.
Without those variables everything degrades to a single process, so recipes call these helpers unconditionally.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from loupe.core.errors import LoupeError

log = logging.getLogger(__name__)


class DistributedError(LoupeError):
    """A multi-process (DDP) run broke an invariant, e.g. its replicas no longer hold the same weights."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: torch.device | None = None) -> DistInfo:
    """Join the process group that torchrun set up (no-op for a single process); idempotent."""
    import torch.distributed as dist

    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    on_cuda = (device is None or device.type == "cuda") and torch.cuda.is_available()
    backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        log.info("joined process group: rank %d of %d (%s)", rank, world, backend)
    return DistInfo(rank, world, local, backend)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else the CPU; otherwise the named device (``cpu``, ``cuda``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_for(info: DistInfo, requested: torch.device) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` under DDP on GPUs, else ``requested``."""
    if info.enabled and requested.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return requested


def sampler_for(dataset: Dataset, info: DistInfo, *, shuffle: bool, seed: int = 0, drop_last: bool = False) -> Sampler:
    """A `DistributedSampler` (each rank its shard; call ``set_epoch``) or a seeded single-process sampler."""
    if info.enabled:
        return DistributedSampler(
            dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    return EpochRandomSampler(dataset, seed) if shuffle else SequentialSampler(dataset)


def make_loader(
    ds: Dataset, info: DistInfo, *, batch_size: int, num_workers: int = 0, train: bool, seed: int = 0
) -> DataLoader:
    """Batches of `loupe.core.data.collate_samples` (reader metadata stays a list beside the tensors) in an order
    fixed by ``seed`` and the epoch, sharded across DDP ranks; the loader's own generator leaves torch's RNG alone."""
    from loupe.core.data.dataset import collate_samples

    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler_for(ds, info, shuffle=train, seed=seed, drop_last=train),
        drop_last=train and len(ds) >= batch_size * info.world_size,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_samples,
    )


class EpochRandomSampler(RandomSampler):
    """A random order that depends only on ``seed`` and the epoch (``set_epoch``), so resumed runs see the same data."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        super().__init__(dataset)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` under DDP, else ``model`` itself."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate a tensor's first dimension over ranks (sizes may differ); the tensor itself without DDP."""
    if not info.enabled:
        return t
    import torch.distributed as dist

    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(info.world_size)]
    dist.all_gather(sizes, size)
    biggest = int(max(s.item() for s in sizes))
    padded = torch.zeros((biggest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in range(info.world_size)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes, strict=True)])


def replica_report(model: nn.Module, steps: int, samples: int, info: DistInfo) -> dict[str, float]:
    """After training under DDP (a collective: every rank calls it): the world size, each rank's optimiser steps
    and samples, and whether all replicas hold bitwise the same weights. Diverged replicas raise
    `DistributedError` (a model from them would be one rank's guess); without DDP, ``{}``."""
    if not info.enabled:
        return {}
    import hashlib

    import torch.distributed as dist

    h = hashlib.sha256()
    for p in getattr(model, "module", model).parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    mine = {"rank": info.rank, "steps": int(steps), "samples": int(samples), "weights": h.hexdigest()}
    everyone: list[dict] = [{} for _ in range(info.world_size)]
    dist.all_gather_object(everyone, mine)
    out = {"ddp_world_size": float(info.world_size)}
    for r in everyone:
        out[f"ddp_steps_rank{r['rank']}"], out[f"ddp_samples_rank{r['rank']}"] = float(r["steps"]), float(r["samples"])
    distinct = {r["weights"] for r in everyone}
    out["ddp_replicas_in_sync"] = float(len(distinct) == 1)
    if len(distinct) > 1:
        raise DistributedError(
            f"DDP replicas diverged: {len(distinct)} different weight sets over {info.world_size} ranks; check that "
            f"every rank runs the same number of steps (drop_last, equal shards) and the same model"
        )
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (no-op for a single process)."""
    import torch.distributed as dist

    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
