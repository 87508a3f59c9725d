"""Manifests, group-aware splits, the folder-per-class adapter and the torch dataset built on them.

The torch-facing names (`ManifestDataset`, `collate_samples`, `to_float_tensor`) load lazily, so validating or
converting a manifest never imports torch.
"""

from __future__ import annotations

from typing import Any

from loupe.core.data.adapters import folder_per_class
from loupe.core.data.manifest import (
    LabelAlignment,
    Problem,
    align_labels,
    label_columns,
    leaked_groups,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from loupe.core.data.splits import split_by_group

_LAZY = {"ManifestDataset", "collate_samples", "to_float_tensor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from loupe.core.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LabelAlignment",
    "ManifestDataset",
    "Problem",
    "align_labels",
    "collate_samples",
    "folder_per_class",
    "label_columns",
    "leaked_groups",
    "read_manifest",
    "split_by_group",
    "to_float_tensor",
    "validate_manifest",
    "write_manifest",
]
