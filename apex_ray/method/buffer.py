"""FIFO buffer of the model's recent one-step generations: the "fake" samples of L_adv (eq. 15)."""
from __future__ import annotations

from typing import Any

import torch

from apex_ray.method.conditioning import Conditioning


class FakeSampleBuffer:
    """Holds up to ``capacity`` (sample, conditioning) pairs, oldest overwritten first.

    A ring of preallocated tensors on the training device (allocated at the first push, in
    ``sample_dtype`` / ``text_dtype``: the prepared set's storage dtypes), so that pushing and
    drawing are a few device ops with no host synchronisation and no per-sample Python loop.
    Token embeddings are kept padded to the longest length seen (mask 0 beyond each caption);
    a checkpoint stores only each entry's own tokens (:meth:`state_dict`).

    A generation with a non-finite value (a step that diverged) takes its slot but is marked
    invalid on the device and never drawn, so one bad step cannot poison every later L_adv.
    """

    def __init__(self, capacity: int, *, device: torch.device | str | None = None,
                 sample_dtype: torch.dtype = torch.float32, text_dtype: torch.dtype = torch.float32) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.device = None if device is None else torch.device(device)
        self.sample_dtype, self.text_dtype = sample_dtype, text_dtype
        self._count = 0  # entries held (host int: known without looking at the device)
        self._next = 0  # slot the next entry goes to
        self._samples: torch.Tensor | None = None  # [capacity, C, H, W]
        self._embeds: torch.Tensor | None = None  # [capacity, L, D]
        self._mask: torch.Tensor | None = None  # [capacity, L] (bool)
        self._pooled: torch.Tensor | None = None  # [capacity, P] or None
        self._valid: torch.Tensor | None = None  # [capacity] (bool): slot holds a finite entry

    def __len__(self) -> int:
        return self._count

    def _allocate(self, samples: torch.Tensor, cond: Conditioning) -> None:
        device = self.device or samples.device
        n, length, dim = self.capacity, cond.embeds.shape[1], cond.embeds.shape[2]
        self._samples = torch.zeros((n, *samples.shape[1:]), dtype=self.sample_dtype, device=device)
        self._embeds = torch.zeros((n, length, dim), dtype=self.text_dtype, device=device)
        self._mask = torch.zeros((n, length), dtype=torch.bool, device=device)
        self._valid = torch.zeros(n, dtype=torch.bool, device=device)
        self._pooled = (None if cond.pooled is None
                        else torch.zeros((n, cond.pooled.shape[1]), dtype=self.text_dtype, device=device))

    def _grow_tokens(self, length: int) -> None:
        """Longer captions than any before: pad the held entries (rare; one reallocation)."""
        pad = length - self._embeds.shape[1]
        self._embeds = torch.nn.functional.pad(self._embeds, (0, 0, 0, pad))
        self._mask = torch.nn.functional.pad(self._mask, (0, pad))

    def push(self, samples: torch.Tensor, cond: Conditioning) -> None:
        """Append a batch of generations ``[B, C, H, W]`` with their (unshifted) conditioning."""
        batch = samples.shape[0]
        if batch != cond.batch_size:
            raise ValueError(f"{batch} samples but a conditioning of batch {cond.batch_size}")
        if batch == 0:
            return
        if self._samples is None:
            self._allocate(samples, cond)
        elif samples.shape[1:] != self._samples.shape[1:]:
            raise ValueError(f"samples of shape {tuple(samples.shape[1:])} pushed into a buffer of "
                             f"{tuple(self._samples.shape[1:])}")
        elif (cond.pooled is None) != (self._pooled is None):
            raise ValueError("a conditioning with and one without pooled embeddings pushed into one buffer")
        if cond.embeds.shape[1] > self._embeds.shape[1]:
            self._grow_tokens(cond.embeds.shape[1])
        if batch > self.capacity:  # only the newest ``capacity`` survive a FIFO
            samples, cond = samples[-self.capacity:], cond.index(slice(batch - self.capacity, batch))
            batch = self.capacity
        device = self._samples.device
        slots = (torch.arange(batch, device=device) + self._next) % self.capacity
        length = cond.embeds.shape[1]
        self._samples.index_copy_(0, slots, samples.detach().to(device, self.sample_dtype))
        embeds = torch.zeros((batch, *self._embeds.shape[1:]), dtype=self.text_dtype, device=device)
        mask = torch.zeros((batch, self._mask.shape[1]), dtype=torch.bool, device=device)
        mask[:, :length] = cond.mask.detach().to(device) != 0
        # Masked tokens are stored as zeros, as a checkpoint (own tokens only) restores them.
        embeds[:, :length] = cond.embeds.detach().to(device) * mask[:, :length, None]
        self._embeds.index_copy_(0, slots, embeds)
        self._mask.index_copy_(0, slots, mask)
        if self._pooled is not None:
            self._pooled.index_copy_(0, slots, cond.pooled.detach().to(device, self.text_dtype))
        finite = torch.isfinite(samples.detach().flatten(1)).all(1) & torch.isfinite(cond.embeds.detach().flatten(1)).all(1)
        self._valid.index_copy_(0, slots, finite.to(device))
        self._next = (self._next + batch) % self.capacity
        self._count = min(self.capacity, self._count + batch)

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, Conditioning]:
        """Draw ``n`` entries uniformly with replacement; returns samples and their conditioning
        (float32 for the caller to cast, mask as int64)."""
        if self._count == 0:
            raise RuntimeError("cannot sample from an empty fake-sample buffer")
        # Held entries are slots 0 .. count-1 (the ring fills from slot 0); invalid ones get weight 0
        # (if none is valid, all held ones weigh the same: the step then fails its finite check).
        # Indices are drawn on the generator's own device: a CUDA generator cannot drive a CPU op.
        on = generator.device if generator is not None else self._samples.device
        held = self._valid[:self._count].to(on, torch.float32) + 1e-30
        idx = torch.multinomial(held, n, replacement=True, generator=generator).to(self._samples.device)
        device = device if device is not None else self._samples.device
        cond = Conditioning(
            self._embeds.index_select(0, idx).to(device, torch.float32),
            self._mask.index_select(0, idx).to(device, torch.long),
            None if self._pooled is None else self._pooled.index_select(0, idx).to(device, torch.float32),
        )
        return self._samples.index_select(0, idx).to(device, torch.float32), cond

    def state_dict(self) -> dict[str, Any]:
        """The held slots in slot order with the write position (so a resume draws exactly what
        an uninterrupted run would), each caption's tokens only: ``tokens`` concatenates every
        entry's valid embeddings, ``lengths`` says where each ends. Fresh CPU tensors in the
        storage dtypes, not views of the ring: a checkpoint holds just the bytes the entries need."""
        state: dict[str, Any] = {"capacity": self.capacity, "count": self._count, "next": self._next}
        if self._count == 0:
            return state
        held = slice(0, self._count)
        mask = self._mask[held]
        state.update(
            samples=self._samples[held].clone().cpu(),
            tokens=self._embeds[held][mask].cpu(),  # [sum of lengths, D]
            lengths=mask.sum(dim=1).cpu(),
            valid=self._valid[held].clone().cpu(),
            token_capacity=self._embeds.shape[1],
        )
        if self._pooled is not None:
            state["pooled"] = self._pooled[held].clone().cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = state["capacity"]
        self._count = self._next = 0
        self._samples = self._embeds = self._mask = self._pooled = self._valid = None
        if "entries" in state:  # checkpoints written before the ring: a list of (sample, tokens, pooled)
            for sample, tokens, pooled in state["entries"]:
                self.push(sample[None], Conditioning(tokens[None], torch.ones(1, tokens.shape[0], dtype=torch.long),
                                                     None if pooled is None else pooled[None]))
            return
        if not state.get("count"):
            return
        lengths = state["lengths"].long()
        width = max(int(state["token_capacity"]), int(lengths.max()))
        mask = torch.arange(width)[None, :] < lengths[:, None]
        embeds = torch.zeros((lengths.shape[0], width, state["tokens"].shape[1]), dtype=state["tokens"].dtype)
        embeds[mask] = state["tokens"]
        self.push(state["samples"], Conditioning(embeds, mask.long(), state.get("pooled")))  # into slots 0..count-1
        self._valid[:self._count] = state["valid"].to(self._valid.device)
        self._next = int(state["next"])
