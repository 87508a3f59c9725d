from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from loupe.core.data import ManifestDataset, collate_samples, to_float_tensor
from loupe.core.errors import UnsupportedInputError


def _manifest(tmp_path: Path) -> pd.DataFrame:
    Image.fromarray(np.full((8, 6), 255, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.full((8, 6), 65535, np.uint16)).save(tmp_path / "c.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return pd.DataFrame(
        {
            "path": ["a.png", "b.png", "c.png", "broken.png"],
            "Effusion": [1.0, 0.0, np.nan, 1.0],
            "group": ["p1", "p2", "p3", "p4"],
            "meta_sex": ["F", "M", "F", "M"],
        }
    )


def test_samples_follow_the_contract(tmp_path: Path) -> None:
    ds = ManifestDataset(_manifest(tmp_path), ["Effusion"], root=tmp_path)
    a, b, c = ds[0], ds[1], ds[2]
    assert a["image"].shape == (1, 8, 6) and a["image"].dtype == torch.float32 and a["image"].max() == 1.0
    assert b["image"].shape == (3, 8, 6) and c["image"].max() == 1.0  # 16-bit scaled by 65535
    assert a["label"].tolist() == [1.0] and torch.isnan(c["label"]).all()
    assert a["meta"]["group"] == "p1" and a["meta"]["meta_sex"] == "F" and a["meta"]["image"]["bit_depth"] == 8


def test_bad_file_raises_by_default_and_is_recorded_on_request(tmp_path: Path) -> None:
    frame = _manifest(tmp_path)
    with pytest.raises(UnsupportedInputError, match="broken.png"):
        ManifestDataset(frame, ["Effusion"], root=tmp_path)[3]
    ds = ManifestDataset(frame.iloc[[0, 2, 3]], ["Effusion"], root=tmp_path, on_error="record")
    batches = list(DataLoader(ds, batch_size=3, num_workers=0, collate_fn=collate_samples))
    assert batches[0]["image"].shape == (2, 1, 8, 6) and len(batches[0]["failed"]) == 1
    assert "broken.png" in batches[0]["failed"][0]["error"]


def test_multiframe_to_tensor_keeps_frames_first() -> None:
    out = to_float_tensor(np.zeros((5, 4, 3), np.float32), {"frames": 5})
    assert out.shape == (5, 1, 4, 3)


def test_missing_label_column_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="lacks column"):
        ManifestDataset(_manifest(tmp_path), ["Edema"])


@pytest.mark.realdata
def test_real_nih_films_through_a_dataloader(shared_data: Path) -> None:
    root = shared_data / "cxr" / "nih14"
    frame = nih_manifest(root).head(4)
    loader = DataLoader(
        ManifestDataset(frame, ["Effusion", "Mass"], root=root), batch_size=4, collate_fn=collate_samples
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 512, 512) and batch["label"].shape == (4, 2)


def nih_manifest(root: Path) -> pd.DataFrame:
    """The shared NIH films as a manifest, straight from labels.csv's own 0/1 columns (no domain adapter)."""
    frame = pd.read_csv(root / "labels.csv")
    labels = list(frame.columns[frame.columns.get_loc("Atelectasis") :])  # the 14 one-hot finding columns
    out = pd.DataFrame({"path": "images/" + frame["Image Index"], "group": frame["Patient ID"].astype(str)})
    return pd.concat([out, frame[labels].astype(float)], axis=1)
