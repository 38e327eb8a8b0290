"""ShapeEval scorer throughput on one core: ``python bench/bench_scorer.py [--n 2000] [--canvas 32]``."""
from __future__ import annotations

import argparse
import os
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import torch  # noqa: E402

from apex_ray.common.images import images_to_tensor  # noqa: E402

from apex_ray.shapeeval import (  # noqa: E402
    EVAL_PROMPTS,
    evaluation_set,
    render_ground_truth,
    score_images,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="number of images")
    parser.add_argument("--canvas", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)

    all_prompts, all_seeds = evaluation_set(images_per_prompt=-(-args.n // len(EVAL_PROMPTS)))
    prompts, seeds = all_prompts[: args.n], all_seeds[: args.n]
    images = render_ground_truth(prompts, seeds, args.canvas)
    tensor = images_to_tensor(images)
    for name, batch in (("uint8 [N,H,W,3]", images), ("float tensor [N,3,H,W]", tensor)):
        score_images(batch[:64], prompts[:64])
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            scores = score_images(batch, prompts)
            best = min(best, time.perf_counter() - start)
        print(
            f"scorer ({name}, {args.canvas}x{args.canvas}): {args.n} images in {best:.3f} s "
            f"-> {args.n / best:,.0f} images/s (overall {scores['overall']:.3f})"
        )


if __name__ == "__main__":
    main()
