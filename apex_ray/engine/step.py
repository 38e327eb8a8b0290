"""One worker's optimisation step: objective, accumulation, clipping, skip on non-finite, EMA.

No Ray here: the Ray Train worker (``apex_ray.orchestration.worker``) and the single-process tests drive the
same :class:`StepRunner`. Distribution enters only through the already-wrapped model and the
``grad_sync`` hook.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from typing import Any, Callable, ContextManager

import torch

from apex_ray.common.seeds import derive_seed
from apex_ray.config import Config, OptimConfig
from apex_ray.method.batch import Batch
from apex_ray.method.buffer import FakeSampleBuffer
from apex_ray.method.consistency import ConsistencyObjective
from apex_ray.method.ema import EMA
from apex_ray.method.objective import APEXObjective, FlowMatchingObjective

Objective = APEXObjective | FlowMatchingObjective | ConsistencyObjective


def build_objective(config: Config, frozen: Callable | None = None) -> Objective:
    """The run's objective; ``frozen`` is the no-grad starting model (``shift_reference=frozen``;
    the teacher of ``kind=consistency``)."""
    if config.objective.kind == "apex":
        return APEXObjective(config.objective.apex, FakeSampleBuffer(config.objective.buffer_size), frozen=frozen)
    if config.objective.kind == "consistency":
        return ConsistencyObjective(config.objective.consistency, teacher=frozen)
    return FlowMatchingObjective(config.objective.flow_matching)


def build_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (frozen bases and adapters-only runs included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    # Fused: one kernel per step, and it honours ``found_inf`` (a device flag), which is how a
    # non-finite step is skipped without reading the loss on the host (StepRunner).
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay, fused=True)


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
    draws its own noise), the structure generator (host-side ``random.Random``) is the same on
    every rank so that the number of anchors, buffer draws and therefore network calls match
    across ranks (FSDP's collectives must).

    A step does not wait for the device: loss parts, gradient norm and the non-finite test stay
    device tensors, a non-finite step is skipped by the fused optimiser's ``found_inf`` flag and
    a gated EMA update, and only ``train_step(..., read_metrics=True)`` (the steps that log) reads
    them back, in one transfer, raising :class:`NonFiniteLossError` if too many steps in a row
    since the last read were skipped.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        ema: EMA | None,
        objective: Objective,
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
        self.structure_generator = random.Random(seed)
        if self.buffer is not None and self.buffer.device is None:
            self.buffer.device = self.device
        self._fused = all(group.get("fused") for group in optimizer.param_groups)
        self.step = 0
        # Device-side counters, read on log steps: skipped steps, the current and the longest run
        # of non-finite steps since the last read.
        self._skipped = torch.zeros((), dtype=torch.long, device=self.device)
        self._in_a_row = torch.zeros((), dtype=torch.long, device=self.device)
        self._longest = torch.zeros((), dtype=torch.long, device=self.device)
        self._interval: tuple[float, int, int] | None = None  # (since, steps, samples) of the log interval

    @property
    def buffer(self) -> FakeSampleBuffer | None:
        return getattr(self.objective, "buffer", None)

    def _autocast(self) -> ContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, micro_batches: list[Batch], read_metrics: bool = True) -> dict[str, float] | None:
        """One optimiser step over ``micro_batches`` (gradient accumulation). With ``read_metrics``
        returns the step's metrics (a host synchronisation); without, returns None and never
        waits for the device."""
        if self._interval is None:
            self._interval = (time.perf_counter(), 0, 0)
        self.model.train()
        ema_fn = self.ema if self.ema is not None else self.model
        sums: dict[str, torch.Tensor | float] = {}
        calls = rows = samples = 0
        for i, batch in enumerate(micro_batches):
            batch = batch.to(self.device)
            last = i == len(micro_batches) - 1
            with self.grad_sync(last), self._autocast():
                out = self.objective(self.model, ema_fn, batch.latents, batch.cond,
                                     self.noise_generator, self.structure_generator, step=self.step)
                (out.loss / len(micro_batches)).backward()
            for key, value in out.parts.items():
                sums[key] = sums.get(key, 0.0) + value / len(micro_batches)
            calls, rows, samples = calls + out.forward_calls, rows + out.forward_rows, samples + batch.latents.shape[0]

        grad_norm = self._clip_gradients()
        finite = torch.isfinite(grad_norm) & torch.isfinite(sums["loss"])
        if self._fused:
            self.optimizer.found_inf = (~finite).to(torch.float32)  # fused AdamW skips the update where set
            self.optimizer.step()
            self.optimizer.found_inf = None
        elif bool(finite):  # another optimiser: a host read decides
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            sums["ema_decay"] = self.ema.current_decay()
            self.ema.update(self.model, apply=finite)
        self.optimizer.zero_grad(set_to_none=True)
        self._skipped = self._skipped + (~finite).long()
        self._in_a_row = torch.where(finite, 0, self._in_a_row + 1)
        self._longest = torch.maximum(self._longest, self._in_a_row)
        self.step += 1
        since, steps, interval_samples = self._interval
        self._interval = (since, steps + 1, interval_samples + samples)
        if not read_metrics:
            return None
        sums.update(grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"],
                    forward_calls=float(calls), forward_rows=float(rows))
        return self._read(sums)

    def _read(self, sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """The metrics as floats (one device-to-host copy), the interval's rate, the non-finite check."""
        names = [k for k, v in sums.items() if isinstance(v, torch.Tensor)]
        values = torch.stack([sums[k].detach().float().reshape(()).to(self.device) for k in names]
                             + [self._skipped.float(), self._in_a_row.float(), self._longest.float()]).tolist()
        metrics = {k: float(v) for k, v in sums.items() if not isinstance(v, torch.Tensor)}
        metrics.update(zip(names, values))
        skipped, in_a_row, longest = (int(v) for v in values[len(names):])
        self._longest = self._in_a_row.clone()
        since, steps, samples = self._interval
        now = time.perf_counter()
        elapsed = now - since
        self._interval = (now, 0, 0)
        metrics.update(skipped_steps=float(skipped), step_time=elapsed / max(steps, 1),
                       samples_per_s=samples / elapsed if elapsed > 0 else 0.0)
        if longest >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{longest} non-finite steps in a row by step {self.step}; "
                "lower optim.lr or raise optim.grad_clip, then resume from the last checkpoint"
            )
        return metrics

    @property
    def skipped_steps(self) -> int:
        return int(self._skipped)

    @property
    def nonfinite_in_a_row(self) -> int:
        return int(self._in_a_row)

    def _clip_gradients(self) -> torch.Tensor:
        """Global gradient norm (correct for sharded DTensor gradients), clipped to ``grad_clip``;
        a device tensor."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf"))
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2: the norm of the whole gradient
            norm = norm.full_tensor()
        return norm

    def extra_state(self) -> dict[str, Any]:
        """Everything beside model, EMA and optimiser that an exact resume needs."""
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "noise_generator": self.noise_generator.get_state(),
            "structure_generator": self.structure_generator.getstate(),
            "scheduler": self.scheduler.state_dict(),
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self._skipped.fill_(state["skipped_steps"])
        self._in_a_row.fill_(state["nonfinite_in_a_row"])
        self._longest.fill_(state["nonfinite_in_a_row"])
        self.noise_generator.set_state(state["noise_generator"])
        structure = state["structure_generator"]
        if isinstance(structure, torch.Tensor):  # checkpoints from before the host-side generator
            structure = random.Random(int.from_bytes(hashlib.sha256(structure.numpy().tobytes()).digest()[:8])).getstate()
        self.structure_generator.setstate(_as_random_state(structure))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.buffer is not None and state["buffer"] is not None:
            self.buffer.load_state_dict(state["buffer"])


def _as_random_state(state) -> tuple:
    """``random.Random.setstate`` wants tuples; a checkpoint may hand back lists."""
    version, internal, gauss = state
    return int(version), tuple(int(v) for v in internal), gauss
