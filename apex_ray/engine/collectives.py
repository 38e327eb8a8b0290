"""The one way this project runs a tensor collective: on the process group backend's device.

NCCL takes CUDA tensors only and gloo CPU tensors only; every all-reduce of metrics, norms or
counters goes through :func:`all_reduce_mean`, every gather through :func:`gather_to_rank0`, so
that tensors are placed where the backend wants them (and a single process needs no process group).
"""
from __future__ import annotations

from typing import Any

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


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (tensors moved to CPU first), in rank order on rank 0; ``None`` elsewhere.

    ``gather_object`` pickles through tensors on the backend's device (NCCL: the current CUDA
    device, which the worker sets), so the payload itself is kept on the CPU.
    """
    obj = _to_cpu(obj)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(item) for item in obj)
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    return obj
