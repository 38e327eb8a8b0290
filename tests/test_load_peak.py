"""The load path of issue 11 item 3: the model is built on ``meta``, sharded, and each rank fills
only its own shards from the safetensors files (bf16 frozen base under LoRA), so a rank's peak
while loading is its shards, not the whole model; the planner's load row predicts that peak."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from apex_ray.config import load_config
from apex_ray.engine.build import build_model, build_training
from apex_ray.engine.memory_plan import allocated_by, plan
from apex_ray.models import build_backbone
from apex_ray.models.base import full_state_dict
from apex_ray.models.lora import EMA_ADAPTER, TRAINED_ADAPTER, adapter_of

TOLERANCE = 0.30
"""Measured load peak within 30% of the planner's load row (as for the step, tests/test_plan.py)."""

CASES = {
    "sana-tiny": [],
    "qwen-image-tiny-lora-bf16": ["model.lora.enabled=true", "model.lora.rank=8", "distributed.mixed_precision=bf16"],
}


def preset_of(case: str) -> str:
    return "qwen-image-tiny" if case.startswith("qwen") else case


def config_for(case: str, pretrained: str | None, workers: int, strategy: str):
    return load_config(None, [f"model.backbone={preset_of(case)}",
                              f"model.pretrained={pretrained if pretrained else 'null'}",
                              f"distributed.strategy={strategy}", f"distributed.num_workers={workers}",
                              "train.global_batch=4", "model.max_text_length=12", *CASES[case]])


def save_teacher(case: str, folder: str) -> str:
    torch.manual_seed(123)
    build_backbone(preset_of(case)).save_pretrained(folder)
    return folder


def base_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base weights of a (peft-wrapped) state dict, under diffusers' names."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if adapter_of(k) is None}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", sorted(CASES))
def test_one_process_load_fills_every_weight_from_the_files(case, tmp_path):
    folder = save_teacher(case, str(tmp_path / "teacher"))
    expected = build_backbone(preset_of(case), folder).transformer.state_dict()
    training = build_training(config_for(case, folder, 1, "single"), "cpu", distributed=False)
    state = training.backbone.transformer.state_dict()
    loaded = base_weights(state)
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key].float(), value.float(), rtol=0, atol=0, msg=key)
    if "lora" in case:
        trained = {k: v for k, v in state.items() if adapter_of(k) == TRAINED_ADAPTER}
        assert trained and all(v.abs().sum() == 0 for k, v in trained.items() if ".lora_B." in k)
        assert all(v.abs().sum() > 0 for k, v in trained.items() if ".lora_A." in k)
        for key, value in trained.items():  # the EMA adapter starts equal to the trained one
            torch.testing.assert_close(state[key.replace(f".{TRAINED_ADAPTER}.", f".{EMA_ADAPTER}.")], value)
    else:
        ema = training.ema.module.transformer.state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(ema[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.usefixtures("one_thread")
def test_random_init_is_the_seeded_model_build_model_makes():
    config = config_for("sana-tiny", None, 1, "single")
    reference, _, _ = build_model(config, pretrained=False)
    training = build_training(config, "cpu", pretrained=False, distributed=False)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(training.backbone.state_dict()[key], value, rtol=0, atol=0, msg=key)


def _load_peak_worker(rank: int, port: int, folder: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for case in sorted(CASES):
            teacher = os.path.join(folder, case)
            config = config_for(case, teacher, 2, "fsdp")
            peak, _ = allocated_by(lambda: build_training(config, "cpu", rank))
            training = build_training(config, "cpu", rank)
            state = base_weights(full_state_dict(training.backbone.transformer))  # rank 0 gets it, others {}
            expected = build_backbone(preset_of(case), teacher).transformer.state_dict() if rank == 0 else {}
            mismatched = [k for k, v in expected.items()
                          if k not in state or not torch.equal(state[k].float(), v.to(state[k].dtype).float())]
            dtypes = {str(p.dtype) for p in training.backbone.parameters()}
            results.put((case, rank, peak, mismatched, sorted(dtypes)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_fsdp_load_peak_is_the_planned_shards_not_the_whole_model(tmp_path):
    for case in CASES:
        save_teacher(case, str(tmp_path / case))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(_load_peak_worker, args=(port, str(tmp_path), results), nprocs=2, join=True,
                       start_method="spawn")
    measured = [results.get(timeout=60) for _ in range(2 * len(CASES))]
    for case, rank, peak, mismatched, dtypes in measured:
        planned = plan(config_for(case, str(tmp_path / case), 2, "fsdp"))
        print(f"{case} rank {rank}: load peak {peak / 2**20:.2f} MiB, planned {planned.load / 2**20:.2f} MiB, "
              f"whole fp32 model {planned.whole_model_load / 2**20:.2f} MiB")
        assert not mismatched, f"{case} rank {rank}: weights differ from the files: {mismatched[:5]}"
        if "bf16" in case:
            assert "torch.bfloat16" in dtypes, f"{case}: the frozen base is not stored in bf16 ({dtypes})"
        assert abs(peak - planned.load) <= TOLERANCE * peak, (
            f"{case} rank {rank}: load peak {peak / 2**20:.2f} MiB vs planned {planned.load / 2**20:.2f} MiB")
        assert peak < 0.7 * planned.whole_model_load, (
            f"{case} rank {rank}: load peak {peak / 2**20:.2f} MiB is near the whole fp32 model "
            f"({planned.whole_model_load / 2**20:.2f} MiB): the model was held whole")
