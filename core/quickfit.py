"""A quick binary classifier fit on tensors in memory, for the demo models domains build on the spot.

`fit_binary` trains a single-logit model for a bounded number of steps (and seconds) through the project's
`Trainer`; `with_youden_threshold` stores the validation split's Youden threshold in the model's spec. Real recipes
use `loupe.core.recipes` instead: these two exist so that each domain's ``demo_model`` is a few lines of data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from loupe.core.models.spec import WeightSpec

Split = tuple[torch.Tensor, torch.Tensor]  # model inputs [N, C, H, W] normalised, labels [N] in {0, 1}


def fit_binary(model: torch.nn.Module, train: Split, steps: int, run: Any, budget_s: float, *, lr: float = 2e-3,
               batch_size: int = 96, augment: Any = None) -> int:  # fmt: skip
    """``steps`` AdamW steps of BCE on the single logit (batches drawn with replacement, warm-up + cosine) through
    the project's `Trainer`, stopping early after ``budget_s`` seconds; ``augment(x)`` transforms each batch's
    inputs. Logs ``train_loss`` to ``run`` (a tracked run or None); returns the steps run."""
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    from loupe.core.optim import WarmupCosine
    from loupe.core.training import LoopConfig, Trainer

    x, y = train
    ds = TensorDataset(x, y)
    sampler = RandomSampler(ds, replacement=True, num_samples=steps * batch_size,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs = augment(batch[0]) if augment is not None else batch[0]
        return torch.nn.functional.binary_cross_entropy_with_logits(m(inputs)[:, 0], batch[1])

    cfg = LoopConfig(epochs=1, amp="off", log_every=20, progress=False, max_seconds=budget_s)
    trainer = Trainer(model, opt, loss_fn, schedule=WarmupCosine(lr, steps, steps // 10), cfg=cfg)

    def on_log(step: int, m: dict[str, float]) -> None:
        if run is not None:
            run.log_metrics({"train_loss": m["train_loss_step"]}, step=step)

    threads = torch.get_num_threads()
    # matrices this small gain nothing from intra-op threads, and on a busy machine spinning threads cost 5x
    torch.set_num_threads(1)
    try:
        trainer.fit(DataLoader(ds, batch_size=batch_size, sampler=sampler), on_log=on_log)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return trainer.state.step


def with_youden_threshold(model: torch.nn.Module, spec: WeightSpec, val: Split, run: Any) -> WeightSpec:
    """``spec`` with the validation split's Youden threshold stored for its one label; logs validation AUROC."""
    from loupe.core.metrics import auroc, youden_threshold

    with torch.inference_mode():
        s = torch.sigmoid(model(val[0])[:, 0]).numpy()
    y = val[1].numpy()
    auc, thr = auroc(y, s), youden_threshold(y, s)
    if run is not None:
        run.log_metrics({"val_auroc": auc, "val_threshold": thr})
    label = spec.label_names[0]
    return spec.replace(thresholds={label: float(thr)}) if np.isfinite(thr) else spec


def train_demo_model(spec: WeightSpec, images: list[Any], labels: np.ndarray, run: Any, *, steps: int,
                     budget_s: float, batch_size: int = 64, augment: Any = None, val_share: float = 0.2):  # fmt: skip
    """A demo model from ``spec`` trained on ``images`` (arrays as read) and 1/0 ``labels``: prepared exactly as
    the spec says, a seeded ``val_share`` held out, `fit_binary` on the rest, the validation Youden threshold stored
    in the spec. Returns ``(model, spec)``; logs the steps, seconds and sizes to ``run`` (a tracked run or None)."""
    import time

    from loupe.core.models.classifier import build_model
    from loupe.core.transforms import ModelInput

    prep = ModelInput(spec)
    x = torch.stack([prep(a) for a in images])  # [N, C, H, W]
    y = torch.as_tensor(labels, dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    k = max(1, int(len(x) * val_share))
    val, train = order[:k], order[k:]
    model, _ = build_model(spec)
    t0 = time.perf_counter()
    steps_run = fit_binary(model, (x[train], y[train]), steps, run, budget_s, batch_size=batch_size, augment=augment)
    spec = with_youden_threshold(model, spec, (x[val], y[val]), run)
    if run is not None:
        run.log_metrics({"train_seconds": time.perf_counter() - t0, "train_examples": float(len(train))})
        run.log_params({"demo_data": spec.description, "steps": steps_run, "architecture": spec.architecture})
    return model.eval(), spec
