"""The embedded default's data: ShapeEval raw pairs, prepared once by the same Ray Data job as
any user data (raw parquet -> ``prepare_latents`` -> prepared set), cached by its settings.

Several trainings or sweep trials may start on the same cold cache at once: the first to lock
the set's cache folder prepares it, the others wait for that lock and then reuse its complete set.
"""
from __future__ import annotations

import logging
from pathlib import Path

from apex_ray.engine.prepared import MANIFEST
from apex_ray.shapeeval import write_pairs
from data_pipelines.config import load_prepare_config
from data_pipelines.output import locked_folder
from data_pipelines.prepare_latents import prepare

log = logging.getLogger(__name__)


def ensure_shapeeval_prepared(cache_dir: str | Path, num_samples: int, seed: int, image_size: int,
                              backbone: str, text_encoder: str, max_text_length: int,
                              wait_timeout_s: float | None = None) -> Path:
    """The prepared set for these settings under ``cache_dir``, made on first use (needs Ray).

    While another process prepares the same set this waits for it (at most ``wait_timeout_s``
    seconds, if given; then :class:`~data_pipelines.output.OutputError`) and returns its set; if
    that process failed, this one prepares the set itself.
    """
    name = f"shapeeval-n{num_samples}-s{seed}-{image_size}px-{backbone}-{text_encoder}{max_text_length}"
    root = Path(cache_dir) / name
    prepared = root / "prepared"
    if (prepared / MANIFEST).is_file():
        return prepared
    root.mkdir(parents=True, exist_ok=True)
    with locked_folder(root, "ShapeEval cache", wait=True, timeout_s=wait_timeout_s):
        if (prepared / MANIFEST).is_file():
            log.info("ShapeEval cache: reusing %s, prepared by another job meanwhile", prepared)
            return prepared
        raw = root / "raw.parquet"
        if not raw.is_file():
            write_pairs(raw, num_samples, seed=seed, canvas=image_size)  # atomic
        config = load_prepare_config(settings={
            "input.path": str(raw), "output": str(prepared), "backbone": backbone, "image.size": image_size,
            "text.encoder": text_encoder, "text.max_length": max_text_length,
        })
        prepare(config)
    return prepared
