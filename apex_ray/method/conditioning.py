"""Text conditioning passed to every backbone, and the APEX condition shift (paper eq. 16).

A backbone is called as ``velocity = model(x_t, t, cond)`` where ``x_t`` is a latent
``[B, C, H, W]``, ``t`` a float tensor ``[B]`` in flow time (1 = noise, 0 = data; shifted
values may be negative or above 1) and ``cond`` a :class:`Conditioning`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch

ShiftTarget = Literal["text", "time", "both"]
SHIFT_TARGETS = ("text", "time", "both")


@dataclass(frozen=True)
class Conditioning:
    """Token embeddings ``[B, L, D]``, attention mask ``[B, L]`` (1 = keep), optional pooled ``[B, P]``."""

    embeds: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.embeds.dim() != 3:
            raise ValueError(f"Conditioning.embeds must be [B, L, D], got shape {tuple(self.embeds.shape)}")
        if self.mask.shape != self.embeds.shape[:2]:
            raise ValueError(
                f"Conditioning.mask must be [B, L] = {tuple(self.embeds.shape[:2])}, got {tuple(self.mask.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx: torch.Tensor | slice) -> "Conditioning":
        """Rows ``idx`` of every tensor (a sub-batch, e.g. the anchors)."""
        return Conditioning(
            self.embeds[idx], self.mask[idx], None if self.pooled is None else self.pooled[idx]
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move to ``device``; ``dtype`` applies to the float tensors only (the mask keeps its own)."""
        return Conditioning(
            self.embeds.to(device=device, dtype=dtype),
            self.mask.to(device=device),
            None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
        )

    def detach(self) -> "Conditioning":
        return Conditioning(
            self.embeds.detach(), self.mask, None if self.pooled is None else self.pooled.detach()
        )

    @staticmethod
    def cat(conds: list["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch; token lengths are padded to the longest (mask 0)."""
        length = max(c.embeds.shape[1] for c in conds)
        embeds, masks = [], []
        for c in conds:
            pad = length - c.embeds.shape[1]
            embeds.append(torch.nn.functional.pad(c.embeds, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(c.mask, (0, pad)))
        pooled = None
        if all(c.pooled is not None for c in conds):
            pooled = torch.cat([c.pooled for c in conds])
        return Conditioning(torch.cat(embeds), torch.cat(masks), pooled)


VelocityFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
"""``velocity = model(x_t, t, cond)``: a backbone, its EMA, or any wrapper of them."""


def shift_condition(
    cond: Conditioning, t: torch.Tensor, a: float, b: float, target: ShiftTarget = "text"
) -> tuple[Conditioning, torch.Tensor]:
    """The affine condition shift ``c' = a * c + b`` with ``A = a I`` and uniform bias (eq. 16).

    ``target`` says where it acts: ``text`` shifts the token embeddings (and pooled vector),
    the paper's framing; ``time`` shifts the timestep input ``t -> a t + b`` (the released code
    uses ``t -> -t``); ``both`` does both. The mask is never shifted.
    """
    if target not in SHIFT_TARGETS:
        raise ValueError(f"shift target must be one of {SHIFT_TARGETS}, got {target!r}")
    if target in ("text", "both"):
        cond = replace(
            cond,
            embeds=a * cond.embeds + b,
            pooled=None if cond.pooled is None else a * cond.pooled + b,
        )
    if target in ("time", "both"):
        t = a * t + b
    return cond, t
