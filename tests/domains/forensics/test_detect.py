"""Forensic detectors: manifests and seeded splits, the faces layout, threshold / EER hand cases, the hypersphere
losses, which parameters each method trains, the ``forensics.detect`` recipe per method on a tiny learnable set
(learned, frozen parts untouched, the saved - LoRA merged - model reproduces the logged scores, MLflow), leave-one-
generator-out, MAE pretraining feeding a probe, config refusals and the shipped configs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import loupe.domains.forensics.detect as detect
from loupe.core.errors import ConfigError
from loupe.core.io import read_any
from loupe.core.models import load_model_dir
from loupe.core.models.spec import CLIP_MEAN, IMAGENET_MEAN
from loupe.core.recipes import load_recipe
from loupe.core.registry import MODELS
from loupe.core.tracking import MlflowTracker, NullTracker
from loupe.core.transforms import ModelInput
from loupe.domains.forensics.data import ForensicsData, faces_csv, load_forensics_manifest
from loupe.domains.forensics.models import forensics_spec

CONFIGS = Path(detect.__file__).parent / "configs"
SIDE, IMG = 40, 32
#: the learning rate of each method on the tiny set (4 epochs)
METHOD_LR = {"linear_probe": 1e-2, "ln_tune": 1e-2, "lora": 3e-3, "finetune": 1e-3}


# ------------------------------------------------------------------------------------------------ the tiny set
def smooth_image(rng: np.random.Generator) -> np.ndarray:
    """A smooth colour field (bilinear upsampling of a 5x5 random grid) with mild noise: a "photograph"."""
    small = Image.fromarray(rng.integers(40, 215, (5, 5, 3), dtype=np.uint8))
    base = np.asarray(small.resize((SIDE, SIDE), Image.BILINEAR), dtype=np.float32)
    return np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)


def add_trace(a: np.ndarray, kind: str, amplitude: float = 30.0) -> np.ndarray:
    """A generator's periodic trace: ``checker`` (period-2 checkerboard) or ``stripes`` (period-2 columns)."""
    yy, xx = np.mgrid[: a.shape[0], : a.shape[1]]
    pattern = (yy + xx) % 2 if kind == "checker" else xx % 2
    return np.clip(a.astype(np.float32) + amplitude * (2 * pattern[..., None] - 1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """60 real images and 30 fakes of each of two generators (40 px PNG); ``manifest`` has a generator column,
    ``plain`` has none; ``init``: a seeded random 32 px micro ViT (Loupe layout) every run starts from."""
    root = tmp_path_factory.mktemp("fakes")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for kind, n in (("real", 60), ("checker", 30), ("stripes", 30)):
        for i in range(n):
            a = smooth_image(rng) if kind == "real" else add_trace(smooth_image(rng), kind)
            Image.fromarray(a).save(root / "images" / f"{kind}_{i:03d}.png")
            rows.append({"path": f"images/{kind}_{i:03d}.png", "label": "real" if kind == "real" else "fake",
                         "group": f"{kind}{i}", "generator": "" if kind == "real" else kind})  # fmt: skip
    frame = pd.DataFrame(rows)
    frame.to_csv(root / "manifest.csv", index=False)
    frame.drop(columns="generator").to_csv(root / "plain.csv", index=False)
    torch.manual_seed(0)
    init = MODELS.create("forensics_vit_micro_patch8", num_outputs=1, img_size=IMG)
    save_file({k: v.contiguous() for k, v in init.state_dict().items()}, str(root / "init.safetensors"))
    return {"root": root, "manifest": root / "manifest.csv", "plain": root / "plain.csv",
            "init": root / "init.safetensors"}  # fmt: skip


def _overrides(syn: dict[str, Path], out: Path, method: str, manifest: str = "plain", **extra: object) -> list[str]:
    base = {"train.method": method, "data.manifest": syn[manifest], "data.layout": "manifest", "data.batch_size": 16,
            "model.img_size": IMG, "model.drop_path": 0.0, "model.init": f"file:{syn['init']}",
            "model.init_layout": "loupe", "optim.lr": METHOD_LR[method], "optim.warmup_epochs": 0,
            "train.epochs": 4, "train.threads": 1, "train.progress": False, "train.augment.random_crop": False,
            "train.augment.jpeg_p": 0.0, "train.augment.blur_p": 0.0, "train.augment.downscale_p": 0.0,
            "eval.n_boot": 50, "eval.baseline": False, "run.output_dir": out, "run.name": f"test_{method}"}  # fmt: skip
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> MlflowTracker:
    return MlflowTracker(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


@pytest.fixture(scope="module")
def trained(synthetic, tracker, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Each method trained once (MLflow-tracked); LoRA also runs the robustness sweep and the pixel baseline."""
    out = {}
    for method in METHOD_LR:
        extra = {"eval.robustness": True, "eval.baseline": True} if method == "lora" else {}
        cls, cfg = load_recipe(CONFIGS / "faces_finetune.yaml",
                               _overrides(synthetic, tmp_path_factory.mktemp(method), method, **extra))  # fmt: skip
        out[method] = cls(cfg, tracker).run("train")
    return out


# ----------------------------------------------------------------------------------------- manifests and splits
def test_manifest_without_split_gets_a_seeded_split_by_group(synthetic) -> None:
    data = ForensicsData(manifest=str(synthetic["plain"]))
    a, b = load_forensics_manifest(data, seed=0), load_forensics_manifest(data, seed=0)
    other = load_forensics_manifest(data, seed=1)
    assert a["split"].tolist() == b["split"].tolist() and a["split"].tolist() != other["split"].tolist()
    assert a.groupby("group")["split"].nunique().max() == 1  # a group never in two splits
    share = (a["split"] == "test").mean()
    assert 0.15 <= share <= 0.25
    assert set(a["Fake"]) == {0.0, 1.0} and (a["Fake"] == (a["label"] == "fake")).all()
    for split in ("train", "val", "test"):
        assert a.loc[a["split"] == split, "Fake"].nunique() == 2, split  # stratified: both classes everywhere


def test_manifest_maps_numeric_labels_and_refuses_unknown_ones(synthetic, tmp_path: Path) -> None:
    frame = pd.read_csv(synthetic["plain"])
    frame["label"] = (frame["label"] == "fake").astype(int)
    frame.to_csv(tmp_path / "numeric.csv", index=False)
    got = load_forensics_manifest(ForensicsData(manifest=str(tmp_path / "numeric.csv")))
    assert (got["Fake"] == got["label"]).all()
    frame.loc[3, "label"] = 7
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ConfigError, match=r"label values \['7'\] are neither fake .* data.fake_values"):
        load_forensics_manifest(ForensicsData(manifest=str(tmp_path / "bad.csv")))


def test_existing_test_split_is_kept_and_validation_carved_from_train(synthetic, tmp_path: Path) -> None:
    frame = pd.read_csv(synthetic["plain"])
    frame["split"] = np.where(np.arange(len(frame)) % 5 == 0, "test", "train")
    frame.to_csv(tmp_path / "split.csv", index=False)
    got = load_forensics_manifest(ForensicsData(manifest=str(tmp_path / "split.csv"), val_fraction=0.25))
    assert (got.loc[np.arange(len(frame)) % 5 == 0, "split"] == "test").all()
    n_train = (frame["split"] == "train").sum()
    assert abs((got["split"] == "val").sum() - 0.25 * n_train) <= 2


# ----------------------------------------------------------------------------------------- hand-computed figures
def test_threshold_eer_and_accuracies_on_a_hand_case() -> None:
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9])
    # J: 0.5 at 0.9, 0 at 0.6, 0.5 at 0.4 -> the tie goes to the higher threshold
    assert detect.choose_threshold(y, s) == pytest.approx(0.9)
    m = detect.detection_metrics(y, s, 0.9, n_boot=20)
    assert m["auroc"] == pytest.approx(0.75)  # 3 of the 4 (fake, real) pairs ordered
    assert m["eer"] == pytest.approx(0.5) and m["eer_threshold"] == pytest.approx(0.6)  # FNR = FPR = 0.5 at 0.6
    assert m["accuracy"] == pytest.approx(0.75) and m["accuracy_05"] == pytest.approx(0.5)
    assert m["ci_low"] <= m["auroc"] <= m["ci_high"]
    separable = detect.detection_metrics(y, np.array([0.1, 0.2, 0.7, 0.8]), 0.5, n_boot=20)
    assert separable["eer"] == 0.0 and separable["auroc"] == 1.0 and separable["accuracy"] == 1.0
    assert detect.choose_threshold(np.array([1, 1]), np.array([0.2, 0.3])) == 0.5  # one class: the default


def test_hypersphere_losses_on_hand_cases() -> None:
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    # aligned classes (distance 0) at opposite poles (squared distance 4): 4 of 12 ordered pairs at potential 1
    expected = math.log((4 + 8 * math.exp(-8)) / 12)
    assert float(detect.align_uniform_loss(z, y)) == pytest.approx(expected, rel=1e-5)
    mixed = torch.tensor([0, 1, 0, 1])  # the same points, labels across the poles: alignment costs 4
    assert float(detect.align_uniform_loss(z, mixed)) == pytest.approx(expected + 4, rel=1e-5)
    assert float(detect.supcon_loss(z, y)) < float(detect.supcon_loss(z, mixed))
    assert float(detect.supcon_loss(z, torch.tensor([0, 1, 2, 3]))) == 0.0  # no positives: nothing to pull


# ---------------------------------------------------------------------------------------------- what trains
def _micro(**kw):
    return MODELS.create("forensics_vit_micro_patch8", num_outputs=1, img_size=IMG, **kw)


def test_ln_tune_trains_exactly_the_layer_norms_and_the_head() -> None:
    model = _micro(normalize_features=True)
    names = set(detect.freeze_for(model, "ln_tune"))
    norms = {f"backbone.model.blocks.{i}.norm{k}.{p}" for i in range(4) for k in (1, 2) for p in ("weight", "bias")}
    expected = norms | {"backbone.model.norm.weight", "backbone.model.norm.bias", "head.weight", "head.bias"}
    assert names == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert set(detect.freeze_for(_micro(), "linear_probe")) == {"head.weight", "head.bias"}
    with pytest.raises(ConfigError, match="method: expected one of"):
        detect.freeze_for(_micro(), "bitfit")


def test_normalised_head_reads_the_unit_embedding() -> None:
    model = _micro(normalize_features=True).eval()
    x = torch.randn(3, 3, IMG, IMG)
    out = model.forward_outputs(x)
    torch.testing.assert_close(out["embedding"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(model(x), model.head(out["embedding"]))


def test_lora_adds_adapters_to_attention_and_mlp_only_and_merges_to_the_same_outputs() -> None:
    model = _micro().eval()
    detect.freeze_for(model, "lora")
    wrapped = detect.add_lora(model, rank=2, alpha=4.0)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_")[0].split("blocks.")[1] for n in trainable if "lora_" in n}
    assert adapted == {f"{i}.{m}" for i in range(4) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert any(n.endswith("head.weight") for n in trainable) and not any("patch_embed" in n for n in trainable)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # as if trained: the adapters now change the outputs
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        before = wrapped(x)
        merged = detect.merge_lora(wrapped)
        torch.testing.assert_close(merged(x), before, atol=1e-5, rtol=1e-4)
    assert not any("lora" in k for k in merged.state_dict())


def test_forensics_spec_crops_the_centre_without_resampling() -> None:
    spec = forensics_spec("d", "forensics_vit_micro_patch8", img_size=64)
    assert spec.resize_mode == "center_crop" and spec.label_names == ("Fake",) and spec.task == "binary"
    assert spec.mean == IMAGENET_MEAN and forensics_spec("c", "forensics_clip_vit_b16").mean == CLIP_MEAN
    a = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    x = ModelInput(spec)(a)  # [3, 64, 64]
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    centre = torch.from_numpy(a[118:182, 118:182].astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(x * std + mean, centre, atol=1e-5, rtol=0)
    for name in ("forensics_vit_micro_patch8", "forensics_vit_tiny_patch16", "forensics_clip_vit_l14",
                 "forensics_mae_vit_micro_patch8"):  # fmt: skip
        assert name in MODELS


# ------------------------------------------------------------------------------------------------- the recipe
def _rescore(model_dir: Path, rows: pd.DataFrame, root: Path) -> np.ndarray:
    model, spec = load_model_dir(model_dir)
    prep = ModelInput(spec)
    x = torch.stack([prep(read_any(root / p).array) for p in rows["path"]])
    with torch.no_grad():
        return model(x).sigmoid()[:, 0].numpy()


@pytest.mark.parametrize("method", list(METHOD_LR))
def test_each_method_learns_and_trains_only_its_parameters(trained, synthetic, method: str) -> None:
    out = trained[method]
    assert out["method"] == method and out["test_auroc"] > 0.8 and out["val_auroc"] > 0.8
    assert out["test_auroc_ci"][0] <= out["test_auroc"] <= out["test_auroc_ci"][1]
    assert 0.0 <= out["test_eer"] <= 0.5 and 0.0 <= out["threshold"] <= 1.0
    init, final = load_file(str(synthetic["init"])), load_file(str(Path(out["model_dir"]) / "weights.safetensors"))
    assert set(final) == set(init)  # merged LoRA: a plain model
    changed = {k for k in init if not torch.equal(init[k], final[k])}
    is_norm = {k for k in init if ".norm" in k}
    lora_targets = {k for k in init if any(f".{t}." in k for t in ("qkv", "attn.proj", "fc1", "fc2"))}
    allowed = {"linear_probe": set(), "ln_tune": is_norm, "lora": lora_targets, "finetune": set(init)}[method]
    assert {"head.weight", "head.bias"} <= changed and changed - {"head.weight", "head.bias"} <= allowed
    if method != "linear_probe":
        assert changed & allowed, f"{method} changed none of its backbone parameters"
    spec = load_model_dir(out["model_dir"])[1]
    assert spec.thresholds == {"Fake": pytest.approx(out["threshold"])} and spec.resize_mode == "center_crop"
    assert spec.model_kwargs.get("normalize_features", False) == (method == "ln_tune")
    logged = pd.read_csv(Path(out["model_dir"]).parent / "evaluation" / "test_predictions.csv")
    np.testing.assert_allclose(_rescore(Path(out["model_dir"]), logged, synthetic["root"]), logged["score"],
                               atol=1e-5)  # fmt: skip


def test_run_is_logged_to_mlflow_with_the_model_robustness_and_baseline(trained, tracker) -> None:
    out = trained["lora"]
    run = tracker.client.get_run(out["run_id"])
    m = run.data.metrics
    for key in ("test_auroc", "test_ci_low", "test_ci_high", "test_ap", "test_accuracy", "test_accuracy_05",
                "test_eer", "val_threshold", "baseline_pixel_auroc", "robust_jpeg_30_auroc"):  # fmt: skip
        assert key in m, key
    assert m["test_auroc"] == pytest.approx(out["test_auroc"]) and m["val_threshold"] == pytest.approx(out["threshold"])
    assert run.data.params["train.method"] == "lora" and run.data.tags["domain"] == "forensics"
    files = {a.path for folder in ("model", "robustness", "evaluation", "data")
             for a in tracker.client.list_artifacts(out["run_id"], folder)}  # fmt: skip
    assert {
        "model/weights.safetensors",
        "model/weight_spec.json",
        "robustness/robustness.csv",
        "robustness/robustness.png",
        "evaluation/test_predictions.csv",
        "data/manifest.csv",
    } <= files
    table = pd.DataFrame(out["robustness"])
    assert len(table) == 15 and set(table["condition"]) == {"jpeg", "blur", "downscale", "noise"}


def test_leave_one_generator_out_trains_without_each_generator(synthetic, tmp_path: Path, monkeypatch) -> None:
    seen: list[pd.DataFrame] = []
    fit = detect.DetectRecipe.fit

    def recording_fit(self, frame, tag=""):
        seen.append(frame.copy())
        return fit(self, frame, tag)

    monkeypatch.setattr(detect.DetectRecipe, "fit", recording_fit)
    overrides = _overrides(synthetic, tmp_path, "linear_probe", manifest="manifest", **{"train.epochs": 2})
    cls, cfg = load_recipe(CONFIGS / "faces_probe.yaml", [*overrides, "eval.robustness=false"])
    out = cls(cfg, NullTracker()).run("train")
    table = pd.DataFrame(out["leave_one_generator_out"])
    assert table["generator"].tolist() == ["checker", "stripes"]
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    test = manifest[manifest["split"] == "test"]
    for row, frame in zip(table.itertuples(), seen[1:], strict=True):
        fitted_on = frame[frame["split"] != "test"]
        assert not (fitted_on["generator"] == row.generator).any()  # trained without that generator's fakes
        assert (fitted_on["generator"].fillna("").str.len() > 0).any()  # but with the other one's
        n_g = (test["generator"] == row.generator).sum()
        assert row.n_fake == n_g and row.n == n_g + (test["Fake"] == 0).sum()
        assert 0.0 <= row.auroc <= 1.0


def test_mae_pretraining_feeds_a_frozen_probe(synthetic, tmp_path: Path) -> None:
    mae_over = [f"data.manifest={synthetic['plain']}", "data.layout=manifest", "data.batch_size=16",
                "model.img_size=32", "train.epochs=1", "train.threads=1", "train.progress=false",
                f"run.output_dir={tmp_path / 'mae'}"]  # fmt: skip
    cls, cfg = load_recipe(CONFIGS / "faces_mae.yaml", mae_over)
    pre = cls(cfg, NullTracker()).run("train")
    test_paths = set(load_forensics_manifest(cfg.data).query("split == 'test'")["path"])
    assert pre["n_images"] == 120 - len(test_paths) and np.isfinite(pre["final_loss"])  # test images never seen
    over = _overrides(synthetic, tmp_path / "probe", "linear_probe", **{"train.epochs": 1})
    over += [f"model.init=file:{pre['mae_checkpoint']}", "model.init_layout=mae"]
    cls, cfg = load_recipe(CONFIGS / "faces_probe.yaml", [*over, "eval.robustness=false"])
    out = cls(cfg, NullTracker()).run("train")
    assert "decoder" in out["weights_load"]
    mae = load_file(pre["mae_checkpoint"])
    final = load_file(str(Path(out["model_dir"]) / "weights.safetensors"))
    for k in ("blocks.0.attn.qkv.weight", "pos_embed", "patch_embed.proj.weight", "norm.weight"):
        torch.testing.assert_close(final[f"backbone.model.{k}"], mae[k])  # the frozen encoder is the MAE's


# ---------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.method=bitfit",
            "method: expected one of ['linear_probe', 'ln_tune', 'lora', 'finetune'], got 'bitfit'",
        ),
        ("train.epoch=3", "train.epoch: unknown key (did you mean 'epochs'?)"),
        ("train.metric_loss=triplet", "metric_loss: expected one of"),
        ("data.layout=zip", "layout: expected manifest or faces_csv, got 'zip'"),
        ("model.resize_mode=stretch", "resize_mode: expected center_crop, shorter_side_crop or squash"),
        ("train.augment.jpeg_quality=[50, 120]", "jpeg_quality must be a range within 1..100"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_recipe(CONFIGS / "faces_lora.yaml", [override])
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["faces_mae", "faces_probe", "faces_ln_tune", "faces_lora", "faces_finetune"])
def test_shipped_configs_validate(name: str) -> None:
    cls, cfg = load_recipe(CONFIGS / f"{name}.yaml")
    assert cls.name == ("forensics.mae_pretrain" if name == "faces_mae" else "forensics.detect")
    assert cfg.data.layout == "faces_csv" and cfg.data.test_fraction == 0.2 and cfg.run.seed == 0
    if name != "faces_mae":
        assert cfg.train.method == name.removeprefix("faces_").replace("probe", "linear_probe")
        assert cfg.model.resize_mode == "center_crop" and cfg.eval.robustness


# --------------------------------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_faces_layout_reads_the_shared_set(shared_data: Path) -> None:
    csv = shared_data / "faces" / "real_vs_stylegan2" / "data.csv"
    frame = faces_csv(csv)
    assert frame["label"].value_counts().to_dict() == {"fake": 650, "real": 539}  # the images on disk
    assert all((csv.parent / p).is_file() for p in frame["path"].head(50))
    split = load_forensics_manifest(ForensicsData(manifest=str(csv), layout="faces_csv"), seed=0)
    assert abs((split["split"] == "test").sum() - 0.2 * len(frame)) <= 2 and split["group"].is_unique
    again = load_forensics_manifest(ForensicsData(manifest=str(csv), layout="faces_csv"), seed=0)
    assert split["split"].tolist() == again["split"].tolist()
