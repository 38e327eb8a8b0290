"""``python -m apex_ray.train [--config FILE] [key.sub=value ...]``: APEX on a Ray Train TorchTrainer.

With no arguments: the embedded default (local Ray, 2 CPU workers, tiny SANA, ShapeEval,
MLflow in a local sqlite file). With ``RAY_ADDRESS`` set (e.g. under ``ray job submit``) it
joins that cluster instead of starting one.
"""
from __future__ import annotations

import argparse
import sys

from apex_ray.config import ConfigError, load_config
from apex_ray.orchestration.launcher import RunFailed, describe_training_failure, run
from apex_ray.orchestration.tracking import TrackingError, redact_credentials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apex_ray.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own console output (Ray Data progress and logs, Ray Train and "
                             "worker logs, Ray Core start-up and C++ log lines, warnings); without it only "
                             "apex-ray's lines are printed")
    parser.add_argument("--resume-from", metavar="STEP_DIR",
                        help="start this run from a checkpoint folder (a run's step_* folder, path or URI): "
                             "weights, optimiser, EMA, step and data position (= train.resume_from)")
    parser.add_argument("--fresh", action="store_true",
                        help="a tracking.run_name that already has a run folder starts again as a new run (and "
                             "MLflow run of the same name) instead of resuming: the old folder is renamed to "
                             "<name>.replaced-<timestamp>, never deleted (refused for an s3:// output_dir); with "
                             "--resume-from the new run starts from that checkpoint")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=3e-4")
    args = parser.parse_args(argv)
    if args.resume_from:
        args.overrides = [*args.overrides, f"train.resume_from={args.resume_from}"]
    if not args.verbose:
        import logging

        logging.getLogger("mlflow").setLevel(logging.ERROR)  # its advice on pyfunc logging, not our lines
    try:
        config = load_config(args.config, args.overrides)
        result = run(config, verbose=args.verbose, fresh=args.fresh)
    except (ConfigError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        from ray.train import TrainingFailedError

        if not isinstance(err, TrainingFailedError) or args.verbose:
            raise
        # Restarts used up (each was announced with its reason): the reason, not Ray's traceback.
        print(f"error: {describe_training_failure(err)}. The MLflow run is marked FAILED; its checkpoints are kept: "
              "fix the cause and rerun the same command to resume from the latest one (--verbose shows the "
              "full traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the MLflow run is marked KILLED; rerun the same command (without --fresh) "
              "with the same tracking.run_name to resume from its latest checkpoint", file=sys.stderr)
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
