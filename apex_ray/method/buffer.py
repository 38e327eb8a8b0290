"""FIFO buffer of the model's recent one-step generations: the "fake" samples of L_adv (eq. 15)."""
from __future__ import annotations

from collections import deque
from typing import Any

import torch

from apex_ray.method.conditioning import Conditioning


class FakeSampleBuffer:
    """Holds up to ``capacity`` (sample, conditioning) pairs, oldest dropped first.

    Samples are stored detached on the CPU, one entry per sample, with the text tokens trimmed
    to the mask so that conditionings of different lengths can share the buffer.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: deque[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, samples: torch.Tensor, cond: Conditioning) -> None:
        """Append a batch of generations ``[B, C, H, W]`` with their (unshifted) conditioning."""
        if samples.shape[0] != cond.batch_size:
            raise ValueError(f"{samples.shape[0]} samples but a conditioning of batch {cond.batch_size}")
        samples = samples.detach().float().cpu()
        embeds, mask = cond.embeds.detach().float().cpu(), cond.mask.detach().cpu()
        pooled = None if cond.pooled is None else cond.pooled.detach().float().cpu()
        for i in range(samples.shape[0]):
            length = int(mask[i].nonzero().max()) + 1 if mask[i].any() else 1
            self._entries.append((samples[i], embeds[i, :length], None if pooled is None else pooled[i]))

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, Conditioning]:
        """Draw ``n`` entries uniformly with replacement; returns samples and a padded conditioning."""
        if not self._entries:
            raise RuntimeError("cannot sample from an empty fake-sample buffer")
        # Indices are drawn on the generator's own device: a CUDA generator cannot drive a CPU op.
        on = generator.device if generator is not None else "cpu"
        idx = torch.randint(len(self._entries), (n,), generator=generator, device=on).tolist()
        picked = [self._entries[i] for i in idx]
        conds = [
            Conditioning(e[None], torch.ones(1, e.shape[0], dtype=torch.long), None if p is None else p[None])
            for _, e, p in picked
        ]
        samples = torch.stack([s for s, _, _ in picked])
        return samples.to(device), Conditioning.cat(conds).to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "entries": list(self._entries)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = state["capacity"]
        self._entries = deque(state["entries"], maxlen=self.capacity)
