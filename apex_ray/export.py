"""``python -m apex_ray.export CHECKPOINT --out DIR``: a training checkpoint's EMA and student
weights as diffusers ``save_pretrained`` folders (``DIR/ema``, ``DIR/student``), on one CPU.

CHECKPOINT is a ``step_*`` folder of a run (``runs/apex/ray/<run>/step_0000200``). DCP reshards
on load, so a checkpoint written by any number of FSDP/DDP workers exports here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apex_ray.common import storage
from apex_ray.config import ConfigError, load_config
from apex_ray.engine.checkpointing import RUN_FILE
from apex_ray.engine.export import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apex_ray.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint folder (e.g. runs/apex/ray/<run>/step_0000200, "
                                           "or s3://bucket/runs/ray/<run>/step_0000200)")
    parser.add_argument("--out", required=True, help="output folder or URI (s3://...)")
    parser.add_argument("--config", help="the run's YAML config, for checkpoints without apex_run.json")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of --config")
    args = parser.parse_args(argv)
    if not storage.is_uri(args.checkpoint) and not Path(args.checkpoint).expanduser().exists():
        print(f"error: {args.checkpoint} does not exist: pass a checkpoint folder, a run's step_* folder "
              "(e.g. runs/apex/ray/<run>/step_0000200; `python -m apex_ray.train` prints the final one)",
              file=sys.stderr)
        return 2
    try:
        with storage.local_copy(args.checkpoint) as checkpoint, storage.local_output(args.out) as out:
            return _export(checkpoint, out, args)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _export(checkpoint: Path, out: Path, args: argparse.Namespace) -> int:
    steps = sorted(checkpoint.glob("step_*")) if checkpoint.is_dir() else []
    if not (checkpoint / RUN_FILE).is_file() and steps and not args.config:
        print(f"error: {checkpoint} is a run folder, not a checkpoint: pass one of its step_* folders, "
              f"e.g. {steps[-1]}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.overrides) if args.config else None
        described = (checkpoint / RUN_FILE).is_file()
        # Without the run file the preset's own backbone config is assumed.
        export_checkpoint(checkpoint, out, config, None if described or config is None else {})
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
