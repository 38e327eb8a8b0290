"""Backbones (diffusers transformers behind ``velocity = model(x_t, t, cond)``) and frozen text encoders.

Typical use::

    encoder = build_text_encoder("minilm")
    model = build_backbone("sana-tiny", caption_channels=encoder.embed_dim)
    velocity = model(x_t, t, encoder.encode(captions))

The names below load their submodule on first use (PEP 562), so that importing one submodule
(a data job's text-encoder actor imports ``text_encoders`` only) does not pay for all of them:
the backbones pull in diffusers' transformers, seconds of CPU per Ray worker process.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_SUBMODULE_OF = {
    "VelocityModel": "base",
    "BACKBONE_PRESETS": "presets",
    "BackbonePreset": "presets",
    "build_backbone": "presets",
    "get_backbone_preset": "presets",
    "load_backbone": "presets",
    "QwenImageVelocityModel": "qwen_image",
    "SanaVelocityModel": "sana",
    "TEXT_ENCODER_PRESETS": "text_encoders",
    "TextEncoder": "text_encoders",
    "build_text_encoder": "text_encoders",
    "bundled_minilm_path": "text_encoders",
}

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

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE_OF[name]}"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
