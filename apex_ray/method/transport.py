"""Linear transport between data and noise (paper eq. 3 and 9).

t = 1 is noise and t = 0 is data: ``x_t = t z + (1 - t) x`` and the velocity is ``v = z - x``.
"""
from __future__ import annotations

import torch


def expand_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample time ``[B]`` against a batch ``[B, ...]``."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The point on the straight path at time ``t``: ``t z + (1 - t) x``."""
    t = expand_time(t, x)
    return t * z + (1 - t) * x


def f_x(velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean-data estimate from a velocity prediction: ``x_t - t F`` (eq. 3)."""
    return x_t - expand_time(t, x_t) * velocity


def f_z(velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise estimate from a velocity prediction: ``x_t + (1 - t) F`` (eq. 9)."""
    return x_t + (1 - expand_time(t, x_t)) * velocity
