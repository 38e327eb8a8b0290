"""The frozen starting model: ``F_frozen(x_t, t, c)``, no grad, for ``shift_reference=frozen``
(delta_d of eq. 18 against the teacher), the ``diag/*`` branch-separation diagnostics and the
teacher of ``objective.kind=consistency``.

Two forms, one call signature (:data:`~apex_ray.method.conditioning.VelocityFn`):

- a full fine-tune keeps :class:`FrozenCopy`, a no-grad copy of the starting weights built on
  ``meta`` with the model and sharded like it (FSDP2: like the full EMA, one more model's worth of
  fp32 weights over the ranks; :func:`apex_ray.engine.memory_plan.plan` counts it);
- under LoRA the starting model is the frozen base itself (the adapter starts at zero), so
  :class:`AdapterOff` runs the model with every LoRA adapter disabled: no memory at all.

:func:`keeps_frozen_reference` says when a run keeps one.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from apex_ray.config import Config
from apex_ray.method.conditioning import Conditioning
from apex_ray.models.loading import local
from apex_ray.models.lora import _set_trainable, _tuner_layers


def keeps_frozen_reference(config: Config) -> bool:
    """Whether the run keeps the starting model: ``shift_reference=frozen`` needs it, and so does
    ``objective.kind=consistency`` (it is the distillation teacher); the diagnostics'
    ``diag/cos_delta_frozen`` and ``diag/plain_drift_rms`` use it when ``eval.diagnostics`` and
    ``eval.diagnostics_frozen`` are on (free under LoRA, one sharded fp32 model copy otherwise)."""
    if config.objective.kind == "consistency":
        return True
    if config.objective.kind != "apex":
        return False
    if config.objective.apex.shift_reference == "frozen":
        return True
    return config.eval.diagnostics and config.eval.diagnostics_frozen


class FrozenCopy(torch.nn.Module):
    """A no-grad copy of ``model`` in eval mode; fill it with :meth:`copy_from` once the model holds
    its starting weights (it is never updated after)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        self.requires_grad_(False)
        self.module.eval()

    def train(self, mode: bool = True) -> FrozenCopy:
        return super().train(False)  # always eval mode

    @torch.no_grad()
    def copy_from(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s parameters and buffers (local shards under FSDP2: both sharded alike)."""
        copy_weights(self.module, model)

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.module(x_t, t, cond)


class AdapterOff:
    """The LoRA model with every adapter disabled: the frozen base, i.e. the starting model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._layers = _tuner_layers(model.transformer)
        if not self._layers:
            raise ValueError("AdapterOff needs a LoRA model (apply_lora first)")

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        was_training = self.model.training
        active = [layer.active_adapters for layer in self._layers]
        for layer in self._layers:
            layer.enable_adapters(False)
        self.model.eval()
        try:
            yield
        finally:
            for layer, names in zip(self._layers, active):
                layer.enable_adapters(True)
                layer.set_adapter(names)
            _set_trainable(self._layers)  # peft's enable/set_adapter touch requires_grad: only "default" trains
            self.model.train(was_training)

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        with self.active():
            return self.model(x_t, t, cond)


@torch.no_grad()
def copy_weights(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """``source``'s parameters and buffers into ``target`` of the same structure (local shards
    under FSDP2: both sharded alike)."""
    params = dict(source.named_parameters())
    for name, param in target.named_parameters():
        local(param).copy_(local(params[name]))
    buffers = dict(source.named_buffers())
    for name, buffer in target.named_buffers():
        buffer.copy_(buffers[name])
