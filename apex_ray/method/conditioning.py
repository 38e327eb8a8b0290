"""Text conditioning passed to every backbone, and the APEX condition shift (paper eq. 16).

A backbone is called as ``velocity = model(x_t, t, cond)`` where ``x_t`` is a latent
``[B, C, H, W]``, ``t`` a float tensor ``[B]`` in flow time (1 = noise, 0 = data; shifted
values may be negative or above 1) and ``cond`` a :class:`Conditioning`.

The text shift can act at two stages (``APEXConfig.shift_stage``): on the text encoder's token
embeddings (``input``, the paper's ``c' = a c + b``) or on the backbone's projected text features
(``projected``, ``h' = a h + b`` with ``h = caption_norm(caption_projection(c))``, as the released
LINs-lab/APEX trainer does). The latter travels as :attr:`Conditioning.feature_shift` and is applied
by the backbone (:func:`apex_ray.models.base.shifted_features`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch

ShiftTarget = Literal["text", "time", "both"]
SHIFT_TARGETS = ("text", "time", "both")
ShiftStage = Literal["input", "projected"]
SHIFT_STAGES = ("input", "projected")


def identity_feature_shift(rows: int, like: torch.Tensor) -> torch.Tensor:
    """``[rows, 2]`` rows of ``(a, b) = (1, 0)``: no shift, on ``like``'s device and float dtype."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    shift = torch.zeros(rows, 2, dtype=dtype, device=like.device)
    shift[:, 0] = 1.0
    return shift


@dataclass(frozen=True)
class Conditioning:
    """Token embeddings ``[B, L, D]``, attention mask ``[B, L]`` (1 = keep), optional pooled ``[B, P]``.

    ``feature_shift`` (optional, ``[B, 2]``): per row ``(a, b)`` of the affine ``h' = a h + b`` the
    backbone applies to its projected text features (``shift_stage=projected``); ``(1, 0)`` rows
    are left exactly as they are, ``None`` means no row is shifted.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None
    feature_shift: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.embeds.dim() != 3:
            raise ValueError(f"Conditioning.embeds must be [B, L, D], got shape {tuple(self.embeds.shape)}")
        if self.mask.shape != self.embeds.shape[:2]:
            raise ValueError(
                f"Conditioning.mask must be [B, L] = {tuple(self.embeds.shape[:2])}, got {tuple(self.mask.shape)}"
            )
        if self.feature_shift is not None and tuple(self.feature_shift.shape) != (self.embeds.shape[0], 2):
            raise ValueError(
                f"Conditioning.feature_shift must be [B, 2] = ({self.embeds.shape[0]}, 2), "
                f"got {tuple(self.feature_shift.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    def index(self, idx: torch.Tensor | slice) -> "Conditioning":
        """Rows ``idx`` of every tensor (a sub-batch, e.g. the anchors)."""
        return Conditioning(
            self.embeds[idx], self.mask[idx], None if self.pooled is None else self.pooled[idx],
            None if self.feature_shift is None else self.feature_shift[idx],
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move to ``device``; ``dtype`` applies to the float tensors only (the mask keeps its own)."""
        return Conditioning(
            self.embeds.to(device=device, dtype=dtype),
            self.mask.to(device=device),
            None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
            None if self.feature_shift is None else self.feature_shift.to(device=device, dtype=dtype),
        )

    def detach(self) -> "Conditioning":
        return Conditioning(
            self.embeds.detach(), self.mask, None if self.pooled is None else self.pooled.detach(),
            None if self.feature_shift is None else self.feature_shift.detach(),
        )

    @staticmethod
    def cat(conds: list["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch; token lengths are padded to the longest (mask 0).

        ``feature_shift``: ``None`` if no part has one, else every part's rows, identity ``(1, 0)``
        rows for the parts without one."""
        length = max(c.embeds.shape[1] for c in conds)
        embeds, masks = [], []
        for c in conds:
            pad = length - c.embeds.shape[1]
            embeds.append(torch.nn.functional.pad(c.embeds, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(c.mask, (0, pad)))
        pooled = None
        if all(c.pooled is not None for c in conds):
            pooled = torch.cat([c.pooled for c in conds])
        feature_shift = None
        given = [c.feature_shift for c in conds if c.feature_shift is not None]
        if given:
            feature_shift = torch.cat([
                c.feature_shift.to(given[0].dtype) if c.feature_shift is not None
                else identity_feature_shift(c.batch_size, given[0])
                for c in conds
            ])
        return Conditioning(torch.cat(embeds), torch.cat(masks), pooled, feature_shift)


VelocityFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
"""``velocity = model(x_t, t, cond)``: a backbone, its EMA, or any wrapper of them."""


def shift_condition(
    cond: Conditioning, t: torch.Tensor, a: float, b: float, target: ShiftTarget = "text",
    stage: ShiftStage = "input",
) -> tuple[Conditioning, torch.Tensor]:
    """The affine condition shift ``c' = a * c + b`` with ``A = a I`` and uniform bias (eq. 16).

    ``target`` says where it acts: ``text`` shifts the text condition, the paper's framing;
    ``time`` shifts the timestep input ``t -> a t + b`` (the released code uses ``t -> -t``);
    ``both`` does both. The mask is never shifted.

    ``stage`` says where the text shift acts: ``input`` shifts the token embeddings (and pooled
    vector) themselves; ``projected`` leaves them untouched and sets ``feature_shift`` so that the
    backbone shifts its projected, normalised text features ``h' = a h + b`` (the released
    LINs-lab/APEX trainer; composed with an existing ``feature_shift``). ``stage`` has no effect
    for ``target="time"``.
    """
    if target not in SHIFT_TARGETS:
        raise ValueError(f"shift target must be one of {SHIFT_TARGETS}, got {target!r}")
    if stage not in SHIFT_STAGES:
        raise ValueError(f"shift stage must be one of {SHIFT_STAGES}, got {stage!r}")
    if target in ("text", "both") and stage == "input":
        cond = replace(
            cond,
            embeds=a * cond.embeds + b,
            pooled=None if cond.pooled is None else a * cond.pooled + b,
        )
    elif target in ("text", "both"):
        previous = cond.feature_shift
        if previous is None:
            previous = identity_feature_shift(cond.batch_size, cond.embeds)
        # a (a0 h + b0) + b = (a a0) h + (a b0 + b)
        cond = replace(cond, feature_shift=torch.stack([a * previous[:, 0], a * previous[:, 1] + b], dim=1))
    if target in ("time", "both"):
        t = a * t + b
    return cond, t
