"""The paper's Table 1 in miniature: ShapeEval per task, latency and throughput, teacher vs APEX
(vs a one-step peer).

    python bench/table1.py --teacher apex_ray/assets/shapes_teacher --apex runs/apex-ft/.../export/ema \
        [--peer runs/cd-ft/.../export/ema] [--images-per-prompt 4] [--out docs/table1.md] [--grids docs/images]

Rows: the teacher (flow matching) at NFE 1, 2, 4, 50, APEX at NFE 1, 2, 4 and, with ``--peer``, the
consistency-distillation peer (``objective.kind=consistency``, same harness) at NFE 1, 2, 4, each
with the sampler setting given by ``--teacher-sampler`` / ``--apex-sampler`` / ``--peer-sampler``,
default first-order steps (the peer's multi-step rows use the same flow sampler as APEX's, not
CM's re-noising multistep sampler). Same prompts and seeds
for every row (ShapeEval's fixed list). Latency is one image (batch 1) through the sampler,
median of ``--repeats`` runs after warm-up; throughput is images/s at batch 10. Text embeddings
are computed once beforehand and not timed (training never runs the encoder either).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from apex_ray.engine.evaluation import image_grid
from apex_ray.engine.scoring import correctness, evaluation_images, prompt_tasks
from apex_ray.method.sampler import SamplerConfig, sample
from apex_ray.models import build_text_encoder, load_backbone
from apex_ray.shapeeval import TASKS, score_images
from apex_ray.shapeeval.intervals import bootstrap_interval


def sampler_from_json(text: str | None, nfe: int) -> SamplerConfig:
    """``{"order": 2, "warp": [..]}`` applied at ``nfe`` calls (steps derived from the order)."""
    options = json.loads(text) if text else {}
    order = options.pop("order", 1)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return SamplerConfig.for_nfe(nfe, order, **options)


def time_sampler(model, cond, shape, config: SamplerConfig, repeats: int) -> float:
    sample(model, cond, shape, config, generator=torch.Generator().manual_seed(0))  # warm-up
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        sample(model, cond, shape, config, generator=torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def evaluate_row(name, model, encoder, nfe, sampler, images_per_prompt, repeats, grids: Path | None):
    images, prompts = evaluation_images(model, encoder.encode, sampler, images_per_prompt)
    captions = [p.caption for p in prompts]
    shape = (model.latent_channels, model.sample_size, model.sample_size)
    scores = score_images(images, prompts)
    # 95% bootstrap interval of Overall over the prompts (stratified by task; one model = one
    # training seed, so the interval says how far the 54 prompts x images pin the score, not the seed).
    _, low, high = bootstrap_interval(correctness(images, prompts, images_per_prompt)[None], prompt_tasks())
    one = encoder.encode(captions[:1])
    ten = encoder.encode(captions[:10])
    latency = time_sampler(model, one, (1, *shape), sampler, repeats)
    throughput = 10 / time_sampler(model, ten, (10, *shape), sampler, max(3, repeats // 4))
    if grids is not None:
        grids.mkdir(parents=True, exist_ok=True)
        pick = torch.arange(0, len(images), max(1, len(images) // 32))[:32]
        stem = re.sub(r"[^a-z0-9]+", "_", name.lower().split("(")[0]).strip("_")  # "Teacher (FM)" -> teacher
        image_grid(images[pick], columns=8).save(grids / f"{stem}_nfe{nfe}.png")
    return {"model": name, "nfe": sampler.nfe, "sampler": sampler, **scores, "interval": (low, high), "latency_s": latency,
            "throughput": throughput, "params": sum(p.numel() for p in model.parameters())}


def markdown(rows: list[dict]) -> str:
    head = ["Model", "NFE", *TASKS, "Overall", "95% interval (prompts)", "Latency (s, bs 1)",
            "Throughput (img/s, bs 10)", "Params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["nfe"]), *(f"{r[t]:.2f}" for t in TASKS), f"**{r['overall']:.3f}**",
                 f"[{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]",
                 f"{r['latency_s'] * 1000:.1f} ms", f"{r['throughput']:.1f}", f"{r['params'] / 1e6:.2f}M"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="exported teacher folder (save_pretrained)")
    parser.add_argument("--apex", help="exported APEX folder (save_pretrained)")
    parser.add_argument("--teacher-nfe", default="1,2,4,50")
    parser.add_argument("--apex-nfe", default="1,2,4")
    parser.add_argument("--teacher-sampler", help='JSON sampler options for the teacher, e.g. {"order": 2}')
    parser.add_argument("--apex-sampler", help="JSON sampler options for APEX")
    parser.add_argument("--peer", help="exported consistency-distillation peer folder (objective.kind=consistency, "
                                       "its export/ema), scored like --apex")
    parser.add_argument("--peer-nfe", default="1,2,4")
    parser.add_argument("--peer-sampler", help="JSON sampler options for the peer")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--grids", type=Path, help="folder for sample grids")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    encoder = build_text_encoder("minilm")
    rows = []
    runs = [("Teacher (FM)", args.teacher, args.teacher_nfe, args.teacher_sampler)]
    if args.apex:
        runs.append(("APEX", args.apex, args.apex_nfe, args.apex_sampler))
    if args.peer:
        runs.append(("CD peer", args.peer, args.peer_nfe, args.peer_sampler))
    for name, path, nfes, sampler_json in runs:
        model = load_backbone(path).eval()
        for nfe in (int(n) for n in nfes.split(",")):
            row = evaluate_row(name, model, encoder, nfe, sampler_from_json(sampler_json, nfe),
                               args.images_per_prompt, args.repeats, args.grids)
            rows.append(row)
            print(f"{name:14s} NFE {nfe:3d}: overall {row['overall']:.3f} "
                  f"[{row['interval'][0]:.3f}, {row['interval'][1]:.3f}]  latency {row['latency_s'] * 1000:7.1f} ms"
                  f"  throughput {row['throughput']:7.1f} img/s", flush=True)
    table = markdown(rows)
    header = (f"<!-- generated by bench/table1.py on {dt.date.today()} | {platform.processor() or platform.machine()}, "
              f"{args.threads} threads, torch {torch.__version__} | {args.images_per_prompt} images per prompt -->")
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + "\n" + table + "\n")


if __name__ == "__main__":
    main()
