"""The fixed, versioned ShapeEval evaluation prompts and their per-image seeds.

Changing a prompt, its order or the seed rule changes every score: bump
``EVAL_PROMPTS_VERSION`` when you do. Balanced by construction: in each task every shape
(and every colour, relation or count) appears equally often.
"""
from __future__ import annotations

import numpy as np

from apex_ray.shapeeval.scenes import (
    COUNT_WORDS,
    DEFAULT_CANVAS,
    SHAPES,
    Prompt,
    render,
    sample_scene,
)

EVAL_PROMPTS_VERSION = "v1"
MAX_IMAGES_PER_PROMPT = 1000


def _ordered_pairs() -> list[tuple[str, str]]:
    return [(a, b) for a in SHAPES for b in SHAPES if a != b]


EVAL_PROMPTS: tuple[Prompt, ...] = (
    *(Prompt("single_object", (s,)) for s in SHAPES),
    *(Prompt("two_object", pair) for pair in _ordered_pairs()),
    *(Prompt("counting", (s,), count=n) for s in SHAPES for n in COUNT_WORDS),
    *(
        Prompt("colors", (s,), (c,))
        for c, s in [
            ("red", "circle"), ("red", "triangle"), ("green", "square"), ("green", "circle"),
            ("blue", "triangle"), ("blue", "square"), ("yellow", "circle"), ("yellow", "square"),
            ("magenta", "triangle"), ("magenta", "circle"), ("cyan", "square"), ("cyan", "triangle"),
        ]
    ),
    *(
        Prompt("position", (a, b), relation=rel)
        for a, rel, b in [
            ("circle", "left of", "square"), ("square", "left of", "triangle"), ("triangle", "left of", "circle"),
            ("square", "right of", "circle"), ("triangle", "right of", "square"), ("circle", "right of", "triangle"),
            ("circle", "above", "triangle"), ("triangle", "above", "square"), ("square", "above", "circle"),
            ("triangle", "below", "circle"), ("square", "below", "triangle"), ("circle", "below", "square"),
        ]
    ),
    *(
        Prompt("color_attr", (a, b), (ca, cb))
        for ca, a, cb, b in [
            ("red", "circle", "green", "square"), ("blue", "square", "yellow", "circle"),
            ("magenta", "square", "cyan", "triangle"), ("red", "triangle", "blue", "square"),
            ("green", "triangle", "magenta", "circle"), ("yellow", "circle", "cyan", "triangle"),
            ("cyan", "circle", "magenta", "square"), ("green", "square", "red", "circle"),
            ("yellow", "square", "blue", "triangle"), ("magenta", "triangle", "green", "square"),
            ("cyan", "triangle", "yellow", "circle"), ("blue", "circle", "red", "triangle"),
        ]
    ),
)


def eval_seed(prompt_index: int, image_index: int) -> int:
    """The fixed seed of image ``image_index`` of prompt ``prompt_index`` (sampler noise and ground truth)."""
    return prompt_index * MAX_IMAGES_PER_PROMPT + image_index


def evaluation_set(images_per_prompt: int = 4) -> tuple[list[Prompt], list[int]]:
    """The evaluation items: each prompt repeated ``images_per_prompt`` times, one fixed seed per item."""
    if not 1 <= images_per_prompt <= MAX_IMAGES_PER_PROMPT:
        raise ValueError(f"images_per_prompt must be in 1..{MAX_IMAGES_PER_PROMPT}, got {images_per_prompt}")
    prompts = [p for p in EVAL_PROMPTS for _ in range(images_per_prompt)]
    seeds = [eval_seed(i, k) for i in range(len(EVAL_PROMPTS)) for k in range(images_per_prompt)]
    return prompts, seeds


def render_ground_truth(prompts: list[Prompt], seeds: list[int], canvas: int = DEFAULT_CANVAS) -> np.ndarray:
    """Clean images satisfying each prompt, scene drawn from ``default_rng(seed)``: uint8 ``[N, H, W, 3]``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images = np.empty((len(prompts), canvas, canvas, 3), dtype=np.uint8)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        images[i] = render(sample_scene(prompt, np.random.default_rng(seed), canvas))
    return images
