"""Reading a prepared set: its manifest, its shards as a Ray Dataset, training batches, plain arrays.

A prepared set may live in a local folder, on a shared mount or in an object store
(``s3://bucket/set``, see :mod:`apex_ray.common.storage`); every reader here takes either.

A prepared set (written by ``python -m data_pipelines.prepare_latents``) is a folder with
``manifest.json`` (counts, shapes, dtypes, codec, text encoder, config hash, shard list),
``shards/*.parquet`` (``id``, ``caption``, ``latent`` [C, H, W], ``text_embeds`` [L, D],
``text_mask`` [L], optional ``pooled`` [P]), ``rejects.parquet`` (``id``, ``source``, ``reason``,
``detail``) and ``empty_prompt.safetensors`` (``embeds`` [L, D], ``mask`` [L], optional
``pooled``). The manifest is written last: a folder without one is not a prepared set.

Tensor columns use Ray's tensor extension type. Without Ray, pyarrow reads them as flat lists
whose shape is in the field metadata; :func:`tensor_column` handles both, so
:func:`load_prepared_arrays` needs only pyarrow.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import torch
from safetensors.torch import load

from apex_ray.common import storage
from apex_ray.common.errors import InputError
from apex_ray.method.batch import Batch
from apex_ray.method.buffer import FakeSampleBuffer
from apex_ray.method.conditioning import Conditioning

MANIFEST = "manifest.json"
PREPARED_SET = "prepared_set"
"""The manifest's ``kind`` of a prepared set."""
FAKE_BUFFER = "fake_buffer"
"""The manifest's ``kind`` of a fake-sample buffer (``python -m data_pipelines.fake_buffer``)."""
EMPTY_PROMPT = "empty_prompt.safetensors"
REJECTS = "rejects.parquet"
TRAINING_COLUMNS = ("latent", "text_embeds", "text_mask", "pooled")
"""The numeric columns a trainer streams (``pooled`` only where the set has it)."""


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the prepared set (or fake-sample buffer) at ``path``."""
    file = storage.join(path, MANIFEST)
    if not storage.is_file(file):
        raise FileNotFoundError(
            f"{str(path)!r} is not a complete prepared set or fake-sample buffer: {MANIFEST} is missing. "
            "Create one with `python -m data_pipelines.prepare_latents` (or `data_pipelines.fake_buffer`); "
            "a folder without a manifest is an interrupted run, which rerunning the job cleans up"
        )
    return storage.read_json(file)


def shard_paths(path: str | os.PathLike, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Absolute paths (or URIs, for a set in an object store) of the shards listed in the
    manifest, in order."""
    manifest = manifest or read_manifest(path)
    root = storage.resolve(path)
    return [storage.join(root, *shard["file"].split("/")) for shard in manifest["shards"]]


def prepared_dataset(path: str | os.PathLike, columns: list[str] | None = None, **read_parquet_args):
    """A Ray Dataset over the shards; by default only the :data:`TRAINING_COLUMNS` the set has, so
    that ``iter_torch_batches`` works (``id`` and ``caption`` are strings: ask for them explicitly).
    ``read_parquet_args`` go to ``ray.data.read_parquet`` (e.g. ``num_cpus``, ``shuffle``)."""
    import ray.data

    manifest = read_manifest(path)
    if not manifest["shards"]:
        raise ValueError(f"prepared set {str(path)!r} has no rows (all {manifest['rows_rejected']} were rejected; "
                         f"see {REJECTS})")
    if columns is None:
        columns = [c for c in TRAINING_COLUMNS if c != "pooled" or manifest.get("pooled_shape")]
    verify = pds.ParquetFragmentScanOptions(page_checksum_verification=True)
    # Ray 2.60's V2 parquet reader sets its own scan options and drops ours; the V1 reader passes
    # them to pyarrow, so every shard page is CRC-checked as it streams (tests hold this).
    context = ray.data.DataContext.get_current()
    v2 = getattr(context, "use_datasource_v2", None)
    if v2 is not None:
        context.use_datasource_v2 = False
    try:
        dataset = ray.data.read_parquet(shard_paths(path, manifest), fragment_scan_options=verify, **read_parquet_args)
    except (ray.exceptions.RayTaskError, pa.ArrowException) as err:
        # Planning samples a shard on the driver, without page-CRC verification: damage shows as
        # a pyarrow decode error there, before any checksum is read.
        cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
        if not isinstance(cause, (pa.ArrowException, OSError)):
            raise
        raise CorruptShardError(
            f"prepared set {str(path)!r}: a shard is damaged (Ray Data could not decode it while planning the read; "
            f"its parquet page checksums would not verify either): {str(cause).splitlines()[0]}. Prepare the set "
            "again with data_pipelines.prepare_latents") from None
    finally:
        if v2 is not None:
            context.use_datasource_v2 = v2
    return dataset.select_columns(columns)


def to_training_batch(batch: Mapping[str, np.ndarray | torch.Tensor]) -> Batch:
    """A :class:`~apex_ray.engine.step.Batch` from a batch of prepared rows (``iter_torch_batches`` or
    ``iter_batches``): latents float32 ``[B, C, H, W]``, embeddings float32, mask int64."""
    return Batch(as_tensor(batch["latent"]).float(), to_conditioning(batch))


def to_conditioning(batch: Mapping[str, np.ndarray | torch.Tensor]) -> Conditioning:
    """The text conditioning of a batch of rows: ``text_embeds`` (float32), ``text_mask`` (int64),
    ``pooled`` where present."""
    pooled = batch.get("pooled")
    return Conditioning(
        as_tensor(batch["text_embeds"]).float(),
        as_tensor(batch["text_mask"]).long(),
        None if pooled is None else as_tensor(pooled).float(),
    )


def as_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor that owns writable memory (arrow and Ray hand out read-only numpy views)."""
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        value = value.copy()
    return torch.as_tensor(value)


def read_shard(path: str, columns: list[str] | None = None) -> pa.Table:
    """One shard, its parquet page checksums verified (shards are written with them)."""
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except OSError as err:
        if "checksum" in str(err).lower():
            raise CorruptShardError(f"{path} is damaged ({err}); prepare the set again") from None
        raise


class CorruptShardError(InputError):
    """A shard's bytes do not match the checksums written with them."""


def read_rows(path: str | os.PathLike, columns: list[str], limit: int | None = None) -> dict[str, Any]:
    """Columns of the first ``limit`` rows (all by default) with pyarrow only: tensor columns as
    arrays ``[N, ...]``, string columns as lists."""
    tables, rows = [], 0
    for shard in shard_paths(path):
        if limit is not None and rows >= limit:
            break
        table = read_shard(shard, columns)
        tables.append(table)
        rows += table.num_rows
    if not tables:
        return {column: [] for column in columns}
    table = pa.concat_tables(tables)
    if limit is not None:
        table = table.slice(0, limit)
    return {
        column: table.column(column).to_pylist() if _is_text(table.schema.field(column).type)
        else tensor_column(table, column)
        for column in columns
    }


def _is_text(arrow_type: pa.DataType) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def load_prepared_arrays(path: str | os.PathLike,
                         limit: int | None = None) -> tuple[torch.Tensor, Conditioning, list[str]]:
    """Latents float32 ``[N, C, H, W]``, their conditioning and captions, without Ray (single-process
    training and tests)."""
    manifest = read_manifest(path)
    columns = ["caption", "latent", "text_embeds", "text_mask"] + (["pooled"] if manifest.get("pooled_shape") else [])
    rows = read_rows(path, columns, limit)
    if not rows["caption"]:
        raise ValueError(f"prepared set {str(path)!r} has no rows")
    batch = to_training_batch(rows)
    return batch.latents, batch.cond, rows["caption"]


def load_empty_prompt(path: str | os.PathLike) -> Conditioning:
    """The conditioning of the empty prompt ``""`` (batch of one), e.g. for classifier-free guidance."""
    tensors = load(storage.read_bytes(storage.join(path, EMPTY_PROMPT)))
    return Conditioning(tensors["embeds"][None].float(), tensors["mask"][None].long(),
                        tensors["pooled"][None].float() if "pooled" in tensors else None)


def tensor_column(table: pa.Table, name: str) -> np.ndarray:
    """Column ``name`` of a shard as one ``[N, *shape]`` array, whether or not Ray's tensor type is
    registered in this process."""
    field = table.schema.field(name)
    column = table.column(name).combine_chunks()
    if isinstance(field.type, pa.ExtensionType):
        shape, column = tuple(field.type.shape), column.storage
    else:
        shape = tuple(json.loads(field.metadata[b"ARROW:extension:metadata"]))
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), *shape)


def tensor_columns(schema: pa.Schema) -> dict[str, dict[str, Any]]:
    """``{column: {"shape": [...], "dtype": "float32"}}`` for the tensor columns of a shard schema."""
    info = {}
    for field in schema:
        if isinstance(field.type, pa.ExtensionType) and hasattr(field.type, "shape"):
            shape, value_type = list(field.type.shape), field.type.storage_type.value_type
        elif field.metadata and b"ARROW:extension:metadata" in field.metadata:
            shape, value_type = json.loads(field.metadata[b"ARROW:extension:metadata"]), field.type.value_type
        else:
            continue
        info[field.name] = {"shape": shape, "dtype": str(np.dtype(value_type.to_pandas_dtype()))}
    return info


def load_fake_buffer(path: str | os.PathLike, buffer: FakeSampleBuffer, limit: int | None = None,
                     chunk: int = 1024) -> int:
    """Push the first ``limit`` samples (all by default) of the buffer at ``path``, with their
    conditioning, into ``buffer`` (oldest first, so a smaller FIFO keeps the last ones); returns
    how many were pushed. Needs only pyarrow."""
    manifest = read_manifest(path)
    if manifest.get("kind") != FAKE_BUFFER:
        raise ValueError(f"{str(path)!r} is not a fake-sample buffer (kind {manifest.get('kind')!r}); "
                         "make one with `python -m data_pipelines.fake_buffer`")
    columns = ["sample", "text_embeds", "text_mask"] + (["pooled"] if manifest.get("pooled_shape") else [])
    rows = read_rows(path, columns, limit)
    count = len(rows["sample"])
    for start in range(0, count, chunk):
        part = {name: values[start:start + chunk] for name, values in rows.items()}
        buffer.push(as_tensor(part["sample"]).float(), to_conditioning(part))
    return count
