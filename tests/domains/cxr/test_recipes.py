from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import loupe.domains.cxr  # noqa: F401 - registers models and recipes
from loupe.core.errors import ConfigError
from loupe.core.models import WeightSpec, build_model, save_model
from loupe.core.recipes import load_recipe
from loupe.core.tracking import MlflowTracker, NullTracker
from loupe.domains.cxr.finetune import balanced_pos_weight, masked_bce
from loupe.domains.cxr.models import cxr_spec

CONFIGS = Path(loupe.domains.cxr.__file__).parent / "configs"
SMALL = ["model.img_size=16", "data.batch_size=16", "train.threads=1", "train.progress=false"]


@pytest.fixture(scope="module")
def toy_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PneumoniaMNIST-shaped file whose positives carry a bright blob: learnable in a few steps."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", 96), ("val", 48), ("test", 48)):
        y = (np.arange(n) % 2).astype(np.uint8)
        x = rng.integers(0, 80, size=(n, 28, 28)).astype(np.uint8)
        x[y == 1, 8:20, 8:20] += 150
        out[f"{split}_images"], out[f"{split}_labels"] = x, y[:, None]
    path = tmp_path_factory.mktemp("pmnist") / "toy.npz"
    np.savez(path, **out)
    return path


def test_masked_bce_ignores_unknown_labels() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 4.0, -2.0]])
    labels = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, float("nan")]])
    known = ~torch.isnan(labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], labels[known])
    torch.testing.assert_close(masked_bce(logits, labels), expected)
    changed = logits.clone()
    changed[~known] = 100.0  # unknown cells may hold anything
    torch.testing.assert_close(masked_bce(changed, labels), expected)


def test_class_balanced_weights() -> None:
    y = np.array([[1, 0], [0, 0], [0, np.nan], [0, 1]], dtype=float)
    torch.testing.assert_close(balanced_pos_weight(y), torch.tensor([3.0, 2.0]))


def test_mae_pretrain_then_finetune_stores_thresholds_in_the_spec(tmp_path: Path, toy_npz: Path) -> None:
    data = [f"data.path={toy_npz}", *SMALL]
    cls, cfg = load_recipe(CONFIGS / "pneumoniamnist_mae.yaml",
                           [*data, f"run.output_dir={tmp_path / 'mae'}", "train.epochs=2", "train.checkpoint_every=3",
                            "model.decoder_depth=1"])  # fmt: skip
    mae = cls(cfg, NullTracker()).run("train")
    assert Path(mae["mae_checkpoint"]).is_file() and (tmp_path / "mae" / "checkpoints" / "last").is_dir()

    tracker = NullTracker()
    overrides = [*data, f"run.output_dir={tmp_path / 'ft'}", "train.epochs=3", "optim.lr=0.003", "eval.n_boot=50"]
    cls, cfg = load_recipe(
        CONFIGS / "pneumoniamnist_finetune.yaml", [*overrides, f"model.init=file:{mae['mae_checkpoint']}"]
    )
    out = cls(cfg, tracker).run("train")
    assert "dropped" in out["weights_load"] and out["best_epoch"] is not None
    spec = WeightSpec.load(tmp_path / "ft" / "model" / "weight_spec.json")
    assert set(spec.thresholds) == {"Pneumonia"} and spec.thresholds == out["thresholds"]
    assert spec.label_names == ("Pneumonia",) and spec.input_size == (1, 16, 16) and spec.domain == "cxr"
    run = tracker.runs[0]
    assert run.params["model.init"].startswith("file:") and run.params["optim.layer_decay"] == 0.75
    assert [s for s, _ in run.metrics["val_macro_auroc"]] == [0, 1, 2]
    assert {"evaluation/test_per_finding.csv", "evaluation/test_subgroups.csv", "model/signature.json"} <= set(
        run.artifacts
    )
    assert out["test_macro_auroc"] > 0.9  # the blob is easy: the pipeline really learns


def test_linear_probe_trains_the_head_only(tmp_path: Path, toy_npz: Path) -> None:
    cls, cfg = load_recipe(CONFIGS / "pneumoniamnist_linear_probe.yaml",
                           [f"data.path={toy_npz}", *SMALL, f"run.output_dir={tmp_path}", "train.epochs=1",
                            "model.init="])  # fmt: skip
    recipe = cls(cfg, NullTracker())
    recipe.setup()
    before = {k: v.clone() for k, v in recipe.model.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in recipe.model.head.state_dict().items()}
    out = recipe.train()
    for k, v in recipe.model.backbone.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    moved = {k: float((v - head[k]).abs().max()) for k, v in recipe.model.head.state_dict().items()}
    assert all(m > 1e-3 for m in moved.values()), moved  # the head did train
    assert out["val_macro_auroc"] > 0.6  # and learnt something from frozen random features (the blob is bright)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.name=cxr_vit_huge"], r"model 'cxr_vit_huge' is not registered"),
        (["optim.layer_decay=0"], r"optim.layer_decay must be in \(0, 1\] \(1 = off\), got 0.0"),
        (["train.amp=fp8"], r"train.amp: expected auto, bf16, fp16 or off, got 'fp8'"),
        (["data.source=dicomdir"], r"data.source: expected pneumoniamnist or manifest, got 'dicomdir'"),
    ],
)
def test_bad_finetune_configs_say_what_to_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe(CONFIGS / "pneumoniamnist_finetune.yaml", overrides)


def test_mae_config_names_the_mae_models() -> None:
    with pytest.raises(
        ConfigError, match=r"'cxr_vit_small_patch16' is not a registered MAE model; use one of: cxr_mae"
    ):
        load_recipe(CONFIGS / "pneumoniamnist_mae.yaml", ["model.name=cxr_vit_small_patch16"])


def test_missing_data_file_names_the_fix(tmp_path: Path) -> None:
    overrides = [f"data.path={tmp_path / 'nope.npz'}", "model.init=", f"run.output_dir={tmp_path}"]
    cls, cfg = load_recipe(CONFIGS / "pneumoniamnist_finetune.yaml", overrides)
    with pytest.raises(ConfigError, match=r"does not exist; point it at pneumoniamnist.npz"):
        cls(cfg, NullTracker()).run("train")


@pytest.mark.realdata
def test_evaluate_recipe_on_the_real_nih_films(tmp_path: Path, shared_data: Path) -> None:
    labels = loupe.domains.cxr.NIH14_LABELS
    spec = cxr_spec("nih-random", "cxr_vit_micro_patch4", labels, img_size=32)
    model, _ = build_model(spec)
    save_model(model, spec.replace(thresholds={"Effusion": 0.5}), tmp_path / "model")
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    overrides = [f"data.path={shared_data / 'cxr/nih14/labels.csv'}", f"model.source=local-dir:{tmp_path / 'model'}",
                 "split=all", "eval.n_boot=100", f"run.output_dir={tmp_path / 'out'}"]  # fmt: skip
    cls, cfg = load_recipe(CONFIGS / "nih14_evaluate.yaml", overrides)
    tracker = MlflowTracker(uri)
    out = cls(cfg, tracker).run("evaluate")
    assert out["n_images"] == 621
    table = pd.read_csv(out["per_finding_csv"])
    assert list(table["label"]) == [*labels, "macro"]
    assert (table["ci_low"] <= table["auroc"]).all() and (table["auroc"] <= table["ci_high"]).all()
    assert table.loc[table["label"] == "Effusion", "threshold"].item() == 0.5
    sub = pd.read_csv(out["subgroups_csv"])
    assert {"age_band", "view"} <= set(sub["attribute"]) and {"AP", "PA"} <= set(sub["group"])
    macro = sub[sub["label"] == "macro"]
    np.testing.assert_allclose(macro["gap"], macro["auroc"] - macro["overall_auroc"])
    logged = {a.path for a in tracker.client.list_artifacts(out["run_id"], "evaluation")}
    assert {
        "evaluation/all_per_finding.csv",
        "evaluation/all_subgroups.csv",
        "evaluation/all_reliability.png",
    } <= logged
    assert tracker.client.get_run(out["run_id"]).data.metrics["all_macro_auroc"] == pytest.approx(
        table.loc[table["label"] == "macro", "auroc"].item()
    )


def _dicom_manifest(tmp_path: Path) -> Path:
    """A manifest of real DICOM (pydicom-data chest and extremity CR, CT, MR), labels alternating, with a split."""
    import shutil

    from pydicom.data import get_testdata_file

    names = ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "CT_small.dcm", "MR_small.dcm")
    rows = []
    for i in range(24):
        src = Path(get_testdata_file(names[i % len(names)], download=False))
        dst = tmp_path / "films" / f"film_{i:02d}.dcm"
        dst.parent.mkdir(exist_ok=True)
        shutil.copyfile(src, dst)
        split = "train" if i < 16 else "val" if i < 20 else "test"
        rows.append({"path": f"films/{dst.name}", "Pneumonia": i % 2, "split": split, "group": f"p{i}"})
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def test_fine_tuning_with_token_merging_is_stored_and_scoring_runs_it(tmp_path: Path, toy_npz: Path) -> None:
    """``model.token_merging=tome2``: the recipe trains and evaluates a merging model (as ToMe fine-tunes), its spec
    stores the merging, `loupe score` runs it so by default, and ``--mode fp32`` runs every token."""
    from PIL import Image

    from loupe.core.models.tome import ToMeConfig, merging_config
    from loupe.workflows.scoring import ScoreOptions, score

    cls, cfg = load_recipe(CONFIGS / "pneumoniamnist_finetune.yaml",
                           [f"data.path={toy_npz}", *SMALL, "model.init=", "model.token_merging=tome2",
                            "train.epochs=3", "eval.n_boot=20", f"run.output_dir={tmp_path / 'ft'}"])  # fmt: skip
    recipe = cls(cfg, NullTracker())
    out = recipe.run("train")
    assert merging_config(recipe.model) == ToMeConfig(r=2) and out["test_macro_auroc"] > 0.8
    folder = tmp_path / "ft" / "model"
    spec = WeightSpec.load(folder / "weight_spec.json")
    assert spec.inference == {"mode": "tome", "tome_r": 2}
    films = tmp_path / "films"
    films.mkdir()
    for i, a in enumerate(np.load(toy_npz)["test_images"][:6]):
        Image.fromarray(a).save(films / f"f{i}.png")
    tables = {}
    for mode in (None, "fp32"):
        dest = tmp_path / f"{mode}.parquet"
        score(ScoreOptions(domain="cxr", input=films, model=f"local-dir:{folder}", out=dest, track=False,
                           num_workers=0, inference_mode=mode))  # fmt: skip
        tables[mode] = pd.read_parquet(dest).sort_values("path").reset_index(drop=True)
    merged, full = tables[None], tables["fp32"]
    assert (merged.status == "ok").all() and (full.status == "ok").all()
    assert set(merged.preprocessing_hash) == {spec.replace(inference={"mode": "fp32+tome2", "tome_r": 2})
                                              .preprocessing_hash()}  # fmt: skip
    assert set(merged.preprocessing_hash) != set(full.preprocessing_hash)
    assert not np.allclose(merged.score_Pneumonia, full.score_Pneumonia, atol=1e-6)  # the default run merged


def test_token_merging_during_fine_tuning_is_checked_and_refused_for_mask_models() -> None:
    from loupe.core.models.tome import fine_tune_with_merging

    with pytest.raises(ConfigError, match="token_merging"):
        load_recipe(CONFIGS / "pneumoniamnist_finetune.yaml", ["model.token_merging=tomeX"])
    spec = cxr_spec("m", "cxr_vit_micro_patch4", ("Pneumonia",), img_size=16)
    model, _ = build_model(spec)
    stored = fine_tune_with_merging(model, spec, "tome2d")  # a schedule is stored one value per block
    assert stored.inference == {"mode": "tome", "tome_r": [4, 3, 2, 2, 1, 0]}


def test_finetune_on_a_dicom_manifest_runs(tmp_path: Path) -> None:
    """Reader metadata of real DICOM holds None values (no view position, no age); batches must still form."""
    manifest = _dicom_manifest(tmp_path)
    overrides = ["data.source=manifest", f"data.path={manifest}", "data.label_set=cxr.pneumonia", "data.batch_size=8",
                 "model.init=", "model.img_size=16", "train.epochs=1", "train.threads=1", "train.progress=false",
                 "eval.n_boot=20", f"run.output_dir={tmp_path / 'out'}"]  # fmt: skip
    cls, cfg = load_recipe(CONFIGS / "pneumoniamnist_finetune.yaml", overrides)
    out = cls(cfg, NullTracker()).run("train")
    assert out["best_epoch"] == 0 and (tmp_path / "out" / "model" / "weights.safetensors").is_file()


def test_finetune_confidence_intervals_resample_patients(tmp_path: Path) -> None:
    """Six copies of each test patient's film: the test CI must come from the patient (cluster) bootstrap."""
    from PIL import Image

    from loupe.core.data import ManifestDataset
    from loupe.core.evaluation import predict
    from loupe.core.metrics import per_label_auroc_ci
    from loupe.core.models import load_model_dir

    rng = np.random.default_rng(0)
    rows = []
    for p in range(30):
        split = "train" if p < 18 else "val" if p < 24 else "test"
        label = p % 2
        img = rng.integers(0, 120, (28, 28)).astype(np.uint8)
        img[8:20, 8:20] += np.uint8(20 * label + rng.integers(0, 80))
        path = tmp_path / f"p{p:02d}.png"
        Image.fromarray(img).save(path)
        rows += [{"path": path.name, "Pneumonia": label, "split": split, "group": f"patient{p}"} for _ in range(6)]
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    overrides = ["data.source=manifest", f"data.path={manifest}", "data.label_set=cxr.pneumonia", "data.batch_size=16",
                 "model.init=", "model.img_size=16", "train.epochs=1", "train.threads=1", "train.progress=false",
                 "eval.n_boot=200", f"run.output_dir={tmp_path / 'out'}"]  # fmt: skip
    cls, cfg = load_recipe(CONFIGS / "pneumoniamnist_finetune.yaml", overrides)
    out = cls(cfg, NullTracker()).run("train")

    model, spec = load_model_dir(tmp_path / "out" / "model")
    test = pd.read_csv(manifest).query("split == 'test'").reset_index(drop=True)
    from loupe.core.transforms import ModelInput

    prep = ModelInput(spec)
    ds = ManifestDataset(test, ["Pneumonia"], root=tmp_path, transform=lambda a, m: prep(a))
    S, Y, _ = predict(model, torch.utils.data.DataLoader(ds, batch_size=64, collate_fn=_collate), torch.device("cpu"))
    by_patient = per_label_auroc_ci(Y, S, ["Pneumonia"], n_boot=200, seed=0, groups=test["group"].to_numpy())
    by_image = per_label_auroc_ci(Y, S, ["Pneumonia"], n_boot=200, seed=0)
    low, high = out["test_macro_auroc_ci"]
    macro = by_patient.set_index("label").loc["macro"]
    assert (low, high) == pytest.approx((macro["ci_low"], macro["ci_high"]), abs=1e-9)
    assert (low, high) != pytest.approx(tuple(by_image.set_index("label").loc["macro", ["ci_low", "ci_high"]]))


def _collate(batch):
    from loupe.core.data.dataset import collate_samples

    return collate_samples(batch)
