"""What Ray Train costs: the same APEX steps in a 1-worker TorchTrainer vs a plain in-process loop.

    python bench/bench_ray_overhead.py [--steps 30] [--batch 16]

Ray: ``apex_ray.train.run`` with one ``single``-strategy worker (1 CPU, hence 1 torch thread),
in-memory ShapeEval, a metric report every step. Its per-step wall time is read off the MLflow
timestamps of the ``loss`` metric (so data, reporting and tracking are included), after warm-up.
Plain: ``StepRunner.train_step`` on one thread at the same batch (bench_step's loop). Prints the
steady-state ratio and the fixed start-up cost (Ray start, trainer, worker, data).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import time_objective  # noqa: E402
from result import report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    from apex_ray.config import load_config
    from apex_ray.orchestration.launcher import run

    torch.set_num_threads(1)
    plain, _ = time_objective("apex", args.batch, args.steps, args.warmup)
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(None, [
            f"output_dir={folder}", f"train.steps={args.steps}", f"train.global_batch={args.batch}",
            "distributed.strategy=single", "distributed.num_workers=1", "data.source=inline-shapeeval",
            f"data.num_samples={args.batch * 8}", "train.log_every=1", f"train.eval_every={args.steps * 10}",
            f"train.checkpoint_every={args.steps * 10}", "eval.score_nfe=[1]", "eval.grid_nfe=[1]",
            "eval.images_per_prompt=1"])
        started = time.time()
        result = run(config)
        history = sorted(MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "loss"),
                         key=lambda m: m.step)
    stamps = [m.timestamp / 1000 for m in history]
    steady = stamps[args.warmup:-1]  # the last step also evaluates and exports
    per_step = statistics.median(b - a for a, b in zip(steady, steady[1:]))
    startup = stamps[0] - started
    ratio = per_step / plain
    print(f"APEX, tiny SANA, batch {args.batch}, 1 thread: plain loop {plain * 1000:.1f} ms/step, "
          f"Ray Train worker {per_step * 1000:.1f} ms/step (reporting every step)")
    print(f"Ray / plain steady-state step time: {ratio:.2f}x; start-up before the first step {startup:.1f} s")
    report("ray_train_overhead", ratio, "Ray Train step time / plain loop step time (1 worker)",
           plain_ms=round(plain * 1000, 1), ray_ms=round(per_step * 1000, 1), startup_s=round(startup, 1))


if __name__ == "__main__":
    main()
