"""``loupe bench speed --onnx``: the ONNX Runtime section on the quick options (tiny ViT, 64 px, one thread)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from loupe.workflows.bench_onnx import onnx_section
from loupe.workflows.bench_speed import SpeedOptions

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                               reason="onnxruntime not installed: pip install -e '.[onnx]'")  # fmt: skip


@pytest.fixture(scope="module")
def section() -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the quick speed test: seconds, whatever else the machine runs
    try:
        return onnx_section(SpeedOptions.quick_options())
    finally:
        torch.set_num_threads(before)


@needs_ort
def test_the_exported_model_runs_and_agrees_with_timm(section: dict) -> None:
    (arch,) = section["models"]
    assert arch["arch"] == "vit_tiny_patch16_224" and arch["img_size"] == 64 and arch["batch_size"] == 4
    assert arch["exporter"] in ("dynamo", "torchscript") and "error" not in arch and "ort_int8_error" not in arch
    rows = arch["runtimes"]
    assert set(rows) == {"timm_fp32", "suite_int8", "ort_fp32", "ort_int8"}
    assert rows["ort_fp32"]["max_abs_diff_vs_timm"] < 1e-3
    assert rows["ort_int8"]["cosine_vs_timm"] > 0.99 and rows["suite_int8"]["cosine_vs_timm"] > 0.99


@needs_ort
def test_ratios_are_consistent_with_the_img_s(section: dict) -> None:
    rows = section["models"][0]["runtimes"]
    assert section["threads"] == 1 and len(section["load_average_after"]) == 3
    for row in rows.values():
        assert row["img_s"] > 0
        assert row["ratio_vs_timm_fp32"] == pytest.approx(row["img_s"] / rows["timm_fp32"]["img_s"])
        assert row["ratio_vs_suite_int8"] == pytest.approx(row["img_s"] / rows["suite_int8"]["img_s"])
    assert rows["timm_fp32"]["ratio_vs_timm_fp32"] == pytest.approx(1.0)


def test_without_onnxruntime_the_section_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes ``import onnxruntime`` raise ImportError
    assert onnx_section(SpeedOptions.quick_options()) == {"note": "onnxruntime not installed: pip install -e '.[onnx]'"}
