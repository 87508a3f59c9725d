"""Chest X-ray domain: ChestX-ray14 / CheXpert label sets, the CXR preset, MAE-pretrained ViT classifiers."""

from __future__ import annotations

from loupe.core.domain import DomainInfo, register_domain
from loupe.core.registry import LABEL_SETS
from loupe.domains.cxr import demo

NIH14_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
CHEXPERT_LABELS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
LABEL_SETS.register("cxr.nih14", NIH14_LABELS, domain="cxr")
LABEL_SETS.register("cxr.chexpert", CHEXPERT_LABELS, domain="cxr")
LABEL_SETS.register("cxr.pneumonia", ("Pneumonia",), domain="cxr")

register_domain(
    DomainInfo(
        name="cxr",
        description="Chest X-ray multi-label thorax disease classification",
        demo_inputs=demo.demo_inputs,
        demo_model=demo.demo_model,
    )
)

# models, preset and recipes register themselves on import
from loupe.domains.cxr import evaluate, finetune, models, pretrain  # noqa: E402, F401
