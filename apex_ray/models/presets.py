"""Named backbones: build one from a preset (random weights or a diffusers checkpoint), load one back.

A preset fixes the diffusers config, the wrapper class and the text encoder it is paired with
(``text_encoder``, a :func:`~apex_ray.models.build_text_encoder` preset). Building without
``pretrained`` gives random weights of the real size, which is what a GPU smoke test or a
from-scratch run needs; ``pretrained`` (local folder or hub id) loads a released checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from apex_ray.assets import resolve_pretrained
from apex_ray.models.base import VelocityModel, read_backbone_file
from apex_ray.models.loading import SafetensorsWeights, empty_weights
from apex_ray.models.qwen_image import QWEN_IMAGE_CONFIGS, QwenImageVelocityModel
from apex_ray.models.sana import SANA_CONFIGS, SanaVelocityModel


@dataclass(frozen=True)
class BackbonePreset:
    """A diffusers config, its wrapper, the paired text encoder and where released weights live."""

    model_class: type[VelocityModel]
    config: dict
    text_encoder: str
    text_embed_key: str
    """Config key holding the text embedding width; set it to the encoder's ``embed_dim``."""
    codec: str = "pixel"
    """The :func:`~apex_ray.models.codecs.load_codec` codec its latents come from (``pixel``: none)."""
    checkpoint: str | None = None
    """Hub id of released diffusers weights (a ``transformer/`` subfolder; its ``vae/`` is the codec's)."""


BACKBONE_PRESETS: dict[str, BackbonePreset] = {
    "sana-tiny": BackbonePreset(SanaVelocityModel, SANA_CONFIGS["sana-tiny"], "minilm", "caption_channels"),
    "sana-600m": BackbonePreset(
        SanaVelocityModel, SANA_CONFIGS["sana-600m"], "gemma", "caption_channels", "autoencoder-dc",
        "Efficient-Large-Model/Sana_600M_512px_diffusers",
    ),
    "sana-1600m": BackbonePreset(
        SanaVelocityModel, SANA_CONFIGS["sana-1600m"], "gemma", "caption_channels", "autoencoder-dc",
        "Efficient-Large-Model/Sana_1600M_512px_diffusers",
    ),
    "qwen-image-tiny": BackbonePreset(
        QwenImageVelocityModel, QWEN_IMAGE_CONFIGS["qwen-image-tiny"], "minilm", "joint_attention_dim"
    ),
    "qwen-image": BackbonePreset(
        QwenImageVelocityModel, QWEN_IMAGE_CONFIGS["qwen-image"], "qwen2.5-vl", "joint_attention_dim",
        "autoencoder-kl-qwenimage", "Qwen/Qwen-Image",
    ),
}

_FAMILIES: dict[str, type[VelocityModel]] = {
    cls.family: cls for cls in (SanaVelocityModel, QwenImageVelocityModel)
}


def vae_codec(family: str) -> str:
    """The VAE codec of a latent backbone family (``sana`` -> ``autoencoder-dc``), from the presets."""
    for spec in BACKBONE_PRESETS.values():
        if spec.model_class.family == family and spec.codec != "pixel":
            return spec.codec
    raise ValueError(f"no preset of family {family!r} has a VAE codec")


def get_backbone_preset(name: str) -> BackbonePreset:
    """The preset called ``name``; a ValueError lists the valid names otherwise."""
    if name not in BACKBONE_PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; valid presets: {sorted(BACKBONE_PRESETS)}")
    return BACKBONE_PRESETS[name]


def build_backbone(preset: str, pretrained: str | os.PathLike | None = None, **config_overrides) -> VelocityModel:
    """A :class:`VelocityModel` for ``preset``.

    Without ``pretrained`` the diffusers model is built from the preset config updated by
    ``config_overrides`` (random weights; build under ``with torch.device("meta")`` to size a
    model without allocating it). With ``pretrained`` (a diffusers pipeline folder or hub id,
    whose ``transformer/`` subfolder is used, or a folder holding the transformer itself) the
    released weights are loaded and ``config_overrides`` are passed to diffusers'
    ``from_pretrained`` (use it for non-shape keys only). ``sample_size`` is the latent side the
    model is meant for (a diffusers config key for SANA, a wrapper setting for Qwen-Image).
    """
    spec = get_backbone_preset(preset)
    pretrained = resolve_pretrained(pretrained)
    model_class = spec.model_class
    config = {**spec.config, **config_overrides}
    wrapper_kwargs = {key: config.pop(key) for key in model_class.wrapper_keys}
    if pretrained is None:
        transformer = model_class.transformer_class(**config)
    else:
        transformer = model_class.transformer_class.from_pretrained(
            pretrained,
            subfolder=_transformer_subfolder(pretrained),
            **{k: v for k, v in config_overrides.items() if k not in model_class.wrapper_keys},
        )
    return model_class(transformer, **wrapper_kwargs)


def backbone_skeleton(preset: str, pretrained: str | os.PathLike | None = None, **config_overrides) -> VelocityModel:
    """The model :func:`build_backbone` makes with the same arguments, with its parameters on the
    ``meta`` device (see :func:`~apex_ray.models.loading.empty_weights`): only ``pretrained``'s
    ``config.json`` is read. Fill it with :func:`pretrained_weights` (or a random initialisation)
    after sharding and :func:`~apex_ray.models.loading.materialize`."""
    spec = get_backbone_preset(preset)
    pretrained = resolve_pretrained(pretrained)
    model_class = spec.model_class
    config = {**spec.config, **config_overrides}
    wrapper_kwargs = {key: config.pop(key) for key in model_class.wrapper_keys}
    with empty_weights():
        if pretrained is None:
            transformer = model_class.transformer_class(**config)
        else:
            released = model_class.transformer_class.load_config(pretrained, subfolder=_transformer_subfolder(pretrained))
            transformer = model_class.transformer_class.from_config(
                released, **{k: v for k, v in config_overrides.items() if k not in model_class.wrapper_keys})
        return model_class(transformer, **wrapper_kwargs)


def pretrained_weights(pretrained: str | os.PathLike) -> SafetensorsWeights:
    """The transformer weights of ``pretrained`` (what :func:`build_backbone` would load), opened for
    block-wise reads; a hub id is downloaded (its transformer folder only) into the hub cache."""
    pretrained = resolve_pretrained(pretrained)
    subfolder = _transformer_subfolder(pretrained)
    if os.path.isdir(pretrained):
        return SafetensorsWeights(os.path.join(pretrained, subfolder or ""))
    from huggingface_hub import snapshot_download

    root = snapshot_download(str(pretrained), allow_patterns=[f"{subfolder}/*"])
    return SafetensorsWeights(os.path.join(root, subfolder))


def load_backbone(path: str | os.PathLike) -> VelocityModel:
    """Load a folder written by :meth:`VelocityModel.save_pretrained` (or ``bundled:<name>``)."""
    path = resolve_pretrained(path)
    family = read_backbone_file(path)["family"]
    if family not in _FAMILIES:
        raise ValueError(f"{path}: unknown backbone family {family!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[family].from_pretrained(path)


def _transformer_subfolder(pretrained: str | os.PathLike) -> str | None:
    """``None`` when ``pretrained`` is itself a transformer folder, else diffusers' ``transformer``."""
    return None if os.path.isfile(os.path.join(pretrained, "config.json")) else "transformer"
