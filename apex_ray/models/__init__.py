"""Backbones (diffusers transformers behind ``velocity = model(x_t, t, cond)``) and frozen text encoders.

Typical use::

    encoder = build_text_encoder("minilm")
    model = build_backbone("sana-tiny", caption_channels=encoder.embed_dim)
    velocity = model(x_t, t, encoder.encode(captions))
"""
from apex_ray.models.base import VelocityModel
from apex_ray.models.presets import (
    BACKBONE_PRESETS,
    BackbonePreset,
    build_backbone,
    get_backbone_preset,
    load_backbone,
)
from apex_ray.models.qwen_image import QwenImageVelocityModel
from apex_ray.models.sana import SanaVelocityModel
from apex_ray.models.text_encoders import (
    TEXT_ENCODER_PRESETS,
    TextEncoder,
    build_text_encoder,
    bundled_minilm_path,
)

__all__ = [
    "BACKBONE_PRESETS",
    "BackbonePreset",
    "QwenImageVelocityModel",
    "SanaVelocityModel",
    "TEXT_ENCODER_PRESETS",
    "TextEncoder",
    "VelocityModel",
    "build_backbone",
    "build_text_encoder",
    "bundled_minilm_path",
    "get_backbone_preset",
    "load_backbone",
]
