"""Manipulation localisation: the localiser's named outputs and shapes, the boundary band on a hand case, the loss
on perfect and imperfect predictions, the ``forensics.localize`` recipe on a tiny learnable set (a pasted bright
square: the predicted mask finds it, masks / overlays / baselines logged), the save / load round trip, scoring a
folder through `loupe.workflows.scoring.score` (a mask artifact per picture on its frame), the shared layouts'
adapters on the real files, and config refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import loupe.domains.forensics.localize as loc
from loupe.core.errors import ConfigError
from loupe.core.io.maps import load_map
from loupe.core.models import build_model, load_model_dir, save_model
from loupe.core.recipes import load_recipe
from loupe.core.tracking import NullTracker
from loupe.core.transforms import ModelInput
from loupe.domains.forensics import localizer, masks

CONFIG = Path(loc.__file__).parent / "configs" / "casia_localize.yaml"
SIDE, IMG = 48, 32


def _model(img: int = IMG, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    spec = localizer.localize_spec("t", img_size=img, model_kwargs=kwargs)
    return build_model(spec)[0].eval(), spec


# ----------------------------------------------------------------------------------------------------- the model
def test_outputs_shapes_and_the_image_score_from_the_top_mask_logits() -> None:
    model, spec = _model(levels=4, decoder_dim=16, topk_fraction=0.1)
    assert spec.outputs == ("scores", "mask", "embedding") and spec.resize_mode == "squash"
    assert spec.label_names == ("Manipulated",) and model.indices == [0, 1, 2, 3]
    x = torch.randn(2, 3, IMG, IMG + 16)  # any multiple of the patch: the mask follows the input
    out = model.forward_outputs(x)
    assert out["mask_logits"].shape == (2, 1, IMG, IMG + 16)
    assert out["logits"].shape == (2, 1) and out["embedding"].shape == (2, 96)
    k = round(0.1 * IMG * (IMG + 16))
    top = out["mask_logits"].flatten(1).topk(k, 1).values.mean(1, keepdim=True)
    torch.testing.assert_close(out["logits"], top)  # the head starts as the identity
    torch.testing.assert_close(model(x), out["logits"])
    assert localizer.block_indices(12, 4) == [2, 5, 8, 11] and localizer.block_indices(12, 1) == [11]
    with pytest.raises(ConfigError, match=r"levels must be in \[1, 4\] for a 4-block backbone, got 5"):
        localizer.block_indices(4, 5)


def test_the_decoder_reads_the_early_blocks_directly() -> None:
    """With every level but the first silenced, the mask depends on block 0's tokens only: changing the last block
    leaves it exactly as it was, changing block 0 does not (the levels are the blocks' own outputs, by hooks)."""
    model, _ = _model(levels=4, decoder_dim=16)
    with torch.no_grad():
        for lateral in model.mask_head.lateral[1:]:
            lateral.weight.zero_()
            lateral.bias.zero_()
    x = torch.randn(1, 3, IMG, IMG)
    torch.manual_seed(1)
    with torch.no_grad():
        before = model.forward_outputs(x)["mask_logits"]
        model.backbone.blocks()[3].mlp.fc2.weight.add_(torch.randn_like(model.backbone.blocks()[3].mlp.fc2.weight))
        torch.testing.assert_close(model.forward_outputs(x)["mask_logits"], before, rtol=0, atol=0)
        model.backbone.blocks()[0].mlp.fc2.weight.add_(torch.randn_like(model.backbone.blocks()[0].mlp.fc2.weight))
        assert (model.forward_outputs(x)["mask_logits"] - before).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ band and loss
def test_edge_band_is_the_ring_around_the_boundary_on_a_hand_case() -> None:
    mask = torch.zeros(1, 1, 20, 20)
    mask[..., 5:15, 5:15] = 1
    band = localizer.edge_band(mask, 1)[0, 0].numpy()
    want = np.zeros((20, 20))
    want[4:16, 4:16] = 1
    want[6:14, 6:14] = 0  # dilated 12x12 minus eroded 8x8
    np.testing.assert_array_equal(band, want)
    assert band.sum() == 144 - 64
    edge = torch.zeros(1, 1, 10, 10)
    edge[..., :, :4] = 1  # touches the picture's border: only its inner side is a boundary
    ring = localizer.edge_band(edge, 1)[0, 0]
    assert ring[:, 3:5].all() and ring[:, :3].sum() == 0 and ring[:, 5:].sum() == 0


def test_loss_is_near_zero_for_a_perfect_prediction_and_grows_with_errors() -> None:
    mask = torch.zeros(2, 1, 24, 24)
    mask[0, :, 6:18, 6:18] = 1  # one tampered picture, one authentic
    label = torch.tensor([1.0, 0.0])

    def loss(logits: torch.Tensor, image: torch.Tensor = torch.tensor([[30.0], [-30.0]])) -> dict[str, float]:
        return {k: float(v) for k, v in localizer.localization_loss({"mask_logits": logits, "logits": image}, mask,
                                                              label).items()}  # fmt: skip

    perfect = loss(30 * (2 * mask - 1))
    assert perfect["total"] < 1e-6
    inverted = loss(-30 * (2 * mask - 1))
    assert inverted["total"] > 10 and inverted["dice"] > 0.9 and inverted["edge"] > 10
    ring = localizer.edge_band(mask, 2).bool()
    boundary_wrong = torch.where(ring, -30 * (2 * mask - 1), 30 * (2 * mask - 1))
    interior = torch.zeros_like(mask, dtype=torch.bool)
    interior[0, :, 10:14, 10:14] = True  # inside the square, far from its boundary
    interior_wrong = torch.where(interior, -30.0, 30 * (2 * mask - 1))
    b, i = loss(boundary_wrong), loss(interior_wrong)
    assert b["edge"] > 10 and i["edge"] < 1e-6  # the edge term looks at the band only
    assert b["total"] > i["total"] > perfect["total"]
    assert loss(30 * (2 * mask - 1), torch.tensor([[-30.0], [30.0]]))["image"] > 10  # wrong image scores cost


# ----------------------------------------------------------------------------------------- the tiny learnable set
def _picture(rng: np.random.Generator) -> np.ndarray:
    small = Image.fromarray(rng.integers(30, 150, (4, 4, 3), dtype=np.uint8))
    base = np.asarray(small.resize((SIDE, SIDE), Image.BILINEAR), dtype=np.float32)
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def squares(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 tampered pictures (a bright square of 14-20 px pasted somewhere) and 16 authentic ones, 48 px PNGs; masks
    white on black; ``manifest.csv`` ``path, mask, group`` (no label: a mask means tampered)."""
    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(64):
        a, m = _picture(rng), np.zeros((SIDE, SIDE), np.uint8)
        if i < 48:
            s = int(rng.integers(14, 21))
            y, x = rng.integers(0, SIDE - s, 2)
            a[y : y + s, x : x + s] = rng.integers(225, 256, 3)
            m[y : y + s, x : x + s] = 255
            Image.fromarray(m).save(root / f"m{i:02d}.png")
        Image.fromarray(a).save(root / f"p{i:02d}.png")
        rows.append({"path": f"p{i:02d}.png", "mask": f"m{i:02d}.png" if i < 48 else "", "group": f"g{i}"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture(scope="module")
def trained(squares: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, NullTracker, Path]:
    out = tmp_path_factory.mktemp("run")
    overrides = {"data.manifest": squares / "manifest.csv", "data.cross": "[]", "data.batch_size": 8,
                 "model.img_size": IMG, "model.decoder_dim": 32, "optim.lr": 2e-3, "optim.warmup_epochs": 1,
                 "train.epochs": 8, "train.threads": 2, "train.progress": False, "train.augment.crop_scale": 1.0,
                 "eval.n_boot": 50, "eval.overlays": 2, "run.output_dir": out, "run.name": "squares"}  # fmt: skip
    cls, cfg = load_recipe(CONFIG, [f"{k}={v}" for k, v in overrides.items()])
    tracker = NullTracker()
    return cls(cfg, tracker).run("train"), tracker, out


def test_recipe_learns_to_localise_a_pasted_square(trained) -> None:
    result, tracker, out = trained
    assert result["final_loss"] < 0.6 * result["first_loss"]
    # held-out pictures (16 of 64, by group): the mask finds the square on the picture's own 48 px frame
    assert result["test_n_tampered"] >= 8 and result["test_n_authentic"] >= 2
    assert result["test_pixel_iou_thr"] > 0.5 and result["test_pixel_f1_05"] > 0.6
    assert result["test_pixel_f1_best"] >= result["test_pixel_f1_05"]  # the per-image oracle is never worse
    assert result["test_pixel_f1_05_ci_low"] <= result["test_pixel_f1_05"] <= result["test_pixel_f1_05_ci_high"]
    # the trivial baselines in the same run: all-tampered gets F1 = 2p/(1+p) (p ~ 0.12), image AUROC 0.5
    assert result["test_pixel_f1_05"] > result["test_baseline_all_tampered_pixel_f1_05"] + 0.2
    assert result["test_baseline_all_tampered_image_auroc"] == 0.5
    assert result["test_image_auroc"] > 0.9 and 0.0 < result["mask_threshold"] < 1.0
    run = tracker.runs[0]
    assert run.params["recipe"] == "forensics.localize" and "test_pixel_f1_05" in run.metrics
    masks = sorted((out / "masks" / "test").glob("*.png"))
    assert len(masks) == result["test_n_tampered"] + result["test_n_authentic"]
    assert load_map(masks[0]).shape == (SIDE, SIDE)  # on the file's frame, not the model's input
    assert "masks/test/test" in run.artifacts and sum(a.startswith("overlays/test/") for a in run.artifacts) == 2
    assert "model" in run.artifacts and "evaluation/test/per_image.csv" in run.artifacts
    split = pd.read_csv(out / "data" / "manifest.csv")
    assert split.groupby("group")["split"].nunique().max() == 1 and set(split["split"]) == {"train", "val", "test"}


def test_save_load_round_trip_gives_identical_masks(trained, tmp_path: Path) -> None:
    result, _, _ = trained
    model, spec = load_model_dir(result["model_dir"])
    assert spec.mask_threshold == result["mask_threshold"] and spec.thresholds == {"Manipulated": result[
        "image_threshold"]}  # fmt: skip
    again, _ = load_model_dir(save_model(model, spec, tmp_path / "again"))
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        a, b = model.forward_outputs(x), again.forward_outputs(x)
    assert torch.equal(a["mask_logits"], b["mask_logits"]) and torch.equal(a["logits"], b["logits"])
    fresh, _ = _model(seed=1, decoder_dim=32)
    with torch.no_grad():
        assert not torch.equal(fresh.forward_outputs(x)["mask_logits"], a["mask_logits"])


def test_scoring_writes_a_mask_artifact_per_picture_on_its_frame(trained, squares: Path, tmp_path: Path) -> None:
    from loupe.workflows.scoring import ScoreOptions, score

    result, _, _ = trained
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("p00.png", "p01.png", "p60.png"):
        a = np.asarray(Image.open(squares / name))
        Image.fromarray(np.repeat(a, 2, axis=1)).save(folder / name)  # 96 x 48: a non-square frame
    out = tmp_path / "preds.parquet"
    s = score(ScoreOptions(domain="forensics", input=folder, model=f"local-dir:{result['model_dir']}", out=out,
                           track=False, num_workers=0))  # fmt: skip
    assert (s.rows_ok, s.rows_failed) == (3, 0)
    rows = pd.read_parquet(out).set_index("path")
    model, spec = load_model_dir(result["model_dir"])
    for name in ("p00.png", "p01.png", "p60.png"):
        (ref,) = [a for a in json.loads(rows.loc[name, "artifacts"]) if a["kind"] == "mask"]
        assert ref["frame"] == {"space": "file", "width": 96, "height": 48, "scale": 1.0}
        assert ref["threshold"] == spec.mask_threshold
        got = load_map(out.parent / ref["path"])
        pixels = np.asarray(Image.open(folder / name))
        with torch.no_grad():
            o = model.forward_outputs(ModelInput(spec)(pixels)[None])
        want = F.interpolate(o["mask_logits"].sigmoid(), size=(48, 96), mode="bilinear", antialias=True)[0, 0]
        np.testing.assert_allclose(got, want.numpy(), atol=2e-4)
        assert rows.loc[name, "score_Manipulated"] == pytest.approx(float(o["logits"].sigmoid()), abs=1e-5)
    # the tampered picture's mask is high on its square: the square, stretched like the picture
    truth = np.repeat(np.asarray(Image.open(squares / "m00.png")) > 127, 2, axis=1)
    (ref,) = [a for a in json.loads(rows.loc["p00.png", "artifacts"]) if a["kind"] == "mask"]
    got = load_map(out.parent / ref["path"])
    assert got[truth].mean() > got[~truth].mean() + 0.3


def test_review_case_overlays_the_scored_mask_where_it_is_above_threshold(trained, squares: Path,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    """`loupe score forensics` with the localiser → the forensics review case of each picture (the registered
    builder, `review.forensics_case`) carries the mask PNG as a ``mask`` overlay with the model's threshold, and the
    dashboard's renderer (`loupe.apps.render.compose`, no browser) colours exactly the pixels at or above it: on the
    tampered picture, its square."""
    from loupe.apps.render import View, compose
    from loupe.core.review import load_overlay, render_layer
    from loupe.workflows.review import review_cases
    from loupe.workflows.scoring import ScoreOptions, score

    result, _, _ = trained
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("p00.png", "p60.png"):  # tampered, authentic
        Image.fromarray(np.repeat(np.asarray(Image.open(squares / name)), 2, axis=1)).save(folder / name)
    out = tmp_path / "preds.parquet"
    score(ScoreOptions(domain="forensics", input=folder, model=f"local-dir:{result['model_dir']}", out=out,
                       track=False, num_workers=0))  # fmt: skip
    _, spec = load_model_dir(result["model_dir"])
    cases = {c.path: c for c in review_cases(out)}
    assert set(cases) == {"p00.png", "p60.png"}
    changed = {}
    for name, case in cases.items():
        assert case.domain == "forensics" and case.status == "ok"
        (mask,) = [o for o in case.overlays if o.kind == "mask"]
        assert Path(mask.path).is_file() and mask.path.endswith("-mask.png") and mask.visible
        assert mask.threshold == spec.mask_threshold and mask.frame["space"] == "file"
        layer = case.layers[0]
        assert layer.source == str(folder / name) and layer.frame == {"width": 96, "height": 48}
        base, values = render_layer(layer), load_overlay(mask)
        assert base.shape[:2] == values.shape == (48, 96)  # the mask on the picture's own frame
        on = compose(base, layer, [(mask, values)], View(overlays=("mask",), opacity=0.5))
        off = compose(base, layer, [(mask, values)], View(overlays=()))
        changed[name] = (on != off).any(-1)
        above = values >= mask.threshold
        assert (changed[name] == above).mean() > 0.99  # coloured where the mask is at or above its threshold
    truth = np.repeat(np.asarray(Image.open(squares / "m00.png")) > 127, 2, axis=1)
    hit = changed["p00.png"]
    assert hit[truth].mean() > 0.5 and hit[truth].mean() > hit[~truth].mean() + 0.4  # the pasted square
    assert changed["p60.png"].mean() < hit.mean()  # the authentic picture is marked less


# ------------------------------------------------------------------------------------------------- data layouts
def test_manifest_labels_splits_and_refusals(squares: Path, tmp_path: Path) -> None:
    frame = masks.read_mask_manifest(squares / "manifest.csv")
    assert frame["Manipulated"].sum() == 48 and Path(frame["path"].iloc[0]).is_absolute()
    a = masks.assign_splits(frame, 0.25, 0.15, seed=0)
    assert a["split"].tolist() == masks.assign_splits(frame, 0.25, 0.15, seed=0)["split"].tolist()
    assert 0.2 <= (a["split"] == "test").mean() <= 0.3
    bad = pd.read_csv(squares / "manifest.csv").assign(label=1)
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ConfigError, match=r"16 tampered rows have no mask"):
        masks.read_mask_manifest(tmp_path / "bad.csv")
    bad.assign(label="maybe").to_csv(tmp_path / "worse.csv", index=False)
    with pytest.raises(ConfigError, match=r"label values \['maybe'\]; use 1/0, tampered/authentic"):
        masks.read_mask_manifest(tmp_path / "worse.csv")


def test_casia_groups_join_files_sharing_a_picture() -> None:
    names = ["Sp_D_CNN_A_art0024_ani0032_0268", "Sp_S_NNN_A_ani0032_ani0032_0199", "Sp_D_CNN_A_pla0030_pla0061_0272",
             "Tp_D_CRN_M_N_pla00035_pla00033_10997"]  # fmt: skip
    g = masks.casia_groups(names, "c")
    assert g[0] == g[1] != g[2] and g[3] not in g[:3] and g[0] == "c:ani0032"


@pytest.mark.realdata
def test_casia1_adapter_splits_the_side_by_side_panels(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "forensics" / "casia1" / "samples"
    frame = masks.casia1(folder, tmp_path)
    n = len(list(folder.rglob("*_combine.png")))
    assert len(frame) == 2 * n and frame["label"].sum() == n
    row = frame[frame["path"].str.contains("Sp_D_CND_A_pla0005_pla0023_0281_tampered")].iloc[0]
    combined = np.asarray(Image.open(folder / "Sp" / "Sp_D_CND_A_pla0005_pla0023_0281_combine.png").convert("RGB"))
    w = combined.shape[1] // 3
    tampered, mask = np.asarray(Image.open(row["path"])), np.asarray(Image.open(row["mask"]))
    assert tampered.shape == (256, 384, 3) and mask.shape == (256, 384)
    np.testing.assert_array_equal(tampered, combined[:, :w])
    np.testing.assert_array_equal(mask > 127, combined[:, 2 * w :].max(-1) > 127)
    original = frame[(frame["label"] == 0) & (frame["group"] == row["group"])]
    assert len(original) >= 1 and (original["mask"] == "").all()
    edited = np.abs(tampered.astype(int) - np.asarray(Image.open(original["path"].iloc[0]))).max(-1) > 20
    assert (edited == (mask > 127)).mean() > 0.97  # the panels differ where the mask says, and only there
    assert 0.01 < (mask > 127).mean() < 0.2


@pytest.mark.realdata
def test_casia2_and_noso_adapters(shared_data: Path) -> None:
    c2 = masks.casia2(shared_data / "forensics" / "casia2" / "samples")
    assert len(c2) == 4 and (c2["label"] == 1).all()
    for r in c2.itertuples():
        assert np.asarray(Image.open(r.path)).shape[:2] == masks.read_mask(r.mask).shape
    noso = masks.noso(shared_data / "forensics" / "noso_copymove")
    assert (noso["label"] == 0).sum() == 13 and (noso["label"] == 1).sum() == 18
    labels = pd.read_csv(shared_data / "forensics" / "noso_copymove" / "labels.csv")
    assert sorted(Path(p).name for p in noso.loc[noso["label"] == 1, "path"]) == sorted(
        labels.loc[labels["label"] == "forged", "image"])  # fmt: skip
    assert noso.groupby("group")["label"].min().eq(0).all()  # each forgery sits with its authentic picture


# ---------------------------------------------------------------------------------------------------- configs
def test_shipped_config_validates_and_bad_values_are_refused() -> None:
    _, cfg = load_recipe(CONFIG)
    assert cfg.model.name == "forensics_loc_vit_micro_patch8" and cfg.data.sources == ("casia1", "casia2")
    assert cfg.data.cross == ("noso",) and cfg.train.loss.edge > 0
    with pytest.raises(ConfigError) as err:
        load_recipe(CONFIG, ["model.name=forensics_vit_micro_patch8", "data.sources=[casia3]", "model.img_size=100",
                             "train.loss.edge_width=0", "data.cross=[elsewhere]"])  # fmt: skip
    msg = str(err.value)
    for part in (
        "'forensics_vit_micro_patch8' is not a registered localiser",
        "'casia3' is not a known layout",
        "img_size must be a multiple of 16",
        "edge_width >= 1",
        "'elsewhere' is neither a known layout",
    ):
        assert part in msg, part
    with pytest.raises(ConfigError, match="a localiser has one label"):
        build_model(localizer.localize_spec("t", img_size=IMG, label_names=("A", "B")))
