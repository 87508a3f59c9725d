"""The ``+ort`` inference modes: parsing and refusals, outputs against torch, the export cache, and ``auto``'s
candidates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loupe.core.errors import ConfigError
from loupe.core.models import WeightSpec, vit_classifier
from loupe.core.models import onnx_runtime as onx
from loupe.core.models.auto_mode import candidate_modes
from loupe.core.models.inference import InferenceMode, InferenceModel, mode_problems, with_mode
from loupe.core.models.tome import ToMeConfig

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="onnxscript (the dynamo ONNX exporter) not installed")

NANO = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32)


def nano(seed: int = 0):
    torch.manual_seed(seed)
    return vit_classifier("timm:vit_tiny_patch16_224", num_outputs=2, **NANO).eval()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throw-away data dir: the exported files go to ``<LOUPE_HOME>/cache/onnx``."""
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def outputs(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return model.forward_outputs(x)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize(("text", "mode", "canonical"), [
    ("int8+ort", InferenceMode("int8", ort=True), "int8+ort"),
    ("fp32+ort", InferenceMode("fp32", ort=True), "fp32+ort"),
    ("int8+ort+tome8", InferenceMode("int8", False, ToMeConfig(r=8), ort=True), "int8+ort+tome8"),
    ("tome8+ORT+int8", InferenceMode("int8", False, ToMeConfig(r=8), ort=True), "int8+ort+tome8"),
])  # fmt: skip
def test_ort_modes_parse_and_print_canonically(text: str, mode: InferenceMode, canonical: str) -> None:
    assert InferenceMode.parse(text) == mode
    assert str(mode) == canonical and InferenceMode.parse(canonical) == mode


@pytest.mark.parametrize("text", ["int8+tome8", "bf16+compile+tome8", "fp32", "int8+compile", "fp32+tome4d"])
def test_modes_without_ort_print_as_before(text: str) -> None:
    assert str(InferenceMode.parse(text)) == text
    assert not InferenceMode.parse(text).ort


@pytest.mark.parametrize(("text", "message"), [
    ("bf16+ort", r"ONNX Runtime \(\+ort\) runs fp32 or int8 only, not bf16"),
    ("int8+ort+compile", r"\+ort and \+compile exclude each other"),
])  # fmt: skip
def test_ort_refuses_bf16_and_compile(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        InferenceMode.parse(text)


def test_ort_is_refused_off_the_cpu_and_without_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    (problem,) = mode_problems(InferenceMode("fp32", ort=True), "cuda")
    assert "+ort runs ONNX Runtime's CPU session only" in problem
    monkeypatch.setattr(onx, "ort_problem", lambda: "onnxruntime is not importable; pip install -e '.[onnx]'")
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[onnx\]'"):
        InferenceModel(nano(), InferenceMode("int8", ort=True))


def test_fp32_ort_matches_torch_fp32_and_keeps_the_torch_model() -> None:
    model = nano()
    x = torch.randn(3, 3, 32, 32)
    ref = outputs(model, x)
    wrapped = with_mode(model, "fp32+ort")
    got = outputs(wrapped, x)
    assert set(got) == set(ref) == {"logits", "embedding"}
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-4)
    assert wrapped.base is model and wrapped.fast is model  # not quantized by torch: the torch path stays fp32


def test_int8_ort_stays_close_to_fp32() -> None:
    model = nano()
    x = torch.randn(4, 3, 32, 32)
    ref, got = outputs(model, x), outputs(with_mode(model, "int8+ort"), x)
    assert got["logits"].dtype == torch.float32 and got["logits"].shape == ref["logits"].shape
    assert cosine(got["embedding"], ref["embedding"]) > 0.99
    assert cosine(got["logits"], ref["logits"]) > 0.99


def test_int8_ort_with_merging_matches_the_torch_merged_model() -> None:
    model = nano()
    x = torch.randn(4, 3, 32, 32)
    merged = outputs(with_mode(model, "fp32+tome2"), x)
    got = outputs(with_mode(model, "int8+ort+tome2"), x)
    assert cosine(got["embedding"], merged["embedding"]) > 0.99
    assert (got["logits"] - merged["logits"]).abs().max() < 0.1 * merged["logits"].abs().max() + 0.05


def test_the_export_is_cached_per_weights_and_serves_every_batch_size(home: Path, monkeypatch) -> None:
    exports = []
    real = onx.export_onnx
    monkeypatch.setattr(onx, "export_onnx", lambda *a, **k: exports.append(1) or real(*a, **k))
    first = with_mode(nano(), "fp32+ort")
    a, b = outputs(first, torch.randn(3, 3, 32, 32)), outputs(first, torch.randn(1, 3, 32, 32))
    assert len(exports) == 1 and a["logits"].shape == (3, 2) and b["logits"].shape == (1, 2)
    (path,) = (home / "cache" / "onnx").iterdir()  # one self-contained file, no temporary or .data file left
    assert path.suffix == ".onnx"
    again = with_mode(nano(), "fp32+ort")  # a new model on the same weights: loaded, not exported
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(outputs(again, x)["logits"], outputs(nano(), x)["logits"], atol=1e-4, rtol=1e-4)
    assert len(exports) == 1


def test_auto_offers_int8_ort_only_where_onnxruntime_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    s = WeightSpec(name="m", architecture="vit_micro_patch8", input_size=(3, 32, 32), label_names=("a", "b"))
    modes, _ = candidate_modes(nano(), s, "cpu", ort=True)
    assert {"int8+ort", "int8+ort+tome4", "int8+ort+tome8"} <= {str(m) for m in modes}
    assert not any(m.ort for m in candidate_modes(nano(), s, "cpu")[0])  # off unless asked (auto_mode asks)
    monkeypatch.setattr(onx, "ort_problem", lambda: "onnxruntime is not importable; pip install -e '.[onnx]'")
    modes, skipped = candidate_modes(nano(), s, "cpu", ort=True)
    assert not any(m.ort for m in modes) and "pip install" in skipped["int8+ort"]


def test_a_cached_ort_choice_is_measured_again_once_onnxruntime_is_gone(tmp_path: Path, monkeypatch) -> None:
    from loupe.core.models.auto_mode import auto_mode

    s = WeightSpec(name="m", architecture="vit_micro_patch8", input_size=(3, 32, 32), label_names=("a", "b"))
    calls = []

    def inputs():
        calls.append(1)
        return torch.randn(8, 3, 32, 32), None, "random test inputs"

    kw = dict(weights_sha256="a" * 64, cache=tmp_path / "modes.json", try_compile=False, repeats=1, min_seconds=0.01,
              candidates=[InferenceMode("int8", ort=True)])  # fmt: skip
    auto_mode(nano(), s, inputs, **kw)
    auto_mode(nano(), s, inputs, **kw)
    assert len(calls) == 1
    monkeypatch.setattr(onx, "ort_problem", lambda: "onnxruntime is not importable; pip install -e '.[onnx]'")
    cache = json.loads((tmp_path / "modes.json").read_text())
    (entry,) = cache.values()
    entry["mode"] = "int8+ort"  # as if it had won
    (tmp_path / "modes.json").write_text(json.dumps(cache))
    assert auto_mode(nano(), s, inputs, **{**kw, "candidates": [InferenceMode("int8")]}).mode != "int8+ort"
    assert len(calls) == 2
