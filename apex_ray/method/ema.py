"""EMA of the network weights with warm-up: the paper's theta^- (Algorithm 1, line 24).

Built on ``torch.optim.swa_utils.AveragedModel``: the EMA is a full module (a deep copy of
the model, so under FSDP2 it is sharded exactly like the model) that can be called for the
path target's ``F_ema`` forwards.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


def warmup_decay(target: float, num_updates: int, warmup: float) -> float:
    """Decay for the ``num_updates``-th update: ``min(target, (1 + n) / (warmup + n))``.

    Starts near 0 so the EMA first tracks the model closely, then rises to ``target``
    (the schedule of diffusers' and timm's EMA). ``warmup = 0`` disables the warm-up.
    """
    if warmup <= 0:
        return target
    return min(target, (1.0 + num_updates) / (warmup + num_updates))


class EMA(AveragedModel):
    """``EMA(model, decay=0.99, warmup=10)``; call ``update(model)`` after each optimiser step."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.99, warmup: float = 10.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        # Buffers (e.g. rotary tables) are copied, not averaged: they are not trained.
        super().__init__(model, multi_avg_fn=self._lerp, use_buffers=False)
        self.requires_grad_(False)
        self.module.eval()

    def current_decay(self) -> float:
        """The decay the next update will use."""
        return warmup_decay(self.decay, int(self.n_averaged), self.warmup)

    @torch.no_grad()
    def _lerp(self, ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged) -> None:
        decay = warmup_decay(self.decay, int(num_averaged), self.warmup)
        # ema <- decay * ema + (1 - decay) * param, in the EMA's own (fp32) precision.
        torch._foreach_lerp_(ema_params, [p.to(e.dtype) for e, p in zip(ema_params, params)], 1.0 - decay)

    def update(self, model: torch.nn.Module) -> None:
        self.update_parameters(model)
