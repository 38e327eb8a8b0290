"""SANA (linear-attention DiT, diffusers ``SanaTransformer2DModel``) as a :class:`VelocityModel`.

SANA's pipeline passes the scheduler timestep, which is flow time times 1000 (times the
config's ``timestep_scale``, 1.0 for SANA), and reads the output as the flow-matching
velocity ``noise - x0``; the wrapper does the same conversion. The text mask goes in as
SANA's ``encoder_attention_mask`` (padding keys get a -10000 bias in cross-attention).
A ``cond.feature_shift`` (APEX ``shift_stage=projected``) shifts the projected, normalised text
features, the output of ``caption_norm(caption_projection(c))``, per row.
"""
from __future__ import annotations

import torch
from diffusers import SanaTransformer2DModel

from apex_ray.method.conditioning import Conditioning
from apex_ray.models.base import VelocityModel, flow_time, shifted_features

SANA_TIMESTEP_SCALE = 1000.0
"""Scheduler timesteps are flow time (sigma) times ``num_train_timesteps`` = 1000."""

_SANA_512PX = dict(
    in_channels=32,  # DC-AE f32c32 latents
    out_channels=32,
    caption_channels=2304,  # Gemma-2-2B hidden size
    mlp_ratio=2.5,
    attention_bias=False,
    sample_size=16,  # 512 px / 32
    patch_size=1,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    interpolation_scale=None,  # no positional embedding at 512 / 1024 px (Mix-FFN carries position)
)

SANA_CONFIGS: dict[str, dict] = {
    # A ~2M-parameter SANA for CPU runs on 32x32 RGB pixels (identity codec): same blocks as
    # the real model, with sin-cos positions on (SANA's 2K/4K configs do this) because the
    # ShapeEval position task needs absolute layout that a few 3x3 convs barely provide.
    "sana-tiny": dict(
        in_channels=3,
        out_channels=3,
        num_attention_heads=4,
        attention_head_dim=32,
        num_layers=6,
        num_cross_attention_heads=4,
        cross_attention_head_dim=32,
        cross_attention_dim=128,
        caption_channels=384,  # all-MiniLM-L6-v2; override with the encoder's embed_dim
        mlp_ratio=2.5,
        attention_bias=False,
        sample_size=32,
        patch_size=2,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=1.0,
    ),
    # Efficient-Large-Model/Sana_600M_512px_diffusers (SanaMS_600M_P1_D28)
    "sana-600m": dict(
        _SANA_512PX,
        num_attention_heads=36,
        attention_head_dim=32,
        num_layers=28,
        num_cross_attention_heads=16,
        cross_attention_head_dim=72,
        cross_attention_dim=1152,
    ),
    # Efficient-Large-Model/Sana_1600M_512px_diffusers (SanaMS_1600M_P1_D20)
    "sana-1600m": dict(
        _SANA_512PX,
        num_attention_heads=70,
        attention_head_dim=32,
        num_layers=20,
        num_cross_attention_heads=20,
        cross_attention_head_dim=112,
        cross_attention_dim=2240,
    ),
}


class SanaVelocityModel(VelocityModel):
    """``SanaTransformer2DModel`` behind the ``[B, C, H, W]`` velocity interface."""

    family = "sana"
    transformer_class = SanaTransformer2DModel

    def __init__(self, transformer: SanaTransformer2DModel, sample_size: int | None = None) -> None:
        config = transformer.config
        if (config.out_channels or config.in_channels) != config.in_channels:
            raise ValueError("a velocity model must output as many channels as it takes in")
        if config.guidance_embeds:
            raise ValueError("guidance-embedded SANA (Sprint) takes a guidance input this wrapper does not pass")
        super().__init__(transformer, config.in_channels, sample_size or config.sample_size)

    @property
    def text_embed_dim(self) -> int:
        return self.transformer.config.caption_channels

    def text_feature_module(self) -> torch.nn.Module:
        """Where the projected text features come out: ``caption_norm`` (after ``caption_projection``)."""
        norm = getattr(self.transformer, "caption_norm", None)
        return self.transformer.caption_projection if norm is None else norm

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        timestep = flow_time(t, x_t) * (SANA_TIMESTEP_SCALE * self.transformer.config.timestep_scale)
        module = None if cond.feature_shift is None else self.text_feature_module()
        with shifted_features(module, cond.feature_shift):
            return self.transformer(
                hidden_states=x_t,
                encoder_hidden_states=cond.embeds.to(x_t.dtype),
                encoder_attention_mask=cond.mask,
                timestep=timestep,
                return_dict=False,
            )[0]
