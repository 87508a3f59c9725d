"""Hugging Face ``CLIPModel`` checkpoints (e.g. PLIP) in open_clip's layout, and the open_clip config they imply.

The two layouts hold the same transformer: HF splits attention into ``q/k/v_proj`` where open_clip keeps one
``in_proj``; projections are stored transposed; names differ. `to_open_clip` renames and concatenates, so the
checkpoint then loads through the ``open_clip`` layout (image tower, text tower, logit scale).
"""

from __future__ import annotations

import re

import torch

_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_FIXED = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_BLOCK = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def is_hf_clip(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("vision_model.") for k in sd) and "visual_projection.weight" in sd


def to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF ``CLIPModel`` state dict → open_clip keys (``visual.*``, text tower, ``logit_scale``)."""
    out: dict[str, torch.Tensor] = {new: sd[old] for old, new in _FIXED.items() if old in sd}
    out["visual.proj"] = sd["visual_projection.weight"].t().contiguous()
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].t().contiguous()
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = _BLOCK.match(k)
        if not m:
            continue
        tower, i, name, kind = m.groups()
        prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{i}"
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((prefix, kind, tower), {})[name[10]] = v
        elif name in _LAYER:
            out[f"{prefix}.{_LAYER[name]}.{kind}"] = v
    for (prefix, kind, _), parts in qkv.items():
        out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def open_clip_config(hf_config: dict) -> dict:
    """The open_clip model config of an HF ``CLIPConfig`` (its ``config.json``)."""
    v, t = hf_config["vision_config"], hf_config["text_config"]
    return {
        "embed_dim": hf_config.get("projection_dim", 512),
        "quick_gelu": v.get("hidden_act", "quick_gelu") == "quick_gelu",
        "vision_cfg": {"image_size": v["image_size"], "layers": v["num_hidden_layers"], "width": v["hidden_size"],
                       "patch_size": v["patch_size"], "head_width": v["hidden_size"] // v["num_attention_heads"],
                       "mlp_ratio": v["intermediate_size"] / v["hidden_size"]},
        "text_cfg": {"context_length": t.get("max_position_embeddings", 77), "vocab_size": t.get("vocab_size", 49408),
                     "width": t["hidden_size"], "heads": t["num_attention_heads"], "layers": t["num_hidden_layers"],
                     "mlp_ratio": t["intermediate_size"] / t["hidden_size"]},
    }  # fmt: skip
