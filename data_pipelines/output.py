"""Complete-or-nothing output folders of parquet shards written by Ray Data.

A job writes into ``<output>/.staging-<uuid>/`` through :class:`StagedShardSink`. Only when every
row is written does :meth:`StagedOutput.commit_shards` move the shards named in the write
results into ``<output>/shards/``; :meth:`StagedOutput.finish` writes ``manifest.json`` last
(tmp file + ``os.replace``). The manifest's presence marks a complete output. A file left by a
write task that Ray retried is named in no result and goes with the staging folder, so no row is
committed twice.

Rerunning on an output folder: a complete one (manifest present) is refused unless
``overwrite``; an incomplete one (an interrupted run's leftovers, no manifest) is removed with a
warning and the job starts again; a folder holding files the job did not write is refused.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from apex_ray.common.files import TMP_PREFIX, write_json_atomic

MANIFEST = "manifest.json"
SHARDS = "shards"
REJECT_PARTS = "rejects"
"""Staging subfolder of the reject rows; the job merges them into one file."""
STAGING_PREFIX = ".staging-"
WRITE_TASK_CPUS = 0.0
"""Writing shards is I/O: write tasks ask for no CPU, so they never wait behind CPUs held by the
actor pools (rows would pile up in the object store until the pools finish)."""
REJECT_COLUMNS = ("id", "source", "reason", "detail")
"""Columns of a reject row; a block with a ``reason`` column is split into shard and reject rows."""

log = logging.getLogger(__name__)


class OutputError(RuntimeError):
    """The output folder cannot be used; the message says what to do."""


class StagedOutput:
    """An output folder being written by one job run; use as a context manager.

    On an exception everything the job owns in the folder is removed, so the folder never looks
    complete when it is not. ``owned`` names the files the job writes beside the manifest and
    the shards.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool, job: str, owned: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.job = job
        self.owned = {MANIFEST, SHARDS, *owned}
        self._prepare_folder(overwrite)
        self.staging = self.path / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        self.staging.mkdir()

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is not None:
            self._remove_owned()

    def sink(self, rows_per_shard: int) -> "StagedShardSink":
        return StagedShardSink(str(self.staging), rows_per_shard)

    def commit_shards(self, results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Path]]:
        """Move the written shards into ``shards/`` as ``shard-00000.parquet``...; returns the
        manifest's shard list and the staged reject files."""
        shard_dir = self.path / SHARDS
        shard_dir.mkdir()
        shards, rejects = [], []
        for result in sorted(results, key=lambda r: r["task"]):
            for staged, rows in result[SHARDS]:
                name = f"shard-{len(shards):05d}.parquet"
                os.replace(self.staging / SHARDS / staged, shard_dir / name)
                shards.append({"file": f"{SHARDS}/{name}", "rows": rows})
            rejects += [self.staging / REJECT_PARTS / staged for staged, _ in result[REJECT_PARTS]]
        return shards, rejects

    def finish(self, manifest: dict[str, Any]) -> None:
        """Write the manifest (marking the output complete) and drop the staging folder."""
        write_json_atomic(self.path / MANIFEST, manifest)
        shutil.rmtree(self.staging, ignore_errors=True)

    def _is_owned(self, name: str) -> bool:
        return name in self.owned or name.startswith((STAGING_PREFIX, TMP_PREFIX))

    def _prepare_folder(self, overwrite: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"output {str(self.path)!r} is a file; pass a folder path")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create output folder {str(self.path)!r}: {error}") from None
        entries = sorted(os.listdir(self.path))
        foreign = [name for name in entries if not self._is_owned(name)]
        if foreign:
            raise OutputError(
                f"output folder {str(self.path)!r} holds files {self.job} did not write ({', '.join(foreign[:5])}); "
                "choose an empty or new folder"
            )
        if MANIFEST in entries:
            if not overwrite:
                raise OutputError(
                    f"{str(self.path)!r} already holds a complete {self.job} (manifest.json); pass --overwrite "
                    "(overwrite=True) to replace it, or choose another output folder"
                )
            log.warning("%s: replacing the complete %s in %s (overwrite)", self.job, self.job, self.path)
        elif entries:
            log.warning("%s: %s holds an incomplete %s left by an interrupted run (no manifest.json); "
                        "removing %s and starting again", self.job, self.path, self.job, ", ".join(entries))
        self._remove_owned()
        probe = self.path / f"{TMP_PREFIX}write-test"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise OutputError(f"cannot write to output folder {str(self.path)!r}: {error}") from None

    def _remove_owned(self) -> None:
        """Remove the job's files, the manifest first so that a half-removed output is never complete."""
        (self.path / MANIFEST).unlink(missing_ok=True)
        for name in os.listdir(self.path):
            if self._is_owned(name):
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


class StagedShardSink(Datasink):
    """Ray Data sink: each write task streams its blocks into staged shards of at most
    ``rows_per_shard`` rows (and a staged rejects file for rows with a non-empty ``reason``) and
    returns the files it wrote with their row counts."""

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
        return {"task": ctx.task_idx, **{kind: writer.written for kind, writer in files.items()}}

    def on_write_complete(self, write_result) -> None:
        self.results = list(write_result.write_returns)


class RollingParquetWriter:
    """Writes tables into ``<folder>/<prefix>-<n>.parquet``, a new file every ``max_rows`` rows;
    ``written`` lists ``(file name, rows)``."""

    def __init__(self, folder: str, prefix: str, max_rows: int | None = None) -> None:
        self.folder, self.prefix, self.max_rows = folder, prefix, max_rows
        self.written: list[tuple[str, int]] = []
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                name = f"{self.prefix}-{len(self.written):04d}.parquet"
                os.makedirs(self.folder, exist_ok=True)
                # Page CRCs: readers verify them (apex_ray.engine.prepared), so a flipped bit in a
                # latent or a text embedding fails the read instead of training silently.
                self._writer = pq.ParquetWriter(os.path.join(self.folder, name), table.schema,
                                                write_page_checksum=True)
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


def split_rejects(table: pa.Table) -> dict[str, pa.Table]:
    """``{"shards": accepted rows without the bookkeeping columns, "rejects": reject rows}``;
    a table without a ``reason`` column is all accepted."""
    if "reason" not in table.column_names:
        return {SHARDS: table}
    usable = pc.equal(table["reason"], "")
    accepted = table.filter(usable).drop_columns([c for c in REJECT_COLUMNS[1:] if c in table.column_names])
    return {SHARDS: accepted, REJECT_PARTS: table.filter(pc.invert(usable)).select(list(REJECT_COLUMNS))}
