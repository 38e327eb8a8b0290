"""Generate images with an exported model at any NFE: prompt lists, GenEval and DPG-Bench layouts, speed.

    python -m apex_ray.sample --checkpoint runs/apex/.../export/ema --prompts "a red circle" --nfe 1
    python -m apex_ray.sample --checkpoint DIR --prompts prompts.txt --nfe 2 --order 2 --out samples
    python -m apex_ray.sample --checkpoint DIR --geneval-metadata geneval/prompts/evaluation_metadata.jsonl \
        --images-per-prompt 4 --nfe 1 --vae Efficient-Large-Model/Sana_600M_512px_diffusers --out geneval
    python -m apex_ray.sample --checkpoint DIR --dpg-prompts ELLA/dpg_bench/prompts --images-per-prompt 4 --out dpg
    python -m apex_ray.sample --checkpoint DIR --prompts "a red circle" --nfe 1 --benchmark

``--checkpoint`` is a folder written by ``VelocityModel.save_pretrained`` (a run's ``export/ema``);
with ``--backbone PRESET`` it may instead be diffusers weights (e.g. ``Qwen/Qwen-Image``, the base
of a ``--lora`` adapter written by ``apex_ray.models.lora.save_adapter``). Sampling is the paper's any-step
sampler (Algorithm 2, Appendix E); image ``i`` of a run starts from noise seeded by ``seed + i``.
Pixel-space models (3 latent channels) need no decoder; latent models need ``--vae`` (a VAE or
pipeline folder, or hub id) and are decoded as their diffusers pipeline does.

Layouts: ``--prompts`` writes ``<out>/<prompt:05d>_<k:02d>.png`` and ``<out>/grid.png``;
``--geneval-metadata`` writes GenEval's ``<out>/<index:05d>/metadata.jsonl`` (that prompt's line),
``samples/<k:04d>.png`` and ``grid.png``; ``--dpg-prompts`` (a folder of ``<id>.txt`` or a JSON
``{id: prompt}``) writes ``<out>/<id>.png``, the prompt's images tiled 2 x 2 for 4 per prompt, as
DPG-Bench's scorer expects. ``--benchmark`` prints latency (batch 1, median after warm-up) and
throughput (batch 10) like the paper's Table 1; text encoding is not timed, decoding is.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from apex_ray.common.images import tensor_to_images
from apex_ray.engine.evaluation import Decode, Encode, generate, image_grid
from apex_ray.engine.inference import (
    SampleError,
    default_text_encoder,
    latent_decoder,
    load_model,
    sampler_config,
)
from apex_ray.method.sampler import SamplerConfig, sample
from apex_ray.models import (
    VelocityModel,
    build_text_encoder,
)


@dataclass(frozen=True)
class Prompt:
    text: str
    name: str  # file stem in the output layout
    metadata: str | None = None  # GenEval: the prompt's line of evaluation_metadata.jsonl


def read_prompts(source: str) -> list[Prompt]:
    """One prompt per non-empty line of the file ``source``, or ``source`` itself as the prompt."""
    lines = Path(source).read_text().splitlines() if os.path.isfile(source) else [source]
    texts = [line.strip() for line in lines if line.strip()]
    return [Prompt(text, f"{i:05d}") for i, text in enumerate(texts)]


def read_geneval_metadata(path: str) -> list[Prompt]:
    """GenEval's ``evaluation_metadata.jsonl``: one JSON object with a ``prompt`` per line."""
    prompts = []
    for i, line in enumerate(line for line in Path(path).read_text().splitlines() if line.strip()):
        record = json.loads(line)
        if "prompt" not in record:
            raise SampleError(f"{path}: line {i + 1} has no 'prompt' field")
        prompts.append(Prompt(record["prompt"], f"{i:05d}", line.strip()))
    return prompts


def read_dpg_prompts(path: str) -> list[Prompt]:
    """DPG-Bench prompts: a folder of ``<id>.txt`` files (ELLA's layout) or a JSON ``{id: prompt}``."""
    if os.path.isdir(path):
        files = sorted(Path(path).glob("*.txt"))
        if not files:
            raise SampleError(f"{path} holds no <id>.txt prompt files")
        return [Prompt(f.read_text().strip(), f.stem) for f in files]
    return [Prompt(text.strip(), file_name(str(name), path)) for name, text in json.loads(Path(path).read_text()).items()]


def file_name(name: str, source: str) -> str:
    """``name`` when it is one plain file name; an id such as ``../x`` or ``/abs/x`` would write
    outside ``--out``."""
    if name in ("", ".", "..") or Path(name).name != name or "\\" in name or "\0" in name:
        raise SampleError(f"{source}: prompt id {name!r} is not a plain file name (no '/', '\\' or '..'); "
                          "rename it, images are saved as <id>.png")
    return name


def to_pil(image: torch.Tensor) -> Image.Image:
    """An image in [-1, 1] ``[3, H, W]`` as 8-bit RGB."""
    return Image.fromarray(tensor_to_images(image))


def tiles(images: torch.Tensor) -> Image.Image:
    """``n`` images side by side in a near-square grid with no borders (DPG-Bench splits it evenly)."""
    columns = math.ceil(math.sqrt(images.shape[0]))
    rows = math.ceil(images.shape[0] / columns)
    blank = torch.full_like(images[0], -1.0)
    padded = list(images) + [blank] * (rows * columns - images.shape[0])
    return to_pil(torch.cat([torch.cat(padded[r * columns:(r + 1) * columns], dim=2) for r in range(rows)], dim=1))


def generate_per_prompt(model, encode: Encode, prompts: list[Prompt], per_prompt: int, latent_shape, sampler,
                        decode: Decode, seed: int, batch_size: int, device) -> Iterator[tuple[int, torch.Tensor]]:
    """``(prompt index, its images [K, 3, H, W] in [-1, 1])`` in prompt order, a few prompts at a time.

    Image ``k`` of prompt ``i`` starts from noise seeded by ``seed + i * K + k``.
    """
    chunk = max(1, batch_size // per_prompt)
    for start in range(0, len(prompts), chunk):
        group = range(start, min(start + chunk, len(prompts)))
        captions = [prompts[i].text for i in group for _ in range(per_prompt)]
        seeds = [seed + i * per_prompt + k for i in group for k in range(per_prompt)]
        images = generate(model, encode, captions, seeds, latent_shape, sampler, decode, batch_size, device)
        for offset, i in enumerate(group):
            yield i, images[offset * per_prompt:(offset + 1) * per_prompt]


def grid_scale(side: int) -> int:
    """Upscaling that makes tiny images visible in a grid (none for real resolutions)."""
    return max(1, 128 // side)


GRID_IMAGES = 64
"""``--prompts`` runs put their first images in ``grid.png``, at most this many."""


def write_plain(out: Path, prompts: list[Prompt], results) -> None:
    shown = []
    for i, images in results:
        for k, image in enumerate(images):
            to_pil(image).save(out / f"{prompts[i].name}_{k:02d}.png")
        shown.extend(images[:GRID_IMAGES - len(shown)])
    grid = torch.stack(shown)
    image_grid(grid, scale=grid_scale(grid.shape[-1])).save(out / "grid.png")


def write_geneval(out: Path, prompts: list[Prompt], results) -> None:
    for i, images in results:
        folder = out / prompts[i].name
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(prompts[i].metadata + "\n")
        for k, image in enumerate(images):
            to_pil(image).save(folder / "samples" / f"{k:04d}.png")
        image_grid(images, scale=grid_scale(images.shape[-1])).save(folder / "grid.png")


def write_dpg(out: Path, prompts: list[Prompt], results) -> None:
    for i, images in results:
        tiles(images).save(out / f"{prompts[i].name}.png")


def velocity_in(model: VelocityModel, dtype: torch.dtype) -> Callable:
    """``model`` as a float32-in, float32-out velocity function that computes in ``dtype``."""
    if dtype == torch.float32:
        return model
    return lambda x_t, t, cond: model(x_t.to(dtype), t, cond).float()


def benchmark(model, encode: Encode, prompt: str, latent_shape, sampler: SamplerConfig, decode: Decode,
              device: torch.device, repeats: int = 10) -> tuple[float, float]:
    """(latency in s at batch 1: median of ``repeats`` runs after a warm-up, throughput in images/s
    at batch 10) of sampling plus decoding; the prompt is encoded once, outside the timing."""
    def seconds(batch: int, runs: int) -> float:
        cond = encode([prompt] * batch).to(device)
        shape = (batch, *latent_shape)
        times = []
        for run in range(runs + 1):  # run 0 warms up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            with torch.no_grad():
                result = sample(model, cond, shape, sampler, torch.Generator(device).manual_seed(run), device=device)
                decode(result.images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:])

    return seconds(1, repeats), 10 / seconds(10, max(3, repeats // 3))


def parameter_count(n: int) -> str:
    """``n`` parameters as Table 1 writes them, in the unit that suits: 1.8M, 0.6B, 1.6B, 20.0B."""
    if n >= 500e6:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apex_ray.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="exported save_pretrained folder (e.g. export/ema)")
    parser.add_argument("--backbone", help="preset of --checkpoint when it holds diffusers weights, not an export")
    parser.add_argument("--lora", help="LoRA adapter folder (apex_ray.models.lora.save_adapter) to load on top")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompts", help="a text file, one prompt per line, or a prompt")
    which.add_argument("--geneval-metadata", help="GenEval's evaluation_metadata.jsonl")
    which.add_argument("--dpg-prompts", help="DPG-Bench prompts: folder of <id>.txt, or JSON {id: prompt}")
    parser.add_argument("--nfe", type=int, default=1, help="network calls per image")
    parser.add_argument("--order", type=int, choices=(1, 2), default=1, help="2: Heun predictor-corrector")
    parser.add_argument("--stochastic-ratio", type=float, default=0.0, help="rho in [0, 1] (Appendix E)")
    parser.add_argument("--extrapolation", type=float, default=0.0, help="kappa in [0, 1] (Appendix E)")
    parser.add_argument("--seed", type=int, default=0, help="image k of prompt i starts from noise seeded by "
                                                             "seed + i * images-per-prompt + k (default 0)")
    parser.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="images generated at once (default 16)")
    parser.add_argument("--out", default="samples", help="output folder (default samples)")
    parser.add_argument("--text-encoder", help="text encoder preset (default: the one paired with the model)")
    parser.add_argument("--text-encoder-path", help="local folder or hub id of the text encoder's weights "
                                                    "(default: the preset's)")
    parser.add_argument("--max-text-length", type=int, help="default: the text encoder preset's")
    parser.add_argument("--vae", help="VAE or pipeline folder / hub id, for latent models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--benchmark", action="store_true", help="also time latency and throughput (Table 1)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    try:
        sampler = sampler_config(args.nfe, args.order, args.stochastic_ratio, args.extrapolation)
        if args.geneval_metadata:
            prompts, write = read_geneval_metadata(args.geneval_metadata), write_geneval
        elif args.dpg_prompts:
            prompts, write = read_dpg_prompts(args.dpg_prompts), write_dpg
        else:
            prompts, write = read_prompts(args.prompts), write_plain
        model = load_model(args.checkpoint, args.backbone, args.lora).to(device, dtype)
        encoder = build_text_encoder(args.text_encoder or default_text_encoder(model), args.text_encoder_path,
                                     max_length=args.max_text_length, device=device)
        decode = latent_decoder(model, args.vae, device, dtype)
    except (SampleError, ValueError, OSError) as error:
        print(f"apex_ray.sample: {error}", file=sys.stderr)
        return 2

    velocity = velocity_in(model, dtype)
    latent_shape = (model.latent_channels, model.sample_size, model.sample_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = generate_per_prompt(velocity, encoder.encode, prompts, args.images_per_prompt, latent_shape, sampler,
                                  decode, args.seed, args.batch_size, device)
    write(out, prompts, results)
    print(f"{len(prompts) * args.images_per_prompt} images ({len(prompts)} prompts, NFE {sampler.nfe}) in {out}")
    if args.benchmark:
        latency, throughput = benchmark(velocity, encoder.encode, prompts[0].text, latent_shape, sampler, decode,
                                        device)
        params = parameter_count(sum(p.numel() for p in model.parameters()))
        print(f"{'Model':<28} {'NFEs':>4} {'Throughput (samples/s)':>23} {'Latency (s)':>12} {'Params':>8}")
        name = Path(args.checkpoint).name[:28]
        print(f"{name:<28} {sampler.nfe:>4} {throughput:>23.2f} {latency:>12.3f} {params:>8}")
        print(f"({device}, {str(dtype).removeprefix('torch.')}; latency: batch 1, median of 10 runs after a warm-up; "
              "throughput: batch 10; sampling and decoding, text encoded beforehand)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
