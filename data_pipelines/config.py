"""Typed, validated configuration of the latent-preparation job: a YAML file plus ``key.sub=value``
overrides, checked before Ray or any model starts.

The backbone preset picks the defaults that must match the model to be trained: its text
encoder (``apex_ray.models``) and its image codec (pixels for the tiny presets, the released
VAE for SANA and Qwen-Image).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from apex_ray.config import read_config_tree, set_dotted, validate_tree
from apex_ray.models import BACKBONE_PRESETS, TEXT_ENCODER_PRESETS

CodecName = Literal["pixel", "autoencoder-kl", "autoencoder-dc", "autoencoder-kl-qwenimage"]
InputFormat = Literal["auto", "parquet", "image_folder", "shapeeval"]
StorageDtype = Literal["float32", "float16"]

DEFAULT_CODECS: dict[str, tuple[CodecName, str | None, str | None]] = {
    name: (spec.codec, None, None) if spec.codec == "pixel" else (spec.codec, spec.checkpoint, "vae")
    for name, spec in BACKBONE_PRESETS.items()
}
"""Backbone preset -> (codec, weights, subfolder) the model was trained with."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    path: str  # parquet file, folder of parquet files, or folder of images with .txt captions
    format: InputFormat = "auto"  # auto: images in a folder -> image_folder; ShapeEval columns -> shapeeval
    image_column: str = "image_bytes"  # parquet: encoded image bytes (PNG, JPEG, ...)
    caption_column: str = "text"
    id_column: str | None = None  # parquet: row id column; None -> "<file>:<row>"; repeats -> duplicate_id rejects


class ImageConfig(_Section):
    size: int = Field(32, gt=0)  # side of the square crop fed to the codec
    min_side: int | None = Field(None, gt=0)  # shorter side below this is rejected; default size // 2
    decode_num_cpus: float | None = Field(None, gt=0)  # per decode task; default below
    max_pixels: int = Field(64_000_000, gt=0)  # larger images are rejected (too_large) before decoding

    @property
    def resolved_min_side(self) -> int:
        return self.min_side or max(1, self.size // 2)


class ActorPoolConfig(_Section):
    concurrency: int = Field(1, gt=0)  # actors in the pool
    num_cpus: float = Field(1.0, ge=0)  # per actor
    num_gpus: float = Field(0.0, ge=0)  # per actor; > 0 runs the model on CUDA
    batch_size: int = Field(64, gt=0)  # rows per call


class _EncoderPoolConfig(ActorPoolConfig):
    concurrency: int | None = Field(None, gt=0)  # actors; default: sized from the cluster (data_pipelines/resources.py)


class CodecConfig(_EncoderPoolConfig):
    name: CodecName | None = None  # default: the backbone's codec
    path: str | None = None  # local folder or hub id (diffusers VAE or pipeline); default: the backbone's
    subfolder: str | None = None  # e.g. "vae" inside a pipeline; local folders are detected
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # compute dtype


class TextConfig(_EncoderPoolConfig):
    encoder: str | None = None  # apex_ray.models.TEXT_ENCODER_PRESETS name; default: the backbone's
    path: str | None = None  # default: the preset's weights
    max_length: int | None = Field(None, gt=0)  # tokens kept (and padded to); default: the preset's


class StorageConfig(_Section):
    latent_dtype: StorageDtype = "float32"
    text_dtype: StorageDtype = "float16"
    rows_per_shard: int = Field(1024, gt=0)  # at most this many rows per parquet shard


class PrepareConfig(_Section):
    input: InputConfig
    output: str  # folder of the prepared set; locked while the job runs; not inside input.path (nor it inside)
    overwrite: bool = False  # replace a complete prepared set at ``output``; it stays until the new one is complete
    backbone: str = "sana-tiny"  # apex_ray.models.BACKBONE_PRESETS name: picks codec and text encoder
    image: ImageConfig = Field(default_factory=ImageConfig)
    codec: CodecConfig = Field(default_factory=CodecConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _resolve_defaults(self) -> "PrepareConfig":
        if self.backbone not in BACKBONE_PRESETS:
            raise ValueError(f"backbone: unknown preset {self.backbone!r}; valid presets: {sorted(BACKBONE_PRESETS)}")
        codec, path, subfolder = DEFAULT_CODECS[self.backbone]
        if self.codec.name is None:
            self.codec.name = codec
            if self.codec.path is None:
                self.codec.path, self.codec.subfolder = path, subfolder
        if self.codec.name != "pixel" and not self.codec.path:
            raise ValueError(f"codec.path is required for codec {self.codec.name!r} (a local folder or hub id)")
        if self.text.encoder is None:
            self.text.encoder = BACKBONE_PRESETS[self.backbone].text_encoder
        if self.text.encoder not in TEXT_ENCODER_PRESETS:
            raise ValueError(
                f"text.encoder: unknown preset {self.text.encoder!r}; valid presets: {sorted(TEXT_ENCODER_PRESETS)}"
            )
        if self.text.max_length is None:
            self.text.max_length = TEXT_ENCODER_PRESETS[self.text.encoder].max_length
        return self

    @property
    def decode_cpus(self) -> float:
        """CPUs per decode task. By default the codec's ``num_cpus`` when the codec runs on CPU, so
        that Ray fuses decoding into the codec actors (no extra CPUs needed), else 1."""
        if self.image.decode_num_cpus is not None:
            return self.image.decode_num_cpus
        return self.codec.num_cpus if self.codec.num_gpus == 0 else 1.0

    def content_hash(self) -> str:
        """Hash of every setting that changes the prepared rows (not where or how fast they are made)."""
        content = self.model_dump(
            mode="json",
            include={"input", "backbone", "image", "codec", "text", "storage"},
            exclude={
                "codec": set(ActorPoolConfig.model_fields),
                "text": set(ActorPoolConfig.model_fields),
                "image": {"decode_num_cpus"},
                "storage": {"rows_per_shard"},
            },
        )
        content["input"]["path"] = os.path.abspath(content["input"]["path"])
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


class FakeBufferConfig(_Section):
    checkpoint: str  # folder written by VelocityModel.save_pretrained
    latents: str  # prepared set whose captions (text embeddings) are sampled for
    output: str  # folder of the fake-sample buffer; locked while the job runs
    steps: int = Field(1, gt=0)  # sampler steps (NFE for the first-order sampler)
    limit: int | None = Field(None, gt=0)  # first rows of the prepared set; default all
    seed: int = 0  # noise of row ``id`` is seeded by (seed, id): independent of batching (ids must be unique)
    overwrite: bool = False  # replace a complete buffer at ``output``; it stays until the new one is complete
    sampler: ActorPoolConfig = Field(default_factory=ActorPoolConfig)
    rows_per_shard: int = Field(4096, gt=0)


_Job = TypeVar("_Job", PrepareConfig, FakeBufferConfig)


def load_job_config(schema: type[_Job], path: str | os.PathLike | None = None, overrides: list[str] = (),
                    settings: dict[str, Any] | None = None) -> _Job:
    """Read a YAML file (optional, ``base:`` allowed), apply ``key.sub=value`` overrides (values
    parsed as YAML), then ``settings`` (``{"key.sub": value}``, taken as they are, e.g. paths from
    CLI flags), validate against ``schema``. Raises ConfigError."""
    tree = read_config_tree(path, overrides)
    for key, value in (settings or {}).items():
        set_dotted(tree, key, value)
    return validate_tree(schema, tree, fields_in="data_pipelines/config.py")


def load_prepare_config(path: str | os.PathLike | None = None, overrides: list[str] = (),
                        settings: dict[str, Any] | None = None) -> PrepareConfig:
    return load_job_config(PrepareConfig, path, overrides, settings)


def load_fake_buffer_config(path: str | os.PathLike | None = None, overrides: list[str] = (),
                            settings: dict[str, Any] | None = None) -> FakeBufferConfig:
    return load_job_config(FakeBufferConfig, path, overrides, settings)
