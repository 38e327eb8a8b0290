"""``python -m apex_ray.export CHECKPOINT --out DIR``: a training checkpoint's EMA and student
weights as diffusers ``save_pretrained`` folders (``DIR/ema``, ``DIR/student``), on one CPU.

DCP reshards on load, so a checkpoint written by any number of FSDP/DDP workers exports here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from apex_ray.config import Config, ConfigError, load_config
from apex_ray.engine.checkpointing import RUN_FILE, TrainingState, load_checkpoint
from apex_ray.engine.step import build_optimizer
from apex_ray.method.ema import EMA
from apex_ray.models import build_backbone
from apex_ray.models.lora import (
    EMA_ADAPTER,
    TRAINED_ADAPTER,
    AdapterEMA,
    LoRATrainingState,
    apply_lora,
    save_adapter,
    save_merged,
)


def export_checkpoint(checkpoint: str | Path, out: str | Path, config: Config | None = None,
                      backbone_config: dict | None = None) -> dict[str, Path]:
    """Load ``checkpoint`` into a fresh model and write ``out/ema`` and ``out/student``."""
    checkpoint, out = Path(checkpoint), Path(out)
    run_file = checkpoint / RUN_FILE
    if config is None or backbone_config is None:
        if not run_file.is_file():
            raise FileNotFoundError(f"{checkpoint} has no {RUN_FILE}; pass --config with the run's config")
        described = json.loads(run_file.read_text())
        config = config or Config.model_validate(described["config"])
        backbone_config = backbone_config or described["backbone_config"]
    if config.model.lora.enabled:
        return _export_lora_checkpoint(checkpoint, out, config, backbone_config)
    model = build_backbone(config.model.backbone, None, **backbone_config)
    ema = EMA(model, config.ema.decay, config.ema.warmup)
    extra = load_checkpoint(checkpoint, TrainingState(model, build_optimizer(model, config.optim), ema))
    written = {}
    for name, module in (("ema", ema.module), ("student", model)):
        module.save_pretrained(out / name)
        written[name] = out / name
    print(f"exported step {extra['runner']['step']} of {checkpoint} -> {out}/{{ema,student}}")
    return written


def _export_lora_checkpoint(checkpoint: Path, out: Path, config: Config, backbone_config: dict) -> dict[str, Path]:
    """A LoRA checkpoint holds adapters only: rebuild the base as training did (``model.pretrained``,
    or the seeded random init), load the adapters, write them (``out/lora/*``) and merged (``out/*``)."""
    torch.manual_seed(config.train.seed)
    model = build_backbone(config.model.backbone, config.model.pretrained,
                           **({} if config.model.pretrained else backbone_config))
    apply_lora(model, config.model.lora)
    ema = AdapterEMA(model, config.ema.decay, config.ema.warmup)
    extra = load_checkpoint(checkpoint, LoRATrainingState(model, build_optimizer(model, config.optim), ema))
    written = {}
    for name, adapter in (("ema", EMA_ADAPTER), ("student", TRAINED_ADAPTER)):
        save_adapter(model, out / "lora" / name, adapter)
        save_merged(model, out / name, adapter)
        written[name] = out / name
    print(f"exported step {extra['runner']['step']} of {checkpoint} -> {out}/{{ema,student}} and {out}/lora")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apex_ray.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder (e.g. runs/apex/ray/<run>/step_0000200)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", help="the run's YAML config, for checkpoints without apex_run.json")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config) if args.config else None
        described = (Path(args.checkpoint) / RUN_FILE).is_file()
        # Without the run file the preset's own backbone config is assumed.
        export_checkpoint(args.checkpoint, args.out, config, None if described or config is None else {})
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
