"""Per-rank training-state memory under FSDP2 vs DDP (2 CPU ranks over gloo, no Ray).

    python bench/bench_fsdp_memory.py [--world 2] [--width 256] [--layers 8]

Each rank builds the SANA preset (``sana-tiny`` widened by ``--width``/``--layers`` so the
blocks dominate), wraps it the way the trainer does (``apex_ray.engine.parallel.parallelize``, FSDP2
per block or DDP), adds the EMA copy (sharded alike under FSDP), runs one AdamW step, and
counts the bytes this rank holds: parameters, gradients, optimizer moments, EMA. Activations
are left out (they depend on batch and checkpointing, not on the strategy). Prints FSDP / DDP.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result import report  # noqa: E402


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def rank_main(rank: int, world: int, port: int, strategy: str, width: int, layers: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from apex_ray.engine.parallel import apply_fsdp, parallelize, unwrap
    from apex_ray.method.conditioning import Conditioning
    from apex_ray.method.ema import EMA
    from apex_ray.models import build_backbone

    torch.manual_seed(0)
    heads = max(1, width // 32)
    model = build_backbone("sana-tiny", caption_channels=384, num_attention_heads=heads, attention_head_dim=32,
                           num_cross_attention_heads=heads, cross_attention_head_dim=32, num_layers=layers,
                           cross_attention_dim=heads * 32)
    ema = EMA(model, 0.99)
    wrapped = parallelize(model, model.blocks(), strategy, torch.device("cpu"))
    if strategy == "fsdp":
        apply_fsdp(ema.module, ema.module.blocks(), None)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-4)
    cond = Conditioning(torch.randn(2, 8, 384), torch.ones(2, 8, dtype=torch.long))
    wrapped(torch.randn(2, 3, 32, 32), torch.rand(2), cond).float().pow(2).mean().backward()
    optimizer.step()
    params = list(unwrap(wrapped).parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    held = {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
            "optimizer": local_bytes(state), "ema": local_bytes(ema.module.parameters())}
    if rank == 0:
        out.put((strategy, held, sum(p.numel() for p in unwrap(model).parameters())))
    dist.destroy_process_group()


def measure(strategy: str, world: int, width: int, layers: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(rank_main, args=(world, port, strategy, width, layers, queue), nprocs=world,
                       start_method="spawn", join=True)
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    results = {}
    for strategy in ("ddp", "fsdp"):
        _, held, n_params = measure(strategy, args.world, args.width, args.layers)
        results[strategy] = held
        mib = {k: v / 2**20 for k, v in held.items()}
        print(f"{strategy:4s}: rank 0 holds {sum(mib.values()):7.2f} MiB  ("
              + ", ".join(f"{k} {v:.2f}" for k, v in mib.items()) + f")  model {n_params / 1e6:.2f}M params")
    ratio = sum(results["fsdp"].values()) / sum(results["ddp"].values())
    print(f"FSDP / DDP per-rank training-state memory at {args.world} ranks: {ratio:.2f} "
          f"(ideal 1/{args.world} = {1 / args.world:.2f})")
    report("fsdp_memory_per_rank", ratio, f"FSDP2 / DDP bytes held per rank ({args.world} ranks)",
           mib={k: round(sum(v.values()) / 2**20, 2) for k, v in results.items()}, params=n_params)


if __name__ == "__main__":
    main()
