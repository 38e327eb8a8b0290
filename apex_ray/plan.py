"""``python -m apex_ray.plan --config FILE --gpus N [--gpu-memory-gib 80] [key.sub=value ...]``:
per-GPU memory of a training config, and what to change when it does not fit (exit code 1).

The estimate and its assumptions: :mod:`apex_ray.engine.memory_plan`.
"""
from __future__ import annotations

import argparse
import sys

from apex_ray.config import ConfigError, load_config
from apex_ray.engine.memory_plan import (
    ACTIVATION_CONSTANTS,
    format_plan,
    measure_activation_constants,
    plan,
    suggestions,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apex_ray.plan", description=__doc__)
    parser.add_argument("--config", help="YAML config (default: the embedded default)")
    parser.add_argument("--gpus", type=int, help="workers to plan for (sets distributed.num_workers)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="memory of one GPU to plan for, in GiB (default 80)")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure the activation constants on the tiny presets and print them")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    if args.calibrate:
        for family, constants in ACTIVATION_CONSTANTS.items():
            print(f"{family}: measured {measure_activation_constants(family)}, in use {constants}")
        return 0
    if args.gpus is None:
        parser.error("--gpus is required (the number of workers to plan for)")
    overrides = [*args.overrides, f"distributed.num_workers={args.gpus}"]
    try:
        config = load_config(args.config, overrides, check_files=False)  # reads no data
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    result = plan(config, args.gpu_memory_gib)
    print(format_plan(result, args.gpu_memory_gib))
    if result.fits:
        return 0
    options = suggestions(config, result, args.gpu_memory_gib)
    print("to fit, change one of:" if options else
          "no single change fits: combine LoRA, activation checkpointing, more GPUs and a smaller micro-batch")
    for option in options:
        print(f"  - {option}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
