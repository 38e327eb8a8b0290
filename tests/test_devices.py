"""Device placement that a CPU box can check for a GPU cluster (issue: the GPU path).

1. Every random draw that takes a generator names the device it runs on (explicitly, or through
   an input tensor), so a CUDA generator never drives a CPU op ("Expected a 'cpu' device type
   for generator") and a CPU generator never a CUDA one. Checked by recording every torch call
   made by one APEX step with a full fake-sample buffer, the sampler, and the evaluation sampler.
2. Every collective goes through apex_ray.engine.collectives, which puts tensors on the process
   group backend's device (NCCL: CUDA; gloo: CPU); tested on a real two-process gloo group and,
   for the NCCL choice, with the backend query answered as NCCL.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode

from apex_ray.engine import collectives
from apex_ray.engine.evaluation import generate
from apex_ray.method.buffer import FakeSampleBuffer
from apex_ray.method.conditioning import Conditioning
from apex_ray.method.objective import APEXConfig, APEXObjective, FlowMatchingObjective
from apex_ray.method.sampler import SamplerConfig, sample


class GeneratorDeviceAudit(TorchFunctionMode):
    """Records each call that passes a ``generator`` without saying where the draw happens."""

    def __init__(self) -> None:
        super().__init__()
        self.unplaced: list[str] = []
        self.placed = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            device = kwargs.get("device")
            if device is not None:
                ok = torch.device(device).type == generator.device.type
            else:
                ok = bool(tensors) and all(t.device.type == generator.device.type for t in tensors)
            if ok:
                self.placed += 1
            else:
                self.unplaced.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


class Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 3, 1)
        self.text = torch.nn.Linear(4, 3)

    def forward(self, x_t, t, cond):
        feature = self.text((cond.embeds * cond.mask[..., None]).sum(1))[:, :, None, None]
        return self.proj(x_t) + feature + t.reshape(-1, 1, 1, 1)


def cond(batch: int) -> Conditioning:
    return Conditioning(torch.randn(batch, 5, 4), torch.ones(batch, 5, dtype=torch.long))


def test_every_seeded_draw_names_its_device():
    torch.manual_seed(0)
    net, buffer = Linear(), FakeSampleBuffer(32)
    objective = APEXObjective(APEXConfig(anchor_frac=0.5, adv_frac=0.5), buffer)
    x = torch.randn(8, 3, 8, 8)
    objective(net, net, x, cond(8), torch.Generator().manual_seed(0))  # fills the buffer
    assert len(buffer) > 0
    with GeneratorDeviceAudit() as audit:
        out = objective(net, net, x, cond(8), torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
        assert out.parts["n_adv"] > 0  # the buffer draw ran
        buffer.sample(3, torch.Generator().manual_seed(3))
        FlowMatchingObjective()(net, None, x, cond(8), torch.Generator().manual_seed(4))
        sample(net, cond(2), (2, 3, 8, 8), SamplerConfig.for_nfe(3, stochastic_ratio=0.5),
               torch.Generator().manual_seed(5))
        generate(net, lambda captions: cond(len(captions)), ["a", "b"], [0, 1], (3, 8, 8),
                 SamplerConfig.for_nfe(1), decode=lambda z: z, device="cpu")
    assert audit.unplaced == [], f"draws that take the default device instead of their generator's: {audit.unplaced}"
    assert audit.placed >= 8


def test_the_audit_sees_an_unplaced_draw():
    with GeneratorDeviceAudit() as audit:
        torch.randint(5, (3,), generator=torch.Generator())
        torch.randint(5, (3,), generator=torch.Generator(), device="cpu")
    assert audit.unplaced == ["randint"] and audit.placed == 1


def test_backend_device_follows_the_process_group(monkeypatch):
    assert collectives.backend_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.backend_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collectives.backend_device() == torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_collectives(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # float64 and integer inputs, a 0-d tensor and a float: all reduced as float32 on gloo's CPU
        mean = collectives.all_reduce_mean({"loss": torch.tensor(float(rank + 1), dtype=torch.float64),
                                            "count": torch.tensor(rank * 4), "lr": 0.5})
        gathered = collectives.gather_to_rank0((rank, torch.full((2,), float(rank))))
        results.put((rank, mean, None if gathered is None else [(r, t.tolist()) for r, t in gathered]))
    finally:
        dist.destroy_process_group()


def test_collectives_on_a_real_two_rank_group():
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_two_rank_collectives, args=(rank, port, results)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    got = dict((rank, (mean, gathered)) for rank, mean, gathered in (results.get(timeout=120) for _ in procs))
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    for rank in (0, 1):
        assert got[rank][0] == pytest.approx({"loss": 1.5, "count": 2.0, "lr": 0.5})
    assert got[0][1] == [(0, [0.0, 0.0]), (1, [1.0, 1.0])] and got[1][1] is None
