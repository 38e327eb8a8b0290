"""Prepare throughput: the Ray Data job vs a plain single-process loop, same encoders, same images.

    python bench/bench_prepare.py [--n 2000] [--batch-size 64] [--text-actors N] [--codec-actors N]

Both prepare ``--n`` ShapeEval images (``write_pairs``) with the tiny preset's encoders (pixel
codec + MiniLM) and write parquet shards; both timings include loading the encoders. The loop
calls the same ``decode_rows``, ``ImageEncoder`` and ``CaptionEncoder`` the actor pools run.
Ray is started here with ``num_cpus = os.cpu_count()``; the actor pools share those CPUs
(MiniLM dominates, so it gets most of them); the loop runs with each of ``--threads`` torch
threads and the fastest counts. Prints ``prepare: ray X img/s, plain Y img/s, ratio Z``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from apex_ray.shapeeval import write_pairs
from data_pipelines.actors import CaptionEncoder, ImageEncoder
from data_pipelines.config import InputConfig, load_prepare_config
from data_pipelines.decode import decode_rows
from data_pipelines.prepare_latents import prepare
from data_pipelines.readers import plan_input, read_units


def plain_loop(raw: Path, output: Path, batch_size: int, size: int = 32) -> int:
    """The whole preparation in this process: read, decode, encode, write one parquet file."""
    image_encoder = ImageEncoder({"name": "pixel"}, size, "float32")
    caption_encoder = CaptionEncoder("minilm", None, 32, "float16")
    plan = plan_input(InputConfig(path=str(raw)))
    written, writer = 0, None
    try:
        for chunk in read_units(plan, plan.units):
            rows = {name: np.array(chunk.column(name).to_pylist(), dtype=object) for name in chunk.column_names}
            for start in range(0, len(rows["id"]), batch_size):
                batch = {key: value[start:start + batch_size] for key, value in rows.items()}
                encoded = caption_encoder(image_encoder(decode_rows(batch, size, size // 2)))
                keep = encoded["reason"] == ""
                table = pa.table({
                    "id": pa.array(list(encoded["id"][keep]), pa.string()),
                    "caption": pa.array(list(encoded["caption"][keep]), pa.string()),
                    **{name: pa.FixedShapeTensorArray.from_numpy_ndarray(encoded[name][keep])
                       for name in ("latent", "text_embeds", "text_mask", "pooled")},
                })
                writer = writer or pq.ParquetWriter(output, table.schema)
                writer.write_table(table)
                written += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return written


sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--text-actors", type=int, default=cpus, help="MiniLM actors")
    parser.add_argument("--codec-actors", type=int, default=1, help="decode + pixel codec actors")
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}),
                        help="torch thread counts tried for the plain loop; the fastest is compared")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        raw = write_pairs(Path(folder) / "raw.parquet", args.n, seed=0, rows_per_group=args.batch_size * 4)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        # A quarter of the CPUs decodes (in the codec actors), the rest runs MiniLM.
        codec_cpus = 0.25 * cpus / args.codec_actors
        text_cpus = 0.75 * cpus / args.text_actors
        config = load_prepare_config(None, [
            f"codec.batch_size={args.batch_size}", f"text.batch_size={args.batch_size}",
            f"codec.concurrency={args.codec_actors}", f"codec.num_cpus={codec_cpus}",
            f"text.concurrency={args.text_actors}", f"text.num_cpus={text_cpus}",
        ], {"input.path": str(raw), "output": str(Path(folder) / "ray")})
        started = time.perf_counter()
        manifest = prepare(config)
        ray_rate = manifest["rows_written"] / (time.perf_counter() - started)
        ray.shutdown()

        plain_rates = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            started = time.perf_counter()
            written = plain_loop(raw, Path(folder) / f"plain-{threads}.parquet", args.batch_size)
            assert written == manifest["rows_written"] == args.n
            plain_rates[threads] = written / (time.perf_counter() - started)
    plain_rate = max(plain_rates.values())
    print(f"setup: {args.n} ShapeEval images 32x32, pixel codec + MiniLM, {cpus} CPUs; ray: {args.codec_actors} "
          f"codec actor(s) x {codec_cpus:.2f} CPU, {args.text_actors} MiniLM actor(s) x {text_cpus:.2f} CPU; plain: "
          + ", ".join(f"{rate:.1f} img/s with {threads} torch thread(s)" for threads, rate in plain_rates.items())
          + "; timings include loading the encoders")
    print(f"prepare: ray {ray_rate:.1f} img/s, plain {plain_rate:.1f} img/s, ratio {ray_rate / plain_rate:.2f}")
    from result import report

    report("data_prepare_throughput", ray_rate / plain_rate, "Ray Data prepare img/s / plain loop img/s",
           ray_img_s=round(ray_rate, 1), plain_img_s=round(plain_rate, 1), images=args.n)

if __name__ == "__main__":
    main()
