"""In-memory training data: latents with pre-computed text embeddings, served as shuffled batches.

Training never runs the text encoder per step: captions are encoded once, up front (here for
small in-process sets; at scale by ``data_pipelines``).
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from apex_ray.conditioning import Conditioning
from apex_ray.shapeeval import generate_pairs, images_to_tensor
from apex_ray.training import Batch


def encode_captions(encode: Callable[[list[str]], Conditioning], captions: list[str],
                    batch_size: int = 256) -> Conditioning:
    """Encode ``captions`` in chunks, each distinct caption once."""
    unique = sorted(set(captions))
    parts = [encode(unique[i:i + batch_size]) for i in range(0, len(unique), batch_size)]
    table = Conditioning.cat(parts)
    position = {caption: i for i, caption in enumerate(unique)}
    return table.index(torch.tensor([position[c] for c in captions]))


class ArrayDataset:
    """Latents ``[N, C, H, W]`` with their conditioning, and the captions they came from."""

    def __init__(self, latents: torch.Tensor, cond: Conditioning, captions: list[str]) -> None:
        if not (latents.shape[0] == cond.batch_size == len(captions)):
            raise ValueError(f"{latents.shape[0]} latents, {cond.batch_size} conditionings, {len(captions)} captions")
        self.latents, self.cond, self.captions = latents, cond, captions

    def __len__(self) -> int:
        return self.latents.shape[0]

    def shard(self, rank: int, world_size: int) -> "ArrayDataset":
        """Rows ``rank, rank + world_size, ...``: this worker's disjoint share."""
        idx = torch.arange(rank, len(self), world_size)
        return ArrayDataset(self.latents[idx], self.cond.index(idx), [self.captions[i] for i in idx.tolist()])


class BatchStream:
    """Endless shuffled batches of an :class:`ArrayDataset` with a resumable position.

    Epoch ``e`` uses the permutation seeded by ``(seed, e)``, so ``(epoch, position)`` is the
    whole state: a resumed stream yields exactly the batches the interrupted one would have.
    The last partial batch of an epoch is dropped.
    """

    def __init__(self, dataset: ArrayDataset, batch_size: int, seed: int) -> None:
        if batch_size > len(dataset):
            raise ValueError(f"batch size {batch_size} exceeds the dataset size {len(dataset)}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch = self.position = 0

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        if self.position + self.batch_size > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        idx = order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return Batch(self.dataset.latents[idx], self.dataset.cond.index(idx))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def shapeeval_dataset(encode: Callable[[list[str]], Conditioning], num_samples: int, seed: int = 0,
                      canvas: int = 32) -> ArrayDataset:
    """``num_samples`` ShapeEval pairs as pixels in [-1, 1] (the tiny preset's identity codec)."""
    pairs = list(generate_pairs(num_samples, seed=seed, canvas=canvas))
    images = images_to_tensor(np.stack([p.image for p in pairs]))
    captions = [p.caption for p in pairs]
    return ArrayDataset(images, encode_captions(encode, captions), captions)
