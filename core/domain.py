"""What a domain registers about itself: how a file becomes model input, its demo, the files it takes.

The CLI (``loupe score``, ``loupe demo``) and the dashboard find domains only through `DOMAINS`, so a new domain
is a new folder under ``domains/`` that calls `register_domain` on import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loupe.core.models.spec import WeightSpec
from loupe.core.registry import DOMAINS

# file → (model input [C, H, W], metadata safe to store: no identifiers)
InputLoader = Callable[[Path, WeightSpec], tuple[torch.Tensor, dict[str, Any]]]


def standard_loader(path: Path, spec: WeightSpec) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read any supported file (format sniffed by content), check it is in the model's scope (``spec.modalities``)
    and apply the spec's preprocessing."""
    from loupe.core.io import read_any
    from loupe.core.transforms import ModelInput

    img = read_any(path)
    spec.check_scope(img.meta, path)
    array = img.array
    if array.ndim == 3 and img.meta.get("frames", 1) > 1:  # multi-frame DICOM: score the first frame
        array = array[0]
    return ModelInput(spec)(array, img.meta.get("bits_stored") or img.meta.get("bit_depth")), dict(img.meta)


@dataclass(frozen=True)
class DomainInfo:
    name: str
    description: str
    load_input: InputLoader = standard_loader
    # demo_inputs(out_dir) -> folder of sample inputs the product can reach offline (from installed packages)
    demo_inputs: Callable[[Path], Path] | None = None
    # demo_model(work_dir, run=None, fast=False) -> a Loupe model folder (weights.safetensors + weight_spec.json):
    # cached pretrained weights when there are any, else a small model trained on data the demo can reach; its spec
    # description says it is a demo model. ``run`` (a tracking Run, may be None) receives its metrics/params;
    # ``fast`` asks for a few training steps only (smoke tests).
    demo_model: Callable[..., Path] | None = None
    default_model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def register_domain(info: DomainInfo) -> DomainInfo:
    return DOMAINS.register(info.name, info, domain=info.name, description=info.description)
