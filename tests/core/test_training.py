from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from loupe.core.distributed import EpochRandomSampler
from loupe.core.errors import ConfigError
from loupe.core.optim import WarmupCosine
from loupe.core.training import EMA, LoopConfig, Trainer


def _setup(tmp_path: Path, ema: float = 0.0, checkpoint_every: int = 0, epochs: int = 2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    loader = DataLoader(ds, batch_size=8, sampler=EpochRandomSampler(ds, seed=3), generator=torch.Generator())

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    cfg = LoopConfig(epochs=epochs, ema_decay=ema, checkpoint_every=checkpoint_every, progress=False)
    trainer = Trainer(model, opt, loss_fn, schedule=WarmupCosine(1e-2, 8, 2), cfg=cfg, checkpoint_dir=tmp_path)
    return trainer, loader


def test_loss_decreases_on_a_fixed_batch(tmp_path: Path) -> None:
    trainer, loader = _setup(tmp_path)
    trainer.schedule = None
    batch = next(iter(loader))
    first = trainer.step(batch)
    for _ in range(50):
        last = trainer.step(batch)
    assert last < 0.5 * first and trainer.state.step == 51


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_mid_epoch_gives_identical_state(tmp_path: Path, ema: float) -> None:
    straight, loader = _setup(tmp_path / "a", ema=ema)
    straight.fit(loader)

    crashed, loader = _setup(tmp_path / "b", ema=ema, checkpoint_every=6)
    inner = crashed.loss_fn

    def crash_at_step_7(m, batch):
        if crashed.state.step == 6:
            raise RuntimeError("power cut")
        return inner(m, batch)

    crashed.loss_fn = crash_at_step_7
    with pytest.raises(RuntimeError, match="power cut"):
        crashed.fit(loader)  # 4 steps per epoch: the checkpoint at step 6 is mid-way through epoch 2

    resumed, loader = _setup(tmp_path / "c", ema=ema)
    torch.manual_seed(123)  # the checkpoint's RNG state (dropout) must win
    resumed.load_checkpoint(tmp_path / "b" / "last")
    assert (resumed.state.step, resumed.state.epoch, resumed.state.step_in_epoch) == (6, 1, 2)
    resumed.fit(loader)
    assert resumed.state.step == straight.state.step == 8
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    for a, b in zip(
        straight.optimizer.state_dict()["state"].values(), resumed.optimizer.state_dict()["state"].values(), strict=True
    ):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=0)
    if ema:
        for k, v in straight.ema.shadow.items():
            torch.testing.assert_close(v, resumed.ema.shadow[k], rtol=0, atol=0)


def test_checkpoint_is_tensors_and_json_only(tmp_path: Path) -> None:
    trainer, loader = _setup(tmp_path, ema=0.5)
    trainer.fit(loader)
    files = sorted(p.name for p in (tmp_path / "last").iterdir())
    assert files == ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    state = json.loads((tmp_path / "last" / "state.json").read_text())
    assert state["state"]["step"] == 8 and state["state"]["epoch"] == 2


def test_ema_is_an_exponential_average() -> None:
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.75)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], before + 0.25)
    with ema.applied(model):
        torch.testing.assert_close(model.weight, before + 0.25)
    torch.testing.assert_close(model.weight.detach(), before + 1.0)


def test_gradient_clipping_bounds_the_update(tmp_path: Path) -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Trainer(model, opt, lambda m, b: (m(b) * 1000).sum(), cfg=LoopConfig(grad_clip=0.5, progress=False))
    trainer.step(torch.ones(1, 1))
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[-0.5]]))


def test_bad_loop_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="amp: expected auto, bf16, fp16 or off, got 'fp8'"):
        Trainer(torch.nn.Linear(1, 1), None, lambda m, b: 0, cfg=LoopConfig(amp="fp8"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"amp=fp16 needs a CUDA device"):
        t = Trainer(torch.nn.Linear(1, 1), torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1),
                    lambda m, b: m(b).sum(), cfg=LoopConfig(amp="fp16"))  # fmt: skip
        t.step(torch.ones(1, 1))


def test_a_time_budget_stops_training_early() -> None:
    import time

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def slow_loss(m, batch):
        time.sleep(0.05)
        return m(batch).pow(2).mean()

    trainer = Trainer(model, opt, slow_loss, cfg=LoopConfig(epochs=3, progress=False, max_seconds=0.3))
    state = trainer.fit([torch.randn(4, 2) for _ in range(50)])
    assert 3 <= state.step <= 12  # 150 steps asked, about 0.3 s / 0.05 s taken
