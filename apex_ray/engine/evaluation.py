"""Sampling for evaluation: ShapeEval scores at a given NFE and sample grids. No Ray here.

During training every rank generates its share of the fixed ShapeEval items (:class:`EvalPrompts`)
and rank 0 scores them and logs grids (:func:`evaluate_during_training`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

from apex_ray.common.images import tensor_to_images
from apex_ray.engine.collectives import gather_to_rank0
from apex_ray.method.conditioning import Conditioning, VelocityFn
from apex_ray.method.sampler import SamplerConfig, sample
from apex_ray.models.text_encoders import encode_unique
from apex_ray.shapeeval import evaluation_set, score_images

Decode = Callable[[torch.Tensor], torch.Tensor]  # latents -> images in [-1, 1], [B, 3, H, W]
Encode = Callable[[list[str]], Conditioning]


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
            torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed), device="cpu") for seed in seeds[chunk]
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
    pixels = tensor_to_images(images)
    grid = np.zeros((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), dtype=np.uint8) + 40
    for i in range(n):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = pixels[i]
    image = Image.fromarray(grid)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


class EvalPrompts:
    """The fixed ShapeEval items, encoded once; each rank generates its own share."""

    def __init__(self, encode: Encode, images_per_prompt: int, rank: int = 0, world_size: int = 1) -> None:
        self.prompts, self.seeds = evaluation_set(images_per_prompt)
        self.captions = [p.caption for p in self.prompts]
        self.cond = encode_unique(encode, self.captions)
        # Every rank takes the same number of items (the last one repeated) so FSDP's
        # collectives line up; the repeats are dropped after the gather.
        per_rank = -(-len(self.captions) // world_size)
        mine = list(range(rank, len(self.captions), world_size))
        self.items = mine + [mine[-1]] * (per_rank - len(mine))
        self.world_size = world_size
        self._row = {caption: i for i, caption in enumerate(self.captions)}

    def encode(self, captions: list[str]) -> Conditioning:
        """The conditioning of ``captions`` (all among the evaluation captions), from the table."""
        return self.cond.index(torch.tensor([self._row[c] for c in captions]))

    def generate(self, model: VelocityFn, nfe: int, latent_shape, device, decode: Decode) -> torch.Tensor | None:
        """All ranks call this; rank 0 gets every image in prompt order, others ``None``."""
        images = generate(model, self.encode, [self.captions[i] for i in self.items],
                          [self.seeds[i] for i in self.items], latent_shape, SamplerConfig.for_nfe(nfe),
                          decode=decode, device=device)
        if self.world_size == 1:
            return images
        gathered = gather_to_rank0((self.items, images))
        if gathered is None:
            return None
        out = torch.empty(len(self.captions), *images.shape[1:])
        for items, imgs in gathered:
            out[torch.tensor(items)] = imgs
        return out


def evaluate_during_training(model: VelocityFn, prompts: EvalPrompts, score_nfe: list[int], grid_nfe: list[int],
                             grid_size: int, latent_shape, device, decode: Decode,
                             log_image: Callable[[Image.Image, str, int], None] | None, step: int) -> dict[str, float]:
    """ShapeEval at ``score_nfe`` and sample grids at ``grid_nfe``; every rank calls, rank 0 gets the
    metrics (others ``{}``) and logs the grids through ``log_image(image, key, step)`` (key ``samples/nfe{N}``)."""
    metrics: dict[str, float] = {}
    for nfe in sorted(set(grid_nfe) | set(score_nfe)):
        images = prompts.generate(model, nfe, latent_shape, device, decode)
        if images is None:
            continue
        if nfe in score_nfe:
            for task, value in score_images(images, prompts.prompts).items():
                metrics[f"shapeeval_nfe{nfe}/{task}"] = value
        if nfe in grid_nfe and log_image is not None:
            pick = torch.linspace(0, len(images) - 1, min(grid_size, len(images))).long()
            log_image(image_grid(images[pick]), f"samples/nfe{nfe}", step)
    return metrics
