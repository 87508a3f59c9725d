"""Manifests, group-aware splits, dataset adapters and the torch dataset built on them.

The torch-facing names (`ManifestDataset`, `collate_samples`, `to_float_tensor`) load lazily, so validating or
converting a manifest never imports torch.
"""

from __future__ import annotations

from typing import Any

from loupe.core.data.adapters import (
    CHEXPERT_LABELS,
    NIH_LABELS,
    chexpert,
    folder_per_class,
    mimic_cxr_jpg,
    nih_chestxray14,
)
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
    "CHEXPERT_LABELS",
    "NIH_LABELS",
    "LabelAlignment",
    "ManifestDataset",
    "Problem",
    "align_labels",
    "chexpert",
    "collate_samples",
    "folder_per_class",
    "label_columns",
    "leaked_groups",
    "mimic_cxr_jpg",
    "nih_chestxray14",
    "read_manifest",
    "split_by_group",
    "to_float_tensor",
    "validate_manifest",
    "write_manifest",
]
