"""Inference modes: parsing, refusals where the machine lacks them, outputs against fp32, ``auto`` and its cache,
and the scoring path (``loupe score --mode``) with Grad-CAM on the full-token model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loupe.core.errors import ConfigError
from loupe.core.models import WeightSpec, build_model, save_model, vit_classifier
from loupe.core.models import auto_mode as am
from loupe.core.models import inference as inf
from loupe.core.models.auto_mode import (
    Trial,
    auto_mode,
    choose_mode,
    interleaved_times,
    load_validation_set,
    save_validation_set,
)
from loupe.core.models.inference import InferenceMode, InferenceModel, full_token_model, mode_problems, with_mode
from loupe.core.models.tome import ToMeConfig

NANO = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32)
HAS_BF16 = bool(inf.cpu_flags() & {"avx512_bf16", "amx_bf16"})


def nano(**kw: object):
    return vit_classifier("timm:vit_tiny_patch16_224", num_outputs=2, **{**NANO, **kw}).eval()


def spec(**changes: object) -> WeightSpec:
    base = WeightSpec(name="m", architecture="vit_micro_patch8", input_size=(3, 32, 32), label_names=("a", "b"),
                      thresholds={"a": 0.5, "b": 0.5})  # fmt: skip
    return base.replace(**changes)


@pytest.mark.parametrize(("text", "mode"), [
    ("fp32", InferenceMode()),
    ("int8", InferenceMode("int8")),
    ("bf16+compile+tome8", InferenceMode("bf16", True, ToMeConfig(r=8))),
    ("tome4d+int8", InferenceMode("int8", False, ToMeConfig(r=4, schedule="decreasing"))),
])  # fmt: skip
def test_modes_parse_and_print_canonically(text: str, mode: InferenceMode) -> None:
    assert InferenceMode.parse(text) == mode
    assert InferenceMode.parse(str(mode)) == mode


@pytest.mark.parametrize(("text", "message"), [
    ("bf16+int8", "names two precisions"),
    ("fp16", "'fp16' is unknown"),
    ("int8+tome", "stores no inference.tome_r"),
    ("", "is empty"),
])  # fmt: skip
def test_bad_modes_say_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        InferenceMode.parse(text)


def test_tome_alone_takes_the_r_the_model_was_fine_tuned_with() -> None:
    assert InferenceMode.parse("int8+tome", spec(inference={"tome_r": 6})).tome == ToMeConfig(r=6)


def test_bf16_is_refused_on_a_cpu_without_bf16_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inf, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    problems = mode_problems(InferenceMode("bf16"), "cpu")
    assert len(problems) == 1 and "no native bf16" in problems[0] and "emulated" in problems[0]
    with pytest.raises(ConfigError, match="no native bf16"):
        InferenceModel(nano(), InferenceMode("bf16"))


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no avx512_bf16 / amx_bf16")
def test_bf16_runs_where_the_cpu_has_it() -> None:
    assert mode_problems(InferenceMode("bf16"), "cpu") == []


def test_compile_is_refused_clearly_when_inductor_cannot_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a, **_k):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error")

    monkeypatch.setattr(torch, "compile", broken)
    problem = inf.compile_problem.__wrapped__("cpu")
    assert problem is not None and "C++ compiler" in problem and "RuntimeError" in problem


def test_int8_runs_on_the_cpu_only() -> None:
    assert mode_problems(InferenceMode("int8"), "cpu") == []
    assert "CPU only" in mode_problems(InferenceMode("int8"), "cuda")[0]


@pytest.mark.parametrize(("text", "atol"), [("int8", 0.05), ("fp32+tome0", 1e-5)]
                         + ([("bf16", 0.05)] if HAS_BF16 else []))  # fmt: skip
def test_modes_stay_close_to_fp32_and_leave_the_model_as_it_was(text: str, atol: float) -> None:
    model, x = nano(), torch.randn(3, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        wrapped = with_mode(model, text)
        out = wrapped.forward_outputs(x)
    assert out["logits"].dtype == torch.float32 and out["embedding"].shape == (3, 32)
    torch.testing.assert_close(out["logits"], ref, atol=atol, rtol=0)
    assert full_token_model(wrapped) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.head) is torch.nn.Linear  # int8 quantized a copy, not the model


def test_a_mask_model_refuses_token_merging_but_takes_other_modes() -> None:
    model = vit_classifier("timm:vit_tiny_patch16_224", num_outputs=2, head="mask", **NANO).eval()
    with pytest.raises(ConfigError, match="mask output"):
        with_mode(model, "int8+tome2")
    out = with_mode(model, "int8").forward_outputs(torch.randn(2, 3, 32, 32))
    assert out["mask_logits"].shape == (2, 1, 32, 32)


# --------------------------------------------------------------------------------------------------- the spec
@pytest.mark.parametrize(("inference", "message"), [
    ({"mode": "fp16"}, "inference.mode"),
    ({"tolerance": 0.5}, "inference.tolerance"),
    ({"tome_r": -2}, "inference.tome_r"),
    ({"speed": 1}, "inference.speed is unknown"),
])  # fmt: skip
def test_the_spec_validates_its_inference_field(inference: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        spec(inference=inference)


def test_a_mode_other_than_fp32_is_part_of_the_preprocessing_hash() -> None:
    plain = spec().preprocessing_hash()
    assert spec(inference={"mode": "fp32"}).preprocessing_hash() == plain  # earlier rows keep their hash
    assert spec(inference={"tolerance": 0.01}).preprocessing_hash() == plain
    hashes = {spec(inference={"mode": m}).preprocessing_hash() for m in ("int8", "int8+tome4", "bf16")}
    assert len(hashes) == 3 and plain not in hashes
    s = spec(inference={"mode": "int8+tome", "tome_r": [2, 2, 2, 2]})
    assert WeightSpec.from_dict(json.loads(json.dumps(s.to_dict()))).preprocessing_hash() == s.preprocessing_hash()


# ------------------------------------------------------------------------------------------------------ auto
def test_auto_keeps_fp32_when_nothing_is_both_accurate_and_faster() -> None:
    trials = {"fp32": Trial("fp32", speedup=1.0, accurate=True), "int8": Trial("int8", speedup=3.0, accurate=False),
              "bf16": Trial("bf16", speedup=1.05, accurate=True)}  # fmt: skip
    assert am._best(trials, min_speedup=1.1) == "fp32"
    trials["fp32+tome4"] = Trial("fp32+tome4", speedup=1.4, accurate=True)
    assert am._best(trials, min_speedup=1.1) == "fp32+tome4"


@pytest.fixture
def one_thread():
    """One torch thread: on a machine shared with other jobs, two spinning OpenMP threads make single timings swing
    several-fold, one thread keeps the comparison of modes stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_auto_never_picks_a_mode_slower_than_fp32_on_this_machine(one_thread) -> None:
    torch.manual_seed(0)
    model = vit_classifier("timm:vit_tiny_patch16_224", num_outputs=2, img_size=64).eval()
    s = spec(input_size=(3, 64, 64))
    images = torch.randn(16, 3, 64, 64)
    # tolerance 1: accuracy is not what this test checks, so every mode competes on speed
    choice = choose_mode(model, s, images, tolerance=1.0, try_compile=False, batch_size=8, repeats=3, min_seconds=0.1)
    by_mode = {t.mode: t for t in choice.trials}
    assert by_mode["fp32"].speedup == 1.0 and len(by_mode) == 9
    assert by_mode[choice.mode].speedup == max(t.speedup for t in by_mode.values())
    assert choice.mode == "fp32" or by_mode[choice.mode].speedup >= 1.1
    # measured again, independently, interleaved with fp32: the pick is not slower
    picked = with_mode(model, choice.mode).eval()
    batch = images[:8]
    times = interleaved_times({"fp32": lambda: model(batch), "picked": lambda: picked(batch)}, 5, 0.2)
    assert times["picked"] <= times["fp32"] or picked is model


def test_auto_rejects_a_mode_whose_auroc_drop_exceeds_the_tolerance() -> None:
    model = nano()
    images = torch.randn(24, 3, 32, 32)
    with torch.no_grad():
        scores = model(images).sigmoid()
    labels = (scores > scores.median(0).values).float()  # fp32 ranks these perfectly: AUROC 1
    choice = choose_mode(model, spec(), images, labels, tolerance=0.0, try_compile=False, repeats=1, min_seconds=0.01,
                         candidates=[InferenceMode("fp32", False, ToMeConfig(r=6))])  # fmt: skip
    merged = next(t for t in choice.trials if t.mode == "fp32+tome6")
    assert merged.auroc_drop is not None and merged.auroc_drop > 0 and not merged.accurate
    assert choice.mode == "fp32"


def test_auto_measures_once_per_weights_and_caches_the_choice(tmp_path: Path) -> None:
    model, s = nano(), spec()
    calls = []

    def inputs():
        calls.append(1)
        return torch.randn(8, 3, 32, 32), None, "random test inputs"

    kw = dict(cache=tmp_path / "modes.json", try_compile=False, repeats=1, min_seconds=0.01,
              candidates=[InferenceMode("int8")])  # fmt: skip
    first = auto_mode(model, s, inputs, weights_sha256="a" * 64, **kw)
    again = auto_mode(model, s, inputs, weights_sha256="a" * 64, **kw)
    assert len(calls) == 1 and again.cached and not first.cached and again.mode == first.mode
    assert {t.mode for t in again.trials} == {"fp32", "int8"}
    auto_mode(model, s, inputs, weights_sha256="b" * 64, **kw)  # other weights: measured again
    assert len(calls) == 2 and len(json.loads((tmp_path / "modes.json").read_text())) == 2


def test_a_model_folder_stores_its_validation_set(tmp_path: Path) -> None:
    s = spec()
    images, labels = torch.randn(5, 3, 32, 32), torch.tensor([[1.0, 0.0]] * 5)
    save_validation_set(tmp_path, images, labels)
    got = load_validation_set(tmp_path, s)
    assert got is not None and torch.equal(got[0], images) and torch.equal(got[1], labels)
    with pytest.raises(ConfigError, match=r"'images' must be model inputs \[N, 1, 32, 32\]"):
        load_validation_set(tmp_path, s.replace(input_size=(1, 32, 32), mean=(0.5,), std=(0.25,)))
    assert load_validation_set(tmp_path / "none", s) is None


# ------------------------------------------------------------------------------------------- the scoring path
def _score(tmp_path: Path, model_dir: Path, inputs: Path, name: str, *extra: str):
    from loupe.workflows.cli import app

    out = tmp_path / f"{name}.parquet"
    res = CliRunner().invoke(app, ["score", "cxr", "--input", str(inputs), "--model", f"local-dir:{model_dir}",
                                   "--out", str(out), "--no-track", "--num-workers", "0", *extra])  # fmt: skip
    return res, out


@pytest.fixture
def scoring_setup(tmp_path: Path) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    s = WeightSpec(name="tiny", architecture="vit_micro_patch8", input_size=(1, 32, 32), mean=(0.5,), std=(0.25,),
                   label_names=("Effusion", "Pneumonia"), domain="cxr")  # fmt: skip
    torch.manual_seed(0)
    model, _ = build_model(s)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    folder = save_model(model.eval(), s, tmp_path / "model")
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(inputs / f"{i}.png")
    return folder, inputs


def test_score_runs_in_the_requested_mode_and_hashes_it(tmp_path: Path, scoring_setup) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from loupe.core.io import read_any
    from loupe.core.models import load_model_dir
    from loupe.core.transforms import ModelInput

    folder, inputs = scoring_setup
    res_plain, plain = _score(tmp_path, folder, inputs, "plain")
    res_int8, int8 = _score(tmp_path, folder, inputs, "int8", "--mode", "int8")
    res_fast, fast = _score(tmp_path, folder, inputs, "fast", "--mode", "int8+tome2", "--explain")
    assert {r.exit_code for r in (res_plain, res_int8, res_fast)} == {0}, res_plain.output + res_fast.output
    a, q, b = (pq.read_table(p).to_pandas().sort_values("path") for p in (plain, int8, fast))
    assert set(a["status"]) == set(q["status"]) == set(b["status"]) == {"ok"}
    assert a["preprocessing_hash"].iloc[0] == WeightSpec.load(folder / "weight_spec.json").preprocessing_hash()
    assert len({t["preprocessing_hash"].iloc[0] for t in (a, q, b)}) == 3
    # the int8 table holds exactly what the int8 model gives on the same inputs, not the fp32 scores
    model, spec_ = load_model_dir(folder)
    prep = ModelInput(spec_)
    x = torch.stack([prep(read_any(inputs / Path(p).name).array) for p in q["path"]])
    with torch.no_grad():
        direct = with_mode(model, "int8")(x).sigmoid()[:, 0].double().numpy()
    np.testing.assert_allclose(q["score_Effusion"].to_numpy(), direct, atol=1e-5)
    assert abs(a["score_Effusion"].to_numpy() - direct).max() > 1e-4
    maps = list((tmp_path / "fast.parquet.artifacts").rglob("*.png"))
    assert maps, "Grad-CAM ran on the full-token model and stored its maps"


def test_score_refuses_bf16_without_bf16_instructions(tmp_path: Path, scoring_setup, monkeypatch) -> None:
    monkeypatch.setattr(inf, "cpu_flags", lambda: frozenset({"avx2"}))
    folder, inputs = scoring_setup
    res, _ = _score(tmp_path, folder, inputs, "bf16", "--mode", "bf16")
    assert res.exit_code == 2 and "no native bf16" in res.output


def test_score_mode_auto_measures_once_caches_and_records_its_pick(tmp_path: Path, scoring_setup, monkeypatch) -> None:
    import pyarrow.parquet as pq

    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(inf, "compile_problem", lambda _device="cpu": "compile skipped in this test")
    folder, inputs = scoring_setup
    save_validation_set(folder, torch.randn(12, 1, 32, 32), torch.randint(0, 2, (12, 2)).float())
    res, out = _score(tmp_path, folder, inputs, "auto", "--mode", "auto")
    assert res.exit_code == 0, res.output
    cache = json.loads((tmp_path / "home" / "cache" / "inference_modes.json").read_text())
    (entry,) = cache.values()
    assert "validation.safetensors" in entry["evidence"] and entry["model"] == "tiny"
    picked = entry["mode"]
    table = pq.read_table(out).to_pandas()
    s = WeightSpec.load(folder / "weight_spec.json")
    expected = s.replace(inference={"mode": picked} if picked != "fp32" else {}).preprocessing_hash()
    assert set(table["preprocessing_hash"]) == {expected}

    def measured_again(*_a, **_k):
        raise AssertionError("auto measured again although this machine's choice is cached")

    monkeypatch.setattr(am, "choose_mode", measured_again)
    again, out2 = _score(tmp_path, folder, inputs, "auto2", "--mode", "auto")
    assert again.exit_code == 0, again.output
    assert set(pq.read_table(out2).to_pandas()["preprocessing_hash"]) == {expected}
