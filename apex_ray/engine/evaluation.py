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
from apex_ray.common.seeds import derive_seed
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


def image_grid(images: torch.Tensor, columns: int | None = None, scale: int = 4,
               captions: list[str] | None = None) -> Image.Image:
    """A PIL grid of images in [-1, 1] ``[N, 3, H, W]``, each upscaled ``scale`` x (nearest).

    With ``captions`` (one per image) each tile gets its caption in a strip under it (PIL's
    default font, wrapped to the tile's width, cut with ``...`` past :data:`CAPTION_LINES` lines)."""
    n, _, h, w = images.shape
    columns = columns or grid_columns(n)
    rows = int(np.ceil(n / columns))
    if captions is not None:
        if len(captions) != n:
            raise ValueError(f"{n} images but {len(captions)} captions")
        return _captioned_grid(tensor_to_images(images), columns, rows, scale, captions)
    pixels = tensor_to_images(images)
    grid = np.zeros((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), dtype=np.uint8) + 40
    for i in range(n):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = pixels[i]
    image = Image.fromarray(grid)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


CAPTION_LINES = 3
"""At most this many caption lines under a tile; longer captions end in ``...``."""
GRID_BACKGROUND = (40, 40, 40)
CAPTION_COLOR = (235, 235, 235)


def _wrap(text: str, fits, max_lines: int) -> list[str]:
    """``text`` in lines that ``fits(line)`` (long words broken), at most ``max_lines``."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        while not fits(word) and len(word) > 1:  # a word wider than the tile: break it
            cut = max(1, max(k for k in range(1, len(word) + 1) if fits(word[:k]) or k == 1))
            if current:
                lines.append(current)
                current = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{current} {word}" if current else word
        if fits(candidate) or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
    return lines


def _captioned_grid(pixels: np.ndarray, columns: int, rows: int, scale: int, captions: list[str]) -> Image.Image:
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    h, w = pixels.shape[1] * scale, pixels.shape[2] * scale
    pad = max(1, scale)  # the border: one source pixel, as in the uncaptioned grid
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    box = probe.textbbox((0, 0), "Ag", font=font)
    line_h = box[3] - box[1] + 2

    def fits(line: str) -> bool:
        return probe.textlength(line, font=font) <= w - 2

    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow without FreeType: a latin-1 bitmap font
        captions = [c.encode("latin-1", "replace").decode("latin-1") for c in captions]
    wrapped = [_wrap(c, fits, CAPTION_LINES) for c in captions]
    strip = 2 + line_h * max(1, max((len(lines) for lines in wrapped), default=1))
    cell_h = h + strip
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (cell_h + pad) + pad), GRID_BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, lines in enumerate(wrapped):
        r, c = divmod(i, columns)
        x, y = pad + c * (w + pad), pad + r * (cell_h + pad)
        grid.paste(Image.fromarray(pixels[i]).resize((w, h), Image.NEAREST), (x, y))
        for k, line in enumerate(lines):
            draw.text((x + 1, y + h + 1 + k * line_h - box[1]), line, fill=CAPTION_COLOR, font=font)
    return grid


class EvalPrompts:
    """Evaluation prompts, encoded once; each rank generates its own share.

    By default the fixed ShapeEval items (scored); with ``captions`` (``eval.prompts``) those
    prompts, ``images_per_prompt`` images each with fixed seeds, for sample grids only
    (``prompts`` is then ``None``)."""

    def __init__(self, encode: Encode, images_per_prompt: int, rank: int = 0, world_size: int = 1,
                 captions: list[str] | None = None) -> None:
        if captions is None:
            self.prompts, self.seeds = evaluation_set(images_per_prompt)
            self.captions = [p.caption for p in self.prompts]
        else:
            if not captions:
                raise ValueError("no evaluation prompts")
            self.prompts = None
            self.captions = [c for c in captions for _ in range(images_per_prompt)]
            self.seeds = [derive_seed(0, "eval.prompts", i, k) for i in range(len(captions))
                          for k in range(images_per_prompt)]
        self.images_per_prompt = images_per_prompt
        self.cond = encode_unique(encode, self.captions)
        # Every rank takes the same number of items (the last one repeated) so FSDP's
        # collectives line up; the repeats are dropped after the gather.
        per_rank = -(-len(self.captions) // world_size)
        mine = list(range(rank, len(self.captions), world_size)) or [len(self.captions) - 1]
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
                             log_image: Callable[[Image.Image, str, int], None] | None, step: int,
                             custom: EvalPrompts | None = None,
                             log_captions: Callable[[str, list[str], int], None] | None = None) -> dict[str, float]:
    """ShapeEval at ``score_nfe`` and sample grids at ``grid_nfe``; every rank calls, rank 0 gets the
    metrics (others ``{}``) and logs the grids through ``log_image(image, key, step)`` (key ``samples/nfe{N}``;
    with ``custom``, the ``eval.prompts`` images too, all of them, under ``prompts/nfe{N}``). Each grid
    shows its captions under the tiles and, through ``log_captions(key, captions, columns)``, they
    are also listed in grid order (row by row) for a text artifact beside it."""
    metrics: dict[str, float] = {}

    def log_grid(images: torch.Tensor, captions: list[str], key: str, columns: int | None = None) -> None:
        grid = image_grid(images, columns=columns, captions=captions)
        log_image(grid, key, step)
        if log_captions is not None:
            log_captions(key, captions, columns or grid_columns(len(captions)))

    for nfe in sorted(set(grid_nfe) | set(score_nfe)):
        images = prompts.generate(model, nfe, latent_shape, device, decode)
        if images is None:
            continue
        if nfe in score_nfe:
            for task, value in score_images(images, prompts.prompts).items():
                metrics[f"shapeeval_nfe{nfe}/{task}"] = value
        if nfe in grid_nfe and log_image is not None:
            pick = torch.linspace(0, len(images) - 1, min(grid_size, len(images))).long()
            log_grid(images[pick], [prompts.captions[i] for i in pick.tolist()], f"samples/nfe{nfe}")
    if custom is not None:
        # Every rank generates (whether or not it logs), so FSDP's collectives line up.
        for nfe in sorted(set(grid_nfe)):
            images = custom.generate(model, nfe, latent_shape, device, decode)
            if images is not None and log_image is not None:
                log_grid(images, custom.captions, f"prompts/nfe{nfe}",
                         prompt_columns(len(custom.captions) // custom.images_per_prompt, custom.images_per_prompt))
    return metrics


def grid_columns(n: int) -> int:
    """The columns :func:`image_grid` uses by default for ``n`` images: a near-square grid."""
    return max(1, int(np.ceil(np.sqrt(n))))


def prompt_columns(prompts: int, images_per_prompt: int) -> int:
    """Columns for ``prompts`` x ``images_per_prompt`` images in prompt order: near square, a whole
    number of prompts per row, so a prompt's images sit side by side in one row."""
    if images_per_prompt == 1:
        return grid_columns(prompts)
    side = np.sqrt(prompts * images_per_prompt)
    return images_per_prompt * max(1, min(prompts, int(round(side / images_per_prompt))))
