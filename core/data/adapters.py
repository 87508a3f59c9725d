"""Domain-neutral dataset layouts → manifests (``path``, labels 1/0/NaN, ``group``): today a folder per class.

Domains register adapters for their public datasets (NIH ChestX-ray14, CheXpert, MIMIC-CXR in ``domains/cxr``)
in `loupe.core.registry.ADAPTERS`, which ``loupe data convert`` reads; this one is registered as ``folder``.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pandas as pd

from loupe.core.data.manifest import GROUP, PATH
from loupe.core.io.common import input_error
from loupe.core.io.sniff import IMAGE_SUFFIXES
from loupe.core.registry import ADAPTERS


def folder_per_class(root: str | Path, *, suffixes: Collection[str] = IMAGE_SUFFIXES) -> pd.DataFrame:
    """``root/<class>/<image>`` → manifest with one 1/0 column per class (sub-folder), paths relative to ``root``.

    The folders carry no patient id, so each image is its own group: add a real ``group`` column before
    splitting when several images come from one patient.
    """
    base = Path(root)
    classes = (
        sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")) if base.is_dir() else []
    )
    if not classes:
        raise input_error(base, "has no class sub-folders", "lay the images out as ROOT/<class>/<image>")
    rows = []
    for cls in classes:
        for f in sorted((base / cls).rglob("*")):
            if f.is_file() and f.suffix.lower() in suffixes:
                rows.append({PATH: f.relative_to(base).as_posix(), **{c: float(c == cls) for c in classes}})
    out = pd.DataFrame(rows, columns=[PATH, *classes])
    out[GROUP] = out[PATH]
    return out


ADAPTERS.register(
    "folder", folder_per_class, domain="core", inputs=("ROOT",), doc="ROOT/<class>/<image> → one 1/0 column per class"
)
