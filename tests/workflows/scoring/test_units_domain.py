"""The scoring contracts on a domain the test suite defines (tests/plugins/loupe_testunits.py): many units per file,
a failing unit, a failing file, a mask output, the unit table, resume after SIGKILL, the Ray backend, review cases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
sys.path.insert(0, str(PLUGINS))
import loupe_testunits as tu  # noqa: E402 - the plugin lives beside the tests, not in the package

from loupe.core.io.maps import load_map  # noqa: E402
from loupe.core.models import build_model, load_model_dir, save_model  # noqa: E402
from loupe.core.transforms import ModelInput  # noqa: E402
from loupe.workflows.scoring import RayOptions, ScoreOptions, score, units_path  # noqa: E402


@pytest.fixture(scope="module")
def mask_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    spec = tu.mask_spec()
    model, _ = build_model(spec)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.mask_head.proj.weight, std=0.5)
    return save_model(model.eval(), spec, tmp_path_factory.mktemp("m") / "mask")


def _inputs(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = "img_badtile.png" if i == 2 else f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (64, 96), dtype=np.uint8)).save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return root


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(PLUGINS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "LOUPE_PLUGINS": "loupe_testunits", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _load(path: Path, keys: list[str]) -> pd.DataFrame:
    return pd.read_parquet(path).sort_values(keys).reset_index(drop=True)


def test_tiles_are_units_aggregated_by_max_with_a_stitched_mask(tmp_path: Path, mask_model: Path) -> None:
    root = _inputs(tmp_path / "in")
    out = tmp_path / "p.parquet"
    s = score(ScoreOptions(domain=tu.NAME, input=root, model=f"local-dir:{mask_model}", out=out, track=False,
                           batch_size=3, num_workers=1))  # fmt: skip
    files, units = pd.read_parquet(out).set_index("path"), pd.read_parquet(units_path(out))
    assert (s.rows_ok, s.rows_failed, s.units_ok, s.units_failed) == (6, 1, 23, 1)
    assert files.loc["broken.png", "status"].startswith("failed: ") and files.loc["broken.png", "n_units"] == 0
    assert not (units.path == "broken.png").any()  # a failed file has no unit rows
    assert files.loc["img_badtile.png", "status"] == "ok" and files.loc["img_badtile.png", "n_units_failed"] == 1
    bad = units.set_index(["path", "unit"]).loc[("img_badtile.png", 1)]
    assert bad.status == "failed: tile 1 cannot be read (planted by the test)" and np.isnan(bad.score_Lesion)

    # the file score is the max over its ok tiles, and the tiles' scores are the model's on exactly those pixels
    model, spec = load_model_dir(mask_model)
    one = units[units.path == "img_000.png"].sort_values("unit")
    assert list(zip(one.x, one.y, one.width, one.height, strict=True)) == [
        (0, 0, 48, 32),
        (48, 0, 48, 32),
        (0, 32, 48, 32),
        (48, 32, 48, 32),
    ]
    pixels = np.asarray(Image.open(root / "img_000.png"))
    tiles = torch.stack([ModelInput(spec)(pixels[y : y + h, x : x + w])
                         for x, y, w, h in zip(one.x, one.y, one.width, one.height, strict=True)])  # fmt: skip
    with torch.inference_mode():
        out_model = model.forward_outputs(tiles)
    expected = torch.sigmoid(out_model["logits"]).double()
    torch.testing.assert_close(torch.tensor(one[["score_Lesion", "score_Artefact"]].to_numpy()), expected)
    row = files.loc["img_000.png"]
    assert row.score_Lesion == pytest.approx(one.score_Lesion.max()) and row.aggregation == "max"
    assert dict(row.scores) == {"Lesion": row.score_Lesion, "Artefact": row.score_Artefact}
    assert row.decision_Lesion == (row.score_Lesion >= 0.4)  # file threshold
    assert (one.decision_Lesion == (one.score_Lesion >= 0.6)).all()  # unit threshold
    assert json.loads(row.meta)["tiles"] == 4 and json.loads(row.frame) == {"width": 96, "height": 64}

    # the mask is stored as data in the file's frame: tile 3's model mask sits in the tile's region
    (mask_ref,) = [a for a in json.loads(row.artifacts) if a["kind"] == "mask"]
    assert mask_ref["frame"] == {"space": "file", "width": 96, "height": 64, "scale": 1.0}
    mask = load_map(tmp_path / mask_ref["path"])
    assert mask.shape == (64, 96)
    tile3 = torch.nn.functional.interpolate(torch.sigmoid(out_model["mask_logits"][3:4]), size=(32, 48),
                                            mode="bilinear", antialias=True)[0, 0].numpy()  # fmt: skip
    np.testing.assert_allclose(mask[32:64, 48:96], tile3, atol=2e-4)
    assert "img_000" not in mask_ref["path"]  # artifact names carry the content identity, not the file name


def test_review_case_of_a_tiled_file(tmp_path: Path, mask_model: Path) -> None:
    from loupe.workflows.review import review_cases

    root = _inputs(tmp_path / "in", n=3)
    out = tmp_path / "p.parquet"
    score(ScoreOptions(domain=tu.NAME, input=root, model=f"local-dir:{mask_model}", out=out, track=False,
                       num_workers=0))  # fmt: skip
    cases = {c.path: c for c in review_cases(out)}
    case = cases["img_000.png"]
    assert case.layers[0].source == str(root / "img_000.png") and case.layers[0].frame["width"] == 96
    kinds = [o.kind for o in case.overlays]
    assert kinds[0] == "mask" and Path(case.overlays[0].path).is_file() and "grid" in kinds
    grid = next(o for o in case.overlays if o.kind == "grid")
    assert len(grid.cells) == 4 and {tuple(c["region"]) for c in grid.cells} >= {(48, 32, 48, 32)}
    lesion = next(f for f in case.findings if f.label == "Lesion")
    assert lesion.threshold == 0.4 and lesion.decision == (lesion.score >= 0.4)
    assert case.metadata["tiles"] == 4 and "pipeline" not in case.metadata
    assert case.model["aggregation"] == "max" and case.case_id.startswith("sha256:")
    assert cases["broken.png"].findings == () and cases["broken.png"].status.startswith("failed")
    from loupe.core.review import ReviewCase

    assert ReviewCase.from_dict(json.loads(json.dumps(case.to_dict()))) == case  # plain data, round trip


def _cmd(root: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loupe.workflows.cli", "score", tu.NAME, "--input", str(root), "--model",
            f"local-dir:{model}", "--out", str(out), "--no-track", "--batch-size", "4", "--num-workers", "1",
            *extra]  # fmt: skip


@pytest.mark.slow  # file + unit tables after SIGKILL: also tests/domains/pathology/test_slide_scoring.py on real slides
def test_sigkill_then_resume_gives_the_uninterrupted_file_and_unit_tables(
    tmp_path: Path, mask_model: Path, same_table
) -> None:
    root = _inputs(tmp_path / "in", n=80)
    full = tmp_path / "full.parquet"
    done = subprocess.run(_cmd(root, mask_model, full), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]

    out = tmp_path / "killed.parquet"
    parts = out.with_name(out.name + ".parts")
    proc = subprocess.Popen(_cmd(root, mask_model, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while len(list(parts.glob("part-*.parquet"))) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed half-way"
    committed = pd.concat([pd.read_parquet(p) for p in parts.glob("part-*.parquet")])
    assert 0 < len(committed) < 81 and not out.exists()

    resumed = subprocess.run(_cmd(root, mask_model, out, "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 1, resumed.stderr[-2000:]
    assert f"{(committed.status == 'ok').sum()} already scored" in resumed.stdout
    for got, ref, keys in ((out, full, ["path"]), (units_path(out), units_path(full), ["path", "unit"])):
        a, b = _load(got, keys), _load(ref, keys)
        assert len(a) == len(b) and not a.duplicated(keys).any()
        same_table(a, b, atol=1e-6, skip=("artifacts",))
    assert len(_load(units_path(out), ["path"])) == 80 * 4


@pytest.mark.slow  # unit tables through Ray: also tests/domains/pathology/test_slide_scoring.py on real slides
def test_ray_backend_writes_the_same_file_and_unit_tables(tmp_path: Path, mask_model: Path, same_table) -> None:
    ray = pytest.importorskip("ray")
    root = _inputs(tmp_path / "in", n=6)
    common = dict(domain=tu.NAME, input=root, model=f"local-dir:{mask_model}", track=False, batch_size=2)
    score(ScoreOptions(out=tmp_path / "local.parquet", num_workers=0, **common))
    env = _env()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: env[k] for k in ("LOUPE_PLUGINS", "PYTHONPATH")}})  # fmt: skip
    try:
        s = score(ScoreOptions(out=tmp_path / "ray.parquet", backend="ray", ray=RayOptions(actors=2), **common))
    finally:
        ray.shutdown()
    me = f"{os.uname().nodename}:{os.getpid()}"
    assert s.workers and me not in s.workers and sum(s.workers.values()) == 7  # Ray actors did the work
    for name, keys in (("{}.parquet", ["path"]), ("{}.units.parquet", ["path", "unit"])):
        a, b = _load(tmp_path / name.format("local"), keys), _load(tmp_path / name.format("ray"), keys)
        for df, tag in ((a, "local"), (b, "ray")):
            df["artifacts"] = df["artifacts"].str.replace(f"{tag}.parquet", "T")
        same_table(a, b, atol=1e-6)
    stored = sorted(p.name for p in (tmp_path / "ray.parquet.artifacts").iterdir())
    assert stored == sorted(p.name for p in (tmp_path / "local.parquet.artifacts").iterdir())
    assert sum(n.endswith("-mask.png") for n in stored) == 6 and sum("-heatmap-" in n for n in stored) == 6


def test_attention_mil_aggregation_scores_the_file_from_all_its_units(tmp_path: Path) -> None:
    """``aggregation: attention``: the file's score is the model's MIL head over its ok units' embeddings."""
    torch.manual_seed(1)
    spec = tu.mask_spec(name="tiles-mil", outputs=("scores", "attention"), aggregation="attention",
                        model_kwargs={"head": "mil", "mil_hidden": 16})  # fmt: skip
    model, _ = build_model(spec)
    folder = save_model(model.eval(), spec, tmp_path / "mil")
    root = _inputs(tmp_path / "in", n=3)
    out = tmp_path / "p.parquet"
    score(ScoreOptions(domain=tu.NAME, input=root, model=f"local-dir:{folder}", out=out, track=False, num_workers=0))
    files, units = pd.read_parquet(out).set_index("path"), pd.read_parquet(units_path(out))
    model, spec = load_model_dir(folder)
    for name in ("img_000.png", "img_badtile.png"):
        mine = units[(units.path == name) & (units.status == "ok")].sort_values("unit")
        assert mine.attention.sum() == pytest.approx(1.0) and (mine.attention > 0).all()
        pixels = np.asarray(Image.open(root / name))
        tiles = torch.stack([ModelInput(spec)(pixels[y : y + h, x : x + w])
                             for x, y, w, h in zip(mine.x, mine.y, mine.width, mine.height, strict=True)])  # fmt: skip
        with torch.inference_mode():
            bag = model.aggregate_units(model.forward_outputs(tiles)["embedding"])
        expected = torch.sigmoid(bag["logits"]).double().tolist()
        assert [files.loc[name, "score_Lesion"], files.loc[name, "score_Artefact"]] == pytest.approx(expected)
        assert mine.attention.tolist() == pytest.approx(bag["attention"].tolist())
    assert len(units[units.path == "img_badtile.png"].query("status == 'ok'")) == 3  # the failed tile is left out


def test_a_reader_that_dies_or_hangs_is_a_failed_row_and_the_batch_goes_on(
    tmp_path: Path, mask_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed by a signal half-way through a file's tiles (a decoder crash) and one stuck in a loop (past
    the read deadline): each file is a failed row naming why, every other file is scored once, with all its tiles."""
    from loupe.workflows.scoring import backends

    monkeypatch.setattr(backends, "READ_SECONDS", 3.0)
    root = _inputs(tmp_path / "in", n=12)
    rng = np.random.default_rng(2)
    for name in ("img_005_segfault.png", "img_009_spin.png"):
        Image.fromarray(rng.integers(0, 255, (64, 96), dtype=np.uint8)).save(root / name)
    out = tmp_path / "p.parquet"
    t0 = time.monotonic()
    s = score(ScoreOptions(domain=tu.NAME, input=root, model=f"local-dir:{mask_model}", out=out, track=False,
                           batch_size=3, num_workers=2))  # fmt: skip
    assert time.monotonic() - t0 < 60
    files, units = pd.read_parquet(out).set_index("path"), pd.read_parquet(units_path(out))
    assert len(files) == 15 and not files.index.duplicated().any()
    crash = files.loc["img_005_segfault.png", "status"]
    assert "reader died while reading this file (killed by signal SIGSEGV" in crash, crash
    assert "reading took longer than 3 s" in files.loc["img_009_spin.png", "status"]
    assert (s.rows_ok, s.rows_failed) == (12, 3)  # 12 good images; broken.png, the crash, the loop
    ok = files[files.status == "ok"].index
    assert not units.duplicated(["path", "unit"]).any()  # files half-read when the worker died are not doubled
    assert units[units.path.isin(ok)].groupby("path").size().eq(4).all() and units.path.isin(ok).sum() == 48
