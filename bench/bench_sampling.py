"""One-step vs many-step sampling: wall-clock of NFE 1 against NFE 50 on the same model.

    python bench/bench_sampling.py [--checkpoint bundled:shapes-teacher] [--repeats 20] [--threads 1]

Latency is one image (batch 1) through the sampler, median of ``--repeats`` runs after a
warm-up; throughput is images/s at batch 10. Text embeddings are computed once and not timed.
Prints the NFE-1 / NFE-50 latency speed-up (the paper's headline: one call instead of fifty).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result import report  # noqa: E402
from table1 import time_sampler  # noqa: E402

from apex_ray.method.sampler import SamplerConfig  # noqa: E402
from apex_ray.models import build_text_encoder, load_backbone  # noqa: E402


def median_seconds(model, cond, shape, nfe: int, repeats: int) -> float:
    with torch.no_grad():
        return time_sampler(model, cond, shape, SamplerConfig(steps=nfe), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="bundled:shapes-teacher")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_backbone(args.checkpoint).eval()
    encoder = build_text_encoder("minilm", max_length=32)
    shape = (model.latent_channels, model.sample_size, model.sample_size)
    one = encoder.encode(["a red circle"])
    ten = encoder.encode([f"{n} blue squares" for n in range(10)])
    rows = {}
    for nfe in (1, 50):
        latency = median_seconds(model, one, (1, *shape), nfe, args.repeats if nfe == 1 else max(3, args.repeats // 4))
        batch = median_seconds(model, ten, (10, *shape), nfe, max(3, args.repeats // 4))
        rows[nfe] = (latency, 10 / batch)
        print(f"NFE {nfe:2d}: latency {latency * 1000:8.1f} ms (batch 1)   throughput {10 / batch:8.1f} img/s (batch 10)")
    speedup = rows[50][0] / rows[1][0]
    print(f"speed-up NFE 1 vs NFE 50 (latency, batch 1): {speedup:.1f}x; throughput {rows[1][1] / rows[50][1]:.1f}x")
    report("sampling_nfe1_vs_nfe50", speedup, "NFE-50 latency / NFE-1 latency (batch 1)",
           latency_ms={str(k): round(v[0] * 1000, 2) for k, v in rows.items()},
           throughput={str(k): round(v[1], 1) for k, v in rows.items()}, threads=args.threads)


if __name__ == "__main__":
    main()
