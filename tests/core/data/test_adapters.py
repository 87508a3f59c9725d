from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from loupe.core.data import folder_per_class, validate_manifest
from loupe.core.registry import ADAPTERS


def test_folder_per_class(tmp_path: Path) -> None:
    for cls, n in (("normal", 2), ("pneumonia", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    out = folder_per_class(tmp_path)
    assert out["path"].tolist() == ["normal/0.png", "normal/1.png", "pneumonia/0.png"]
    assert out["pneumonia"].tolist() == [0.0, 0.0, 1.0] and validate_manifest(out, root=tmp_path) == []
    assert ADAPTERS.get("folder") is folder_per_class  # `loupe data convert folder ROOT`
