"""What Ray Train costs: the same APEX steps in a TorchTrainer vs the same loop without Ray.

    python bench/bench_ray_overhead.py [--steps 30] [--batch 16] [--workers 1 2] [--log-every 1 10]

For each worker count and ``train.log_every``:

- Ray: ``apex_ray.train.run`` with that many workers (``single`` strategy for one, FSDP2 for two;
  1 CPU each, hence 1 torch thread), in-memory ShapeEval, MLflow metrics every ``log_every``
  steps. Its per-step wall time is read off the MLflow timestamps of the ``loss`` metric
  (data, reporting and tracking included), after warm-up, without the last step (it evaluates
  and exports).
- Plain: the same ``build_training`` + ``StepRunner.train_step`` loop in as many processes
  (torch.distributed over gloo for two, 1 thread each), reading the metrics every
  ``log_every`` steps as the Ray worker does, on a fixed batch of the same shapes.

Prints each cell's steady-state ratio and the fixed start-up cost (Ray start, trainer, workers,
data); the reported ratio is the largest of the cells. Checkpoint costs: ``bench_checkpoint.py``.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result import report  # noqa: E402

OVERRIDES = ["model.pretrained=null", "data.source=inline-shapeeval", "eval.score_nfe=[1]", "eval.grid_nfe=[1]",
             "eval.images_per_prompt=1", "distributed.cpus_per_worker=1"]


def _strategy(workers: int) -> str:
    return "single" if workers == 1 else "fsdp"


def _plain_rank(rank: int, workers: int, port: int, batch: int, steps: int, warmup: int, log_every: int,
                out: str) -> None:
    import torch.distributed as dist

    from apex_ray.config import load_config
    from apex_ray.engine.build import build_training
    from apex_ray.method.batch import Batch
    from apex_ray.method.conditioning import Conditioning

    torch.set_num_threads(1)
    if workers > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=workers)
    config = load_config(None, [*OVERRIDES, f"distributed.strategy={_strategy(workers)}",
                                f"distributed.num_workers={workers}", f"train.global_batch={batch}"])
    runner = build_training(config, "cpu", rank, text_embed_dim=384, distributed=workers > 1).runner
    micro = batch // workers
    gen = torch.Generator().manual_seed(rank)
    data = Batch(torch.randn(micro, 3, 32, 32, generator=gen),
                 Conditioning(torch.randn(micro, 32, 384, generator=gen), torch.ones(micro, 32, dtype=torch.long)))
    stamps = []
    for step in range(1, warmup + steps + 1):
        runner.train_step([data], read_metrics=step % log_every == 0)
        if step % log_every == 0:
            stamps.append((step, time.perf_counter()))
    if rank == 0:
        steady = [(s, t) for s, t in stamps if s > warmup]
        per_step = (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0])
        Path(out).write_text(str(per_step))
    if workers > 1:
        dist.destroy_process_group()


def plain_step_time(workers: int, batch: int, steps: int, warmup: int, log_every: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "per_step")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torch.multiprocessing.spawn(_plain_rank, args=(workers, port, batch, steps, warmup, log_every, out),
                                    nprocs=workers)
        return float(Path(out).read_text())


def ray_step_time(workers: int, batch: int, steps: int, warmup: int, log_every: int) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    from apex_ray.config import load_config
    from apex_ray.orchestration.launcher import run

    total = warmup + steps + 1
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(None, [
            *OVERRIDES, f"output_dir={folder}", f"train.steps={total}", f"train.global_batch={batch}",
            f"distributed.strategy={_strategy(workers)}", f"distributed.num_workers={workers}",
            f"data.num_samples={batch * 8}", f"train.log_every={log_every}", f"train.eval_every={total * 10}",
            f"train.checkpoint_every={total * 10}"])
        started = time.time()
        result = run(config)
        history = sorted(MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "loss"),
                         key=lambda m: m.step)
    points = [(m.step, m.timestamp / 1000) for m in history]
    steady = [(s, t) for s, t in points if warmup < s < total]
    per_step = statistics.median((b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(steady, steady[1:]))
    return per_step, points[0][1] - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="steady-state steps measured")
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--log-every", type=int, nargs="+", default=[1, 10])
    args = parser.parse_args()
    steps = {}
    for log_every in args.log_every:  # whole log intervals, so both loops read at the same steps
        steps[log_every] = max(args.steps, 2 * log_every) // log_every * log_every
    cells, startups = {}, []
    for workers in args.workers:
        for log_every in args.log_every:
            warmup = -(-args.warmup // log_every) * log_every
            plain = plain_step_time(workers, args.batch, steps[log_every], warmup, log_every)
            ray_time, startup = ray_step_time(workers, args.batch, steps[log_every], warmup, log_every)
            cells[f"{workers}w_log{log_every}"] = {"plain_ms": round(plain * 1000, 1), "ray_ms": round(ray_time * 1000, 1),
                                                  "ratio": round(ray_time / plain, 3)}
            startups.append(startup)
            print(f"{workers} worker(s), log_every {log_every}: plain {plain * 1000:.1f} ms/step, "
                  f"Ray Train {ray_time * 1000:.1f} ms/step, ratio {ray_time / plain:.3f}; "
                  f"start-up before the first logged step {startup:.1f} s", flush=True)
    worst = max(cell["ratio"] for cell in cells.values())
    print(f"APEX, tiny SANA, global batch {args.batch}, 1 thread per worker: worst Ray / plain steady-state "
          f"step time {worst:.3f}x")
    report("ray_train_overhead", worst, "Ray Train step time / plain loop step time (worst of workers x log_every)",
           cells=cells, startup_s=round(statistics.median(startups), 1), cpus=os.cpu_count())


if __name__ == "__main__":
    main()
