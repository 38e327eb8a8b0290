"""ShapeEval training pairs as parquet: columns ``id``, ``image_bytes`` (PNG), ``text``, ``task``.

The writer streams row groups into a temporary file next to the target and renames it into
place only when complete, so a failed or interrupted write never leaves a partial file.
"""
from __future__ import annotations

import io
import os
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from apex_ray.common.files import atomic_path
from apex_ray.common.images import images_to_tensor
from apex_ray.shapeeval.scenes import DEFAULT_CANVAS, generate_pairs

SCHEMA = pa.schema([("id", pa.string()), ("image_bytes", pa.binary()), ("text", pa.string()), ("task", pa.string())])


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W, 3]`` image (lossless)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """uint8 ``[H, W, 3]`` image from PNG (or any PIL-readable) bytes."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def write_pairs(
    path: str | os.PathLike, n: int, seed: int = 0, canvas: int = DEFAULT_CANVAS, rows_per_group: int = 4096
) -> Path:
    """Write training pairs ``0 .. n - 1`` of generator ``seed`` to parquet at ``path``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp_path, pq.ParquetWriter(tmp_path, SCHEMA) as writer:
        pairs = generate_pairs(n, seed, canvas)
        while chunk := list(islice(pairs, rows_per_group)):
            columns = {
                "id": [p.id for p in chunk],
                "image_bytes": [encode_png(p.image) for p in chunk],
                "text": [p.caption for p in chunk],
                "task": [p.task for p in chunk],
            }
            writer.write_table(pa.table(columns, schema=SCHEMA))
    return path


def decode_images(image_bytes: list[bytes]) -> torch.Tensor:
    """Float32 ``[B, 3, H, W]`` batch in [-1, 1] from encoded images of one size."""
    return images_to_tensor(np.stack([decode_png(b) for b in image_bytes]))


def load_pairs(path: str | os.PathLike) -> tuple[torch.Tensor, list[str]]:
    """All images of a pairs parquet as a float32 ``[B, 3, H, W]`` batch in [-1, 1], and their captions."""
    table = pq.read_table(path, columns=["image_bytes", "text"])
    return decode_images(table.column("image_bytes").to_pylist()), table.column("text").to_pylist()
