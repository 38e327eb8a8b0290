"""The three raw input kinds as one Ray Dataset of rows ``{id, source, image_bytes, caption}``.

- ``parquet``: a file or folder of parquet files with an image-bytes column (binary, or a
  ``{bytes, path}`` struct as Hugging Face datasets store images) and a caption column;
- ``image_folder``: images with a same-name ``.txt`` caption next to each (``cat.jpg`` + ``cat.txt``);
- ``shapeeval``: the ShapeEval raw parquet (``apex_ray.shapeeval.write_pairs``), ids kept.

The driver only plans: it lists files, reads parquet footers, checks the columns and counts the
rows (the ``rows_in`` of the count identity). Ray tasks read the bytes. Every input row becomes
exactly one output row whatever is wrong with it (unreadable bytes or a missing caption become
``None``), so that validation downstream accounts for all of them. ``id`` is stable across
runs: the id column's value, else ``<file>:<row>`` (parquet) or the relative path (folders).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from data_pipelines.config import InputConfig

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SHAPEEVAL_COLUMNS = ("id", "image_bytes", "text", "task")
PARQUET_READ_ROWS = 1024
"""Rows per batch when a task reads a parquet row group (bounds a task's memory)."""
IMAGE_FILES_PER_BATCH = 64
MAX_READ_BLOCKS = 1000
"""Upper bound on the blocks the read units are split into (one per unit below it)."""


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


def plan_input(config: InputConfig) -> InputPlan:
    """Check the input and list its read units; raises :class:`InputError` with what to fix."""
    root = Path(config.path)
    if not root.exists():
        raise InputError(f"input {str(root)!r} does not exist; pass a parquet file, a folder of parquet files "
                         "or a folder of images with .txt captions")
    parquet_files = _parquet_files(root)
    image_files = _image_files(root) if root.is_dir() and not parquet_files else []
    fmt = config.format
    if fmt == "auto":
        if parquet_files:
            names = set(pq.read_schema(parquet_files[0]).names)
            fmt = "shapeeval" if config.id_column is None and names >= set(SHAPEEVAL_COLUMNS) else "parquet"
        elif image_files:
            fmt = "image_folder"
        else:
            raise InputError(f"input {str(root)!r} holds no parquet files and no images "
                             f"({', '.join(sorted(IMAGE_EXTENSIONS))}); nothing to prepare")
    if fmt == "image_folder":
        plan = _plan_image_folder(root, _image_files(root) if root.is_dir() else [])
    else:
        if fmt == "shapeeval":
            columns = {"image": "image_bytes", "caption": "text", "id": "id"}
        else:
            columns = {"image": config.image_column, "caption": config.caption_column, "id": config.id_column}
        plan = _plan_parquet(root, parquet_files, fmt, columns)
    if plan.rows == 0:
        raise InputError(f"input {str(root)!r} has no rows; nothing to prepare")
    return plan


def read_input(plan: InputPlan):
    """A Ray Dataset with one row ``{id, source, image_bytes, caption}`` per input row."""
    import ray.data

    units = ray.data.from_items(plan.units, override_num_blocks=min(len(plan.units), MAX_READ_BLOCKS))
    if plan.format == "image_folder":
        return units.map_batches(
            read_image_files, batch_size=IMAGE_FILES_PER_BATCH, fn_kwargs={"root": plan.root}
        )
    return units.map_batches(
        read_parquet_units, batch_size=1, fn_kwargs={"root": plan.root, **{f"{k}_column": v for k, v in plan.columns.items()}}
    )


def _parquet_files(root: Path) -> list[str]:
    if root.is_file():
        return [str(root)] if root.suffix == ".parquet" else []
    return sorted(str(p) for p in root.rglob("*.parquet") if p.is_file())


def _image_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


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
        first = 0
        for group in range(meta.num_row_groups):
            group_rows = meta.row_group(group).num_rows
            if group_rows:
                units.append({"file": file, "row_group": group, "first_row": first})
            first += group_rows
        rows += first
    return InputPlan(fmt, str(root), units, rows, columns)


def _plan_image_folder(root: Path, files: list[str]) -> InputPlan:
    if not files:
        raise InputError(f"input {str(root)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return InputPlan("image_folder", str(root), [{"file": f} for f in files], len(files), {})


def read_parquet_units(
    batch: dict[str, np.ndarray], root: str, image_column: str, caption_column: str, id_column: str | None
) -> Iterator[dict[str, np.ndarray]]:
    """Ray task: the rows of each planned row group, in chunks of :data:`PARQUET_READ_ROWS`."""
    for file, group, first in zip(batch["file"], batch["row_group"], batch["first_row"]):
        file, first = str(file), int(first)
        prefix = os.path.relpath(file, root) if os.path.isdir(root) else os.path.basename(file)
        columns = list(dict.fromkeys(c for c in (image_column, caption_column, id_column) if c))
        reader = pq.ParquetFile(file).iter_batches(PARQUET_READ_ROWS, row_groups=[int(group)], columns=columns)
        for chunk in reader:
            rows = range(first, first + chunk.num_rows)
            first += chunk.num_rows
            ids = chunk.column(id_column).to_pylist() if id_column else [None] * chunk.num_rows
            yield {
                "id": _strings(str(i) if i is not None else f"{prefix}:{r}" for i, r in zip(ids, rows)),
                "source": _strings(f"{file}#row={r}" for r in rows),
                "image_bytes": _objects(_image_bytes(v) for v in chunk.column(image_column).to_pylist()),
                "caption": _objects(c if isinstance(c, str) else None for c in chunk.column(caption_column).to_pylist()),
            }


def read_image_files(batch: dict[str, np.ndarray], root: str) -> dict[str, np.ndarray]:
    """Ray task: image bytes and the same-name ``.txt`` caption of each file (``None`` if unreadable)."""
    files = [str(f) for f in batch["file"]]
    return {
        "id": _strings(Path(os.path.relpath(f, root)).as_posix() for f in files),
        "source": _strings(files),
        "image_bytes": _objects(_read(f, binary=True) for f in files),
        "caption": _objects(_read(str(Path(f).with_suffix(".txt")), binary=False) for f in files),
    }


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return value if isinstance(value, bytes) and value else None


def _read(path: str, binary: bool) -> bytes | str | None:
    try:
        if binary:
            with open(path, "rb") as f:
                return f.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _strings(values) -> np.ndarray:
    return np.array(list(values), dtype=object)


def _objects(values) -> np.ndarray:
    """An object array that keeps ``None`` and bytes as they are (numpy would coerce a list)."""
    values = list(values)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
