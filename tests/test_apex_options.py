"""Issue 15: the selectable APEX options (frozen shift reference, released loss weights and delta
clamp, L_adv steps per generator step, guidance-enhanced target) and the diag/* branch-separation diagnostics."""
from __future__ import annotations

import math

import pytest
import torch

from apex_ray.config import load_config
from apex_ray.engine.build import build_training
from apex_ray.engine.diagnostics import evaluate_diagnostics
from apex_ray.engine.reference import AdapterOff, FrozenCopy
from apex_ray.method.batch import Batch
from apex_ray.method.buffer import FakeSampleBuffer
from apex_ray.method.conditioning import Conditioning, shift_condition
from apex_ray.method.diagnostics import branch_metrics, branch_statistics
from apex_ray.method.objective import APEXConfig, APEXObjective
from apex_ray.method.transport import interpolate
from apex_ray.models.lora import TRAINED_ADAPTER, adapter_of

B, C, H, W, L, D = 8, 3, 8, 8, 5, 4


def cond_of(n: int = B, dtype=torch.float64) -> Conditioning:
    return Conditioning(torch.rand(n, L, D, dtype=dtype) * 2 - 1, torch.ones(n, L, dtype=torch.long))


class Linear(torch.nn.Module):
    """``F = A x_t + Bt t + G mean(c)``, per pixel."""

    def __init__(self, scale: float = 0.3) -> None:
        super().__init__()
        self.A, self.Bt, self.G = (torch.nn.Parameter(torch.randn(C, H, W, dtype=torch.float64) * scale)
                                   for _ in range(3))

    def forward(self, x_t, t, cond):
        feat = cond.embeds.mean(dim=(1, 2)).reshape(-1, 1, 1, 1).to(x_t.dtype)
        return self.A * x_t + self.Bt * t.reshape(-1, 1, 1, 1).to(x_t.dtype) + self.G * feat


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Options of the objective
# ---------------------------------------------------------------------------------------------


def test_frozen_reference_delta_is_shifted_minus_frozen_by_hand():
    net, teacher = Linear(), Linear()
    config = APEXConfig(shift_reference="frozen")
    objective = APEXObjective(config, FakeSampleBuffer(8), frozen=teacher)
    x_hat, cond = torch.randn(4, C, H, W, dtype=torch.float64), cond_of(4)
    delta, calls = objective._shift_residual(net, net, x_hat, cond, gen(3))
    g = gen(3)  # the same draws, by hand
    noise = torch.randn(x_hat.shape, generator=g, dtype=x_hat.dtype)
    t = torch.rand(4, generator=g)
    y = interpolate(x_hat, noise, t)
    shifted, t_in = shift_condition(cond, t, config.shift_a, config.shift_b, config.shift_target)
    with torch.no_grad():
        expected = net(y, t_in, shifted) - teacher(y, t, cond)
        online = net(y, t_in, shifted) - net(y, t, cond)
    assert calls == 2
    torch.testing.assert_close(delta, expected)
    assert (delta - online).abs().max() > 1e-3  # the reference really is the frozen model


def test_frozen_reference_without_a_frozen_model_is_refused():
    with pytest.raises(ValueError, match="frozen"):
        APEXObjective(APEXConfig(shift_reference="frozen"), FakeSampleBuffer(8))


def test_delta_clip_bounds_delta():
    net, teacher = Linear(), Linear(scale=5.0)
    objective = APEXObjective(APEXConfig(shift_reference="frozen", delta_clip=1.0), FakeSampleBuffer(8), frozen=teacher)
    delta, _ = objective._shift_residual(net, net, torch.randn(4, C, H, W, dtype=torch.float64), cond_of(4), gen())
    assert delta.abs().max() <= 1.0 and (delta.abs() == 1.0).any()


def _run(config: APEXConfig, net, x, cond, seed: int, step: int = 0, fill: int = 8):
    torch.manual_seed(123)
    buffer = FakeSampleBuffer(64)
    buffer.push(torch.randn(fill, C, H, W, dtype=torch.float64), cond_of(fill))
    objective = APEXObjective(config, buffer)
    return objective(net, net, x, cond, gen(seed), step=step), buffer


def test_released_weighting_is_one_and_two_over_b_per_row():
    net = Linear()
    x, cond = torch.randn(B, C, H, W, dtype=torch.float64), cond_of()
    paper, _ = _run(APEXConfig(anchor_frac=0.5, adv_frac=0.5), net, x, cond, seed=5)
    released, _ = _run(APEXConfig(anchor_frac=0.5, adv_frac=0.5, weighting="released"), net, x, cond, seed=5)
    n_adv, n_anchor = paper.parts["n_adv"], paper.parts["n_anchor"]
    assert n_adv == released.parts["n_adv"] == 4 and n_anchor == 4
    # paper: means over the rows; released: sum / B and 2 sum / B
    assert released.parts["loss_adv"] == pytest.approx(paper.parts["loss_adv"].item() * n_adv / B, rel=1e-9)
    assert released.parts["loss_shift"] == pytest.approx(2 * paper.parts["loss_shift"].item() * n_anchor / B, rel=1e-9)
    assert released.parts["loss"] == pytest.approx(
        (released.parts["loss_path"] + released.parts["loss_adv"] + released.parts["loss_shift"]).item(), rel=1e-9)
    assert released.parts["loss_path"] == pytest.approx(paper.parts["loss_path"].item(), rel=1e-12)


def test_adv_steps_per_generator_step_trains_only_the_fake_score_between_generator_steps():
    net = Linear()
    config = APEXConfig(anchor_frac=0.5, adv_frac=0.5, adv_steps_per_generator_step=2)
    x, cond = torch.randn(B, C, H, W, dtype=torch.float64), cond_of()
    full, _ = _run(config, net, x, cond, seed=1, step=0)
    assert full.parts["generator_step"] == 1.0 and "loss_path" in full.parts and full.forward_calls == 3
    fake, buffer = _run(config, net, x, cond, seed=1, step=1)
    assert fake.parts["generator_step"] == 0.0 and "loss_path" not in fake.parts
    assert fake.parts["loss_shift"] == 0 and fake.parts["loss_adv"] > 0
    assert fake.parts["loss"] == pytest.approx(fake.parts["loss_adv"].item(), rel=1e-12)
    assert fake.forward_calls == 1 and fake.forward_rows == 4 + 4  # anchors (fresh fakes) + L_adv rows
    assert len(buffer) == 8 + 4  # the anchors' generations were pushed
    fake.loss.backward()
    assert net.A.grad is not None and torch.isfinite(net.A.grad).all()
    assert _run(config, net, x, cond, seed=1, step=2)[0].parts["generator_step"] == 1.0
    # with an empty buffer there is nothing for a fake-score step to learn from: a full step
    empty = APEXObjective(config, FakeSampleBuffer(8))(net, net, x, cond, gen(1), step=1)
    assert empty.parts["generator_step"] == 1.0


def test_guidance_enhanced_target_by_hand():
    from apex_ray.method.objective import guidance_enhanced

    target, f_c, f_u = (torch.randn(4, C, H, W, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.0, 0.3, 0.95, 1.0])
    out = guidance_enhanced(target, f_c, f_u, t, 0.5, (0.0, 0.9))
    torch.testing.assert_close(out[1], target[1] + 0.5 * (f_c[1] - f_u[1]))
    for row in (0, 2, 3):  # t = lo, t above hi, the t = 1 anchor: unchanged
        torch.testing.assert_close(out[row], target[row])


def test_guidance_ratio_adds_the_empty_prompt_rows_and_moves_the_path_target():
    net = Linear()
    x, cond = torch.randn(B, C, H, W, dtype=torch.float64), cond_of()
    empty = Conditioning(torch.zeros(1, L, D, dtype=torch.float64), torch.ones(1, L, dtype=torch.long))
    plain = APEXObjective(APEXConfig(anchor_frac=0.25), FakeSampleBuffer(8))(net, net, x, cond, gen(2))
    config = APEXConfig(anchor_frac=0.25, guidance_ratio=0.5)
    guided = APEXObjective(config, FakeSampleBuffer(8))
    with pytest.raises(ValueError, match="empty prompt"):
        guided(net, net, x, cond, gen(2))
    guided = APEXObjective(config, FakeSampleBuffer(8))
    guided.empty_prompt = empty
    assert guided.needs_empty_prompt
    seen = []

    def ema(x_t, t, c):
        seen.append(c)
        return net(x_t, t, c)

    out = guided(net, ema, x, cond, gen(2))
    [ema_cond] = seen
    assert ema_cond.batch_size == 3 * B  # x_t and x_s under c, then x_t under the empty prompt
    torch.testing.assert_close(ema_cond.embeds[2 * B:], empty.embeds.expand(B, L, D))
    assert out.forward_rows == plain.forward_rows + B
    assert out.parts["loss_path"] != pytest.approx(plain.parts["loss_path"].item(), rel=1e-6)
    # A model that ignores the text has no guidance direction: the same loss as without guidance.
    blind = Linear()
    torch.nn.init.zeros_(blind.G)
    blind_plain = APEXObjective(APEXConfig(anchor_frac=0.25), FakeSampleBuffer(8))(blind, blind, x, cond, gen(2))
    blind_guided = APEXObjective(config, FakeSampleBuffer(8))
    blind_guided.empty_prompt = empty
    assert blind_guided(blind, blind, x, cond, gen(2)).parts["loss_path"] == pytest.approx(
        blind_plain.parts["loss_path"].item(), rel=1e-12)


@pytest.mark.parametrize("kwargs, field", [
    ({"guidance_ratio": -0.5}, "guidance_ratio"),
    ({"guidance_range": (0.5, 0.2)}, "guidance_range"),
    ({"shift_reference": "teacher"}, "shift_reference"),
    ({"weighting": "dmd"}, "weighting"),
    ({"adv_steps_per_generator_step": 0}, "adv_steps_per_generator_step"),
    ({"delta_clip": 0.0}, "delta_clip"),
])
def test_bad_option_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        APEXConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Diagnostics (pure math)
# ---------------------------------------------------------------------------------------------


def test_fit_errors_vanish_for_the_exact_velocity_of_a_point_mass():
    x0 = torch.randn(1, C, H, W, dtype=torch.float64)
    x = x0.expand(B, -1, -1, -1).clone()

    def exact(x_t, t, cond):  # ignores the condition: both branches are exact, delta_d = 0
        return (x_t - x0) / t.reshape(-1, 1, 1, 1).to(x_t.dtype)

    metrics = branch_metrics(branch_statistics(exact, x, cond_of(), APEXConfig(), frozen=exact, generator=gen()))
    for key in ("fit_shifted_gen", "fit_plain_gen", "fit_shifted_real", "fit_plain_real", "delta_ratio",
                "plain_drift_rms"):
        assert metrics[key] < 1e-6, key
    assert metrics["contrast_gen"] == pytest.approx(metrics["contrast_real"])  # the generations are x0
    wrong = branch_metrics(branch_statistics(lambda x_t, t, c: x_t, x, cond_of(), APEXConfig(), generator=gen()))
    assert wrong["fit_plain_real"] > 0.1 and "cos_delta_frozen" not in wrong  # no frozen model: absent


def test_cos_is_one_when_the_reference_is_the_frozen_model_and_drift_is_by_hand():
    net, teacher = Linear(), Linear()
    x, cond = torch.randn(B, C, H, W, dtype=torch.float64), cond_of()
    config = APEXConfig(shift_reference="frozen")
    metrics = branch_metrics(branch_statistics(net, x, cond, config, frozen=teacher, generator=gen(2)))
    assert metrics["cos_delta_frozen"] == pytest.approx(1.0, abs=1e-9)
    # by hand, with the same draws
    g = gen(2)
    z = torch.randn(x.shape, generator=g, dtype=x.dtype)
    with torch.no_grad():
        x_hat = z - net(z, torch.ones(B), cond)
        noise_g, _ = (torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(2))
        t_g, _ = torch.rand(B, generator=g), torch.rand(B, generator=g)
        y = interpolate(x_hat, noise_g, t_g)
        drift = (net(y, t_g, cond) - teacher(y, t_g, cond)).pow(2).mean().sqrt()
        shifted, t_in = shift_condition(cond, t_g, config.shift_a, config.shift_b, config.shift_target)
        delta = net(y, t_in, shifted) - teacher(y, t_g, cond)
        fit = ((net(y, t_in, shifted) - (noise_g - x_hat)).pow(2).sum() / (noise_g - x_hat).pow(2).sum()).sqrt()
    assert metrics["plain_drift_rms"] == pytest.approx(drift.item(), rel=1e-5)
    assert metrics["delta_ratio"] == pytest.approx((delta.norm() / net(y, t_g, cond).norm()).item(), rel=1e-5)
    assert metrics["fit_shifted_gen"] == pytest.approx(fit.item(), rel=1e-5)
    online = branch_metrics(branch_statistics(net, x, cond, APEXConfig(), frozen=net, generator=gen(2)))
    assert online["cos_delta_frozen"] == pytest.approx(1.0, abs=1e-9) and online["plain_drift_rms"] == 0
    other = branch_metrics(branch_statistics(net, x, cond, APEXConfig(), frozen=teacher, generator=gen(2)))
    assert abs(other["cos_delta_frozen"]) < 0.999


# ---------------------------------------------------------------------------------------------
# End to end on the tiny SANA (StepRunner without Ray)
# ---------------------------------------------------------------------------------------------


def _training(*overrides: str):
    config = load_config(None, ["model.pretrained=null", "distributed.strategy=single", "distributed.num_workers=1",
                                "train.global_batch=4", "model.backbone_overrides={num_layers: 1}", *overrides])
    return build_training(config, "cpu", text_embed_dim=16, distributed=False)


def _batch(n: int = 4, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 32, 32, generator=g),
                 Conditioning(torch.randn(n, 16, 16, generator=g), torch.ones(n, 16, dtype=torch.long)))


@pytest.mark.parametrize("options", [
    ["objective.apex.shift_reference=frozen"],
    ["objective.apex.shift_reference=ema", "objective.apex.weighting=released", "objective.apex.delta_clip=1.0"],
    ["objective.apex.adv_steps_per_generator_step=2", "eval.diagnostics_frozen=false"],
    ["objective.apex.shift_reference=frozen", "model.lora.enabled=true", "model.lora.rank=4"],
    ["objective.apex.guidance_ratio=0.5", "eval.diagnostics_frozen=false"],
])
def test_step_runs_end_to_end_with_each_option_and_diagnostics_follow(options):
    training = _training(*options)
    runner = training.runner
    if runner.objective.needs_empty_prompt:  # what the worker sets from the text encoder
        runner.objective.empty_prompt = Conditioning(torch.zeros(1, 16, 16), torch.ones(1, 16, dtype=torch.long))
    start = training.frozen(*_probe()) if training.frozen is not None else None
    steps = [runner.train_step([_batch(seed=i)]) for i in range(3)]
    assert all(math.isfinite(m["loss"]) for m in steps)
    diag = evaluate_diagnostics(training, _batch(seed=9))
    assert all(k.startswith("diag/") for k in diag) and math.isfinite(diag["diag/fit_shifted_gen"])
    if training.frozen is None:
        assert "diag/cos_delta_frozen" not in diag
        if runner.objective.config.adv_steps_per_generator_step == 2:
            assert steps[1]["generator_step"] == 0.0 and steps[2]["generator_step"] == 1.0
        return
    assert -1.0 <= diag["diag/cos_delta_frozen"] <= 1.0 and diag["diag/plain_drift_rms"] > 0  # the model moved
    torch.testing.assert_close(training.frozen(*_probe()), start)  # the frozen model did not
    if training.lora is not None:
        assert isinstance(training.frozen, AdapterOff)
        trainable = {n for n, p in training.model.named_parameters() if p.requires_grad}
        assert trainable and all(adapter_of(n) == TRAINED_ADAPTER for n in trainable)
        assert all(not layer.disable_adapters for layer in training.frozen._layers)
    else:
        assert isinstance(training.frozen, FrozenCopy)
        assert not any(p.requires_grad for p in training.frozen.parameters())


def _probe():
    b = _batch(seed=42)
    return b.latents, torch.full((4,), 0.5), b.cond


def test_diagnostics_off_costs_nothing():
    training = _training("eval.diagnostics=false")
    assert training.frozen is None and evaluate_diagnostics(training, _batch()) == {}
