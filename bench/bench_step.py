"""Step time of APEX vs plain flow matching on the tiny SANA preset at equal batch size.

    python bench/bench_step.py [--batch 16] [--steps 10] [--threads 2]

Prints per-step wall time of each objective, their ratio and the network calls / rows per step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result import report  # noqa: E402

from apex_ray.config import load_config
from apex_ray.engine.build import build_training
from apex_ray.method.batch import Batch
from apex_ray.method.conditioning import Conditioning


def time_objective(kind: str, batch: int, steps: int, warmup: int) -> tuple[float, dict[str, float]]:
    config = load_config(None, [f"objective.kind={kind}", "model.pretrained=null", "distributed.strategy=single",
                                "distributed.num_workers=1"])
    runner = build_training(config, "cpu", text_embed_dim=384, distributed=False).runner
    # Synthetic inputs of the tiny preset's shapes: the cost does not depend on the values.
    data = Batch(torch.randn(batch, 3, 32, 32),
                 Conditioning(torch.randn(batch, 32, 384), torch.ones(batch, 32, dtype=torch.long)))
    times, last = [], {}
    for i in range(warmup + steps):
        started = time.perf_counter()
        last = runner.train_step([data])
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fm_time, fm = time_objective("flow_matching", args.batch, args.steps, args.warmup)
    apex_time, apex = time_objective("apex", args.batch, args.steps, args.warmup)
    print(f"tiny SANA, batch {args.batch}, {args.threads} threads, median of {args.steps} steps")
    print(f"  flow matching: {fm_time * 1000:8.1f} ms/step  network calls {fm['forward_calls']:.0f}"
          f"  rows {fm['forward_rows']:.0f}")
    print(f"  APEX:          {apex_time * 1000:8.1f} ms/step  network calls {apex['forward_calls']:.0f}"
          f"  rows {apex['forward_rows']:.0f}  (main+adv with grad, EMA x_t+x_s, delta_d shifted+ref)")
    print(f"  ratio APEX / flow matching step time: {apex_time / fm_time:.2f}x")
    report("apex_vs_flow_matching_step", apex_time / fm_time, "APEX step time / flow-matching step time",
           fm_ms=round(fm_time * 1000, 1), apex_ms=round(apex_time * 1000, 1), batch=args.batch,
           calls={"flow_matching": fm["forward_calls"], "apex": apex["forward_calls"]})


if __name__ == "__main__":
    main()
