"""Raw image-caption pairs -> a prepared set of latents and text embeddings, made once at cluster
scale so that training never runs a VAE or a text encoder per step.

    python -m data_pipelines.prepare_latents --input RAW --output FOLDER [--config job.yaml] [key.sub=value ...]

Ray Data streams: read (tasks) -> decode, validate, resize + centre-crop (tasks; inside the codec
actors when the codec runs on CPU) -> image codec (actor pool) -> text encoder (actor pool) ->
staged shards and rejects (sink). Nothing is lost:
each input row is either written or rejected with its reason, and the manifest records
``rows_in = rows_written + rows_rejected`` (checked before it is written); a row whose id an
earlier row already has is a ``duplicate_id`` reject. Configuration and input are validated
before Ray starts; see ``data_pipelines/config.py`` for every field. The output folder is locked
while the job runs, and the new set is swapped in only when complete (``--overwrite`` keeps the
old one until then): see ``data_pipelines/output.py``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from apex_ray.common.files import atomic_path
from apex_ray.config import ConfigError
from apex_ray.engine.prepared import (
    EMPTY_PROMPT,
    PREPARED_SET,
    REJECTS,
    load_empty_prompt,
    shard_paths,
    tensor_columns,
)
from data_pipelines.actors import CaptionEncoder, ImageEncoder
from data_pipelines.config import PrepareConfig, load_prepare_config
from data_pipelines.decode import decode_rows
from data_pipelines.output import (
    REJECT_COLUMNS,
    REJECT_PARTS,
    SHARDS,
    WRITE_TASK_CPUS,
    OutputError,
    StagedOutput,
    content_hash,
    refuse_overlap,
)
from data_pipelines.readers import InputError, InputPlan, plan_input, read_input
from data_pipelines.resources import decode_fused, io_tasks, pool_sizes

FORMAT_VERSION = 1
REJECTS_SCHEMA = pa.schema([(name, pa.string()) for name in REJECT_COLUMNS])

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobTiming:
    """Where a job's time went, from when its rows were written (one point per write task)."""

    elapsed_s: float
    """From the job's start to its last rows written."""
    first_rows_s: float
    """From the job's start to the first rows written."""
    steady_rows_per_s: float | None
    """Rows per second after the first write (None with a single write)."""
    startup_s: float | None
    """Time not spent at the steady rate: ``elapsed_s - rows / steady_rows_per_s`` (Ray workers
    and actors starting, models loading, the stream filling)."""


def prepare(config: PrepareConfig) -> dict:
    """Run the job (on the current Ray cluster, starting a local one if none) and return the manifest.

    Raises :class:`~data_pipelines.readers.InputError` (missing or empty input, wrong columns)
    and :class:`~data_pipelines.output.OutputError` (input inside the output folder, output not
    writable, in use by another job, holding files this job did not write, or already complete
    without ``overwrite``) before any work starts. The new set is built in a staging folder and
    swapped in only when complete (see :mod:`data_pipelines.output`).
    """
    return prepare_timed(config)[0]


def prepare_timed(config: PrepareConfig) -> tuple[dict, JobTiming | None]:
    """:func:`prepare`, also returning where the time went (None if no rows were written)."""
    job_started = time.time()
    refuse_overlap(config.output, {"input": config.input.path})
    plan = plan_input(config.input)
    with StagedOutput(config.output, config.overwrite, "prepared set", owned=(REJECTS, EMPTY_PROMPT)) as out:
        started = time.perf_counter()
        if not ray.is_initialized():
            ray.init()
        resources = ray.cluster_resources()
        sizes = pool_sizes(config, resources, plan.rows)
        io = io_tasks(resources.get("CPU", 0.0))
        writes = max(1, min(io, -(-plan.rows // config.storage.rows_per_shard)))  # no more than there are shards
        log.info("prepare_latents: %d codec actor(s), %d text actor(s), at most %d read and %d write tasks at once",
                 sizes["codec"], sizes["text"], io, writes)
        warn_if_short_of_resources(config, sizes, resources)
        sink = out.sink(config.storage.rows_per_shard)
        rows = read_input(plan, io, block_rows=min(config.codec.batch_size, config.text.batch_size))
        pipeline = build_pipeline(config, rows, str(out.new / EMPTY_PROMPT), sizes)
        pipeline.write_datasink(sink, ray_remote_args={"num_cpus": WRITE_TASK_CPUS}, concurrency=writes)
        timing = job_timing(sink.results, job_started)
        shards, rejects = commit(out, sink.results)
        rows_written = sum(shard["rows"] for shard in shards)
        if plan.rows != rows_written + rejects.num_rows:
            raise RuntimeError(f"row count mismatch: {plan.rows} rows in, {rows_written} written, "
                               f"{rejects.num_rows} rejected; nothing was committed (please report this bug)")
        manifest = out.finish(build_manifest(config, plan, shards, rejects, out))
    elapsed = time.perf_counter() - started
    reasons = ", ".join(f"{k} {v}" for k, v in manifest["rejects_by_reason"].items())
    print(f"prepare_latents: {plan.rows} rows in -> {rows_written} written, {rejects.num_rows} rejected"
          f"{f' ({reasons})' if reasons else ''} in {elapsed:.1f} s ({plan.rows / elapsed:.1f} rows/s"
          f"{_describe(timing)}) -> {out.path}")
    return manifest, timing


def job_timing(results: list[dict], started: float) -> JobTiming | None:
    """:class:`JobTiming` from the write results' ``finished_at`` and row counts (shard and
    reject rows); ``started`` in epoch seconds."""
    points = sorted((r["finished_at"], sum(rows for _, rows in r[SHARDS] + r.get(REJECT_PARTS, [])))
                    for r in results if "finished_at" in r)
    points = [(t, rows) for t, rows in points if rows]
    if not points:
        return None
    (first_t, first_rows), last_t = points[0], points[-1][0]
    total = sum(rows for _, rows in points)
    steady = (total - first_rows) / (last_t - first_t) if len(points) > 1 and last_t > first_t else None
    elapsed = last_t - started
    startup = elapsed - total / steady if steady else None
    return JobTiming(elapsed, first_t - started, steady, startup)


def _describe(timing: JobTiming | None) -> str:
    if timing is None or timing.steady_rows_per_s is None:
        return ""
    return (f"; first rows after {timing.first_rows_s:.1f} s, then {timing.steady_rows_per_s:.1f} rows/s, "
            f"start-up {timing.startup_s:.1f} s")


def commit(out: StagedOutput, results: list[dict]) -> tuple[list[dict], pa.Table]:
    """Assemble the new set in the staging folder: the shards and ``rejects.parquet`` (the staged
    rejects merged) beside the empty prompt the text actors wrote there; returns the shard list
    and the rejects. :meth:`StagedOutput.finish` swaps the set in."""
    shards, reject_files = out.stage_shards(results)
    parts = [pq.read_table(file).cast(REJECTS_SCHEMA) for file in reject_files]
    rejects = pa.concat_tables(parts or [REJECTS_SCHEMA.empty_table()])
    with atomic_path(out.new / REJECTS) as tmp:
        pq.write_table(rejects, tmp)
    return shards, rejects


def build_pipeline(config: PrepareConfig, rows: ray.data.Dataset, empty_prompt_file: str,
                   sizes: Mapping[str, int]) -> ray.data.Dataset:
    """raw rows -> decoded pixels (tasks, fused into the codec actors on CPU) -> latents (codec
    actors) -> text embeddings (text actors, which also write the empty prompt's embedding to
    ``empty_prompt_file``); ``sizes``: actors per pool (:func:`~data_pipelines.resources.pool_sizes`)."""
    codec, text = config.codec, config.text
    decoded = rows.map_batches(
        decode_rows, batch_size=codec.batch_size, num_cpus=config.decode_cpus,
        fn_kwargs={"size": config.image.size, "min_side": config.image.resolved_min_side,
                   "max_pixels": config.image.max_pixels},
    )
    encoded = decoded.map_batches(
        ImageEncoder, batch_size=codec.batch_size, compute=ActorPoolStrategy(size=sizes["codec"]),
        num_cpus=codec.num_cpus, num_gpus=codec.num_gpus,
        fn_constructor_kwargs={
            "codec": codec.model_dump(include={"name", "path", "subfolder", "dtype"}),
            "image_size": config.image.size, "latent_dtype": config.storage.latent_dtype, "num_gpus": codec.num_gpus,
        },
    )
    return encoded.map_batches(
        CaptionEncoder, batch_size=text.batch_size, compute=ActorPoolStrategy(size=sizes["text"]),
        num_cpus=text.num_cpus, num_gpus=text.num_gpus,
        fn_constructor_kwargs={
            "preset": text.encoder, "path": text.path, "max_length": text.max_length,
            "text_dtype": config.storage.text_dtype, "num_gpus": text.num_gpus,
            "empty_prompt_file": empty_prompt_file,
        },
    )


def warn_if_short_of_resources(config: PrepareConfig, sizes: Mapping[str, int], have: Mapping[str, float]) -> None:
    """Say so when the actor pools of ``sizes`` actors (and a decode task, unless decoding runs in
    the codec actors) cannot all run at once on the cluster as it is now (``have``): the stream
    would wait for an autoscaler, and stall without one. Read and write tasks ask for no CPU."""
    codec, text = config.codec, config.text
    cpus = (sizes["codec"] * codec.num_cpus + sizes["text"] * text.num_cpus
            + (0 if decode_fused(config) else config.decode_cpus))
    gpus = sizes["codec"] * codec.num_gpus + sizes["text"] * text.num_gpus
    if cpus > have.get("CPU", 0) or gpus > have.get("GPU", 0):
        log.warning(
            "prepare_latents: the actor pools and a decode task need %.2f CPUs and %.2f GPUs at once but the "
            "cluster has %.2f CPUs and %.2f GPUs now; the job waits for an autoscaler to add nodes, and stalls "
            "without one: lower codec/text concurrency, num_cpus or num_gpus, or image.decode_num_cpus",
            cpus, gpus, have.get("CPU", 0), have.get("GPU", 0),
        )


def build_manifest(config: PrepareConfig, plan: InputPlan, shards: list[dict], rejects: pa.Table,
                   out: StagedOutput) -> dict:
    empty_prompt = load_empty_prompt(out.new)
    columns = tensor_columns(pq.read_schema(shard_paths(out.new, {"shards": shards})[0])) if shards else {}
    by_reason = pc.value_counts(rejects["reason"]).to_pylist() if rejects.num_rows else []
    return {
        "format_version": FORMAT_VERSION,
        "kind": PREPARED_SET,
        "rows_in": plan.rows,
        "rows_written": sum(shard["rows"] for shard in shards),
        "rows_rejected": rejects.num_rows,
        "rejects_by_reason": {item["values"]: item["counts"] for item in sorted(by_reason, key=lambda i: i["values"])},
        "latent_shape": columns.get("latent", {}).get("shape"),
        "latent_dtype": config.storage.latent_dtype,
        "text_shape": list(empty_prompt.embeds.shape[1:]),
        "text_dtype": config.storage.text_dtype,
        "pooled_shape": None if empty_prompt.pooled is None else list(empty_prompt.pooled.shape[1:]),
        "image_size": config.image.size,
        "codec": config.codec.model_dump(include={"name", "path", "subfolder", "dtype"}),
        "text_encoder": {"preset": config.text.encoder, "path": config.text.path, "max_length": config.text.max_length},
        "backbone": config.backbone,
        "input": {"path": config.input.path, "format": plan.format},
        "config_hash": config.content_hash(),
        "content_hash": content_hash(shards),
        "config": config.model_dump(mode="json"),
        "shards": shards,
        "rejects": REJECTS,
        "empty_prompt": EMPTY_PROMPT,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.prepare_latents", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input", help="parquet file or folder, or a folder of images with .txt captions")
    parser.add_argument("--output", help="folder of the prepared set")
    parser.add_argument("--config", help="YAML job config (fields: data_pipelines/config.py)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a complete prepared set at --output (kept until the new one is complete)")
    parser.add_argument("--format", choices=["auto", "parquet", "image_folder", "shapeeval"],
                        help="the input's layout (default auto: from what the path holds)")
    parser.add_argument("--image-column", help="parquet column of encoded image bytes (default image_bytes)")
    parser.add_argument("--caption-column", help="parquet column of captions (default text)")
    parser.add_argument("--id-column", help="parquet column of stable row ids (default: <file>:<row>)")
    parser.add_argument("--backbone", help="backbone preset; picks the codec and text encoder (default sana-tiny)")
    parser.add_argument("--image-size", type=int, help="side of the square crop (default 32)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="any config field, e.g. codec.concurrency=4")
    args = parser.parse_args(argv)
    flags = {
        "input.path": args.input, "output": args.output, "input.format": args.format,
        "input.image_column": args.image_column, "input.caption_column": args.caption_column,
        "input.id_column": args.id_column, "backbone": args.backbone, "image.size": args.image_size,
        "overwrite": True if args.overwrite else None,
    }
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        config = load_prepare_config(args.config, args.overrides, {k: v for k, v in flags.items() if v is not None})
        prepare(config)
    except (ConfigError, InputError, OutputError) as error:
        print(f"prepare_latents: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
