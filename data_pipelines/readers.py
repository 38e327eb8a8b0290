"""The three raw input kinds as one Ray Dataset of rows
``{id, source, image_bytes, caption, caption_error, duplicate_of}``.

- ``parquet``: a file or folder of parquet files with an image-bytes column (binary, or a
  ``{bytes, path}`` struct as Hugging Face datasets store images) and a caption column;
- ``image_folder``: images with a same-name ``.txt`` caption next to each (``cat.jpg`` + ``cat.txt``);
- ``shapeeval``: the ShapeEval raw parquet (``apex_ray.shapeeval.write_pairs``), ids kept.

The driver only plans: it lists files, reads parquet footers, checks the columns and counts the
rows (the ``rows_in`` of the count identity). Ray tasks read the bytes. Every input row becomes
exactly one output row whatever is wrong with it (unreadable bytes or a missing caption become
``None``; caption bytes that are not UTF-8 say so in ``caption_error``), so that validation
downstream accounts for all of them; a column of the wrong type fails at planning. ``id`` is stable across
runs: the id column's value, else ``<file>:<row>`` (parquet) or the relative path (folders).

Ids are unique in the prepared set. Derived ids are unique by construction; with an id column the
driver reads that one column at planning (small next to the images) and marks every row whose id
an earlier row already has (in file, then row order: deterministic, whatever the read tasks and
blocks), so it becomes a ``duplicate_id`` reject (its ``duplicate_of`` names the first row).
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from data_pipelines.resources import io_tasks

if TYPE_CHECKING:
    # Only for annotations: Ray read tasks unpickle this module, and data_pipelines.config pulls in
    # apex_ray.models (torch, transformers, diffusers: ~6 s of CPU and ~0.5 GB per worker process).
    from data_pipelines.config import InputConfig

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SHAPEEVAL_COLUMNS = ("id", "image_bytes", "text", "task")
PARQUET_READ_ROWS = 1024
"""Rows per batch when a task reads a parquet row group (bounds a task's memory)."""
IMAGE_FILES_PER_BATCH = 64
BLOCK_ROWS = 64
"""Default rows per block of the dataset :func:`read_input` makes (the jobs pass their batch size)."""
READ_TASK_CPUS = 0.0
"""Reading is I/O: read tasks ask for no CPU, so they never wait behind CPUs held by the actor
pools downstream (which would stall the stream on a small machine). Without a CPU to wait for,
Ray would start every read task (one process each) at once, so their number at once is capped
(:func:`read_input`)."""
RAW_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("image_bytes", pa.binary()), ("caption", pa.string()),
    ("caption_error", pa.string()),  # why a present caption could not be read (e.g. not UTF-8)
    ("duplicate_of", pa.string()),  # the source of the first row with this id, for a row that repeats it
])


class InputError(ValueError):
    """The input is missing, empty or does not have the configured columns."""


@dataclass(frozen=True)
class InputPlan:
    """What to read: the resolved format, the read units (row groups or files) and the row count."""

    format: str
    root: str
    units: list[dict[str, Any]]
    rows: int
    columns: dict[str, str | None]
    """``image``, ``caption``, ``id`` column names (parquet formats)."""
    duplicate_ids: int = 0
    """Rows whose id an earlier row has (marked in their unit's ``duplicates``: row -> first source)."""


def plan_input(config: InputConfig) -> InputPlan:
    """Check the input and list its read units; raises :class:`InputError` with what to fix."""
    root = Path(config.path)
    if not root.exists():
        raise InputError(f"input {str(root)!r} does not exist; pass a parquet file, a folder of parquet files "
                         "or a folder of images with .txt captions")
    parquet_files = _parquet_files(root)
    fmt = _detect_format(root, parquet_files, config) if config.format == "auto" else config.format
    if fmt == "image_folder":
        plan = _plan_image_folder(root)
    elif fmt == "shapeeval":
        plan = _plan_parquet(root, parquet_files, fmt, {"image": "image_bytes", "caption": "text", "id": "id"})
    else:
        columns = {"image": config.image_column, "caption": config.caption_column, "id": config.id_column}
        plan = _plan_parquet(root, parquet_files, fmt, columns)
    if plan.rows == 0:
        raise InputError(f"input {str(root)!r} has no rows; nothing to prepare")
    return plan


def _detect_format(root: Path, parquet_files: list[str], config: InputConfig) -> str:
    """Parquet files -> ``shapeeval`` if they have its columns (and no id column is set), else
    ``parquet``; images in a folder -> ``image_folder``."""
    if parquet_files:
        names = set(pq.read_schema(parquet_files[0]).names)
        return "shapeeval" if config.id_column is None and names >= set(SHAPEEVAL_COLUMNS) else "parquet"
    if root.is_dir() and any(_is_image(p) for p in root.rglob("*")):
        return "image_folder"
    raise InputError(f"input {str(root)!r} holds no parquet files and no images "
                     f"({', '.join(sorted(IMAGE_EXTENSIONS))}); nothing to prepare")


def read_input(plan: InputPlan, concurrency: int | None = None, block_rows: int = BLOCK_ROWS) -> ray.data.Dataset:
    """A Ray Dataset with one row ``{id, source, image_bytes, caption}`` per input row, in blocks
    of about ``block_rows`` rows, read by at most ``concurrency`` tasks at once (default
    :func:`~data_pipelines.resources.io_tasks` of the cluster's CPUs)."""
    if concurrency is None:
        concurrency = io_tasks(ray.cluster_resources().get("CPU", 0.0))
    return ray.data.read_datasource(RawPairsDatasource(plan), num_cpus=READ_TASK_CPUS, concurrency=concurrency,
                                    override_num_blocks=read_blocks(plan, block_rows))


def read_blocks(plan: InputPlan, block_rows: int) -> int:
    """Blocks of ``block_rows`` rows the plan makes. Ray plans one read task per read unit (at
    most) and splits each task's output into blocks inside the task: blocks of a batch stream
    through the actor pools a batch at a time, where Ray's default (at least 200 blocks, a few
    rows each at this job's sizes) makes many tiny objects and a coarser split would hold rows
    back in big blocks (a pool's output comes out when its whole input block is done)."""
    return max(1, -(-plan.rows // block_rows))


class RawPairsDatasource(Datasource):
    """The planned read units as Ray read tasks. Each task yields blocks of raw rows, so that Ray
    counts, bundles and balances real rows downstream (not read units)."""

    def __init__(self, plan: InputPlan) -> None:
        super().__init__()
        self.plan = plan

    def estimate_inmemory_data_size(self) -> None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        units = self.plan.units
        groups = np.array_split(np.arange(len(units)), max(1, min(parallelism, len(units))))
        tasks = []
        for group in groups:
            picked = [units[i] for i in group]
            metadata = BlockMetadata(num_rows=sum(u["rows"] for u in picked), size_bytes=None, exec_stats=None)
            tasks.append(ReadTask(partial(read_units, self.plan, picked), metadata, schema=RAW_SCHEMA,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


def read_units(plan: InputPlan, units: list[dict[str, Any]]) -> Iterator[pa.Table]:
    """The raw rows of ``units`` (row groups in chunks of :data:`PARQUET_READ_ROWS`, or image files
    :data:`IMAGE_FILES_PER_BATCH` at a time)."""
    if plan.format == "image_folder":
        for start in range(0, len(units), IMAGE_FILES_PER_BATCH):
            yield read_image_files([unit["file"] for unit in units[start:start + IMAGE_FILES_PER_BATCH]], plan.root)
    else:
        for unit in units:
            yield from read_row_group(unit, plan.root, plan.columns)


def _parquet_files(root: Path) -> list[str]:
    if root.is_file():
        return [str(root)] if root.suffix == ".parquet" else []
    return sorted(str(p) for p in root.rglob("*.parquet") if p.is_file())


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _plan_parquet(root: Path, files: list[str], fmt: str, columns: dict[str, str | None]) -> InputPlan:
    if not files:
        raise InputError(f"input {str(root)!r} holds no .parquet files (format {fmt})")
    units, rows = [], 0
    for file in files:
        meta = pq.ParquetFile(file).metadata
        names = meta.schema.to_arrow_schema().names
        missing = [f"{key}_column={name!r}" for key, name in columns.items() if name and name not in names]
        if missing:
            raise InputError(f"{file} has no column {', '.join(missing)}; its columns are {names}. "
                             "Set input.image_column / input.caption_column / input.id_column")
        _check_column_types(file, meta.schema.to_arrow_schema(), columns)
        first = 0
        for group in range(meta.num_row_groups):
            group_rows = meta.row_group(group).num_rows
            if group_rows:
                units.append({"file": file, "row_group": group, "first_row": first, "rows": group_rows})
            first += group_rows
        rows += first
    duplicates = mark_duplicate_ids(units, str(root), columns["id"]) if columns.get("id") else 0
    return InputPlan(fmt, str(root), units, rows, columns, duplicates)


def mark_duplicate_ids(units: list[dict[str, Any]], root: str, id_column: str) -> int:
    """Find the rows whose id (as :func:`read_row_group` makes it) an earlier row already has, in
    file then row order; record them in their unit as ``duplicates`` ``{row: source of the first}``
    and return how many. Only the id column is read, on the driver; rows are touched in Python
    only where an id repeats."""
    files = list(dict.fromkeys(unit["file"] for unit in units))
    if not files:
        return 0
    per_file = [_id_array(pq.read_table(file, columns=[id_column]).column(0), _id_prefix(file, root))
                for file in files]
    ids = pa.chunked_array(per_file, pa.string())
    if pc.count_distinct(ids).as_py() == len(ids):
        return 0
    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    offsets = np.cumsum([0] + [len(a) for a in per_file])
    units_of = {file: [u for u in units if u["file"] == file] for file in files}  # in row order
    firsts_of = {file: [u["first_row"] for u in in_file] for file, in_file in units_of.items()}
    first_source: dict[str, str] = {}
    found = 0
    for position in pc.indices_nonzero(pc.is_in(ids, value_set=repeated)).to_pylist():
        index = int(np.searchsorted(offsets, position, side="right")) - 1
        file, row = files[index], position - int(offsets[index])
        row_id = ids[position].as_py()
        if row_id not in first_source:
            first_source[row_id] = f"{file}#row={row}"
            continue
        unit = units_of[file][bisect.bisect_right(firsts_of[file], row) - 1]
        unit.setdefault("duplicates", {})[row] = first_source[row_id]
        found += 1
    return found


def _id_prefix(file: str, root: str) -> str:
    return os.path.relpath(file, root) if os.path.isdir(root) else os.path.basename(file)


def _row_ids(values: list[Any], prefix: str, first_row: int) -> list[str]:
    """The ids of rows ``first_row...``: the id column's value as text, ``<prefix>:<row>`` where null."""
    return [str(v) if v is not None else f"{prefix}:{r}" for r, v in enumerate(values, first_row)]


def _id_array(column: pa.ChunkedArray, prefix: str) -> pa.Array:
    """:func:`_row_ids` of a whole file's id column, in arrow (Python only for other than plain strings)."""
    if column.null_count == 0 and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column.combine_chunks().cast(pa.string())
    return pa.array(_row_ids(column.to_pylist(), prefix, 0), pa.string())


def _check_column_types(file: str, schema: pa.Schema, columns: dict[str, str | None]) -> None:
    """A wrong column type is a start-up error, not one reject per row."""
    binary = (pa.types.is_binary, pa.types.is_large_binary)
    text = (pa.types.is_string, pa.types.is_large_string, *binary)
    image_type = schema.field(columns["image"]).type
    image_ok = any(ok(image_type) for ok in binary) or (
        pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0
        and any(ok(image_type.field("bytes").type) for ok in binary))
    if not image_ok:
        raise InputError(f"{file}: image column {columns['image']!r} is {image_type}, not encoded image bytes "
                         "(binary, or a {bytes, path} struct); set input.image_column to the column of PNG/JPEG bytes")
    caption_type = schema.field(columns["caption"]).type
    if not any(ok(caption_type) for ok in text):
        raise InputError(f"{file}: caption column {columns['caption']!r} is {caption_type}, not text; "
                         "set input.caption_column to the column of captions")


def _plan_image_folder(root: Path) -> InputPlan:
    files = sorted(str(p) for p in root.rglob("*") if _is_image(p)) if root.is_dir() else []
    if not files:
        raise InputError(f"input {str(root)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return InputPlan("image_folder", str(root), [{"file": f, "rows": 1} for f in files], len(files), {})


def read_row_group(unit: dict[str, Any], root: str, columns: dict[str, str | None]) -> Iterator[pa.Table]:
    """The rows of one planned parquet row group, in chunks of :data:`PARQUET_READ_ROWS`."""
    file, first = unit["file"], unit["first_row"]
    prefix = _id_prefix(file, root)
    duplicates = unit.get("duplicates", {})
    image_column, caption_column, id_column = columns["image"], columns["caption"], columns["id"]
    wanted = list(dict.fromkeys(c for c in (image_column, caption_column, id_column) if c))
    for chunk in pq.ParquetFile(file).iter_batches(PARQUET_READ_ROWS, row_groups=[unit["row_group"]], columns=wanted):
        rows = range(first, first + chunk.num_rows)
        first += chunk.num_rows
        ids = chunk.column(id_column).to_pylist() if id_column else [None] * chunk.num_rows
        yield raw_rows(
            ids=_row_ids(ids, prefix, rows.start),
            sources=[f"{file}#row={r}" for r in rows],
            images=[_image_bytes(v) for v in chunk.column(image_column).to_pylist()],
            captions=[_caption(c) for c in chunk.column(caption_column).to_pylist()],
            duplicate_of=[duplicates.get(r) for r in rows],
        )


def read_image_files(files: list[str], root: str) -> pa.Table:
    """Image bytes and the same-name ``.txt`` caption of each file (``None`` where unreadable)."""
    return raw_rows(
        ids=[Path(os.path.relpath(f, root)).as_posix() for f in files],
        sources=files,
        images=[_read(f) for f in files],
        captions=[_caption(_read(str(Path(f).with_suffix(".txt"))), f"{Path(f).stem}.txt: ")
                  for f in files],
    )


def raw_rows(ids: list[str], sources: list[str], images: list[bytes | None],
             captions: list[str | None | tuple[None, str]], duplicate_of: list[str | None] | None = None) -> pa.Table:
    """``captions`` items are the text, ``None`` (no caption) or ``(None, why)`` (unreadable);
    ``duplicate_of`` the first row's source for a row that repeats its id."""
    texts = [c[0] if isinstance(c, tuple) else c for c in captions]
    errors = [c[1] if isinstance(c, tuple) else None for c in captions]
    duplicate_of = duplicate_of or [None] * len(ids)
    return pa.table([pa.array(ids, pa.string()), pa.array(sources, pa.string()), pa.array(images, pa.binary()),
                     pa.array(texts, pa.string()), pa.array(errors, pa.string()),
                     pa.array(duplicate_of, pa.string())], schema=RAW_SCHEMA)


def _caption(value: Any, where: str = "") -> str | None | tuple[None, str]:
    """Text as it is, UTF-8 bytes decoded; bytes that are not UTF-8 give ``(None, why)``."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            return None, f"{where}caption bytes are not UTF-8 ({err.reason} at byte {err.start})"
    return value if isinstance(value, str) else None


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return value if isinstance(value, bytes) and value else None


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None
