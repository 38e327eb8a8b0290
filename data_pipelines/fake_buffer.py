"""Fake-sample buffer: a checkpoint's generations for the captions of a prepared set, written as
parquet, so that the trainer's FIFO buffer (APEX's shifted branch) holds fake data from step 0.

    python -m data_pipelines.fake_buffer --checkpoint CKPT --latents PREPARED --output FOLDER [--steps 1] [--limit N]

Ray Data batch inference: the prepared shards' text embeddings (no text encoder is needed) ->
an actor pool that loads the checkpoint once per actor and samples with
``apex_ray.method.sampler.sample`` -> staged shards + ``manifest.json`` (same complete-or-nothing
output folder as the prepared set). Shard columns: ``id``, ``caption``, ``sample`` [C, H, W]
(latent space, float32), ``text_embeds``, ``text_mask`` and ``pooled`` where the set has it.
Ids must be unique in the prepared set (each row's noise is seeded by its id); one with repeated
ids is refused.
The trainer pushes it into its buffer with :func:`apex_ray.engine.prepared.load_fake_buffer`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from ray.data import ActorPoolStrategy

from apex_ray.common.seeds import derive_seed
from apex_ray.config import ConfigError
from apex_ray.engine.prepared import (
    FAKE_BUFFER,
    PREPARED_SET,
    prepared_dataset,
    read_manifest,
    read_rows,
    shard_paths,
    tensor_columns,
    to_conditioning,
)
from apex_ray.method.sampler import SamplerConfig, sample
from apex_ray.models import load_backbone
from apex_ray.models.base import read_backbone_file
from data_pipelines.config import FakeBufferConfig, load_fake_buffer_config
from data_pipelines.output import WRITE_TASK_CPUS, OutputError, StagedOutput, content_hash, refuse_overlap
from data_pipelines.readers import READ_TASK_CPUS, InputError
from data_pipelines.resources import io_tasks

FORMAT_VERSION = 1


class FakeSampler:
    """Ray Data actor: prepared rows -> ``sample`` [B, C, H, W] from ``checkpoint`` with ``steps`` steps."""

    def __init__(self, checkpoint: str, steps: int, seed: int, latent_shape: list[int], text_dim: int,
                 num_gpus: float = 0.0) -> None:
        self.device = torch.device("cuda" if num_gpus > 0 else "cpu")
        self.model = load_backbone(checkpoint).to(self.device).eval().requires_grad_(False)
        if self.model.latent_channels != latent_shape[0] or self.model.text_embed_dim != text_dim:
            raise ValueError(
                f"checkpoint {checkpoint} takes {self.model.latent_channels}-channel latents and "
                f"{self.model.text_embed_dim}-d text embeddings, the prepared set has latents {latent_shape} and "
                f"{text_dim}-d text: prepare the set with the backbone's codec and text encoder"
            )
        self.config = SamplerConfig(steps=steps)
        self.seed = seed
        self.latent_shape = tuple(latent_shape)

    def row_noise(self, row_id: str) -> torch.Tensor:
        """The starting noise of row ``row_id``: depends on (seed, id) only, not on batching."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "fake-buffer-noise", row_id, bits=64))
        return torch.randn(self.latent_shape, generator=generator, device="cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cond = to_conditioning(batch).to(self.device)
        noise = torch.stack([self.row_noise(str(i)) for i in batch["id"]]).to(self.device)
        result = sample(self.model, cond, tuple(noise.shape), self.config, noise=noise, device=self.device)
        return {**batch, "sample": result.images.float().cpu().numpy()}


def refuse_duplicate_ids(latents: str) -> None:
    """Each row's noise is seeded by its id, so rows that share an id would share their noise:
    refuse such a set (made before ``prepare_latents`` set repeated ids aside) with what to do."""
    ids = pa.chunked_array([pa.array(read_rows(latents, ["id"])["id"], pa.string())])
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).to_pylist()
    examples = ", ".join(repr(item["values"]) for item in repeated[:3])
    raise InputError(
        f"{latents}: {sum(item['counts'] - 1 for item in repeated)} rows repeat the id of an earlier row "
        f"({examples}{', ...' if len(repeated) > 3 else ''}); the fake buffer seeds each row's noise by its id, so "
        "they would get the same noise. Prepare the set again with data_pipelines.prepare_latents, which sets "
        "repeated ids aside as duplicate_id rejects")


def make_fake_buffer(config: FakeBufferConfig) -> dict:
    """Run the job (on the current Ray cluster, starting a local one if none); returns the manifest."""
    refuse_overlap(config.output, {"checkpoint": config.checkpoint, "latents": config.latents})
    read_backbone_file(config.checkpoint)  # fails now, with what to do, if not a saved backbone
    source = read_manifest(config.latents)
    if source.get("kind") != PREPARED_SET or not source["rows_written"]:
        raise InputError(f"{config.latents} is not a prepared set with rows; run data_pipelines.prepare_latents first")
    refuse_duplicate_ids(config.latents)
    pooled = source.get("pooled_shape") is not None
    columns = ["id", "caption", "text_embeds", "text_mask"] + (["pooled"] if pooled else [])
    with StagedOutput(config.output, config.overwrite, "fake-sample buffer") as out:
        started = time.perf_counter()
        if not ray.is_initialized():
            ray.init()
        io = io_tasks(ray.cluster_resources().get("CPU", 0.0))  # 0-CPU tasks: capped, not one process per shard
        rows = prepared_dataset(config.latents, columns=columns, num_cpus=READ_TASK_CPUS, concurrency=io)
        if config.limit is not None:
            rows = rows.limit(config.limit)
        pool = config.sampler
        samples = rows.map_batches(
            FakeSampler, batch_size=pool.batch_size, compute=ActorPoolStrategy(size=pool.concurrency),
            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
            fn_constructor_kwargs={
                "checkpoint": os.path.abspath(config.checkpoint), "steps": config.steps, "seed": config.seed,
                "latent_shape": source["latent_shape"], "text_dim": source["text_shape"][1], "num_gpus": pool.num_gpus,
            },
        )
        sink = out.sink(config.rows_per_shard)
        samples.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_TASK_CPUS}, concurrency=io)
        shards, _ = out.stage_shards(sink.results)
        tensors = tensor_columns(pq.read_schema(shard_paths(out.new, {"shards": shards})[0]))
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": FAKE_BUFFER,
            "rows": sum(shard["rows"] for shard in shards),
            "sample_shape": tensors["sample"]["shape"],
            "sample_dtype": tensors["sample"]["dtype"],
            "text_shape": tensors["text_embeds"]["shape"],
            "text_dtype": tensors["text_embeds"]["dtype"],
            "pooled_shape": tensors["pooled"]["shape"] if pooled else None,
            "checkpoint": os.path.abspath(config.checkpoint),
            "backbone_family": read_backbone_file(config.checkpoint)["family"],
            "steps": config.steps,
            "seed": config.seed,
            "source": {"path": os.path.abspath(config.latents), "config_hash": source["config_hash"]},
            "shards": shards,
            "content_hash": content_hash(shards),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        manifest = out.finish(manifest)
    elapsed = time.perf_counter() - started
    print(f"fake_buffer: {manifest['rows']} samples ({config.steps}-step) in {elapsed:.1f} s "
          f"({manifest['rows'] / elapsed:.1f} samples/s) -> {out.path}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.fake_buffer", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML job config (fields: FakeBufferConfig in data_pipelines/config.py)")
    parser.add_argument("--checkpoint", help="folder written by VelocityModel.save_pretrained")
    parser.add_argument("--latents", help="prepared set (data_pipelines.prepare_latents output)")
    parser.add_argument("--output", help="folder of the fake-sample buffer")
    parser.add_argument("--steps", type=int, help="sampler steps (default 1: one-step samples)")
    parser.add_argument("--limit", type=int, help="sample only the first N rows of the prepared set")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--batch-size", type=int, help="default 64")
    parser.add_argument("--concurrency", type=int, help="sampler actors (default 1)")
    parser.add_argument("--num-cpus", type=float, help="CPUs per actor (default 1)")
    parser.add_argument("--num-gpus", type=float, help="GPUs per actor (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a complete buffer at --output (kept until the new one is complete)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="any config field, e.g. sampler.concurrency=4")
    args = parser.parse_args(argv)
    flags = {
        "checkpoint": args.checkpoint, "latents": args.latents, "output": args.output, "steps": args.steps,
        "limit": args.limit, "seed": args.seed, "overwrite": True if args.overwrite else None,
        "sampler.batch_size": args.batch_size, "sampler.concurrency": args.concurrency,
        "sampler.num_cpus": args.num_cpus, "sampler.num_gpus": args.num_gpus,
    }
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        config = load_fake_buffer_config(args.config, args.overrides,
                                         {k: v for k, v in flags.items() if v is not None})
        make_fake_buffer(config)
    except (ConfigError, InputError, OutputError, FileNotFoundError) as error:
        print(f"fake_buffer: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
