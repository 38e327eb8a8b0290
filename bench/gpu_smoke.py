"""GPU smoke test of the Ray-free layers (method, backbones, builder, step runner, FSDP2 over a
real process group at world size 1), in one run of a few minutes:

  (a) tiny SANA, FSDP2 + bf16, 50 APEX steps with the fake-sample buffer on
  (b) LoRA on the tiny Qwen-Image preset, 20 steps
  (c) a randomly initialised SANA-600M at its real 512 px latent shape (32 x 16 x 16) with
      synthetic text embeddings of Gemma-2's width (2304 x 300 tokens), 20 steps
  (d) NFE-1 sampling latency (batch 1) and throughput (batch 10) of (a) and (c)

and prints step time, peak GPU memory beside the planner's estimate, and samples/s.

    python bench/gpu_smoke.py                  # on a GPU (NCCL)
    python bench/gpu_smoke.py --device cpu --quick   # the same code paths on CPU (gloo), small

It needs torch, diffusers, transformers, peft, pydantic and pyyaml, not Ray or MLflow; on the
lent H200 (no diffusers or pydantic) carry their wheels (see docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist

from apex_ray.config import load_config
from apex_ray.engine.build import build_training
from apex_ray.engine.memory_plan import GIB, plan
from apex_ray.method.batch import Batch
from apex_ray.method.conditioning import Conditioning
from apex_ray.method.sampler import SamplerConfig, sample

CASES = {  # name: (overrides, text width, text tokens, batch, steps, quick steps)
    "a: sana-tiny fsdp bf16 apex": (["model.backbone=sana-tiny"], 384, 32, 32, 50, 6),
    "b: qwen-image-tiny lora": (["model.backbone=qwen-image-tiny", "model.lora.enabled=true",
                                 "model.text_encoder=minilm"], 384, 32, 16, 20, 4),
    "c: sana-600m 512px": (["model.backbone=sana-600m", "model.text_encoder=gemma",
                            "model.max_text_length=300", "distributed.activation_checkpointing=true"],
                           2304, 300, 8, 20, 2),
}


def init_process_group(device: torch.device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic(batch: int, latent_shape, width: int, tokens: int, device) -> Batch:
    return Batch(torch.randn(batch, *latent_shape, device=device),
                 Conditioning(torch.randn(batch, tokens, width, device=device),
                              torch.ones(batch, tokens, dtype=torch.long, device=device)))


def run_case(name: str, device: torch.device, quick: bool) -> dict:
    overrides, width, tokens, batch, steps, quick_steps = CASES[name]
    steps = quick_steps if quick else steps
    if quick and "sana-600m" in overrides[0]:
        overrides = [*overrides, "model.backbone_overrides={num_layers: 2}"]  # the real widths, 2 of 28 blocks
    config = load_config(None, [*overrides, "model.pretrained=null", "distributed.num_workers=1",
                                "distributed.strategy=fsdp", f"distributed.use_gpu={device.type == 'cuda'}",
                                f"train.global_batch={batch}", f"train.steps={steps}"], check_files=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    training = build_training(config, device, 0, text_embed_dim=width)
    synchronize(device)
    built_s = time.perf_counter() - started
    load_peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    data = synthetic(batch, training.latent_shape, width, tokens, device)
    times, metrics = [], {}
    for step in range(steps):
        started = time.perf_counter()
        metrics = training.runner.train_step([data])
        synchronize(device)
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times[1:] if len(times) > 1 else times)
    estimate = plan(config).total / GIB
    result = {
        "case": name, "steps": steps, "batch": batch, "latent_shape": list(training.latent_shape),
        "build_s": round(built_s, 2), "median_step_s": round(step_s, 4), "samples_per_s": round(batch / step_s, 1),
        "loss": round(float(metrics["loss"]), 4), "loss_adv": round(float(metrics.get("loss_adv", 0.0)), 4),
        "finite": all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values()),
        "planner_estimate_gib": round(estimate, 2),
        "peak_gib": None if device.type != "cuda" else round(torch.cuda.max_memory_allocated(device) / GIB, 2),
        "load_peak_gib": None if load_peak is None else round(load_peak, 2),
    }
    if "lora" not in name:
        result.update(sampling(training.ema, training.latent_shape, width, tokens, device))
    del training
    return result


@torch.no_grad()
def sampling(model, latent_shape, width: int, tokens: int, device: torch.device, repeats: int = 10) -> dict:
    """NFE 1: latency at batch 1 (median of ``repeats`` after a warm-up), throughput at batch 10."""
    config = SamplerConfig.for_nfe(1)
    timings = {}
    for batch in (1, 10):
        cond = synthetic(batch, latent_shape, width, tokens, device).cond
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            sample(model, cond, (batch, *latent_shape), config, device=device)  # warm-up
            runs = []
            for _ in range(repeats):
                synchronize(device)
                started = time.perf_counter()
                sample(model, cond, (batch, *latent_shape), config, device=device)
                synchronize(device)
                runs.append(time.perf_counter() - started)
        timings[batch] = statistics.median(runs)
    return {"nfe1_latency_s": round(timings[1], 4), "nfe1_throughput_per_s": round(10 / timings[10], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="few steps and a 2-block SANA-600M (a CPU check)")
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="run only these cases")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    init_process_group(device)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f", {time.strftime('%Y-%m-%d')}", flush=True)
    results = []
    try:
        for name in args.only or CASES:
            result = run_case(name, device, args.quick)
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = [r["case"] for r in results if not r["finite"]]
    if bad:
        raise SystemExit(f"non-finite metrics in: {bad}")


if __name__ == "__main__":
    main()
