"""Exported models for inference, below the CLIs: load one (with an optional LoRA), pick its text
encoder, its decoder and a sampler for an NFE. Used by ``python -m apex_ray.sample`` and by the
MLflow pyfunc model of a run (:mod:`apex_ray.orchestration.mlflow_model`)."""
from __future__ import annotations

import os

import torch

from apex_ray.assets import resolve_pretrained
from apex_ray.engine.evaluation import Decode
from apex_ray.method.sampler import SamplerConfig
from apex_ray.models import (
    BACKBONE_PRESETS,
    VelocityModel,
    build_backbone,
    load_backbone,
)
from apex_ray.models.base import BACKBONE_FILE
from apex_ray.models.presets import vae_codec


class SampleError(ValueError):
    """A bad combination of options; the message says what to pass instead."""


def load_model(checkpoint: str, backbone: str | None = None, lora: str | None = None) -> VelocityModel:
    """The exported model at ``checkpoint`` (or diffusers weights of preset ``backbone``), with an
    optional LoRA adapter loaded on top. ``bundled:shapes-teacher`` names the shipped teacher."""
    checkpoint = resolve_pretrained(checkpoint)
    if backbone is None and not os.path.exists(checkpoint):
        raise SampleError(f"--checkpoint {checkpoint} does not exist: pass a run's exported folder, e.g. "
                          "runs/apex/ray/<run>/step_0000200/export/ema (the `exported weights` line `python -m "
                          "apex_ray.train` ends with, plus /ema), bundled:shapes-teacher, or diffusers weights "
                          "(folder or hub id) with --backbone PRESET")
    if lora is not None and not os.path.exists(lora):
        raise SampleError(f"--lora {lora} does not exist: pass a folder written by apex_ray.models.lora.save_adapter")
    if backbone is not None:
        model = build_backbone(backbone, checkpoint)
    elif os.path.isfile(os.path.join(checkpoint, BACKBONE_FILE)):
        model = load_backbone(checkpoint)
    else:
        raise SampleError(f"{checkpoint} has no {BACKBONE_FILE}: pass an exported folder (a run's export/ema), "
                          f"or name its preset with --backbone to load diffusers weights "
                          f"(presets: {sorted(BACKBONE_PRESETS)})")
    if lora is not None:
        from apex_ray.models.lora import load_adapter_into

        load_adapter_into(model, lora)
    return model.eval().requires_grad_(False)


def default_text_encoder(model: VelocityModel) -> str:
    """The encoder of the preset with this family and text width (all-MiniLM for the tiny ones)."""
    for spec in BACKBONE_PRESETS.values():
        if spec.model_class.family == model.family and spec.config[spec.text_embed_key] == model.text_embed_dim:
            return spec.text_encoder
    raise SampleError(f"no preset pairs a {model.text_embed_dim}-d text encoder with {model.family}: "
                      "pass --text-encoder")


def sampler_config(nfe: int, order: int = 1, stochastic_ratio: float = 0.0,
                   extrapolation: float = 0.0) -> SamplerConfig:
    """The sampler spending exactly ``nfe`` network calls (order 2 spends ``2 * steps - 1``)."""
    if order == 2 and nfe % 2 == 0:
        raise SampleError(f"--order 2 spends 2 * steps - 1 calls, so --nfe must be odd (got {nfe})")
    return SamplerConfig.for_nfe(nfe, order, stochastic_ratio=stochastic_ratio, extrapolation=extrapolation)


def latent_decoder(model: VelocityModel, vae: str | None, device: torch.device, dtype: torch.dtype) -> Decode:
    """Identity for pixel models; the family's VAE (``--vae``), scaled as its pipeline does, otherwise."""
    if model.latent_channels == 3:
        return lambda latents: latents
    if vae is None:
        raise SampleError(f"this {model.family} model makes {model.latent_channels}-channel latents: pass --vae "
                          "(a VAE or pipeline folder, or hub id, e.g. the --checkpoint's teacher repo)")
    from apex_ray.models.codecs import load_codec

    codec = load_codec(vae_codec(model.family), vae, None if os.path.isdir(vae) else "vae", device, dtype)
    return codec.decode
