"""The chest X-ray label sets, defined once: NIH ChestX-ray14's 14 findings and CheXpert's 14 observations."""

from __future__ import annotations

from loupe.core.registry import LABEL_SETS

NIH14_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)  # fmt: skip

LABEL_SETS.register("cxr.nih14", NIH14_LABELS, domain="cxr")
LABEL_SETS.register("cxr.chexpert", CHEXPERT_LABELS, domain="cxr")
LABEL_SETS.register("cxr.pneumonia", ("Pneumonia",), domain="cxr")
