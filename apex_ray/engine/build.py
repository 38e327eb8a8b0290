"""The one place that builds what training needs: model + EMA (with the full-vs-LoRA fork),
optimizer, LR schedule, step runner and checkpoint state.

The Ray worker, ``python -m apex_ray.export``, the memory planner, the tests and the benchmarks
all call these functions, so they cannot disagree about how a run's model is made.

    backbone, ema, lora = build_model(config, text_embed_dim=encoder.embed_dim)   # on CPU / meta
    training = build_training(config, device, rank)   # meta -> shard -> materialise -> load, optim, runner
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from apex_ray.config import Config
from apex_ray.engine.checkpointing import LoRATrainingState, TrainingState
from apex_ray.engine.parallel import apply_fsdp, gradient_sync, mixed_precision_dtype, parallelize, unwrap
from apex_ray.engine.reference import AdapterOff, FrozenCopy, copy_weights, keeps_frozen_reference
from apex_ray.engine.step import StepRunner, build_lr_scheduler, build_objective, build_optimizer
from apex_ray.method.ema import EMA
from apex_ray.models import VelocityModel, build_backbone, get_backbone_preset
from apex_ray.models.loading import empty_weights, fill_, materialize
from apex_ray.models.lora import AdapterEMA, LoRASummary, adapter_of, apply_lora, cast_base, initialize_adapters
from apex_ray.models.presets import backbone_skeleton, pretrained_weights


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
    # The no-grad starting model (engine.reference) when keeps_frozen_reference(config), else None.
    # Not checkpointed: a resume rebuilds it from model.pretrained (or the seeded random init).
    frozen: FrozenCopy | AdapterOff | None = None

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


def _backbone_arguments(config: Config, text_embed_dim: int | None, architecture: dict[str, Any] | None,
                        pretrained: bool) -> tuple[str | None, dict[str, Any]]:
    """(weights to load or None, diffusers config overrides) of the backbone ``config`` trains."""
    weights = config.model.pretrained if pretrained else None
    if architecture is not None and weights is None:
        return weights, dict(architecture)
    overrides = dict(config.model.backbone_overrides)
    if weights is None and text_embed_dim is not None:
        overrides.setdefault(get_backbone_preset(config.model.backbone).text_embed_key, text_embed_dim)
    return weights, overrides


def _with_ema(config: Config, backbone: VelocityModel) -> tuple[VelocityModel, EMA | AdapterEMA, LoRASummary | None]:
    if config.model.lora.enabled:
        summary = apply_lora(backbone, config.model.lora)
        return backbone, AdapterEMA(backbone, config.ema.decay, config.ema.warmup), summary
    return backbone, EMA(backbone, config.ema.decay, config.ema.warmup), None


def build_model(config: Config, *, text_embed_dim: int | None = None, architecture: dict[str, Any] | None = None,
                pretrained: bool = True, empty: bool = False) -> tuple[VelocityModel, EMA | AdapterEMA, LoRASummary | None]:
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
      adapters only, so its export needs the base: ``pretrained=True``);
    - ``empty=True``: the same modules with every parameter on ``meta`` and nothing read but the
      pretrained config (what :func:`build_training` shards, then fills per shard).

    LoRA: the base is frozen and the EMA is a second adapter on it (no second copy of the base);
    otherwise the EMA is a full copy of the model.
    """
    weights, overrides = _backbone_arguments(config, text_embed_dim, architecture, pretrained)
    torch.manual_seed(config.train.seed)
    if empty:
        with empty_weights():
            return _with_ema(config, backbone_skeleton(config.model.backbone, weights, **overrides))
    return _with_ema(config, build_backbone(config.model.backbone, weights, **overrides))


BASE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def frozen_base_dtype(config: Config, device: torch.device | str, distributed: bool = True) -> torch.dtype:
    """The dtype the frozen LoRA base is stored in (``model.lora.base_dtype``): bf16 where FSDP2
    computes in bf16 (it casts each gathered weight for every forward, EMA and sampling included),
    fp32 otherwise (a DDP/single model also runs outside autocast, in evaluation). Trained weights
    (adapters, a full fine-tune) are fp32 master weights whatever this says."""
    device = torch.device(device)
    strategy = config.distributed.strategy if distributed else "single"
    bf16_compute = strategy == "fsdp" and mixed_precision_dtype(config.distributed.mixed_precision, device) == torch.bfloat16
    setting = config.model.lora.base_dtype
    if setting == "auto":
        return torch.bfloat16 if bf16_compute else torch.float32
    if setting == "bf16" and not bf16_compute:
        raise ValueError("model.lora.base_dtype=bf16 needs distributed.strategy=fsdp with bf16 compute "
                         f"(distributed.mixed_precision=bf16, or auto on GPUs); got strategy={strategy}, "
                         f"mixed_precision={config.distributed.mixed_precision} on {device.type}")
    return BASE_DTYPES[setting]


@torch.no_grad()
def load_weights(config: Config, backbone: VelocityModel, ema: EMA | AdapterEMA, *, text_embed_dim: int | None = None,
                 architecture: dict[str, Any] | None = None, pretrained: bool = True) -> None:
    """Fill a materialised skeleton (:func:`build_model` ``empty=True``, sharded or not) in place.

    The base comes from ``model.pretrained``'s safetensors, each rank reading only its own block of
    each tensor; with no weights (random init) from the seeded model :func:`build_model` would
    build, made once on the CPU and then dropped (host memory: one fp32 copy; the device never holds
    more than its shards). Adapters: :func:`~apex_ray.models.lora.initialize_adapters`; a full EMA
    starts as a copy of the model.
    """
    weights, overrides = _backbone_arguments(config, text_embed_dim, architecture, pretrained)
    transformer = backbone.transformer
    if weights is not None:
        source = pretrained_weights(weights)
        available, shape, read = source.keys(), source.shape, source.read
    else:
        torch.manual_seed(config.train.seed)
        reference = build_backbone(config.model.backbone, None, **overrides).transformer.state_dict()
        available, read = set(reference), lambda key, index: reference[key][index]
        shape = lambda key: tuple(reference[key].shape)  # noqa: E731
    params = {name: p for name, p in transformer.named_parameters() if adapter_of(name) is None}
    missing = sorted(key for key in map(_checkpoint_key, params) if key not in available)
    if missing:
        raise KeyError(f"{weights} lacks {len(missing)} weights of {type(transformer).__name__}, e.g. {missing[:5]}")
    wrong = [(name, shape(_checkpoint_key(name)), tuple(p.shape)) for name, p in params.items()
             if shape(_checkpoint_key(name)) != tuple(p.shape)]
    if wrong:
        raise ValueError(f"{weights}: {len(wrong)} weights have another shape than the model's "
                         f"(name, file, model), e.g. {wrong[:3]}; check model.backbone_overrides")
    for name, param in params.items():
        key = _checkpoint_key(name)
        fill_(param, lambda index, key=key: read(key, index))
    for module_name, module in transformer.named_modules():  # persistent buffers the source holds
        for name, buffer in module.named_buffers(recurse=False):
            key = _checkpoint_key(f"{module_name}.{name}" if module_name else name)
            if name not in module._non_persistent_buffers_set and key in available:
                fill_(buffer, lambda index, key=key: read(key, index))
    if config.model.lora.enabled:
        initialize_adapters(backbone, config.train.seed)
    else:
        copy_weights(ema.module, backbone)


def _checkpoint_key(name: str) -> str:
    """A transformer parameter's key in diffusers weights (peft moves a base weight under ``base_layer``)."""
    return name.replace(".base_layer.", ".")


def build_training(config: Config, device: torch.device | str = "cpu", rank: int = 0, *,
                   text_embed_dim: int | None = None, architecture: dict[str, Any] | None = None,
                   pretrained: bool = True, distributed: bool = True) -> Training:
    """Model + EMA on ``device``, sharded or wrapped per ``distributed.strategy`` (``distributed=False``:
    one process, as export and single-process tests run), optimizer, LR schedule, step runner and
    checkpoint state. ``rank`` seeds this worker's noise.

    The model is never whole on ``device`` before it is sharded: it is built on ``meta``, the frozen
    LoRA base cast to :func:`frozen_base_dtype`, sharded (FSDP2), materialised (each rank its own
    shards) and filled by :func:`load_weights`; DDP wraps it once filled.
    """
    device = torch.device(device)
    backbone, ema, lora = build_model(config, text_embed_dim=text_embed_dim, architecture=architecture,
                                      pretrained=pretrained, empty=True)
    frozen: FrozenCopy | AdapterOff | None = None
    if keeps_frozen_reference(config):  # built on meta beside the model, before either is sharded
        frozen = AdapterOff(backbone) if lora is not None else FrozenCopy(backbone)
    if lora is not None:
        cast_base(backbone, frozen_base_dtype(config, device, distributed))
    compute_dtype = mixed_precision_dtype(config.distributed.mixed_precision, device)
    strategy = config.distributed.strategy if distributed else "single"

    def shard_or_wrap() -> torch.nn.Module:
        return parallelize(backbone, backbone.blocks(), strategy, device, compute_dtype,
                           config.distributed.activation_checkpointing)

    if strategy == "fsdp":
        model = shard_or_wrap()
        if lora is None:  # the full EMA is sharded like the model (an adapter EMA already is)
            apply_fsdp(ema.module, ema.module.blocks(), compute_dtype)
        if isinstance(frozen, FrozenCopy):  # and so is the frozen copy
            apply_fsdp(frozen.module, frozen.module.blocks(), compute_dtype)
    materialize(backbone, device)
    if lora is None:
        materialize(ema, device)
    if isinstance(frozen, FrozenCopy):
        materialize(frozen, device)
    load_weights(config, backbone, ema, text_embed_dim=text_embed_dim, architecture=architecture,
                 pretrained=pretrained)
    if isinstance(frozen, FrozenCopy):
        frozen.copy_from(backbone)  # the starting weights; a checkpoint loaded later leaves it alone
    if strategy != "fsdp":
        model = shard_or_wrap()  # DDP broadcasts rank 0's (equal) weights: wrap filled parameters
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_lr_scheduler(optimizer, config.optim.warmup_steps, config.optim.decay, config.train.steps,
                                   config.optim.min_lr_ratio)
    runner = StepRunner(
        model, ema, build_objective(config, frozen), optimizer, scheduler,
        grad_clip=config.optim.grad_clip, seed=config.train.seed, rank=rank, device=device,
        max_nonfinite_steps=config.train.max_nonfinite_steps, grad_sync=gradient_sync(model),
        autocast_dtype=compute_dtype if strategy != "fsdp" else None,  # FSDP2 casts through its policy
    )
    state = (LoRATrainingState if lora else TrainingState)(model, optimizer, ema)
    return Training(config, model, ema, optimizer, runner, state, lora, frozen)
