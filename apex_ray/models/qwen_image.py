"""Qwen-Image (dual-stream MMDiT, diffusers ``QwenImageTransformer2DModel``) as a :class:`VelocityModel`.

The diffusers model takes 2x2-packed latents ``[B, (H/2)(W/2), 4C]`` plus ``img_shapes`` for
its 3-axis RoPE, and returns packed velocities; the wrapper packs and unpacks exactly like
``QwenImagePipeline._pack_latents`` / ``_unpack_latents`` so callers keep ``[B, C, H, W]``.
``QwenImagePipeline`` passes ``timestep / 1000``, i.e. flow time itself, and the model's
``Timesteps(scale=1000)`` rescales internally, so ``t`` goes in unchanged. The text mask
goes in as ``encoder_hidden_states_mask`` (padding tokens are masked out of joint attention;
this diffusers version derives the text length from it, there is no ``txt_seq_lens``).
A ``cond.feature_shift`` (APEX ``shift_stage=projected``) shifts the projected text features,
the output of ``txt_in(txt_norm(c))``, per row (Qwen-Image has no pooled text vector).
"""
from __future__ import annotations

import torch
from diffusers import QwenImageTransformer2DModel

from apex_ray.method.conditioning import Conditioning
from apex_ray.models.base import VelocityModel, flow_time, shifted_features

QWEN_IMAGE_CONFIGS: dict[str, dict] = {
    # A ~2M-parameter Qwen-Image for CPU runs on 32x32 RGB pixels (identity codec): 3 channels
    # packed 2x2 into 12; head dim 32 split over the (frame, height, width) RoPE axes.
    "qwen-image-tiny": dict(
        patch_size=2,
        in_channels=12,
        out_channels=3,
        num_layers=3,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=384,  # all-MiniLM-L6-v2; override with the encoder's embed_dim
        axes_dims_rope=(8, 12, 12),
        sample_size=32,
    ),
    # Qwen/Qwen-Image transformer (20B): 16-channel f8 VAE latents, Qwen2.5-VL-7B text (3584).
    "qwen-image": dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56),
        sample_size=128,  # the pipeline's default_sample_size: 1024 px / 8
    ),
}
"""``sample_size`` is the wrapper's (the diffusers config has none); the rest is diffusers config."""


class QwenImageVelocityModel(VelocityModel):
    """``QwenImageTransformer2DModel`` behind the ``[B, C, H, W]`` velocity interface."""

    family = "qwen-image"
    transformer_class = QwenImageTransformer2DModel
    wrapper_keys = ("sample_size",)

    def __init__(self, transformer: QwenImageTransformer2DModel, sample_size: int) -> None:
        config = transformer.config
        patch = config.patch_size
        channels = config.out_channels or config.in_channels
        if config.in_channels != channels * patch * patch:
            raise ValueError(
                f"in_channels={config.in_channels} must be out_channels * patch_size**2 = {channels * patch * patch}"
            )
        if config.zero_cond_t or config.use_additional_t_cond or config.guidance_embeds:
            raise ValueError("Qwen-Image edit/guidance variants take inputs this wrapper does not pass")
        super().__init__(transformer, channels, sample_size)

    @property
    def text_embed_dim(self) -> int:
        return self.transformer.config.joint_attention_dim

    def text_feature_module(self) -> torch.nn.Module:
        """Where the projected text features come out: ``txt_in`` (the projection after ``txt_norm``)."""
        return self.transformer.txt_in

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        batch, channels, height, width = x_t.shape
        p = self.transformer.config.patch_size
        rows, cols = height // p, width // p
        packed = (
            x_t.reshape(batch, channels, rows, p, cols, p)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(batch, rows * cols, channels * p * p)
        )
        module = None if cond.feature_shift is None else self.text_feature_module()
        with shifted_features(module, cond.feature_shift):
            velocity = self.transformer(
                hidden_states=packed,
                encoder_hidden_states=cond.embeds.to(x_t.dtype),
                encoder_hidden_states_mask=cond.mask,
                timestep=flow_time(t, x_t),
                img_shapes=[[(1, rows, cols)]] * batch,
                return_dict=False,
            )[0]
        return (
            velocity.reshape(batch, rows, cols, channels, p, p)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(batch, channels, height, width)
        )
