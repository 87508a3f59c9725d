"""``loupe bench speed --quick``: every section present and its ratios consistent (real figures: full runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from loupe.core.models import WeightSpec, build_model, save_model
from loupe.core.registry import discover_domains
from loupe.workflows import bench_speed
from loupe.workflows.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One quick run, with a section registered through the hook the input-pipeline benchmark uses."""
    bench_speed.register_section("probe", lambda opts: {"batch_size": opts.batch_size})
    try:
        res = runner.invoke(app, ["bench", "speed", "--quick", "--threads", "1", "--json"])
    finally:
        bench_speed.EXTRA_SECTIONS.pop("probe")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_the_machine_and_its_gemm_peak_are_reported(quick: dict) -> None:
    m, g = quick["machine"], quick["gemm"]
    assert m["cores"] >= 1 and m["torch"] and isinstance(m["instruction_sets"], list) and m["torch_threads"] == 1
    assert g["fp32_gflops"] > 0 and g["bf16_gflops"] > 0 and g["int8_gflops"] > 0
    assert g["bf16_native"] == ("avx512_bf16" in m["instruction_sets"] or "amx_bf16" in m["instruction_sets"])


def test_every_mode_is_measured_against_plain_timm_in_the_same_run(quick: dict) -> None:
    (arch,) = quick["models"]
    modes = arch["modes"]
    assert set(modes) == {"timm_fp32", *bench_speed.QUICK_MODES}
    base = modes["timm_fp32"]
    assert base["speedup_vs_timm"] == 1.0 and base["gflop_per_img"] > 0
    for name, r in modes.items():
        if r["note"].startswith("not available"):
            continue
        assert r["img_s"] > 0 and r["peak_rise_mib"] >= 0, name
        assert r["speedup_vs_timm"] == pytest.approx(r["img_s"] / base["img_s"])
        assert r["achieved_gflops"] == pytest.approx(r["gflop_per_img"] * r["img_s"])
        precision = "fp32" if name == "timm_fp32" else name.split("+")[0]
        assert r["fraction_of_peak"] == pytest.approx(r["achieved_gflops"] / arch["gemm_gflops"][precision])
    assert modes["fp32"]["gflop_per_img"] == pytest.approx(base["gflop_per_img"], rel=1e-3)  # the same model
    assert modes["fp32"]["max_logit_diff_vs_timm"] < 1e-4  # and the same weights


def test_token_merging_reports_its_speed_up_against_its_flop_cut(quick: dict) -> None:
    (arch,) = quick["models"]
    rows = {r["mode"]: r for r in arch["tome"]}
    assert "fp32+tome2" in rows and rows["fp32+tome2"]["versus"] == "fp32"
    r, m = rows["fp32+tome2"], arch["modes"]
    assert r["flop_cut"] == pytest.approx(m["fp32"]["gflop_per_img"] / m["fp32+tome2"]["gflop_per_img"])
    assert r["flop_cut"] > 1.2
    assert r["speedup_over_flop_cut"] == pytest.approx(r["speedup"] / r["flop_cut"])


def test_mae_steps_are_compared_with_their_flop_prediction(quick: dict) -> None:
    mae = quick["mae"]
    assert mae["mask_ratio"] == 0.9 and set(mae["decoders"]) == set(bench_speed.MAE_DECODERS)
    paper, light = mae["decoders"]["paper_512x8"], mae["decoders"]["light_128x2"]
    assert paper["flop_predicted_ratio"] > light["flop_predicted_ratio"] > 0  # a heavier decoder costs more
    for d in (paper, light):
        assert d["measured_over_predicted"] == pytest.approx(d["measured_step_ratio"] / d["flop_predicted_ratio"])


def test_registered_sections_run_and_no_accuracy_without_a_model(quick: dict) -> None:
    assert quick["extra"] == {"probe": {"batch_size": 4}}
    assert "accuracy" not in quick
    assert all(v["mode"] is None for v in quick["fastest_accurate"].values())


@pytest.mark.realdata
def test_accuracy_cost_of_each_mode_on_a_real_evaluation_set(tmp_path: Path, shared_data: Path) -> None:
    root = shared_data / "pathology" / "tcga_luadlusc"
    frame = pd.read_csv(root / "labels.csv")
    frame = frame[frame["split"] == "test"].groupby("label").head(12)  # 12 LUAD + 12 LUSC patches
    manifest = pd.DataFrame({"path": [str(root / p) for p in frame["path"]],
                             "split": "test", "LUAD": (frame["label"] == "LUAD").astype(int),
                             "LUSC": (frame["label"] == "LUSC").astype(int)})  # fmt: skip
    manifest.to_csv(tmp_path / "eval.csv", index=False)
    # an architecture a domain registers (the benchmark must find it, as `loupe score` does)
    spec = WeightSpec(name="tiny-tcga", architecture="path_vit_micro_patch8", task="multiclass",
                      input_size=(3, 32, 32), label_names=("LUAD", "LUSC"))  # fmt: skip
    discover_domains()
    folder = save_model(build_model(spec)[0].eval(), spec, tmp_path / "model")
    # a fresh process, as users run it: nothing has registered the domains' architectures yet
    res = subprocess.run([sys.executable, "-m", "loupe.workflows.cli", "bench", "speed", "--quick", "--threads", "1",
                          "--no-mae", "--json", "--model", f"local-dir:{folder}", "--eval-manifest",
                          str(tmp_path / "eval.csv"), "--tolerance", "0.1"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    got = json.loads(res.stdout)
    acc = got["accuracy"]
    assert acc["images"] == 24 and acc["modes"]["fp32"]["auroc_drop"] == 0.0
    for name, r in acc["modes"].items():
        if "auroc" in r:
            assert r["auroc_drop"] == pytest.approx(acc["modes"]["fp32"]["auroc"] - r["auroc"]), name
            assert 0.0 <= r["agreement"] <= 1.0
    best = got["fastest_accurate"]["vit_tiny_patch16_224"]
    assert best["mode"] is None or acc["modes"][best["mode"]]["auroc_drop"] <= 0.1


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "local-dir:/nowhere"], "needs both --model"),
    (["--model", "models:/x@champion", "--eval-manifest", "MANIFEST"], "write local-dir:/path"),
])  # fmt: skip
def test_bad_accuracy_options_are_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,x\na.png,1\n")
    args = [str(manifest) if a == "MANIFEST" else a for a in args]
    res = runner.invoke(app, ["bench", "speed", "--quick", "--no-mae", "--arch", "vit_tiny_patch16_224", *args])
    assert res.exit_code == 2 and message in res.output


def test_an_evaluation_manifest_without_the_model_s_labels_is_refused(tmp_path: Path) -> None:
    spec = WeightSpec(name="t", architecture="vit_micro_patch8", input_size=(3, 32, 32), label_names=("LUAD",))
    folder = save_model(build_model(spec)[0].eval(), spec, tmp_path / "model")
    (tmp_path / "m.csv").write_text("path,other\na.png,1\n")
    opts = bench_speed.SpeedOptions.quick_options(model=f"local-dir:{folder}", eval_manifest=tmp_path / "m.csv")
    with pytest.raises(Exception, match=r"lacks column\(s\) \['LUAD'\]"):
        bench_speed.accuracy_section(opts)


def test_io_adds_the_input_pipeline_section_and_a_failing_section_keeps_the_rest(monkeypatch) -> None:
    from loupe.workflows import bench_io

    calls = []
    monkeypatch.setattr(bench_io, "io_sections_in_child", lambda quick: calls.append(quick) or {"figures": 1})
    monkeypatch.setattr(bench_speed, "EXTRA_SECTIONS", {})
    args = ["bench", "speed", "--quick", "--threads", "1", "--no-mae", "--json", "--arch", "vit_tiny_patch16_224",
            "--mode", "fp32", "--io"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert calls == [True] and json.loads(res.stdout)["extra"]["input_pipeline"] == {"figures": 1}

    monkeypatch.setattr(bench_io, "io_sections_in_child", lambda quick: 1 / 0)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["extra"]["input_pipeline"] == {"error": "ZeroDivisionError: division by zero"} and got["models"]
