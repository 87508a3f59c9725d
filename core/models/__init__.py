"""Backbones, weight specs, weight loading and the classifier builders."""

from loupe.core.models.backbones import Backbone, OpenClipText, OpenClipVisualBackbone, TimmViTBackbone, create_backbone
from loupe.core.models.classifier import (
    Classifier,
    build_model,
    load_model_dir,
    load_open_clip_text,
    load_weights_into,
    register_vit,
    save_model,
    vit_classifier,
)
from loupe.core.models.spec import WeightSpec
from loupe.core.models.weights import LoadReport, load_state_dict, resolve_source

__all__ = [
    "Backbone",
    "Classifier",
    "LoadReport",
    "OpenClipText",
    "OpenClipVisualBackbone",
    "TimmViTBackbone",
    "WeightSpec",
    "build_model",
    "create_backbone",
    "load_model_dir",
    "load_open_clip_text",
    "load_state_dict",
    "load_weights_into",
    "register_vit",
    "resolve_source",
    "save_model",
    "vit_classifier",
]
