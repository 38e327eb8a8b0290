"""Pixels <-> model images: uint8 ``[..., H, W, 3]`` and float ``[..., 3, H, W]`` in [-1, 1].

The one conversion every layer uses (data preparation, streams, evaluation grids, the scorer,
saved samples), so a rounding or channel-order change happens in one place.
"""
from __future__ import annotations

import numpy as np
import torch


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` (or one ``[H, W, 3]``) -> float32 in [-1, 1], ``[N, 3, H, W]`` (or ``[3, H, W]``)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    return (tensor / 127.5 - 1.0).movedim(-1, -3).contiguous()


def tensor_to_images(tensor: torch.Tensor) -> np.ndarray:
    """Float ``[N, 3, H, W]`` (or ``[3, H, W]``) in [-1, 1] -> uint8 ``[N, H, W, 3]`` (or ``[H, W, 3]``).

    Values are clipped to [-1, 1] and rounded to the nearest level.
    """
    scaled = ((tensor.detach().to("cpu", torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).movedim(-3, -1).contiguous().numpy()
