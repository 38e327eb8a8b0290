"""Sampling for evaluation: ShapeEval scores at a given NFE and sample grids. No Ray here."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

from apex_ray.method.conditioning import Conditioning, VelocityFn
from apex_ray.method.sampler import SamplerConfig, sample
from apex_ray.shapeeval import evaluation_set, score_images

Decode = Callable[[torch.Tensor], torch.Tensor]  # latents -> images in [-1, 1], [B, 3, H, W]
Encode = Callable[[list[str]], Conditioning]


def sampler_for_nfe(nfe: int, **overrides) -> SamplerConfig:
    """The default sampler spending exactly ``nfe`` calls: ``nfe`` first-order steps."""
    return SamplerConfig(steps=nfe, order=1, **overrides)


@torch.no_grad()
def generate(
    model: VelocityFn,
    encode: Encode,
    captions: list[str],
    seeds: list[int],
    latent_shape: tuple[int, int, int],
    sampler: SamplerConfig,
    decode: Decode = lambda latents: latents,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Images in [-1, 1] for ``captions``; image ``i`` starts from noise seeded by ``seeds[i]``.

    Seeding each image on its own makes a prompt's image the same whatever the batch size.
    """
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = slice(start, start + batch_size)
        noise = torch.stack([
            torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds[chunk]
        ]).to(device)
        cond = encode(captions[chunk]).to(device)
        result = sample(model, cond, tuple(noise.shape), sampler, noise=noise,
                        generator=torch.Generator(device).manual_seed(seeds[start]), device=device)
        out.append(decode(result.images).float().clamp(-1, 1).cpu())
    return torch.cat(out)


def shapeeval_scores(
    model: VelocityFn,
    encode: Encode,
    latent_shape: tuple[int, int, int],
    sampler: SamplerConfig,
    images_per_prompt: int = 1,
    decode: Decode = lambda latents: latents,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], torch.Tensor]:
    """ShapeEval per-task accuracies and overall on the fixed prompt list; also returns the images."""
    prompts, seeds = evaluation_set(images_per_prompt)
    images = generate(model, encode, [p.caption for p in prompts], seeds, latent_shape, sampler, decode,
                      device=device)
    return score_images(images, prompts), images


def image_grid(images: torch.Tensor, columns: int | None = None, scale: int = 4) -> Image.Image:
    """A PIL grid of images in [-1, 1] ``[N, 3, H, W]``, each upscaled ``scale`` x (nearest)."""
    n, _, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.zeros((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), dtype=np.uint8) + 40
    for i in range(n):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = pixels[i]
    image = Image.fromarray(grid)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)
