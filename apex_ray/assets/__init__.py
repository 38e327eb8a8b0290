"""Weights shipped inside the package, addressed as ``model.pretrained=bundled:<name>``."""
from __future__ import annotations

import os
from pathlib import Path

from apex_ray.common import storage

ASSETS = Path(__file__).resolve().parent

# name -> (backbone preset and text encoder it was trained with, folder written by save_pretrained)
BUNDLED_MODELS: dict[str, tuple[str, str, Path]] = {
    "bundled:shapes-teacher": ("sana-tiny", "minilm", ASSETS / "shapes_teacher"),
}


def resolve_pretrained(value: str | os.PathLike | None) -> str | None:
    """``bundled:<name>`` -> the shipped folder; a URI (``s3://.../export/ema``) -> a local copy
    downloaded once per node; anything else (path, hub id, None) unchanged."""
    if value is not None and storage.is_uri(value):
        return str(storage.cached_copy(value))
    if value is None or not str(value).startswith("bundled:"):
        return None if value is None else str(value)
    if str(value) not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {value!r}; shipped: {sorted(BUNDLED_MODELS)}")
    return str(BUNDLED_MODELS[str(value)][2])
