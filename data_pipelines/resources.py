"""How many Ray tasks and actors the data jobs run at once, from the cluster's resources.

Imported by the read tasks (through :mod:`data_pipelines.readers`), so it imports nothing heavy.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from data_pipelines.config import ActorPoolConfig, PrepareConfig

IO_TASKS_PER_CPU = 1 / 8
"""Read and write tasks at once per cluster CPU. They ask for no CPU (so that they never wait
behind the actor pools) and each is a Ray worker process, so without a cap Ray starts one per
row group at once: 74 processes at 20,000 images on a 2-core machine, memory falling until the
job was stopped. An eighth of the CPUs keeps a big cluster's reads from S3 ahead of its
encoders while a small machine runs :data:`MIN_IO_TASKS`."""
MIN_IO_TASKS = 2
"""Two, so that one task's file open or listing never stalls the stream."""
TEXT_SHARE = 0.75
"""Share of the free CPUs (GPUs) the text-encoder pool gets when neither pool's size is set (the
codec pool gets the rest): the text encoder costs most per row (MiniLM is ~98% of a CPU job next
to decoding and the pixel codec; Gemma-2B or Qwen2.5-VL-7B per caption cost more than their VAEs
per image), and captions that repeat within a batch are encoded once."""
MIN_BATCHES_PER_ACTOR = 4
"""An actor costs a model load (seconds, and its memory), so a pool never has more actors than a
quarter of the job's batches: small jobs run one actor per pool."""


def io_tasks(cluster_cpus: float) -> int:
    """Read (or write) tasks a job runs at once on a cluster of ``cluster_cpus`` CPUs."""
    return max(MIN_IO_TASKS, math.floor(cluster_cpus * IO_TASKS_PER_CPU))


def pool_sizes(config: PrepareConfig, resources: Mapping[str, float], rows: int) -> dict[str, int]:
    """Actors of the ``codec`` and ``text`` pools: the configured ``concurrency``, else as many as
    the pool's share of the free CPUs and GPUs holds (``resources``: the cluster's, e.g.
    ``ray.cluster_resources()``), at least one and at most :data:`MIN_BATCHES_PER_ACTOR` batches
    per actor. "Free" is what the configured pools and a decode task (unless decoding runs in the
    codec actors) leave."""
    pools = {"codec": config.codec, "text": config.text}
    free = _free(config, resources)
    unset = {name: pool for name, pool in pools.items() if pool.concurrency is None}
    weights = {"codec": 1 - TEXT_SHARE, "text": TEXT_SHARE}
    sizes = {name: pool.concurrency for name, pool in pools.items() if pool.concurrency is not None}
    for name, pool in unset.items():
        fits = []
        for resource, need in _needs(pool).items():
            # Split each resource between the unset pools that ask for it (a GPU codec with a CPU
            # text encoder gets all the GPUs).
            users = [other for other, p in unset.items() if _needs(p).get(resource)]
            share = weights[name] / sum(weights[other] for other in users)
            fits.append(math.floor(share * free.get(resource, 0.0) / need + 1e-9))
        batches = math.ceil(rows / pool.batch_size)
        # An actor that asks for nothing is not limited by the cluster: one, not one per batch.
        sizes[name] = max(1, min(fits + [math.ceil(batches / MIN_BATCHES_PER_ACTOR)])) if fits else 1
    return sizes


def decode_fused(config: PrepareConfig) -> bool:
    """Whether Ray runs decoding inside the codec actors (same CPUs, codec on CPU), needing no
    CPUs of its own."""
    return config.codec.num_gpus == 0 and config.decode_cpus == config.codec.num_cpus


def _free(config: PrepareConfig, resources: Mapping[str, float]) -> dict[str, float]:
    free = {"CPU": float(resources.get("CPU", 0.0)), "GPU": float(resources.get("GPU", 0.0))}
    if not decode_fused(config):
        free["CPU"] -= config.decode_cpus
    for pool in (config.codec, config.text):
        if pool.concurrency is not None:
            for resource, need in _needs(pool).items():
                free[resource] -= pool.concurrency * need
    return {resource: max(0.0, amount) for resource, amount in free.items()}


def _needs(pool: ActorPoolConfig) -> dict[str, float]:
    """What one actor of ``pool`` asks Ray for (zero amounts left out)."""
    return {resource: need for resource, need in (("CPU", pool.num_cpus), ("GPU", pool.num_gpus)) if need > 0}
