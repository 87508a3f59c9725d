"""Video-level evaluation: the FaceForensics++ / DFDC layout as a manifest, clip scores by aggregation, config
refusals, and the ``forensics.video_eval`` recipe on real clips, scored exactly as ``loupe score forensics`` scores
them (failed clips as rows, left out of the metrics), its figures checked by hand and logged."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import loupe.domains.forensics  # noqa: F401 - registers the domain and its recipes
from loupe.core.errors import ConfigError
from loupe.core.models import build_model, save_model
from loupe.core.recipes import load_recipe
from loupe.core.tracking import NullTracker
from loupe.domains.forensics.video_eval import (
    VideoData,
    check_aggregation,
    clip_scores,
    faces_videos,
    load_video_manifest,
)

CONFIG = Path(loupe.domains.forensics.__file__).parent / "configs" / "videos_eval.yaml"
VIDEOS = Path("faces") / "videos"
FRAMES = 3


# ------------------------------------------------------------------------------------------------------- layout
@pytest.mark.realdata
def test_the_shared_clips_become_a_manifest_by_source_video(shared_data: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        m = faces_videos(shared_data / VIDEOS).set_index("path")
    assert len(m) == 10 and (m.label == "real").sum() == 3
    assert m.loc["ffpp/original_sequences/youtube/c23/videos/519.mp4"].to_dict() == {"label": "real", "group": "519",
                                                                                     "generator": ""}  # fmt: skip
    fake = m.loc["ffpp/manipulated_sequences/Deepfakes/c23/videos/519_515.mp4"]
    assert (fake.label, fake.group, fake.generator) == ("fake", "519", "Deepfakes")  # drawn with its real clip
    dfdc = m.loc["dfdc/dfdc_train_part_0/brtujopkby.mp4"]
    assert (dfdc.label, dfdc.group, dfdc.generator) == ("fake", "gnmmhlbzge", "dfdc")  # group: DFDC's original
    assert sorted(m.generator.unique()) == ["", "Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures", "dfdc"]
    assert "lists 2 clip(s) that are not there (e.g. vtfpbtmgfh.mp4)" in caplog.text  # listed in metadata, absent


def test_layout_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no FaceForensics\+\+ .* or DFDC .* clips found; write a manifest"):
        faces_videos(tmp_path)
    part = tmp_path / "dfdc" / "part_0"
    part.mkdir(parents=True)
    (part / "a.mp4").write_bytes(b"x")
    (part / "metadata.json").write_text(json.dumps({"a.mp4": {"label": "MAYBE"}}))
    with pytest.raises(ConfigError, match=r"metadata.json: clip 'a.mp4' has label 'MAYBE'; expected FAKE or REAL"):
        faces_videos(tmp_path)
    (part / "metadata.json").write_text(json.dumps({"a.mp4": {"label": "REAL"}}))
    assert faces_videos(tmp_path).to_dict("records") == [{"path": "dfdc/part_0/a.mp4", "label": "real",
                                                          "group": "a", "generator": ""}]  # fmt: skip


def test_a_manifest_maps_labels_and_refuses_unknown_ones(tmp_path: Path) -> None:
    (tmp_path / "clips.csv").write_text("path,label,group\na.mp4,fake,g1\nb.mp4,0,g1\nc.mp4,REAL,g2\n")
    frame, root = load_video_manifest(VideoData(manifest=str(tmp_path / "clips.csv"), layout="manifest"))
    assert root == tmp_path and frame["Fake"].tolist() == [1.0, 0.0, 0.0] and frame["group"].tolist() == ["g1"] * 2 + [
        "g2"]  # fmt: skip
    assert frame["generator"].tolist() == ["", "", ""]
    (tmp_path / "bad.csv").write_text("path,label\na.mp4,deepfake\n")
    with pytest.raises(ConfigError, match=r"label values \['deepfake'\] are neither fake .* data.fake_values"):
        load_video_manifest(VideoData(manifest=str(tmp_path / "bad.csv"), layout="manifest"))
    with pytest.raises(ConfigError, match=r"'.*nope.csv' does not exist; pass a CSV/Parquet with path,label"):
        load_video_manifest(VideoData(manifest=str(tmp_path / "nope.csv"), layout="manifest"))


# ------------------------------------------------------------------------------------------------ aggregation
def test_clip_scores_by_aggregation() -> None:
    s = np.array([0.1, 0.9, 0.5, 0.7])
    got = clip_scores(s, ("mean", "max", "topk:2", "topk:10"))
    assert got == pytest.approx({"mean": 0.55, "max": 0.9, "topk:2": 0.8, "topk:10": 0.55})
    assert check_aggregation("topk:3") is None and check_aggregation("max") is None
    assert "expected mean, max or topk:K" in check_aggregation("topk:0")
    assert "expected mean, max or topk:K" in check_aggregation("attention")


def test_config_refusals() -> None:
    with pytest.raises(ConfigError) as err:
        load_recipe(CONFIG, ["aggregations=[median]", "unit_options.frames=0", "model.source=/abs/model"])
    text = str(err.value)
    assert "aggregation 'median': expected mean, max or topk:K" in text
    assert "unit_options: frames must be in [1, 256], got 0" in text
    assert "source '/abs/model': expected local-dir:/path, models:/NAME@alias or runs:/ID/model" in text


# ----------------------------------------------------------------------------------------------- the recipe
@pytest.fixture(scope="module")
def clips(shared_data: Path, blank_frames, clip_writer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real and two fake FF++ clips, a clip without a face and an empty file, with a manifest."""
    root = tmp_path_factory.mktemp("clips")
    ffpp = shared_data / VIDEOS / "ffpp"
    picks = {"004.mp4": ffpp / "original_sequences/youtube/c23/videos/004.mp4",
             "519.mp4": ffpp / "original_sequences/youtube/c23/videos/519.mp4",
             "004_982.mp4": ffpp / "manipulated_sequences/NeuralTextures/c23/videos/004_982.mp4",
             "519_515.mp4": ffpp / "manipulated_sequences/Deepfakes/c23/videos/519_515.mp4"}  # fmt: skip
    for name, src in picks.items():
        shutil.copy(src, root / name)
    clip_writer(root / "no_face.mp4", blank_frames(20), fps=25.0)
    (root / "empty.mp4").write_bytes(b"")
    rows = [("004.mp4", "real", "004", ""), ("519.mp4", "real", "519", ""),
            ("004_982.mp4", "fake", "004", "NeuralTextures"), ("519_515.mp4", "fake", "519", "Deepfakes"),
            ("no_face.mp4", "real", "x", ""), ("empty.mp4", "fake", "y", "Deepfakes")]  # fmt: skip
    pd.DataFrame(rows, columns=["path", "label", "group", "generator"]).to_csv(root / "clips.csv", index=False)
    return root


@pytest.fixture(scope="module")
def model_dir(spec_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    spec = spec_factory(unit_options={"frames": FRAMES}, aggregation="mean", thresholds={"Fake": 0.45})
    model, _ = build_model(spec)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return save_model(model.eval(), spec, tmp_path_factory.mktemp("m") / "fake")


@pytest.fixture(scope="module")
def evaluated(clips: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run")
    overrides = [f"data.manifest={clips / 'clips.csv'}", "data.layout=manifest", "unit_options={}", "n_boot=200",
                 "batch_size=4",  # several batches a clip: scores must not depend on the batching
                 f"model.source=local-dir:{model_dir}", f"run.output_dir={out}",
                 "aggregations=[mean, max, 'topk:2']"]  # fmt: skip
    cls, cfg = load_recipe(CONFIG, overrides)
    tracker = NullTracker()
    return cls(cfg, tracker).run("evaluate"), tracker


@pytest.mark.realdata
def test_failed_clips_are_rows_left_out_of_the_metrics(evaluated) -> None:
    result, _ = evaluated
    c = pd.DataFrame(result["clips"]).set_index("path")
    empty = "failed: the video file is empty (0 bytes); re-export or re-download the clip"
    assert c.loc["empty.mp4", "status"] == empty
    assert c.loc["no_face.mp4", "status"].startswith(f"failed: no face found in any of the {FRAMES} sampled frames")
    assert (c.drop(index=["empty.mp4", "no_face.mp4"]).status == "ok").all()
    m = result["metrics"]
    assert (m["n_clips"], m["n_clips_scored"], m["n_real"], m["n_fake"]) == (6, 4, 2, 2)
    assert result["note"].startswith("only 4 clips scored (2 real, 2 fake): one swapped real/fake pair moves the "
                                     "AUROC by 0.250")  # fmt: skip
    assert (c.loc[["004.mp4", "519.mp4"], "frames_with_face"] == FRAMES).all()


@pytest.mark.realdata
def test_clip_scores_are_those_of_loupe_score(evaluated, clips: Path, model_dir: Path, tmp_path: Path) -> None:
    """The same clips through `loupe.workflows.scoring.score`: the clip score with the model's aggregation (mean)
    and the face scores are the evaluation's, to float precision."""
    from loupe.workflows.scoring import ScoreOptions, score, units_path

    result, _ = evaluated
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("004.mp4", "519_515.mp4"):
        shutil.copy(clips / name, folder / name)
    out = tmp_path / "preds.parquet"
    score(ScoreOptions(domain="forensics", input=folder, model=f"local-dir:{model_dir}", out=out, track=False,
                       num_workers=0))  # fmt: skip
    table = pd.read_parquet(out).set_index("path")
    units = pd.read_parquet(units_path(out))
    mine = pd.DataFrame(result["clips"]).set_index("path")
    faces = pd.read_csv(Path(result["out"]) / "face_scores.csv")
    for name in ("004.mp4", "519_515.mp4"):
        assert mine.loc[name, "score_mean"] == pytest.approx(table.loc[name, "score_Fake"], abs=1e-6)
        theirs = units[(units.path == name) & (units.status == "ok")].sort_values("unit").score_Fake.to_numpy()
        np.testing.assert_allclose(faces[faces.path == name].score.to_numpy(), theirs, atol=1e-6)


@pytest.mark.realdata
def test_video_metrics_by_hand_and_logged(evaluated) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    result, tracker = evaluated
    c = pd.DataFrame(result["clips"])
    ok = c[c.status == "ok"]
    m = result["metrics"]
    faces = pd.read_csv(Path(result["out"]) / "face_scores.csv")
    for agg, key in (("mean", "mean"), ("max", "max"), ("topk:2", "topk2")):
        per_clip = faces.groupby("path").score.agg(
            {"mean": "mean", "max": "max", "topk:2": lambda s: s.nlargest(2).mean()}[agg]
        )
        np.testing.assert_allclose(ok.set_index("path")[f"score_{agg}"].sort_index(), per_clip.sort_index())
        assert m[f"video_{key}_auroc"] == pytest.approx(roc_auc_score(ok.Fake, ok[f"score_{agg}"]))
        assert m[f"video_{key}_ap"] == pytest.approx(average_precision_score(ok.Fake, ok[f"score_{agg}"]))
        assert m[f"video_{key}_ci_low"] <= m[f"video_{key}_auroc"] <= m[f"video_{key}_ci_high"]
        decided = (ok[f"score_{agg}"] >= 0.45) == (ok.Fake == 1)  # the model's stored threshold
        assert m[f"video_{key}_accuracy"] == pytest.approx(decided.mean())
    assert m["face_auroc"] == pytest.approx(roc_auc_score(faces.Fake, faces.score))
    assert m["n_faces"] == len(faces) >= 4 * FRAMES
    assert {"video_mean_deepfakes_auroc", "video_mean_neuraltextures_auroc"} <= set(m)
    (run,) = tracker.runs
    assert run.params["recipe"] == "forensics.video_eval" and run.tags["small_sample"] == "true"
    assert run.metrics["video_mean_auroc"] == [(None, m["video_mean_auroc"])]
    assert {"video/clip_scores.csv", "video/face_scores.csv", "video/video_metrics.csv"} <= set(run.artifacts)
