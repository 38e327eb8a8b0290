"""Offline ShapeEval of exported weights: per-image correctness on the fixed prompts and seeds.

The same prompts, per-image seeds and sampler path as ``bench/table1.py`` (which uses
:func:`evaluation_images`) and as the evaluation during training (:mod:`apex_ray.engine.evaluation`).
The result is per-image correctness ``[prompts, images_per_prompt]``, what
:mod:`apex_ray.shapeeval.intervals` turns into a mean and a bootstrap interval. No Ray here.
"""
from __future__ import annotations

import numpy as np
import torch

from apex_ray.engine.evaluation import generate
from apex_ray.method.sampler import SamplerConfig
from apex_ray.shapeeval import EVAL_PROMPTS, Prompt, evaluation_set, score_each


def evaluation_images(model, encode, sampler: SamplerConfig, images_per_prompt: int,
                      device: torch.device | str = "cpu", batch_size: int = 64) -> tuple[torch.Tensor, list[Prompt]]:
    """Images in [-1, 1] for ShapeEval's fixed items (each prompt ``images_per_prompt`` times, its
    fixed seeds) and the prompt of each image, in prompt order."""
    prompts, seeds = evaluation_set(images_per_prompt)
    shape = (model.latent_channels, model.sample_size, model.sample_size)
    with torch.no_grad():
        images = generate(model, encode, [p.caption for p in prompts], seeds, shape, sampler,
                          batch_size=batch_size, device=device)
    return images, prompts


def correctness(images, prompts: list[Prompt], images_per_prompt: int) -> np.ndarray:
    """Per-image correctness as bool ``[prompts, images_per_prompt]`` (images in prompt order)."""
    return score_each(images, prompts).reshape(len(prompts) // images_per_prompt, images_per_prompt)


def prompt_tasks() -> list[str]:
    """The task of each evaluation prompt, in the order of :func:`correctness`'s rows."""
    return [p.task for p in EVAL_PROMPTS]


def score_export(folder: str, images_per_prompt: int, nfe: int, text_encoder=None, device: str = "cpu",
                 text_encoder_path: str | None = None, order: int = 1) -> np.ndarray:
    """Per-image correctness ``[prompts, images_per_prompt]`` of the exported model in ``folder``
    (``export/ema`` or ``export/student``) at ``nfe`` network calls.

    ``text_encoder``: a built text encoder (anything with ``encode(captions)``, reused across
    calls), a preset name, or ``None`` for the preset that pairs with the model
    (:func:`~apex_ray.engine.inference.default_text_encoder`)."""
    from apex_ray.engine.inference import default_text_encoder, load_model, sampler_config
    from apex_ray.models import build_text_encoder

    model = load_model(str(folder)).to(device)
    if text_encoder is None or isinstance(text_encoder, str):
        text_encoder = build_text_encoder(text_encoder or default_text_encoder(model), text_encoder_path,
                                          device=device)
    images, prompts = evaluation_images(model, text_encoder.encode, sampler_config(nfe, order), images_per_prompt,
                                        device)
    return correctness(images, prompts, images_per_prompt)
