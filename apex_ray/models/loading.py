"""Load a backbone without ever holding it whole: a skeleton with its parameters on the ``meta``
device, sharded (FSDP2) or not, then each parameter's own part allocated and filled in place, one
tensor at a time (torchtitan's order: meta init, ``fully_shard``, ``to_empty``, load)::

    with empty_weights():                  # parameters on meta; buffers and plain tensors real (CPU)
        model = backbone_skeleton(preset, pretrained)   # apex_ray.models.presets
    apply_lora(model, ...); fully_shard(...)            # still nothing allocated
    materialize(model, device)             # to_empty: under FSDP2 each rank allocates its shards only
    weights = SafetensorsWeights(folder)
    for name, param in ...: fill_(param, lambda index: weights.read(key, index))

Under FSDP2 a parameter is a DTensor whose local shard is a block of the full tensor
(:func:`local_index`); :class:`SafetensorsWeights` reads just that block's bytes from the file,
so a rank holds its shards plus one block in flight. Without a process group (one process) a parameter is a
plain tensor and its "shard" the whole of it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from diffusers.utils.constants import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

Index = tuple[slice, ...]
"""The block of a full tensor that one rank holds: one slice per dimension."""


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Parameters registered inside the block are put on the ``meta`` device (no memory).

    Buffers and plain tensor attributes (sin-cos positions, rotary tables) are computed for real,
    on the CPU: they are small, and on ``meta`` their values, which no checkpoint holds, would be
    lost (``to_empty`` cannot recompute them). This is accelerate's ``init_empty_weights``.
    """
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.detach().to("meta"),
                                                          requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def materialize(module: torch.nn.Module, device: torch.device | str) -> None:
    """Allocate the (meta) parameters of ``module`` on ``device``, uninitialised: under FSDP2 each
    rank allocates its own shards only. Buffers move to ``device`` with their values."""
    buffers = {name: buffer for name, buffer in module.named_buffers()}
    module.to_empty(device=device)  # FSDP2's _apply re-registers the sharded parameters
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds: a DTensor's local shard, else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_index(tensor: torch.Tensor) -> Index:
    """Where this rank's part of ``tensor`` sits in the full tensor (FSDP2: a block of rows)."""
    if isinstance(tensor, DTensor):
        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    else:
        shape, offset = tuple(tensor.shape), (0,) * tensor.dim()
    return tuple(slice(start, start + size) for start, size in zip(offset, shape))


@torch.no_grad()
def fill_(tensor: torch.Tensor, read: Callable[[Index], torch.Tensor]) -> None:
    """Copy ``read(local_index(tensor))`` (the values of this rank's block, any dtype, any device)
    into ``tensor``'s local part, in place, converting to its dtype."""
    index = local_index(tensor)
    part = local(tensor)
    values = read(index)
    if tuple(values.shape) != tuple(part.shape):
        raise ValueError(f"expected a block of shape {tuple(part.shape)}, got {tuple(values.shape)}")
    part.copy_(values)


@torch.no_grad()
def fill_from_full_(tensor: torch.Tensor, full: torch.Tensor) -> None:
    """:func:`fill_` from the full tensor (held once, e.g. a random initialisation on the CPU)."""
    if tuple(full.shape) != tuple(tensor.shape):
        raise ValueError(f"expected a tensor of shape {tuple(tensor.shape)}, got {tuple(full.shape)}")
    fill_(tensor, lambda index: full[index])


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype codes (the format's header) -> torch dtypes."""


class SafetensorsWeights:
    """The tensors of a diffusers weights folder (``diffusion_pytorch_model.safetensors``, or the
    shards of its ``.index.json``), read a block at a time.

    A block of rows (FSDP2's ``Shard(0)``) is one contiguous byte range of the file, read straight
    into a new tensor of the block's size: a rank reads and holds only its own bytes. (safetensors'
    ``get_slice`` maps the whole file instead, whose pages then count against the process.) The
    file layout is the format's: an 8-byte little-endian header length, a JSON header giving each
    tensor's dtype, shape and byte range, then the data.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.folder / SAFETENSORS_WEIGHTS_NAME).is_file():
            files = [SAFETENSORS_WEIGHTS_NAME]
        else:
            found = sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else "no such folder"
            raise FileNotFoundError(
                f"{self.folder} has no {SAFETENSORS_WEIGHTS_NAME} (or {SAFE_WEIGHTS_INDEX_NAME}); found: {found}. "
                "Weights load from safetensors only: re-save other formats with save_pretrained(..., "
                "safe_serialization=True)")
        self._entries: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...]]] = {}
        for name in files:
            self._read_header(self.folder / name)

    def _read_header(self, file: Path) -> None:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{file}: tensor {key} has dtype {entry['dtype']}, which this loader does not read")
            self._entries[key] = (file, 8 + length + entry["data_offsets"][0], SAFETENSORS_DTYPES[entry["dtype"]],
                                  tuple(entry["shape"]))

    def keys(self) -> set[str]:
        return set(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][3]

    def read(self, key: str, index: Index) -> torch.Tensor:
        """The block ``index`` of tensor ``key`` (in the file's dtype, on the CPU)."""
        file, offset, dtype, shape = self._entries[key]
        rows = index[0] if index else slice(0, 1)
        if any((part.start or 0) != 0 or part.stop != size for part, size in zip(index[1:], shape[1:])):
            return self.read(key, (slice(0, shape[0]),) + tuple(slice(0, n) for n in shape[1:]))[index]
        block = torch.empty((rows.stop - rows.start, *shape[1:]) if shape else (), dtype=dtype)
        row_bytes = math.prod(shape[1:]) * block.element_size()
        buffer = block.reshape(-1).view(torch.uint8).numpy()
        with open(file, "rb") as handle:
            handle.seek(offset + rows.start * row_bytes)
            if handle.readinto(buffer) != buffer.nbytes:
                raise ValueError(f"{file} is truncated: tensor {key} ends past the end of the file")
        return block
