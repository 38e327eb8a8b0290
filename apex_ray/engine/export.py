"""Weights out of training: a run's EMA and student as diffusers folders, from a live run or a checkpoint.

``export_weights`` is the one implementation: the worker calls it at the final step (every rank,
it gathers shards) and :func:`export_checkpoint` calls it after loading any checkpoint on one CPU
(DCP reshards on load, so a checkpoint written by any number of workers exports).

Layout of ``out``: ``ema/`` and ``student/`` (``VelocityModel.save_pretrained``: what
``load_backbone`` and ``python -m apex_ray.sample`` read); under LoRA also ``lora/ema`` and
``lora/student`` (diffusers LoRA files for ``pipeline.load_lora_weights``), ``ema``/``student``
then being each adapter merged into the base.
"""
from __future__ import annotations

import json
from pathlib import Path

from apex_ray.config import Config
from apex_ray.engine.build import Training, build_training
from apex_ray.engine.checkpointing import RUN_FILE, load_checkpoint
from apex_ray.models.base import save_unsharded
from apex_ray.models.lora import EMA_ADAPTER, TRAINED_ADAPTER, save_adapter, save_merged

EXPORTED = ("ema", "student")


def export_weights(training: Training, out: str | Path) -> dict[str, Path]:
    """Write ``out/ema`` and ``out/student`` (and ``out/lora/*`` under LoRA). A collective under
    FSDP2/DDP: call on every rank; rank 0 writes."""
    out = Path(out)
    backbone = training.backbone
    if training.lora is not None:
        for name, adapter in zip(EXPORTED, (EMA_ADAPTER, TRAINED_ADAPTER)):
            save_adapter(backbone, out / "lora" / name, adapter)
            save_merged(backbone, out / name, adapter)
    else:
        for name, module in zip(EXPORTED, (training.ema.module, backbone)):
            save_unsharded(module, out / name)
    return {name: out / name for name in EXPORTED}


def read_run_description(checkpoint: str | Path) -> tuple[Config, dict]:
    """The training config and exact backbone config a checkpoint was written with."""
    run_file = Path(checkpoint) / RUN_FILE
    if not run_file.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {RUN_FILE}: pass a checkpoint folder "
                                "(runs/<name>/ray/<run>/step_*), or --config with the run's config")
    described = json.loads(run_file.read_text())
    return Config.from_run(described["config"]), described["backbone_config"]


def export_checkpoint(checkpoint: str | Path, out: str | Path, config: Config | None = None,
                      architecture: dict | None = None) -> dict[str, Path]:
    """Load ``checkpoint`` into a freshly built model on the CPU and :func:`export_weights` it.

    Without ``config`` / ``architecture`` they come from the checkpoint's ``apex_run.json``."""
    checkpoint = Path(checkpoint)
    if config is None or architecture is None:
        described_config, described_architecture = read_run_description(checkpoint)
        config, architecture = config or described_config, architecture if architecture is not None else described_architecture
    training = build_training(config, "cpu", architecture=architecture or None,
                              pretrained=config.model.lora.enabled, distributed=False)
    extra = load_checkpoint(checkpoint, training.state)
    training.runner.load_extra_state(extra["runner"])
    written = export_weights(training, out)
    extras = " and lora/" if training.lora is not None else ""
    print(f"exported step {training.runner.step} of {checkpoint} -> {out}/{{ema,student}}{extras}")
    return written
