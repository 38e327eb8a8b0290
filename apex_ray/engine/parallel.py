"""How a backbone is spread over workers: FSDP2 per transformer block, DDP, or a single process.

Kept apart from the training step (torchtitan style): the step only sees a module it can call
and a ``grad_sync(enabled)`` context for gradient accumulation.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Literal

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

Strategy = Literal["fsdp", "ddp", "single"]


def mixed_precision_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """bf16 compute on GPUs (``auto``/``bf16``), fp32 on CPU; master weights stay fp32."""
    if setting == "fp32" or (setting == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def apply_fsdp(model: torch.nn.Module, blocks: list[torch.nn.Module], compute_dtype: torch.dtype | None) -> None:
    """``fully_shard`` each block, then the root: parameters, gradients and optimiser state sharded.

    With ``compute_dtype`` the all-gathered parameters are cast to it for compute while
    gradients are reduced in fp32 (bf16 params / fp32 reduce, the paper's setting on GPUs).
    """
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.register_forward_hook(_reshard_after_no_grad_forward)


def _reshard_after_no_grad_forward(module: FSDPModule, args, output) -> None:
    """FSDP2 keeps the root's parameters gathered after forward, expecting a backward to reshard
    them; EMA and sampling forwards have none, so reshard here (the EMA update and checkpoints
    need sharded DTensors, and the memory is freed)."""
    if not torch.is_grad_enabled():
        module.reshard()


def parallelize(
    model: torch.nn.Module,
    blocks: list[torch.nn.Module],
    strategy: Strategy,
    device: torch.device,
    compute_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
) -> torch.nn.Module:
    """Return the module to train with; FSDP shards ``model`` in place, DDP wraps it."""
    if activation_checkpointing:
        # diffusers' own per-block checkpointing: activations recomputed in the backward pass.
        model.transformer.enable_gradient_checkpointing()
    if strategy == "fsdp":
        apply_fsdp(model, blocks, compute_dtype)
        return model
    if strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "single":
        return model
    raise ValueError(f"unknown strategy {strategy!r}; use fsdp, ddp or single")


def gradient_sync(model: torch.nn.Module) -> Callable[[bool], ContextManager]:
    """A context factory: ``with grad_sync(is_last_micro_batch):`` skips the gradient all-reduce /
    reduce-scatter on all but the last micro-batch of an accumulation."""
    if isinstance(model, FSDPModule):
        @contextlib.contextmanager
        def fsdp_sync(enabled: bool):
            model.set_requires_gradient_sync(enabled)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp_sync
    if isinstance(model, DistributedDataParallel):
        return lambda enabled: contextlib.nullcontext() if enabled else model.no_sync()
    return lambda enabled: contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone behind a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
