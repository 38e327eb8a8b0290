"""LoRA on SANA and Qwen-Image: adapter-only training under FSDP2, the EMA adapter, checkpoints that
hold adapters only, diffusers-format adapter files, and the merged export."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, SanaPipeline
from torch.distributed.tensor import DTensor

from apex_ray.config import load_config
from apex_ray.engine.checkpointing import load_checkpoint, save_checkpoint
from apex_ray.engine.build import build_training
from apex_ray.method.batch import Batch
from apex_ray.method.conditioning import Conditioning
from apex_ray.models import build_backbone, load_backbone
from apex_ray.models.base import full_state_dict
from apex_ray.models.lora import (
    EMA_ADAPTER,
    TRAINED_ADAPTER,
    AdapterEMA,
    LoRAConfig,
    adapter_of,
    apply_lora,
    load_adapter_into,
    merge_adapter,
    save_adapter,
    save_merged,
)

TINY = ["sana-tiny", "qwen-image-tiny"]
PIPELINES = {"sana-tiny": SanaPipeline, "qwen-image-tiny": QwenImagePipeline}
LORA = LoRAConfig(rank=4, alpha=8.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def lora_model(preset: str, adapter_seed: int = 1):
    """The same base weights every time (seed 0); the adapter initialisation follows ``adapter_seed``."""
    torch.manual_seed(0)
    model = build_backbone(preset)
    torch.manual_seed(adapter_seed)
    apply_lora(model, LORA)
    return model


def randomize_adapter(model, adapter: str, seed: int) -> None:
    """peft starts lora_B at zero (the adapter is a no-op); give every adapter tensor random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if adapter_of(name) == adapter:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def inputs(seed: int = 0, batch: int = 2, size: int = 32):
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.arange(6)[None] < torch.tensor([6, 3, 4, 5][:batch])[:, None]).long()
    cond = Conditioning(torch.randn(batch, 6, 384, generator=generator), mask)
    return torch.randn(batch, 3, size, size, generator=generator), torch.rand(batch, generator=generator), cond


# --- single process ---------------------------------------------------------------------------


@pytest.mark.parametrize("preset", TINY)
def test_apply_lora_freezes_the_base_and_reports_the_matched_patterns(preset):
    model = lora_model(preset)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(adapter_of(n) == TRAINED_ADAPTER for n in trainable)
    ema = AdapterEMA(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable  # "ema" stays frozen
    x, t, cond = inputs()
    randomize_adapter(model, TRAINED_ADAPTER, seed=1)
    ema(x, t, cond)  # switching to the EMA adapter and back keeps the flags
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    with pytest.raises(ValueError, match="to_q"):
        apply_lora(build_backbone(preset), LoRAConfig(target_modules=["no_such_layer"]))


def test_summary_lists_matched_and_absent_patterns():
    torch.manual_seed(0)
    summary = apply_lora(build_backbone("sana-tiny"), LoRAConfig(rank=4))
    assert "to_q" in summary.matched and "img_mlp.net.2" in summary.skipped  # Qwen-Image's MLP names
    assert summary.trainable_params > 0 and "LoRA rank 4" in str(summary)


@pytest.mark.parametrize("preset", TINY)
def test_ema_adapter_lerps_toward_the_trained_adapter(preset):
    model = lora_model(preset)
    ema = AdapterEMA(model, decay=0.9, warmup=10.0)
    params = dict(model.named_parameters())
    ema_names = [n for n in params if adapter_of(n) == EMA_ADAPTER]
    twin = {n: n.replace(".ema.", ".default.") for n in ema_names}
    assert all(torch.equal(params[n], params[twin[n]]) for n in ema_names)  # starts as a copy

    randomize_adapter(model, TRAINED_ADAPTER, seed=1)
    assert ema.current_decay() == 0.0
    ema.update(model)  # first update copies, as AveragedModel does
    assert all(torch.equal(params[n], params[twin[n]]) for n in ema_names)

    before = {n: params[n].detach().clone() for n in ema_names}
    randomize_adapter(model, TRAINED_ADAPTER, seed=2)
    decay = ema.current_decay()
    assert decay == pytest.approx(min(0.9, 2 / 11))  # warmup_decay(0.9, n=1, warmup=10)
    ema.update(model)
    for n in ema_names:
        expected = decay * before[n] + (1 - decay) * params[twin[n]]
        torch.testing.assert_close(params[n], expected, rtol=0, atol=1e-7)

    # The EMA forward uses the EMA adapter; the model itself still uses the trained one.
    x, t, cond = inputs()
    with torch.no_grad():
        trained_out = model(x, t, cond)
        ema_out = ema(x, t, cond)
        merge_target = lora_model(preset)
        ema_weights = {k.replace(".ema.", ".default."): v for k, v in ema.state_dict()["weights"].items()}
        merge_target.load_state_dict(ema_weights, strict=False)
        assert (ema_out - merge_target(x, t, cond)).abs().max() < 1e-6
        assert (ema_out - trained_out).abs().max() > 1e-3
        assert torch.equal(model(x, t, cond), trained_out)
    assert model.training  # the EMA forward ran in eval mode and restored train mode


@pytest.mark.parametrize("preset", TINY)
def test_saved_adapters_load_into_a_fresh_model_and_a_diffusers_pipeline(preset, tmp_path):
    model = lora_model(preset)
    ema = AdapterEMA(model)
    randomize_adapter(model, TRAINED_ADAPTER, seed=1)
    randomize_adapter(model, EMA_ADAPTER, seed=2)
    for adapter in (TRAINED_ADAPTER, EMA_ADAPTER):
        save_adapter(model, tmp_path / adapter, adapter)
        assert (tmp_path / adapter / "pytorch_lora_weights.safetensors").is_file()
    x, t, cond = inputs()
    with torch.no_grad():
        expected = {TRAINED_ADAPTER: model(x, t, cond), EMA_ADAPTER: ema(x, t, cond)}
        for adapter in (TRAINED_ADAPTER, EMA_ADAPTER):
            torch.manual_seed(0)
            fresh = build_backbone(preset)
            load_adapter_into(fresh, tmp_path / adapter)
            assert (fresh(x, t, cond) - expected[adapter]).abs().max() < 1e-6
        # The standard route: a diffusers pipeline's load_lora_weights (alpha comes from the metadata).
        torch.manual_seed(0)
        fresh = build_backbone(preset)
        pipeline = PIPELINES[preset](tokenizer=None, text_encoder=None, vae=None, transformer=fresh.transformer,
                                     scheduler=FlowMatchEulerDiscreteScheduler())
        pipeline.load_lora_weights(tmp_path / EMA_ADAPTER, adapter_name="apex")
        assert (fresh(x, t, cond) - expected[EMA_ADAPTER]).abs().max() < 1e-6


@pytest.mark.parametrize("preset", TINY)
def test_merged_export_matches_the_adapter_model(preset, tmp_path):
    model = lora_model(preset)
    ema = AdapterEMA(model)
    randomize_adapter(model, TRAINED_ADAPTER, seed=1)
    randomize_adapter(model, EMA_ADAPTER, seed=2)
    x, t, cond = inputs()
    with torch.no_grad():
        expected = {TRAINED_ADAPTER: model(x, t, cond), EMA_ADAPTER: ema(x, t, cond)}
        for adapter in (TRAINED_ADAPTER, EMA_ADAPTER):
            save_merged(model, tmp_path / adapter, adapter)
            merged = load_backbone(tmp_path / adapter)
            assert not any("lora" in n for n, _ in merged.named_parameters())
            assert (merged(x, t, cond) - expected[adapter]).abs().max() < 1e-5
        assert torch.equal(model(x, t, cond), expected[TRAINED_ADAPTER])  # the model keeps its adapters
        merge_adapter(model, EMA_ADAPTER)  # in place
        assert (model(x, t, cond) - expected[EMA_ADAPTER]).abs().max() < 1e-5


# --- two processes, FSDP2 over gloo -----------------------------------------------------------


def _batch(rank: int, step: int) -> Batch:
    x, _, cond = inputs(seed=1000 * rank + step, size=16)  # 16 x 16 pixels keep the steps cheap
    return Batch(x, cond)


def _setup(preset: str, rank: int, adapter_seed: int):
    """What the worker builds for a LoRA run of ``preset`` under FSDP2; ``adapter_seed`` other than 1
    gives the same base with another adapter initialisation (scaled lora_A)."""
    config = load_config(None, [f"model.backbone={preset}", "model.pretrained=null", "model.lora.enabled=true",
                                "model.lora.rank=4", "model.lora.alpha=8", "ema.decay=0.5", "ema.warmup=0",
                                "optim.lr=1e-3", "objective.buffer_size=16", "distributed.num_workers=2",
                                "train.global_batch=4", "train.seed=0"])
    training = build_training(config, "cpu", rank, text_embed_dim=384)
    if adapter_seed != 1:
        with torch.no_grad():
            for name, param in training.backbone.named_parameters():
                if adapter_of(name) == TRAINED_ADAPTER and "lora_A" in name:
                    param.mul_(-0.5 * adapter_seed)
    return training.backbone, training.ema, training.optimizer, training.runner, training.state


def _split(weights: dict[str, torch.Tensor]):
    """(base, adapters) of a gathered state dict, copied (the gather may alias the parameters)."""
    weights = {k: v.clone() for k, v in weights.items()}
    base = {k: v for k, v in weights.items() if adapter_of(k) is None}
    return base, {k: v for k, v in weights.items() if adapter_of(k) is not None}


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0.0, f"{what}: differs by {worst}"


def _train_checkpoint_resume(preset: str, rank: int, directory: str) -> None:
    model, ema, optimizer, runner, state = _setup(preset, rank, adapter_seed=1)
    trained = [n for n, p in model.named_parameters() if adapter_of(n) == TRAINED_ADAPTER]
    optimized = optimizer.param_groups[0]["params"]
    assert len(optimized) == len(trained) and all(isinstance(p, DTensor) for p in optimized)
    base_before, adapters_before = _split(full_state_dict(model))

    runner.train_step([_batch(rank, 1)])
    save_checkpoint(directory, state, {"runner": runner.extra_state()})
    runner.train_step([_batch(rank, 2)])  # with L_adv: the buffer holds step 1's generations
    base_after, adapters_after = _split(full_state_dict(model))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trained  # after EMA switches
    if rank == 0:
        _assert_same(base_before, base_after, "frozen base")
        moved = {adapter_of(k) for k in adapters_after if not torch.equal(adapters_before[k], adapters_after[k])}
        assert moved == {TRAINED_ADAPTER, EMA_ADAPTER}

    # The checkpoint holds the adapters, their optimiser state and the EMA count, not the base.
    keys = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata.keys()
    weights = [k for k in keys if k.startswith(("train.adapter.", "train.ema.weights."))]
    assert {adapter_of(k) for k in weights} == {TRAINED_ADAPTER, EMA_ADAPTER}
    assert all(adapter_of(k) == TRAINED_ADAPTER for k in keys if k.startswith("train.optimizer.state."))
    assert not [k for k in keys if not k.startswith(("train.adapter.", "train.ema.", "train.optimizer."))]

    # A fresh model (same base, other adapter init) resumes from step 1 and reproduces step 2.
    model2, ema2, _, runner2, state2 = _setup(preset, rank, adapter_seed=2)
    extra = load_checkpoint(directory, state2)
    runner2.load_extra_state(extra["runner"])
    assert ema2.num_updates == 1
    runner2.train_step([_batch(rank, 2)])
    base_resumed, adapters = _split(full_state_dict(model2))
    if rank == 0:
        _assert_same(base_after, base_resumed, "base after resume")
        _assert_same(adapters_after, adapters, "adapters after resume")

    # Exports from the sharded model: the EMA adapter file and the merged EMA agree (rank 0 writes).
    save_adapter(model2, os.path.join(directory, "ema-adapter"), EMA_ADAPTER)
    save_merged(model2, os.path.join(directory, "ema-merged"), EMA_ADAPTER)
    if rank == 0:
        x, t, cond = inputs()
        with torch.no_grad():
            torch.manual_seed(0)
            adapted = build_backbone(preset)  # the same base as lora_model's
            load_adapter_into(adapted, os.path.join(directory, "ema-adapter"))
            merged = load_backbone(os.path.join(directory, "ema-merged"))
            assert (adapted(x, t, cond) - merged(x, t, cond)).abs().max() < 1e-5

    # The EMA update lerps the local shards (DTensors) exactly.
    decay = ema2.current_decay()
    ema2.update(model2)
    _, updated = _split(full_state_dict(model2))
    if rank == 0:
        for k, v in updated.items():
            if adapter_of(k) == EMA_ADAPTER:
                expected = decay * adapters[k] + (1 - decay) * adapters[k.replace(".ema.", ".default.")]
                torch.testing.assert_close(v, expected, rtol=0, atol=1e-7)


def _fsdp_worker(rank: int, world_size: int, port: int, directory: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for preset in TINY:
            _train_checkpoint_resume(preset, rank, os.path.join(directory, preset))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_trains_adapters_only_and_resumes_from_an_adapter_checkpoint(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
