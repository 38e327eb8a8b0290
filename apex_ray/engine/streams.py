"""In-memory training data: latents with pre-computed text embeddings, served as shuffled batches.

Training never runs the text encoder per step: captions are encoded once, up front (here for
small in-process sets; at scale by ``data_pipelines``).
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from apex_ray.common.errors import InputError
from apex_ray.engine.prepared import CorruptShardError
from apex_ray.common.images import images_to_tensor
from apex_ray.common.seeds import derive_seed
from apex_ray.method.batch import Batch
from apex_ray.method.conditioning import Conditioning
from apex_ray.models.text_encoders import encode_unique
from apex_ray.shapeeval import generate_pairs


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
            raise InputError(f"batch size {batch_size} exceeds this worker's {len(dataset)} samples; use more data "
                             "(data.num_samples) or a smaller train.micro_batch / train.global_batch")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch = self.position = 0

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        if self.position + self.batch_size > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(len(self.dataset), device="cpu",
                               generator=torch.Generator().manual_seed(derive_seed(self.seed, "epoch", self.epoch)))
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
    return ArrayDataset(images, encode_unique(encode, captions), captions)


class ShardStream:
    """Endless batches from this worker's shard of a streamed dataset (a Ray Data ``DataIterator``).

    Each pass over the shard is an epoch, locally shuffled with a seed that depends on the epoch;
    ``(epoch, position)`` is recorded in checkpoints and a resumed stream skips the batches
    already taken in that epoch. (Ray Data's split across workers is dynamic, so unlike
    :class:`BatchStream` a resume is to the same place, not to bit-identical batches.)
    """

    def __init__(self, shard, batch_size: int, seed: int, to_batch: Callable[[dict], Batch],
                 shuffle_buffer: int = 1024) -> None:
        self.shard, self.batch_size, self.seed = shard, batch_size, seed
        self.to_batch, self.shuffle_buffer = to_batch, shuffle_buffer
        self.epoch = self.position = 0
        self._batches: Iterator | None = None

    def __iter__(self) -> "ShardStream":
        return self

    def _open_epoch(self) -> Iterator:
        batches = iter(self.shard.iter_torch_batches(
            batch_size=self.batch_size, drop_last=True, local_shuffle_buffer_size=self.shuffle_buffer,
            local_shuffle_seed=derive_seed(self.seed, "epoch", self.epoch),
        ))
        for _ in range(self.position):  # resume inside an epoch
            next(batches)
        return batches

    def __next__(self) -> Batch:
        for _ in range(2):
            if self._batches is None:
                self._batches = self._open_epoch()
            try:
                batch = next(self._batches)
            except StopIteration:
                self._batches, self.epoch, self.position = None, self.epoch + 1, 0
                continue
            except Exception as err:
                if "checksum" in str(err).lower():  # pyarrow's page CRC check, raised in a Ray Data read task
                    detail = next((line for line in str(err).splitlines() if "checksum" in line.lower()), "")
                    raise CorruptShardError(f"a shard of the prepared set is damaged ({detail.strip()}); "
                                            "prepare the set again") from err
                raise
            self.position += 1
            return self.to_batch(batch)
        raise InputError(f"this worker's data shard yields no batch of {self.batch_size} rows; "
                           "use more data or a smaller train.micro_batch")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._batches = state["epoch"], state["position"], None
