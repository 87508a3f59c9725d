"""Chest X-ray domain: ChestX-ray14 / CheXpert label sets, the CXR preset, MAE-pretrained ViT classifiers."""

from __future__ import annotations

from loupe.core.domain import DomainInfo, register_domain
from loupe.domains.cxr import adapters, demo  # noqa: F401 - adapters register themselves
from loupe.domains.cxr.labels import CHEXPERT_LABELS, NIH14_LABELS
from loupe.domains.cxr.review import cxr_case

register_domain(
    DomainInfo(
        name="cxr",
        description="Chest X-ray multi-label thorax disease classification",
        demo_inputs=demo.demo_inputs,
        demo_model=demo.demo_model,
        review_case=cxr_case,
    )
)

# models, preset and recipes register themselves on import
from loupe.domains.cxr import evaluate, finetune, models, pretrain  # noqa: E402, F401

__all__ = ["CHEXPERT_LABELS", "NIH14_LABELS"]
