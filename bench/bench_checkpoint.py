"""What a checkpoint costs the training thread, and what it weighs.

    python bench/bench_checkpoint.py [--repeats 5] [--buffer 1024] [--text-dtype float16]

Tiny SANA with APEX (model, EMA, AdamW state) and a full fake-sample buffer (``--buffer``
entries, pushed as the objective pushes them: the anchors of 16-sample batches, captions of
3-32 tokens, stored in the prepared set's dtypes). For each of ``--repeats`` checkpoints:

- before: ``save_checkpoint`` (synchronous ``dcp.save`` + extra state), the whole write stalls the step;
- after: ``AsyncCheckpointer.save`` (``dcp.async_save``): the step waits only for the state to be
  copied; the shards are written on a background thread (its total time is printed too).

Prints the median stall of each, their ratio (after / before), the bytes per rank (DCP shards and
extra state) and the extra state against the bytes its buffer entries need.
"""
from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result import report  # noqa: E402


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--buffer", type=int, default=1024, help="fake-sample buffer entries")
    parser.add_argument("--text-dtype", default="float16", help="the prepared set's text_dtype")
    args = parser.parse_args()
    from apex_ray.config import load_config
    from apex_ray.engine.build import build_training
    from apex_ray.engine.checkpointing import AsyncCheckpointer, save_checkpoint
    from apex_ray.method.batch import Batch
    from apex_ray.method.conditioning import Conditioning

    torch.set_num_threads(1)
    config = load_config(None, ["model.pretrained=null", "distributed.strategy=single", "distributed.num_workers=1",
                                f"objective.buffer_size={args.buffer}"])
    training = build_training(config, "cpu", text_embed_dim=384, distributed=False)
    runner = training.runner
    runner.buffer.text_dtype = getattr(torch, args.text_dtype)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)

    def batch(n: int = 16) -> Batch:
        lengths = torch.tensor([rng.randint(3, 32) for _ in range(n)])
        mask = (torch.arange(32)[None, :] < lengths[:, None]).long()
        return Batch(torch.randn(n, 3, 32, 32, generator=gen), Conditioning(torch.randn(n, 32, 384, generator=gen), mask))

    runner.train_step([batch()])  # AdamW state exists
    need = 0
    while len(runner.buffer) < args.buffer:  # the anchors of whole batches, as the objective pushes them
        full = batch()
        runner.buffer.push(full.latents[:4], full.cond.index(slice(0, 4)))
    for length in runner.buffer.state_dict()["lengths"].tolist():
        need += 3 * 32 * 32 * 4 + length * 384 * torch.tensor([], dtype=runner.buffer.text_dtype).element_size()

    extra = {"runner": runner.extra_state()}
    blob = io.BytesIO()
    torch.save(extra, blob)
    stalls = {"sync": [], "async": []}
    written_s = []
    checkpointer = AsyncCheckpointer()
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.repeats):
            started = time.perf_counter()  # both include taking the extra state (the buffer's copy)
            save_checkpoint(Path(folder) / f"sync_{i}", training.state, {"runner": runner.extra_state()})
            stalls["sync"].append(time.perf_counter() - started)
            started = time.perf_counter()
            future = checkpointer.save(Path(folder) / f"async_{i}", training.state, {"runner": runner.extra_state()})
            stalls["async"].append(time.perf_counter() - started)
            future.result()
            written_s.append(time.perf_counter() - started)
        shard_bytes = _folder_bytes(Path(folder) / "async_0")
    sync, async_ = statistics.median(stalls["sync"]), statistics.median(stalls["async"])
    extra_ratio = blob.tell() / need
    print(f"tiny SANA + EMA + AdamW, {len(runner.buffer)} buffer entries (samples float32, text {args.text_dtype}), "
          f"median of {args.repeats}")
    print(f"  stall per checkpoint: dcp.save {sync * 1000:.1f} ms, dcp.async_save {async_ * 1000:.1f} ms "
          f"(written after {statistics.median(written_s) * 1000:.1f} ms); ratio {async_ / sync:.2f}")
    print(f"  checkpoint bytes per rank: {shard_bytes / 2**20:.2f} MiB, of which extra state "
          f"{blob.tell() / 2**20:.2f} MiB for buffer entries that need {need / 2**20:.2f} MiB ({extra_ratio:.3f}x)")
    report("checkpoint_stall", async_ / sync, "stall per checkpoint, dcp.async_save / dcp.save (1 rank)",
           sync_ms=round(sync * 1000, 1), async_ms=round(async_ * 1000, 1),
           written_ms=round(statistics.median(written_s) * 1000, 1), bytes_per_rank=shard_bytes,
           extra_bytes=blob.tell(), extra_need_bytes=need, extra_ratio=round(extra_ratio, 3))


if __name__ == "__main__":
    main()
