"""Few-shot adaptation of a pathology CLIP from k labelled tiles per class (``pathology.fewshot``).

Every method starts from the zero-shot model (`loupe.domains.pathology.clip.zero_shot_model`: image tower + cosine
head of text embeddings) and ends as a plain Loupe model folder that ``loupe score pathology`` runs:

- ``linear_probe``: the cosine head alone, trained on the frozen, normalised image embeddings from the zero-shot
  weights (optionally pulled back towards them by ``anchor``, as in CLAP-style constrained probes).
- ``lora``: low-rank adapters (`peft`) on the image tower's attention and MLP layers, the text-initialised head
  frozen; merged into the weights before saving.
- ``svd``: CLIP-SVD singular-value tuning - each chosen weight matrix W = U diag(s) V^T with U, V frozen and only
  s (optionally the biases) trained; multiplied back into plain weights before saving.

`kshot_sample` draws the k shots per class (seeded, spread over slides / patients when the manifest has groups).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from loupe.core.errors import ConfigError
from loupe.core.models.classifier import CosineClassifier
from loupe.core.recipes import register_recipe
from loupe.domains.pathology.clip import ZeroShotConfig, ZeroShotRecipe, headline_metrics

log = logging.getLogger(__name__)
METHODS = ("linear_probe", "lora", "svd")
#: LoRA targets by visual-tower kind: open_clip's own ViT (nn.MultiheadAttention ``attn``, MLP ``c_fc``/``c_proj``)
#: and timm trunks (BiomedCLIP: ``qkv``/``proj`` attention, ``fc1``/``fc2`` MLP).
LORA_TARGETS = {"vit": ("attn", "c_fc", "c_proj"), "timm": ("qkv", "proj", "fc1", "fc2")}


# ----------------------------------------------------------------------------------------------------- k shots
def kshot_sample(frame: pd.DataFrame, classes: tuple[str, ...], k: int, seed: int = 0, *, split: str = "train",
                 source: str = "the manifest") -> pd.DataFrame:  # fmt: skip
    """``k`` rows of each class from ``split`` (``frame`` has one 1/0 column per class, as `load_patch_manifest`
    gives), drawn with ``seed``; with a ``group`` column the shots are spread over as many groups (slides,
    patients) as the class has, one per group in turn. Raises `ConfigError` when a class has fewer than k rows."""
    if k < 1:
        raise ConfigError(f"shots must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    rows = frame[frame["split"] == split]
    picked: list[Any] = []
    for c in classes:
        sub = rows[rows[c] == 1]
        if len(sub) < k:
            raise ConfigError(f"class {c!r} has {len(sub)} {split} rows in {source}, fewer than the {k} shots asked; "
                              f"lower fewshot.shots to {len(sub)} or add {c} rows")  # fmt: skip
        if "group" in sub.columns and sub["group"].notna().all():
            pools = {g: list(rng.permutation(idx)) for g, idx in sorted(sub.groupby("group").groups.items(),
                                                                          key=lambda kv: str(kv[0]))}  # fmt: skip
            order = [list(pools)[i] for i in rng.permutation(len(pools))]
            chosen: list[Any] = []
            while len(chosen) < k:  # one shot per group in turn, so k shots span min(k, groups) groups
                for g in order:
                    if pools[g] and len(chosen) < k:
                        chosen.append(pools[g].pop())
        else:
            chosen = list(rng.choice(sub.index.to_numpy(), size=k, replace=False))
        picked += chosen
    return frame.loc[sorted(picked)]


# ------------------------------------------------------------------------------------------------------- training
def fit(model: nn.Module, loader, device: torch.device, *, epochs: int, lr: float, weight_decay: float = 0.0,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None, amp: str = "off") -> list[float]:  # fmt: skip
    """Cross-entropy training of ``model``'s trainable parameters (AdamW); the mean loss of each epoch."""
    from loupe.core.training import autocast_context

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters; the few-shot method froze everything")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = []
    model.train()
    for epoch in range(epochs):
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        total, n = 0.0, 0
        for batch in loader:
            x = batch["image"].to(device)
            x = augment(x) if augment is not None else x
            y = batch["label"].to(device).argmax(-1)
            with autocast_context(device, amp):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * len(y), n + len(y)
        losses.append(total / max(n, 1))
    model.eval()
    return losses


@torch.no_grad()
def embed_loader(model: CosineClassifier, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image embeddings ``[N, D]`` and class indices ``[N]`` of every sample of ``loader``."""
    model.eval()
    embs, ys = [], []
    for batch in loader:
        embs.append(F.normalize(model.embed(batch["image"].to(device)).float(), dim=-1))
        ys.append(batch["label"].argmax(-1).to(device))
    return torch.cat(embs), torch.cat(ys)


def fit_linear_probe(model: CosineClassifier, loader, device: torch.device, *, steps: int = 300, lr: float = 1e-2,
                     weight_decay: float = 0.0, anchor: float = 0.0) -> list[float]:  # fmt: skip
    """Train the cosine head alone (full batch, AdamW) on the frozen embeddings, from its zero-shot weights W0:
    loss = CE(E W^T, y) + ``anchor`` * ||W - W0||^2. Writes the head in place; the loss every step."""
    E, y = embed_loader(model, loader, device)  # [N, D], [N]
    w0 = model.head.weight.detach().float().clone()
    w = nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(E @ w.t(), y) + anchor * (w - w0).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        model.head.weight.copy_(w.to(model.head.weight.dtype))
    return losses


# ------------------------------------------------------------------------------------------------------------ LoRA
def add_lora(model: CosineClassifier, *, rank: int = 4, alpha: float = 8.0, dropout: float = 0.0,
             targets: tuple[str, ...] = ()) -> nn.Module:  # fmt: skip
    """``model`` wrapped by `peft` with LoRA adapters on the image tower (``targets``: module names, default
    `LORA_TARGETS` for the tower's kind); only the adapters train. B starts at zero, so outputs are unchanged."""
    from peft import LoraConfig, get_peft_model

    kind = getattr(model.backbone, "_kind", "timm")
    names = tuple(targets) or LORA_TARGETS[kind]
    try:
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                target_modules=list(names)))  # fmt: skip
    except ValueError as exc:
        raise ConfigError(f"LoRA targets {list(names)} do not fit this image tower ({exc}); name its Linear or "
                          f"attention modules, e.g. {list(LORA_TARGETS[kind])}") from None  # fmt: skip


def merge_lora(peft_model: nn.Module) -> CosineClassifier:
    """The adapters multiplied into the weights: the plain model, with the same outputs."""
    model = peft_model.merge_and_unload()
    model.requires_grad_(True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------- CLIP-SVD
class SingularValues(nn.Module):
    """A parametrisation W = U diag(s) V^T of one weight matrix, from its SVD: U [out, r] and V^T [r, in] frozen
    buffers, s [r] the trainable singular values."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        self.register_buffer("u", u.to(weight.dtype))
        self.register_buffer("vh", vh.to(weight.dtype))
        self.s = nn.Parameter(s.to(weight.dtype))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return (self.u * self.s) @ self.vh  # [out, in]; the original only stands in for the frozen weight


def add_svd(model: CosineClassifier, *, targets: tuple[str, ...] = (), train_bias: bool = False) -> list[str]:
    """Freeze ``model`` and re-parametrise every 2-D weight of its transformer blocks (or those whose name ends with
    one of ``targets``) by its singular values, which alone train (with the matching biases if ``train_bias``).
    At init the model computes what it computed before. Returns the re-parametrised names."""
    model.requires_grad_(False)
    blocks = model.backbone.blocks()
    chosen = [(mod, pname, f"{mname}.{pname}".lstrip(".")) for mname, mod in blocks.named_modules()
              for pname, p in mod.named_parameters(recurse=False)
              if p.ndim == 2 and (not targets or f"{mname}.{pname}".endswith(tuple(targets)))]  # fmt: skip
    if not chosen:
        raise ConfigError(f"no 2-D weights in the image tower's blocks match the SVD targets {list(targets)}")
    for mod, pname, _ in chosen:
        parametrize.register_parametrization(mod, pname, SingularValues(getattr(mod, pname)))
        bias = getattr(mod, pname.replace("weight", "bias"), None)
        if train_bias and isinstance(bias, nn.Parameter):
            bias.requires_grad_(True)
    return [name for _, _, name in chosen]


def merge_svd(model: nn.Module) -> int:
    """Replace each singular-value parametrisation by the plain weight it computes; the number merged."""
    merged = 0
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod):
            for pname in list(mod.parametrizations):
                parametrize.remove_parametrizations(mod, pname, leave_parametrized=True)
                merged += 1
    model.requires_grad_(True)
    return merged


# --------------------------------------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class FewShotTrain:
    """``method``: linear_probe | lora | svd; ``shots``: labelled tiles per class (from the train split);
    ``epochs``: passes over the shots (the linear probe: full-batch steps); ``targets``: LoRA module names or SVD
    weight-name suffixes ('' = defaults); ``anchor``: the linear probe's pull towards the zero-shot head."""

    method: str = "linear_probe"
    shots: int = 16
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.0
    augment: bool = True
    anchor: float = 0.0
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    targets: tuple[str, ...] = ()
    svd_bias: bool = False
    amp: str = "auto"
    threads: int = 0

    def problems(self) -> list[str]:
        out = [] if self.method in METHODS else [f"method: expected one of {list(METHODS)}, got {self.method!r}"]
        if self.shots < 1 or self.epochs < 1 or self.lora_rank < 1 or self.lr <= 0:
            out.append("shots, epochs and lora_rank must be >= 1 and lr > 0")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            out.append(f"amp: expected auto, bf16, fp16 or off, got {self.amp!r}")
        return out


@dataclass(frozen=True)
class FewShotConfig(ZeroShotConfig):
    fewshot: FewShotTrain = field(default_factory=FewShotTrain)


@register_recipe("pathology.fewshot", domain="pathology")
class FewShotRecipe(ZeroShotRecipe):
    """Few-shot patch classification with a pathology CLIP (linear probe, LoRA or CLIP-SVD on k shots per class),
    scored on the test split against the zero-shot model in the same run."""

    config_cls = FewShotConfig
    default_name = "pathology_fewshot"

    def setup(self) -> None:
        if self.cfg.fewshot.threads:
            torch.set_num_threads(self.cfg.fewshot.threads)
        super().setup()
        f = self.cfg.fewshot
        self.shots = kshot_sample(self.frame, self.classes, f.shots, self.cfg.run.seed, source=self.cfg.data.manifest)
        self.train_frame = pd.concat([self.shots, self.frame[self.frame["split"] != "train"]])

    def _adapt(self) -> tuple[CosineClassifier, dict[str, Any]]:
        from loupe.domains.pathology.data import HEAugment

        f, device = self.cfg.fewshot, self.device
        augment = HEAugment(self.spec.mean, self.spec.std) if f.augment else None
        train = dict(epochs=f.epochs, lr=f.lr, weight_decay=f.weight_decay, augment=augment, amp=f.amp)
        model = self.model
        if f.method == "linear_probe":
            losses = fit_linear_probe(model, self.loader("train", self.train_frame), device, steps=f.epochs, lr=f.lr,
                                      weight_decay=f.weight_decay, anchor=f.anchor)  # fmt: skip
            return model, {"trainable_params": model.head.weight.numel(), "losses": losses}
        loader = self.loader("train", self.train_frame, train=True)
        if f.method == "lora":
            wrapped = add_lora(model, rank=f.lora_rank, alpha=f.lora_alpha, dropout=f.lora_dropout, targets=f.targets)
            n = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
            losses = fit(wrapped, loader, device, **train)
            return merge_lora(wrapped), {"trainable_params": n, "losses": losses}
        names = add_svd(model, targets=f.targets, train_bias=f.svd_bias)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        losses = fit(model, loader, device, **train)
        merge_svd(model)
        return model, {"trainable_params": n, "losses": losses, "svd_weights": len(names)}

    def train(self) -> dict[str, Any]:
        f = self.cfg.fewshot
        t0 = time.time()
        with self.tracked_run() as run:
            run.set_tags({"init": self.spec.source or "", "method": f.method, "shots": str(f.shots)})
            self.shots[["path", self.cfg.data.label_column]].to_csv(self.out / "shots.csv", index=False)
            run.log_artifact(self.out / "shots.csv", "fewshot")
            run.log_dict({"prompts": self.prompts}, "fewshot/prompts.json")
            baseline = self.test_metrics(run, self.model, prefix="zeroshot_test")
            model, info = self._adapt()
            metrics = self.test_metrics(run, model, prefix="test")
            losses = info.pop("losses")
            for step, loss in enumerate(losses):
                run.log_metrics({"train_loss": loss}, step=step)
            model_dir = self.save(run, model)
            seconds = round(time.time() - t0, 1)
            run.log_metrics({"wall_seconds": seconds, "trainable_params": float(info["trainable_params"])})
            return {"run_id": run.run_id, "method": f.method, "shots": f.shots, **headline_metrics(metrics, "test"),
                    **headline_metrics(baseline, "zeroshot_test"), "first_loss": losses[0], "final_loss": losses[-1],
                    **info, "model_dir": str(model_dir), "train_seconds": seconds}  # fmt: skip

    def evaluate(self) -> dict[str, Any]:
        raise ConfigError("pathology.fewshot trains; run it with `loupe train` (its zero-shot baseline is in the run)")
