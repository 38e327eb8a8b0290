"""The encoder stages of the preparation job, as callable classes that Ray Data runs as actor pools.

Each actor loads its model once (``__init__``) and then encodes batches. Only usable rows
(``reason == ""``) are encoded; a failing batch is retried row by row so that only the rows that
really fail (or give NaN/inf) become rejects, with the error as their ``detail``. The same
classes run in a plain loop in the benchmark.

Each class imports its own model code when an actor starts: a codec actor never loads the text
encoders (transformers) and a text actor never loads the VAEs (diffusers), seconds of CPU per
actor process at start-up.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from apex_ray.common.files import atomic_path
from apex_ray.common.images import images_to_tensor
from data_pipelines.decode import IMAGE_ENCODING_FAILED, TEXT_ENCODING_FAILED

if TYPE_CHECKING:
    from apex_ray.models.codecs import ImageCodec
    from apex_ray.models.text_encoders import TextEncoder

Arrays = dict[str, np.ndarray]
EMPTY_PROMPT_TENSORS = {"embeds": "text_embeds", "mask": "text_mask", "pooled": "pooled"}
"""Tensor names in ``empty_prompt.safetensors`` -> the shard columns they correspond to."""


def _device(num_gpus: float) -> str:
    return "cuda" if num_gpus > 0 else "cpu"


def load_codec(*args: Any, **kwargs: Any) -> ImageCodec:
    """:func:`apex_ray.models.codecs.load_codec`, imported on first use (codec actors only)."""
    from apex_ray.models.codecs import load_codec as load

    return load(*args, **kwargs)


def build_text_encoder(*args: Any, **kwargs: Any) -> TextEncoder:
    """:func:`apex_ray.models.build_text_encoder`, imported on first use (text actors only)."""
    from apex_ray.models.text_encoders import build_text_encoder as build

    return build(*args, **kwargs)


class ImageEncoder:
    """Pixels ``uint8 [B, S, S, 3]`` -> ``latent [B, C, h, w]`` with the configured codec."""

    def __init__(self, codec: dict, image_size: int, latent_dtype: str, num_gpus: float = 0.0) -> None:
        self.codec = load_codec(codec["name"], codec.get("path"), codec.get("subfolder"),
                                device=_device(num_gpus), dtype=codec.get("dtype", "float32"))
        self.dtype = np.dtype(latent_dtype)
        self.template = _zeros_like(self.encode([np.zeros((image_size, image_size, 3), np.uint8)]))

    def encode(self, images: Sequence[np.ndarray]) -> Arrays:
        latents = self.codec.encode(images_to_tensor(np.stack(images)))
        return {"latent": latents.numpy().astype(self.dtype)}

    def __call__(self, batch: Arrays) -> Arrays:
        rest = {key: value for key, value in batch.items() if key != "pixels"}
        return {**rest, **encode_usable_rows(batch, list(batch["pixels"]), self.encode, self.template,
                                             IMAGE_ENCODING_FAILED)}


class CaptionEncoder:
    """Captions -> ``text_embeds [B, L, D]``, ``text_mask [B, L]`` (int8) and ``pooled [B, P]`` if the
    encoder has one; always padded to ``max_length`` so every row has the same shape. With
    ``empty_prompt_file`` the actor also writes the embedding of ``""`` there when it starts."""

    def __init__(self, preset: str, path: str | None, max_length: int, text_dtype: str, num_gpus: float = 0.0,
                 empty_prompt_file: str | None = None) -> None:
        self.encoder = build_text_encoder(preset, path, max_length=max_length, device=_device(num_gpus))
        self.max_length = max_length
        self.dtype = np.dtype(text_dtype)
        empty_prompt = self.encode([""])
        self.template = _zeros_like(empty_prompt)
        if empty_prompt_file is not None:
            save_empty_prompt(empty_prompt, empty_prompt_file)

    def encode(self, captions: Sequence[str]) -> Arrays:
        """Each distinct caption is encoded once (captions repeat a lot in practice)."""
        # Already loaded with the encoder (build_text_encoder): no import cost per batch.
        from apex_ray.models.text_encoders import encode_unique

        cond = encode_unique(self.encoder.encode, list(captions), chunk=len(captions) or 1)
        pad = self.max_length - cond.embeds.shape[1]
        if pad < 0:
            raise RuntimeError(f"text encoder returned {cond.embeds.shape[1]} tokens, "
                               f"more than max_length={self.max_length}")
        out = {
            "text_embeds": torch.nn.functional.pad(cond.embeds, (0, 0, 0, pad)).cpu().numpy().astype(self.dtype),
            "text_mask": torch.nn.functional.pad(cond.mask, (0, pad)).cpu().numpy().astype(np.int8),
        }
        if cond.pooled is not None:
            out["pooled"] = cond.pooled.cpu().numpy().astype(self.dtype)
        return out

    def __call__(self, batch: Arrays) -> Arrays:
        return {**batch, **encode_usable_rows(batch, list(batch["caption"]), self.encode, self.template,
                                              TEXT_ENCODING_FAILED)}


def encode_usable_rows(batch: Arrays, inputs: list, encode: Callable[[list], Arrays], template: Arrays,
                       failure_reason: str) -> Arrays:
    """``encode`` the rows of ``batch`` whose ``reason`` is empty; zeros elsewhere.

    Returns the encoded columns plus ``reason`` / ``detail`` updated with ``failure_reason`` for
    rows whose encoding failed.
    """
    reasons = np.array(batch["reason"], dtype=object)  # object: a fixed-width str array would truncate
    details = np.array(batch["detail"], dtype=object)
    out = {key: np.repeat(value, len(reasons), axis=0) for key, value in template.items()}
    usable = np.flatnonzero(reasons == "")
    if len(usable):
        encoded, failures = encode_isolating_failures(encode, [inputs[i] for i in usable], template)
        for key in out:
            out[key][usable] = encoded[key]
        for position, message in failures.items():
            row = usable[position]
            reasons[row], details[row] = failure_reason, message
            for key in out:
                out[key][row] = 0
    return {**out, "reason": reasons, "detail": details}


def encode_isolating_failures(encode: Callable[[list], Arrays], items: list,
                              template: Arrays) -> tuple[Arrays, dict[int, str]]:
    """``encode(items)`` in one call; if that raises, one item at a time so that only failing items
    are lost. Returns the outputs (template zeros for failures) and ``{position: error}``; outputs
    with NaN or inf count as failures."""
    failures: dict[int, str] = {}
    try:
        out = encode(items)
    except Exception as error:
        if len(items) == 1:
            return {key: value.copy() for key, value in template.items()}, {0: _describe(error)}
        parts = []
        for position, item in enumerate(items):
            try:
                parts.append(encode([item]))
            except Exception as item_error:
                failures[position] = _describe(item_error)
                parts.append(template)
        out = {key: np.concatenate([part[key] for part in parts]) for key in template}
    for position in range(len(items)):
        if position not in failures and not all(np.isfinite(out[key][position]).all() for key in out):
            failures[position] = "non-finite values (NaN or inf) in the encoder output"
    return out, failures


def save_empty_prompt(arrays: Arrays, file: str) -> None:
    """Write the empty prompt's row as ``embeds``, ``mask`` (and ``pooled``). Every text actor
    writes the same file, atomically, so it costs no extra load of the text encoder."""
    tensors = {name: torch.from_numpy(arrays[column][0].copy())
               for name, column in EMPTY_PROMPT_TENSORS.items() if column in arrays}
    with atomic_path(file) as tmp:
        save_file(tensors, str(tmp))


def _zeros_like(arrays: Arrays) -> Arrays:
    return {key: np.zeros_like(value[:1]) for key, value in arrays.items()}


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:500]
