"""Image codecs: pixels in [-1, 1] <-> the latents a backbone is trained on.

- ``pixel``: the identity; the tiny presets train on 3 x size x size pixels.
- ``autoencoder-kl``: diffusers ``AutoencoderKL`` (SD, SDXL, SD3, Flux VAEs);
  ``z = (mode - shift_factor) * scaling_factor`` as the Flux/SD3 pipelines do (no shift when
  the config has none).
- ``autoencoder-dc``: diffusers ``AutoencoderDC`` (SANA's DC-AE); ``z = latent * scaling_factor``
  as ``SanaPipeline`` undoes it.
- ``autoencoder-kl-qwenimage``: diffusers ``AutoencoderKLQwenImage``, a video VAE run on one
  frame; ``z = (mode - latents_mean) / latents_std`` per channel as ``QwenImagePipeline`` does.

The KL codecs keep the posterior's mode, not a sample, so a prepared set is reproducible.
``decode`` inverts the scaling and runs the VAE decoder, for round trips and previews.
"""
from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from diffusers import ModelMixin


class ImageCodec(ABC):
    """``encode``: float ``[B, 3, H, W]`` in [-1, 1] -> float32 latents ``[B, C, h, w]``; ``decode`` back."""

    name: ClassVar[str]

    @abstractmethod
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents of ``pixels``, scaled the way the backbone's pipeline expects them."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels (roughly in [-1, 1], not clamped) of latents made by :meth:`encode`."""


class PixelCodec(ImageCodec):
    """The identity: latents are the pixels."""

    name = "pixel"

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float()


class DiffusersVAECodec(ImageCodec):
    """A frozen diffusers VAE on ``device`` (in the VAE's dtype); subclasses apply the pipeline's scaling."""

    vae_class: ClassVar[str]
    """Its diffusers class, by name: diffusers is imported when a VAE loads, not with this module
    (the pixel codec, e.g. in a data job's codec actors, never needs it: seconds of CPU each)."""

    def __init__(self, vae: ModelMixin, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.dtype = self.vae.dtype

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "DiffusersVAECodec":
        """Load the VAE from a local folder or hub id; a local pipeline folder's ``vae/`` is found."""
        path = str(path)
        if subfolder is None and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            if not os.path.isfile(os.path.join(path, "vae", "config.json")):
                raise FileNotFoundError(f"{path} holds neither a VAE (config.json) nor a pipeline's vae/ folder")
            subfolder = "vae"
        vae_class = getattr(importlib.import_module("diffusers"), cls.vae_class)
        return cls(vae_class.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype), device)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._encode(pixels.to(self.device, self.dtype)).float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents.to(self.device, self.dtype)).float().cpu()

    @abstractmethod
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class AutoencoderKLCodec(DiffusersVAECodec):
    name = "autoencoder-kl"
    vae_class = "AutoencoderKL"

    def _scale_shift(self) -> tuple[float, float]:
        config = self.vae.config
        return config.scaling_factor, config.shift_factor or 0.0

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        scale, shift = self._scale_shift()
        return (self.vae.encode(pixels).latent_dist.mode() - shift) * scale

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        scale, shift = self._scale_shift()
        return self.vae.decode(latents / scale + shift).sample


class AutoencoderDCCodec(DiffusersVAECodec):
    name = "autoencoder-dc"
    vae_class = "AutoencoderDC"

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels).latent * self.vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample


class QwenImageCodec(DiffusersVAECodec):
    name = "autoencoder-kl-qwenimage"
    vae_class = "AutoencoderKLQwenImage"

    def _mean_std(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1)
        mean = torch.tensor(config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]  # one video frame
        mean, std = self._mean_std(latents)
        return (latents - mean) / std

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._mean_std(latents)
        return self.vae.decode((latents * std + mean)[:, :, None]).sample[:, :, 0]


CODECS: dict[str, type[ImageCodec]] = {
    cls.name: cls for cls in (PixelCodec, AutoencoderKLCodec, AutoencoderDCCodec, QwenImageCodec)
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_codec(name: str, path: str | os.PathLike | None = None, subfolder: str | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32) -> ImageCodec:
    """The codec ``name`` (see :data:`CODECS`), its VAE loaded from ``path`` via diffusers."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; valid codecs: {sorted(CODECS)}")
    codec_class = CODECS[name]
    if codec_class is PixelCodec:
        return PixelCodec()
    if path is None:
        raise ValueError(f"codec {name!r} needs the path (local folder or hub id) of its VAE")
    return codec_class.from_pretrained(path, subfolder, device, DTYPES[dtype] if isinstance(dtype, str) else dtype)
