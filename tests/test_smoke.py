"""Single-process smoke run: APEX on the tiny SANA preset with ShapeEval data (no Ray)."""
from __future__ import annotations

import math

import pytest
import torch

from apex_ray.config import load_config
from apex_ray.engine.step import (
    StepRunner,
    build_lr_scheduler,
    build_objective,
    build_optimizer,
)
from apex_ray.engine.streams import BatchStream, shapeeval_dataset
from apex_ray.method.ema import EMA
from apex_ray.models import build_backbone, build_text_encoder


@pytest.mark.slow
def test_apex_smoke_run_on_tiny_sana_with_shapeeval():
    torch.manual_seed(0)
    encoder = build_text_encoder("minilm", max_length=24)
    model = build_backbone("sana-tiny", caption_channels=encoder.embed_dim)
    dataset = shapeeval_dataset(encoder.encode, 64, seed=1)
    config = load_config(None, ["optim.lr=1e-3", "objective.apex.anchor_frac=0.5"])
    ema = EMA(model, config.ema.decay, config.ema.warmup)
    optimizer = build_optimizer(model, config.optim)
    runner = StepRunner(model, ema, build_objective(config), optimizer, build_lr_scheduler(optimizer, 5),
                        grad_clip=config.optim.grad_clip, seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ema_before = {name: p.detach().clone() for name, p in ema.module.named_parameters()}
    batches = BatchStream(dataset, 4, seed=0)
    history = [runner.train_step([next(batches), next(batches)]) for _ in range(24)]

    for metrics in history:
        for key in ("loss", "loss_path", "loss_adv", "loss_shift", "grad_norm"):
            assert math.isfinite(metrics[key]), (key, metrics)
    assert runner.skipped_steps == 0
    assert any(m["loss_adv"] > 0 for m in history[1:])  # the buffer filled and L_adv ran
    assert len(runner.buffer) > 0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before), "every trainable parameter should move"
    assert any(not torch.equal(p, ema_before[n]) for n, p in ema.module.named_parameters())
    # The EMA trails the model: it lies between the start and the current weights.
    name = next(iter(before))
    dist_model = (dict(model.named_parameters())[name] - before[name]).norm()
    dist_ema = (dict(ema.module.named_parameters())[name] - before[name]).norm()
    assert 0 < dist_ema < dist_model
