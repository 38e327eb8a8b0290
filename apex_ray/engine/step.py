"""One worker's optimisation step: objective, accumulation, clipping, skip on non-finite, EMA.

No Ray here: the Ray Train worker (``apex_ray.orchestration.worker``) and the single-process tests drive the
same :class:`StepRunner`. Distribution enters only through the already-wrapped model and the
``grad_sync`` hook.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, ContextManager

import torch

from apex_ray.common.seeds import derive_seed
from apex_ray.config import Config, OptimConfig
from apex_ray.method.batch import Batch
from apex_ray.method.buffer import FakeSampleBuffer
from apex_ray.method.ema import EMA
from apex_ray.method.objective import APEXObjective, FlowMatchingObjective


def build_objective(config: Config) -> APEXObjective | FlowMatchingObjective:
    if config.objective.kind == "apex":
        return APEXObjective(config.objective.apex, FakeSampleBuffer(config.objective.buffer_size))
    return FlowMatchingObjective(config.objective.flow_matching)


def build_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (frozen bases and adapters-only runs included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, decay: str = "constant", total_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from lr / warmup_steps to lr, then constant or cosine down to min_lr_ratio * lr.

    The cosine tail is for long pretraining runs (the ShapeEval teacher); APEX fine-tunes keep a
    constant rate as the paper does.
    """

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteLossError(RuntimeError):
    """Raised after too many non-finite steps in a row; the caller checkpoints and aborts."""


class StepRunner:
    """Runs optimisation steps for one worker and keeps the state a checkpoint needs.

    ``seed`` and ``rank`` seed two generators: the noise generator differs per rank (each rank
    draws its own noise), the structure generator is the same on every rank so that the
    number of anchors, buffer draws and therefore network calls match across ranks (FSDP's
    collectives must).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        ema: EMA | None,
        objective: APEXObjective | FlowMatchingObjective,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        grad_clip: float | None,
        seed: int,
        rank: int = 0,
        device: torch.device | str = "cpu",
        max_nonfinite_steps: int = 5,
        grad_sync: Callable[[bool], ContextManager] | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.ema, self.objective = model, ema, objective
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_clip = grad_clip
        self.device = torch.device(device)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.grad_sync = grad_sync or (lambda enabled: contextlib.nullcontext())
        self.autocast_dtype = autocast_dtype
        self.noise_generator = torch.Generator(self.device).manual_seed(derive_seed(seed, "noise", rank))
        self.structure_generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0

    @property
    def buffer(self) -> FakeSampleBuffer | None:
        return getattr(self.objective, "buffer", None)

    def _autocast(self) -> ContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        """One optimiser step over ``micro_batches`` (gradient accumulation); returns metrics."""
        started = time.perf_counter()
        self.model.train()
        ema_fn = self.ema if self.ema is not None else self.model
        sums: dict[str, float] = {}
        calls = rows = samples = 0
        for i, batch in enumerate(micro_batches):
            batch = batch.to(self.device)
            last = i == len(micro_batches) - 1
            with self.grad_sync(last), self._autocast():
                out = self.objective(self.model, ema_fn, batch.latents, batch.cond,
                                     self.noise_generator, self.structure_generator)
                (out.loss / len(micro_batches)).backward()
            for key, value in out.parts.items():
                sums[key] = sums.get(key, 0.0) + value / len(micro_batches)
            calls, rows, samples = calls + out.forward_calls, rows + out.forward_rows, samples + batch.latents.shape[0]

        grad_norm = self._clip_gradients()
        finite = math.isfinite(grad_norm) and math.isfinite(sums["loss"])
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                decay = self.ema.current_decay()
                self.ema.update(self.model)
                sums["ema_decay"] = decay
            self.nonfinite_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - started
        sums.update(
            grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"], skipped_steps=float(self.skipped_steps),
            forward_calls=float(calls), forward_rows=float(rows), step_time=elapsed,
            samples_per_s=samples / elapsed,
        )
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} non-finite steps in a row at step {self.step}; "
                "lower optim.lr or raise optim.grad_clip, then resume from the last checkpoint"
            )
        return sums

    def _clip_gradients(self) -> float:
        """Global gradient norm (correct for sharded DTensor gradients), clipped to ``grad_clip``."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf"))
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2: the norm of the whole gradient
            norm = norm.full_tensor()
        return float(norm)

    def extra_state(self) -> dict[str, Any]:
        """Everything beside model, EMA and optimiser that an exact resume needs."""
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "noise_generator": self.noise_generator.get_state(),
            "structure_generator": self.structure_generator.get_state(),
            "scheduler": self.scheduler.state_dict(),
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self.noise_generator.set_state(state["noise_generator"])
        self.structure_generator.set_state(state["structure_generator"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.buffer is not None and state["buffer"] is not None:
            self.buffer.load_state_dict(state["buffer"])
