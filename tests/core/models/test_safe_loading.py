"""Safe model files: a crafted pickle never runs on any loading path; recorded SHA-256s are checked; ``file:X.pt``
loads X.pt.

The crafted checkpoint's ``__reduce__`` would create a marker file when unpickled; every test asserts the marker is
absent afterwards and that the refusal says how to convert the file to safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loupe.core.errors import LoupeError, TrackingError, WeightsMismatchError
from loupe.core.models import WeightSpec, build_model, load_model_dir, load_open_clip_text, save_model
from loupe.core.models.weights import load_state_dict


class _Payload:
    """Unpickling this calls os.system: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """(a checkpoint whose unpickling would touch a marker file, that marker)."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil" / "checkpoint.pth"
    path.parent.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


def _spec(source: str | None = None, layout: str = "loupe", arch: str = "test_vit_nano") -> WeightSpec:
    return WeightSpec(
        name="t", architecture=arch, source=source, layout=layout, input_size=(3, 32, 32), mean=(0.5,) * 3,
        std=(0.25,) * 3, label_names=("a", "b"), domain="cxr",
    )  # fmt: skip


def _refused(exc: BaseException, marker: Path) -> None:
    msg = str(exc)
    assert not marker.exists(), "the pickle's code ran"
    assert "refusing to load" in msg and "safetensors" in msg and "save_file" in msg, msg


def _model_folder_with(tmp_path: Path, evil_file: Path) -> Path:
    """A Loupe model folder whose only weights are the hostile checkpoint (a folder another tool wrote: no SHA-256
    recorded, so the checksum cannot catch it and the loader itself must refuse)."""
    model, _ = build_model(_spec())
    folder = save_model(model, _spec(), tmp_path / "folder")
    WeightSpec.load(folder / "weight_spec.json").replace(weights_sha256=None).save(folder / "weight_spec.json")
    (folder / "weights.safetensors").unlink()
    (folder / evil_file.name).write_bytes(evil_file.read_bytes())
    return folder


@pytest.mark.parametrize(
    "path_kind",
    ["load_state_dict", "timm_layout", "mae_layout", "open_clip_layout", "open_clip_text", "model_folder",
     "file_in_folder", "recipe_init"],
)  # fmt: skip
def test_a_crafted_pickle_is_refused_by_every_python_loading_path(
    evil: tuple[Path, Path], tmp_path: Path, path_kind: str
) -> None:
    path, marker = evil
    with pytest.raises(LoupeError) as err:
        if path_kind == "load_state_dict":
            load_state_dict(path)
        elif path_kind in ("timm_layout", "mae_layout"):
            build_model(_spec(f"file:{path}", path_kind.removesuffix("_layout")))
        elif path_kind == "open_clip_layout":
            build_model(
                _spec(f"file:{path}", "open_clip", arch="test_clip_nano").replace(task="embedding", label_names=())
            )
        elif path_kind == "open_clip_text":
            from loupe.core.registry import MODELS

            load_open_clip_text(MODELS.entry("test_clip_nano").meta["backbone"], f"file:{path}")
        elif path_kind == "model_folder":
            load_model_dir(_model_folder_with(tmp_path, path))
        elif path_kind == "file_in_folder":
            from loupe.workflows.scoring.model import resolve_model

            folder = save_model(build_model(_spec())[0], _spec(), tmp_path / "ok")
            (folder / "x.pt").write_bytes(path.read_bytes())
            resolve_model(f"file:{folder / 'x.pt'}", "cxr")
        else:
            from loupe.core.recipes import resolve_init
            from loupe.core.tracking import NullTracker

            build_model(_spec(resolve_init(f"file:{path}", NullTracker(), tmp_path), "timm"))
    _refused(err.value, marker)


def test_a_crafted_pickle_is_refused_by_weights_import(evil: tuple[Path, Path], tmp_path: Path, monkeypatch) -> None:
    from loupe.workflows.cli import app

    monkeypatch.setenv("LOUPE_HOME", str(tmp_path / "home"))
    path, marker = evil
    res = CliRunner().invoke(app, ["weights", "import", str(path), "--tag", "evil"])
    assert res.exit_code != 0 and not marker.exists()
    assert "refusing to load" in res.output and "safetensors" in res.output, res.output
    assert not list((tmp_path / "home").rglob("*.safetensors"))  # nothing was cached under the tag


def test_a_crafted_pickle_in_a_registered_model_is_refused(evil: tuple[Path, Path], tmp_path: Path) -> None:
    """A registered model whose artifact holds a pickle (a store written by another tool) is refused on scoring."""
    from loupe.core.tracking import MlflowTracker
    from loupe.workflows.scoring.model import resolve_model

    path, marker = evil
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracker.run("train", experiment="loupe-test") as run:
        run.log_model_dir(_model_folder_with(tmp_path, path))
    tracker.register_model("evil-model", run.run_id, alias="champion")
    with pytest.raises(LoupeError) as err:
        resolve_model("models:/evil-model@champion", "cxr", tracker)
    _refused(err.value, marker)


def test_a_weights_file_changed_after_saving_is_refused(tmp_path: Path) -> None:
    model, _ = build_model(_spec())
    folder = save_model(model, _spec(), tmp_path / "m")
    spec = WeightSpec.load(folder / "weight_spec.json")
    assert spec.weights_sha256 and len(spec.weights_sha256) == 64
    load_model_dir(folder)  # intact: loads
    data = bytearray((folder / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight: still a valid safetensors file
    (folder / "weights.safetensors").write_bytes(bytes(data))
    load_state_dict(folder / "weights.safetensors")  # readable ...
    with pytest.raises(WeightsMismatchError, match=r"weights.safetensors: SHA-256 .* differs from .* recorded"):
        load_model_dir(folder)  # ... but not the file that was saved


def test_registered_weights_are_checked_against_the_sha_recorded_at_registration(tmp_path: Path) -> None:
    """The store's artifact is replaced after registration (spec and weights together, consistent with each other):
    the version's tag, written at registration, still catches it."""
    from mlflow.tracking import MlflowClient

    from loupe.core.tracking import MlflowTracker

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(store)
    model, _ = build_model(_spec())
    with tracker.run("train", experiment="loupe-test") as run:
        run.log_model_dir(save_model(model, _spec(), tmp_path / "m"))
    tracker.register_model("m", run.run_id, alias="champion")
    mv = MlflowClient(tracking_uri=store).get_model_version("m", "1")
    assert mv.tags["weights_sha256"] == WeightSpec.load(tmp_path / "m" / "weight_spec.json").weights_sha256
    tracker.resolve_model_uri("models:/m@champion", tmp_path / "ok")  # intact: resolves
    artifact = Path(MlflowClient(tracking_uri=store).get_run(run.run_id).info.artifact_uri.removeprefix("file://"))
    other = build_model(_spec())[0]
    torch.nn.init.normal_(other.head.weight)
    save_model(other, _spec(), artifact / "model")  # swapped in place: a new spec with its own matching sha
    with pytest.raises(TrackingError, match=r"models:/m@champion: the downloaded weights have SHA-256"):
        tracker.resolve_model_uri("models:/m@champion", tmp_path / "swapped")


def test_file_reference_loads_the_named_file_not_the_folder_weights(tmp_path: Path) -> None:
    """``file:folder/X.pt`` used to load ``folder/weights.safetensors`` silently."""
    from loupe.core.io.identity import file_sha256
    from loupe.workflows.scoring.model import resolve_model

    torch.manual_seed(1)
    saved, _ = build_model(_spec())
    folder = save_model(saved.eval(), _spec(), tmp_path / "m")
    other, _ = build_model(_spec())
    torch.nn.init.normal_(other.head.weight, std=2.0)
    torch.save(other.state_dict(), folder / "finetuned.pt")  # tensors only: allowed with weights_only=True
    x = torch.randn(2, 3, 32, 32)
    res = resolve_model(f"file:{folder / 'finetuned.pt'}", "cxr")
    try:
        torch.testing.assert_close(res.model(x), other.eval()(x))
        assert not torch.allclose(res.model(x), saved(x))
        assert res.provenance.weights_sha256 == file_sha256(folder / "finetuned.pt")
        again, _ = load_model_dir(res.model_dir)  # the folder Ray actors load holds the same weights
        torch.testing.assert_close(again(x), other(x))
    finally:
        res.close()
    plain = resolve_model(f"file:{folder / 'weights.safetensors'}", "cxr")
    torch.testing.assert_close(plain.model(x), saved(x))
    assert plain.provenance.weights_sha256 == file_sha256(folder / "weights.safetensors")
