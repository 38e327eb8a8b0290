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
    """``EMA(model, decay=0.99, warmup=10)``; call ``update(model)`` after each optimiser step.

    The update count lives on the host as well as in ``n_averaged`` (kept for checkpoints), so an
    update never reads a device value: ``AveragedModel.update_parameters`` tests
    ``n_averaged == 0`` on the device, one host synchronisation per step.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.99, warmup: float = 10.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        # Buffers (e.g. rotary tables) are copied, not averaged: they are not trained.
        super().__init__(model, use_buffers=False)
        self.requires_grad_(False)
        self.module.eval()
        self._updates: int | None = 0  # host copy of n_averaged; None after a load (read it once)
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_updates", None))

    @property
    def num_updates(self) -> int:
        if self._updates is None:
            self._updates = int(self.n_averaged)
        return self._updates

    def current_decay(self) -> float:
        """The decay the next update will use (0 for the first: a copy)."""
        return 0.0 if self.num_updates == 0 else warmup_decay(self.decay, self.num_updates, self.warmup)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, apply: torch.Tensor | None = None) -> None:
        """``ema <- d ema + (1 - d) param``. ``apply`` (a 0-d bool tensor on the device) gates the
        move without a host read: where it is false the EMA stays (a skipped optimiser step)."""
        weight = 1.0 - self.current_decay()
        ema_params = [p.detach() for p in self.module.parameters()]
        params = [p.detach().to(e.dtype) for e, p in zip(ema_params, model.parameters())]
        if apply is None:
            torch._foreach_lerp_(ema_params, params, weight)
        else:
            torch._foreach_lerp_(ema_params, params, apply.to(ema_params[0].dtype) * weight)
        self.n_averaged += 1
        self._updates = self.num_updates + 1
