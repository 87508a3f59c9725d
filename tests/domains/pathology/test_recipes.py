"""The pathology recipes in-process on small real data: MAE pretraining → fine-tune from it (checkpoint choice,
colour baseline and the paired difference to it, a scorable model folder), the linear probe (the backbone stays
frozen), attention MIL on MoNuSeg tiles as bags, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import loupe.domains.pathology  # noqa: F401 - registers models and recipes
from loupe.core.errors import ConfigError
from loupe.core.models import WeightSpec
from loupe.core.recipes import load_recipe
from loupe.core.tracking import NullTracker

pytestmark = pytest.mark.realdata
CONFIGS = Path(loupe.domains.pathology.__file__).parent / "configs"
SMALL = ["model.img_size=32", "train.threads=1", "train.progress=false", "eval.n_boot=50"]


@pytest.fixture(scope="module")
def tcga(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48-patch LUAD / LUSC manifest (train 16 + 16, test 8 + 8) with absolute paths."""
    root = shared_data / "pathology" / "tcga_luadlusc"  # the manifest's paths are relative to its folder
    frame = pd.read_csv(root / "labels.csv")
    picked = pd.concat([g.head(16 if split == "train" else 8) for (split, _), g in frame.groupby(["split", "label"])])
    picked["path"] = [str(root / p) for p in picked["path"]]
    out = tmp_path_factory.mktemp("tcga") / "labels.csv"
    picked.to_csv(out, index=False)
    return out


def test_mae_then_finetune_reports_the_baseline_and_keeps_a_scorable_model(tcga: Path, tmp_path: Path) -> None:
    cls, cfg = load_recipe(CONFIGS / "tcga_mae.yaml", [f"data.manifests=[{tcga}]", "model.img_size=32",
                           "train.threads=1", "train.progress=false", "train.epochs=2",
                           f"run.output_dir={tmp_path / 'mae'}"])  # fmt: skip
    mae = cls(cfg, NullTracker()).run("train")
    tracker = NullTracker()
    init = f"model.init=file:{mae['mae_checkpoint']}"
    cls, cfg = load_recipe(CONFIGS / "tcga_finetune.yaml", [f"data.manifest={tcga}", *SMALL, "train.epochs=4", init,
                           f"run.output_dir={tmp_path / 'ft'}"])  # fmt: skip
    out = cls(cfg, tracker).run("train")
    assert "dropped" in out["weights_load"]  # the MAE decoder is left behind, the encoder loaded
    assert 0.5 <= out["baseline_colour_macro_auroc"] <= 1.0
    diff = out["test_macro_auroc"] - out["baseline_colour_macro_auroc"]
    run = tracker.runs[0]
    (delta,) = (v for k, v in run.metrics.items() if k == "delta_vs_colour_macro_auroc")
    assert delta[-1][1] == pytest.approx(diff)
    # the kept epoch is the best validation AUROC, ties broken by the lower validation loss
    auc = dict(run.metrics["val_macro_auroc"])
    loss = dict(run.metrics["val_loss"])
    assert out["best_epoch"] == max(auc, key=lambda e: (auc[e], -loss[e]))
    spec = WeightSpec.load(tmp_path / "ft" / "model" / "weight_spec.json")
    assert spec.domain == "pathology" and spec.label_names == ("LUAD", "LUSC") and spec.input_size == (3, 32, 32)
    assert spec.unit_options["tile_mpp"] == 2.0 and spec.aggregation.startswith("topk")


def test_linear_probe_trains_the_head_only(tcga: Path, tmp_path: Path) -> None:
    cls, cfg = load_recipe(CONFIGS / "tcga_probe.yaml", [f"data.manifest={tcga}", *SMALL, "train.epochs=3",
                           "model.init=", f"run.output_dir={tmp_path}"])  # fmt: skip
    recipe = cls(cfg, NullTracker())
    recipe.setup()
    before = {k: v.clone() for k, v in recipe.model.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in recipe.model.head.state_dict().items()}
    out = recipe.train()
    for k, v in recipe.model.backbone.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(float((v - head[k]).abs().max()) > 1e-4 for k, v in recipe.model.head.state_dict().items())
    assert 0.0 <= out["test_macro_auroc"] <= 1.0 and out["n_test"] == 16


def test_attention_mil_on_monuseg_tiles_as_bags(shared_data: Path, tmp_path: Path) -> None:
    frame = pd.read_csv(shared_data / "pathology" / "monuseg" / "tiles.csv")
    two = frame[frame.organ.isin(["breast", "kidney"])]
    manifest = tmp_path / "tiles.csv"
    two.assign(tile=[str(shared_data / "pathology" / "monuseg" / p) for p in two.tile]).to_csv(manifest, index=False)
    tracker = NullTracker()
    cls, cfg = load_recipe(CONFIGS / "monuseg_mil.yaml", [f"data.manifest={manifest}", "data.classes=[breast,kidney]",
                           "model.init=", "model.img_size=32", "model.tile_mpp=2.0", "train.epochs=3",
                           "train.threads=1", "eval.n_boot=50", f"run.output_dir={tmp_path / 'mil'}"])  # fmt: skip
    recipe = cls(cfg, tracker)
    out = recipe.run("train")
    assert out["classes"] == ["breast", "kidney"] and out["n_test"] == (two.split == "test").sum()
    assert {"baseline_meanpool_macro_auroc", "baseline_majority_accuracy"} <= set(out)
    bag = next(iter(recipe.bags.values()))
    att = recipe.model.mil.eval()(bag["x"])["attention"]
    torch.testing.assert_close(att.sum(), torch.tensor(1.0))  # attention is a distribution over the bag's tiles
    assert "mil/attention_heatmaps.png" in tracker.runs[0].artifacts
    spec = WeightSpec.load(Path(out["model_dir"]) / "weight_spec.json")
    assert spec.aggregation == "attention" and "attention" in spec.outputs
    from loupe.core.recipes import seed_everything

    seed_everything(cfg.run.seed)  # the same seed: the same random backbone, so the same feature cache key
    again = cls(cfg, NullTracker())
    again.setup()  # the second run reads every bag's features from the cache
    assert again.cached == len(again.bags) == len(recipe.bags)
    for key, b in again.bags.items():
        np.testing.assert_array_equal(b["x"].numpy(), recipe.bags[key]["x"].numpy())


@pytest.mark.parametrize("name", ["tcga_mae", "tcga_probe", "tcga_finetune", "monuseg_mil", "tcga_mil"])
def test_shipped_configs_load(name: str) -> None:
    load_recipe(CONFIGS / f"{name}.yaml", [])


def test_a_probe_that_trains_the_backbone_is_refused() -> None:
    with pytest.raises(ConfigError, match="train.freeze_backbone must be true for a linear probe"):
        load_recipe(CONFIGS / "tcga_probe.yaml", ["train.freeze_backbone=false"])
