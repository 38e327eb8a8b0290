"""The one interface every backbone exposes to the method: ``velocity = model(x_t, t, cond)``.

A :class:`VelocityModel` wraps a diffusers transformer and hides its input conventions
(timestep scale, latent packing, text-mask format) so that the APEX objective, the sampler
and the trainer see a single signature:

- ``x_t``: latent ``[B, C, H, W]`` with ``C == latent_channels``;
- ``t``: float ``[B]`` flow time, 1 = noise, 0 = data, ``x_t = t z + (1 - t) x``. APEX feeds
  shifted times (``a t + b``, e.g. negative or above 1), so no wrapper clamps or checks it;
- ``cond``: a :class:`~apex_ray.method.conditioning.Conditioning` (token embeddings, mask, pooled,
  and an optional per-row ``feature_shift`` the wrapper applies to its projected text features,
  see :func:`shifted_features`);
- returns the velocity ``v = z - x`` ``[B, C, H, W]`` (diffusers' FlowMatch ``noise - x0``).
"""
from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import ClassVar, Iterator

import torch
import torch.distributed as dist
from diffusers import ModelMixin
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)

from apex_ray.method.conditioning import Conditioning

BACKBONE_FILE = "apex_backbone.json"
"""Written next to the diffusers weights; records what the diffusers config does not."""


class VelocityModel(torch.nn.Module, ABC):
    """A flow-matching velocity network: ``velocity = model(x_t, t, cond)``.

    The diffusers model is kept as ``self.transformer`` so that LoRA (peft), gradient
    checkpointing and FSDP2 can reach it; :meth:`blocks` lists the units to shard.
    """

    family: ClassVar[str]
    """Name stored in :data:`BACKBONE_FILE` to pick the wrapper class when loading back."""
    transformer_class: ClassVar[type[ModelMixin]]
    wrapper_keys: ClassVar[tuple[str, ...]] = ()
    """Preset keys that configure the wrapper rather than the diffusers model."""

    latent_channels: int
    sample_size: int

    def __init__(self, transformer: ModelMixin, latent_channels: int, sample_size: int) -> None:
        super().__init__()
        self.transformer = transformer
        self.latent_channels = latent_channels
        self.sample_size = sample_size

    @property
    @abstractmethod
    def text_embed_dim(self) -> int:
        """Width ``D`` of the token embeddings the model accepts (must equal the text encoder's)."""

    @abstractmethod
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity ``[B, C, H, W]`` at ``x_t`` ``[B, C, H, W]``, flow time ``t`` ``[B]``, text ``cond``."""

    def blocks(self) -> list[torch.nn.Module]:
        """The transformer blocks, in order; FSDP2 wraps each one as a shard unit."""
        return list(self.transformer.transformer_blocks)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the diffusers weights and config to ``path`` plus :data:`BACKBONE_FILE`."""
        os.makedirs(path, exist_ok=True)
        self.transformer.save_pretrained(path)
        with open(os.path.join(path, BACKBONE_FILE), "w") as f:
            json.dump({"family": self.family, "sample_size": self.sample_size}, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "VelocityModel":
        """Load what :meth:`save_pretrained` wrote (use :func:`~apex_ray.models.load_backbone`
        when the family is not known in advance)."""
        meta = read_backbone_file(path)
        if meta["family"] != cls.family:
            raise ValueError(f"{path} holds a {meta['family']!r} backbone, not {cls.family!r}")
        return cls(cls.transformer_class.from_pretrained(path), sample_size=meta["sample_size"])


def read_backbone_file(path: str | os.PathLike) -> dict:
    """The ``{"family", "sample_size"}`` record of a folder written by ``save_pretrained``."""
    file = os.path.join(path, BACKBONE_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: {path} was not written by VelocityModel.save_pretrained")
    with open(file) as f:
        return json.load(f)


def flow_time(t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 ``[B]`` on ``x_t``'s device; a scalar is broadcast to the batch.

    Deliberately no clamping: APEX's shifted branch evaluates the network at ``a t + b``.
    """
    return t.to(device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])


def apply_feature_shift(features: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``a h + b`` per row of ``features`` ``[B, ...]`` with ``shift`` ``[B, 2]`` = ``(a, b)`` per row,
    broadcast over the other dimensions; identity rows ``(1, 0)`` are returned exactly as they are."""
    if features.shape[0] != shift.shape[0]:
        raise ValueError(f"feature_shift has {shift.shape[0]} rows, the text features {features.shape[0]}")
    view = (-1,) + (1,) * (features.dim() - 1)
    shift = shift.to(device=features.device, dtype=features.dtype)
    a, b = shift[:, 0].reshape(view), shift[:, 1].reshape(view)
    identity = (a == 1) & (b == 0)
    return torch.where(identity, features, a * features + b)  # no host sync, identity rows untouched


@contextmanager
def shifted_features(module: torch.nn.Module, shift: torch.Tensor | None) -> Iterator[None]:
    """While open, ``module``'s output ``h`` (batch first) becomes ``a h + b`` per row (``shift``
    ``[B, 2]``, see :func:`apply_feature_shift`); ``None``: nothing is registered.

    A temporary forward hook, removed on exit even when the forward raises. It leaves the module
    itself in place, so it works on a module inside an FSDP2-sharded (or peft-wrapped) model;
    open it around the outer forward call so that the hook is there when the module runs.
    """
    if shift is None:
        yield
        return

    def hook(_module: torch.nn.Module, _args, output: torch.Tensor) -> torch.Tensor:
        return apply_feature_shift(output, shift)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU, on rank 0 (other ranks get ``{}``); a collective under FSDP."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def save_unsharded(model: VelocityModel, directory: str | os.PathLike) -> None:
    """``model.save_pretrained(directory)`` for a model that may be sharded (FSDP2): a collective,
    every rank takes part in the gather and rank 0 writes. The full weights are held once, on the
    CPU, by a twin built on the meta device."""
    weights = full_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    with torch.device("meta"):
        twin = type(model)(type(model.transformer).from_config(model.transformer.config), sample_size=model.sample_size)
    twin.load_state_dict(weights, assign=True)
    twin.save_pretrained(directory)
