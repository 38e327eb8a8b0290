"""The one way this project runs a tensor collective: on the process group backend's device.

NCCL takes CUDA tensors only and gloo CPU tensors only; every all-reduce of metrics, norms or
counters goes through :func:`all_reduce_mean` so that the tensor is placed where the backend
wants it (and a single process needs no process group).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def backend_device() -> torch.device:
    """The device a collective's tensors must live on for the default process group."""
    if not dist.is_initialized():
        return torch.device("cpu")
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """The mean over ranks of each value (floats or 0-d tensors), as floats; one collective."""
    if not values:
        return {}
    keys = list(values)
    device = backend_device()
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32).to(device).reshape(()) for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked = stacked / dist.get_world_size()
    return dict(zip(keys, stacked.cpu().tolist()))
