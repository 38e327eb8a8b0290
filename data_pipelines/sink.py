"""The Ray Data sink of the data jobs: write tasks stream blocks into staged parquet shards and
reject files (:mod:`data_pipelines.output` assembles and commits them).

Write tasks unpickle this sink in Ray worker processes, so this module imports pyarrow and Ray
Data only: importing the project's model code there would cost each worker process seconds of
CPU and hundreds of MB (torch, transformers, diffusers).
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

SHARDS = "shards"
REJECT_PARTS = "rejects"
"""Staging subfolder of the reject rows; the job merges them into one file."""
WRITE_TASK_CPUS = 0.0
"""Writing shards is I/O: write tasks ask for no CPU, so they never wait behind CPUs held by the
actor pools (rows would pile up in the object store until the pools finish). Their number at
once is capped instead (``concurrency`` of ``write_datasink``, :func:`data_pipelines.resources.io_tasks`)."""
REJECT_COLUMNS = ("id", "source", "reason", "detail")
"""Columns of a reject row; a block with a ``reason`` column is split into shard and reject rows."""


class StagedShardSink(Datasink):
    """Ray Data sink: each write task streams its blocks into staged shards of at most
    ``rows_per_shard`` rows (and a staged rejects file for rows with a non-empty ``reason``) and
    returns the files it wrote with their row counts and SHA-256 digests."""

    def __init__(self, staging: str, rows_per_shard: int) -> None:
        self.staging = staging
        self.rows_per_shard = rows_per_shard
        self.results: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def write(self, blocks, ctx) -> dict[str, Any]:
        prefix = f"{ctx.task_idx:06d}-{uuid.uuid4().hex[:8]}"
        files = {
            SHARDS: RollingParquetWriter(os.path.join(self.staging, SHARDS), prefix, self.rows_per_shard),
            REJECT_PARTS: RollingParquetWriter(os.path.join(self.staging, REJECT_PARTS), prefix),
        }
        try:
            for block in blocks:
                for kind, part in split_rejects(BlockAccessor.for_block(block).to_arrow()).items():
                    files[kind].write(part)
        finally:
            for writer in files.values():
                writer.close()
        # finished_at (epoch seconds; one clock per machine): when these rows were done, for the
        # job's start-up / steady-rate report.
        return {"task": ctx.task_idx, "finished_at": time.time(), "sha256": files[SHARDS].sha256,
                **{kind: writer.written for kind, writer in files.items()}}

    def on_write_complete(self, write_result) -> None:
        self.results = list(write_result.write_returns)


class RollingParquetWriter:
    """Writes tables into ``<folder>/<prefix>-<n>.parquet``, a new file every ``max_rows`` rows;
    ``written`` lists ``(file name, rows)``, ``sha256`` each closed file's digest (the set's
    content hash is made of them: read back from the page cache at close, ~1 GB/s, far below
    what encoding the rows costs)."""

    def __init__(self, folder: str, prefix: str, max_rows: int | None = None) -> None:
        self.folder, self.prefix, self.max_rows = folder, prefix, max_rows
        self.written: list[tuple[str, int]] = []
        self.sha256: dict[str, str] = {}
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                name = f"{self.prefix}-{len(self.written):04d}.parquet"
                os.makedirs(self.folder, exist_ok=True)
                self._writer = pq.ParquetWriter(os.path.join(self.folder, name), table.schema,
                                                **parquet_options(table.schema))
                self.written.append((name, 0))
            name, rows = self.written[-1]
            take = table.num_rows if self.max_rows is None else min(table.num_rows, self.max_rows - rows)
            self._writer.write_table(table.slice(0, take))
            self.written[-1] = (name, rows + take)
            table = table.slice(take)
            if self.max_rows is not None and rows + take >= self.max_rows:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            name = self.written[-1][0]
            with open(os.path.join(self.folder, name), "rb") as file:
                self.sha256[name] = hashlib.file_digest(file, "sha256").hexdigest()


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """How shards are written. Page CRCs: readers verify them (apex_ray.engine.prepared), so a
    flipped bit in a latent or a text embedding fails the read instead of training silently.
    Dictionary encoding only for the columns that repeat (ids, captions, tasks): tensor columns
    (lists of floats) almost never repeat a value, and trying a dictionary for them took ~40% of
    a write task's CPU for files ~10% smaller (measured on prepared ShapeEval shards)."""
    repeating = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    return {"write_page_checksum": True, "use_dictionary": repeating or False}


def split_rejects(table: pa.Table) -> dict[str, pa.Table]:
    """``{"shards": accepted rows without the bookkeeping columns, "rejects": reject rows}``;
    a table without a ``reason`` column is all accepted."""
    if "reason" not in table.column_names:
        return {SHARDS: table}
    usable = pc.equal(table["reason"], "")
    accepted = table.filter(usable).drop_columns([c for c in REJECT_COLUMNS[1:] if c in table.column_names])
    return {SHARDS: accepted, REJECT_PARTS: table.filter(pc.invert(usable)).select(list(REJECT_COLUMNS))}
