"""A small generic train loop: AMP where available, optional EMA, gradient clipping, step checkpoints with resume.

`Trainer.step(batch)` does one optimiser step through ``loss_fn(model, batch) -> loss``; `Trainer.fit` runs epochs
with a rich progress bar, calls an evaluation hook after each epoch and checkpoints every N steps. Checkpoints
are plain files: ``model.safetensors``, ``optimizer.safetensors``, ``ema.safetensors`` and ``state.json`` (step,
epoch, schedule position, RNG state as tensors) — never pickled objects, so a checkpoint cannot run code.
Resuming from a checkpoint and continuing gives the same weights as an uninterrupted run (same data order:
samplers are re-seeded per epoch with ``set_epoch``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loupe.core.errors import ConfigError
from loupe.core.optim import WarmupCosine

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class LoopConfig:
    """``amp``: ``auto`` (bf16 autocast on CUDA with bf16 support, else off), ``bf16``, ``fp16`` (CUDA) or ``off``.

    ``ema_decay`` 0 switches EMA off; ``checkpoint_every`` 0 checkpoints only at the end of each epoch;
    ``max_seconds`` > 0 stops training (with a warning, after the step in flight) once that much time is spent, so a
    budgeted job (the demo, a smoke run) finishes on a slow or busy machine.
    """

    epochs: int = 1
    grad_clip: float = 0.0
    amp: str = "auto"
    ema_decay: float = 0.0
    checkpoint_every: int = 0
    log_every: int = 10
    progress: bool = True
    max_seconds: float = 0.0

    def problems(self) -> list[str]:
        out = []
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            out.append(f"amp: expected auto, bf16, fp16 or off, got {self.amp!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            out.append(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.epochs < 1:
            out.append(f"epochs must be >= 1, got {self.epochs}")
        if self.checkpoint_every < 0 or self.grad_clip < 0 or self.max_seconds < 0:
            out.append("checkpoint_every, grad_clip and max_seconds must be >= 0 (0 = off)")
        return out


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)


class EMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Temporarily load the averaged weights into ``model`` (for evaluation or saving)."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(backup, strict=False)


def autocast_context(device: torch.device, amp: str):
    """The autocast context for ``amp`` on ``device`` (a no-op context when off or unsupported)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp=fp16 needs a CUDA device; use amp=bf16 or amp=off on CPU")
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    if amp == "auto" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / compiled wrapper."""
    return getattr(model, "module", getattr(model, "_orig_mod", model))


class Trainer:
    """Owns model, optimiser, schedule, EMA and state; ``model`` may be DDP-wrapped (saving unwraps it)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        *,
        schedule: WarmupCosine | None = None,
        cfg: LoopConfig = LoopConfig(),
        device: torch.device | str = "cpu",
        checkpoint_dir: str | Path | None = None,
        is_main: bool = True,
    ):
        problems = cfg.problems()
        if problems:
            raise ConfigError(problems, source="train loop config")
        self.model, self.optimizer, self.loss_fn, self.schedule, self.cfg = model, optimizer, loss_fn, schedule, cfg
        self.device = torch.device(device)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.is_main = is_main
        self.state = TrainState()
        self.ema = EMA(unwrap(model), cfg.ema_decay) if cfg.ema_decay > 0 else None
        use_scaler = cfg.amp == "fp16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler and self.device.type == "cuda")

    # ------------------------------------------------------------------------------------------------ one step
    def step(self, batch: Any) -> float:
        self.model.train()
        if self.schedule is not None:
            self.schedule.apply(self.optimizer, self.state.step)
        with autocast_context(self.device, self.cfg.amp):
            loss = self.loss_fn(self.model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.state.step}; lower the LR or clip gradients")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(unwrap(self.model))
        self.state.step += 1
        self.state.step_in_epoch += 1
        if self.cfg.checkpoint_every and self.state.step % self.cfg.checkpoint_every == 0:
            self.save_checkpoint()
        return float(loss.detach())

    # --------------------------------------------------------------------------------------------------- epochs
    def fit(
        self,
        loader: Iterable,
        *,
        on_epoch_end: Callable[[int, dict[str, float]], dict[str, float] | None] | None = None,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
    ) -> TrainState:
        """Train from the current state to ``cfg.epochs``; ``on_epoch_end(epoch, train_metrics)`` may return metrics."""
        t0 = time.perf_counter()
        while self.state.epoch < self.cfg.epochs and not self._out_of_time(t0):
            epoch = self.state.epoch
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            total, n = 0.0, 0
            title = f"epoch {epoch + 1}/{self.cfg.epochs}"
            with progress_bar(title, len(loader), self.cfg.progress and self.is_main) as bar:
                for i, batch in enumerate(loader):
                    if i < self.state.step_in_epoch:  # resumed mid-epoch: skip what was already trained on
                        continue
                    loss = self.step(batch)
                    total, n = total + loss, n + 1
                    bar(loss)
                    if on_log and self.cfg.log_every and self.state.step % self.cfg.log_every == 0:
                        on_log(self.state.step, {"train_loss_step": loss, "lr": self.optimizer.param_groups[0]["lr"]})
                    if self._out_of_time(t0):
                        log.warning("training stopped after %d steps: its %.0f s budget is spent", self.state.step,
                                    self.cfg.max_seconds)  # fmt: skip
                        break
            metrics = {"train_loss": total / max(n, 1)}
            self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
            if on_epoch_end is not None:
                metrics.update(on_epoch_end(epoch, metrics) or {})
            self.state.history.append({"epoch": epoch, **metrics})
            self.save_checkpoint()
        return self.state

    def _out_of_time(self, t0: float) -> bool:
        return self.cfg.max_seconds > 0 and time.perf_counter() - t0 > self.cfg.max_seconds

    # ---------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: str | Path | None = None) -> Path | None:
        """Write the checkpoint folder (rank 0 only); ``path`` defaults to ``<checkpoint_dir>/last``."""
        if not self.is_main or (path is None and self.checkpoint_dir is None):
            return None
        from safetensors.torch import save_file

        out = Path(path) if path else self.checkpoint_dir / "last"  # type: ignore[operator]
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(_contiguous(unwrap(self.model).state_dict()), str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(self.optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        if self.ema is not None:
            save_file(_contiguous(self.ema.shadow), str(tmp / "ema.safetensors"))
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        meta = {"state": asdict(self.state), "optimizer": opt_meta, "loop": asdict(self.cfg)}
        meta["scaler"] = self.scaler.state_dict() if self.scaler.is_enabled() else None
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
        return out

    def load_checkpoint(self, path: str | Path) -> TrainState:
        """Restore model, optimiser, EMA, RNG and loop state from a folder written by `save_checkpoint`."""
        from safetensors.torch import load_file

        p = Path(path)
        if not (p / "state.json").is_file():
            raise ConfigError(f"{p} is not a training checkpoint (no state.json); point resume at a 'last' folder")
        meta = json.loads((p / "state.json").read_text())
        unwrap(self.model).load_state_dict(load_file(str(p / "model.safetensors")))
        self.optimizer.load_state_dict(_unflatten_optimizer(load_file(str(p / "optimizer.safetensors")), meta))
        if self.ema is not None and (p / "ema.safetensors").is_file():
            self.ema.shadow = load_file(str(p / "ema.safetensors"))
        torch.set_rng_state(load_file(str(p / "rng.safetensors"))["torch_rng"])
        if meta.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(meta["scaler"])
        self.state = TrainState(**meta["state"])
        log.info("resumed from %s at step %d (epoch %d)", p, self.state.step, self.state.epoch)
        return self.state


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clones: safetensors refuses tensors that share storage (tied weights)
    return {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}


@contextlib.contextmanager
def progress_bar(title: str, total: int, enabled: bool):
    """A rich progress bar; yields ``advance(loss)``. Disabled (a no-op) off rank 0 or when asked."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"))
    with Progress(*cols, TimeRemainingColumn(), transient=True) as prog:
        task = prog.add_task(title, total=total, loss="-")
        yield lambda loss: prog.update(task, advance=1, loss=f"{loss:.4f}")


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: v for k, v in g.items() if k != "names"} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in [*tensors.items(), *meta["optimizer"]["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
