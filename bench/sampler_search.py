"""Pick a model's best multi-step sampler setting by ShapeEval (paper Algorithm 2 / Appendix E knobs).

    python bench/sampler_search.py --checkpoint bundled:shapes-teacher [--nfe 8,16,50] \
        [--images-per-prompt 2] [--write-best apex_ray/assets/shapes_teacher/sampler.json]

Tries order (1, 2), the stochastic ratio rho, the Kumaraswamy warp of the time grid and the
noise-end gap at each NFE budget (order 2 spends two calls per step), on ShapeEval's fixed
prompts and seeds. Prints every setting's Overall, sorted; ``--write-best`` stores the winner
(with its score) as JSON, which the model card and the teacher test read.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from apex_ray.engine.evaluation import shapeeval_scores
from apex_ray.method.sampler import SamplerConfig
from apex_ray.models import build_text_encoder, load_backbone

SETTINGS = {
    "order": (1, 2),
    "stochastic_ratio": (0.0, 0.5),
    "warp": ((1.0, 1.0, 1.0), (1.0, 1.0, 1.5)),  # c > 1: more steps near the data end
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="bundled:shapes-teacher")
    parser.add_argument("--nfe", default="8,16,50")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--write-best")
    args = parser.parse_args()
    model = load_backbone(args.checkpoint).eval()
    encoder = build_text_encoder("minilm", max_length=32)
    shape = (model.latent_channels, model.sample_size, model.sample_size)
    rows = []
    for nfe in (int(n) for n in args.nfe.split(",")):
        for order, rho, warp in itertools.product(*SETTINGS.values()):
            config = SamplerConfig.for_nfe(nfe, order, stochastic_ratio=rho, warp=warp)
            started = time.perf_counter()
            scores, _ = shapeeval_scores(model, encoder.encode, shape, config, args.images_per_prompt)
            # Order 2 spends 2 calls per step but one on the last: the real count is config.nfe.
            rows.append({"nfe": config.nfe, "order": order, "stochastic_ratio": rho, "warp": list(warp), **scores})
            print(f"NFE {config.nfe:3d} order {order} rho {rho:.1f} warp {warp}: overall {scores['overall']:.3f} "
                  f"({time.perf_counter() - started:.1f} s)", flush=True)
    rows.sort(key=lambda r: -r["overall"])
    print("\nbest settings:")
    for r in rows[:5]:
        print(f"  NFE {r['nfe']} order {r['order']} rho {r['stochastic_ratio']} warp {r['warp']}: {r['overall']:.3f}")
    if args.write_best:
        best = rows[0]
        Path(args.write_best).write_text(json.dumps(
            {**best, "images_per_prompt": args.images_per_prompt, "checkpoint": args.checkpoint}, indent=2) + "\n")
        print(f"wrote {args.write_best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
