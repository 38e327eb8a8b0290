"""A training micro-batch: data latents and their text conditioning (what every data source yields)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from apex_ray.method.conditioning import Conditioning


@dataclass
class Batch:
    """A micro-batch: latents ``[B, C, H, W]`` and their text conditioning."""

    latents: torch.Tensor
    cond: Conditioning

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.latents.to(device), self.cond.to(device))
