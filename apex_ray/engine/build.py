"""The one place that builds what training needs: model + EMA (with the full-vs-LoRA fork),
optimizer, LR schedule, step runner and checkpoint state.

The Ray worker, ``python -m apex_ray.export``, the memory planner, the tests and the benchmarks
all call these functions, so they cannot disagree about how a run's model is made.

    backbone, ema = build_model(config, text_embed_dim=encoder.embed_dim)   # on CPU / meta
    training = build_training(config, device, rank)                          # + sharding, optim, runner
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from apex_ray.config import Config
from apex_ray.engine.checkpointing import LoRATrainingState, TrainingState
from apex_ray.engine.parallel import apply_fsdp, gradient_sync, mixed_precision_dtype, parallelize, unwrap
from apex_ray.engine.step import StepRunner, build_lr_scheduler, build_objective, build_optimizer
from apex_ray.method.ema import EMA
from apex_ray.models import VelocityModel, build_backbone, get_backbone_preset
from apex_ray.models.lora import AdapterEMA, LoRASummary, apply_lora


@dataclass
class Training:
    """Everything one worker trains with; ``state`` is what a checkpoint saves and restores."""

    config: Config
    model: torch.nn.Module  # what the step calls: the sharded backbone (FSDP2) or its DDP wrapper
    ema: EMA | AdapterEMA
    optimizer: torch.optim.Optimizer
    runner: StepRunner
    state: TrainingState | LoRATrainingState
    lora: LoRASummary | None

    @property
    def backbone(self) -> VelocityModel:
        return unwrap(self.model)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return latent_shape(self.backbone)


def latent_shape(model: VelocityModel) -> tuple[int, int, int]:
    """``(C, H, W)`` of the latents ``model`` is trained on."""
    return model.latent_channels, model.sample_size, model.sample_size


def backbone_config(model: VelocityModel) -> dict[str, Any]:
    """The exact diffusers config of ``model`` (what rebuilds the same architecture for export)."""
    return {k: v for k, v in dict(model.transformer.config).items() if not k.startswith("_")}


def build_model(config: Config, *, text_embed_dim: int | None = None, architecture: dict[str, Any] | None = None,
                pretrained: bool = True) -> tuple[VelocityModel, EMA | AdapterEMA, LoRASummary | None]:
    """The backbone as training starts it, its EMA and (under LoRA) what the adapter covers.

    Built under the caller's default device (``with torch.device("meta")`` sizes a model without
    allocating it) and seeded with ``train.seed`` so every rank, and an export that rebuilds a LoRA
    run's random base, gets identical weights.

    - ``text_embed_dim``: the text encoder's width, for a randomly initialised model (the tiny
      presets pair with whichever encoder the run uses);
    - ``architecture``: an exact diffusers config (a checkpoint's ``apex_run.json``), which wins
      over the preset and ``model.backbone_overrides``;
    - ``pretrained=False`` skips loading ``model.pretrained``: for sizing on ``meta``, and for a full
      fine-tune's export, where the checkpoint overwrites every weight (a LoRA checkpoint holds the
      adapters only, so its export needs the base: ``pretrained=True``).

    LoRA: the base is frozen and the EMA is a second adapter on it (no second copy of the base);
    otherwise the EMA is a full copy of the model.
    """
    lora = config.model.lora.enabled
    weights = config.model.pretrained if pretrained else None
    if architecture is not None and weights is None:
        overrides = architecture
    else:
        overrides = dict(config.model.backbone_overrides)
        if weights is None and text_embed_dim is not None:
            overrides.setdefault(get_backbone_preset(config.model.backbone).text_embed_key, text_embed_dim)
    torch.manual_seed(config.train.seed)
    backbone = build_backbone(config.model.backbone, weights, **overrides)
    if lora:
        summary = apply_lora(backbone, config.model.lora)
        return backbone, AdapterEMA(backbone, config.ema.decay, config.ema.warmup), summary
    return backbone, EMA(backbone, config.ema.decay, config.ema.warmup), None


def build_training(config: Config, device: torch.device | str = "cpu", rank: int = 0, *,
                   text_embed_dim: int | None = None, architecture: dict[str, Any] | None = None,
                   pretrained: bool = True, distributed: bool = True) -> Training:
    """Model + EMA on ``device``, sharded or wrapped per ``distributed.strategy`` (``distributed=False``:
    one process, as export and single-process tests run), optimizer, LR schedule, step runner and
    checkpoint state. ``rank`` seeds this worker's noise."""
    device = torch.device(device)
    backbone, ema, lora = build_model(config, text_embed_dim=text_embed_dim, architecture=architecture,
                                      pretrained=pretrained)
    backbone.to(device)
    if lora is None:
        ema.to(device)
    compute_dtype = mixed_precision_dtype(config.distributed.mixed_precision, device)
    strategy = config.distributed.strategy if distributed else "single"
    model = parallelize(backbone, backbone.blocks(), strategy, device, compute_dtype,
                        config.distributed.activation_checkpointing)
    if strategy == "fsdp" and lora is None:  # the full EMA is sharded like the model (an adapter EMA already is)
        apply_fsdp(ema.module, ema.module.blocks(), compute_dtype)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_lr_scheduler(optimizer, config.optim.warmup_steps, config.optim.decay, config.train.steps,
                                   config.optim.min_lr_ratio)
    runner = StepRunner(
        model, ema, build_objective(config), optimizer, scheduler,
        grad_clip=config.optim.grad_clip, seed=config.train.seed, rank=rank, device=device,
        max_nonfinite_steps=config.train.max_nonfinite_steps, grad_sync=gradient_sync(model),
        autocast_dtype=compute_dtype if strategy != "fsdp" else None,  # FSDP2 casts through its policy
    )
    state = (LoRATrainingState if lora else TrainingState)(model, optimizer, ema)
    return Training(config, model, ema, optimizer, runner, state, lora)
