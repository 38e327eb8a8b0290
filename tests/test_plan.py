"""The memory planner: its estimate against the measured peak of real CPU training steps, its
activation constants against a fresh measurement, and the CLI on the shipped presets."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apex_ray.config import load_config
from apex_ray.engine.memory_plan import (
    ACTIVATION_CONSTANTS,
    allocated_by,
    measure_activation_constants,
    plan,
)
from apex_ray.engine.build import build_training
from apex_ray.method.batch import Batch
from apex_ray.method.conditioning import Conditioning
from apex_ray.method.ema import EMA
from apex_ray.plan import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TOLERANCE = 0.30
"""The plan must be within 30% of the measured peak (it leaves out embeddings, LoRA branches and
short-lived temporaries; the tiny models, with few layers, show this the most)."""


pytestmark = pytest.mark.usefixtures("one_thread")


def measured_peak(config) -> int:
    """Peak bytes of one steady-state APEX step (the second), one CPU process: the states live
    before the step (weights, EMA, AdamW moments) plus the profiler's allocation peak during it."""
    training = build_training(config, "cpu", pretrained=False, distributed=False)  # what the worker builds
    model, ema, optimizer, runner = training.backbone, training.ema, training.optimizer, training.runner
    generator = torch.Generator().manual_seed(0)
    rows, text, side = config.micro_batch, config.model.max_text_length, model.sample_size

    def batch() -> Batch:
        cond = Conditioning(torch.randn(rows, text, model.text_embed_dim, generator=generator),
                            torch.ones(rows, text, dtype=torch.long))
        return Batch(torch.randn(rows, model.latent_channels, side, side, generator=generator), cond)

    runner.train_step([batch()])  # AdamW state exists and the fake-sample buffer is not empty
    states = [*model.parameters(), *(t for s in optimizer.state.values() for t in s.values())]
    if isinstance(ema, EMA):
        states += list(ema.parameters())
    if training.frozen is not None and hasattr(training.frozen, "parameters"):  # a full fine-tune's frozen copy
        states += list(training.frozen.parameters())
    before = sum(t.numel() * t.element_size() for t in states)
    step = batch()
    peak, _ = allocated_by(lambda: runner.train_step([step]))
    return before + peak


@pytest.mark.parametrize("backbone, options", [
    ("sana-tiny", []),
    ("qwen-image-tiny", []),
    ("sana-tiny", ["distributed.activation_checkpointing=true"]),
    ("qwen-image-tiny", ["distributed.activation_checkpointing=true"]),
    ("qwen-image-tiny", ["model.lora.enabled=true", "model.lora.rank=8"]),
])
def test_plan_is_within_tolerance_of_a_measured_cpu_step(backbone, options):
    config = load_config(None, [f"model.backbone={backbone}", "model.pretrained=null", "distributed.strategy=single",
                                "distributed.num_workers=1", "train.global_batch=6", "model.max_text_length=12",
                                *options])
    estimate = plan(config).step
    measured = measured_peak(config)
    assert abs(estimate - measured) <= TOLERANCE * measured, (
        f"plan {estimate / 2**20:.1f} MiB vs measured {measured / 2**20:.1f} MiB")


@pytest.mark.parametrize("family", sorted(ACTIVATION_CONSTANTS))
def test_activation_constants_match_a_fresh_measurement(family):
    measured = measure_activation_constants(family)
    in_use = ACTIVATION_CONSTANTS[family]
    for name in ("k_img", "k_txt", "c_img", "c_txt"):
        assert getattr(measured, name) == pytest.approx(getattr(in_use, name), rel=0.1, abs=0.3), name


def test_presets_fit_on_8_gpus_and_a_full_qwen_image_says_what_to_change(capsys):
    for preset in ("sana_600m", "sana_1600m", "qwen_image_lora_r32", "qwen_image_lora_r64"):
        assert main(["--config", str(CONFIGS / f"{preset}.yaml"), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("\nfits") == 4 and "frozen base (bf16, sharded)" in out and "EMA adapter (fp32)" in out

    code = main(["--config", str(CONFIGS / "qwen_image_lora_r32.yaml"), "--gpus", "8",
                 "model.lora.enabled=false", "distributed.activation_checkpointing=false"])
    out = capsys.readouterr().out
    assert code == 1 and "does NOT fit" in out
    assert "distributed.activation_checkpointing=true" in out and "distributed.num_workers=" in out


def test_sharded_states_scale_with_the_gpu_count_and_lora_shrinks_them():
    full = load_config(CONFIGS / "sana_600m.yaml", check_files=False)
    at8, at16 = plan(full), plan(load_config(CONFIGS / "sana_600m.yaml", ["distributed.num_workers=16"], check_files=False))
    assert at16.part("AdamW moments (2 x fp32)") == pytest.approx(at8.part("AdamW moments (2 x fp32)") / 2)
    assert at8.sizes.trainable == at8.sizes.total and at8.sizes.frozen == 0
    lora = plan(load_config(CONFIGS / "qwen_image_lora_r32.yaml", check_files=False))
    assert 0.19e9 < lora.sizes.trainable < 0.23e9  # Table 1: "20 (r=32, 0.2)" B trainable
    assert lora.sizes.ema == lora.sizes.trainable and lora.sizes.frozen > 20e9
