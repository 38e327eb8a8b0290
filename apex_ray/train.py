"""``python -m apex_ray.train [--config FILE] [key.sub=value ...]``: APEX on a Ray Train TorchTrainer.

With no arguments: the embedded default (local Ray, 2 CPU workers, tiny SANA, ShapeEval,
MLflow in a local sqlite file). With ``RAY_ADDRESS`` set (e.g. under ``ray job submit``) it
joins that cluster instead of starting one.
"""
from __future__ import annotations

import argparse
import sys

from apex_ray.config import ConfigError, load_config
from apex_ray.orchestration.launcher import RunFailed, run
from apex_ray.orchestration.tracking import TrackingError, redact_credentials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apex_ray.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    parser.add_argument("--resume-from", metavar="STEP_DIR",
                        help="start this run from a checkpoint folder (a run's step_* folder, path or URI): "
                             "weights, optimiser, EMA, step and data position (= train.resume_from)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=3e-4")
    args = parser.parse_args(argv)
    if args.resume_from:
        args.overrides = [*args.overrides, f"train.resume_from={args.resume_from}"]
    if not args.verbose:
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        config = load_config(args.config, args.overrides)
        result = run(config, verbose=args.verbose)
    except (ConfigError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the MLflow run is marked KILLED; rerun the same command with the same "
              "tracking.run_name to resume from its latest checkpoint", file=sys.stderr)
        return 130
    if result.metrics.get("aborted"):
        print("error: training aborted after repeated non-finite losses; the last checkpoint is at "
              f"{result.checkpoint_path}", file=sys.stderr)
        return 1
    uri = redact_credentials(result.tracking_uri)
    print("\ndone.")
    print(f"  checkpoints:      {result.storage_path}")
    print(f"  final checkpoint: {result.checkpoint_path}")
    print(f"  exported weights: {result.export_path}  (diffusers save_pretrained: ema/, student/)")
    print(f"  MLflow run:       {result.run_id} in {uri}")
    ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"
    print(f"  browse:           {ui}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
